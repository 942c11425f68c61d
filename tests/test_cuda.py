"""The CUDA paths, against CPU references (run by `make gpu-check`; skipped without a GPU).

Every dispatch path on CUDA in float32 and bfloat16 against the per-token reference of
test_model_dispatch computed on the CPU in float32 (outputs and gradients), the layer's own path
rule on CUDA, and a few bf16-autocast training steps whose loss falls.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_lm.model import dispatch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (make gpu-check runs these on a GPU machine)"),
]

# bf16 keeps 8 bits of mantissa: outputs of order 1 agree to a few 1e-2
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _cases():
    for dtype in (torch.float32, torch.bfloat16):
        for path in dispatch.PATHS:
            yield pytest.param(path, dtype, id=f"{path}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("path,dtype", list(_cases()))
def test_every_dispatch_path_on_cuda_equals_the_cpu_per_token_reference(path, dtype):
    from test_model_dispatch import grads_of, make_layer, reference_layer

    cpu = make_layer("swiglu", E=8, k=2, d=64, h=32)
    if dtype == torch.bfloat16:  # the reference uses the bf16-rounded weights, in float32
        with torch.no_grad():
            for p in cpu.parameters():
                p.copy_(p.bfloat16().float())
    x = torch.randn(48, 64).bfloat16().float()
    ref = grads_of(lambda x: reference_layer(cpu, x), cpu, x)

    gpu = copy.deepcopy(cpu).to("cuda", dtype)
    gpu.dispatch_path = path
    for p in gpu.parameters():
        p.grad = None
    xg = x.to("cuda", dtype).requires_grad_(True)
    try:
        y = gpu(xg)[0]
    except (RuntimeError, NotImplementedError) as exc:
        if path == "grouped_mm" and dtype != torch.bfloat16:
            pytest.skip(f"torch's grouped_mm does not take {dtype} on CUDA: {exc}")
        raise
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to("cuda", dtype)
    (y * g).sum().backward()
    ours = [y.detach(), xg.grad, gpu.router.weight.grad, gpu.experts.w_in.grad, gpu.experts.w_down.grad]
    for name, a, b in zip(["output", "d input", "d router", "d w_in", "d w_down"], ours, ref):
        torch.testing.assert_close(a.float().cpu(), b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


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
