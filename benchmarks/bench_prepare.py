"""Speed of `moe-lm prepare` on the built-in corpus: tokenizer training and tokenisation MB/s.

    python benchmarks/bench_prepare.py                    # the whole stdlib, vocab 8192
    python benchmarks/bench_prepare.py --max-bytes 2000000 --repeats 3 --json out.json

Each repeat prepares the corpus into a temporary folder (deleted afterwards); the median repeat
counts. Tokenisation MB/s = UTF-8 text bytes / wall time of the tokenising pass (read, encode
with `encode_batch` in ~1 MB batches, append to the shards). The library side is
`moe_lm.data.prepare.bench_prepare`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bytes", type=int, default=None, help="cap the corpus (default: all of it)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=1, help="runs; the median counts")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from moe_lm.data.prepare import bench_prepare

    runs = [bench_prepare(max_bytes=args.max_bytes, vocab_size=args.vocab_size) for _ in range(args.repeats)]
    r = dict(sorted(runs, key=lambda x: x["tokenise_mb_s"])[len(runs) // 2])  # the median run
    r["tokenise_mb_s_all"] = [x["tokenise_mb_s"] for x in runs]
    r["cpus"] = os.cpu_count()

    t = Table(title=f"moe-lm prepare, built-in corpus ({r['cpus']} CPUs, median of {len(runs)})")
    for col in ("documents", "MB", "tokens", "bytes/token", "tokenizer s", "tokenise s", "tokenise MB/s", "total s"):
        t.add_column(col, justify="right")
    t.add_row(f"{r['documents']:,}", f"{r['bytes'] / 1e6:.2f}", f"{r['tokens']:,}", f"{r['bytes_per_token']:.2f}",
              f"{r['tokenizer_s']:.1f}", f"{r['tokenise_s']:.1f}", f"{r['tokenise_mb_s']:.2f}", f"{r['total_s']:.1f}")
    (Console() if sys.stdout.isatty() else Console(width=140)).print(t)
    print(f"tokenisation throughput: {r['tokenise_mb_s']:.2f} MB/s "
          f"(all runs: {', '.join(f'{x:.2f}' for x in r['tokenise_mb_s_all'])})")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
