"""The collapse alarm: experts that stop getting tokens, or a layer whose load piles onto a few.

    alarm = CollapseAlarm(cfg.model.moe)
    fired = alarm.update(step, layers)     # at each evaluation: LayerLoad objects (training.load)

It fires when an expert's share of the tokens stays under stats.STARVED x the uniform share, or a
layer's max/mean load stays above stats.OVERLOADED, for ALARM_PATIENCE evaluations in a row, and
says what to change for this router and balance loss (`balance_advice`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..stats import OVERLOADED, STARVED
from .load import LayerLoad

ALARM_PATIENCE = 2  # evaluations in a row

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
        self.high: dict[str, int] = {}  # layer -> count of max/mean > OVERLOADED
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
                low[e] = low[e] + 1 if share < STARVED * uniform else 0
                if low[e] >= self.patience:
                    a = Alarm(step, ll.layer, e, "starved", share, low[e], "")
                    a.message = (f"expert collapse in layer {ll.layer}: expert {e} got {share:.1%} of the "
                                 f"tokens (uniform {uniform:.1%}) at {low[e]} evaluations in a row; "
                                 f"{balance_advice(self.moe_cfg)}")
                    active.append(a)
                    if low[e] == self.patience:
                        fired.append(a)
            high = self.high.get(key, 0)
            high = high + 1 if ll.max_mean > OVERLOADED else 0
            self.high[key] = high
            if high >= self.patience:
                busiest = max(range(n), key=lambda i: ll.load[i])
                a = Alarm(step, ll.layer, busiest, "overloaded", ll.max_mean, high, "")
                a.message = (f"expert collapse in layer {ll.layer}: max/mean load {ll.max_mean:.1f} > "
                             f"{OVERLOADED:g} at {high} evaluations in a row (expert {busiest} takes "
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
