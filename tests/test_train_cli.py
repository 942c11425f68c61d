"""`moe-lm train` as a user runs it: Ctrl-C (SIGTERM) saves and exits 130 (143), then --resume continues; every
user error is one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from moe_lm.config import load_config
from moe_lm.training import checkpoint as ckpt_io
from moe_lm.training.metrics import read_metrics
from moe_lm.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# the 8-expert top-2 config these tests were written against (tiny-moe is the 32-expert demo now)
TINY_MOE = ROOT / "configs" / "step-limited.yaml"


def tiny(data_dir: Path, *extra: str) -> list[str]:
    return [f"data.dir={data_dir}", "model.d_model=32", "model.n_heads=2", "model.n_layers=2",
            "model.seq_len=32", "model.ffn_hidden=32", "train.batch_size=4", "train.eval_batches=1", "train.device=cpu", *extra]


def moe_lm_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lm", "train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_exits_128_plus_signal_and_resume_continues(signame, status,
                                                                                         tiny_data_dir, tmp_path):
    # SIGTERM: kill, docker stop, a scheduler's preemption; the shell's convention is 128 + signum
    run = tmp_path / "run"
    args = ["--config", str(TINY_MOE), "--out", str(run), *tiny(tiny_data_dir, "train.log_every=1",
                                                                 "train.eval_every=1000")]
    proc = subprocess.Popen([sys.executable, "-m", "moe_lm", "train", *args, "train.max_steps=100000"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not any(r.get("kind") == "train" and r["step"] >= 3 for r in read_metrics(metrics)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "Traceback" not in err
    latest = ckpt_io.find_latest(run)
    stopped_at = ckpt_io.read_state(latest)["step"]
    assert stopped_at >= 3
    assert f"interrupted at step {stopped_at} ({signame})" in out and "--resume auto" in out
    assert [r.get("signal") for r in read_metrics(metrics) if r.get("event") == "interrupted"] == [signame]
    if signame == "SIGINT":
        return  # the checkpoint is the same either way: resuming it once (after SIGTERM) is enough

    done = moe_lm_train(*args, f"train.max_steps={stopped_at + 2}", "--resume", "auto", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in read_metrics(metrics) if r.get("kind") == "train"]
    assert steps == list(range(1, stopped_at + 3))  # one unbroken trajectory


# ---------------------------------------------------------------------------------------------
# user errors: one line, exit 2


@pytest.fixture(scope="module")
def finished_run(tiny_data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.max_steps=4", "train.checkpoint_every=2"))
    train(cfg, out_dir=run, console=Console(file=io.StringIO()), plots=False)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def test_existing_run_folder_is_refused(finished_run, tiny_data_dir, tmp_path):
    proc = moe_lm_train("--config", str(TINY_MOE), "--out", str(finished_run), *tiny(tiny_data_dir), cwd=tmp_path)
    assert_one_line_error(proc, "already exists", "--resume auto", "--overwrite")


def test_truncated_checkpoint_is_one_line_exit_2(finished_run, tiny_data_dir, tmp_path):
    run = _copy(finished_run, tmp_path)
    weights = run / "checkpoints" / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = moe_lm_train("--config", str(TINY_MOE), "--out", str(run), *tiny(tiny_data_dir, "train.max_steps=8"),
                        "--resume", "auto", cwd=tmp_path)
    assert_one_line_error(proc, "step-0000004 is truncated or corrupt", "use an earlier checkpoint", "step-0000002")


def test_corrupted_checkpoint_is_one_line_exit_2(finished_run, tiny_data_dir, tmp_path):
    run = _copy(finished_run, tmp_path)
    opt = run / "checkpoints" / "step-0000004" / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    opt.write_bytes(bytes(data))
    proc = moe_lm_train("--config", str(TINY_MOE), "--out", str(run), *tiny(tiny_data_dir, "train.max_steps=8"),
                        "--resume", str(run / "checkpoints" / "step-0000004"), cwd=tmp_path)
    assert_one_line_error(proc, "truncated or corrupt", "optimizer.pt", "step-0000002")


def test_checkpoint_from_another_config_is_one_line_exit_2(finished_run, tiny_data_dir, tmp_path):
    run = _copy(finished_run, tmp_path)
    proc = moe_lm_train("--config", str(TINY_MOE), "--out", str(run),
                        *tiny(tiny_data_dir, "train.max_steps=8", "model.moe.top_k=1"), "--resume", "auto", cwd=tmp_path)
    assert_one_line_error(proc, "another config", "model.moe.top_k 2 -> 1")


def test_data_folder_whose_vocabulary_does_not_match_is_one_line_exit_2(tiny_data_dir, tmp_path):
    proc = moe_lm_train("--config", str(TINY_MOE), "--out", str(tmp_path / "run"),
                        *tiny(tiny_data_dir, "model.vocab_size=77"), cwd=tmp_path)
    assert_one_line_error(proc, "model.vocab_size = 77", str(tiny_data_dir))
    assert not (tmp_path / "run").exists()  # refused before any work


def test_missing_data_folder_is_one_line_exit_2(tmp_path):
    proc = moe_lm_train("--config", str(TINY_MOE), "--out", str(tmp_path / "run"), f"data.dir={tmp_path / 'nope'}",
                        cwd=tmp_path)
    assert_one_line_error(proc, "nope")
    assert not (tmp_path / "run").exists()



@pytest.mark.parametrize("override, key", [
    ("model.moe.capacity_factor=.inf", "model.moe.capacity_factor"),
    ("model.moe.capacity_factor=1e300", "model.moe.capacity_factor"),
    ("train.seed=1180591620717411303424", "train.seed"),
    ("train.lr=nan", "train.lr"),
    ("model.moe.balance_coef=.inf", "model.moe.balance_coef"),
])
def test_an_absurd_number_is_one_line_exit_2_before_the_run_folder_exists(override, key, tiny_data_dir, tmp_path):
    proc = moe_lm_train("--config", str(TINY_MOE), "--out", str(tmp_path / "run"), *tiny(tiny_data_dir, override),
                        cwd=tmp_path)
    assert_one_line_error(proc, f"{key} = ")
    assert not (tmp_path / "run").exists()


def test_a_warmup_longer_than_the_run_is_warned_and_recorded(finished_run):
    # finished_run: tiny-moe's 20 warmup steps with train.max_steps=4 - valid (a smoke run), but the
    # learning rate never reaches train.lr: warned (config.config_warnings), not refused
    events = [r for r in read_metrics(finished_run / "metrics.jsonl") if r.get("event") == "config_warning"]
    assert len(events) == 1 and events[0]["step"] == 0
    assert events[0]["message"].startswith("train.warmup_steps (20) > train.max_steps (4)")


def _damaged_copy(tiny_data_dir: Path, tmp_path: Path, how: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    tok = data / "tokenizer.json"
    raw = bytearray(tok.read_bytes())
    if how == "first-bytes":  # the case: the first bytes overwritten, size unchanged
        raw[:16] = b"\x00" * 16
    else:  # still valid JSON, one merge changed: only the checksum tells
        i = raw.index(b'"merges"') + 40
        raw[i] = ord("a") if raw[i] != ord("a") else ord("b")
    tok.write_bytes(bytes(raw))
    return data


@pytest.mark.parametrize("how", ["first-bytes", "valid-json"])
def test_a_damaged_tokenizer_is_refused_when_the_data_is_opened(how, tiny_data_dir, tmp_path):
    data = _damaged_copy(tiny_data_dir, tmp_path, how)
    proc = moe_lm_train("--config", str(TINY_MOE), "--out", str(tmp_path / "run"), *tiny(data), cwd=tmp_path)
    assert_one_line_error(proc, str(data / "tokenizer.json"), "moe-lm prepare")
    assert not (tmp_path / "run").exists()  # nothing trained, nothing copied into a checkpoint


def test_eval_on_a_data_folder_with_a_damaged_tokenizer_is_one_line(finished_run, tiny_data_dir, tmp_path):
    data = _damaged_copy(tiny_data_dir, tmp_path, "first-bytes")
    proc = subprocess.run([sys.executable, "-m", "moe_lm", "eval", str(finished_run), "--data", str(data),
                           "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, str(data / "tokenizer.json"), "moe-lm prepare")


def test_a_checkpoint_whose_tokenizer_copy_is_damaged_is_a_checkpoint_error(finished_run, tmp_path):
    # a checkpoint written before the data folder's tokenizer was checked carries the damaged copy
    from moe_lm.errors import CheckpointError
    from moe_lm.loading import load_model

    loaded = load_model(finished_run)
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b"\x00" * 16 + loaded.tokenizer_path.read_bytes()[16:])
    loaded.tokenizer_path = bad
    with pytest.raises(CheckpointError, match=str(bad)):
        loaded.tokenizer()


def test_a_token_file_with_an_id_past_the_vocabulary_is_one_line_exit_2_and_deletes_nothing(
        finished_run, tiny_data_dir, tmp_path):
    # same size, so meta.json's sizes match; before the check this was "unexpected error: IndexError"
    # (exit 1) after --overwrite had already deleted the run folder
    import numpy as np

    from moe_lm.data.shards import TokenData

    data = _copy(tiny_data_dir, tmp_path / "data")
    dtype = TokenData.open(data).dtype
    ids = np.fromfile(data / "train.bin", dtype=dtype)
    ids[:5] = 60000
    ids.tofile(data / "train.bin")
    run = _copy(finished_run, tmp_path)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = moe_lm_train("--config", str(TINY_MOE), "--out", str(run), *tiny(data), "--overwrite", cwd=tmp_path)
    assert_one_line_error(proc, "train.bin holds token id 60000", "moe-lm prepare")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
