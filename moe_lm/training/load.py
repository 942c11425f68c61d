"""Expert-load statistics over a window of training steps (or one evaluation), per MoE layer.

    meter = LoadMeter(layer_ids=[0, 1, 2, 3])
    meter.add(out.moe_stats)              # every micro-batch; stays on the device (no host sync)
    layers = meter.read()                 # one LayerLoad per MoE layer, then a new window

The trainer logs them (metrics.train_record / eval_record), shows them (display.TrainDisplay) and
feeds the validation ones to the collapse alarm (alarm.CollapseAlarm), as LayerLoad objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..stats import load_summary, round_sig


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
    # max / mean of each micro-batch's own per-expert load, averaged over the window. max_mean is
    # that of the window's summed load: when the busiest expert changes from step to step (early
    # training) the sum looks balanced while every batch is not (1.4 against 6 in a 30-step run)
    batch_max_mean: float = 1.0

    def rounded(self) -> "LayerLoad":
        """The same load at the precision metrics.jsonl keeps: shares and dropped fraction to 6
        decimals, max/mean, cv and entropy to 4, the losses to 8 significant digits."""
        return LayerLoad(self.layer, [round(s, 6) for s in self.load], round(self.max_mean, 4), round(self.cv, 4),
                         round(self.dropped_frac, 6), round(self.entropy, 4), round_sig(self.balance_loss),
                         round_sig(self.z_loss), round(self.batch_max_mean, 4))

    def to_json(self) -> dict:
        """A metrics.jsonl "layers" entry (rounded; keys in field order)."""
        return dataclasses.asdict(self.rounded())


def _scalar(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float().reshape(())
    return torch.tensor(float(x))


class LoadMeter:
    """Sums the MoE layers' statistics over micro-batches and steps until `read()`.

    Sums stay tensors on the model's device, so `add` never waits for the accelerator.
    dist (a moe_lm.distributed.Dist, under torchrun): `read()` sums the loads over the ranks and
    averages the rest, so every rank reads the global batch's statistics (a collective); a "batch"
    of batch_max_mean is then one rank's micro-batch.
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
            mean = load.mean()
            batch_max_mean = torch.where(mean > 0, load.max() / mean.clamp_min(1e-30), torch.ones_like(mean))
            # dropped_frac, entropy, balance_loss, z_loss, batch_max_mean: averaged over the window
            row = torch.stack([_scalar(s.dropped_frac).to(load.device), _scalar(s.entropy).to(load.device),
                               _scalar(s.balance_loss).to(load.device), _scalar(s.z_loss).to(load.device),
                               batch_max_mean])
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
            dropped, entropy, bal, z, batch_max_mean = (sums / self._n).cpu().tolist()
            shares, max_mean, cv = load_summary(counts)
            out.append(LayerLoad(layer, shares, max_mean, cv, dropped, entropy, bal, z, batch_max_mean))
        self.reset()
        return out
