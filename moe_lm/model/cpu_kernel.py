"""The "cpu_kernel" dispatch path: the fused path's expert work as one C++ call per direction, for
float32 on a CPU (the source: csrc/experts_cpu.cpp); and the router's top-k on a CPU
(csrc/router_cpu.cpp, `topk_indices`, which routing.fair_topk asks first).

    y = KernelExpertsFFN.apply(x, weight_s, w_in, w_down, token_s, sizes, activation)
    # the signature and result of dispatch.ExpertsFFN: x (T, d) -> (T, d)

What it does: the experts are shared out over torch's threads by a counter, and a thread runs all
of its expert's work alone, in its own scratch memory while the expert's rows sit in its cache: the
gather of its rows, the gate/up product, the activation and the down product (the backward
likewise, making the activation and the gathered rows again: only the gate/up outputs and the
unscaled outputs are kept); then the combine sums each token's rows, scaled by their gate weights,
in their expert-sorted order, parallel over the tokens. The products go to oneDNN's brgemm
micro-kernels (`at::native::cpublas::brgemm`, the AVX-512 or AVX2 kernels the CPU has); the weight
gradients sum into register tiles; the element-wise work (SwiGLU, ReLU, the gate weights' dot
products, the combine) is C++ compiled for AVX-512, AVX2 + FMA and the base ISA, the CPU's best
taken at load (GELU is ATen's). Every row is computed the same way wherever it falls, so the result
does not depend on the thread count. Why: the Python fused path issues ~7 small operations per
block of experts and direction, each a fork-join over every thread, and its small products run
through MKL at AVX2 width on an AMD CPU; at the demo's shape (4,096 tokens, 32 SwiGLU experts of
width 64, top-4) one layer's dispatch, forward and backward, went from 13-18 ms to ~5 ms
(docs/PERFORMANCE.md, "The experts in one C++ call").

Where: `dispatch.choose_path` takes it on an x86 CPU with AVX2 or AVX-512 for experts below
dispatch.THREADS_MIN_MACS multiply-adds a product (big experts keep the fused path's expert threads
and oneDNN products: at d_model 512 they measured faster), float32, outside torch.compile,
wherever it builds.

Built the first time a float32 MoE layer runs on a CPU (training loads it before the first step)
with torch's cpp_extension: a C++ compiler on the machine and ninja (a dependency); ~20-30 s, once
per source, flags, Python and torch version, in torch's extensions folder (TORCH_EXTENSIONS_DIR,
else XDG_CACHE_HOME's or ~/.cache's torch_extensions). Then it is checked on a small problem
against float64 formulas. Where it cannot be built (no compiler: said at once; a failed build:
remembered in the build folder, so later processes do not try again) or the check fails, `load()`
says why in one line on stderr and the layers take the Python fused path. MOE_LM_CPU_KERNEL=off
never builds it (checks.cpu_kernel).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..checks import cpu_kernel as setting

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("experts_cpu.cpp", "router_cpu.cpp")]
NAME = "moe_lm_experts_cpu"
ACTIVATIONS = {"swiglu": 0, "relu": 1, "gelu": 2}
# NOTE: -fopenmp: at::parallel_for is a header template; without it the experts run serially
CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LOCK_WAIT_S = 600  # how long a process waits for another one's build before it takes the fused path

_why_not: list[str] = []  # why load() returned None, once it has
_loaded: list = []  # [the module or None] once load() has run
_load_lock = threading.Lock()


def build_dir() -> Path:
    """Where the extension is built: torch's extensions folder, one subfolder per source, flags,
    Python and torch version (a change to any of them builds afresh, elsewhere)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(cache) / "torch_extensions")
    key = b"".join(p.read_bytes() for p in SOURCES) + " ".join(
        [*CFLAGS, torch.__version__, sys.version.split()[0], str(sysconfig.get_config_var("EXT_SUFFIX"))]).encode()
    return Path(root) / f"{NAME}_{hashlib.sha256(key).hexdigest()[:12]}"


def _library(where: Path) -> Path:
    return where / (NAME + (".pyd" if sys.platform == "win32" else ".so"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_built(where: Path):
    """The module built and checked in `where` earlier, imported directly; None where there is
    none, or the file is not the one that passed (a marker, "ok", holds its hash: an interrupted
    build's truncated file is never imported, which would crash the process). Why not torch's
    cpp_extension.load: it runs ninja again in every process, and rebuilds when two copies of this
    package (benchmarks/bench_against_commit.py's) load the same sources from two paths."""
    path, marker = _library(where), where / "ok"
    try:
        if not marker.is_file() or marker.read_text().strip() != _digest(path):
            return None
    except OSError:
        return None
    loaded = sys.modules.get(NAME)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[NAME] = module
    return module


def _try_import(where: Path):
    """_import_built, with a file that does not load here (ImportError) taken as none: built again."""
    try:
        return _import_built(where)
    except ImportError:
        return None


class _BuildLock:
    """An exclusive lock on `where`/build.lock (fcntl.flock: the OS drops it when its process dies,
    so a killed build leaves no lock behind). While held, a lock file torch's own loader left
    (it removes it only in a `finally`) is stale and is removed. Without fcntl (Windows): no lock."""

    def __init__(self, where: Path):
        self.path, self.f = where / "build.lock", None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.f = open(self.path, "w")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.f.close()
                    raise TimeoutError(f"another process has been building it for over {LOCK_WAIT_S} s")
                time.sleep(0.2)
        (self.path.parent / "lock").unlink(missing_ok=True)
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()  # releases the flock


class KernelUnavailable(RuntimeError):
    """Why the kernel cannot be had here, in one line for the user."""


def _failure_reason(exc: BaseException) -> str:
    """One line: the compiler's first error line where the text has one, else the first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower()]  # the compiler's ("...: fatal error: ...")
    line = errors[0] if errors else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {line}"[:300]


def _build(where: Path):
    """Build into `where` (under _BuildLock), check, and mark it good; a failure is written to
    `where`/failed and raised."""
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler ({compiler}) on this machine: install one (Linux: g++; "
                                "macOS: xcode-select --install)")
    print("moe-lm: building the CPU expert kernel (once per machine and torch version, ~30 s) ...",
          file=sys.stderr, flush=True)
    # NOTE: ninja from this environment's bin folder (pip's ninja) when the shell's PATH lacks it
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + bin_dir
    # NOTE: a library left by a killed build may be truncated, and torch's loader would import it
    # (a crash): linked afresh instead
    _library(where).unlink(missing_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's compiler-version warnings: the reason is said below
            ext = cpp_extension.load(NAME, sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS,
                                     extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=False)
        _self_check(ext)
    except Exception as exc:
        reason = _failure_reason(exc)
        (where / "failed").write_text(reason + "\n")
        raise KernelUnavailable(f"{reason} (remove {where / 'failed'} to try again)") from exc
    tmp = where / "ok.tmp"
    tmp.write_text(_digest(_library(where)) + "\n")
    tmp.replace(where / "ok")
    return ext


def load():
    """The built and checked extension module, or None (why_not() says why; said once on stderr,
    except for MOE_LM_CPU_KERNEL=off). Thread-safe; the answer is kept for the process
    (load.cache_clear() forgets it)."""
    with _load_lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _cache_clear() -> None:
    with _load_lock:
        _loaded.clear()


load.cache_clear = _cache_clear
load.loaded = lambda: bool(_loaded)


def _load():
    if setting() == "off":
        _why_not.append("MOE_LM_CPU_KERNEL=off")
        return None
    try:
        where = build_dir()
        ext = _try_import(where)
        if ext is not None:
            _self_check(ext)
            return ext
        where.mkdir(parents=True, exist_ok=True)
        with _BuildLock(where):
            failed = where / "failed"
            if failed.is_file():
                raise KernelUnavailable(f"{failed.read_text().strip()} (an earlier build here failed; remove "
                                        f"{failed} to try again)")
            ext = _try_import(where)  # another process may have built it while this one waited
            if ext is None:
                return _build(where)  # built and checked
        _self_check(ext)
        return ext
    except Exception as exc:  # noqa: BLE001 - any failure to build or run it: the Python path instead
        _why_not.append(str(exc) if isinstance(exc, KernelUnavailable) else _failure_reason(exc))
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
    dx, dw, dwin, dwd = ext.backward(gy, x, token, weight, w_in, w_down, sizes, 0, *saved)
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
    if device.type != "cpu" or not load.loaded():
        return None
    if load() is not None:
        return "built"
    return "off" if why_not() == "MOE_LM_CPU_KERNEL=off" else f"unavailable: {why_not()}"


def cpu_has_brgemm() -> bool:
    """Whether oneDNN has brgemm micro-kernels for float32 on this CPU: x86 with AVX2 or AVX-512
    (elsewhere torch's brgemm falls back to one BLAS call per block of rows: not measured, so not
    taken)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: float32 on a CPU with brgemm (cpu_has_brgemm),
    outside torch.compile, and the kernel built (load())."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return not torch.compiler.is_compiling() and cpu_has_brgemm() and load() is not None


def topk_indices(scores: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """The indices (T, k) of each row's k largest scores, in descending order, by the kernel
    (csrc/router_cpu.cpp: ~0.14 ms for the demo's (4,096 x 32) top-4 where torch.topk of 5 took
    ~0.8): torch.topk's answer, the only one, when no row has a NaN or two equal scores among its
    k + 1 largest. None when some row does (the caller breaks the ties) or where the kernel cannot
    take scores (applies). scores (T, E), 1 <= k <= E."""
    if scores.dim() != 2 or not 1 <= k <= scores.shape[1] or not applies(scores):
        return None
    idx, unique = load().topk_unique(scores.detach().contiguous(), k)
    return idx if unique else None


def softmax_topk(logits: torch.Tensor, k: int, renorm: bool) -> Optional[tuple]:
    """Softmax top-k routing by the kernel (csrc/router_cpu.cpp) on float32 router logits (T, E):
    (probs (T, E), top_idx (T, k), top_p (T, k), weight (T, k), lse (T,), entropy (T,)), where
    probs = softmax(logits), top_idx/top_p its k largest (torch.topk's: no row may tie, as
    topk_indices), weight = top_p, divided by its row sums when renorm, lse = logsumexp(logits)
    (= the largest p's logit - log p), entropy per row = -sum p log p (detached; computed as
    (lse - l_max) - sum p (l - l_max)). probs, weight and lse are differentiable once (no double
    backward), their backward one C++ pass (SoftmaxTopKFn). None where the kernel cannot take the
    logits (applies) or a row ties: the caller's Python path decides then. What SoftmaxTopK and
    Switch compute in ~15 small ops a direction."""
    if logits.dim() != 2 or not 1 <= k <= logits.shape[1] or not applies(logits):
        return None
    out = SoftmaxTopKFn.apply(logits.contiguous(), k, renorm)
    return out[:-1] if out[-1] else None


class SoftmaxTopKFn(torch.autograd.Function):
    """logits -> (probs, top_idx, top_p, weight, lse, entropy, unique) by the kernel; see softmax_topk."""

    @staticmethod
    def forward(ctx, logits, k, renorm):
        probs = logits.softmax(dim=-1)
        idx, top_p, weight, lse, ent, unique = load().softmax_topk_forward(logits, probs, k, renorm)
        ctx.renorm = renorm
        ctx.save_for_backward(probs, idx, top_p, weight)
        ctx.mark_non_differentiable(idx, top_p, ent)
        ctx.set_materialize_grads(False)
        return probs, idx, top_p, weight, lse, ent, unique

    @staticmethod
    @once_differentiable
    def backward(ctx, dprobs, _didx, _dtop_p, dweight, dlse, _dent, _dunique):
        probs, idx, top_p, weight = ctx.saved_tensors
        if dprobs is None and dweight is None and dlse is None:
            return None, None, None
        dl = load().softmax_topk_backward(probs, idx, top_p, weight, ctx.renorm, dweight, dprobs, dlse)
        return dl, None, None


class KernelExpertsFFN(torch.autograd.Function):
    """dispatch.ExpertsFFN's function (same inputs: token_s, weight_s sorted by expert, sizes the
    E row counts), run by the kernel. Saves x (the layer's input, alive anyway), the experts'
    gate/up outputs h and their unscaled outputs y: the backward makes the rest again, so a layer
    keeps A (W + d) floats where the fused path keeps A (W + 2H + d) (~60 % of it for SwiGLU).
    Differentiable once (no double backward)."""

    @staticmethod
    def forward(ctx, x, weight_s, w_in, w_down, token_s, sizes, activation):
        ext = load()
        x, w_in, w_down = x.contiguous(), w_in.contiguous(), w_down.contiguous()
        token_s, wf = token_s.contiguous(), weight_s.float().contiguous()
        out, h, y = ext.forward(x, token_s, wf, w_in, w_down, list(sizes), ACTIVATIONS[activation])
        ctx.sizes, ctx.act, ctx.weight_dtype = list(sizes), ACTIVATIONS[activation], weight_s.dtype
        ctx.save_for_backward(x, token_s, wf, w_in, w_down, h, y)
        return out

    @staticmethod
    @once_differentiable  # the kernel's backward is not itself differentiable
    def backward(ctx, g):
        x, token_s, wf, w_in, w_down, h, y = ctx.saved_tensors
        dx, dw, dwin, dwd = load().backward(g.contiguous(), x, token_s, wf, w_in, w_down, ctx.sizes, ctx.act, h, y)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw.to(ctx.weight_dtype) if need[1] else None,
                dwin if need[2] else None, dwd if need[3] else None, None, None, None)
