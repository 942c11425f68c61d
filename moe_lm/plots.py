"""PNG figures (matplotlib, Agg: no display needed), drawn from data handed in: a run's
metrics.jsonl records, an eval report, a compare-dense report. Nothing here reads a run folder or
imports the rest of moe_lm, so any layer may draw.

    plot_run(read_metrics(run / "metrics.jsonl"), run / "plots", title="tiny-moe")
    # -> plots/loss.png, plots/expert_load.png

Figures are built with matplotlib's object API (Figure + Agg canvas), so drawing never touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

from pathlib import Path

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_run(records: list[dict], out_dir: Path | str, title: str = "") -> list[Path]:
    """Draw every figure a run's metrics.jsonl records allow into out_dir (created); returns the
    files written: loss.png when there are train or eval records, expert_load.png when the train
    records carry per-layer load."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if any(r.get("kind") in ("train", "eval") for r in records):
        written.append(plot_loss_curves(records, out / "loss.png", title=title))
    if any(r.get("layers") for r in records if r.get("kind") == "train"):
        written.append(plot_load_heatmap(records, out / "expert_load.png", title=title))
    return written


def plot_loss_curves(records: list[dict], path: Path, title: str = "") -> Path:
    """Training and validation loss (left) and perplexity, log scale (right), against steps."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig = _figure(11, 4)
    ax_loss, ax_ppl = fig.subplots(1, 2)
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["ce_loss"] for r in train], label="train cross-entropy", color="tab:blue", lw=1)
        ax_ppl.plot(steps, [r["ppl"] for r in train], label="train", color="tab:blue", lw=1)
        aux = [r["aux_loss"] + r["z_loss"] for r in train]
        if any(a for a in aux):  # a scale of its own: ~0.01 next to a cross-entropy of ~5
            ax_aux = ax_loss.twinx()
            ax_aux.plot(steps, aux, color="tab:gray", lw=1, ls="--")
            ax_aux.set_ylabel("balance + z loss (dashed)", color="tab:gray", fontsize=8)
            ax_aux.tick_params(axis="y", labelcolor="tab:gray", labelsize=7)
    if evals:
        steps = [r["step"] for r in evals]
        ax_loss.plot(steps, [r["val_loss"] for r in evals], "o-", label="validation", color="tab:orange", ms=3)
        ax_ppl.plot(steps, [r["val_ppl"] for r in evals], "o-", label="validation", color="tab:orange", ms=3)
        last = evals[-1]
        ax_ppl.annotate(f"{last['val_ppl']:.1f}", (last["step"], last["val_ppl"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color="tab:orange")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_ppl.set_xlabel("step")
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.set_yscale("log")
    ax_ppl.legend(fontsize=8)
    ax_ppl.grid(alpha=0.3, which="both")
    fig.suptitle(f"{title}: loss and perplexity" if title else "loss and perplexity")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_load_heatmap(records: list[dict], path: Path, title: str = "") -> Path:
    """Per MoE layer, an expert x step heatmap of each expert's share of the tokens, relative to
    uniform (1 = its fair share; 0 = starved; white = balanced)."""
    from matplotlib.colors import TwoSlopeNorm

    train = [r for r in records if r.get("kind") == "train" and r.get("layers")]
    layer_ids = [ll["layer"] for ll in train[0]["layers"]]
    steps = [r["step"] for r in train]
    grids = []
    for li in range(len(layer_ids)):
        cols = [r["layers"][li]["load"] for r in train if len(r["layers"]) > li]
        n = len(cols[0])
        grids.append([[c[e] * n for c in cols] for e in range(n)])  # [expert][time]
    vmax = max(2.0, max(max(max(row) for row in g) for g in grids))
    fig = _figure(11, 1.2 + 1.3 * len(grids))
    axes = fig.subplots(len(grids), 1, squeeze=False, sharex=True)[:, 0]
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    im = None
    # each column spans the steps its log window covered: (previous log step, this log step]
    edges = [0] + steps
    for ax, layer, g in zip(axes, layer_ids, grids):
        n = len(g)
        im = ax.pcolormesh(edges, [e - 0.5 for e in range(n + 1)], g, cmap="RdBu_r", norm=norm, shading="flat")
        ax.invert_yaxis()
        ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
        ax.set_yticks(range(n) if n <= 16 else range(0, n, max(1, n // 8)))
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("step")
    fig.colorbar(im, ax=list(axes), label="share / uniform share", shrink=0.9)
    fig.suptitle(f"{title}: expert load over training" if title else "expert load over training")
    fig.savefig(path)
    return Path(path)


def plot_eval_load(report, path: Path, title: str = "") -> Path:
    """`moe-lm eval`'s layer x expert heatmap: each expert's share of the evaluated tokens relative
    to uniform (1 = its fair share), with the share printed in each cell. `report`: anything with
    `layers` (each with `load_share` and `layer`), `split` and `n_tokens`, as evaluation.EvalReport."""
    from matplotlib.colors import TwoSlopeNorm

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid = [[s * len(lr.load_share) for s in lr.load_share] for lr in report.layers]
    n_layers, n_exp = len(grid), len(grid[0])
    vmax = max(2.0, max(max(row) for row in grid))
    fig = _figure(max(5.0, 0.55 * n_exp + 2.5), 1.2 + 0.45 * n_layers)
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax), aspect="auto")
    if n_exp <= 32:
        for i, lr in enumerate(report.layers):
            for e, s in enumerate(lr.load_share):
                ax.text(e, i, f"{s:.0%}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(n_layers), [f"layer {lr.layer}" for lr in report.layers], fontsize=8)
    ax.set_xticks(range(n_exp) if n_exp <= 32 else range(0, n_exp, max(1, n_exp // 16)))
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax, label="share / uniform share")
    what = f"{report.split}, {report.n_tokens:,} tokens"
    fig.suptitle(f"{title}: expert load ({what})" if title else f"expert load ({what})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_compare(report: dict, out_dir: Path) -> dict:
    """compare-dense's figures: validation loss against training FLOPs and against wall-clock
    seconds, one thin line per seed, one colour per variant. Returns {"flops_png", "wall_png"}."""
    colours = {"moe": "tab:red", "dense": "tab:blue", "dense-total": "tab:gray"}
    files = {}
    for key, x_key, xlabel, fname in (("flops_png", "flops", "training FLOPs", "val_loss_vs_flops.png"),
                                      ("wall_png", "wall_s", "wall-clock seconds (training)", "val_loss_vs_wall.png")):
        fig = _figure(7, 4.2)
        ax = fig.subplots()
        seen = set()
        for run in report["runs"]:
            v = run["variant"]
            pts = [c for c in run["curve"] if c["step"] > 0]
            if not pts:
                continue
            label = report["variants"][v]["label"] if v not in seen else None
            seen.add(v)
            ax.plot([c[x_key] for c in pts], [c["val_loss"] for c in pts], "-o", ms=2.5, lw=1.2, alpha=0.85,
                    color=colours.get(v, "black"), label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token, trainer's sample)")
        if x_key == "flops":
            ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        n = len(report["seeds"])
        ax.set_title(f"{report['name']}: MoE vs dense twin, {n} seed{'s' if n != 1 else ''} (one line each)", fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path)
        files[key] = path
    gap = report.get("gap_vs_tokens")
    if gap and gap.get("tokens"):
        files["gap_png"] = plot_gap(gap, Path(out_dir) / "gap_vs_tokens.png", report["name"], len(report["seeds"]))
    return files


def plot_gap(gap: dict, path: Path, name: str, n_seeds: int) -> Path:
    """MoE - dense validation loss against training tokens: the mean over seed pairs and the
    min..max band (`compare.gap_vs_tokens`'s data). Below zero = the MoE ahead."""
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    x = [t / 1e6 for t in gap["tokens"]]
    ax.axhline(0.0, color="black", lw=0.8)
    if n_seeds > 1:
        ax.fill_between(x, gap["min"], gap["max"], color="tab:red", alpha=0.2, lw=0, label=f"range over {n_seeds} seeds")
    ax.plot(x, gap["mean"], "-o", ms=3, color="tab:red", label="mean over seeds" if n_seeds > 1 else "seed 0")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("MoE - dense val loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: the gap at equal FLOPs (below 0 = MoE ahead)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path
