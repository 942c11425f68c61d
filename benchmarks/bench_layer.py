"""The MoE layer against the dense FFN of equal active width and transformers' Mixtral block, for
the two shapes of docs/PERFORMANCE.md: 8 experts top-2 and 64 experts top-8 (fine-grained), both
SwiGLU at d_model 512 with 8192 tokens and an active width of 4·d_model = 2048.

    python benchmarks/bench_layer.py                          # CPU fp32, 2 threads, both shapes
    python benchmarks/bench_layer.py --json layer.json --repeats 15
    python benchmarks/bench_layer.py --device cuda --dtype bfloat16 --threads 0

Each shape runs in its own `moe-lm bench layer` measurement (interleaved contenders, warm-up,
median of the repeats). The library side is `moe_lm.bench.bench_layer`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(8, 2), (64, 8)]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per shape (median counts)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tune-malloc", action="store_true", help="glibc: no page faults on large allocations (all contenders)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' Mixtral block")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    from rich.console import Console

    from moe_lm.bench import bench_layer, render_layer, tune_malloc

    if args.tune_malloc:
        tune_malloc()
    console = Console() if sys.stdout.isatty() else Console(width=140)
    results = []
    for experts, top_k in SHAPES:
        r = bench_layer(d_model=args.d_model, tokens=args.tokens, experts=experts, top_k=top_k,
                        repeats=args.repeats, warmup=args.warmup, threads=args.threads or None,
                        device=args.device, dtype=args.dtype, hf=not args.no_hf)
        r["tune_malloc"] = args.tune_malloc
        render_layer(r, console)
        console.print()
        results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
