"""Library side of `moe-lm bench layer`: the MoE layer against the dense FFN of equal active width
and against transformers' MixtralSparseMoeBlock, in one process, interleaved.

    r = bench_layer(d_model=512, tokens=8192, experts=8, top_k=2)
    r["ratio"]          # MoE forward+backward time / dense FFN forward+backward time

What is timed: forward + backward (gradients for the input and every weight) of one SwiGLU layer
on `tokens` rows of width d_model, with a fixed upstream gradient. The MoE layer is this toolkit's
(softmax top-k router, Switch balance loss computed, dropless); each expert is `ffn_hidden` wide
(default 4·d_model / top_k), so the dense FFN of equal active width is top_k·ffn_hidden = 4·d_model
wide. The transformers block gets the same weights (so the same routing; the outputs are compared)
for each experts implementation it offers. Every contender runs once per round, in a rotating
order, after warm-up rounds; the figure is the median over rounds.
"""

from __future__ import annotations

import copy
import ctypes
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Optional

import torch

from . import checks
from .config import Config, MoEConfig
from .device import device_name, openmp_settings, precision_name, resolve_device, synchronize
from .errors import ConfigError
from .model import cpu_kernel, gemm

HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def tune_malloc() -> bool:
    """glibc only: serve every allocation from the heap and never trim it, so that large tensors
    stop paying page faults on each allocation (each > 32 MiB one is otherwise a fresh mmap).
    Process-wide; returns False where it does not apply."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except OSError:
        return False


# A plain Python busy loop (what "another program is using a core" looks like). It also leaves by
# itself when its parent goes away (even a SIGKILLed parent, whose finally blocks never run).
BUSY_LOOP = ("import os\n"
             "parent = os.getppid()\n"
             "while os.getppid() == parent:\n"
             "    for _ in range(200000):\n"
             "        pass\n")


def _stop_processes(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextmanager
def busy_loops(n: int) -> Iterator[list[int]]:
    """Run n busy-loop processes for the duration of the block; yields their pids.

    They are stopped (terminate, then kill, then reaped) however the block ends: normally, by an
    exception, by Ctrl-C, or by SIGTERM (turned into SystemExit inside the block, main thread
    only, so the finally clause runs)."""
    procs: list = []
    prev = None
    if n > 0 and threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise SystemExit(128 + signum)

        prev = signal.signal(signal.SIGTERM, on_term)
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if procs:
            time.sleep(0.2)  # let them start spinning before anything is timed
        yield [p.pid for p in procs]
    finally:
        _stop_processes(procs)
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: Optional[int] = None,
                        repeats: int = 5, inner: int = 5) -> float:
    """Best observed FLOP/s of an n x n matmul on `device` (the machine's practical peak), through
    model.gemm.mm (on a CPU the library the models' matmuls use). n: 1024 on a CPU; 8192 on a GPU
    (smaller products leave a big GPU far from its peak)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        gemm.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            gemm.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best


def measure_peak(device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of this machine's best square matmul (measure_matmul_peak, as `bench train` uses it)."""
    return measure_matmul_peak(device, dtype) / 1e9


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident memory so far, in bytes (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # NOTE: ru_maxrss is in KiB on Linux, in bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _device_label(dev: torch.device) -> str:
    """The GPU's name; on a CPU its model name (from /proc/cpuinfo where there is one) and the
    threads torch uses."""
    if dev.type == "cuda":
        return device_name(dev)
    cpu = device_name(dev)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def _hf_block(impl: str, d: int, h: int, E: int, k: int, ours, device, dtype):
    """transformers' MixtralSparseMoeBlock with our layer's weights (a renaming: Mixtral's
    gate_up_proj (E, 2h, d) is our w_gate_up (E, d, 2h) transposed)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.experts.w_gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(ours.experts.w_down.transpose(1, 2))
    return block.to(device=device, dtype=dtype)


def bench_layer(d_model: int = 512, tokens: int = 8192, experts: int = 8, top_k: int = 2,
                ffn_hidden: Optional[int] = None, repeats: int = 10, warmup: int = 2,
                device: str = "cpu", dtype: str = "float32", threads: Optional[int] = None,
                hf: bool = True, dispatch_path: Optional[str] = None, seed: int = 0,
                memory_limit_gib: float = 8.0, busy: int = 0, also_paths: tuple[str, ...] = ()) -> dict:
    """Median forward+backward milliseconds of the MoE layer, the dense FFN of equal active width
    and transformers' Mixtral block (each experts implementation; one whose memory estimate exceeds
    memory_limit_gib is skipped, with the reason). Returns a JSON-ready dict.

    busy: that many busy-loop processes run beside the measurement (busy_loops), from the first
    forward to the peak measure; they are gone when this returns or raises.
    also_paths: dispatch paths to time too, as extra contenders on the same layer (same weights)."""
    from .model.moe import FeedForward, MoELayer

    from .model.dispatch import PATHS

    # every option before any work: numbers in range, choices among the values listed
    for option, v, lo, hi in (("--d-model", d_model, 1, 2**17), ("--tokens", tokens, 1, 2**28),
                              ("--experts", experts, 1, 2**16), ("--top-k", top_k, 1, experts),
                              ("--ffn-hidden", ffn_hidden, 1, 2**20), ("--repeats", repeats, 1, 10**6),
                              ("--warmup", warmup, 0, 10**6), ("--threads", threads, 1, 4096)):
        checks.option_number(option, v, lo, hi, integer=True)
    checks.device("--device", device, ("cpu", "cuda"))
    checks.choice("--dtype", dtype, ("float32", "bfloat16", "float16"))
    if dispatch_path is not None:
        checks.choice("--dispatch", dispatch_path, PATHS)
    checks.option_number("--busy", busy, 0, 64, integer=True)
    h = ffn_hidden or max(1, (4 * d_model) // top_k)
    dev = torch.device(device)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)

    std, down_std = 0.02, 0.02
    moe_cfg = MoEConfig(n_experts=experts, top_k=top_k, router="softmax_topk", balance_loss="switch")
    moe = MoELayer(d_model, h, "swiglu", moe_cfg, std, down_std)
    moe.dispatch_path = dispatch_path
    dense = FeedForward(d_model, top_k * h, "swiglu", std, down_std)
    x = torch.randn(1, tokens, d_model, device=dev, dtype=dt)
    gy = torch.randn(1, tokens, d_model, device=dev, dtype=dt)

    contenders: dict[str, Callable] = {}
    mods: dict[str, torch.nn.Module] = {}
    hf_skipped: dict[str, str] = {}
    if hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            hf_skipped["all"] = "transformers is not installed (pip install transformers)"
        else:
            for impl in HF_IMPLEMENTATIONS:
                if impl == "batched_mm":  # gathers one weight matrix per (token, expert) pair
                    need = tokens * top_k * 3 * h * d_model * torch.finfo(dt).bits / 8 * 2 / 2**30
                    if need > memory_limit_gib:
                        hf_skipped[impl] = f"would gather {need:.0f} GiB of per-token expert weights"
                        continue
                try:
                    mods[f"hf:{impl}"] = _hf_block(impl, d_model, h, experts, top_k, moe, dev, dt)
                except Exception as exc:  # noqa: BLE001 - an implementation this version lacks
                    hf_skipped[impl] = f"{type(exc).__name__}: {exc}"
    from .model.dispatch import PATHS

    for p in also_paths:
        if p not in PATHS:
            raise ConfigError(f"--also {p}: unknown dispatch path (known: {', '.join(PATHS)})")
    moe = moe.to(device=dev, dtype=dt)
    mods = {"moe": moe, "dense": dense.to(device=dev, dtype=dt),
            **{f"path:{p}": _OnPath(moe, p) for p in also_paths}, **mods}

    def make(mod):
        def step():
            xi = x.detach().requires_grad_(True)
            out = mod(xi)
            y = out[0] if isinstance(out, tuple) else out
            y.backward(gy)
            for p in mod.parameters():
                p.grad = None
        return step

    with busy_loops(busy) as busy_pids:
        med, peak, hf_max_abs_diff, path = _measure(mods, contenders, make, x, dev, dt, repeats, warmup, hf_skipped)
    fwd_bwd_flops = 3 * 2 * tokens * d_model * top_k * h * 3  # 3 matrices, forward + backward
    return {
        "moe_ms": round(med["moe"], 2), "dense_ms": round(med["dense"], 2),
        "ratio": round(med["moe"] / med["dense"], 3),
        "hf": {n[3:]: round(v, 2) for n, v in med.items() if n.startswith("hf:")},
        "hf_ratio": {n[3:]: round(v / med["dense"], 3) for n, v in med.items() if n.startswith("hf:")},
        "hf_skipped": hf_skipped, "hf_max_abs_diff": hf_max_abs_diff,
        "paths": {n[5:]: round(v, 2) for n, v in med.items() if n.startswith("path:")},
        "paths_ratio": {n[5:]: round(v / med["dense"], 3) for n, v in med.items() if n.startswith("path:")},
        "gflops_peak": round(peak, 1),
        "moe_gflops": round(fwd_bwd_flops / med["moe"] / 1e6, 1),
        "dense_gflops": round(fwd_bwd_flops / med["dense"] / 1e6, 1),
        "device": _device_label(dev), "dtype": dtype, "threads": torch.get_num_threads(),
        "d_model": d_model, "tokens": tokens, "experts": experts, "top_k": top_k, "ffn_hidden": h,
        "dense_hidden": top_k * h, "dispatch": path, "repeats": repeats, "warmup": warmup,
        "busy": busy, "busy_pids": busy_pids, "cores": available_cores(),
        **openmp_settings(), "cpu_matmul": gemm.backend_for(dev), "cpu_kernel": cpu_kernel.state_for(dev),
        "torch": torch.__version__, "transformers": _version("transformers"),
    }


class _OnPath(torch.nn.Module):
    """The same MoE layer, forced onto one dispatch path."""

    def __init__(self, layer, path: str):
        super().__init__()
        self.layer, self.path = layer, path

    def forward(self, x):
        saved, self.layer.dispatch_path = self.layer.dispatch_path, self.path
        try:
            return self.layer(x)
        finally:
            self.layer.dispatch_path = saved


def _measure(mods, contenders, make, x, dev, dt, repeats, warmup, hf_skipped):
    """The checks and the interleaved timing of bench_layer -> (median ms by contender, matmul
    peak GFLOP/s, transformers' max abs difference by implementation, the MoE's dispatch path)."""
    # outputs agree? (same weights, same routing; dropless top-k is deterministic)
    hf_max_abs_diff: dict[str, float] = {}
    with torch.no_grad():
        ref = mods["moe"](x)[0].float()
        path = mods["moe"].experts.last_path  # the path the layer's own rule takes (before any forced one)
        for name in list(mods):
            if name.startswith("hf:"):
                try:
                    out = mods[name](x)
                    out = out[0] if isinstance(out, tuple) else out
                    hf_max_abs_diff[name[3:]] = float((out.float() - ref).abs().max())
                except Exception as exc:  # noqa: BLE001
                    hf_skipped[name[3:]] = f"{type(exc).__name__}: {exc}"
                    del mods[name]
    for name, mod in mods.items():
        contenders[name] = make(mod)

    times: dict[str, list[float]] = {n: [] for n in contenders}
    names = list(contenders)
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no contender always first
        for n in order:
            synchronize(dev)
            t0 = time.perf_counter()
            contenders[n]()
            synchronize(dev)
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) * 1000 for n, v in times.items()}
    peak = measure_peak(dev, dt)
    return med, peak, hf_max_abs_diff, path


def render_layer(r: dict, console) -> None:
    """A table of bench_layer's result."""
    from rich.table import Table

    t = Table(title=f"MoE layer forward+backward: {r['tokens']:,} tokens, d_model {r['d_model']}, "
                    f"{r['experts']} experts top-{r['top_k']} x {r['ffn_hidden']} (SwiGLU) "
                    f"vs dense {r['dense_hidden']}; {r['device']}, {r['dtype']}"
                    + (f"; {r['busy']} busy-loop process{'es' if r['busy'] != 1 else ''} beside it" if r.get("busy") else ""))
    for col in ("layer", "median ms", "/ dense", "GFLOP/s"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    flops = r["moe_gflops"] * r["moe_ms"]  # MFLOP, the same work for every row
    t.add_row(f"moe-lm MoE ({r['dispatch']})", f"{r['moe_ms']:.1f}", f"{r['ratio']:.3f}", f"{r['moe_gflops']:.0f}")
    t.add_row("dense FFN, equal active width", f"{r['dense_ms']:.1f}", "1.000", f"{r['dense_gflops']:.0f}")
    for p, ms in r.get("paths", {}).items():
        t.add_row(f"moe-lm MoE, forced {p}", f"{ms:.1f}", f"{r['paths_ratio'][p]:.3f}", f"{flops / ms:.0f}")
    for impl, ms in r["hf"].items():
        t.add_row(f"transformers Mixtral block ({impl})", f"{ms:.1f}", f"{r['hf_ratio'][impl]:.3f}", f"{flops / ms:.0f}")
    console.print(t)
    for impl, why in r["hf_skipped"].items():
        console.print(f"transformers {impl}: skipped ({why})", markup=False, highlight=False)
    console.print(f"matmul peak {r['gflops_peak']:.0f} GFLOP/s; median of {r['repeats']} interleaved rounds after "
                  f"{r['warmup']} warm-up rounds; torch {r['torch']}, transformers {r['transformers']}",
                  markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------
# `moe-lm bench train` (and benchmarks/bench_train.py)


def bench_train(cfg: Config, *, steps: int = 5, rounds: int = 5, warmup: int = 2,
                vocab_size: Optional[int] = None, device: Optional[str] = None) -> dict:
    """Training tokens/s of cfg's MoE model and of its dense twin, measured alternately in one
    process (median over `rounds` rounds of `steps` optimizer steps each), their ratio (and
    `moe_over_dense_per_round`: each round's ratio, from two back-to-back timings), model FLOP
    utilisation against this machine's measured matmul peak, and the process's peak resident
    memory (`peak_rss_bytes`, both models together; None where the OS does not report it).

    Uses random token batches (no data folder needed); vocab_size: as `moe-lm info` resolves it
    (accounting.resolve_vocab_size: the argument, model.vocab_size, the data folder,
    data.vocab_size, 8192); the output's `vocab_size` and `vocab_from` say which. The step is the
    trainer's (AdamW as `build_optimizer` makes it, clipping at 1.0, router-bias update) on one
    micro-batch of train.batch_size // train.grad_accum rows.
    """
    from .model.accounting import dense_twin, flops_per_token, resolve_vocab_size
    from .model.transformer import Transformer
    from .training.step import build_optimizer, compile_model, seed_everything

    for option, v, lo in (("--steps", steps, 1), ("--rounds", rounds, 1), ("--warmup", warmup, 0)):
        checks.option_number(option, v, lo, 10**6, integer=True)
    checks.option_number("vocab_size", vocab_size, 2, 2**32, integer=True)
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size, vocab_from = resolve_vocab_size(cfg, vocab_size)
    dev, amp_dtype = resolve_device(device or cfg.train.device, cfg.train.dtype, "--device" if device else "train.device")
    amp = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    variants = {"moe": cfg, "dense": dense_twin(cfg)} if cfg.model.moe is not None else {"dense": cfg}
    t = cfg.train
    bs, seq = t.batch_size // t.grad_accum, cfg.model.seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (bs, seq + 1), generator=g).to(dev)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    runs = {}
    for name, c in variants.items():
        seed_everything(t.seed)
        model = Transformer(c.model).to(dev)
        opt = build_optimizer(model, c, dev)
        fwd = compile_model(model) if t.compile else model
        runs[name] = {"model": model, "opt": opt, "fwd": fwd, "times": [], "params": model.num_params(),
                      "fpt": float(flops_per_token(c.model)["total"])}
    for r in runs.values():
        for _ in range(warmup):
            _train_step(r, inp, tgt, amp)
    synchronize(dev)
    for _ in range(rounds):
        for r in runs.values():  # NOTE: alternate, so drifts in clock speed hit both alike
            synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                _train_step(r, inp, tgt, amp)
            synchronize(dev)
            r["times"].append((time.perf_counter() - t0) / steps)
    peak = measure_matmul_peak(dev, amp_dtype or torch.float32)
    out: dict = {"device": dev.type, "device_name": device_name(dev),
                 "threads": torch.get_num_threads(), **openmp_settings(), "cpu_matmul": gemm.backend_for(dev),
                 "cpu_kernel": cpu_kernel.state_for(dev),
                 "precision": precision_name(amp_dtype), "batch_tokens": bs * seq,
                 "vocab_size": cfg.model.vocab_size, "vocab_from": vocab_from, "matmul_peak_flops": peak,
                 "models": {name: _throughput(r, bs * seq, peak) for name, r in runs.items()}}
    if "moe" in out["models"]:
        out["moe_over_dense_tokens_per_s"] = out["models"]["moe"]["tokens_per_s"] / out["models"]["dense"]["tokens_per_s"]
        # round i of each model ran back to back: their ratio is free of slow drifts of the machine's
        # speed, and the spread over rounds shows how far one reading can be trusted
        out["moe_over_dense_per_round"] = [d / m for m, d in zip(runs["moe"]["times"], runs["dense"]["times"])]
    out["name"] = cfg.name
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _train_step(r: dict, inp: torch.Tensor, tgt: torch.Tensor, amp) -> None:
    with amp():
        out = r["fwd"](inp, tgt)
    loss = out.loss + out.aux_loss + out.z_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 1.0)
    r["opt"].step()
    r["opt"].zero_grad(set_to_none=True)
    r["model"].update_router_biases()


def _throughput(r: dict, batch_tokens: int, peak: float) -> dict:
    step_s = statistics.median(r["times"])
    tps = batch_tokens / step_s
    return {"params": r["params"], "flops_per_token": r["fpt"], "step_s": step_s, "tokens_per_s": tps,
            "tokens_per_s_spread": [batch_tokens / max(r["times"]), batch_tokens / min(r["times"])],
            "achieved_flops": tps * r["fpt"], "mfu": tps * r["fpt"] / peak}


def render_train(r: dict, console) -> None:
    from rich.table import Table

    pair = len(r["models"]) > 1  # a dense config has no twin: its own figures only
    t = Table(title=f"training throughput: {r.get('name', 'model')}{' vs its dense twin' if pair else ' (dense: no twin)'} "
                    f"({r['device']}, {r['precision']}, {r['threads']} threads, {r['batch_tokens']:,} tokens/step, "
                    f"vocab {r['vocab_size']:,})",
              title_justify="left")
    for col in ("model", "params", "FLOPs/token", "step ms", "tokens/s (min..max)", "achieved GFLOP/s", "MFU"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for name, m in r["models"].items():
        lo, hi = m["tokens_per_s_spread"]
        t.add_row(name, f"{m['params'] / 1e6:.2f}M", f"{m['flops_per_token'] / 1e6:.2f}M", f"{m['step_s'] * 1e3:.1f}",
                  f"{m['tokens_per_s']:,.0f} ({lo:,.0f}..{hi:,.0f})", f"{m['achieved_flops'] / 1e9:.2f}",
                  f"{m['mfu']:.1%}")
    console.print(t)
    console.print(f"vocabulary: {r['vocab_size']:,} tokens, from {r['vocab_from']}", markup=False, highlight=False)
    console.print(f"matmul peak ({r['precision']}): {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s", highlight=False)
    if "moe_over_dense_tokens_per_s" in r:
        rounds = r.get("moe_over_dense_per_round") or []
        spread = (f" (round by round: median {statistics.median(rounds):.3f}, {min(rounds):.3f}..{max(rounds):.3f} "
                  f"over {len(rounds)} rounds)") if len(rounds) > 1 else ""
        console.print(f"MoE / dense tokens/s: {r['moe_over_dense_tokens_per_s']:.3f}{spread}", highlight=False)
    if r.get("peak_rss_bytes"):
        console.print(f"peak resident memory of this process{' (both models)' if pair else ''}: "
                      f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB",
                      highlight=False)


# ---------------------------------------------------------------------------------------------
# `moe-lm bench prepare` (measured by data.prepare.bench_prepare)


def prepare_throughput(max_bytes: Optional[int] = None, vocab_size: int = 8192, repeats: int = 1) -> dict:
    """`moe-lm bench prepare`: data.prepare.bench_prepare `repeats` times (options checked first:
    ConfigError), the median run with every run's tokenisation MB/s (median_prepare)."""
    from .data.prepare import bench_prepare

    checks.option_number("--repeats", repeats, 1, 1000, integer=True)
    checks.option_number("--max-bytes", max_bytes, 1, integer=True, hint="or leave it out for the whole corpus")
    checks.option_number("--vocab-size", vocab_size, 257, 2**32, integer=True)
    return median_prepare([bench_prepare(max_bytes=max_bytes, vocab_size=vocab_size) for _ in range(repeats)])


def median_prepare(runs: list[dict]) -> dict:
    """The median of several bench_prepare runs (by tokenisation MB/s), with every run's figure."""
    r = dict(sorted(runs, key=lambda x: x["tokenise_mb_s"])[len(runs) // 2])
    r["tokenise_mb_s_all"] = [x["tokenise_mb_s"] for x in runs]
    r["cpus"] = os.cpu_count()
    return r


def render_prepare(r: dict, console) -> None:
    from rich.table import Table

    n = len(r.get("tokenise_mb_s_all", [0]))
    t = Table(title=f"moe-lm prepare, built-in corpus ({r['cpus']} CPUs, median of {n})", title_justify="left")
    for col in ("documents", "MB", "tokens", "bytes/token", "tokenizer s", "tokenise s", "tokenise MB/s", "total s"):
        t.add_column(col, justify="right")
    t.add_row(f"{r['documents']:,}", f"{r['bytes'] / 1e6:.2f}", f"{r['tokens']:,}", f"{r['bytes_per_token']:.2f}",
              f"{r['tokenizer_s']:.1f}", f"{r['tokenise_s']:.1f}", f"{r['tokenise_mb_s']:.2f}", f"{r['total_s']:.1f}")
    console.print(t)
    console.print(f"tokenisation throughput: {r['tokenise_mb_s']:.2f} MB/s "
                  f"(all runs: {', '.join(f'{x:.2f}' for x in r['tokenise_mb_s_all'])})", highlight=False)
