"""Checkpoints: weights (tied ones too), RNG and state round-trip; writes are atomic, so a kill at
any instant leaves the previous checkpoint whole; damage is found before any work."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from moe_lm.config import load_config
from moe_lm.errors import CheckpointError
from moe_lm.training import checkpoint as ckpt_io
from moe_lm.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = ROOT / "configs" / "tiny-moe.yaml"


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("router_bias", torch.randn(3))


def _save(tmp_path: Path, model: torch.nn.Module, step: int, keep: int = 2) -> Path:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return ckpt_io.save_checkpoint(tmp_path, step=step, model=model, optimizer=opt, cfg=load_config(None),
                                   state={"tokens": step * 10}, keep=keep)


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path):
    torch.manual_seed(0)
    a = Tied()
    path = _save(tmp_path, a, 1)
    from safetensors.torch import load_file

    stored = load_file(path / "model.safetensors")
    assert "emb.weight" in stored and "head.weight" not in stored
    torch.manual_seed(1)
    b = Tied()
    ckpt_io.load_checkpoint(path, b)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert b.head.weight.data_ptr() == b.emb.weight.data_ptr()  # still one tensor


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(ckpt_io.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # move every stream on
    ckpt_io.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_latest_points_at_the_newest_and_only_the_last_k_are_kept(tmp_path):
    model = Tied()
    for step in (2, 4, 6, 8):
        _save(tmp_path, model, step, keep=2)
    root = tmp_path / "checkpoints"
    assert [p.name for _, p in ckpt_io.list_checkpoints(root)] == ["step-0000006", "step-0000008"]
    assert (root / "latest").read_text().strip() == "step-0000008"
    assert ckpt_io.find_latest(tmp_path) == root / "step-0000008"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_a_half_written_folder_is_never_taken_for_a_checkpoint(tmp_path):
    _save(tmp_path, Tied(), 2)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-0000004-123").mkdir()
    (root / ".tmp-step-0000004-123" / "model.safetensors").write_bytes(b"half")
    assert ckpt_io.find_latest(tmp_path).name == "step-0000002"
    ckpt_io.clean_partial(root)
    assert not (root / ".tmp-step-0000004-123").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "state"])
def test_damaged_checkpoints_are_refused_with_one_line_naming_an_earlier_one(tmp_path, damage):
    model = Tied()
    _save(tmp_path, model, 2, keep=3)
    path = _save(tmp_path, model, 4, keep=3)
    target = path / ("state.json" if damage == "state" else "model.safetensors")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:50])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text('{"step": 4, "fil')
    with pytest.raises(CheckpointError) as err:
        ckpt_io.load_checkpoint(path, Tied())
    msg = str(err.value)
    assert "truncated or corrupt" in msg and "use an earlier checkpoint" in msg and "step-0000002" in msg
    assert "\n" not in msg


def test_another_config_is_refused_naming_what_differs(tmp_path):
    cfg = load_config(None, ["model.vocab_size=11"])
    opt_model = Tied()
    path = ckpt_io.save_checkpoint(tmp_path, step=1, model=opt_model,
                                   optimizer=torch.optim.AdamW(opt_model.parameters()), cfg=cfg, state={})
    state = ckpt_io.read_state(path)
    ckpt_io.check_config(path, state, load_config(None, ["model.vocab_size=11", "train.max_steps=900",
                                                         "train.log_every=3"]))  # allowed changes
    other = load_config(None, ["model.vocab_size=11", "model.d_model=64", "train.lr=1e-4"])
    with pytest.raises(CheckpointError) as err:
        ckpt_io.check_config(path, state, other)
    assert "model.d_model 128 -> 64" in str(err.value) and "train.lr 0.003 -> 0.0001" in str(err.value)


# ---------------------------------------------------------------------------------------------
# a kill during a checkpoint write


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    overrides = [f"data.dir={tiny_data_dir}", "model.d_model=32", "model.n_heads=2", "model.n_layers=2",
                 "model.seq_len=32", "model.ffn_hidden=32", "train.batch_size=4", "train.max_steps=100",
                 "train.checkpoint_every=2", "train.eval_every=1000", "train.eval_batches=1", "train.device=cpu"]
    env = {**os.environ, "MOE_LM_TEST_CHECKPOINT_SLEEP": "4:120"}  # hang inside the step-4 write
    proc = subprocess.Popen([sys.executable, "-m", "moe_lm", "train", "--config", str(TINY_MOE), "--out", str(run),
                             *overrides], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    root = run / "checkpoints"
    _wait_for(lambda: any(p.name.startswith(".tmp-step-0000004") and (p / "model.safetensors").exists()
                          for p in root.iterdir()) if root.is_dir() else False, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()

    latest = ckpt_io.find_latest(run)
    assert latest.name == "step-0000002"
    assert ckpt_io.read_state(latest)["step"] == 2  # every file whole: sizes and checksums match
    # ... and training resumes from it
    cfg = load_config(TINY_MOE, [*overrides, "train.max_steps=5"])
    result = train(cfg, out_dir=run, resume="auto", console=Console(file=io.StringIO()), plots=False)
    assert result.steps == 5
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_a_checkpoint_saved_before_a_key_existed_matches_the_keys_old_behaviour(tmp_path):
    """train.ffn_out_lr_scale came later: a run saved without it trained as 1.0 does, so a config
    at 1.0 hashes as configs did before the key (the written-out definition below: sha256 of the
    sorted JSON of the config minus the resumable keys), and a saved config.yaml without it reads
    as 1.0 when compared key by key."""
    import hashlib
    import json

    import yaml

    from moe_lm.config import flat_dict, to_dict

    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", ["model.vocab_size=64"])
    saved = to_dict(cfg)
    del saved["train"]["ffn_out_lr_scale"]
    for key in ckpt_io.RESUMABLE_CHANGES:
        *parents, last = key.split(".")
        node = saved
        for part in parents:
            node = node.get(part) or {}
        node.pop(last, None)
    old_hash = hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()[:16]
    assert ckpt_io.resume_hash(cfg) == old_hash
    assert ckpt_io.config_mismatch(tmp_path, {"config_hash": old_hash}, cfg) == []

    other = load_config(ROOT / "configs" / "tiny-moe.yaml", ["model.vocab_size=64", "train.ffn_out_lr_scale=0.5"])
    assert ckpt_io.resume_hash(other) != old_hash
    old_yaml = to_dict(cfg)
    del old_yaml["train"]["ffn_out_lr_scale"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old_yaml), encoding="utf-8")
    assert "train.ffn_out_lr_scale" not in flat_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert ckpt_io.config_mismatch(tmp_path, {"config_hash": old_hash}, other) == ["train.ffn_out_lr_scale 1.0 -> 0.5"]
