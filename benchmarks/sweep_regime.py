"""The sweep behind docs/RESULTS.md: where does a capacity-bound MoE beat its dense twin?

Each run is `moe-lm train` (a subprocess, so runs cannot share state) followed by
`moe-lm eval --all --json` (every validation token once). Results are appended to
`<out>/results.jsonl` (one line per run: name, overrides, steps, tokens, val loss / ppl on every
validation token, tokens/s, wall seconds); a run already in that file is skipped, so the sweep can
be stopped and restarted.

    python benchmarks/sweep_regime.py --plan lr        # learning rate per arm
    python benchmarks/sweep_regime.py --plan shape     # expert count / width / top-k / balance
    python benchmarks/sweep_regime.py --plan budget    # gap against training tokens
    python benchmarks/sweep_regime.py --plan table     # print what results.jsonl holds

`--jobs 2 --threads 1` runs two trainings side by side, one thread each: the perplexities do not
depend on it, but the tokens/s figures then are not those of a quiet 2-thread run (take speed
figures from `moe-lm bench train` or compare-dense on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The small regime: d_model 64, 2 layers, vocabulary 2,048 (data prepared with
# `moe-lm prepare --vocab-size 2048 --name builtin-2k`), batch 32 x 128 tokens.
BASE = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=128",
    "train.batch_size=32", "train.eval_every=100", "train.eval_batches=10",
    "train.checkpoint_every=100000", "train.warmup_steps=30",
]
DENSE = ["model.moe=null"]


def moe(n_experts: int, width: int, top_k: int, balance: float = 0.005) -> list[str]:
    # balance: per MoE layer, the 2 layers' losses summed (the sweep in docs/RESULTS.md ran before the
    # toolkit summed them; its "0.01 averaged over 2 layers" is 0.005 here, its 0.05 is 0.025)
    return [f"model.ffn_hidden={width}", f"model.moe.n_experts={n_experts}", f"model.moe.top_k={top_k}",
            f"model.moe.balance_coef={balance}"]


def plan(name: str, data: str) -> list[tuple[str, list[str]]]:
    d = [f"data.dir={data}"]
    runs: list[tuple[str, list[str]]] = []
    if name == "lr":
        for lr in ("3e-3", "6e-3", "1.2e-2"):
            runs.append((f"dense256-lr{lr}-s600", d + BASE + DENSE + ["model.ffn_hidden=256", f"train.lr={lr}", "train.max_steps=600"]))
            runs.append((f"moe32x64k4-lr{lr}-s600", d + BASE + moe(32, 64, 4) + [f"train.lr={lr}", "train.max_steps=600"]))
        for lr in ("1.5e-3", "3e-3", "6e-3"):
            runs.append((f"dense2048-lr{lr}-s600", d + BASE + DENSE + ["model.ffn_hidden=2048", f"train.lr={lr}", "train.max_steps=600"]))
    elif name == "next":  # the second round, ordered by what the demo's choice needs most
        lr = "6e-3"
        runs.append((f"dense256-lr{lr}-s900", d + BASE + DENSE + ["model.ffn_hidden=256", f"train.lr={lr}", "train.max_steps=900"]))
        runs.append((f"moe32x64k4-lr{lr}-s900", d + BASE + moe(32, 64, 4) + [f"train.lr={lr}", "train.max_steps=900"]))
        runs.append((f"moe32x128k2-lr{lr}-s600", d + BASE + moe(32, 128, 2) + [f"train.lr={lr}", "train.max_steps=600"]))
        runs.append(("dense2048-lr1.5e-3-s600", d + BASE + DENSE + ["model.ffn_hidden=2048", "train.lr=1.5e-3", "train.max_steps=600"]))
        runs.append((f"moe32x64k4-b0.0025-lr{lr}-s600", d + BASE + moe(32, 64, 4, 0.0025) + [f"train.lr={lr}", "train.max_steps=600"]))
        runs.append(("dense2048-lr6e-3-s600", d + BASE + DENSE + ["model.ffn_hidden=2048", "train.lr=6e-3", "train.max_steps=600"]))
    elif name == "balance":  # the demo must not trip its own collapse alarm (balance_coef 0.01 does)
        for bal in ("0.025",):
            runs.append((f"moe32x64k4-b{bal}-lr6e-3-s900", d + BASE + moe(32, 64, 4, float(bal)) + ["train.lr=6e-3", "train.max_steps=900"]))
    elif name == "shape":
        lr = os.environ.get("SWEEP_LR", "6e-3")
        for (e, w, k) in ((64, 32, 8), (64, 64, 4)):
            runs.append((f"moe{e}x{w}k{k}-lr{lr}-s600", d + BASE + moe(e, w, k) + [f"train.lr={lr}", "train.max_steps=600"]))
        for bal in (0.05,):
            runs.append((f"moe32x64k4-b{bal}-lr{lr}-s600", d + BASE + moe(32, 64, 4, bal) + [f"train.lr={lr}", "train.max_steps=600"]))
    elif name == "budget":
        lr_d = os.environ.get("SWEEP_LR_DENSE", "6e-3")
        lr_m = os.environ.get("SWEEP_LR_MOE", "6e-3")
        shape = [int(v) for v in os.environ.get("SWEEP_SHAPE", "32,64,4").split(",")]
        for steps in (300, 900):
            runs.append((f"dense256-lr{lr_d}-s{steps}", d + BASE + DENSE + ["model.ffn_hidden=256", f"train.lr={lr_d}", f"train.max_steps={steps}"]))
            runs.append((f"moe{shape[0]}x{shape[1]}k{shape[2]}-lr{lr_m}-s{steps}", d + BASE + moe(*shape) + [f"train.lr={lr_m}", f"train.max_steps={steps}"]))
    else:
        raise SystemExit(f"unknown plan {name!r}")
    return runs


def run_one(name: str, overrides: list[str], out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MOE_LM_THREADS=str(threads))
    run_dir = out / "runs" / name
    exe = [sys.executable, "-m", "moe_lm"]
    t0 = time.time()
    subprocess.run(exe + ["train", "-c", str(ROOT / "configs/tiny-moe.yaml"), "--out", str(run_dir), "--overwrite",
                          f"name={name}"] + overrides, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    ev = subprocess.run(exe + ["eval", str(run_dir), "--all", "--json"], check=True, env=env,
                        capture_output=True, text=True)
    report = json.loads(ev.stdout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    tps = [r["tokens_per_s"] for r in train_rows if "tokens_per_s" in r]
    tps.sort()
    return {"name": name, "overrides": overrides, "val_loss": report.get("loss"), "val_ppl": report.get("ppl"),
            "n_tokens": report.get("n_tokens"), "tokens_per_s_median": tps[len(tps) // 2] if tps else None,
            "wall_s": wall, "threads": threads,
            "curve": [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval" and "val_loss" in r]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--data", default="data/builtin-2k")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/sweep")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res = a.out / "results.jsonl"
    done = {json.loads(line)["name"] for line in res.read_text().splitlines()} if res.exists() else set()
    if a.plan == "table":
        for line in res.read_text().splitlines():
            r = json.loads(line)
            print(f"{r['name']:36s} ppl {r['val_ppl']:8.3f}  loss {r['val_loss']:.4f}  tok/s {r['tokens_per_s_median'] or 0:8.0f}  wall {r['wall_s']:6.0f}s")
        return
    todo = [(n, o) for n, o in plan(a.plan, a.data) if n not in done]

    def job(item):
        n, o = item
        r = run_one(n, o, a.out, a.threads)
        with res.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{n}: val ppl {r['val_ppl']:.3f} ({r['wall_s']:.0f} s)", flush=True)

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(job, todo))


if __name__ == "__main__":
    main()
