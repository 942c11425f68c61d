"""What training shows on the console: a rich progress bar and panel on a terminal (loss, learning
rate, throughput, one heat row of expert load per MoE layer, the active collapse alarms), plain
periodic lines otherwise (CI, a pipe, a log file).

    with TrainDisplay(console, name=cfg.name, start_step=0, max_steps=900, log_every=10) as display:
        display.on_train(record)          # a metrics.jsonl train record
        display.on_eval(record)           # an eval record
        display.on_alarms(active, fired)  # alarm.Alarm lists
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..stats import OVERLOADED, STARVED
from .alarm import Alarm

_BARS = "▁▂▃▄▅▆▇█"


def fmt_duration(s: float) -> str:
    """Seconds as 1h02m03s, 2m03s or 3s."""
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
        style = "red" if r < STARVED else "yellow" if r < 0.5 else "magenta" if r > 2 else "green"
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


def _per_batch(layer: dict, label: str = "") -> str:
    """label + a layer record's batch_max_mean, or "" for a record written before it existed."""
    value = layer.get("batch_max_mean")
    return "" if value is None else f"{label}{value:.2f}"


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
            eta = f"  eta {fmt_duration(left)}"
        line = (f"step {rec['step']:>6}/{self.s.max_steps}  loss {rec['loss']:.4f}  ppl {rec['ppl']:.2f}  "
                f"lr {rec['lr']:.2e}  {rec['tokens_per_s']:,.0f} tok/s  grad {rec['grad_norm']:.3f}")
        if rec.get("layers"):
            worst = max(rec["layers"], key=lambda ll: ll["max_mean"])  # as the collapse alarm ranks layers
            line += (f"  bal {rec['aux_loss']:.4f}  z {rec['z_loss']:.4f}  "
                     f"max/mean {worst['max_mean']:.2f}{_per_batch(worst, ', per batch ')} (layer {worst['layer']})")
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
                f"  layer {ll['layer']:>2} load {plain_heat_row(ll['load'])}  max/mean {ll['max_mean']:.2f}"
                f"{_per_batch(ll, '  per batch ')}  cv {ll['cv']:.2f}  dropped {ll['dropped_frac']:.1%}",
                markup=False, highlight=False, soft_wrap=True)

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
                t.add_column("per batch", justify="right")
                t.add_column("cv", justify="right")
                t.add_column("dropped", justify="right")
                t.add_column("entropy", justify="right")
                for ll in r["layers"]:
                    mm_style = "red" if ll["max_mean"] > OVERLOADED else ""
                    t.add_row(str(ll["layer"]), heat_row(ll["load"]), Text(f"{ll['max_mean']:.2f}", style=mm_style),
                              _per_batch(ll) or "-", f"{ll['cv']:.2f}", f"{ll['dropped_frac']:.1%}", f"{ll['entropy']:.2f}")
                body.append(t)
        for msg in self.s.alarms[:4]:
            body.append(Text(f"⚠ {msg}", style="yellow"))
        parts.append(Panel(Group(*body), title=f"[bold]{self.name}[/]", title_align="left", border_style="blue"))
        return Group(*parts)
