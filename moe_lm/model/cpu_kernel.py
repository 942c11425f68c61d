"""The "cpu_kernel" dispatch path: the fused path's expert work as one C++ call per direction, for
float32 on a CPU (the source: csrc/experts_cpu.cpp); and the router's top-k on a CPU
(csrc/router_cpu.cpp, `topk_indices`, which routing.fair_topk asks first).

    y = KernelExpertsFFN.apply(x, weight_s, w_in, w_down, token_s, sizes, activation)
    # the signature and result of dispatch.ExpertsFFN: x (T, d) -> (T, d)

What it does: each of torch's threads takes whole experts off a counter and runs all of one
expert alone (the gather of its rows, the gate/up product, the activation, the down product, the
scaling by the gate weights; the backward likewise), with the products in oneDNN's brgemm
micro-kernels (`at::native::cpublas::brgemm`, the AVX-512 or AVX2 kernels the CPU has). The
combine sums each token's rows in their expert-sorted order, index_add's arithmetic, parallel over
the tokens, so the result does not depend on the thread count. Why: the Python fused path issues ~7 small operations
per block of experts and direction, each a fork-join over every thread, and its small products run
through MKL at AVX2 width on an AMD CPU; at the demo's shape (4,096 tokens, 32 SwiGLU experts of
width 64, top-4) this kernel took one layer's dispatch, forward and backward, from 13-18 ms to
7.3-8.1 ms (docs/PERFORMANCE.md, "The experts in one C++ call").

Where: `dispatch.choose_path` takes it on a CPU for experts below dispatch.THREADS_MIN_MACS
multiply-adds a product (big experts keep the fused path's expert threads and oneDNN products,
measured beside busy programs), float32, outside torch.compile, wherever it builds.

Built at first use with torch's cpp_extension (a C++ compiler and ninja; ~25 s, once per source
and torch version, cached in torch's extensions folder, TORCH_EXTENSIONS_DIR), then checked on a
small problem against torch's own ops. Where it does not build or the check fails, `load()` says
why once on stderr and the layers take the Python fused path. MOE_LM_CPU_KERNEL=off never builds
it (checks.cpu_kernel).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ..checks import cpu_kernel as setting

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("experts_cpu.cpp", "router_cpu.cpp")]
NAME = "moe_lm_experts_cpu"
ACTIVATIONS = {"swiglu": 0, "relu": 1, "gelu": 2}

_why_not: list[str] = []  # why load() returned None, once it has


# NOTE: -fopenmp: at::parallel_for is a header template; without it the experts run serially
CFLAGS = ["-O3", "-fopenmp"]


def build_dir() -> Path:
    """Where the extension is built: torch's extensions folder, one subfolder per source, flags
    and torch version (a change to any of them builds afresh, elsewhere)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    key = b"".join(p.read_bytes() for p in SOURCES) + " ".join(CFLAGS).encode() + torch.__version__.encode()
    return Path(root) / f"{NAME}_{hashlib.sha256(key).hexdigest()[:12]}"


def _import_built(where: Path):
    """The module already built in `where`, imported directly, or None. (torch's cpp_extension.load
    would run ninja again in every process, and rebuild when two copies of this package, such as
    benchmarks/bench_against_commit.py's, load the same sources from two paths.)"""
    path = where / (NAME + (".pyd" if sys.platform == "win32" else ".so"))
    if not path.is_file():
        return None
    loaded = sys.modules.get(NAME)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[NAME] = module
    return module


@functools.cache
def load():
    """The built and checked extension module, or None (why_not() says why; said once on stderr,
    except for MOE_LM_CPU_KERNEL=off)."""
    if setting() == "off":
        _why_not.append("MOE_LM_CPU_KERNEL=off")
        return None
    try:
        from torch.utils import cpp_extension

        where = build_dir()
        try:
            ext = _import_built(where)
        except ImportError:  # a broken file (an interrupted build): built again below
            ext = None
        if ext is None:
            where.mkdir(parents=True, exist_ok=True)
            print("moe-lm: building the CPU expert kernel (once per machine and torch version, ~30 s) ...",
                  file=sys.stderr, flush=True)
            # NOTE: ninja from this environment's bin folder (pip's ninja) when the shell's PATH lacks it
            bin_dir = os.path.dirname(sys.executable)
            if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + bin_dir
            ext = cpp_extension.load(NAME, sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS,
                                     extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=False)
        _self_check(ext)
        return ext
    except Exception as exc:  # noqa: BLE001 - any failure to build or run it: the Python path instead
        text = str(exc).strip()
        _why_not.append(f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300])
        print(f"moe-lm: the CPU expert kernel is not available ({_why_not[-1]}); the MoE layers take the "
              "Python fused path (MOE_LM_CPU_KERNEL=off skips the attempt)", file=sys.stderr, flush=True)
        return None


def why_not() -> Optional[str]:
    """Why load() gave None (after it did), else None."""
    return _why_not[-1] if _why_not else None


def _self_check(ext) -> None:
    """Forward and backward on a small problem (3 experts, one empty; SwiGLU) against the same
    formulas written out in float64 torch ops, gradients by hand (no autograd: load() may first run
    under no_grad or inference_mode); a RuntimeError if they differ (e.g. brgemm wrong on this CPU)."""
    g = torch.Generator().manual_seed(0)
    T, d, H, sizes = 9, 16, 8, [7, 0, 11]
    x, gy = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
    w_in, w_down = torch.randn(3, d, 2 * H, generator=g), torch.randn(3, H, d, generator=g)
    expert = torch.tensor([0] * 7 + [2] * 11)
    token = torch.randint(0, T, (18,), generator=g)
    weight = torch.rand(18, generator=g)
    out, *saved = ext.forward(x, token, weight, w_in, w_down, sizes, 0)
    dx, dw, dwin, dwd = ext.backward(gy, token, weight, w_in, w_down, sizes, 0, *saved)
    X, G, w = x.double()[token], gy.double()[token], weight.double()[:, None]  # per assignment
    Wi, Wd = w_in.double()[expert], w_down.double()[expert]
    h = torch.einsum("ad,adw->aw", X, Wi)
    gate, up = h[:, :H], h[:, H:]
    sig = torch.sigmoid(gate)
    act = gate * sig * up
    y = torch.einsum("ah,ahd->ad", act, Wd)
    dy = w * G
    d_act = torch.einsum("ad,ahd->ah", dy, Wd)
    dh = torch.cat([d_act * up * sig * (1 + gate * (1 - sig)), d_act * gate * sig], 1)
    want = {"out": torch.zeros(T, d, dtype=torch.float64).index_add(0, token, w * y),
            "dx": torch.zeros(T, d, dtype=torch.float64).index_add(0, token, torch.einsum("aw,adw->ad", dh, Wi)),
            "dw": (G * y).sum(1),
            "dwin": torch.zeros(3, d, 2 * H, dtype=torch.float64).index_add(0, expert, torch.einsum("ad,aw->adw", X, dh)),
            "dwd": torch.zeros(3, H, d, dtype=torch.float64).index_add(0, expert, torch.einsum("ah,ad->ahd", act, dy))}
    for name, got in (("out", out), ("dx", dx), ("dw", dw), ("dwin", dwin), ("dwd", dwd)):
        if not torch.allclose(got.double(), want[name], rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"its self-check on a small problem gave wrong numbers ({name})")


def state_for(device: torch.device) -> Optional[str]:
    """What run and bench records keep as "cpu_kernel": None off a CPU or where nothing asked for
    the kernel in this process (a dense model); else "built", "off" or "unavailable: <why>"."""
    if device.type != "cpu" or load.cache_info().currsize == 0:
        return None
    if load() is not None:
        return "built"
    return "off" if why_not() == "MOE_LM_CPU_KERNEL=off" else f"unavailable: {why_not()}"


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: float32 on a CPU, outside torch.compile, and
    the kernel built (load())."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return not torch.compiler.is_compiling() and load() is not None


def topk_indices(scores: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """The indices (T, k) of each row's k largest scores, in descending order, by the kernel
    (csrc/router_cpu.cpp: ~0.1-0.2 ms for the demo's (4,096 x 32) top-4 where torch.topk took
    ~0.8): torch.topk's answer, the only one, when no row has a NaN or two equal scores among its
    k + 1 largest. None when some row does (the caller breaks the ties) or where the kernel cannot
    take scores (applies). scores (T, E), 1 <= k <= E."""
    if scores.dim() != 2 or not 1 <= k <= scores.shape[1] or not applies(scores):
        return None
    idx, unique = load().topk_unique(scores.detach().contiguous(), k)
    return idx if unique else None


class KernelExpertsFFN(torch.autograd.Function):
    """dispatch.ExpertsFFN's function (same inputs: token_s, weight_s sorted by expert, sizes the
    E row counts), run by the kernel. Saves the experts' rows of x, h, the activation, the
    unscaled outputs y and (SwiGLU) silu(gate) for the backward: about what the fused path keeps."""

    @staticmethod
    def forward(ctx, x, weight_s, w_in, w_down, token_s, sizes, activation):
        ext = load()
        x, w_in, w_down = x.contiguous(), w_in.contiguous(), w_down.contiguous()
        token_s, wf = token_s.contiguous(), weight_s.float().contiguous()
        out, *saved = ext.forward(x, token_s, wf, w_in, w_down, list(sizes), ACTIVATIONS[activation])
        ctx.sizes, ctx.act, ctx.weight_dtype = list(sizes), ACTIVATIONS[activation], weight_s.dtype
        ctx.save_for_backward(token_s, wf, w_in, w_down, *saved)
        return out

    @staticmethod
    def backward(ctx, g):
        token_s, wf, w_in, w_down, *saved = ctx.saved_tensors
        dx, dw, dwin, dwd = load().backward(g.contiguous(), token_s, wf, w_in, w_down, ctx.sizes, ctx.act, *saved)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw.to(ctx.weight_dtype) if need[1] else None,
                dwin if need[2] else None, dwd if need[3] else None, None, None, None)
