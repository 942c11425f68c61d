"""One command for a CUDA machine (`make gpu-check`): the CUDA tests, the MoE layer in bf16 against
transformers' grouped_mm, training throughput of configs/small-moe.yaml and where its step's
time goes (benchmarks/profile_train.py: kernel launches, host syncs), a 2-process torchrun
(NCCL) when two GPUs exist, and a short compare-dense on the built-in corpus at a GPU-sized
config. Writes one JSON and prints a table; each step has a time budget (killed past it, recorded
as "timeout"), all together within 8 minutes on one H200.

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run       # anywhere: the exact commands, then exit 0
    python benchmarks/gpu_check.py --out DIR       # results in DIR (default benchmarks/results/gpu-check)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480  # 8 minutes: the sum of the step budgets below stays under it


@dataclass
class Step:
    name: str
    cmd: list[str]
    budget_s: int
    result_file: str | None = None  # a JSON the step writes (its figures)
    needs_gpus: int = 1
    env: dict = field(default_factory=dict)


def plan(out: Path, n_gpus: int | None) -> list[Step]:
    """The steps, in order. n_gpus None (dry run on a machine without CUDA): list every step."""
    py = sys.executable
    data = out / "data"
    # GPU-sized but short: small-moe's shape (d_model 512, 8 layers, 16 experts top-2) at seq_len 256
    short = [f"data.dir={data}", "model.seq_len=256", "train.max_steps=300", "train.warmup_steps=30",
             "train.eval_every=100", "train.eval_batches=10", "train.checkpoint_every=100000", "train.log_every=50"]
    steps = [
        Step("tests on CUDA (pytest -m cuda)",
             [py, "-m", "pytest", "-m", "cuda", "tests", "-q", "-p", "no:cacheprovider", "-rs"], 70),
        Step("bench layer bf16 (8x2, 64x8) vs transformers",
             [py, "benchmarks/bench_layer.py", "--device", "cuda", "--dtype", "bfloat16", "--threads", "0",
              "--repeats", "20", "--warmup", "3", "--also", "fused", "padded", "--json", str(out / "layer.json")],
             70, "layer.json"),
        Step("bench train configs/small-moe.yaml",
             [py, "benchmarks/bench_train.py", "--config", "configs/small-moe.yaml", "--device", "cuda",
              "--json", str(out / "train.json")], 60, "train.json"),
        Step("bench train configs/tiny-moe.yaml (the demo's shape)",
             [py, "benchmarks/bench_train.py", "--config", "configs/tiny-moe.yaml", "--device", "cuda",
              "--json", str(out / "train_demo.json")], 30, "train_demo.json"),
        Step("profile a small-moe training step (launches, host syncs)",
             [py, "benchmarks/profile_train.py", "--config", "configs/small-moe.yaml", "--device", "cuda",
              "--top", "10", "--json", str(out / "profile.json")], 30, "profile.json"),
        Step("prepare the built-in corpus",
             [py, "-m", "moe_lm", "prepare", "--out", str(data), "--overwrite"], 40),
        Step("torchrun 2 processes (NCCL), small-moe 30 steps",
             [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moe_lm", "train", "--config",
              "configs/small-moe.yaml", "--out", str(out / "runs" / "torchrun"), "--overwrite",
              f"data.dir={data}", "model.seq_len=256", "train.max_steps=30", "train.warmup_steps=5",
              "train.eval_every=30", "train.eval_batches=4", "train.checkpoint_every=100000", "train.log_every=10"],
             60, needs_gpus=2),
        Step("compare-dense, small-moe shape, 300 steps, 1 seed",
             [py, "-m", "moe_lm", "compare-dense", "--config", "configs/small-moe.yaml", "--seeds", "1",
              "--out", str(out / "compare"), "--overwrite", "--device", "cuda", *short],
             120, "compare/report.json"),
    ]
    assert sum(s.budget_s for s in steps) <= TOTAL_BUDGET_S
    if n_gpus is not None:
        steps = [s for s in steps if s.needs_gpus <= n_gpus]
    return steps


def run_step(step: Step, out: Path) -> dict:
    t0 = time.perf_counter()
    rec: dict = {"name": step.name, "cmd": shlex.join(step.cmd), "budget_s": step.budget_s}
    try:
        p = subprocess.run(step.cmd, cwd=ROOT, capture_output=True, text=True, timeout=step.budget_s,
                           env={**os.environ, **step.env})
        rec["rc"] = p.returncode
        rec["status"] = "ok" if p.returncode == 0 else "failed"
        text = p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:  # subprocess.run kills the child
        rec["rc"], rec["status"] = None, "timeout"
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    except FileNotFoundError as exc:
        rec["rc"], rec["status"], text = None, "failed", str(exc)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["output_tail"] = text[-3000:]
    if step.result_file and (out / step.result_file).is_file():
        try:
            rec["result"] = json.loads((out / step.result_file).read_text())
        except json.JSONDecodeError:
            pass
    return rec


def figures(rec: dict) -> str:
    """The step's key figures, one line."""
    r = rec.get("result")
    tail = rec.get("output_tail", "")
    if rec["name"].startswith("tests"):
        last = [ln for ln in tail.splitlines() if " passed" in ln or " failed" in ln or " skipped" in ln]
        return last[-1].strip("= ") if last else ""
    if r is None:
        return ""
    if isinstance(r, list) and r and "kernel_launches" in r[0]:  # profile_train: one dict per model
        return "; ".join(f"{x['name']} {x['wall_ms']:.0f} ms/step (host {x['host_busy_ms']:.0f}, GPU {x['device_busy_ms']:.0f}), "
                         f"{x['kernel_launches']:.0f} launches, {sum(v for k, v in x['syncs'].items() if k.startswith('cuda')):.0f} blocking CUDA calls" for x in r)
    if isinstance(r, list):  # bench layer: one dict per shape
        parts = []
        for x in r:
            hf = x["hf_ratio"].get("grouped_mm")
            parts.append(f"{x['experts']}x{x['top_k']}: {x['ratio']:.2f}x dense ({x['dispatch']})"
                         + (f", hf grouped_mm {hf:.2f}x" if hf is not None else ""))
        return "; ".join(parts)
    if "models" in r:  # bench train
        return "; ".join(f"{n} {m['tokens_per_s']:,.0f} tok/s MFU {m['mfu']:.1%}" for n, m in r["models"].items())
    if "variants" in r:  # compare-dense
        v = r["variants"]
        return f"ppl MoE {v['moe']['val_ppl_mean']:.2f} vs dense {v['dense']['val_ppl_mean']:.2f}"
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the commands it would run, then exit 0")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu-check")
    args = ap.parse_args(argv)

    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.dry_run:
        steps = plan(args.out, n_gpus if n_gpus else None)
        print(f"gpu-check would run {len(steps)} steps (cwd {ROOT}; {n_gpus} CUDA device(s) here), "
              f"at most {sum(s.budget_s for s in steps)} s in all:")
        for i, s in enumerate(steps, 1):
            when = " (only with 2 or more GPUs)" if s.needs_gpus > 1 else ""
            print(f"{i}. {s.name} [budget {s.budget_s} s]{when}\n   {shlex.join(s.cmd)}")
        print(f"results: {args.out / 'gpu_check.json'}")
        return 0
    if n_gpus == 0:
        print("gpu-check: torch sees no CUDA device, nothing to check here "
              "(python benchmarks/gpu_check.py --dry-run shows the plan)", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.table import Table

    args.out.mkdir(parents=True, exist_ok=True)
    steps = plan(args.out, n_gpus)
    report = {"gpu": torch.cuda.get_device_name(0), "gpus": n_gpus, "torch": torch.__version__,
              "cuda": torch.version.cuda, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": []}
    t0 = time.perf_counter()
    for s in steps:
        print(f"--- {s.name} (budget {s.budget_s} s): {shlex.join(s.cmd)}", flush=True)
        rec = run_step(s, args.out)
        print(f"    {rec['status']} in {rec['seconds']} s", flush=True)
        report["steps"].append(rec)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))  # partial results survive
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if n_gpus < 2:
        report["skipped"] = ["torchrun 2 processes (NCCL): one GPU only"]
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    console = Console() if sys.stdout.isatty() else Console(width=160)
    t = Table(title=f"gpu-check: {report['gpu']} x{n_gpus}, torch {report['torch']} (CUDA {report['cuda']}), "
                    f"{report['wall_s']} s", title_justify="left")
    for col in ("step", "status", "s", "figures"):
        t.add_column(col, justify="right" if col == "s" else "left")
    for rec in report["steps"]:
        t.add_row(rec["name"], rec["status"], f"{rec['seconds']:.0f}", figures(rec))
    console.print(t)
    for why in report.get("skipped", []):
        console.print(f"skipped: {why}", highlight=False)
    console.print(f"JSON: {args.out / 'gpu_check.json'}", highlight=False)
    return 0 if all(r["status"] == "ok" for r in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
