"""The "cpu_kernel" dispatch path (model/cpu_kernel.py, its C++ in model/csrc/experts_cpu.cpp):
built, taken by the rule, the function of the per-token reference (tests/test_model_dispatch.py
runs every path, this one included, against it), independent of the thread count, and a clear
fallback where it cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch

from moe_lm.checks import cpu_kernel as setting
from moe_lm.errors import ConfigError
from moe_lm.model import cpu_kernel, dispatch

from test_model_dispatch import GRADS, grads_of, make_layer, reference_layer

# NOTE: a machine with a C++ compiler must build it: a failed build there is a failure, not a skip
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler: the kernel cannot be built here")


@needs_compiler
def test_the_kernel_builds_and_passes_its_self_check():
    assert cpu_kernel.load() is not None, cpu_kernel.why_not()
    assert cpu_kernel.state_for(torch.device("cpu")) == "built"
    assert cpu_kernel.state_for(torch.device("meta")) is None


@needs_compiler
@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu"])
def test_the_rule_takes_the_kernel_for_small_float32_experts_and_it_is_the_reference(activation):
    layer = make_layer(activation, E=8, k=2)
    x = torch.randn(40, 16)
    ours = grads_of(lambda x: layer(x)[0], layer, x)
    assert layer.experts.last_path == "cpu_kernel"
    ref = grads_of(lambda x: reference_layer(layer, x), layer, x)
    for name, a, b in zip(GRADS, ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_compiler
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_every_instruction_set_variant_this_cpu_runs_is_the_reference(activation):
    """The element-wise work and the weight gradients are compiled for AVX-512, AVX2 + FMA and the
    base ISA; the CPU's best runs, the others only on other CPUs: each is tried here. Shapes that
    fit the weight-gradient tiles (d 64, h 64) and shapes that do not (d 16, h 12: brgemm)."""
    ext = cpu_kernel.load()
    names = ext.variants("")
    assert names[-1] == "base"
    try:
        for name in names:
            ext.variants(name)
            for d, h in ((64, 64), (16, 12)):
                layer = make_layer(activation, E=8, k=2, d=d, h=h)
                x = torch.randn(200, d)
                ours = grads_of(lambda x: layer(x)[0], layer, x)
                assert layer.experts.last_path == "cpu_kernel"
                ref = grads_of(lambda x: reference_layer(layer, x), layer, x)
                for what, a, b in zip(GRADS, ours, ref):  # float32 sums of 64 products: tolerance to scale
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()),
                                               msg=lambda m: f"{name} {d}x{h} {what}: {m}")
    finally:
        ext.variants("")


@needs_compiler
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_the_result_is_the_same_on_one_thread_and_on_several(activation):
    """Each expert is one thread's work, each row's element-wise work is the same wherever the row
    falls, and the combine sums in row order: bitwise the same on 1, 2 and 3 threads, at the demo's
    shape (16,384 rows, where 3 threads once split ATen's activation mid-row)."""
    layer = make_layer(activation, E=32, k=4, d=64, h=64)
    x = torch.randn(4096, 64)
    keep = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out[threads] = grads_of(lambda x: layer(x)[0], layer, x)
            assert layer.experts.last_path == "cpu_kernel"
    finally:
        torch.set_num_threads(keep)
    for threads in (2, 3):
        for name, a, b in zip(GRADS, out[threads], out[1]):
            assert torch.equal(a, b), (threads, name)



@needs_compiler
def test_its_swiglu_is_torchs_silu_over_the_whole_float_range():
    """The kernel's own exp (a polynomial, vectorised): silu and its derivative against torch's
    from tiny to overflowing inputs and NaN. One expert: gate = x, up = 1, the output's first
    column = silu(x), dx's first column = silu'(x). (Not +-inf: the product makes up = inf * 0.)"""
    ext = cpu_kernel.load()
    x = torch.cat([torch.linspace(-120, 120, 2001), torch.tensor([-1e30, -89.0, -87.5, -1e-30, 0.0, 1e-30, 87.5, 89.0,
                                                                   1e30, float("nan")])])
    T = x.shape[0]
    inp = torch.stack([x, torch.ones(T)], 1)
    w_in = torch.eye(2)[None]  # (1, d=2, 2H=2): gate = column 0, up = column 1
    w_down = torch.tensor([[[1.0, 0.0]]])  # (1, H=1, d=2)
    token, weight = torch.arange(T), torch.ones(T)
    out, *saved = ext.forward(inp, token, weight, w_in, w_down, [T], 0)
    dx = ext.backward(torch.tensor([[1.0, 0.0]]).expand(T, 2).contiguous(), inp, token, weight, w_in, w_down, [T],
                      0, *saved)[0]
    xr = x.clone().requires_grad_()
    torch.nn.functional.silu(xr).sum().backward()
    want = torch.nn.functional.silu(x)
    torch.testing.assert_close(out[:, 0], want, rtol=2e-6, atol=1e-30, equal_nan=True)
    torch.testing.assert_close(dx[:, 0], xr.grad, rtol=2e-6, atol=1e-30, equal_nan=True)

def test_where_the_kernel_is_not_built_the_layer_runs_fused_and_right(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    layer = make_layer("swiglu", E=8, k=2)
    layer.dispatch_path = "cpu_kernel"  # asked for, not available: the same function by the fused path
    x = torch.randn(40, 16)
    ours = grads_of(lambda x: layer(x)[0], layer, x)
    assert layer.experts.last_path == "fused"
    layer.dispatch_path = None
    layer(x)
    assert layer.experts.last_path == "fused"
    for a, b in zip(ours, grads_of(lambda x: reference_layer(layer, x), layer, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


TORCH_BUILD_ERROR = ("Error building extension 'moe_lm_experts_cpu': [1/3] c++ -MMD -MF experts_cpu.o.d "
                     "-DTORCH_EXTENSION_NAME=moe_lm_experts_cpu -isystem /usr/include/python3.11 -c experts_cpu.cpp\n"
                     "FAILED: experts_cpu.o\n"
                     "experts_cpu.cpp:1:10: fatal error: Python.h: No such file or directory\n"
                     "compilation terminated.\nninja: build stopped: subcommand failed.")


@pytest.fixture
def fresh_build_dir(monkeypatch, tmp_path):
    """load() as in a new process, building into an empty folder."""
    monkeypatch.setattr(cpu_kernel, "build_dir", lambda: tmp_path)
    cpu_kernel.load.cache_clear()
    yield tmp_path
    cpu_kernel.load.cache_clear()


def test_a_failed_build_is_one_line_with_the_compilers_error_and_is_not_tried_again(monkeypatch, capsys,
                                                                                      fresh_build_dir):
    from torch.utils import cpp_extension

    tries = []
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: tries.append(1) or (_ for _ in ()).throw(
        RuntimeError(TORCH_BUILD_ERROR)))
    assert cpu_kernel.load() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("moe-lm: building the CPU expert kernel")
    assert err[1].startswith("moe-lm: the CPU expert kernel is not available (RuntimeError: experts_cpu.cpp:1:10: "
                             "fatal error: Python.h: No such file or directory")
    assert "fused path" in err[1] and "to try again" in err[1]
    assert cpu_kernel.state_for(torch.device("cpu")).startswith("unavailable: RuntimeError: experts_cpu.cpp")
    cpu_kernel.load.cache_clear()  # a later process: the failure is remembered, nothing is compiled
    assert cpu_kernel.load() is None and tries == [1]
    assert "an earlier build here failed" in capsys.readouterr().err


def test_without_a_compiler_it_says_so_at_once(monkeypatch, capsys, fresh_build_dir):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "get_cxx_compiler", lambda: "no-such-c++")
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built without a compiler"))
    assert cpu_kernel.load() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and "no C++ compiler (no-such-c++) on this machine" in err[0]


def test_a_file_that_did_not_pass_is_never_imported_and_a_stale_lock_does_not_block(monkeypatch, fresh_build_dir):
    """A truncated library (an interrupted build) would crash the process at import: only the file
    whose hash the "ok" marker holds is imported, and a rebuild links afresh. torch's own lock
    file, left by a killed build, is removed once this process holds the build lock."""
    from torch.utils import cpp_extension

    lib = cpu_kernel._library(fresh_build_dir)
    lib.write_bytes(b"\x7fELF truncated")
    assert cpu_kernel._import_built(fresh_build_dir) is None  # no marker
    (fresh_build_dir / "ok").write_text("0" * 64 + "\n")
    assert cpu_kernel._import_built(fresh_build_dir) is None  # a marker for another file
    (fresh_build_dir / "lock").write_text("")

    def build(*a, **k):
        assert not (fresh_build_dir / "lock").exists()
        assert not lib.exists()  # the truncated file is not left for torch's loader to import
        raise RuntimeError("stop here")

    monkeypatch.setattr(cpp_extension, "load", build)
    assert cpu_kernel.load() is None and "stop here" in cpu_kernel.why_not()


def test_off_never_builds_and_says_nothing(monkeypatch, capsys):
    from torch.utils import cpp_extension

    monkeypatch.setenv("MOE_LM_CPU_KERNEL", " OFF ")
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built although off"))
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is None and cpu_kernel.state_for(torch.device("cpu")) == "off"
        assert capsys.readouterr().err == ""
        assert dispatch.choose_path(torch.zeros(4, 4), [5, 5]) == "fused"
    finally:
        cpu_kernel.load.cache_clear()


def test_a_bad_setting_is_a_config_error_naming_the_choices(monkeypatch):
    monkeypatch.setenv("MOE_LM_CPU_KERNEL", "on")
    with pytest.raises(ConfigError, match="MOE_LM_CPU_KERNEL='on'.*auto, off"):
        setting()


def test_the_self_check_refuses_a_kernel_that_computes_wrong_numbers():
    class Wrong:
        @staticmethod
        def forward(x, token, weight, w_in, w_down, sizes, act):
            A, d = token.shape[0], x.shape[1]
            return [torch.zeros_like(x), torch.zeros(A, w_in.shape[2]), torch.zeros(A, d)]

        @staticmethod
        def backward(g, x, token, weight, w_in, w_down, sizes, act, *saved):
            return [torch.zeros_like(g), torch.zeros(token.shape[0]), torch.zeros_like(w_in), torch.zeros_like(w_down)]

    with pytest.raises(RuntimeError, match="self-check"):
        cpu_kernel._self_check(Wrong())


@needs_compiler
def test_the_first_load_may_come_under_inference_mode(monkeypatch):
    """An evaluation or generation may be the first to ask for the kernel: its self-check must
    not need autograd."""
    cpu_kernel.load.cache_clear()
    try:
        with torch.inference_mode():
            assert cpu_kernel.load() is not None, cpu_kernel.why_not()
    finally:
        cpu_kernel.load.cache_clear()


@needs_compiler
@pytest.mark.parametrize("E", [3, 8, 32, 64, 65, 200])
def test_the_kernels_top_k_is_torchs_for_any_expert_count(E):
    """By rank up to 64 experts (8, 16, 32, 64 unrolled), by a sorted list above; a tie between the
    (k+1)-th and (k+2)-th largest does not matter to the top k."""
    g = torch.Generator().manual_seed(E)
    s = torch.randn(500, E, generator=g)
    for k in sorted({1, 2, E // 2, E - 1, E} - {0}):
        idx = cpu_kernel.topk_indices(s, k)
        assert idx is not None and torch.equal(idx, s.topk(k, dim=-1).indices), k
    if E >= 4:
        order = s[7].argsort(descending=True)
        t = s.clone()
        t[7, order[2]] = t[7, order[1]]  # the 2nd and 3rd largest equal: top 1 is still unique
        assert torch.equal(cpu_kernel.topk_indices(t, 1), t.topk(1, dim=-1).indices)
        assert cpu_kernel.topk_indices(t, 2) is None and cpu_kernel.topk_indices(t, 3) is None


@needs_compiler
def test_the_kernels_top_k_is_torchs_where_no_row_ties_and_none_where_one_does():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1000, 32, generator=g).softmax(-1)
    s[0, :3] = torch.tensor([float("inf"), float("-inf"), 1e30])  # distinct infinities are no tie
    for k in (1, 4, 31, 32):
        idx = cpu_kernel.topk_indices(s, k)
        assert idx is not None and torch.equal(idx, s.topk(k, dim=-1).indices), k
    order = s[7].argsort(descending=True)
    for a, b in ((3, 4), (0, 1)):  # two equal scores among row 7's 5 largest: 4th and 5th, 1st and 2nd
        t = s.clone()
        t[7, order[b]] = t[7, order[a]]
        assert cpu_kernel.topk_indices(t, 4) is None
    t = s.clone()
    t[3, 30] = float("nan")
    assert cpu_kernel.topk_indices(t, 4) is None
    t = s.clone()
    t[3, 30] = t[3].min() - 1  # a low score equal to nothing above: still unique
    assert cpu_kernel.topk_indices(t, 4) is not None
    assert cpu_kernel.topk_indices(s.double(), 4) is None and cpu_kernel.topk_indices(s, 33) is None


def _route(router, x, kernel: bool, monkeypatch):
    """router(x) by the kernel's softmax top-k or by the Python lines; -> the Routing, the loss's
    gradients (x, router weight) for a loss through the weights, the Switch f·P loss (probs) and
    the z-loss (lse)."""
    from moe_lm.model import losses

    with monkeypatch.context() as m:
        if not kernel:
            m.setattr(cpu_kernel, "softmax_topk", lambda *a: None)
        x = x.clone().requires_grad_()
        router.zero_grad()
        r = router(x)
    g = torch.Generator().manual_seed(1)
    loss = ((r.weight * torch.randn(r.weight.shape, generator=g)).sum()
            + losses.balance_loss("switch", r, router.weight.shape[0]) + 0.1 * losses.z_loss(r.logits, r.lse))
    loss.backward()
    return r, x.grad, router.weight.grad.clone()


@needs_compiler
@pytest.mark.parametrize("name,k", [("softmax_topk", 4), ("softmax_topk", 1), ("switch", 1)])
def test_the_kernels_softmax_top_k_routes_as_the_python_lines(name, k, monkeypatch):
    """Same choices, weights, probabilities, logsumexp (torch.logsumexp) and entropy (the
    formula), and the same gradients through weights, probabilities and logsumexp."""
    from moe_lm.config import MoEConfig
    from moe_lm.model import losses, routing

    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=32, top_k=k, router=name, balance_loss="switch", balance_coef=0.01, z_loss_coef=1e-3)
    router = routing.ROUTERS[name](16, cfg, init_std=0.5)
    x = torch.randn(300, 16)
    ours, dx, dW = _route(router, x, True, monkeypatch)
    ref, dx_ref, dW_ref = _route(router, x, False, monkeypatch)
    assert ours.lse is not None and ref.lse is None  # the kernel answered, the reference did not use it
    assert torch.equal(ours.token, ref.token) and torch.equal(ours.expert, ref.expert)
    for a, b in ((ours.weight, ref.weight), (ours.score, ref.score), (ours.probs, ref.probs),
                 (ours.lse, torch.logsumexp(ref.logits, -1)), (ours.entropy, losses.entropy(ref.probs)),
                 (dx, dx_ref), (dW, dW_ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_where_router_scores_tie_the_python_lines_decide():
    """An untrained router (zero weights: every score ties) is left to fair_topk's tie rule."""
    from moe_lm.config import MoEConfig
    from moe_lm.model import routing

    cfg = MoEConfig(n_experts=8, top_k=2, router="softmax_topk")
    router = routing.ROUTERS["softmax_topk"](16, cfg)
    torch.nn.init.zeros_(router.weight)
    x = torch.randn(64, 16)
    assert cpu_kernel.softmax_topk(routing._router_linear(x, router.weight), 2, True) is None
    r = router(x, torch.arange(64))
    assert r.lse is None
    assert torch.equal(r.expert.view(64, 2)[:, 0], torch.arange(64) % 8)  # expert pos mod E first


@needs_compiler
def test_the_kernels_entropy_and_logsumexp_hold_for_large_logits():
    """lse and the entropy from large logits (near-cancelling terms) against float64 formulas."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 32, generator=g) * 30 + 500
    fused = cpu_kernel.softmax_topk(logits, 4, True)
    assert fused is not None
    p = logits.double().softmax(-1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    torch.testing.assert_close(fused[5].double(), entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused[4].double(), torch.logsumexp(logits.double(), -1), rtol=1e-6, atol=0)
