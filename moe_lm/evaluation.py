"""`moe-lm eval`'s library side: perplexity, the routing report and expert specialisation.

    report = evaluate_model(model, tokens, seq_len=128, batch_size=16, n_batches=None)   # all windows
    report.ppl, report.n_tokens, report.layers[0].load_share, ...
    result = run_eval("runs/tiny-moe", split="val")      # load + evaluate + eval.json + heatmap

Perplexity is exp(mean token cross-entropy), every target token counted once: with
`n_batches=None` the split is covered by non-overlapping windows; otherwise a fixed seeded sample
(by default the same windows the trainer's evaluations use, so `eval` reproduces the run's last
validation loss).

The routing report per MoE layer follows Shazeer et al. 2017 (Table 6): each expert's share of
the routed assignments (Load) and of the gate weight (Importance), their coefficients of variation
and the max/mean load; plus the share of assignments dropped by a capacity limit, the mean router
entropy, and the experts that received nothing (dead) or under a quarter of their fair share.
Specialisation: per expert, the tokens it receives most often and those it receives most
selectively, and per domain (the built-in corpus tags each file with its top-level module) the
share of the domain's assignments each expert takes.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

STARVED = 0.25  # an expert under this fraction of the uniform share is "starved" (as the collapse alarm)
TOP_TOKENS = 8  # tokens listed per expert
MIN_COUNT_SELECTIVE = 20  # a token must occur this often to be listed as selective


@dataclass
class LayerReport:
    """Routing of one MoE layer over the evaluated tokens."""

    layer: int
    load: list[int]  # kept assignments per expert
    load_share: list[float]  # load / total (sums to 1)
    importance_share: list[float]  # gate weight per expert / total gate weight (sums to 1)
    cv_load: float  # std / mean of load (Shazeer Table 6: CV(Load))
    cv_importance: float  # CV(Importance)
    max_mean: float  # max / mean load
    dropped_pct: float  # % of assignments dropped by a capacity limit (expert choice: % of tokens not taken)
    entropy: float  # mean router entropy, nats (log E = uniform)
    dead: list[int]  # experts that received no token
    starved: list[int]  # experts under STARVED x the uniform share
    top_tokens: list[list[tuple[str, int]]] = field(default_factory=list)  # per expert: (token, count), most often
    selective_tokens: list[list[tuple[str, float]]] = field(default_factory=list)  # per expert: (token, share of its occurrences routed here)
    domain_share: dict[str, list[float]] = field(default_factory=dict)  # domain -> share of its assignments per expert
    domain_assignments: dict[str, int] = field(default_factory=dict)  # domain -> its assignments in this layer


@dataclass
class EvalReport:
    split: str
    loss: float  # mean token cross-entropy, nats
    ppl: float
    n_tokens: int  # target tokens the figures rest on
    windows: str  # "all" (non-overlapping cover) or "sample of N batches x B (seed S)"
    layers: list[LayerReport]
    seconds: float = 0.0
    checkpoint: Optional[str] = None
    step: Optional[int] = None
    data_dir: Optional[str] = None

    def to_json(self) -> dict:
        return asdict(self)


def _cv(v: np.ndarray) -> float:
    m = v.mean()
    return float(v.std() / m) if m > 0 else 0.0


class _LayerAccumulator:
    """Sums one MoE layer's statistics over the evaluation batches (on the device)."""

    def __init__(self, layer: int, n_experts: int, vocab: int, n_domains: int, device):
        self.layer, self.E, self.V, self.D = layer, n_experts, vocab, n_domains
        self.load = torch.zeros(n_experts, dtype=torch.float64, device=device)
        self.importance = torch.zeros(n_experts, dtype=torch.float64, device=device)
        self.token_expert = torch.zeros(n_experts * vocab, dtype=torch.float64, device=device)
        self.token_count = torch.zeros(vocab, dtype=torch.float64, device=device)
        self.domain_expert = torch.zeros(max(n_domains, 1) * n_experts, dtype=torch.float64, device=device)
        self.dropped = 0.0
        self.entropy = 0.0
        self.weight = 0

    def add(self, stats, assignments, x: torch.Tensor, dom: Optional[torch.Tensor]) -> None:
        n = x.numel()
        self.load += stats.load.double()
        self.importance += stats.importance.double()
        self.dropped += float(stats.dropped_frac) * n
        self.entropy += float(stats.entropy) * n
        self.weight += n
        token, expert = assignments
        self.token_count += torch.bincount(x.reshape(-1), minlength=self.V).double()
        ids = x.reshape(-1)[token]
        self.token_expert += torch.bincount(expert * self.V + ids, minlength=self.E * self.V).double()
        if dom is not None:
            d = dom.reshape(-1)[token]
            self.domain_expert += torch.bincount(d * self.E + expert, minlength=self.D * self.E).double()


def evaluate_model(model, tokens: np.ndarray, *, seq_len: int, batch_size: int, n_batches: Optional[int] = None,
                   seed: int = 0, domains: Optional[np.ndarray] = None, domain_names: Optional[list[str]] = None,
                   decode=None, device: torch.device | str = "cpu", amp_dtype=None,
                   progress: Any = None) -> EvalReport:
    """Cross-entropy and routing statistics of `model` over windows of `tokens`.

    n_batches None: every token of the split once (non-overlapping windows); else a fixed seeded
    sample of n_batches x batch_size windows. domains: per-token domain ids aligned with `tokens`
    (the same windows are cut from both). decode: token id -> text, for the specialisation lists.
    """
    from .data.shards import eval_windows

    device = torch.device(device)
    moe_layers = [(i, b.mlp) for i, b in enumerate(model.layers) if b.is_moe]
    vocab = model.cfg.vocab_size
    n_dom = len(domain_names) if domain_names else 0
    if domains is not None and len(domains) != len(tokens):
        domains = None  # NOTE: a domain file that does not align is ignored rather than misread
    accs = [_LayerAccumulator(i, layer.n_experts, vocab, n_dom, device) for i, layer in moe_layers]
    batches = eval_windows(tokens, seq_len, batch_size, n_batches=n_batches, seed=seed)
    dom_batches = (eval_windows(domains, seq_len, batch_size, n_batches=n_batches, seed=seed)
                   if domains is not None and n_dom else None)
    total_batches = n_batches if n_batches is not None else math.ceil((len(tokens) - 1) / seq_len / batch_size)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext

    was_training = model.training
    model.eval()
    for _, layer in moe_layers:
        layer.record = True
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    import time

    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for b, (x, y) in enumerate(batches):
                dom = next(dom_batches)[0].to(device) if dom_batches is not None else None
                x, y = x.to(device), y.to(device)
                with amp():
                    out = model(x)
                nll += F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1),
                                       reduction="sum").double()
                count += y.numel()
                for acc, (_, layer), stats in zip(accs, moe_layers, out.moe_stats):
                    acc.add(stats, layer.last_assignments, x, dom)
                if progress is not None:
                    progress(b + 1, total_batches)
    finally:
        for _, layer in moe_layers:
            layer.record, layer.last_assignments = False, None
        model.train(was_training)
    loss = float(nll) / max(count, 1)
    windows = "all" if n_batches is None else f"sample of {n_batches} batches x {batch_size} windows (seed {seed})"
    layers = [_layer_report(a, domain_names, decode) for a in accs]
    return EvalReport(split="", loss=loss, ppl=math.exp(min(loss, 50.0)), n_tokens=count, windows=windows,
                      layers=layers, seconds=time.perf_counter() - t0)


def _layer_report(a: _LayerAccumulator, domain_names: Optional[list[str]], decode) -> LayerReport:
    load = a.load.cpu().numpy()
    imp = a.importance.cpu().numpy()
    E = a.E
    total = load.sum()
    share = load / total if total > 0 else np.full(E, 1.0 / E)
    imp_share = imp / imp.sum() if imp.sum() > 0 else np.full(E, 1.0 / E)
    rep = LayerReport(
        layer=a.layer, load=[int(v) for v in load], load_share=[float(v) for v in share],
        importance_share=[float(v) for v in imp_share], cv_load=_cv(load), cv_importance=_cv(imp),
        max_mean=float(load.max() / load.mean()) if total > 0 else 1.0,
        dropped_pct=100.0 * a.dropped / max(a.weight, 1), entropy=a.entropy / max(a.weight, 1),
        dead=[e for e in range(E) if load[e] == 0],
        starved=[e for e in range(E) if share[e] < STARVED / E],
    )
    te = a.token_expert.reshape(E, a.V).cpu().numpy()
    occurrences = a.token_count.cpu().numpy()  # how often each token id was evaluated
    for e in range(E):
        top = np.argsort(-te[e], kind="stable")[:TOP_TOKENS]
        rep.top_tokens.append([(_show(decode, int(t)), int(te[e, t])) for t in top if te[e, t] > 0])
        # share of the token's occurrences sent to e (top-k: a token goes to k experts, so the
        # shares of one token sum to k); ties broken by how often the token came
        frac = np.where(occurrences >= MIN_COUNT_SELECTIVE, te[e] / np.maximum(occurrences, 1), 0.0)
        sel = np.lexsort((-occurrences, -frac))[:TOP_TOKENS]
        rep.selective_tokens.append([(_show(decode, int(t)), round(float(frac[t]), 4)) for t in sel if frac[t] > 0])
    if domain_names:
        de = a.domain_expert.reshape(-1, E).cpu().numpy()
        for d, name in enumerate(domain_names):
            n = de[d].sum()
            if n > 0:
                rep.domain_share[name] = [round(float(v), 5) for v in de[d] / n]
                rep.domain_assignments[name] = int(n)
    return rep


def _visible(token: str) -> str:
    """A token as printable text: spaces as ·, newlines and tabs escaped."""
    return (token.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t").replace("[", "\\[")) or "∅"


def _show(decode, token_id: int) -> str:
    if decode is None:
        return str(token_id)
    return decode(token_id)


# ---------------------------------------------------------------------------------------------
# the command


def run_eval(path: Path | str, *, split: str = "val", n_batches: Optional[int] = -1, data_dir: Optional[Path] = None,
             out_dir: Optional[Path] = None, device: str = "auto", console: Any = None,
             write: bool = True) -> tuple[EvalReport, dict]:
    """Load a run / checkpoint, evaluate it on `split`, write eval.json and the load heatmap.

    n_batches: -1 = the trainer's own evaluation sample (train.eval_batches, seed train.seed);
    None = every token of the split; N = a seeded sample of N batches. Returns (report, files written).
    """
    from .data.shards import TokenData
    from .loading import check_same_tokenizer, load_model
    from .training.trainer import resolve_device

    dev, amp_dtype = resolve_device(device, "auto", "--device")
    loaded = load_model(path, device=dev)
    cfg = loaded.cfg
    data_dir = Path(data_dir) if data_dir is not None else Path(cfg.data.dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} (the run's data.dir) does not exist",
                        "pass the data folder the run was trained on with --data DIR, or prepare it with `moe-lm prepare`")
    check_same_tokenizer(loaded, data_dir)
    data = TokenData.open(data_dir)
    if split not in data.splits:
        raise DataError(f"{data_dir} has no {split} split (it has: {', '.join(data.splits)})",
                        "pick one with --split, or prepare the data again with a test fraction")
    tokens = data.split(split)
    tok = loaded.tokenizer()
    batch_size = max(1, cfg.train.batch_size // cfg.train.grad_accum)
    if n_batches == -1:
        n_batches, seed = cfg.train.eval_batches, cfg.train.seed
    else:
        seed = cfg.train.seed
    domains = data.domains(split)
    names = data.domain_names if domains is not None else None

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    quiet = console is None or not console.is_terminal
    with Progress(TextColumn("evaluating"), BarColumn(), TextColumn("{task.completed}/{task.total} batches"),
                  TimeRemainingColumn(), console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task("eval", total=None)
        report = evaluate_model(
            loaded.model, tokens, seq_len=cfg.model.seq_len, batch_size=batch_size, n_batches=n_batches, seed=seed,
            domains=domains, domain_names=names, decode=lambda i: tok.decode([i]), device=dev, amp_dtype=amp_dtype,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    report.split, report.checkpoint, report.step, report.data_dir = split, str(loaded.checkpoint), loaded.step, str(data_dir)
    files: dict = {}
    if write:
        out = Path(out_dir) if out_dir is not None else (loaded.run_dir or loaded.checkpoint)
        files = write_outputs(report, out, title=cfg.name)
    return report, files


def write_outputs(report: EvalReport, out_dir: Path, title: str = "") -> dict:
    """eval.json (atomically) and, for an MoE, plots/eval_expert_load.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    path = out_dir / "eval.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    files["json"] = path
    if report.layers:
        from .plots import plot_eval_load

        files["heatmap"] = plot_eval_load(report, out_dir / "plots" / "eval_expert_load.png", title=title)
    return files


def render_report(report: EvalReport, console, files: Optional[dict] = None, top_domains: int = 6) -> None:
    """The console view: perplexity, the routing table, specialisation."""
    from rich.table import Table

    from .training.metrics import heat_row

    console.print(
        f"[bold]{report.split}[/] perplexity [bold]{report.ppl:.2f}[/] (loss {report.loss:.4f} nats/token) over "
        f"{report.n_tokens:,} tokens ({report.windows}); checkpoint {report.checkpoint} (step {report.step})",
        highlight=False, soft_wrap=True)
    if not report.layers:
        console.print("dense model: no routing report")
    else:
        E = len(report.layers[0].load)
        t = Table(title="routing per MoE layer", title_justify="left", caption_justify="left",
                  caption=f"load: one bar per expert (0..{E - 1}), full height = twice the fair share; CV of importance "
                          f"and load and max/mean load as in Shazeer et al. 2017, Table 6; entropy in nats "
                          f"(uniform = {math.log(E):.2f}); starved = under {STARVED:g} x the fair share")
        t.add_column("layer", justify="right")
        t.add_column("load", no_wrap=True, min_width=min(E, 64))
        for col in ("CV imp", "CV load", "max/ mean", "drop %", "entropy", "dead/ starved"):
            t.add_column(col, justify="right")
        for lr in report.layers:
            flags = ", ".join([f"dead {e}" for e in lr.dead] + [f"starved {e}" for e in lr.starved if e not in lr.dead])
            t.add_row(str(lr.layer), heat_row(lr.load_share), f"{lr.cv_importance:.3f}", f"{lr.cv_load:.3f}",
                      f"{lr.max_mean:.2f}", f"{lr.dropped_pct:.2f}", f"{lr.entropy:.3f}", flags or "-")
        console.print(t)
        last = report.layers[-1]
        s = Table(title=f"specialisation, layer {last.layer}: the tokens each expert receives", title_justify="left",
                  caption="most often: by count; most selectively: share of the token's occurrences sent to this "
                          f"expert (tokens seen ≥ {MIN_COUNT_SELECTIVE} times); · = space", caption_justify="left")
        s.add_column("expert", justify="right")
        s.add_column("share", justify="right")
        s.add_column("most often")
        s.add_column("most selectively")
        for e in range(E):
            often = "  ".join(_visible(tok) for tok, _ in last.top_tokens[e][:6])
            sel = "  ".join(f"{_visible(tok)} {f:.0%}" for tok, f in last.selective_tokens[e][:5])
            s.add_row(str(e), f"{last.load_share[e]:.1%}", often, sel)
        console.print(s)
        if last.domain_share:
            # the most specialised among the domains big enough to mean something (≥ 1% of assignments)
            total = sum(last.domain_assignments.values())
            big = [(k, v) for k, v in last.domain_share.items() if last.domain_assignments[k] >= 0.01 * total]
            doms = sorted(big, key=lambda kv: -max(kv[1]))[:top_domains]
            d = Table(title=f"domains, layer {last.layer}: share of each domain's assignments per expert "
                            f"(the {len(doms)} most specialised of the {len(big)} domains with ≥ 1% of the tokens; "
                            f"uniform = {1 / E:.0%})", title_justify="left")
            d.add_column("domain")
            for e in range(E):
                d.add_column(str(e), justify="right")
            for name, row in doms:
                top = max(row)
                d.add_row(name, *[(f"[bold]{v:.0%}[/]" if v == top else f"{v:.0%}") for v in row])
            console.print(d)
    if files:
        console.print("wrote " + ", ".join(str(p) for p in files.values()), highlight=False, soft_wrap=True)

