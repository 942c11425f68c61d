"""Where a training step's time goes, MoE and its dense twin: torch.profiler over the step that
`bench train` times (forward, backward, clipping, AdamW), on random tokens.

Prints, per model: wall ms per step, the host's (CPU) busy ms, the device's busy ms (sum of kernel
times; on a CPU the ops' self time), kernel launches per step, host-device syncs per step (the
calls that make the host wait: stream and device synchronisations, blocking cudaMemcpy, and the
.item() reads that cause them), and
the ops that take the most device time. A step whose device-busy time is far below its wall time
is launch-bound (the host cannot issue kernels fast enough), not arithmetic-bound.

    python benchmarks/profile_train.py --config configs/small-moe.yaml --device cuda
    python benchmarks/profile_train.py                      # tiny-moe on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the calls after which the host has waited for the device (cudaMemcpy: the blocking copy, not
# cudaMemcpyAsync) and the torch ops that cause them (.item(), .tolist(), bincount's size)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize",
               "aten::item", "aten::_local_scalar_dense")


def profile_model(name, cfg, dev, amp_dtype, steps: int, top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moe_lm.bench import _train_step, synchronize
    from moe_lm.model.transformer import Transformer
    from moe_lm.training.step import build_optimizer, compile_model, seed_everything

    seed_everything(0)
    model = Transformer(cfg.model).to(dev)
    opt = build_optimizer(model, cfg, dev)
    r = {"model": model, "opt": opt, "fwd": compile_model(model) if cfg.train.compile else model}
    bs, seq = cfg.train.batch_size // cfg.train.grad_accum, cfg.model.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (bs, seq + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    amp = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    for _ in range(3):
        _train_step(r, inp, tgt, amp)
    synchronize(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            _train_step(r, inp, tgt, amp)
        synchronize(dev)
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    on_device = dev.type == "cuda"

    def dev_time(e):  # microseconds of device time an op spent itself
        if not on_device:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    kernels = [e for e in prof.events() if on_device and str(getattr(e, "device_type", "")).endswith("CUDA")]
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                        "cudaGraphLaunch", "cuLaunchKernelEx"))
    syncs = {e.key: e.count / steps for e in events if e.key in SYNC_EVENTS and e.count}
    device_busy = (sum(k.time_range.elapsed_us() for k in kernels) if on_device
                   else sum(dev_time(e) for e in events))
    host_busy = sum(e.self_cpu_time_total for e in events)
    ops = sorted(((e.key, dev_time(e) / steps, e.count / steps) for e in events if not e.key.startswith("cuda")),
                 key=lambda t: -t[1])[:top]
    tokens = bs * seq
    return {"name": name, "wall_ms": wall * 1e3, "tokens_per_s": tokens / wall, "host_busy_ms": host_busy / steps / 1e3,
            "device_busy_ms": device_busy / steps / 1e3, "kernel_launches": launches / steps, "syncs": syncs,
            "top_ops": [{"op": k, "device_ms": us / 1e3, "calls": c} for k, us, c in ops]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-moe.yaml"))
    ap.add_argument("--device", default=None, help="cpu | cuda (default: the config's train.device)")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps per model (after 3 warm-up steps)")
    ap.add_argument("--top", type=int, default=15, help="ops listed per model")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="default: as `moe-lm info` resolves it (model.vocab_size, the data folder, data.vocab_size, 8192)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)

    from moe_lm.config import load_config
    from moe_lm.device import resolve_device
    from moe_lm.model.accounting import dense_twin, resolve_vocab_size

    cfg = load_config(args.config, args.overrides)
    cfg.model.vocab_size, _ = resolve_vocab_size(cfg, args.vocab_size)
    dev, amp_dtype = resolve_device(args.device or cfg.train.device, cfg.train.dtype, "--device")
    variants = {"moe": cfg, "dense": dense_twin(cfg)} if cfg.model.moe is not None else {"dense": cfg}
    out = []
    for name, c in variants.items():
        r = profile_model(name, c, dev, amp_dtype, args.steps, args.top)
        out.append(r)
        print(f"{name}: {r['wall_ms']:.1f} ms/step ({r['tokens_per_s']:,.0f} tokens/s); host busy "
              f"{r['host_busy_ms']:.1f} ms, device busy {r['device_busy_ms']:.1f} ms; "
              f"{r['kernel_launches']:.0f} kernel launches/step; syncs/step {r['syncs']}")
        for o in r["top_ops"]:
            print(f"   {o['device_ms']:8.3f} ms  {o['calls']:6.1f}x  {o['op']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
