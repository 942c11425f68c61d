"""Expert-load statistics and the collapse alarm."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import pytest
import torch
from rich.console import Console

from moe_lm.config import MoEConfig
from moe_lm.stats import load_summary, perplexity
from moe_lm.training.alarm import CollapseAlarm
from moe_lm.training.display import TrainDisplay
from moe_lm.training.load import LayerLoad, LoadMeter
from moe_lm.training.metrics import JsonlSink, read_metrics, truncate_metrics


@dataclass
class Stats:  # the fields of moe_lm.model.MoEStats the meter reads
    load: torch.Tensor
    importance: torch.Tensor
    dropped_frac: float
    entropy: float
    balance_loss: torch.Tensor
    z_loss: torch.Tensor


def layer(shares: list[float], idx: int = 0) -> LayerLoad:
    s, mm, cv = load_summary(shares)
    return LayerLoad(idx, s, mm, cv, 0.0, 1.0, 0.0, 0.0)


def test_load_summary_shares_sum_to_one_with_max_over_mean_and_cv():
    shares, max_mean, cv = load_summary([30.0, 10.0, 10.0, 10.0])
    assert shares == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6]) and sum(shares) == pytest.approx(1.0)
    assert max_mean == pytest.approx(2.0)
    assert cv == pytest.approx(math.sqrt(((30 - 15) ** 2 + 3 * (10 - 15) ** 2) / 4) / 15)
    assert load_summary([0.0, 0.0]) == ([0.5, 0.5], 1.0, 0.0)


def test_load_meter_sums_counts_over_micro_batches_per_layer():
    meter = LoadMeter([1, 3])
    for _ in range(2):
        meter.add([Stats(torch.tensor([3.0, 1.0]), torch.zeros(2), 0.5, 0.7, torch.tensor(0.02), torch.tensor(0.0)),
                   Stats(torch.tensor([2.0, 2.0]), torch.zeros(2), 0.0, 0.6, torch.tensor(0.01), torch.tensor(0.1))])
    first, second = meter.read()
    assert (first.layer, second.layer) == (1, 3)
    assert first.load == pytest.approx([0.75, 0.25]) and first.dropped_frac == pytest.approx(0.5)
    assert second.load == pytest.approx([0.5, 0.5]) and second.max_mean == pytest.approx(1.0)
    assert second.z_loss == pytest.approx(0.1) and first.balance_loss == pytest.approx(0.02)
    assert meter.read() == []  # a new window


def test_batch_max_mean_sees_the_imbalance_that_the_windows_summed_load_averages_away():
    # the busiest expert alternates: [3, 1] then [1, 3] sum to [4, 4] (max/mean 1) while each batch
    # has max/mean 3 / 2 = 1.5; a third batch [2, 2] (1.0) makes the mean (1.5 + 1.5 + 1.0) / 3
    meter = LoadMeter([0])
    for load in ([3.0, 1.0], [1.0, 3.0], [2.0, 2.0]):
        meter.add([Stats(torch.tensor(load), torch.zeros(2), 0.0, 0.7, torch.tensor(0.0), torch.tensor(0.0))])
    (ll,) = meter.read()
    assert ll.max_mean == pytest.approx(5 / 5) and ll.batch_max_mean == pytest.approx(4 / 3)
    assert ll.to_json()["batch_max_mean"] == pytest.approx(1.3333)
    meter.add([Stats(torch.zeros(2), torch.zeros(2), 0.0, 0.0, torch.tensor(0.0), torch.tensor(0.0))])
    assert meter.read()[0].batch_max_mean == 1.0  # no assignments: balanced by convention, as load_summary


def test_collapse_alarm_fires_after_consecutive_evaluations_naming_layer_and_expert():
    alarm = CollapseAlarm(MoEConfig(n_experts=4, balance_coef=0.01))
    starved = [0.40, 0.30, 0.29, 0.01]  # expert 3 < a quarter of uniform (0.0625)
    assert alarm.update(10, [layer(starved, idx=2)]) == []  # once is not yet a pattern
    fired = alarm.update(20, [layer(starved, idx=2)])
    assert len(fired) == 1
    a = fired[0]
    assert (a.layer, a.expert, a.kind) == (2, 3, "starved")
    assert "layer 2" in a.message and "expert 3" in a.message and "model.moe.balance_coef" in a.message
    assert alarm.update(30, [layer(starved, idx=2)]) == []  # fires once per episode ...
    assert len(alarm.active) == 1  # ... but stays on display
    alarm.update(40, [layer([0.25] * 4, idx=2)])  # recovers: re-armed
    assert alarm.active == []
    alarm.update(50, [layer(starved, idx=2)])
    assert len(alarm.update(60, [layer(starved, idx=2)])) == 1


def test_collapse_alarm_on_max_over_mean_above_three_and_its_state_survives_a_checkpoint():
    alarm = CollapseAlarm(MoEConfig(n_experts=8, router="sigmoid_bias", balance_loss="none", balance_coef=0.0))
    hot = [0.45] + [0.55 / 7] * 7  # max/mean = 3.6, nobody starved
    alarm.update(10, [layer(hot)])
    restored = CollapseAlarm(alarm.moe_cfg)
    restored.load_state_dict(alarm.state_dict())
    (a,) = restored.update(20, [layer(hot)])
    assert (a.kind, a.expert) == ("overloaded", 0) and "max/mean load 3.6" in a.message
    assert "bias_update_rate" in a.message  # advice fitted to the router


def test_plain_display_prints_periodic_lines_when_not_a_terminal():
    buf = io.StringIO()
    rec = {"step": 10, "tokens": 100, "loss": 3.0, "ce_loss": 2.9, "ppl": 18.2, "lr": 1e-3, "tokens_per_s": 900.0,
           "grad_norm": 0.5, "aux_loss": 0.01, "z_loss": 0.0,
           "layers": [{"layer": 0, "load": [0.5, 0.5], "max_mean": 1.0, "cv": 0.0, "dropped_frac": 0.0,
                       "entropy": 0.6}]}
    with TrainDisplay(Console(file=buf, width=200), name="x", start_step=0, max_steps=20, log_every=10) as d:
        d.on_train(rec)
        d.on_eval({"step": 10, "val_loss": 3.1, "val_ppl": 22.2, "layers": rec["layers"]})
    out = buf.getvalue()
    assert "step     10/20  loss 3.0000" in out and "val_ppl 22.20" in out and "max/mean 1.00" in out
    assert "per batch" not in out  # a record from before batch_max_mean: nothing made up
    assert "\x1b[" not in out  # no escape codes in a log file


def test_the_display_shows_the_per_batch_max_mean_of_the_layer_the_alarm_would_name():
    buf = io.StringIO()
    collapsed = {"layer": 0, "load": [0.75, 0.25], "max_mean": 1.5, "cv": 0.5, "dropped_frac": 0.0, "entropy": 0.6,
                 "batch_max_mean": 1.6}
    noisy = {"layer": 1, "load": [0.55, 0.45], "max_mean": 1.1, "cv": 0.1, "dropped_frac": 0.0, "entropy": 0.6,
             "batch_max_mean": 1.9}
    rec = {"step": 10, "tokens": 100, "loss": 3.0, "ce_loss": 2.9, "ppl": 18.2, "lr": 1e-3, "tokens_per_s": 900.0,
           "grad_norm": 0.5, "aux_loss": 0.01, "z_loss": 0.0, "layers": [collapsed, noisy]}
    with TrainDisplay(Console(file=buf, width=200), name="x", start_step=0, max_steps=20, log_every=10) as d:
        d.on_train(rec)
        d.on_eval({"step": 10, "val_loss": 3.1, "val_ppl": 22.2, "layers": rec["layers"]})
    out = buf.getvalue()
    assert "max/mean 1.50, per batch 1.60 (layer 0)" in out  # the layer with the largest summed max/mean
    assert "max/mean 1.10  per batch 1.90  cv 0.10" in out  # each layer on the eval lines


def test_perplexity_caps_instead_of_overflowing():
    assert perplexity(0.0) == 1.0 and math.isfinite(perplexity(1e4)) and math.isnan(perplexity(float("nan")))


def test_truncating_metrics_on_resume_keeps_one_trajectory_and_skips_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in range(1, 6):
        sink.write({"kind": "train", "step": step})
    sink.close()
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # a kill mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_collapse_alarm_leaves_out_the_untrained_step_0_evaluation():
    """Issue 14 case 17: the step-0 evaluation of an untrained router counted towards the alarm, so
    an evaluation at step 50 that still looked skewed fired it. Step 0 now counts for nothing."""
    alarm = CollapseAlarm(MoEConfig(n_experts=8, router="noisy_topk", balance_loss="shazeer"))
    tied = [0.5, 0.5] + [0.0] * 6  # all tokens on experts 0 and 1: max/mean 4, six starved
    assert alarm.update(0, [layer(tied)]) == [] and alarm.active == []
    assert alarm.update(50, [layer(tied)]) == []  # the first evaluation that counts
    assert len(alarm.update(100, [layer(tied)])) > 0  # a collapse after training is still caught
