"""metrics.jsonl: the records training writes (schema: docs/METRICS.md), where they go, and reading
them back.

    log = RunLog(run_dir, tensorboard=False)    # metrics.jsonl (+ TensorBoard); RunLog(None): nowhere
    log.write(train_record(...))                 # one JSON object per line, flushed at once
    records = read_metrics(run_dir / "metrics.jsonl")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..files import write_atomic
from ..stats import perplexity, round_sig
from .load import LayerLoad


def train_record(*, step: int, tokens: int, flops: float, wall_s: float, lr: float, loss: float,
                 ce_loss: float, aux_loss: float, z_loss: float, grad_norm: float,
                 tokens_per_s: float, layers: list[LayerLoad]) -> dict:
    return {
        "kind": "train", "step": step, "tokens": tokens, "flops": flops, "wall_s": round(wall_s, 3),
        "lr": round_sig(lr), "loss": round_sig(loss), "ce_loss": round_sig(ce_loss),
        "ppl": round_sig(perplexity(ce_loss)),
        "aux_loss": round_sig(aux_loss), "z_loss": round_sig(z_loss), "grad_norm": round_sig(grad_norm),
        "tokens_per_s": round(tokens_per_s, 1), "layers": [ll.to_json() for ll in layers],
    }


def eval_record(*, step: int, tokens: int, flops: float, wall_s: float, val_loss: float,
                layers: list[LayerLoad]) -> dict:
    return {
        "kind": "eval", "step": step, "tokens": tokens, "flops": flops, "wall_s": round(wall_s, 3),
        "val_loss": round_sig(val_loss), "val_ppl": round_sig(perplexity(val_loss)),
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


class RunLog:
    """Where a run's records go: metrics.jsonl, and TensorBoard when asked. `RunLog(None)` writes
    nothing (the torchrun ranks other than 0)."""

    def __init__(self, run_dir: Optional[Path], tensorboard: bool = False):
        self.jsonl = JsonlSink(Path(run_dir) / "metrics.jsonl") if run_dir is not None else None
        self.tb = TensorBoardSink(Path(run_dir) / "tensorboard") if run_dir is not None and tensorboard else None

    def write(self, record: dict) -> None:
        for sink in (self.jsonl, self.tb):
            if sink is not None:
                sink.write(record)

    def close(self) -> None:
        for sink in (self.jsonl, self.tb):
            if sink is not None:
                sink.close()


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
            if "batch_max_mean" in ll:
                self.w.add_scalar(f"{prefix}/batch_max_mean", ll["batch_max_mean"], step)
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
