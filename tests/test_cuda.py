"""The CUDA paths, against CPU references (run by `make gpu-check`; skipped without a GPU).

Every dispatch path on CUDA in float32 and bfloat16 against the per-token reference of
test_model_dispatch computed on the CPU in float32 (outputs and gradients), the layer's own path
rule on CUDA, and a few bf16-autocast training steps whose loss falls.
"""

from __future__ import annotations


import pytest
import torch

from moe_lm.model import dispatch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (make gpu-check runs these on a GPU machine)"),
]

def _cases():
    for dtype in (torch.float32, torch.bfloat16):
        for path in dispatch.PATHS:
            yield pytest.param(path, dtype, id=f"{path}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("path,dtype", list(_cases()))
def test_every_dispatch_path_on_cuda_equals_the_cpu_per_token_reference(path, dtype):
    from test_model_dispatch import GRADS, assert_close_bf16, on_device_against_cpu_reference

    try:
        ours, ref = on_device_against_cpu_reference(path, dtype, "cuda")
    except (RuntimeError, NotImplementedError) as exc:
        if path == "grouped_mm" and dtype != torch.bfloat16:
            pytest.skip(f"torch's grouped_mm does not take {dtype} on CUDA: {exc}")
        raise
    for name, a, b in zip(GRADS, ours, ref):
        if dtype == torch.bfloat16:
            assert_close_bf16(a, b, name)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_the_path_rule_takes_grouped_mm_on_cuda_in_bf16_where_torch_has_it():
    x = torch.zeros(4, 4, device="cuda", dtype=torch.bfloat16)
    expected = "grouped_mm" if "grouped_mm" in dispatch.PATHS else "padded"
    assert dispatch.choose_path(x, [1, 1, 1, 1]) == expected
    assert dispatch.choose_path(x.float(), [1, 1, 1, 1]) == "padded"


def test_a_few_bf16_autocast_training_steps_lower_the_loss():
    from moe_lm.config import load_config
    from moe_lm.model.transformer import Transformer
    from moe_lm.training.step import build_optimizer

    cfg = load_config("configs/tiny-moe.yaml", ["model.vocab_size=256", "model.n_layers=2", "model.d_model=64",
                                                "model.n_heads=2", "model.ffn_hidden=64", "model.seq_len=32"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).to("cuda")
    opt = build_optimizer(model, cfg, torch.device("cuda"))
    x = torch.randint(0, 256, (8, 33), device="cuda")
    losses = []
    for _ in range(15):  # one fixed batch: the loss must fall as it is memorised
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x[:, :-1], x[:, 1:])
        loss = out.loss + out.aux_loss + out.z_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias"])
def test_a_dropless_moe_layer_trains_without_a_host_sync_on_cuda(router):
    """Forward, backward and the balance and z-losses of a dropless layer on the grouped_mm path
    never make the host wait for the GPU (torch raises at the first op that would), so the host
    can queue the next kernels while the GPU works. torch.bincount did, 3 times per layer."""
    from moe_lm.config import MoEConfig
    from moe_lm.model.moe import MoELayer

    cfg = MoEConfig(n_experts=8, top_k=2, router=router, z_loss_coef=1e-3,
                    balance_loss="switch" if router == "softmax_topk" else "none")
    layer = MoELayer(64, 32, "swiglu", cfg, 0.02, 0.02).to("cuda").train()
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, stats = layer(x)
        (y.float().square().mean() + stats.balance_loss + stats.z_loss).backward()

    step()  # warm-up: first-call work (kernel loading, autotuning) is not the step's
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.experts.last_path == "grouped_mm"
    assert layer.router.weight.grad is not None and layer.experts.w_in.grad is not None


def test_train_compile_on_cuda_compiles_the_whole_model():
    """On a GPU train.compile compiles the whole model (regional compilation is the CPU's rule), and
    in bf16 its MoE layers dispatch by grouped_mm, the path that stays inside the graph."""
    from torch._dynamo.testing import CompileCounter

    from moe_lm.config import load_config
    from moe_lm.model.transformer import Transformer
    from moe_lm.training.step import compile_model

    cfg = load_config("configs/tiny-moe.yaml", ["model.vocab_size=256", "model.seq_len=32"])
    model = Transformer(cfg.model).to("cuda")
    counter = CompileCounter()
    forward = compile_model(model, backend=counter)
    assert forward is not model and all(getattr(b, "_compiled_call_impl", None) is None for b in model.layers)
    idx = torch.randint(0, 256, (2, 33), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = forward(idx[:, :-1], idx[:, 1:])
    assert torch.isfinite(out.loss) and counter.frame_count >= 1
    assert all(layer.experts.last_path == "grouped_mm" for layer in model.moe_layers())
