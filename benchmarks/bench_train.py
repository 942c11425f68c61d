"""Training throughput of an MoE config and of its dense twin, measured in one process.

    python benchmarks/bench_train.py                       # tiny-moe vs its dense twin
    python benchmarks/bench_train.py --config configs/switch.yaml --rounds 7 --json out.json
    python benchmarks/bench_train.py train.batch_size=32   # overrides as for `moe-lm train`

The two models train on the same random batches; rounds of a few optimizer steps alternate
between them (so clock-speed drift hits both alike) and the median round counts. Model FLOP
utilisation = tokens/s x training FLOPs per token / this machine's measured matmul peak (the best
of several n x n matmuls in the training precision). The library side is
`moe_lm.bench.bench_train`.
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

    from moe_lm.bench import bench_train, render_train
    from moe_lm.config import load_config

    cfg = load_config(args.config, args.overrides)
    r = bench_train(cfg, steps=args.steps, rounds=args.rounds, warmup=args.warmup, device=args.device)
    render_train(r, Console() if sys.stdout.isatty() else Console(width=140))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
