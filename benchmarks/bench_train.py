"""Training throughput of an MoE config and of its dense twin, measured in one process.

    python benchmarks/bench_train.py                       # tiny-moe vs its dense twin
    python benchmarks/bench_train.py --config configs/switch.yaml --rounds 7 --json out.json
    python benchmarks/bench_train.py train.batch_size=32   # overrides as for `moe-lm train`

The two models train on the same random batches; rounds of a few optimizer steps alternate
between them (so clock-speed drift hits both alike) and the median round counts. Model FLOP
utilisation = tokens/s x training FLOPs per token / this machine's measured matmul peak (the best
of several n x n matmuls in the training precision). The library side is
`moe_lm.training.trainer.bench_train`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-moe.yaml"))
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per model (median counts)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--device", default=None, help="cpu | cuda | mps (default: the config's train.device)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from moe_lm.config import load_config
    from moe_lm.training.trainer import bench_train

    cfg = load_config(args.config, args.overrides)
    r = bench_train(cfg, steps=args.steps, rounds=args.rounds, warmup=args.warmup, device=args.device)

    console = Console() if sys.stdout.isatty() else Console(width=140)
    t = Table(title=f"training throughput: {cfg.name} vs its dense twin "
                    f"({r['device']}, {r['precision']}, {r['threads']} threads, {r['batch_tokens']:,} tokens/step)")
    for col in ("model", "params", "FLOPs/token", "step ms", "tokens/s (min..max)", "achieved GFLOP/s", "MFU"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for name, m in r["models"].items():
        lo, hi = m["tokens_per_s_spread"]
        t.add_row(name, f"{m['params'] / 1e6:.2f}M", f"{m['flops_per_token'] / 1e6:.2f}M", f"{m['step_s'] * 1e3:.1f}",
                  f"{m['tokens_per_s']:,.0f} ({lo:,.0f}..{hi:,.0f})", f"{m['achieved_flops'] / 1e9:.2f}",
                  f"{m['mfu']:.1%}")
    console.print(t)
    console.print(f"matmul peak ({r['precision']}): {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    if "moe_over_dense_tokens_per_s" in r:
        console.print(f"MoE / dense tokens/s: {r['moe_over_dense_tokens_per_s']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
