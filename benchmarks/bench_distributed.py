"""Training tokens/s with 1 and 2 processes (torchrun, gloo on CPU), and on one GPU when there is one.

    python benchmarks/bench_distributed.py                     # tiny-moe on data/builtin, 40 steps
    python benchmarks/bench_distributed.py --steps 60 --rounds 3 --json out.json
    python benchmarks/bench_distributed.py train.batch_size=32 # overrides as for `moe-lm train`

Each setup is a real `moe-lm train` (run folders in a temporary directory): one process, then
`torchrun --nproc_per_node=2` data parallel, then the same with the experts split over the two
processes (`model.moe.expert_parallel=true`). The global batch is the config's in every setup, so
each trains the same model on the same tokens. Throughput is taken from the run's metrics.jsonl:
training tokens over training wall-clock (evaluation, checkpoints and start-up excluded) from the
first logged step after `--warmup` to the last. Rounds alternate the setups, so drift in the
machine's speed hits all of them alike; the median round counts, and the ratios to the first
setup are of medians measured in this one run.

On CPU the processes share the machine's cores: with 2 cores, 1 process x 2 threads and
2 processes x 1 thread use the same hardware, so 2 processes can only win by overlapping work,
not by adding compute. On a single GPU only the 1-process setup is run there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def setups(threads: int, cuda: bool) -> list[dict]:
    """(label, processes, OpenMP threads per process, extra overrides)."""
    per = max(1, threads // 2)

    def n(k: int) -> str:
        return f"{k} thread" + ("s" if k > 1 else "")

    out = [
        {"label": f"1 process x {n(threads)}", "procs": 1, "threads": threads, "extra": ["train.device=cpu"]},
        {"label": f"2 processes x {n(per)}, data parallel", "procs": 2, "threads": per,
         "extra": ["train.device=cpu"]},
        {"label": f"2 processes x {n(per)}, expert parallel", "procs": 2, "threads": per,
         "extra": ["train.device=cpu", "model.moe.expert_parallel=true"]},
    ]
    if cuda:
        out.append({"label": "1 process, 1 GPU", "procs": 1, "threads": threads, "extra": ["train.device=cuda"]})
    return out


def command(s: dict, config: str, out: Path, overrides: list[str]) -> list[str]:
    train = ["-m", "moe_lm", "train", "--config", config, "--out", str(out), *overrides, *s["extra"]]
    if s["procs"] == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s['procs']}", *train]


def throughput(run_dir: Path, warmup: int) -> float:
    """Training tokens per second between the first train record after `warmup` steps and the last."""
    from moe_lm.training.metrics import read_metrics

    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    start = next((r for r in train if r["step"] >= warmup), None)
    if start is None or start is train[-1]:
        raise SystemExit(f"{run_dir}: too few logged steps after --warmup {warmup}; raise --steps")
    return (train[-1]["tokens"] - start["tokens"]) / (train[-1]["wall_s"] - start["wall_s"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-moe.yaml"))
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the throughput")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all setups (median counts)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all, per setup")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console()
    overrides = [f"train.max_steps={args.steps}", "train.log_every=5", f"train.eval_every={args.steps}",
                 f"train.checkpoint_every={args.steps}", "train.eval_batches=1", *args.overrides]
    todo = setups(args.threads, torch.cuda.is_available())
    rates: dict[str, list[float]] = {s["label"]: [] for s in todo}
    with tempfile.TemporaryDirectory(prefix="moe-lm-bench-dist-") as tmp:
        for rnd in range(args.rounds):
            for i, s in enumerate(todo):
                out = Path(tmp) / f"r{rnd}-s{i}"
                env = {**os.environ, "OMP_NUM_THREADS": str(s["threads"]), "PYTHONUNBUFFERED": "1"}
                console.print(f"round {rnd + 1}/{args.rounds}: {s['label']} ...", highlight=False)
                done = subprocess.run(command(s, args.config, out, overrides), cwd=ROOT, env=env, check=False,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                    raise SystemExit(f"{s['label']} failed (exit {done.returncode}):\n" + "\n".join(tail))
                rates[s["label"]].append(throughput(out, args.warmup))

    base = statistics.median(rates[todo[0]["label"]])
    result = {"config": args.config, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "overrides": args.overrides, "setups": []}
    table = Table(title=f"training tokens/s, {Path(args.config).name}, {args.steps} steps, median of {args.rounds}")
    for col in ("setup", "tokens/s", "per round", f"vs {todo[0]['label']}"):
        table.add_column(col, justify="left" if col == "setup" else "right")
    for s in todo:
        med = statistics.median(rates[s["label"]])
        result["setups"].append({"label": s["label"], "processes": s["procs"], "threads_per_process": s["threads"],
                                 "tokens_per_s": med, "per_round": rates[s["label"]], "ratio": med / base})
        table.add_row(s["label"], f"{med:,.0f}", " ".join(f"{r:,.0f}" for r in rates[s["label"]]), f"{med / base:.3f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
