"""Every benchmark in one go (`make bench`): prepare, the MoE layer (both shapes, on a quiet
machine and beside 1 and 2 busy-loop processes), training
throughput of tiny-moe vs its dense twin, 1 vs 2 training processes, and generation with/without the KV cache. Each prints
its own table; the figures that matter are ratios measured inside one process, so a busy machine
slows both sides alike. Run on an otherwise idle machine all the same.

    python benchmarks/run_all.py                 # writes benchmarks/results/*.json
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))


def main() -> None:
    import bench_distributed
    import bench_generate
    import bench_layer
    import bench_prepare
    import bench_train

    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    steps = [
        ("prepare", lambda: bench_prepare.main(["--json", str(out / "prepare.json")])),
        ("layer", lambda: bench_layer.main(["--json", str(out / "layer.json"), "--busy", "0", "1", "2"])),
        ("train", lambda: bench_train.main(["--json", str(out / "train.json")])),
        ("distributed", lambda: bench_distributed.main(["--json", str(out / "distributed.json")])),
        ("generate", lambda: bench_generate.main([])),
    ]
    for name, fn in steps:
        print(f"\n=== bench {name} ===", flush=True)
        fn()
    print(f"\nJSON figures in {out}/")


if __name__ == "__main__":
    main()
