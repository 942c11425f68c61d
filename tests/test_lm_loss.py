"""The fused, chunked head + cross-entropy against torch's own: F.cross_entropy(F.linear(x, w))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lm.model import lm_loss


def _both(N=50, d=16, V=37, ignore=(), tied_scale=1.0):
    torch.manual_seed(N + V)
    x = torch.randn(N, d, dtype=torch.float64).float()
    w = torch.randn(V, d) * tied_scale
    t = torch.randint(0, V, (N,))
    t[list(ignore)] = lm_loss.IGNORE
    out = []
    for fn in (lambda x, w: lm_loss.linear_cross_entropy(x, w, t), lambda x, w: F.cross_entropy(F.linear(x, w), t)):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(xi, wi)
        (3.0 * loss).backward()  # an incoming gradient other than 1
        out.append((loss.detach(), xi.grad, wi.grad))
    return out


@pytest.mark.parametrize("chunk_bytes", [4 * 37, 4 * 37 * 7, 1 << 20])  # 1 row, 7 rows (uneven last chunk), all
def test_loss_and_gradients_equal_torchs_cross_entropy(monkeypatch, chunk_bytes):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", chunk_bytes)
    ours, ref = _both()
    for name, a, b in zip(["loss", "d x", "d w"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["blas", "onednn"])
def test_each_matmul_library_gives_torchs_loss_and_gradients(monkeypatch, backend):
    """Both branches of the head's products, whatever this machine's rule picks: torch's BLAS (one
    reused buffer, addmm into the weight gradient) and oneDNN (the weight gradient summed as its
    transpose, 160 wide so that its products take oneDNN too), over 7-row chunks and a short last one."""
    from moe_lm.model import gemm

    if backend == "onednn" and not gemm._onednn_runs():
        pytest.skip("this torch has no oneDNN linear for plain tensors")
    monkeypatch.setattr(gemm, "backend", lambda: backend)
    calls, real = [], gemm._xwt
    monkeypatch.setattr(gemm, "_xwt", lambda x, w: calls.append(1) or real(x, w))
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * 160 * 7)
    ours, ref = _both(N=50, V=160)
    for name, a, b in zip(["loss", "d x", "d w"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # per chunk: logits, d x and d w through oneDNN (8 chunks), or none of them
    assert len(calls) == (3 * 8 if backend == "onednn" else 0)


def test_ignored_targets_are_left_out_of_the_mean_and_get_no_gradient(monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * 37 * 8)
    ours, ref = _both(ignore=(0, 5, 6, 49))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours[1][[0, 5, 6, 49]].abs().max() == 0


def test_large_logits_do_not_overflow():
    ours, ref = _both(tied_scale=40.0)  # logits in the hundreds: exp would overflow without the max shift
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]).all()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_model_fuses_only_when_training_on_a_cpu_and_the_loss_is_the_same():
    from moe_lm.config import ModelConfig, MoEConfig
    from moe_lm.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, seq_len=16, ffn_hidden=32,
                      tie_embeddings=True, moe=MoEConfig(n_experts=4, top_k=2))
    model = Transformer(cfg)
    idx = torch.randint(0, 61, (3, 16))
    fused = model(idx, idx)
    assert fused.logits is None
    fused_grads = torch.autograd.grad(fused.loss, [model.embed_tokens.weight, model.layers[0].input_layernorm.weight])
    t = torch.zeros(2, dtype=torch.long)
    assert lm_loss.fused_applies(torch.zeros(2, 4), t) and not lm_loss.fused_applies(torch.zeros(2, 4), None)
    with torch.no_grad():
        assert not lm_loss.fused_applies(torch.zeros(2, 4), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lm_loss.fused_applies(torch.zeros(2, 4), t)
    plain = model(idx)  # no targets: logits, the loss by hand
    loss = F.cross_entropy(plain.logits.reshape(-1, 61), idx.reshape(-1))
    plain_grads = torch.autograd.grad(loss, [model.embed_tokens.weight, model.layers[0].input_layernorm.weight])
    torch.testing.assert_close(fused.loss, loss)
    for a, b in zip(fused_grads, plain_grads):  # tied embeddings: the head's gradient joins the embedding's
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
