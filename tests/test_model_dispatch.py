"""The shared dispatcher against a plain reference: each token through its chosen experts one by
one, written out by hand here (no code of moe_lm.model.dispatch is reused).

Checked for every dispatch path, every activation, outputs and gradients (input, expert weights,
router weights), with empty experts and with capacity drops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_lm.config import MoEConfig
from moe_lm.model import dispatch, gemm
from moe_lm.model.moe import FeedForward, MoELayer

TOL = dict(rtol=1e-5, atol=1e-5)


def expert_by_hand(x_row: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert on one row: gate/up then down, in the x @ W layout."""
    h = x_row @ w_in
    if activation == "swiglu":
        hid = w_down.shape[0]
        a = F.silu(h[:hid]) * h[hid:]
    elif activation == "relu":
        a = torch.clamp(h, min=0)
    else:
        a = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return a @ w_down


def reference_layer(layer: MoELayer, x: torch.Tensor, capacity: int | None = None,
                    allowed: list[int] | None = None) -> torch.Tensor:
    """softmax top-k routing (Mixtral) and per-token, per-assignment expert calls, in Python.
    capacity: each expert keeps its first `capacity` assignments in position order (x is one
    sequence; causal capacity). allowed: experts the router may pick (others masked), to leave experts empty."""
    ex, k = layer.experts, layer.cfg.top_k
    logits = x @ layer.router.weight.t()
    if allowed is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[:, allowed] = 0
        logits = logits + mask
    probs = torch.softmax(logits, dim=-1)
    out = torch.zeros_like(x)
    chosen = []  # (token, expert, prob, weight)
    for t in range(x.shape[0]):
        p_sorted, idx = torch.sort(probs[t], descending=True)
        top_p = p_sorted[:k]
        weights = top_p / top_p.sum() if k > 1 else top_p
        for j in range(k):
            chosen.append((t, int(idx[j]), float(top_p[j].detach()), weights[j]))
    if capacity is not None:
        kept = []
        for e in range(layer.n_experts):
            mine = [c for c in chosen if c[1] == e]
            mine.sort(key=lambda c: c[0])  # by position: a token competes only with earlier ones
            kept += mine[:capacity]
        chosen = kept
    for t, e, _, w in chosen:
        out[t] = out[t] + w * expert_by_hand(x[t], ex.w_in[e], ex.w_down[e], ex.activation)
    return out


class MaskedRouter(torch.nn.Module):
    """Wraps a SoftmaxTopK router so that only `allowed` experts can be picked."""

    def __init__(self, router, allowed):
        super().__init__()
        self.inner, self.allowed = router, allowed
        self.weight = router.weight

    def forward(self, x, pos=None):
        from moe_lm.model.routing import Routing

        logits = x.float() @ self.weight.t()
        mask = torch.full_like(logits, float("-inf"))
        mask[:, self.allowed] = 0
        probs = torch.softmax(logits + mask, dim=-1)
        k = self.inner.top_k
        top_p, top_idx = probs.topk(k, dim=-1)
        w = top_p / top_p.sum(-1, keepdim=True) if k > 1 else top_p
        T = x.shape[0]
        return Routing(torch.arange(T).repeat_interleave(k), top_idx.reshape(-1), w.reshape(-1),
                       top_p.reshape(-1).detach(), logits, probs, k)


def make_layer(activation="swiglu", E=6, k=2, d=16, h=8, cf=None, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(n_experts=E, top_k=k, router="softmax_topk", capacity_factor=cf)
    layer = MoELayer(d, h, activation, cfg, std=0.3, down_std=0.3)
    with torch.no_grad():
        layer.router.weight.normal_(std=1.0)
    return layer


def grads_of(fn, layer: MoELayer, x: torch.Tensor):
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * g).sum().backward()
    return [y.detach(), x.grad, layer.router.weight.grad, layer.experts.w_in.grad, layer.experts.w_down.grad]


GRADS = ["output", "d input", "d router", "d w_in", "d w_down"]


def on_device_against_cpu_reference(path: str, dtype: torch.dtype, device: str):
    """A layer (8 experts top-2, d 64) on `device` in `dtype` and forced onto `path`, and the
    per-token reference on the CPU in float32 with the same weights (rounded to dtype first, so
    both see the same numbers and route alike: router math is float32 in both) ->
    (ours, reference): outputs and gradients, as `grads_of` lists them."""
    import copy

    cpu = make_layer("swiglu", E=8, k=2, d=64, h=32)
    with torch.no_grad():
        for p in cpu.parameters():
            p.copy_(p.to(dtype).float())
    x = torch.randn(48, 64).to(dtype).float()
    ref = grads_of(lambda x: reference_layer(cpu, x), cpu, x)
    layer = copy.deepcopy(cpu).to(device, dtype)
    layer.dispatch_path = path
    xd = x.to(device, dtype).requires_grad_(True)
    y = layer(xd)[0]
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(device, dtype)
    (y * g).sum().backward()
    ours = [y.detach(), xd.grad, layer.router.weight.grad, layer.experts.w_in.grad, layer.experts.w_down.grad]
    return [a.float().cpu() for a in ours], ref


def assert_close_bf16(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """a (bfloat16 results, as float32) against b (the float32 reference).

    bf16 keeps 8 significant bits (unit roundoff 2^-8, 0.4%), and the error of a sum scales with
    its terms, not with the sum: where two experts' contributions nearly cancel, an element-wise
    relative bound fails on correct code (an H200 run: 0.12 off on an element near 0). So the
    bound is on the error's norm, 1.5e-2 of the reference's, and on each element, 3e-2 of the
    reference's largest; every path in bf16 on a CPU measured 0.5% and at most 1.2%."""
    err = (a - b).abs()
    assert (a - b).norm() <= 1.5e-2 * b.norm(), f"{name}: relative error {float((a - b).norm() / b.norm()):.4f}"
    assert err.max() <= 3e-2 * b.abs().max(), f"{name}: max error {float(err.max()):.4f}, max |ref| {float(b.abs().max()):.3f}"


@pytest.mark.parametrize("path", dispatch.PATHS)
def test_every_path_in_bf16_on_the_cpu_equals_the_float32_reference(path):
    ours, ref = on_device_against_cpu_reference(path, torch.bfloat16, "cpu")
    for name, a, b in zip(GRADS, ours, ref):
        assert_close_bf16(a, b, name)


def assert_took(layer: MoELayer, path: str) -> None:
    """The kernel path ran where it can (else these tests would test "fused" under its name)."""
    from moe_lm.model import cpu_kernel

    if path == "cpu_kernel" and cpu_kernel.cpu_has_brgemm() and cpu_kernel.load() is not None:
        assert layer.experts.last_path == "cpu_kernel"


@pytest.mark.parametrize("path", dispatch.PATHS)
@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu"])
def test_grouped_dispatch_equals_per_token_reference(path, activation):
    layer = make_layer(activation)
    layer.dispatch_path = path
    x = torch.randn(24, 16)
    ours = grads_of(lambda x: layer(x)[0], layer, x)
    assert_took(layer, path)
    ref = grads_of(lambda x: reference_layer(layer, x), layer, x)
    for name, a, b in zip(["output", "d input", "d router", "d w_in", "d w_down"], ours, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("path", dispatch.PATHS)
def test_dispatch_with_empty_experts(path):
    layer = make_layer("swiglu", E=8, k=2)
    allowed = [1, 4, 5]  # experts 0, 2, 3, 6, 7 receive nothing
    layer.router = MaskedRouter(layer.router, allowed)
    layer.dispatch_path = path
    x = torch.randn(20, 16)
    y, stats = layer(x)
    assert stats.load[[0, 2, 3, 6, 7]].sum() == 0 and stats.load.sum() == 40
    ours = grads_of(lambda x: layer(x)[0], layer, x)
    assert_took(layer, path)
    ref = grads_of(lambda x: reference_layer(layer, x, allowed=allowed), layer, x)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)
    assert layer.experts.w_in.grad[[0, 2, 3, 6, 7]].abs().sum() == 0  # no gradient without tokens


@pytest.mark.parametrize("path", dispatch.PATHS)
def test_capacity_drops_the_latest_assignments_and_dropped_tokens_pass_through_zero(path):
    cf = 0.5
    layer = make_layer("swiglu", E=4, k=2, cf=cf)
    layer.dispatch_path = path
    x = torch.randn(32, 16)
    C = math.ceil(cf * 32 * 2 / 4)
    y, stats = layer(x)
    assert stats.dropped_frac > 0.3 and stats.load.max() <= C
    torch.testing.assert_close(stats.dropped_frac, torch.tensor(1 - float(stats.load.sum()) / 64))
    ours = grads_of(lambda x: layer(x)[0], layer, x)
    assert_took(layer, path)
    ref = grads_of(lambda x: reference_layer(layer, x, capacity=C), layer, x)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)
    # a token that lost all its assignments contributes exactly zero (the residual carries it)
    assert (y.abs().sum(-1) == 0).any()


def test_fused_and_grouped_paths_agree_on_a_bigger_layer():
    if "grouped_mm" not in dispatch.PATHS:
        pytest.skip("this torch has no grouped_mm")
    layer = make_layer("swiglu", E=16, k=4, d=64, h=32)
    x = torch.randn(256, 64)
    out = {}
    for path in dispatch.PATHS:
        layer.dispatch_path = path
        out[path] = grads_of(lambda x: layer(x)[0], layer, x)
    for a, b in zip(out["fused"], out["grouped_mm"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_one_expert_top1_equals_the_dense_ffn_with_the_same_weights():
    torch.manual_seed(1)
    d, h = 16, 12
    layer = MoELayer(d, h, "swiglu", MoEConfig(n_experts=1, top_k=1, router="softmax_topk"), 0.3, 0.3)
    dense = FeedForward(d, h, "swiglu", 0.3, 0.3)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(layer.experts.w_gate_up[0, :, :h].t())
        dense.up_proj.weight.copy_(layer.experts.w_gate_up[0, :, h:].t())
        dense.down_proj.weight.copy_(layer.experts.w_down[0].t())
    x = torch.randn(2, 10, d)
    torch.testing.assert_close(layer(x)[0], dense(x), **TOL)


def test_top_k_equal_to_n_experts_is_the_full_softmax_mixture():
    """y = Σ_e softmax(x W^T)_e · FFN_e(x), written out."""
    layer = make_layer("swiglu", E=4, k=4)
    x = torch.randn(12, 16)
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    ex = layer.experts
    y = torch.zeros_like(x)
    for e in range(4):
        g = x @ ex.w_gate_up[e][:, :8]
        u = x @ ex.w_gate_up[e][:, 8:]
        y += probs[:, e:e + 1] * ((g * torch.sigmoid(g) * u) @ ex.w_down[e])
    torch.testing.assert_close(layer(x)[0], y, **TOL)


def test_shared_experts_add_an_always_on_ffn():
    torch.manual_seed(2)
    cfg = MoEConfig(n_experts=4, top_k=2, n_shared_experts=2)
    layer = MoELayer(16, 8, "swiglu", cfg, 0.3, 0.3)
    x = torch.randn(10, 16)
    routed = MoELayer(16, 8, "swiglu", MoEConfig(n_experts=4, top_k=2), 0.3, 0.3)
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    assert layer.shared_experts.up_proj.weight.shape == (16, 16)  # 2 shared experts of width 8
    torch.testing.assert_close(layer(x)[0], routed(x)[0] + layer.shared_experts(x), **TOL)


def test_bf16_autocast_runs_experts_in_bf16_with_router_math_in_float32():
    layer = make_layer("swiglu")
    x = torch.randn(24, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(x.bfloat16())
        y, stats = layer(x)
    assert r.logits.dtype == torch.float32 and r.weight.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x)[0], rtol=0.05, atol=0.05)


def test_every_path_agrees_with_fused_on_a_bigger_layer_with_uneven_experts():
    layer = make_layer("swiglu", E=16, k=4, d=64, h=32)
    x = torch.randn(256, 64)
    out = {}
    for path in dispatch.PATHS:
        layer.dispatch_path = path
        out[path] = grads_of(lambda x: layer(x)[0], layer, x)
    assert len(set(layer(x)[1].load.tolist())) > 1  # the experts' row counts differ (padding is exercised)
    for path in dispatch.PATHS:
        for a, b in zip(out[path], out["fused"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_choose_path_fused_on_cpu_and_elsewhere_pads_only_balanced_experts():
    from moe_lm.model import cpu_kernel

    x = torch.zeros(4, 4)
    small = "cpu_kernel" if cpu_kernel.load() is not None else "fused"
    assert dispatch.choose_path(x, [100, 101, 99, 100]) == small
    assert dispatch.choose_path(x, [100, 101, 99, 100], width=8) == small
    assert dispatch.choose_path(x.bfloat16(), [100, 101, 99, 100]) == "fused"  # the kernel is float32's
    x512 = torch.zeros(4, 512)  # big experts (512 x 1024, 1,024 rows each) keep the fused path's threads
    assert dispatch.choose_path(x512, [1024] * 8, width=1024) == "fused"
    meta = torch.zeros(4, 4, device="meta")  # stands for an accelerator without bf16 grouped_mm
    assert dispatch.choose_path(meta, [100, 101, 99, 100]) == "padded"
    assert dispatch.choose_path(meta, [400, 0, 0, 0]) == "fused"  # padding would compute 4x the rows
    assert dispatch.padded_rows([3, 5, 1]) == 15


def test_the_layer_records_the_path_its_rule_took():
    layer = make_layer("swiglu", E=4, k=2)
    layer(torch.randn(32, 16))
    assert layer.experts.last_path in dispatch.PATHS
    layer.dispatch_path = "fused"
    layer(torch.randn(32, 16))
    assert layer.experts.last_path == "fused"


# --- the fused path's blocks: consecutive experts, their matmuls grouped or looped ---


def test_plan_blocks_cuts_consecutive_experts_at_the_row_budget(monkeypatch):
    monkeypatch.setattr(dispatch, "BLOCK_BYTES", 80)  # 8 rows of 10 bytes a block
    sizes = [0, 3, 0, 0, 5, 2, 0, 7, 0]
    # by hand: experts 1-4 fill 3 + 5 = 8 rows (2 and 3 empty inside); expert 5 would make 10, so
    # a new block; expert 7 would make 2 + 7 = 9, so another; the empty 0, 6 and 8 end no block
    assert dispatch.plan_blocks(sizes, 10) == [(0, 8, 1, [3, 0, 0, 5]), (8, 10, 5, [2]), (10, 17, 7, [7])]
    assert dispatch.plan_blocks([20], 10) == [(0, 20, 0, [20])]  # bigger than the budget: alone
    assert dispatch.plan_blocks([0, 0, 0], 10) == []


@pytest.mark.skipif(dispatch._grouped_mm is None, reason="this torch has no grouped_mm")
def test_grouped_blocks_only_where_grouped_mm_takes_the_tensors():
    w_in, w_down = torch.zeros(4, 16, 64), torch.zeros(4, 32, 16)
    assert dispatch.use_grouped_blocks(torch.zeros(8, 16), w_in, w_down)
    assert dispatch.use_grouped_blocks(torch.zeros(8, 16).bfloat16(), w_in.bfloat16(), w_down.bfloat16())
    assert not dispatch.use_grouped_blocks(torch.zeros(8, 16).double(), w_in.double(), w_down.double())
    # rows of 6 floats (24 bytes): grouped_mm wants strides that are multiples of 16 bytes
    assert not dispatch.use_grouped_blocks(torch.zeros(8, 16), torch.zeros(4, 16, 12), torch.zeros(4, 6, 16))
    assert not dispatch.use_grouped_blocks(torch.zeros(8, 16, device="meta"), w_in.to("meta"), w_down.to("meta"))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "mm_loop"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("h", [8, 6])  # rows of 32 bytes (grouped_mm takes them) and of 24 (it does not)
def test_fused_blocks_grouped_or_looped_equal_the_reference(monkeypatch, grouped, activation, h):
    """Empty experts inside a block (2, 3) and before / after every block (0, 6, 7): the grouped
    matmul and the loop both give the reference's outputs and gradients, and exactly zero
    gradients to the empty experts."""
    monkeypatch.setattr(dispatch, "GROUPED_BLOCKS", grouped)
    layer = make_layer(activation, E=8, k=2, h=h)
    allowed = [1, 4, 5]
    layer.router = MaskedRouter(layer.router, allowed)
    layer.dispatch_path = "fused"
    x = torch.randn(20, 16)
    ex = layer.experts
    expect = grouped and dispatch._grouped_mm is not None and h == 8
    assert dispatch.use_grouped_blocks(x, ex.w_in, ex.w_down) == expect
    ours = grads_of(lambda x: layer(x)[0], layer, x)
    ref = grads_of(lambda x: reference_layer(layer, x, allowed=allowed), layer, x)
    for name, a, b in zip(GRADS, ours, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")
    empty = [0, 2, 3, 6, 7]
    assert ex.w_in.grad[empty].abs().sum() == 0 and ex.w_down.grad[empty].abs().sum() == 0


@pytest.mark.skipif(dispatch._grouped_mm is None, reason="this torch has no grouped_mm")
def test_grouped_blocks_give_the_bits_of_the_mm_loop_over_several_blocks(monkeypatch):
    """Blocks of several experts each, empty experts inside and between them: the grouped matmuls
    (one call per block and matmul) give exactly the bits of one torch.mm per expert (torch's BLAS
    for both: oneDNN, model.gemm, would round differently)."""
    monkeypatch.setattr(dispatch, "BLOCK_BYTES", 40 * 4 * (64 + 2 * 32 + 16))  # ~40 rows a block
    monkeypatch.setattr(gemm, "backend", lambda: "blas")
    layer = make_layer("swiglu", E=16, k=2, h=32)
    layer.router = MaskedRouter(layer.router, [0, 1, 3, 4, 5, 8, 9, 10, 13, 14])
    layer.dispatch_path = "fused"
    x = torch.randn(96, 16)
    calls = []
    real = dispatch._grouped_mm
    monkeypatch.setattr(dispatch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grouped = grads_of(lambda x: layer(x)[0], layer, x)
    n_grouped = len(calls)
    monkeypatch.setattr(dispatch, "GROUPED_BLOCKS", False)
    looped = grads_of(lambda x: layer(x)[0], layer, x)
    assert n_grouped >= 2 * 5 and len(calls) == n_grouped  # several blocks went grouped; the loop none
    for name, a, b in zip(GRADS, grouped, looped):
        assert torch.equal(a, b), name


def test_a_torch_whose_grouped_mm_has_no_cpu_kernel_keeps_the_mm_loop(monkeypatch):
    """torch 2.8 has grouped_mm but no CPU kernel: the probe says no, and the layer still runs."""
    def no_cpu_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from the 'CPU' backend")

    monkeypatch.setattr(dispatch, "_grouped_mm", no_cpu_kernel)
    dispatch._cpu_grouped_mm_runs.cache_clear()
    try:
        layer = make_layer("swiglu", E=8, k=2)
        layer.dispatch_path = "fused"
        x = torch.randn(20, 16)
        assert not dispatch.use_grouped_blocks(x, layer.experts.w_in, layer.experts.w_down)
        ours = grads_of(lambda x: layer(x)[0], layer, x)
        ref = grads_of(lambda x: reference_layer(layer, x), layer, x)
        for name, a, b in zip(GRADS, ours, ref):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")
    finally:
        dispatch._cpu_grouped_mm_runs.cache_clear()


# --- the fused path's expert threads (CPU): blocks of experts shared out over worker threads ---


@pytest.fixture
def two_threads_one_expert_per_block(monkeypatch):
    """torch at 2 threads (the pool has 2 workers), and every expert a block of its own (many jobs)."""
    keep = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(dispatch, "BLOCK_BYTES", 1)
    monkeypatch.setattr(dispatch, "THREADS_MIN_MACS", 0)  # these test layers are tiny
    calls = []
    real_map = dispatch.ExpertThreads.map
    monkeypatch.setattr(dispatch.ExpertThreads, "map", lambda self, fn, n: calls.append(n) or real_map(self, fn, n))
    yield calls
    torch.set_num_threads(keep)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("cf", [None, 0.5])
def test_expert_threads_equal_the_per_token_reference(two_threads_one_expert_per_block, activation, cf):
    calls = two_threads_one_expert_per_block
    layer = make_layer(activation, E=8, k=2, cf=cf)
    layer.dispatch_path = "fused"
    x = torch.randn(40, 16)
    C = math.ceil(cf * 40 * 2 / 8) if cf else None
    ours = grads_of(lambda x: layer(x)[0], layer, x)
    assert len(calls) == 2 and min(calls) >= 6, calls  # forward and backward each went to the pool
    ref = grads_of(lambda x: reference_layer(layer, x, capacity=C), layer, x)
    for name, a, b in zip(["output", "d input", "d router", "d w_in", "d w_down"], ours, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")


def test_expert_threads_give_the_same_bits_as_one_thread_inline(two_threads_one_expert_per_block):
    """Each block runs single-threaded on a worker, and its results are summed in block order on
    the caller: so the result is bitwise that of the same code inline at 1 thread, run after run."""
    layer = make_layer("swiglu", E=16, k=4, d=64, h=32)
    layer.dispatch_path = "fused"
    x = torch.randn(256, 64)
    pooled = [grads_of(lambda x: layer(x)[0], layer, x) for _ in range(2)]
    assert two_threads_one_expert_per_block  # the pool ran
    torch.set_num_threads(1)
    inline = grads_of(lambda x: layer(x)[0], layer, x)
    for a, b, c in zip(*pooled, inline):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_expert_threads_run_single_threaded_and_leave_the_callers_thread_count():
    keep = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        pool = dispatch.expert_threads()
        assert pool is not None and pool.n == 3
        assert torch.get_num_threads() == 3
        seen = pool.map(lambda i: (torch.get_num_threads(), torch.is_grad_enabled(), torch.ones(64, 64).sum().item()), 9)
        assert seen == [(1, False, 4096.0)] * 9
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(keep)


def test_an_error_in_a_job_is_raised_in_the_caller_and_the_pool_keeps_working():
    pool = dispatch.ExpertThreads(2)

    def job(i):
        if i == 3:
            raise ValueError("job 3 failed")
        return i * i

    with pytest.raises(ValueError, match="job 3 failed"):
        pool.map(job, 8)
    assert pool.map(lambda i: i + 1, 5) == [1, 2, 3, 4, 5]


def test_expert_threads_only_for_experts_big_enough_to_hide_the_handoff():
    keep = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x512, x64 = torch.zeros(8192, 512), torch.zeros(4096, 64)
        # 64 experts top-8 at d_model 512, SwiGLU width 2 x 256: 1,024 rows x 512 x 512 per expert
        assert dispatch.use_expert_threads(x512, [1024] * 64, 512)
        # the demo: 32 experts top-4 at d_model 64, width 2 x 64: 512 rows x 64 x 128 per expert
        assert not dispatch.use_expert_threads(x64, [512] * 32, 128)
        assert not dispatch.use_expert_threads(x512, [0] * 64, 512)
        torch.set_num_threads(1)
        assert not dispatch.use_expert_threads(x512, [1024] * 64, 512)
    finally:
        torch.set_num_threads(keep)


@pytest.mark.parametrize("path", ["fused", "padded"])
def test_host_sized_paths_under_torch_compile_make_no_graph_per_routing(path):
    """The fused and padded paths read the expert sizes back as Python ints. Under torch.compile
    they must stay outside the graph: traced, each routing (each list of sizes) was a new graph,
    a recompile every step. Four inputs routed four different ways: the graphs made for the first
    serve the rest, and values and gradients are eager's."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    layer = make_layer(E=6, k=2)
    layer.dispatch_path = path
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter)
    sizes, graphs = set(), []
    for seed in range(4):
        x = torch.randn(48, 16, generator=torch.Generator().manual_seed(seed))
        got = grads_of(lambda v: compiled(v)[0], layer, x)
        want = grads_of(lambda v: layer(v)[0], layer, x)
        for name, a, b in zip(GRADS, got, want):
            # NOTE: atol for float32 rounding only: compiled, the router's product is inductor's;
            # eager, it may be oneDNN's (model.gemm), another summation order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        with torch.no_grad():
            sizes.add(tuple(torch.bincount(layer.router(x).expert, minlength=6).tolist()))
        graphs.append(counter.frame_count)
    assert len(sizes) == 4, "the inputs must route differently for this test to mean anything"
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0]] * 3, graphs
    torch._dynamo.reset()


def test_an_eager_model_never_imports_dynamo():
    """torch.compiler.disable is applied only while dynamo traces (moe_ffn), never at import:
    a process that merely built and ran a model then had torch._dynamo loaded, +1.3 s of import,
    and torchrun's gloo workers hung at exit in 4 of 6 runs (docs/DISTRIBUTED.md, Exit). A fresh
    process: build an MoE model, train one step, and dynamo must still be absent."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from moe_lm.config import ModelConfig, MoEConfig\n"
        "from moe_lm.model.transformer import Transformer\n"
        "m = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, ffn_hidden=16, seq_len=8,"
        " moe=MoEConfig(n_experts=4, top_k=2)))\n"
        "idx = torch.randint(0, 64, (2, 9))\n"
        "out = m(idx[:, :-1], idx[:, 1:]); (out.loss + out.aux_loss).backward()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "False"


@pytest.mark.skipif(not gemm._onednn_runs(), reason="this torch has no oneDNN linear for plain tensors")
@pytest.mark.parametrize("block_bytes", [1, 40 * 4 * (64 + 2 * 32 + 16)], ids=["one expert a block", "several"])
def test_fused_path_through_onednn_equals_the_per_token_reference(block_bytes, monkeypatch):
    """Experts' products through oneDNN (model.gemm; here every one, whatever its size), a block of
    one expert and blocks of several on the mm loop: outputs and gradients as the reference's."""
    monkeypatch.setattr(gemm, "backend", lambda: "onednn")
    monkeypatch.setattr(dispatch, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(dispatch, "GROUPED_BLOCKS", False)
    monkeypatch.setattr(dispatch, "BLOCK_BYTES", block_bytes)
    calls, real = [], gemm._xwt
    monkeypatch.setattr(gemm, "_xwt", lambda x, w: calls.append(1) or real(x, w))
    layer = make_layer("swiglu", E=16, k=2, h=32)
    layer.dispatch_path = "fused"
    x = torch.randn(96, 16)
    ours = grads_of(lambda x: layer(x)[0], layer, x)
    assert len(calls) >= 16 * 2, "the experts' products went to oneDNN"
    ref = grads_of(lambda x: reference_layer(layer, x), layer, x)
    for name, a, b in zip(GRADS, ours, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n_experts,radix", [(32, True), (300, True), (40_000, False)])
def test_argsort_experts_is_the_stable_sort_by_expert(n_experts, radix, monkeypatch):
    """The assignments in expert order, each expert's in their own order (the stable sort, written
    out by hand), whether numpy's radix sort (up to 32,768 experts on a CPU) or torch's sorts them;
    also a strided view of ids and no assignments at all."""
    calls = []
    numpy_argsort = dispatch.np.argsort
    monkeypatch.setattr(dispatch.np, "argsort", lambda *a, **k: calls.append(k) or numpy_argsort(*a, **k))
    g = torch.Generator().manual_seed(n_experts)
    ids = torch.randint(0, n_experts, (6_000,), generator=g)
    ids[::7] = n_experts - 1  # many equal ids: the order among them is what stability fixes
    for expert in (ids, ids[::3], ids[:0]):
        by_hand = [i for e in sorted(set(expert.tolist())) for i, x in enumerate(expert.tolist()) if x == e]
        order = dispatch.argsort_experts(expert, n_experts)
        assert order.dtype == torch.int64 and order.tolist() == by_hand
    assert len(calls) == (3 if radix else 0) and all(k == {"kind": "stable"} for k in calls)
