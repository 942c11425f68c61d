"""What training reports: perplexity, per-expert load statistics, the collapse alarm, and sinks.

    meter = LoadMeter(layer_ids=[0, 1, 2, 3])
    meter.add(out.moe_stats)              # every micro-batch; stays on the device (no host sync)
    layers = meter.read()                 # at a log step: one LayerLoad per MoE layer, then reset
    alarms = alarm.update(step, layers)   # at an evaluation
    sink.write(train_record(...))         # metrics.jsonl (schema: docs/METRICS.md)

The console display (`TrainDisplay`) is a rich progress bar plus a panel when the console is a
terminal, and plain periodic lines otherwise (CI, a pipe, a log file).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ..files import write_atomic

# The collapse alarm fires when an expert's share of tokens stays under LOW_SHARE x uniform, or a
# layer's max/mean load stays above HIGH_MAX_MEAN, for ALARM_PATIENCE evaluations in a row.
LOW_SHARE = 0.25
HIGH_MAX_MEAN = 3.0
ALARM_PATIENCE = 2


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverging loss prints as a large number rather than inf."""
    if not math.isfinite(loss):
        return float("nan")
    return math.exp(min(loss, 50.0))


# ---------------------------------------------------------------------------------------------
# expert-load statistics


@dataclass
class LayerLoad:
    """Expert usage of one MoE layer over a window of steps (or one evaluation)."""

    layer: int  # index of the Transformer block
    load: list[float]  # share of routed assignments per expert; sums to 1
    max_mean: float  # max / mean of the per-expert load (1 = perfectly balanced)
    cv: float  # coefficient of variation (std / mean) of the per-expert load
    dropped_frac: float  # share of assignments dropped by a capacity limit
    entropy: float  # mean router entropy (nats)
    balance_loss: float  # this layer's balance loss (coefficient applied)
    z_loss: float  # this layer's router z-loss (coefficient applied)

    def to_json(self) -> dict:
        return {
            "layer": self.layer,
            "load": [round(s, 6) for s in self.load],
            "max_mean": round(self.max_mean, 4),
            "cv": round(self.cv, 4),
            "dropped_frac": round(self.dropped_frac, 6),
            "entropy": round(self.entropy, 4),
            "balance_loss": _round(self.balance_loss),
            "z_loss": _round(self.z_loss),
        }


def load_summary(counts: list[float]) -> tuple[list[float], float, float]:
    """Per-expert counts -> (shares summing to 1, max/mean, coefficient of variation)."""
    n = len(counts)
    total = float(sum(counts))
    if n == 0 or total <= 0:
        return [1.0 / max(n, 1)] * n, 1.0, 0.0
    shares = [c / total for c in counts]
    mean = total / n
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / n)
    # NOTE: renormalise after rounding-free division so the shares sum to 1 to float precision.
    s = sum(shares)
    shares = [x / s for x in shares]
    return shares, max(counts) / mean, std / mean


def _scalar(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float().reshape(())
    return torch.tensor(float(x))


class LoadMeter:
    """Sums the MoE layers' statistics over micro-batches and steps until `read()`.

    Sums stay tensors on the model's device, so `add` never waits for the accelerator.
    dist (a moe_lm.distributed.Dist, under torchrun): `read()` sums the loads over the ranks and
    averages the rest, so every rank reads the global batch's statistics (a collective).
    """

    def __init__(self, layer_ids: list[int], dist: Any = None):
        self.layer_ids = list(layer_ids)
        self.dist = dist
        self.reset()

    def reset(self) -> None:
        self._n = 0
        self._load: list[Optional[torch.Tensor]] = [None] * len(self.layer_ids)
        self._sums: list[Optional[torch.Tensor]] = [None] * len(self.layer_ids)

    def add(self, moe_stats: list) -> None:
        if not self.layer_ids:
            return
        if len(moe_stats) != len(self.layer_ids):  # a bug in the model or in layer_ids
            raise AssertionError(f"expected {len(self.layer_ids)} MoEStats, got {len(moe_stats)}")
        for i, s in enumerate(moe_stats):
            load = s.load.detach().float()
            # dropped_frac, entropy, balance_loss, z_loss: averaged over the window
            row = torch.stack([_scalar(s.dropped_frac).to(load.device), _scalar(s.entropy).to(load.device),
                               _scalar(s.balance_loss).to(load.device), _scalar(s.z_loss).to(load.device)])
            self._load[i] = load if self._load[i] is None else self._load[i] + load
            self._sums[i] = row if self._sums[i] is None else self._sums[i] + row
        self._n += 1

    def read(self) -> list[LayerLoad]:
        """The window's statistics per MoE layer, then start a new window."""
        out = []
        if self._n == 0:
            return out
        if self.dist is not None and self.dist.enabled:
            E, L = self._load[0].numel(), len(self.layer_ids)
            packed = self.dist.all_reduce_(torch.cat([torch.stack(self._load).flatten(), torch.stack(self._sums).flatten()]))
            self._load = list(packed[:L * E].view(L, E))
            self._sums = list(packed[L * E:].view(L, -1) / self.dist.world_size)
        for layer, load, sums in zip(self.layer_ids, self._load, self._sums):
            counts = load.cpu().tolist()
            dropped, entropy, bal, z = (sums / self._n).cpu().tolist()
            shares, max_mean, cv = load_summary(counts)
            out.append(LayerLoad(layer, shares, max_mean, cv, dropped, entropy, bal, z))
        self.reset()
        return out


# ---------------------------------------------------------------------------------------------
# collapse alarm


def balance_advice(moe_cfg: Any) -> str:
    """What to change when experts collapse, for this router and balance loss."""
    if moe_cfg is None:
        return ""
    if moe_cfg.router == "sigmoid_bias":
        rate = moe_cfg.bias_update_rate
        return (f"raise model.moe.bias_update_rate (now {rate:g}, try {rate * 5:g}) or add a small "
                f"balance loss (model.moe.balance_loss=switch model.moe.balance_coef=0.001)")
    if moe_cfg.balance_loss == "none" or moe_cfg.balance_coef == 0:
        return "turn on a balance loss: model.moe.balance_loss=switch model.moe.balance_coef=0.01"
    coef = moe_cfg.balance_coef
    tip = f"raise model.moe.balance_coef (now {coef:g}, try {coef * 5:g})"
    if moe_cfg.z_loss_coef == 0:
        tip += ", add model.moe.z_loss_coef=0.001"
    if moe_cfg.capacity_factor is None and moe_cfg.router != "expert_choice":
        tip += ", or cap the load with model.moe.capacity_factor=1.25"
    return tip


@dataclass
class Alarm:
    step: int
    layer: int
    expert: Optional[int]  # the starved expert, or the busiest one for a max/mean alarm
    kind: str  # "starved" | "overloaded"
    value: float  # the expert's share, or the layer's max/mean
    evaluations: int
    message: str

    def to_json(self) -> dict:
        return {"step": self.step, "layer": self.layer, "expert": self.expert, "kind": self.kind,
                "value": round(self.value, 6), "evaluations": self.evaluations, "message": self.message}


class CollapseAlarm:
    """Counts, per layer and expert, the evaluations in a row (after step 0) that look collapsed.

    An alarm fires once when a count reaches `patience`, and re-arms when the expert recovers.
    Its counters are saved in checkpoints so a resumed run keeps counting.
    """

    def __init__(self, moe_cfg: Any, patience: int = ALARM_PATIENCE):
        self.moe_cfg = moe_cfg
        self.patience = patience
        self.low: dict[str, list[int]] = {}  # layer -> per-expert counts (str keys: JSON-friendly)
        self.high: dict[str, int] = {}  # layer -> count of max/mean > HIGH_MAX_MEAN
        self.active: list[Alarm] = []  # alarms whose condition still holds

    def update(self, step: int, layers: list[LayerLoad]) -> list[Alarm]:
        """Feed one evaluation's per-layer load; returns the alarms that fire now.

        The step-0 evaluation is left out: an untrained router has learned nothing that could
        collapse (noisy_topk starts at zero weights, all scores tied), so it counts for nothing."""
        if step == 0:
            return []
        fired, active = [], []
        for ll in layers:
            key, n = str(ll.layer), len(ll.load)
            if n <= 1:
                continue
            uniform = 1.0 / n
            low = self.low.setdefault(key, [0] * n)
            if len(low) != n:
                low[:] = [0] * n
            for e, share in enumerate(ll.load):
                low[e] = low[e] + 1 if share < LOW_SHARE * uniform else 0
                if low[e] >= self.patience:
                    a = Alarm(step, ll.layer, e, "starved", share, low[e], "")
                    a.message = (f"expert collapse in layer {ll.layer}: expert {e} got {share:.1%} of the "
                                 f"tokens (uniform {uniform:.1%}) at {low[e]} evaluations in a row; "
                                 f"{balance_advice(self.moe_cfg)}")
                    active.append(a)
                    if low[e] == self.patience:
                        fired.append(a)
            high = self.high.get(key, 0)
            high = high + 1 if ll.max_mean > HIGH_MAX_MEAN else 0
            self.high[key] = high
            if high >= self.patience:
                busiest = max(range(n), key=lambda i: ll.load[i])
                a = Alarm(step, ll.layer, busiest, "overloaded", ll.max_mean, high, "")
                a.message = (f"expert collapse in layer {ll.layer}: max/mean load {ll.max_mean:.1f} > "
                             f"{HIGH_MAX_MEAN:g} at {high} evaluations in a row (expert {busiest} takes "
                             f"{ll.load[busiest]:.1%}); {balance_advice(self.moe_cfg)}")
                active.append(a)
                if high == self.patience:
                    fired.append(a)
        self.active = active
        return fired

    def state_dict(self) -> dict:
        return {"low": self.low, "high": self.high}

    def load_state_dict(self, state: dict) -> None:
        self.low = {str(k): list(v) for k, v in (state or {}).get("low", {}).items()}
        self.high = {str(k): int(v) for k, v in (state or {}).get("high", {}).items()}


# ---------------------------------------------------------------------------------------------
# metrics.jsonl records (schema: docs/METRICS.md)


# NOTE: 8 significant digits keep a float32 value (~7.2 digits) whole: two runs that should agree
# (a resume, N processes against one) can be compared from their metrics.jsonl.
def _round(x: float, digits: int = 8) -> float:
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def train_record(*, step: int, tokens: int, flops: float, wall_s: float, lr: float, loss: float,
                 ce_loss: float, aux_loss: float, z_loss: float, grad_norm: float,
                 tokens_per_s: float, layers: list[LayerLoad]) -> dict:
    return {
        "kind": "train", "step": step, "tokens": tokens, "flops": flops, "wall_s": round(wall_s, 3),
        "lr": _round(lr), "loss": _round(loss), "ce_loss": _round(ce_loss), "ppl": _round(perplexity(ce_loss)),
        "aux_loss": _round(aux_loss), "z_loss": _round(z_loss), "grad_norm": _round(grad_norm),
        "tokens_per_s": round(tokens_per_s, 1), "layers": [ll.to_json() for ll in layers],
    }


def eval_record(*, step: int, tokens: int, flops: float, wall_s: float, val_loss: float,
                layers: list[LayerLoad]) -> dict:
    return {
        "kind": "eval", "step": step, "tokens": tokens, "flops": flops, "wall_s": round(wall_s, 3),
        "val_loss": _round(val_loss), "val_ppl": _round(perplexity(val_loss)),
        "layers": [ll.to_json() for ll in layers],
    }


def event_record(*, step: int, event: str, message: str, **extra: Any) -> dict:
    return {"kind": "event", "step": step, "event": event, "message": message, **extra}


class JsonlSink:
    """Appends one JSON object per line to metrics.jsonl, flushed at once (readable live)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl; a last line cut by a kill is skipped."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_metrics(path: Path, after_step: int, source: Optional[Path] = None) -> None:
    """Keep only records with step <= after_step (a resumed run redoes what came later).

    `source`: copy them from another run's metrics.jsonl (resuming from another run's checkpoint).
    """
    path = Path(path)
    src = Path(source) if source is not None else path
    kept = [r for r in read_metrics(src) if int(r.get("step", 0)) <= after_step]
    write_atomic(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))


class TensorBoardSink:
    """Scalars (and per-layer load histograms) for TensorBoard; needs the `tensorboard` package."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # checked by tensorboard_available()

        self.w = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        step = record.get("step", 0)
        kind = record.get("kind")
        if kind == "train":
            for key in ("loss", "ce_loss", "ppl", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s"):
                if record.get(key) is not None:
                    self.w.add_scalar(f"train/{key}", record[key], step)
        elif kind == "eval":
            self.w.add_scalar("val/loss", record["val_loss"], step)
            self.w.add_scalar("val/ppl", record["val_ppl"], step)
        for ll in record.get("layers", []):
            prefix = f"{'val' if kind == 'eval' else 'train'}_moe/layer{ll['layer']}"
            self.w.add_scalar(f"{prefix}/max_mean", ll["max_mean"], step)
            self.w.add_scalar(f"{prefix}/cv", ll["cv"], step)
            self.w.add_scalar(f"{prefix}/dropped_frac", ll["dropped_frac"], step)
            for e, share in enumerate(ll["load"]):
                self.w.add_scalar(f"{prefix}/expert{e}", share, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a tensorboard that fails to import
        return False
    return True


# ---------------------------------------------------------------------------------------------
# console display

_BARS = "▁▂▃▄▅▆▇█"


def _fmt_duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def heat_row(shares: list[float]):
    """A rich Text with one bar per expert: height ~ share relative to uniform (full = 2x uniform);
    red under a quarter of uniform, yellow under a half, magenta over twice uniform."""
    from rich.text import Text

    n = len(shares)
    t = Text()
    for s in shares:
        r = s * n
        idx = min(len(_BARS) - 1, max(0, int(r / 2 * (len(_BARS) - 1) + 0.5)))
        style = "red" if r < LOW_SHARE else "yellow" if r < 0.5 else "magenta" if r > 2 else "green"
        t.append(_BARS[idx], style=style)
    return t


def plain_heat_row(shares: list[float]) -> str:
    n = len(shares)
    return "".join(_BARS[min(len(_BARS) - 1, max(0, int(s * n / 2 * (len(_BARS) - 1) + 0.5)))] for s in shares)


@dataclass
class DisplayState:
    step: int = 0
    max_steps: int = 0
    train: Optional[dict] = None  # last train record
    val: Optional[dict] = None  # last eval record
    alarms: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class TrainDisplay:
    """Live progress for a terminal, plain lines otherwise. Use as a context manager."""

    def __init__(self, console, *, name: str, start_step: int, max_steps: int, log_every: int):
        self.console = console
        self.live_mode = bool(getattr(console, "is_terminal", False)) and not getattr(console, "quiet", False)
        self.s = DisplayState(step=start_step, max_steps=max_steps)
        self.name = name
        self.log_every = log_every
        self._live = None
        self._progress = None
        self._task = None

    # -- lifecycle
    def __enter__(self) -> "TrainDisplay":
        if self.live_mode:
            from rich.live import Live
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                TextColumn(f"[bold]{self.name}[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("steps"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=self.s.max_steps, completed=self.s.step)
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    # -- events
    def on_step(self, step: int) -> None:
        self.s.step = step
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def on_train(self, rec: dict) -> None:
        self.s.train = rec
        if self.live_mode:
            self._refresh()
            return
        eta = ""
        if rec.get("tokens_per_s"):
            left = (self.s.max_steps - rec["step"]) * (rec["tokens"] / max(rec["step"], 1)) / rec["tokens_per_s"]
            eta = f"  eta {_fmt_duration(left)}"
        line = (f"step {rec['step']:>6}/{self.s.max_steps}  loss {rec['loss']:.4f}  ppl {rec['ppl']:.2f}  "
                f"lr {rec['lr']:.2e}  {rec['tokens_per_s']:,.0f} tok/s  grad {rec['grad_norm']:.3f}")
        if rec.get("layers"):
            worst = max(rec["layers"], key=lambda ll: ll["max_mean"])
            line += (f"  bal {rec['aux_loss']:.4f}  z {rec['z_loss']:.4f}  "
                     f"max/mean {worst['max_mean']:.2f} (layer {worst['layer']})")
        self.console.print(line + eta, markup=False, highlight=False, soft_wrap=True)

    def on_eval(self, rec: dict) -> None:
        self.s.val = rec
        if self.live_mode:
            self._refresh()
            return
        self.console.print(f"eval step {rec['step']:>6}  val_loss {rec['val_loss']:.4f}  val_ppl {rec['val_ppl']:.2f}",
                           markup=False, highlight=False, soft_wrap=True)
        for ll in rec.get("layers", []):
            self.console.print(
                f"  layer {ll['layer']:>2} load {plain_heat_row(ll['load'])}  max/mean {ll['max_mean']:.2f}  "
                f"cv {ll['cv']:.2f}  dropped {ll['dropped_frac']:.1%}", markup=False, highlight=False, soft_wrap=True)

    def on_alarms(self, active: list[Alarm], fired: list[Alarm]) -> None:
        self.s.alarms = [a.message for a in active]
        for a in fired:
            if self.live_mode:
                self._live.console.print(f"[bold yellow]warning:[/] {a.message}", highlight=False, soft_wrap=True)
            else:
                self.console.print(f"warning: {a.message}", markup=False, highlight=False, soft_wrap=True)
        if self.live_mode:
            self._refresh()

    def note(self, message: str) -> None:
        if self._live is not None:
            self._live.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    # -- rendering
    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        parts = []
        if self._progress is not None:
            parts.append(self._progress)
        body = []
        r = self.s.train
        if r is None:
            body.append(Text("waiting for the first log step...", style="dim"))
        else:
            head = Table.grid(padding=(0, 2))
            for _ in range(6):
                head.add_column()
            head.add_row(f"[bold]step[/] {r['step']}/{self.s.max_steps}", f"[bold]loss[/] {r['loss']:.4f}",
                         f"[bold]ppl[/] {r['ppl']:.2f}", f"[bold]lr[/] {r['lr']:.2e}",
                         f"[bold]tok/s[/] {r['tokens_per_s']:,.0f}", f"[bold]grad[/] {r['grad_norm']:.3f}")
            v = self.s.val
            val = (f"[bold]val[/] {v['val_loss']:.4f} / ppl {v['val_ppl']:.2f} (step {v['step']})"
                   if v else "[bold]val[/] -")
            head.add_row(f"[bold]ce[/] {r['ce_loss']:.4f}", f"[bold]bal[/] {r['aux_loss']:.4f}",
                         f"[bold]z[/] {r['z_loss']:.4f}", "", "", "")
            body.append(head)
            body.append(Text.from_markup(val))
            if r.get("layers"):
                t = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold dim")
                t.add_column("layer", justify="right")
                t.add_column("expert load (share vs uniform)")
                t.add_column("max/mean", justify="right")
                t.add_column("cv", justify="right")
                t.add_column("dropped", justify="right")
                t.add_column("entropy", justify="right")
                for ll in r["layers"]:
                    mm_style = "red" if ll["max_mean"] > HIGH_MAX_MEAN else ""
                    t.add_row(str(ll["layer"]), heat_row(ll["load"]), Text(f"{ll['max_mean']:.2f}", style=mm_style),
                              f"{ll['cv']:.2f}", f"{ll['dropped_frac']:.1%}", f"{ll['entropy']:.2f}")
                body.append(t)
        for msg in self.s.alarms[:4]:
            body.append(Text(f"⚠ {msg}", style="yellow"))
        parts.append(Panel(Group(*body), title=f"[bold]{self.name}[/]", title_align="left", border_style="blue"))
        return Group(*parts)


def fmt_duration(s: float) -> str:
    return _fmt_duration(s)


def summarize(records: Iterable[dict]) -> dict:
    """Last train and eval records of a metrics stream (for summaries)."""
    last_train = last_eval = None
    for r in records:
        if r.get("kind") == "train":
            last_train = r
        elif r.get("kind") == "eval":
            last_eval = r
    return {"train": last_train, "eval": last_eval}
