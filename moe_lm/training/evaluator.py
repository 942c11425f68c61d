"""The trainer's validation: the same seeded windows at every evaluation, the expert load over
them, and the collapse alarm that watches that load.

    evaluator = Evaluator(cfg, data, ctx, model.moe_layer_ids())
    last_val = evaluator.evaluate(parts, progress, log, display)   # -> {"step", "val_loss", "val_ppl"}

An evaluation writes its eval record to metrics.jsonl, shows it, feeds the per-layer load
(LayerLoad objects at the precision the record keeps) to the alarm, and logs and shows any alarm
that fires. It runs under a forked RNG, so it never changes what training draws next (exact resume).
`moe-lm eval` (moe_lm.evaluation) reproduces its loss from a checkpoint: same windows, same seed.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import distributed
from ..config import Config
from ..data.shards import eval_windows
from .alarm import CollapseAlarm
from .load import LoadMeter
from .metrics import RunLog, eval_record, event_record


class Evaluator:
    """Validation during training; `alarm` is the run's collapse alarm (its counters go into
    checkpoints)."""

    def __init__(self, cfg: Config, data: Any, ctx: distributed.Dist, layer_ids: list[int]):
        t = cfg.train
        micro_bs = t.batch_size // t.grad_accum
        lo, hi = ctx.rank * (micro_bs // ctx.world_size), (ctx.rank + 1) * (micro_bs // ctx.world_size)
        # the same seeded validation windows at every evaluation: eval_batches batches of
        # train.batch_size windows, whatever grad_accum (a memory setting: it used to draw windows of
        # the micro-batch's size, so the val loss changed with it), run in micro-batches as training
        # runs; each rank takes its rows of each micro-batch
        self.batches = [(xm[lo:hi], ym[lo:hi])
                        for x, y in eval_windows(data.split("val"), cfg.model.seq_len, t.batch_size,
                                                 n_batches=t.eval_batches, seed=t.seed)
                        for xm, ym in zip(x.split(micro_bs), y.split(micro_bs))]
        self.meter = LoadMeter(layer_ids, ctx)
        self.alarm = CollapseAlarm(cfg.model.moe)
        self.ctx = ctx

    def evaluate(self, parts: Any, progress: Any, log: RunLog, display: Any) -> dict:
        """Evaluate `parts` (step.Parts) at `progress` (runs.Progress): log and show the eval
        record, update the collapse alarm. Returns {"step", "val_loss", "val_ppl"} as logged."""
        val_loss = evaluate(parts.forward, parts.model, self.batches, parts.device, parts.amp, self.meter, self.ctx)
        # NOTE: the alarm judges the load as metrics.jsonl records it, so every alarm can be checked
        # against the log to the last digit (and fires at the same evaluations as it always has)
        layers = [ll.rounded() for ll in self.meter.read()]
        rec = eval_record(step=progress.step, tokens=progress.tokens, flops=progress.flops, wall_s=progress.wall_s,
                          val_loss=val_loss, layers=layers)
        log.write(rec)
        display.on_eval(rec)
        fired = self.alarm.update(progress.step, layers)
        for a in fired:
            log.write(event_record(step=progress.step, event="collapse", message=a.message, alarm=a.to_json()))
        display.on_alarms(self.alarm.active, fired)
        return {"step": progress.step, "val_loss": rec["val_loss"], "val_ppl": rec["val_ppl"]}


@torch.no_grad()
def evaluate(forward, model: torch.nn.Module, batches: list, device: torch.device, amp, meter: LoadMeter,
             ctx: distributed.Dist = distributed.SINGLE) -> float:
    """Mean validation cross-entropy (nats/token) over fixed windows `batches` of (x, y)
    [rows, seq_len]; `meter` sums the MoE statistics. Runs under a forked RNG so an evaluation
    never changes what training draws next (exact resume). Under torchrun each rank passes its rows
    of the windows and gets the mean over all of them."""
    model.eval()
    total, count = 0.0, 0
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with amp():
                out = forward(x, y)
            total += float(out.loss) * y.numel()
            count += y.numel()
            meter.add(out.moe_stats)
    model.train()
    if ctx.enabled:
        total, count = ctx.all_reduce_(torch.tensor([total, count], dtype=torch.float64, device=device)).tolist()
    return total / max(count, 1)
