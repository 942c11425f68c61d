"""Training tokens/s of this checkout against the code of an earlier commit, in ONE process.

`moe-lm bench train` compares a config's MoE with its dense twin. A claim such as "both arms 1.3x
faster than the code of commit X" needs the old code on the same machine, and two processes on a
small machine differ by up to +-20 % (docs/PERFORMANCE.md), more than many levers give. So this
script loads the commit's `moe_lm/` (from `git archive`) as a second package, `moe_lm_at_<sha>`,
builds the MoE and its dense twin with each version's own model, twin and optimizer code, on the
same config file and random tokens, and alternates rounds of steps over the four models (medians
counted), so drifts of the machine hit every arm alike. On the CPU, in float32.

The step is `bench train`'s: forward, loss + balance loss + z-loss, backward, clipping at 1.0,
AdamW, zero_grad, router-bias update. What the comparison leaves out: settings a package makes
when it is imported (this checkout's `moe_lm/__init__.py` sets the OpenMP spin count before torch
loads; the process has one OpenMP, so both versions run under this checkout's choice, also when
the commit's package set none).

    python benchmarks/bench_against_commit.py 2d13d0b            # tiny-moe, 12 rounds of 5 steps
    python benchmarks/bench_against_commit.py 2d13d0b -c configs/tiny-moe.yaml --rounds 20 --json out.json
    python benchmarks/bench_against_commit.py 2d13d0b --this train.compile=true   # this code compiled

Needs git and a commit whose package imports itself by relative imports only (every commit of
this repository does) and that reads the config file (its keys existed then).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_lm  # noqa: E402,F401 - before torch: the OpenMP spin count (moe_lm/__init__.py)
import torch  # noqa: E402


# what --this may set for this checkout's arms: the step here runs on the CPU in float32 with
# clipping at 1.0, so device, dtype and grad_clip would be ignored; seed, batch and model keys
# would change what is timed
THIS_KEYS = ("train.compile", "train.lr", "train.weight_decay", "train.beta1", "train.beta2",
             "train.ffn_out_lr_scale")


def fail(msg: str) -> None:
    sys.exit(f"error: {msg}")


def import_commit(commit: str, into: Path):
    """The package moe_lm/ of `commit` (git archive of this repository), imported as
    moe_lm_at_<short sha> from `into`. -> (module, full sha)."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except OSError as exc:
        fail(f"cannot run git ({exc}): this benchmark reads the commit from {ROOT}'s history")
    except subprocess.CalledProcessError:
        fail(f"{commit!r} is not a commit of {ROOT} (git rev-parse found none): pass a hash, tag or branch")
    name = f"moe_lm_at_{sha[:10]}"
    if name in sys.modules:
        fail(f"{name} is already loaded in this process: one comparison per commit and process")
    archive = into / "moe_lm.tar"
    with archive.open("wb") as f:
        got = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", sha, "moe_lm"], stdout=f,
                             stderr=subprocess.PIPE, text=True)
    if got.returncode != 0:
        fail(f"commit {sha[:10]} has no moe_lm/ package to load (git archive: {got.stderr.strip()})")
    with tarfile.open(archive) as tar:  # our own repository's files; filter= from Python 3.11.4 on
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (into / "moe_lm").rename(into / name)
    absolute = re.compile(r"^\s*(from|import)\s+moe_lm(\.|\s|$)", re.M)
    bad = [str(p.relative_to(into)) for p in (into / name).rglob("*.py") if absolute.search(p.read_text())]
    if bad:
        fail(f"the package of {sha[:10]} imports moe_lm by name in {', '.join(bad[:3])}: it would load this "
             "checkout's code instead of its own")
    sys.path.insert(0, str(into))
    return importlib.import_module(name), sha


def find(pkg, dotted: list[str]):
    """The first of pkg.<module>.<attr> that exists (the code moved between commits)."""
    for spec in dotted:
        mod, _, attr = spec.rpartition(".")
        try:
            return getattr(importlib.import_module(f"{pkg.__name__}.{mod}"), attr)
        except (ImportError, AttributeError):
            continue
    fail(f"{pkg.__name__} has none of {', '.join(dotted)}")


def arms(pkg, config: Path, overrides: list[str]) -> dict:
    """The MoE and its dense twin, built by the package's own code: name -> (forward, model,
    optimizer); under train.compile the forward is what that version's trainer would compile
    (training.step.compile_model where it exists, else torch.compile of the whole model)."""
    load_config = find(pkg, ["config.load_config"])
    transformer = find(pkg, ["model.transformer.Transformer"])
    dense_twin = find(pkg, ["model.accounting.dense_twin"])
    build_optimizer = find(pkg, ["training.step.build_optimizer", "training.trainer.build_optimizer"])
    try:
        cfg = load_config(config, overrides)
    except Exception as exc:  # noqa: BLE001 - the old code's own error, named
        fail(f"{pkg.__name__} cannot read {config}: {exc}")
    if cfg.model.moe is None:
        fail(f"{config} has no model.moe: take an MoE config")
    compile_model = torch.compile
    if cfg.train.compile:
        try:
            compile_model = importlib.import_module(f"{pkg.__name__}.training.step").compile_model
        except (ImportError, AttributeError):
            pass
    out = {}
    for arm, c in (("moe", cfg), ("dense", dense_twin(cfg))):
        torch.manual_seed(c.train.seed)
        model = transformer(c.model)
        out[arm] = (compile_model(model) if c.train.compile else model, model,
                    build_optimizer(model, c, torch.device("cpu")))
    return out


def train_step(forward, model, opt, inp, tgt) -> None:
    """bench train's step, written against the model API every commit shares."""
    out = forward(inp, tgt)
    loss = out.loss
    for extra in (getattr(out, "aux_loss", None), getattr(out, "z_loss", None)):
        if isinstance(extra, torch.Tensor):
            loss = loss + extra
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if hasattr(model, "update_router_biases"):
        model.update_router_biases()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commit", help="the earlier code: a hash, tag or branch of this repository")
    ap.add_argument("-c", "--config", type=Path, default=ROOT / "configs" / "tiny-moe.yaml")
    ap.add_argument("--rounds", type=int, default=12, help="rounds over the four models (medians counted)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per model and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--this", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for this checkout's arms only, e.g. --this train.compile=true "
                         "(this code compiled against the commit's as it ran by default); keys: "
                         + ", ".join(THIS_KEYS))
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, for both versions")
    a = ap.parse_intermixed_args(argv)
    for flag, v, lo in (("--rounds", a.rounds, 1), ("--steps", a.steps, 1), ("--warmup", a.warmup, 0)):
        if v < lo:
            fail(f"{flag} must be >= {lo} (got {v})")
    if not a.config.is_file():
        fail(f"{a.config} is not a file: pass an MoE config with -c")
    from moe_lm.model.accounting import resolve_vocab_size
    from moe_lm.config import load_config
    from moe_lm.errors import ConfigError

    for o in a.this:
        key = o.partition("=")[0].strip()
        if key not in THIS_KEYS:
            fail(f"--this {o}: only {', '.join(THIS_KEYS)} (settings this script's step uses that leave "
                 f"the model, its initial weights and the batch alone), e.g. --this train.compile=true")
    try:  # a wrong key or value fails here, before any work
        load_config(a.config, [*a.overrides, *a.this])
        cfg = load_config(a.config, a.overrides)
    except ConfigError as exc:
        fail(str(exc))
    vocab, vocab_from = resolve_vocab_size(cfg)
    overrides = [*a.overrides, f"model.vocab_size={vocab}"]
    tmp = Path(tempfile.mkdtemp(prefix="moe-lm-commit-"))
    try:  # the commit's files stay until the end: its code may import modules lazily, mid-run
        return _measure(a, cfg, overrides, vocab, vocab_from, tmp)
    finally:  # leave the process as it was: no path to the deleted files, no half-gone package
        if str(tmp) in sys.path:
            sys.path.remove(str(tmp))
        for mod in [m for m in sys.modules if m.startswith("moe_lm_at_")]:
            del sys.modules[mod]
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(a, cfg, overrides: list[str], vocab: int, vocab_from: str, tmp: Path) -> dict:
    old, sha = import_commit(a.commit, tmp)
    models = {f"this {arm}": m for arm, m in arms(moe_lm, a.config, [*overrides, *a.this]).items()}
    models |= {f"{sha[:10]} {arm}": m for arm, m in arms(old, a.config, overrides).items()}
    bs, seq = cfg.train.batch_size // cfg.train.grad_accum, cfg.model.seq_len
    x = torch.randint(0, vocab, (bs, seq + 1), generator=torch.Generator().manual_seed(0))
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    times: dict[str, list[float]] = {k: [] for k in models}
    for fwd, model, opt in models.values():
        for _ in range(a.warmup):
            train_step(fwd, model, opt, inp, tgt)
    order, n = list(models), len(models)
    for i in range(a.rounds):
        for k in order[i % n:] + order[:i % n]:  # each arm first in turn: no arm always follows the same one
            fwd, model, opt = models[k]
            t0 = time.perf_counter()
            for _ in range(a.steps):
                train_step(fwd, model, opt, inp, tgt)
            times[k].append((time.perf_counter() - t0) / a.steps)
    tps = {k: bs * seq / statistics.median(v) for k, v in times.items()}
    old_moe, old_dense = tps[f"{sha[:10]} moe"], tps[f"{sha[:10]} dense"]
    r = {"commit": sha, "config": str(a.config), "vocab_size": vocab, "vocab_from": vocab_from,
         "threads": torch.get_num_threads(), "batch_tokens": bs * seq, "rounds": a.rounds, "steps": a.steps,
         "this_overrides": a.this,
         "tokens_per_s": tps,
         "this_over_commit": {"moe": tps["this moe"] / old_moe, "dense": tps["this dense"] / old_dense},
         "moe_over_dense": {"this": tps["this moe"] / tps["this dense"], "commit": old_moe / old_dense}}
    print(f"{a.config.name}, vocabulary {vocab:,}, {r['threads']} threads, {bs * seq:,} tokens a step, "
          f"{a.rounds} rounds x {a.steps} steps (medians)" + (f"; this checkout with {' '.join(a.this)}" if a.this else "") + ":")
    for k, v in tps.items():
        print(f"  {k:<18} {v:>9,.0f} tokens/s")
    print(f"this checkout / {sha[:10]}: MoE {r['this_over_commit']['moe']:.3f}x, dense {r['this_over_commit']['dense']:.3f}x")
    print(f"MoE / dense: this checkout {r['moe_over_dense']['this']:.3f}, {sha[:10]} {r['moe_over_dense']['commit']:.3f}")
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
