"""The language-model loss: the output head and the cross-entropy, fused and taken in row chunks.

    loss = linear_cross_entropy(x, w, targets)     # x (N, d), w (V, d), targets (N,) -> scalar

    loss = mean over rows n with targets[n] != IGNORE of  logsumexp(x_n w^T) - (x_n w^T)[targets[n]]

the same value and gradients as `F.cross_entropy(F.linear(x, w).float(), targets)` whenever at
least one target counts (with none: 0, where torch gives nan), without the (N, V) logits in memory. Why: in a small model the head and its loss are most of a training step
(the demo's d_model 64, vocabulary 2048: one (4096, 2048) float32 logits tensor, 32 MB, read and
written by the head matmul, log-softmax, its backward and the one-hot fill of the NLL backward -
about 40% of the step on a CPU, docs/PERFORMANCE.md). Taken a chunk of rows at a time, each
chunk's logits stay in the cache while they are exponentiated, summed and turned into the
gradient (one buffer, written in place: exp(logit - max) once, its sum the softmax's denominator),
and the gradient is computed in the forward (the loss is the last op: its backward only scales by
the incoming gradient). The method of Liger Kernel's fused linear cross-entropy
(Hsu et al. 2024, arXiv:2410.10989), here in plain torch ops.

Used by the Transformer where it measured faster: on a CPU, with targets, under autograd (see
`Transformer.forward`); elsewhere the plain head + F.cross_entropy (and on a GPU, torch.compile
fuses those).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import gemm

IGNORE = -100  # F.cross_entropy's default ignore_index

# NOTE: rows per chunk such that one chunk's float32 logits take about this many bytes: the
# core's L2 (AMD EPYC and Intel Xeon: 0.5-2 MB), measured on the demo's shape (docs/PERFORMANCE.md).
CHUNK_BYTES = 2 << 20


class LinearCrossEntropy(torch.autograd.Function):
    """x (N, d), w (V, d), targets (N,) int64 -> mean cross-entropy, float32 scalar."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        N, V = x.shape[0], w.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != IGNORE
        n_valid = valid.sum().clamp_min(1).to(torch.float32)
        tgt = torch.where(valid, targets, 0)
        wf = w.float()
        gx = torch.empty(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        rows = max(1, CHUNK_BYTES // (4 * V))
        onednn = gemm.applies(wf)  # oneDNN writes a fresh tensor; torch's BLAS one reused buffer
        # NOTE: with oneDNN the weight gradient is summed as its transpose (d, V), the layout
        # oneDNN writes x^T p in, and turned once at the end: adding each chunk's product as a
        # transposed view took ~130 us a chunk at the demo's shape, a transposing copy's time
        gw = torch.zeros(wf.shape, dtype=torch.float32, device=x.device) if need_w and not onednn else None
        gwt = torch.zeros(wf.shape[1], V, dtype=torch.float32, device=x.device) if need_w and onednn else None
        buf = None if onednn else torch.empty(min(rows, N), V, dtype=torch.float32, device=x.device)
        all_valid = bool(valid.all())  # NOTE: a CPU path: reading a value back costs nothing here
        for s in range(0, N, rows):
            xc = x[s:s + rows].float()
            t, m = tgt[s:s + rows], valid[s:s + rows]
            logits = gemm.mm(xc, wf.t()) if onednn else torch.mm(xc, wf.t(), out=buf[:len(t)])  # (c, V)
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            mx = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(mx).exp_()  # in place: exp(logit - max), the softmax's numerator
            z = p.sum(dim=-1)
            lse = mx.squeeze(1) + z.log()
            total += torch.where(m, lse - target_logit, 0.0).sum()
            if need_x or need_w:
                p.mul_((1.0 / (z * n_valid))[:, None])  # softmax / n_valid = d(mean loss)/d(logits) ...
                p[torch.arange(len(t), device=x.device), t] -= 1.0 / n_valid  # ... minus the one-hot
                if not all_valid:
                    p[~m] = 0.0  # ignored rows: no gradient
                if need_x:
                    gemm.mm(p, wf, out=gx[s:s + rows])
                if need_w and onednn:
                    gwt += gemm.mm(xc.t(), p)
                elif need_w:  # NOTE: addmm with out=, not addmm_: torch's FLOP counter sees this one
                    torch.addmm(gw, p.t(), xc, out=gw)
        if gwt is not None:
            gw = gwt.t().contiguous()
        ctx.save_for_backward(gx, gw)
        ctx.dtypes = (x.dtype, w.dtype)
        return total / n_valid

    @staticmethod
    @once_differentiable  # the gradient was computed in the forward: no second derivative
    def backward(ctx, grad: torch.Tensor):
        gx, gw = ctx.saved_tensors
        dx = (gx * grad).to(ctx.dtypes[0]) if gx is not None else None
        dw = (gw * grad).to(ctx.dtypes[1]) if gw is not None else None
        return dx, dw, None


def fused_applies(x: torch.Tensor, targets) -> bool:
    """Where the Transformer takes the fused loss: targets given, on a CPU, under autograd (about
    2x the plain head + loss there, 1.38-1.44x the demo's whole training step, docs/PERFORMANCE.md),
    without autocast (whose casts it would bypass), and not inside torch.compile (which fuses the
    plain path itself). Elsewhere the plain path, which also returns the logits."""
    return (targets is not None and x.device.type == "cpu" and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear_cross_entropy(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ w^T against targets, fused and chunked (module doc).
    x (N, d) or (..., d); w (V, d); targets of x's leading shape, int64, IGNORE rows left out."""
    return LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), w, targets.reshape(-1))
