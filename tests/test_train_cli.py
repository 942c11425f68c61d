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
TINY_MOE = ROOT / "configs" / "tiny-moe.yaml"


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

