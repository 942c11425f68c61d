"""The MoE layer against the dense FFN of equal active width and transformers' Mixtral block, for
the two shapes of docs/PERFORMANCE.md: 8 experts top-2 and 64 experts top-8 (fine-grained), both
SwiGLU at d_model 512 with 8192 tokens and an active width of 4·d_model = 2048.

    python benchmarks/bench_layer.py                          # CPU fp32, 2 threads, both shapes
    python benchmarks/bench_layer.py --json layer.json --repeats 15
    python benchmarks/bench_layer.py --busy 0 1 2            # also beside 1 and 2 busy-loop processes
    python benchmarks/bench_layer.py --device cuda --dtype bfloat16 --threads 0

Each (shape, busy count) runs in its own `moe-lm bench layer` measurement (interleaved contenders, warm-up,
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
    ap.add_argument("--busy", type=int, nargs="+", default=[0],
                    help="busy-loop processes beside the measurement; several values: one run each")
    ap.add_argument("--also", nargs="*", default=[], help="also time the MoE forced onto these dispatch paths")
    ap.add_argument("--shapes", nargs="*", default=None, help="EXPERTSxTOPK, e.g. 64x8 (default: 8x2 64x8)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    from rich.console import Console

    from moe_lm.bench import bench_layer, render_layer, tune_malloc

    if args.tune_malloc:
        tune_malloc()
    console = Console() if sys.stdout.isatty() else Console(width=140)
    results = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    for busy in args.busy:
        for experts, top_k in shapes:
            r = bench_layer(d_model=args.d_model, tokens=args.tokens, experts=experts, top_k=top_k,
                            repeats=args.repeats, warmup=args.warmup, threads=args.threads or None,
                            device=args.device, dtype=args.dtype, hf=not args.no_hf, busy=busy,
                            also_paths=tuple(args.also))
            r["tune_malloc"] = args.tune_malloc
            render_layer(r, console)
            console.print()
            results.append(r)
    if len(results) > 1:
        console.print("summary (MoE / dense FFN; transformers' paths / dense):", highlight=False)
        for r in results:
            hf = ", ".join(f"hf {k} {v:.2f}x" for k, v in r["hf_ratio"].items())
            console.print(f"  {r['experts']}x{r['top_k']} busy {r['busy']}: moe-lm ({r['dispatch']}) {r['ratio']:.2f}x"
                          + (f"; {hf}" if hf else ""), highlight=False, markup=False)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
