"""The numbers training, evaluation and their reports share: perplexity, the summary of an expert
load, and the thresholds that call an expert starved or a layer overloaded.

    perplexity(5.0)                        # exp(loss), 148.41...
    shares, max_mean, cv = load_summary([10, 30, 0, 40])

One definition each, so the trainer's collapse alarm, its console display, `moe-lm eval`'s
routing report and the routing page call the same expert starved.
"""

from __future__ import annotations

import math

# An expert whose share of the routed assignments is under STARVED x the uniform share (1 / E) is
# starved: the collapse alarm counts it, the displays colour it red, eval lists it.
STARVED = 0.25
# A layer whose max / mean expert load is above OVERLOADED is overloaded (the alarm's other test).
OVERLOADED = 3.0
# Losses are capped here before exp(), so a diverging loss prints as a large perplexity, not inf.
PPL_LOSS_CAP = 50.0


def perplexity(loss: float) -> float:
    """exp(loss) for a mean cross-entropy in nats/token, capped at exp(PPL_LOSS_CAP); nan for a
    non-finite loss."""
    if not math.isfinite(loss):
        return float("nan")
    return math.exp(min(loss, PPL_LOSS_CAP))


def round_sig(x: float, digits: int = 8) -> float:
    """x to `digits` significant digits (None and non-finite values as they are).

    NOTE: 8 significant digits keep a float32 value (~7.2 digits) whole: two runs that should
    agree (a resume, N processes against one) can be compared from their metrics.jsonl."""
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def load_summary(counts: list[float]) -> tuple[list[float], float, float]:
    """Per-expert counts [E] -> (shares [E] summing to 1, max/mean, coefficient of variation =
    population std / mean). No assignments at all: uniform shares, 1.0, 0.0."""
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
