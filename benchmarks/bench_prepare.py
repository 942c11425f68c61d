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

    from moe_lm.bench import median_prepare, render_prepare
    from moe_lm.data.prepare import bench_prepare

    r = median_prepare([bench_prepare(max_bytes=args.max_bytes, vocab_size=args.vocab_size) for _ in range(args.repeats)])
    render_prepare(r, Console() if sys.stdout.isatty() else Console(width=140))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
