"""`moe-lm compare-dense`'s library side: the MoE against its dense twin at equal compute.

    report = compare_dense(cfg, seeds=3)      # -> runs/compare-<name>/report.md, report.json, PNGs

The fair-comparison rules (docs/ARCHITECTURE.md, "Fair comparison"): the twin is
`accounting.dense_twin(cfg)` - the same config but each MoE FFN replaced by one dense FFN of the
active expert width, so it does the same FLOPs per token minus the router's; the same activation,
init, seeds, data order (the batch stream is a function of train.seed), tokens and schedule.
Optionally a dense model with as many *total* parameters (an upper reference) and a small
learning-rate sweep in which every variant keeps its own best rate.

Every run lives in `<out>/runs/<variant>-seed<S>/` and is an ordinary training run: a finished
run is reused, an interrupted one resumes from its checkpoint, so the command can be stopped and
started again; a run of another train.max_steps (longer, or under another schedule) is refused,
never extended or reused (`runs.FoundRun.length_problem`). The final figure per run is the perplexity over *every* validation token
(`evaluation.evaluate_model`, non-overlapping windows), not the trainer's small sample.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import checks
from .config import LIMITS, SEED_MAX, Config, config_differences
from .errors import ConfigError, RunError
from .files import write_atomic

VARIANT_LABELS = {"moe": "MoE", "dense": "dense twin (equal active FLOPs)", "dense-total": "dense, equal total params"}


@dataclass
class RunSummary:
    variant: str
    seed: int
    lr: float
    run_dir: str
    val_loss: float  # over every validation token
    val_ppl: float
    val_tokens: int
    tokens: int  # training tokens
    flops: float  # training FLOPs (router included for the MoE)
    wall_s: float  # training wall-clock seconds, as the trainer counts them (its metrics.jsonl wall_s):
    # the optimizer steps alone - evaluations, checkpoints, logging and start-up excluded
    tokens_per_s: float
    curve: list[dict] = field(default_factory=list)  # the trainer's evaluations: step, flops, wall_s, val_loss
    reused: bool = False


MAX_SEEDS = 1000


def check_options(cfg: Config, *, seeds: int, lr_sweep: Optional[list[float]], out_dir: Optional[Path],
                  device: str, reuse_moe: Optional[Path]) -> None:
    """Every option of compare-dense, before anything is trained (a bad --device must not wait for
    the first run to finish)."""
    checks.option_number("--seeds", seeds, 1, MAX_SEEDS, integer=True, hint="use --seeds 3 to see the spread")
    checks.number("train.seed", cfg.train.seed, 0, SEED_MAX - (seeds - 1), integer=True,
                  hint=f"--seeds {seeds} uses train.seed .. train.seed + {seeds - 1}, which must stay ≤ 2^63 - 1")
    lim = LIMITS["train.lr"]
    for lr in lr_sweep or []:
        checks.option_number("--lr-sweep", lr, lim.lo, lim.hi, lo_open=lim.lo_open, hint="e.g. --lr-sweep 1e-3,3e-3,6e-3")
    names = [f"{lr:g}" for lr in lr_sweep or []]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # one run folder (sweep/<variant>-lr<rate>, the rate to 6 digits) for two rates
        raise ConfigError(f"--lr-sweep lists {', '.join(twice)} more than once (to 6 significant digits)",
                          "list each rate once")
    checks.device("--device", device)
    checks.out_folder("--out", out_dir)
    if reuse_moe is not None:
        from .training.runs import check_reusable

        check_reusable(Path(reuse_moe))


def parse_lr_sweep(text: str) -> list[float]:
    """'1e-3,3e-3' -> [0.001, 0.003]; ConfigError for an empty entry or one that is not a number
    (check_options then checks each rate's range and that no two share a run folder)."""
    items = [v.strip() for v in text.split(",")]
    if items and not items[-1]:
        items.pop()  # a trailing comma
    if not any(items):
        raise ConfigError(f"--lr-sweep {text!r} holds no learning rate", "e.g. --lr-sweep 1e-3,3e-3,6e-3")
    if not all(items):
        raise ConfigError(f"--lr-sweep {text!r} has an empty entry", "e.g. --lr-sweep 1e-3,3e-3,6e-3")
    try:
        lrs = [float(v) for v in items]
    except ValueError:
        raise ConfigError(f"--lr-sweep {text!r} is not a comma-separated list of numbers",
                          "e.g. --lr-sweep 1e-3,3e-3,6e-3") from None
    return lrs  # each checked, and checked against the others, by check_options


def variant_configs(cfg: Config, with_dense_total: bool = False) -> dict[str, Config]:
    """{"moe": cfg, "dense": its twin, ["dense-total": equal total parameters]}."""
    from .model.accounting import dense_total, dense_twin

    if cfg.model.moe is None:
        raise ConfigError(f"compare-dense needs an MoE config, but {cfg.name} has model.moe: null",
                          "pass an MoE config such as configs/tiny-moe.yaml")
    out = {"moe": cfg, "dense": dense_twin(cfg)}
    if with_dense_total:
        out["dense-total"] = dense_total(cfg)
    return out


def _sweep_dir(out: Path, variant: str, lr: float) -> Path:
    return out / "sweep" / f"{variant}-lr{lr:g}"


def _seed_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / f"{variant}-seed{seed}"


def _run_config(base: Config, name: str, variant: str, seed: int, lr: float) -> Config:
    c = copy.deepcopy(base)
    c.train.seed = seed
    c.train.lr = lr
    c.name = f"{name}-{variant}-seed{seed}"
    return c


def _existing_run(cfg: Config, run_dir: Path):
    """The run of cfg already in run_dir (runs.FoundRun), or None. RunError when it is of another
    config or another length: reused or resumed, it would not be a run of exactly train.max_steps
    under one schedule, and the arms' FLOPs would differ; CheckpointError when it is damaged."""
    from .training.runs import OTHER_CONFIG_FIX, find_run

    found = find_run(run_dir, cfg, asked_by="compare-dense")
    problem = found.length_problem(cfg.train.max_steps) if found is not None else None
    if problem is not None:
        raise RunError(f"{run_dir} holds a run of another length: {problem}", OTHER_CONFIG_FIX["compare-dense"])
    return found


def _train_or_reuse(cfg: Config, run_dir: Path, console, overwrite: bool) -> bool:
    """Train cfg into run_dir, resuming a partial run; True when a finished run was reused.
    overwrite: train again from scratch whatever run_dir holds."""
    from .training.trainer import train

    found = None if overwrite else _existing_run(cfg, run_dir)
    if found is None:
        train(cfg, out_dir=run_dir, overwrite=run_dir.exists(), console=console, plots=False)
        return False
    if found.finished:
        return True
    train(cfg, out_dir=run_dir, resume=str(found.checkpoint), console=console, plots=False)
    return False


def _adopt_run(src: Path, cfg: Config, run_dir: Path, option: str = "--reuse-moe") -> None:
    """Copy a finished run of cfg into run_dir, in place of what run_dir holds: --reuse-moe's
    `moe-lm train` run, or the sweep's run as the first seed. src is checked first
    (runs.finished_run; `option` names it in the message), so a refusal deletes nothing."""
    from .training.runs import finished_run

    finished_run(src, cfg, option=option)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_dir.with_name(run_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("eval.json", "plots"))
    tmp.rename(run_dir)


def _check_reuse_moe(src: Path, moe_cfg: Config, cfg: Config, lr_sweep: Optional[list[float]]) -> float:
    """Before anything trains: --reuse-moe's run must be a finished run of the MoE's first seed at
    the config's train.lr, or under --lr-sweep at one of the swept rates (the sweep then takes it
    as its run at that rate). Returns the rate. A run at none of the swept rates is refused as
    such; any other difference (length, model...) by runs.finished_run's own message."""
    from .training.runs import finished_run, run_lr

    rate = cfg.train.lr
    if lr_sweep:  # (check_options has made sure src holds a checkpoint)
        own = run_lr(src)
        rate = next((lr for lr in lr_sweep if own is not None and math.isclose(lr, own, rel_tol=1e-12)), None)
        if rate is None:
            raise RunError(f"--reuse-moe {src} was trained at train.lr {own:g}, none of the --lr-sweep rates "
                           f"({', '.join(f'{lr:g}' for lr in lr_sweep)})" if own is not None else
                           f"--reuse-moe {src}: its train.lr cannot be read from its checkpoint",
                           "add the run's train.lr to --lr-sweep, or drop --reuse-moe")
    finished_run(src, _run_config(moe_cfg, cfg.name, "moe", cfg.train.seed, rate))
    return rate


def _final_eval(run_dir: Path, device: str, data_dir: Path) -> dict:
    """Perplexity over every validation token of the run's last checkpoint on `data_dir` (the run
    config's data.dir), cached in eval.json. The cache counts only for the same checkpoint, every
    window of the val split and the same data (evaluation.data_fingerprint: meta.json's checksum):
    an `eval --data OTHER`, or the data folder prepared again, is evaluated anew."""
    from .evaluation import data_fingerprint, run_eval
    from .training import checkpoint as ckpt_io

    latest = ckpt_io.find_latest(run_dir)
    cached = run_dir / "eval.json"
    if cached.is_file() and latest is not None:
        try:
            prev = json.loads(cached.read_text(encoding="utf-8"))
            if (prev.get("checkpoint") == str(latest) and prev.get("windows") == "all" and prev.get("split") == "val"
                    and prev.get("data_fingerprint") is not None
                    and prev["data_fingerprint"] == data_fingerprint(data_dir)):
                return prev
        except (OSError, json.JSONDecodeError):
            pass
    report, _ = run_eval(run_dir, split="val", n_batches=None, data_dir=data_dir, device=device, write=True)
    return report.to_json()


def _summarise(variant: str, cfg: Config, run_dir: Path, ev: dict, reused: bool) -> RunSummary:
    from .training.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    last = trains[-1] if trains else {}
    wall = float(last.get("wall_s", 0.0))
    tokens = int(last.get("tokens", 0))
    # tokens/s of the training steps alone, as the trainer's windows measured it
    rates = [r["tokens_per_s"] for r in trains if r.get("tokens_per_s")]
    return RunSummary(
        variant=variant, seed=cfg.train.seed, lr=cfg.train.lr, run_dir=str(run_dir), val_loss=ev["loss"],
        val_ppl=ev["ppl"], val_tokens=ev["n_tokens"], tokens=tokens, flops=float(last.get("flops", 0.0)),
        wall_s=wall, tokens_per_s=statistics.median(rates) if rates else (tokens / wall if wall else 0.0),
        curve=[{"step": r["step"], "flops": r["flops"], "wall_s": r["wall_s"], "val_loss": r["val_loss"]} for r in evals],
        reused=reused,
    )


def compare_dense(cfg: Config, *, seeds: int = 3, with_dense_total: bool = False, out_dir: Optional[Path] = None,
                  lr_sweep: Optional[str | list[float]] = None, overwrite: bool = False, device: str = "auto",
                  console: Any = None, reuse_moe: Optional[Path] = None) -> dict:
    """Train the MoE, its dense twin (and optionally the equal-total-parameter dense model) over
    `seeds` seeds; write report.json, report.md and the PNGs into `out_dir`; return the report.

    lr_sweep: learning rates, as a list or as --lr-sweep's text ("1e-3,3e-3"); every option is
    checked before anything is trained (ConfigError, RunError)."""
    from rich.console import Console

    from .data.shards import open_for_config
    from .model.accounting import flops_per_token, param_counts

    console = console if console is not None else Console()
    if isinstance(lr_sweep, str):
        lr_sweep = parse_lr_sweep(lr_sweep)
    check_options(cfg, seeds=seeds, lr_sweep=lr_sweep, out_dir=out_dir, device=device, reuse_moe=reuse_moe)
    cfg = copy.deepcopy(cfg)
    if cfg.model.moe is None:  # refuse a dense config before touching the data
        variant_configs(cfg)
    cfg.model.vocab_size = int(open_for_config(cfg).vocab_size)  # fails early on missing or unfit data
    variants = variant_configs(cfg, with_dense_total)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"compare-{cfg.name}"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 0. the runs already there, before anything trains: of this config and length, or refused -----
    seed_list = [cfg.train.seed + i for i in range(seeds)]
    reuse_rate = _check_reuse_moe(Path(reuse_moe), variants["moe"], cfg, lr_sweep) if reuse_moe is not None else None
    if not overwrite:
        planned = [(_run_config(vcfg, cfg.name, v, cfg.train.seed, lr), _sweep_dir(out, v, lr))
                   for v, vcfg in variants.items() for lr in (lr_sweep or [])]
        if not lr_sweep:
            planned += [(_run_config(vcfg, cfg.name, v, s, cfg.train.lr), _seed_dir(out, v, s))
                        for s in seed_list for v, vcfg in variants.items()]
        for rc, run_dir in planned:
            _existing_run(rc, run_dir)

    # 1. learning rate per variant: the config's, or each variant's best of a small sweep ----------
    lrs = {v: cfg.train.lr for v in variants}
    sweep: dict[str, dict[str, float]] = {}
    if lr_sweep:
        for v, vcfg in variants.items():
            sweep[v] = {}
            for lr in lr_sweep:
                rc = _run_config(vcfg, cfg.name, v, cfg.train.seed, lr)
                run_dir = _sweep_dir(out, v, lr)
                console.rule(f"lr sweep: {VARIANT_LABELS[v]}, lr {lr:g}")
                adopt = v == "moe" and lr == reuse_rate  # --reuse-moe's run is the sweep's at its rate
                if adopt and (overwrite or not run_dir.exists()):
                    _adopt_run(Path(reuse_moe), rc, run_dir)
                    console.print(f"{VARIANT_LABELS[v]}, lr {lr:g}: the run {reuse_moe} (copied to {run_dir})",
                                  highlight=False)
                _train_or_reuse(rc, run_dir, console, overwrite and not adopt)
                sweep[v][f"{lr:g}"] = _final_eval(run_dir, device, Path(rc.data.dir))["loss"]
            lrs[v] = min(lr_sweep, key=lambda lr: sweep[v][f"{lr:g}"])  # the rate itself, not its 6 digits

    # 2. the seeds, paired: seed s of every variant before seed s + 1 --------------------------------
    runs: list[RunSummary] = []
    for s in seed_list:
        for v, vcfg in variants.items():
            rc = _run_config(vcfg, cfg.name, v, s, lrs[v])
            run_dir = _seed_dir(out, v, s)
            console.rule(f"{VARIANT_LABELS[v]}, seed {s} ({seed_list.index(s) + 1}/{len(seed_list)})")
            # seed 0 is a run already made: --reuse-moe's, or the sweep's at the rate it chose (the
            # same config, seed and rate: training it again would give the same weights)
            src = None
            if s == cfg.train.seed and lr_sweep:
                src = _sweep_dir(out, v, lrs[v])
            elif s == cfg.train.seed and reuse_moe is not None and v == "moe":
                src = Path(reuse_moe)
            adopt = src is not None
            if adopt and (overwrite or not run_dir.exists()):
                _adopt_run(src, rc, run_dir, option="--reuse-moe" if not lr_sweep else "the sweep's run")
                what = f"the sweep's run at lr {lrs[v]:g}" if lr_sweep else f"the run {src}"
                console.print(f"{VARIANT_LABELS[v]}, seed {s}: {what} (copied to {run_dir})", highlight=False)
            reused = _train_or_reuse(rc, run_dir, console, overwrite and not adopt)
            if reused:
                console.print(f"reusing the finished run {run_dir}", highlight=False)
            ev = _final_eval(run_dir, device, Path(rc.data.dir))
            runs.append(_summarise(v, rc, run_dir, ev, reused))

    # 3. the report --------------------------------------------------------------------------------
    report = {
        "name": cfg.name,
        "seeds": seed_list,
        "variants": {},
        "lr_sweep": sweep or None,
        "twin_differs_in": config_differences(cfg, variants["dense"]),
        "runs": [r.__dict__ for r in runs],
        "compare_wall_s": round(time.perf_counter() - t_start, 1),
    }
    for v, vcfg in variants.items():
        rs = [r for r in runs if r.variant == v]
        ppl = [r.val_ppl for r in rs]
        pc, fl = param_counts(vcfg.model), flops_per_token(vcfg.model)
        report["variants"][v] = {
            "label": VARIANT_LABELS[v], "ffn_hidden": vcfg.model.ffn_hidden, "lr": lrs[v],
            "ffn_out_lr_scale": vcfg.train.ffn_out_lr_scale,
            "params_total": pc["total"], "params_active": pc["active"],
            "flops_per_token": fl["total"], "router_flops_per_token": fl["router"],
            "train_tokens": rs[0].tokens, "train_flops": statistics.mean(r.flops for r in rs),
            "tokens_per_s": statistics.median(r.tokens_per_s for r in rs),  # of the runs' own medians
            "wall_s": statistics.mean(r.wall_s for r in rs),
            "val_ppl": ppl, "val_ppl_mean": statistics.mean(ppl),
            "val_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "val_loss_mean": statistics.mean(r.val_loss for r in rs), "val_tokens": rs[0].val_tokens,
        }
    report["verdict"], report["moe_vs_dense_pct"], report["clear_win"] = verdict(
        report["variants"]["moe"]["val_ppl"], report["variants"]["dense"]["val_ppl"])
    moe_runs = [r for r in runs if r.variant == "moe"]
    dense_runs = [r for r in runs if r.variant == "dense"]
    report["paired"] = paired_stats([r.val_loss for r in moe_runs], [r.val_loss for r in dense_runs])
    report["gap_vs_tokens"] = gap_vs_tokens([r.curve for r in moe_runs], [r.curve for r in dense_runs],
                                            tokens_per_step=cfg.train.batch_size * cfg.model.seq_len)
    report["equal_wall_clock"] = equal_wall_clock([r.curve for r in moe_runs], [r.curve for r in dense_runs])
    files = write_report(report, out)
    report["files"] = {k: str(p) for k, p in files.items()}
    return report


MIN_SEEDS_FOR_A_WIN = 3


def verdict(moe_ppl: list[float], dense_ppl: list[float]) -> tuple[str, float, bool]:
    """The plain-words verdict, the relative difference in % (negative = MoE lower), and whether
    it is a clear win (every MoE seed below every dense seed, with at least MIN_SEEDS_FOR_A_WIN
    seeds each).

    With no real difference every ordering of the 2n final perplexities is equally likely, so "every
    seed of one model below every seed of the other" happens by chance 1 time in C(2n, n) for
    either side: 1 in 6 with 2 seeds, 1 in 20 with 3. Below 3 seeds no side is declared the winner."""
    import math

    m, d = statistics.mean(moe_ppl), statistics.mean(dense_ppl)
    pct = 100.0 * (m - d) / d
    # "A is x% lower than B" is measured against B, the higher one: (d - m) / d when the MoE is
    # lower (= -pct), (m - d) / m when the twin is (not pct, which is against the twin)
    below = 100.0 * abs(m - d) / max(m, d, 1e-30)
    n = min(len(moe_ppl), len(dense_ppl))
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    lower, higher = ("MoE", "its dense twin") if pct < 0 else ("the dense twin", "the MoE")
    if n == 1 and moe_ppl != dense_ppl:
        return (f"{lower} is {below:.1f}% lower in perplexity than {higher} at equal training FLOPs (1 seed: "
                f"no spread to compare with; run --seeds {MIN_SEEDS_FOR_A_WIN})"), pct, False
    separated = max(moe_ppl) < min(dense_ppl) or min(moe_ppl) > max(dense_ppl)
    if separated and n < MIN_SEEDS_FOR_A_WIN:
        first, second = ("MoE", "dense") if pct < 0 else ("dense", "MoE")
        chance = math.comb(len(moe_ppl) + len(dense_ppl), len(moe_ppl))
        return (f"{lower} is {below:.1f}% lower in perplexity than {higher} at equal training FLOPs ({seeds}: "
                f"every {first} seed below every {second} seed, which happens by chance 1 time in {chance} with "
                f"{seeds} even when the models do not differ - too few seeds for a verdict; run --seeds "
                f"{MIN_SEEDS_FOR_A_WIN} or more)"), pct, False
    if max(moe_ppl) < min(dense_ppl):
        return (f"MoE is {below:.1f}% lower in perplexity at equal training FLOPs ({seeds}; every MoE seed below "
                f"every dense seed)"), pct, True
    if min(moe_ppl) > max(dense_ppl):
        return (f"the dense twin is {below:.1f}% lower in perplexity than the MoE at equal training FLOPs ({seeds}; "
                f"every dense seed below every MoE seed): at this budget the MoE does not pay"), pct, False
    return (f"the difference ({pct:+.1f}% MoE vs dense) is within the spread over {seeds}: the seeds overlap, so "
            f"this budget shows no clear winner"), pct, False


def paired_stats(moe_loss: list[float], dense_loss: list[float]) -> dict:
    """The paired view of a comparison over seeds: seed s of the MoE and seed s of the twin share
    their data order and initial draws, so the per-seed differences cancel most seed noise.

    Inputs: final validation losses (nats/token), index i = the i-th seed of each variant.
    Returns per pair `d_loss` = moe - dense (nats) and `d_ppl_pct` = 100 (exp(moe) - exp(dense)) /
    exp(dense); their mean and sample standard deviation (0 for one pair); `moe_better`, the
    number of pairs in which the MoE is lower; and `sign_test_p`, the exact two-sided sign-test
    p-value of that count under "no difference" (Binomial(n, 1/2): with 3 pairs all of one sign,
    p = 2 / 2^3 = 0.25, the best 3 seeds can give; 5 pairs give 0.0625).
    """
    import math

    if len(moe_loss) != len(dense_loss) or not moe_loss:
        raise ValueError("paired_stats needs as many MoE as dense losses, at least one")
    d_loss = [m - d for m, d in zip(moe_loss, dense_loss)]
    d_pct = [100.0 * (math.exp(m) - math.exp(d)) / math.exp(d) for m, d in zip(moe_loss, dense_loss)]
    n, k = len(d_loss), sum(1 for x in d_loss if x < 0)
    tail = min(k, n - k)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(tail + 1)) / 2 ** n)

    def sd(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    return {"d_loss": d_loss, "d_ppl_pct": d_pct, "d_loss_mean": statistics.mean(d_loss), "d_loss_std": sd(d_loss),
            "d_ppl_pct_mean": statistics.mean(d_pct), "d_ppl_pct_std": sd(d_pct), "pairs": n, "moe_better": k,
            "sign_test_p": p}


def gap_vs_tokens(moe_curves: list[list[dict]], dense_curves: list[list[dict]], tokens_per_step: int) -> dict:
    """MoE - dense validation loss over training, paired by seed, at every step both evaluated.

    Each curve is the trainer's evaluations of one run (`step`, `val_loss`: nats/token on the
    trainer's fixed validation sample). Returns {"tokens": [...], "mean": [...], "min": [...],
    "max": [...], "per_seed": [[...], ...]} over the steps > 0 that every pair shares; negative =
    the MoE ahead. The band of gap_vs_tokens.png is min..max over seeds.
    """
    pairs = []
    for mc, dc in zip(moe_curves, dense_curves):
        d = {c["step"]: c["val_loss"] for c in dc}
        pairs.append({c["step"]: c["val_loss"] - d[c["step"]] for c in mc if c["step"] in d and c["step"] > 0})
    steps = sorted(set.intersection(*(set(p) for p in pairs))) if pairs else []
    per_seed = [[p[s] for s in steps] for p in pairs]
    cols = list(zip(*per_seed)) if per_seed else []
    return {"tokens": [s * tokens_per_step for s in steps], "steps": steps,
            "mean": [statistics.mean(c) for c in cols], "min": [min(c) for c in cols], "max": [max(c) for c in cols],
            "per_seed": per_seed}


def equal_wall_clock(moe_curves: list[list[dict]], dense_curves: list[list[dict]]) -> dict:
    """The comparison at equal training time instead of equal FLOPs, paired by seed.

    For each pair, T = the dense run's last evaluation's `wall_s` (training seconds); the MoE's
    validation loss at T is interpolated linearly between its two evaluations around T (the
    trainer's validation sample, so both sides are read off the same kind of curve). When the MoE
    finished before T (it was faster), its last value is used and `moe_finished_first` says so.
    Returns per pair `dense_wall_s`, `moe_loss_at_T`, `dense_loss`, `d_loss` (moe - dense, nats),
    and their mean; `ahead`: "MoE", "dense" or "tie" by the sign of the mean and of every pair.
    """
    import math

    rows = []
    for mc, dc in zip(moe_curves, dense_curves):
        if not mc or not dc:
            continue
        t_end, dense_loss = dc[-1]["wall_s"], dc[-1]["val_loss"]
        pts = sorted((c["wall_s"], c["val_loss"]) for c in mc)
        first = pts[-1][0] <= t_end
        if first:
            at = pts[-1][1]
        else:
            at = pts[0][1]
            for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
                if t0 <= t_end <= t1:
                    at = l0 + (l1 - l0) * ((t_end - t0) / (t1 - t0) if t1 > t0 else 1.0)
                    break
        rows.append({"dense_wall_s": t_end, "moe_loss_at_T": at, "dense_loss": dense_loss, "d_loss": at - dense_loss,
                     "moe_finished_first": first})
    if not rows:
        return {"pairs": [], "d_loss_mean": None, "ahead": "unknown"}
    diffs = [r["d_loss"] for r in rows]
    mean = statistics.mean(diffs)
    if all(x < 0 for x in diffs):
        ahead = "MoE"
    elif all(x > 0 for x in diffs):
        ahead = "dense"
    else:
        ahead = "tie"
    return {"pairs": rows, "d_loss_mean": mean, "d_ppl_pct_mean": 100.0 * math.expm1(mean),
            "ahead": ahead}


def paired_lines(report: dict) -> list[str]:
    """Plain-words lines for the paired view and the equal-wall-clock view (console and report.md)."""
    out = []
    p = report.get("paired")
    if p:
        pairs = " ".join(f"{x:+.1f}%" for x in p["d_ppl_pct"])
        spread = f"± {p['d_ppl_pct_std']:.1f}% (std over pairs)" if p["pairs"] > 1 else "(one pair: no spread)"
        out.append(f"paired by seed (MoE - dense perplexity): {pairs}; mean {p['d_ppl_pct_mean']:+.1f}% "
                   f"{spread}; the MoE is lower in {p['moe_better']} of "
                   f"{p['pairs']} pairs (sign test p = {p['sign_test_p']:.3g})")
    w = report.get("equal_wall_clock")
    if w and w.get("pairs"):
        side = {"MoE": "the MoE is ahead in every pair", "dense": "the dense twin is ahead in every pair",
                "tie": "neither side is ahead in every pair"}[w["ahead"]]
        t = statistics.mean(r["dense_wall_s"] for r in w["pairs"])
        out.append(f"at equal wall-clock (the MoE's validation loss at the dense run's final training time, "
                   f"{t:.0f} s, trainer's sample): {w['d_ppl_pct_mean']:+.1f}% perplexity; {side}")
    return out


# ---------------------------------------------------------------------------------------------
# outputs


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def table_rows(report: dict) -> list[tuple[str, ...]]:
    """Rows of the summary table: (quantity, one column per variant)."""
    vs = report["variants"]
    keys = list(vs)
    rows = [
        ("parameters, total", *[_fmt_params(vs[k]["params_total"]) for k in keys]),
        ("parameters, active per token", *[_fmt_params(vs[k]["params_active"]) for k in keys]),
        ("FFN hidden (per expert for the MoE)", *[str(vs[k]["ffn_hidden"]) for k in keys]),
        ("training FLOPs per token", *[f"{vs[k]['flops_per_token'] / 1e6:.2f}M" for k in keys]),
        ("  of which router", *[f"{vs[k]['router_flops_per_token'] / 1e6:.3f}M" for k in keys]),
        ("training tokens", *[f"{vs[k]['train_tokens']:,}" for k in keys]),
        ("training FLOPs", *[f"{vs[k]['train_flops']:.3g}" for k in keys]),
        ("learning rate", *[f"{vs[k]['lr']:g}" + (f" (FFN output x{vs[k]['ffn_out_lr_scale']:.3g})"
                                                   if vs[k].get("ffn_out_lr_scale", 1.0) != 1.0 else "") for k in keys]),
        ("tokens/s (median)", *[f"{vs[k]['tokens_per_s']:,.0f}" for k in keys]),
        ("wall time per run", *[f"{vs[k]['wall_s']:.0f} s" for k in keys]),
        ("val perplexity (mean ± std)", *[f"{vs[k]['val_ppl_mean']:.2f}" + (
            f" ± {vs[k]['val_ppl_std']:.2f}" if len(vs[k]["val_ppl"]) > 1 else " (1 seed)") for k in keys]),
        ("val perplexity per seed", *[" ".join(f"{p:.2f}" for p in vs[k]["val_ppl"]) for k in keys]),
        ("vs dense twin", *[("-" if k == "dense" else
                             f"{100 * (vs[k]['val_ppl_mean'] - vs['dense']['val_ppl_mean']) / vs['dense']['val_ppl_mean']:+.1f}%")
                            for k in keys]),
    ]
    return rows


def render_table(report: dict, console) -> None:
    from rich.table import Table

    vs = report["variants"]
    t = Table(title=f"compare-dense: {report['name']} over seeds {', '.join(map(str, report['seeds']))}",
              title_justify="left")
    t.add_column("")
    for k in vs:
        t.add_column(vs[k]["label"], justify="right")
    for row in table_rows(report):
        t.add_row(*row)
    console.print(t)
    style = "bold green" if report["clear_win"] else "bold yellow"
    console.print(f"[{style}]verdict:[/] {report['verdict']}", highlight=False, soft_wrap=True)
    for line in paired_lines(report):
        console.print(line, highlight=False, soft_wrap=True)
    if report.get("files"):
        console.print("wrote " + ", ".join(report["files"].values()), highlight=False, soft_wrap=True)


def write_report(report: dict, out: Path) -> dict:
    from .plots import plot_compare

    files = {}
    files["json"] = write_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    files.update(plot_compare(report, out))
    files["md"] = write_atomic(out / "report.md", render_markdown(report, files))
    return files


def render_markdown(report: dict, files: dict) -> str:
    vs = report["variants"]
    keys = list(vs)
    lines = [
        f"# compare-dense: {report['name']}",
        "",
        f"**Verdict:** {report['verdict']}.",
        "",
        *[f"- {line}" for line in paired_lines(report)],
        "",
        "| | " + " | ".join(vs[k]["label"] for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += [
        "",
        "How it was measured: the dense twin differs from the MoE only in "
        + ", ".join(f"`{k}`" for k in report["twin_differs_in"])
        + " (each MoE FFN becomes one dense FFN as wide as the experts a token visits), so both do the same "
          "FLOPs per token apart from the router's; same activation, init std, seeds, data order, tokens and "
          "schedule. Perplexity is over every token of the validation split, from each run's last checkpoint. "
          "Training FLOPs count forward + backward (3 x forward) of every matmul and the attention scores.",
        "",
    ]
    if report.get("lr_sweep"):
        lines += ["Learning-rate sweep (seed "
                  f"{report['seeds'][0]}, final validation loss; each variant keeps its own best):", ""]
        for v, res in report["lr_sweep"].items():
            lines.append(f"- {vs[v]['label']}: " + ", ".join(f"lr {lr}: {loss:.4f}" for lr, loss in res.items())
                         + f" -> {vs[v]['lr']:g}")
        lines.append("")
    for key, caption in (("gap_png", "MoE - dense validation loss against training tokens (mean and range over seeds)"),
                         ("flops_png", "Validation loss against training FLOPs"),
                         ("wall_png", "Validation loss against wall-clock seconds")):
        if key in files:
            lines += [f"![{caption}]({Path(files[key]).name})", ""]
    lines += ["Runs: " + ", ".join(f"`{Path(r['run_dir']).name}`" for r in report["runs"]), ""]
    return "\n".join(lines)
