"""Matrix products on a CPU: oneDNN's where torch's BLAS runs at half speed.

    y = gemm.linear(x, w)        # x (..., k) @ w (n, k)^T -> (..., n), with autograd (F.linear)
    c = gemm.mm(a, b)            # a (n, k) @ b (k, m) -> (n, m), no autograd (torch.mm)
    layer = gemm.Linear(k, n, bias=False)    # nn.Linear whose forward is gemm.linear

Why: torch's x86 wheels send float32 matmuls (torch.mm, F.linear, addmm) to Intel MKL, which
takes its AVX-512 kernels on Intel CPUs only; on an AMD CPU it runs its AVX2 ones. oneDNN, the
other matmul library inside the same wheel (MKL-DNN), picks its kernels by the instruction set.
On an AMD EPYC with AVX-512 (Zen 5), float32, the demo's shapes: 2.0-2.7x MKL's speed on one
thread, 1.7-2.8x on two, down to ~1.1x for a single expert's small matmul (512 x 64 by 64 x 128);
a 2048^3 matmul 85 against 214 ms (docs/PERFORMANCE.md, "The matmul library").

Where it applies (`applies`): a float32 CPU tensor, autocast off, not inside torch.compile (whose
inductor picks its own kernels), and the backend "onednn". The backend is chosen once per process
(`backend`): the environment variable MOE_LM_CPU_MATMUL ("onednn", "blas", or "auto", the
default); auto takes oneDNN where torch has it, its BLAS is MKL, and the CPU is an AMD (or Hygon)
one with AVX-512, else torch's BLAS (an Intel CPU, where MKL takes its own AVX-512 kernels; a
vendor not known). Run records keep the choice (env.json's and `bench`'s "cpu_matmul",
`backend_for`). Elsewhere (a GPU, bfloat16, an Intel CPU) these
functions are torch.mm and F.linear. Both libraries compute in float32; results differ in the last
bits (another summation order), as between two thread counts.

The oneDNN entry is `torch.ops.mkldnn._linear_pointwise` (x @ w^T, plain strided tensors, what
inductor's CPU backend calls), which has no autograd and no out=: `linear` wraps it in an
autograd Function whose backward is two more such products.
"""

from __future__ import annotations

import functools
import platform
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..checks import cpu_matmul


def _cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...), or "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@functools.cache
def _onednn_runs() -> bool:
    """Whether this torch has oneDNN's linear for plain tensors and it computes (tried once, 2 x 2)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 2), torch.ones(2, 2), None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool((y == 2).all())


@functools.cache
def backend() -> str:
    """"onednn" or "blas": this process's choice, made at the first call (module doc). The setting
    is checks.cpu_matmul()'s (a bad MOE_LM_CPU_MATMUL is a ConfigError); "onednn" where
    this torch cannot run it falls back to "blas"."""
    want = cpu_matmul()
    if want == "blas" or not _onednn_runs():
        return "blas"
    if want == "onednn":
        return "onednn"
    # NOTE: auto = where MKL was measured to leave the vector units half used: an AMD x86 CPU
    # with AVX-512 (on an AVX2-only CPU MKL and oneDNN run the same width)
    vendor = _cpu_vendor()
    mkl_elsewhere = (torch.backends.mkl.is_available() and ("AuthenticAMD" in vendor or "HygonGenuine" in vendor)
                     and torch.backends.cpu.get_cpu_capability() == "AVX512")
    return "onednn" if mkl_elsewhere else "blas"


def backend_for(device: torch.device) -> Optional[str]:
    """What run and bench records keep as "cpu_matmul": backend() for a CPU run, None elsewhere
    (a GPU's matmuls never come here)."""
    return backend() if device.type == "cpu" else None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors go to oneDNN (module doc)."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return torch.backends.mkldnn.enabled and backend() == "onednn"


# NOTE: multiply-adds per copied element from which a product whose operands are both transposed
# views goes to oneDNN after all (mm): measured on weight gradients g^T x of 4,096 rows, 2
# threads: with 64-wide g copied, x 64 / 96 wide ran faster on MKL (194 vs 222 us, 283 vs 301),
# x 128 / 256 wide on oneDNN (304 vs 368, 500 vs 755)
COPY_MIN_MACS = 128


def _xwt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (n, k) @ w (m, k)^T by oneDNN -> (n, m), a new contiguous tensor. x is copied first when
    not row-major; w may be any strided view (a transposed one costs nothing)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a (n, k) @ b (k, m) -> (n, m), as torch.mm, for products autograd does not record (inside
    an autograd Function, under no_grad; one it would record is torch.mm's). With oneDNN the
    result may be a transposed view ((b^T a^T)^T when that copies less); `out` gets a copy.

    oneDNN wants its left operand row-major: a product whose left side is a transposed view (a
    weight gradient, a^T g) is taken as (b^T a^T)^T when b^T is row-major, else the smaller of a
    and b^T is copied row-major first. Such a transposing copy runs at ~0.5 ns an element on this
    CPU, 10x a plain copy: it pays only when the product has at least COPY_MIN_MACS multiply-adds
    for each element copied (the other operand at least that wide), else torch.mm, whose BLAS
    reads a transposed operand in place (docs/PERFORMANCE.md, "The matmul library")."""
    # NOTE: oneDNN's op has no autograd: a product that autograd would record stays torch.mm's
    tracked = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if tracked or not applies(a, b) or 0 in a.shape or 0 in b.shape:
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
    if a.is_contiguous():
        r = _xwt(a, b.t())
    elif b.t().is_contiguous():
        r = _xwt(b.t(), a).t()
    else:  # one side is copied: the smaller one, if the product is big enough to pay for it
        copied = min(a.numel(), b.numel())
        if a.shape[0] * a.shape[1] * b.shape[1] < COPY_MIN_MACS * copied:
            return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
        r = _xwt(a, b.t()) if a.numel() <= b.numel() else _xwt(b.t(), a).t()
    if out is None:
        return r
    return out.copy_(r)


class _Linear(torch.autograd.Function):
    """x (N, k), w (n, k) -> x @ w^T (N, n) by oneDNN; backward dx = g @ w, dw = g^T @ x."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _xwt(x, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.contiguous()
        dx = _xwt(g, w.t()) if ctx.needs_input_grad[0] else None
        dw = mm(g.t(), x).contiguous() if ctx.needs_input_grad[1] else None
        return dx, dw


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) without bias: x (..., k), w (n, k) -> (..., n), differentiable once."""
    if not applies(x, w) or x.numel() == 0 or w.numel() == 0:
        return F.linear(x, w)
    y = _Linear.apply(x.reshape(-1, x.shape[-1]), w)
    return y.view(*x.shape[:-1], w.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and init) whose product is `linear`'s; the bias, if
    any, added after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias
