"""`moe-lm compare-dense`: a fair twin, honest verdicts, and a comparison that resumes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from moe_lm.compare import (compare_dense, equal_wall_clock, gap_vs_tokens, paired_stats, variant_configs,
                            verdict)
from moe_lm.config import config_differences, load_config
from moe_lm.errors import ConfigError, RunError
from moe_lm.model.accounting import flops_per_token
from moe_lm.training.metrics import read_metrics
from moe_lm.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


def tiny(data_dir: Path, *extra: str) -> list[str]:
    return [f"data.dir={data_dir}", "model.d_model=32", "model.n_heads=2", "model.n_layers=2",
            "model.seq_len=32", "model.ffn_hidden=32", "model.moe.n_experts=4", "train.batch_size=4",
            "train.warmup_steps=2", "train.eval_batches=2", "train.eval_every=3", "train.checkpoint_every=3",
            "train.max_steps=6", "train.device=cpu", *extra]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=140)


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(p).model.moe is not None], ids=lambda p: p.stem)
def test_the_twin_differs_from_the_moe_only_in_the_ffn(path):
    cfg = load_config(path, ["model.vocab_size=512"])
    twin = variant_configs(cfg)["dense"]
    diffs = config_differences(cfg, twin)
    moe = cfg.model.moe
    per_token = moe.capacity_factor if moe.router == "expert_choice" else moe.top_k
    if moe.every == 1:  # the twin's FFN is as wide as the experts a token visits
        assert twin.model.ffn_hidden == round((per_token + moe.n_shared_experts) * cfg.model.ffn_hidden)
    assert all(k == "name" or k == "model.ffn_hidden" or k.startswith("model.moe") for k in diffs), diffs
    # equal FLOPs per token, the router's apart (the MoE's active width = top_k x expert width)
    if cfg.model.moe.every == 1:
        assert flops_per_token(twin.model)["total"] == flops_per_token(cfg.model)["dense"]


def test_the_dense_total_reference_has_the_moes_total_parameters():
    from moe_lm.model.accounting import param_counts

    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", ["model.vocab_size=8192"])
    v = variant_configs(cfg, with_dense_total=True)
    total = param_counts(v["dense-total"].model)["total"]
    moe = param_counts(cfg.model)
    assert abs(total - moe["total"]) / moe["total"] < 0.01
    assert param_counts(v["dense-total"].model)["active"] == total  # dense: every parameter is active
    # the twin's differences, and muP's rate for the wider FFN's output matrices (nothing else)
    assert set(config_differences(cfg, v["dense-total"])) == set(config_differences(cfg, v["dense"])) | {
        "train.ffn_out_lr_scale"}


def test_a_dense_config_is_refused():
    with pytest.raises(ConfigError, match="needs an MoE config"):
        variant_configs(load_config(ROOT / "configs" / "tiny-dense.yaml"))


def test_the_verdict_claims_a_win_only_when_every_moe_seed_is_below_every_dense_seed():
    text, pct, win = verdict([90.0, 91.0, 92.0], [100.0, 101.0, 99.0])
    assert win and pct == pytest.approx(100 * (91 - 100) / 100)
    assert text.startswith("MoE is 9.0% lower in perplexity at equal training FLOPs (3 seeds; every MoE seed below every dense seed)")
    text, pct, win = verdict([90.0, 99.5, 92.0], [100.0, 101.0, 99.0])  # overlapping seeds
    assert not win and "within the spread" in text
    text, pct, win = verdict([110.0, 111.0, 112.0], [100.0, 101.0, 102.0])
    assert not win and "does not pay" in text
    assert pct == pytest.approx(100 * (111 - 101) / 101)  # the table's "vs dense twin": against the twin
    # "x% lower than the MoE" is against the MoE: 101 is 9.0% below 111 (not the 9.9% above it)
    assert text.startswith(f"the dense twin is {100 * (111 - 101) / 111:.1f}% lower in perplexity than the MoE")
    text, _, _ = verdict([150.0, 151.0, 152.0], [100.0, 101.0, 102.0])
    assert text.startswith("the dense twin is 33.1% lower")  # 101 / 151 = 0.669 (the trial's case: not 49.5%)
    for moe, dense in (([90.0], [100.0]), ([100.4], [100.0])):  # one seed has no spread: no claim either way
        text, _, win = verdict(moe, dense)
        assert not win and "1 seed: no spread" in text and "every" not in text


def test_with_two_seeds_the_verdict_never_claims_a_win():
    # two hand-made outcomes in which every seed of one model is below every seed of the other: with
    # no real difference each of the C(4, 2) = 6 orderings of four perplexities is equally likely,
    # so this happens by chance 1 time in 6 for either side - not evidence of a winner
    for moe, dense, lower in (([90.0, 91.0], [100.0, 101.0], "MoE"), ([110.0, 111.0], [100.0, 101.0], "the dense twin")):
        text, pct, win = verdict(moe, dense)
        assert win is False
        assert pct == pytest.approx(100 * (sum(moe) / 2 - sum(dense) / 2) / (sum(dense) / 2))
        higher, low = max(sum(moe), sum(dense)) / 2, min(sum(moe), sum(dense)) / 2
        assert text.startswith(f"{lower} is {100 * (higher - low) / higher:.1f}% lower")
        assert "1 time in 6" in text and "--seeds 3" in text
        assert "does not pay" not in text  # no claim for the dense side either
    # three seeds each: 1 time in 20 by chance, and the verdict may speak
    assert verdict([90.0, 91.0, 92.0], [100.0, 101.0, 102.0])[2] is True


def test_an_interrupted_compare_resumes_and_a_finished_one_is_reused(tiny_data_dir, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir))
    out = tmp_path / "cmp"
    # the state an interrupted compare leaves: the first MoE run stopped at step 3 of 6
    first = variant_configs(cfg)["moe"]
    first.name = "tiny-moe-moe-seed0"
    train(first, out_dir=out / "runs" / "moe-seed0", console=quiet(), plots=False, stop_after=3)

    report = compare_dense(cfg, seeds=2, out_dir=out, console=quiet())
    moe0 = out / "runs" / "moe-seed0"
    events = [r["event"] for r in read_metrics(moe0 / "metrics.jsonl") if r["kind"] == "event"]
    assert "resume" in events  # continued from its checkpoint, not restarted
    assert [(r["variant"], r["seed"], r["reused"]) for r in report["runs"]] == [
        ("moe", 0, False), ("dense", 0, False), ("moe", 1, False), ("dense", 1, False)]
    for r in report["runs"]:
        assert r["tokens"] == 6 * 4 * 32  # same tokens and schedule for every run
    for name in ("report.md", "report.json", "val_loss_vs_flops.png", "val_loss_vs_wall.png", "gap_vs_tokens.png"):
        assert (out / name).is_file(), name
    # the gap figure's data, read back from each pair's metrics.jsonl by hand
    gap = report["gap_vs_tokens"]
    for s, per_seed in enumerate(gap["per_seed"]):
        m = {r["step"]: r["val_loss"] for r in read_metrics(out / "runs" / f"moe-seed{s}" / "metrics.jsonl") if r["kind"] == "eval"}
        d = {r["step"]: r["val_loss"] for r in read_metrics(out / "runs" / f"dense-seed{s}" / "metrics.jsonl") if r["kind"] == "eval"}
        assert gap["steps"] == sorted(k for k in m if k > 0) == [3, 6]
        assert per_seed == pytest.approx([m[k] - d[k] for k in gap["steps"]])
    assert gap["tokens"] == [3 * 4 * 32, 6 * 4 * 32]
    assert gap["mean"] == pytest.approx([(a + b) / 2 for a, b in zip(*gap["per_seed"])])
    assert "paired by seed" in (out / "report.md").read_text()
    md = (out / "report.md").read_text()
    assert report["verdict"] in md and "![Validation loss against training FLOPs]" in md

    again = compare_dense(cfg, seeds=2, out_dir=out, console=quiet())
    assert all(r["reused"] for r in again["runs"])
    assert again["variants"]["moe"]["val_ppl"] == report["variants"]["moe"]["val_ppl"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["variants"]["dense"]["val_ppl"] == report["variants"]["dense"]["val_ppl"]

    # the same seeds see the same data: the seed-0 runs of both variants drew identical batches,
    # so their token counts and FLOP bookkeeping line up step for step
    m = {r["step"]: r["flops"] for r in read_metrics(moe0 / "metrics.jsonl") if r["kind"] == "eval"}
    d = {r["step"]: r["flops"] for r in read_metrics(out / "runs" / "dense-seed0" / "metrics.jsonl") if r["kind"] == "eval"}
    assert sorted(m) == sorted(d)

    # a changed config does not silently reuse the old runs
    other = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "train.lr=1e-4"))
    with pytest.raises(RunError, match="another config"):
        compare_dense(other, seeds=1, out_dir=out, console=quiet())


def test_sigterm_stops_compare_dense_with_143_and_the_same_command_continues(tiny_data_dir, tmp_path):
    # SIGTERM (kill, docker stop, a scheduler) stops it as Ctrl-C does: the run in training saves
    # a checkpoint, the process exits 128 + 15, and running the command again resumes that run
    import signal
    import time

    from moe_lm.training import checkpoint as ckpt_io

    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "moe_lm", "compare-dense", "-c", str(ROOT / "configs" / "tiny-moe.yaml"),
           "--seeds", "1", "--out", str(out), "--device", "cpu", *tiny(tiny_data_dir, "train.log_every=1")]
    # 120 steps: still training when the signal comes (it is sent right after step 3), short to finish
    steps = ["train.max_steps=120", "train.eval_every=60", "train.checkpoint_every=60"]
    proc = subprocess.Popen([*cmd, *steps], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "runs" / "moe-seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not any(r.get("kind") == "train" and r["step"] >= 3 for r in read_metrics(metrics)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "run the same command again" in err and "Traceback" not in err
    stopped_at = ckpt_io.read_state(ckpt_io.find_latest(out / "runs" / "moe-seed0"))["step"]
    assert stopped_at >= 3

    assert stopped_at < 120
    # the same command again (in process here)
    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "train.log_every=1", *steps))
    compare_dense(cfg, seeds=1, out_dir=out, device="cpu", console=quiet())
    records = read_metrics(metrics)
    assert [r["event"] for r in records if r["kind"] == "event"].count("resume") == 1
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 121))  # unbroken
    # resumed on its own schedule: one entry, not [120, 120]
    assert ckpt_io.read_state(ckpt_io.find_latest(out / "runs" / "moe-seed0"))["max_steps_history"] == [120]


def test_a_run_of_another_length_is_refused_before_anything_trains(tiny_data_dir, tmp_path):
    # A finished 6-step comparison, then the same command with 4 and with 8 steps into the same
    # folder. Reusing the 6-step runs would report unequal FLOPs under "equal training FLOPs";
    # extending them would follow a learning-rate schedule that had already decayed to its end
    # (what no fresh 8-step run does). Both are refused before anything trains, nothing changed.
    out = tmp_path / "cmp"
    compare_dense(load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir)), seeds=1, out_dir=out,
                  console=quiet())
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    for steps, why in ((4, "at step 6, past train.max_steps = 4"),
                       (8, "its learning-rate schedule ran to train.max_steps = 6, not 8")):
        other = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, f"train.max_steps={steps}"))
        with pytest.raises(RunError, match=why) as err:
            compare_dense(other, seeds=2, out_dir=out, console=quiet())
        assert "moe-seed0 holds a run of another length" in str(err.value)
        assert "--overwrite" in err.value.hint
        assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    # the CLI: one line, exit 2
    proc = subprocess.run([sys.executable, "-m", "moe_lm", "compare-dense", "-c", str(ROOT / "configs" / "tiny-moe.yaml"),
                           "--seeds", "1", "--out", str(out), *tiny(tiny_data_dir, "train.max_steps=4")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "past train.max_steps = 4" in lines[0], proc.stderr
    # a bad run that is not the first to train is refused before the first trains (seed 1's runs
    # from a 4-step comparison that started at seed 1, then 2 seeds from seed 0 at 6 steps)
    other = tmp_path / "cmp-seed1"
    compare_dense(load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "train.seed=1",
                                                                      "train.max_steps=4")),
                  seeds=1, out_dir=other, console=quiet())
    with pytest.raises(RunError, match="moe-seed1 holds a run of another length: its learning-rate schedule ran to train.max_steps = 4, not 6"):
        compare_dense(load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir)), seeds=2, out_dir=other,
                      console=quiet())
    assert not (other / "runs" / "moe-seed0").exists()
    # --overwrite trains them again, at the asked length
    report = compare_dense(load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "train.max_steps=4")),
                           seeds=1, out_dir=out, console=quiet(), overwrite=True)
    assert [r["tokens"] for r in report["runs"]] == [4 * 4 * 32, 4 * 4 * 32]


def test_a_run_extended_by_train_resume_is_not_taken_as_a_run_of_its_new_length(tiny_data_dir, tmp_path):
    from moe_lm.training.runs import find_run

    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "model.vocab_size=512"))
    run = train(cfg, out_dir=tmp_path / "run", console=quiet(), plots=False).run_dir
    assert find_run(run, cfg).schedules == [6]
    longer = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "model.vocab_size=512",
                                                                               "train.max_steps=9"))
    train(longer, out_dir=run, resume="auto", console=quiet(), plots=False, stop_after=6)  # no step trained
    assert find_run(run, longer).schedules == [6]
    train(longer, out_dir=run, resume="auto", console=quiet(), plots=False)  # what `train` allows
    found = find_run(run, longer)
    assert found.step == 9 and found.finished and found.schedules == [6, 9]
    with pytest.raises(RunError, match="ran to train.max_steps = 6, then 9, not 9"):
        compare_dense(longer, seeds=1, out_dir=tmp_path / "a", console=quiet(), reuse_moe=run)
    with pytest.raises(RunError, match="at step 9, past train.max_steps = 6"):
        compare_dense(cfg, seeds=1, out_dir=tmp_path / "b", console=quiet(), reuse_moe=run)
    # refused with --overwrite too, before the MoE seed already there is deleted
    good = train(cfg, out_dir=tmp_path / "good", console=quiet(), plots=False).run_dir
    compare_dense(cfg, seeds=1, out_dir=tmp_path / "c", console=quiet(), reuse_moe=good)
    kept = tmp_path / "c" / "runs" / "moe-seed0" / "checkpoints" / "step-0000006" / "model.safetensors"
    with pytest.raises(RunError, match="extended by `train --resume`"):
        compare_dense(longer, seeds=1, out_dir=tmp_path / "c", console=quiet(), reuse_moe=run, overwrite=True)
    assert kept.read_bytes() == (good / "checkpoints" / "step-0000006" / "model.safetensors").read_bytes()
    # a checkpoint written before the record existed: its config.yaml's max_steps stands in
    state_file = found.checkpoint / "state.json"
    state = json.loads(state_file.read_text())
    del state["max_steps_history"]
    state_file.write_text(json.dumps(state))
    assert find_run(run, longer).schedules == [9]


def test_cli_refuses_a_dense_config_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "moe_lm", "compare-dense", "-c", "configs/tiny-dense.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1
    assert "needs an MoE config" in proc.stderr


def test_reuse_moe_adopts_a_finished_train_run_as_the_first_seed(tiny_data_dir, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir))
    run = train(cfg, out_dir=tmp_path / "run", console=quiet(), plots=False).run_dir

    adopted = compare_dense(cfg, seeds=1, out_dir=tmp_path / "a", console=quiet(), reuse_moe=run)
    assert [(r["variant"], r["reused"]) for r in adopted["runs"]] == [("moe", True), ("dense", False)]
    from moe_lm.compare import paired_lines, table_rows

    rows = {r[0]: r[1:] for r in table_rows(adopted)}  # one seed: no spread to show, not "± 0.00"
    assert all(c.endswith(" (1 seed)") and "±" not in c for c in rows["val perplexity (mean ± std)"])
    assert "(one pair: no spread)" in paired_lines(adopted)[0] and "std over pairs" not in paired_lines(adopted)[0]
    ckpt = "checkpoints/step-0000006/model.safetensors"
    assert (tmp_path / "a" / "runs" / "moe-seed0" / ckpt).read_bytes() == (run / ckpt).read_bytes()
    # the same figures as a comparison that trains its own first MoE seed
    fresh = compare_dense(cfg, seeds=1, out_dir=tmp_path / "b", console=quiet())
    assert adopted["variants"]["moe"]["val_ppl"] == fresh["variants"]["moe"]["val_ppl"]

    other = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "train.lr=1e-4"))
    with pytest.raises(RunError, match="another config"):
        compare_dense(other, seeds=1, out_dir=tmp_path / "c", console=quiet(), reuse_moe=run)
    half = train(cfg, out_dir=tmp_path / "half", console=quiet(), plots=False, stop_after=3).run_dir
    with pytest.raises(RunError, match="stopped at step 3"):
        compare_dense(cfg, seeds=1, out_dir=tmp_path / "d", console=quiet(), reuse_moe=half)
    with pytest.raises(RunError, match="no finished run"):
        compare_dense(cfg, seeds=1, out_dir=tmp_path / "e", console=quiet(), reuse_moe=tmp_path / "nowhere")


def test_paired_statistics_against_numbers_worked_out_by_hand():
    import math

    # losses chosen so the perplexity ratios are round: exp(m - d) = 0.9, 0.8, 1.1
    dense = [3.0, 3.2, 3.1]
    moe = [3.0 + math.log(0.9), 3.2 + math.log(0.8), 3.1 + math.log(1.1)]
    p = paired_stats(moe, dense)
    assert p["d_ppl_pct"] == pytest.approx([-10.0, -20.0, 10.0])
    assert p["d_ppl_pct_mean"] == pytest.approx(-20.0 / 3)
    # sample std of (-10, -20, 10): mean -6.667, squared deviations 11.11 + 177.78 + 277.78 = 466.67, / 2, sqrt
    assert p["d_ppl_pct_std"] == pytest.approx(math.sqrt(466.6667 / 2), rel=1e-4)
    assert p["d_loss"] == pytest.approx([math.log(0.9), math.log(0.8), math.log(1.1)])
    assert (p["pairs"], p["moe_better"]) == (3, 2)
    assert p["sign_test_p"] == pytest.approx(1.0)  # 2 of 3: P(X <= 1) * 2 = (1 + 3) / 8 * 2 = 1
    every = paired_stats([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert every["moe_better"] == 3 and every["sign_test_p"] == pytest.approx(0.25)  # 2 x (1/2)^3
    five = paired_stats([1.0] * 5, [2.0] * 5)
    assert five["sign_test_p"] == pytest.approx(2 / 32)
    one = paired_stats([1.0], [2.0])
    assert one["d_ppl_pct_std"] == 0.0 and one["sign_test_p"] == pytest.approx(1.0)


def test_equal_wall_clock_interpolates_the_moe_curve_at_the_dense_runs_final_time():
    moe = [{"step": 0, "wall_s": 0.0, "val_loss": 9.0}, {"step": 50, "wall_s": 10.0, "val_loss": 5.0},
           {"step": 100, "wall_s": 20.0, "val_loss": 4.0}]
    dense = [{"step": 0, "wall_s": 0.0, "val_loss": 9.0}, {"step": 100, "wall_s": 16.0, "val_loss": 4.5}]
    w = equal_wall_clock([moe], [dense])
    # at 16 s the MoE is 6/10 of the way from 5.0 (10 s) to 4.0 (20 s): 4.4
    assert w["pairs"][0]["moe_loss_at_T"] == pytest.approx(4.4)
    assert w["pairs"][0]["d_loss"] == pytest.approx(-0.1) and w["ahead"] == "MoE"
    slow_moe = [dict(c, val_loss=c["val_loss"] + 0.6) for c in moe]
    assert equal_wall_clock([slow_moe], [dense])["ahead"] == "dense"
    fast_moe = [dict(c, wall_s=c["wall_s"] / 4) for c in moe]  # finished at 5 s, before the dense run's 16 s
    w = equal_wall_clock([fast_moe], [dense])
    assert w["pairs"][0]["moe_finished_first"] and w["pairs"][0]["moe_loss_at_T"] == 4.0
    assert equal_wall_clock([moe, slow_moe], [dense, dense])["ahead"] == "tie"


def test_gap_vs_tokens_pairs_seeds_by_step():
    m = [[{"step": 0, "val_loss": 9.0}, {"step": 10, "val_loss": 5.0}, {"step": 20, "val_loss": 4.0}],
         [{"step": 0, "val_loss": 9.0}, {"step": 10, "val_loss": 5.2}, {"step": 20, "val_loss": 4.1}]]
    d = [[{"step": 0, "val_loss": 9.0}, {"step": 10, "val_loss": 5.1}, {"step": 20, "val_loss": 4.3}],
         [{"step": 0, "val_loss": 9.0}, {"step": 10, "val_loss": 5.0}, {"step": 20, "val_loss": 4.2}]]
    g = gap_vs_tokens(m, d, tokens_per_step=100)
    assert g["tokens"] == [1000, 2000]
    assert g["per_seed"] == [pytest.approx([-0.1, -0.3]), pytest.approx([0.2, -0.1])]
    assert g["mean"] == pytest.approx([0.05, -0.2]) and g["min"] == pytest.approx([-0.1, -0.3])
    assert g["max"] == pytest.approx([0.2, -0.1])


def test_the_final_eval_cache_counts_only_for_the_runs_own_data_folder(tiny_data_dir, tmp_path, monkeypatch):
    # an `eval --data OTHER` on a seed run wrote eval.json over another corpus (same tokenizer):
    # compare-dense took it as the seed's perplexity (a newcomer's trial: 315.95 became 328.04)
    import shutil

    import moe_lm.evaluation as evaluation
    from moe_lm.compare import _final_eval
    from moe_lm.data.prepare import PrepareOptions, prepare_corpus

    other = tmp_path / "other"  # other documents, the same tokenizer
    prepare_corpus(PrepareOptions(out=other, max_documents=30, tokenizer=tiny_data_dir / "tokenizer.json",
                                  val_fraction=0.2, test_fraction=0.05), console=quiet())
    run = tmp_path / "run"
    train(load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "train.max_steps=3")), out_dir=run,
          console=quiet(), plots=False)
    full = _final_eval(run, "cpu", tiny_data_dir)
    evaluation.run_eval(run, split="val", n_batches=None, data_dir=other, device="cpu")  # eval.json: the other corpus
    assert json.loads((run / "eval.json").read_text())["n_tokens"] != full["n_tokens"]
    calls = []
    real = evaluation.run_eval
    monkeypatch.setattr(evaluation, "run_eval", lambda *a, **k: calls.append(k["data_dir"]) or real(*a, **k))
    again = _final_eval(run, "cpu", tiny_data_dir)
    assert calls == [tiny_data_dir] and again["n_tokens"] == full["n_tokens"] and again["loss"] == full["loss"]
    assert _final_eval(run, "cpu", tiny_data_dir)["loss"] == full["loss"] and len(calls) == 1  # now cached
    # the data folder prepared again (its meta.json, with the files' checksums and the time, differs):
    # evaluated anew (a copy of the session's folder: it is read-only)
    again_dir = tmp_path / "again"
    shutil.copytree(tiny_data_dir, again_dir)
    assert _final_eval(run, "cpu", again_dir)["loss"] == full["loss"] and len(calls) == 1  # the same data, elsewhere
    meta = json.loads((again_dir / "meta.json").read_text())
    (again_dir / "meta.json").write_text(json.dumps({**meta, "created": "2030-01-01T00:00:00+00:00"}))
    _final_eval(run, "cpu", again_dir)
    assert len(calls) == 2


def test_an_lr_sweep_picks_each_variants_rate_its_seed_0_is_the_sweeps_run_and_reuse_moe_is_one_of_them(
        tiny_data_dir, tmp_path, monkeypatch):
    import moe_lm.training.trainer as trainer
    from moe_lm.compare import paired_lines, parse_lr_sweep, table_rows

    assert parse_lr_sweep("3e-3, 6e-3,") == [3e-3, 6e-3]
    reuse = train(load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "train.lr=1e-4")),
                  out_dir=tmp_path / "run", console=quiet(), plots=False).run_dir
    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir))
    trained = []
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda c, **k: trained.append(k["out_dir"].name) or real(c, **k))
    # 6.0000001e-3: a rate its folder name (6 digits, lr0.006) does not spell out; the seeds must
    # train at the rate itself (reading it back from the name crashed the copy of seed 0)
    rates = {"0.0001": 1e-4, "0.006": 6.0000001e-3}
    rep = compare_dense(cfg, seeds=2, lr_sweep=list(rates.values()), out_dir=tmp_path / "c", console=quiet(),
                        reuse_moe=reuse)
    out, ckpt = tmp_path / "c", "checkpoints/step-0000006/model.safetensors"
    # the MoE at 1e-4 is the --reuse-moe run, copied in; seed 0 of each variant is its sweep run at
    # the chosen rate (the trial's fault: trained a second time); only seed 1 trains after the sweep
    assert sorted(trained) == ["dense-lr0.0001", "dense-lr0.006", "dense-seed1", "moe-lr0.006", "moe-seed1"]
    assert (out / "sweep" / "moe-lr0.0001" / ckpt).read_bytes() == (reuse / ckpt).read_bytes()
    for v in ("moe", "dense"):
        losses = {lr: json.loads((out / "sweep" / f"{v}-lr{lr}" / "eval.json").read_text())["loss"] for lr in rates}
        best = min(losses, key=losses.get)
        assert rep["variants"][v]["lr"] == rates[best]  # the lower validation loss of the two
        assert (out / "runs" / f"{v}-seed0" / ckpt).read_bytes() == (out / "sweep" / f"{v}-lr{best}" / ckpt).read_bytes()
    assert [r["seed"] for r in rep["runs"]] == [0, 0, 1, 1]
    assert all(" ± " in c for c in {r[0]: r[1:] for r in table_rows(rep)}["val perplexity (mean ± std)"])
    assert "(std over pairs)" in paired_lines(rep)[0]


def test_reuse_moe_at_a_rate_the_sweep_does_not_hold_is_refused_before_anything_trains(tiny_data_dir, tmp_path,
                                                                                        monkeypatch):
    import moe_lm.training.trainer as trainer

    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir))  # train.lr 6e-3
    run = train(cfg, out_dir=tmp_path / "run", console=quiet(), plots=False).run_dir
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(RunError, match=r"none of the --lr-sweep rates \(0.001, 0.003\).*train.lr") as e:
        compare_dense(cfg, seeds=1, lr_sweep=[1e-3, 3e-3], out_dir=tmp_path / "c", console=quiet(), reuse_moe=run)
    assert "add the run's train.lr to --lr-sweep" in str(e.value)
    assert not (tmp_path / "c" / "sweep").exists()


def test_reuse_moe_under_an_lr_sweep_is_refused_for_what_is_wrong_with_it(tiny_data_dir, tmp_path, monkeypatch):
    import moe_lm.training.trainer as trainer

    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir))
    short = train(load_config(ROOT / "configs" / "tiny-moe.yaml", tiny(tiny_data_dir, "train.max_steps=3")),
                  out_dir=tmp_path / "short", console=quiet(), plots=False).run_dir
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    # its rate is swept: the length is what is wrong, and the message says so (not "none of the rates")
    with pytest.raises(RunError, match="not a run of train.max_steps = 6") as e:
        compare_dense(cfg, seeds=1, lr_sweep=[1e-3, 6e-3], out_dir=tmp_path / "c", console=quiet(), reuse_moe=short)
    assert "none of the --lr-sweep rates" not in str(e.value)
    with pytest.raises(ConfigError, match="lists 0.001 more than once"):  # a list, as the library takes it
        compare_dense(cfg, seeds=1, lr_sweep=[1e-3, 1.0000001e-3], out_dir=tmp_path / "d", console=quiet())
