"""The config system: defaults <- YAML <- dotted overrides, and errors that name the key, the
value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_lm.config import Config, config_hash, dump_yaml, load_config
from moe_lm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = ROOT / "configs" / "tiny-moe.yaml"


def test_overrides_win_over_the_file_which_wins_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mine\ntrain:\n  lr: 0.01\n  max_steps: 7\nmodel:\n  moe:\n    top_k: 2\n")
    cfg = load_config(path, ["train.lr=1e-3", "model.moe.top_k=1", "model.moe.router=switch"])
    assert cfg.name == "mine" and cfg.train.max_steps == 7  # from the file
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)  # "1e-3" read as a number
    assert cfg.model.moe.top_k == 1 and cfg.model.moe.router == "switch"  # overrides
    assert cfg.train.batch_size == Config().train.batch_size  # untouched keys keep the default


def test_model_moe_null_makes_a_dense_model_and_moe_keys_bring_it_back():
    dense = load_config(None, ["model.moe=null"])
    assert dense.model.moe is None
    again = load_config(None, ["model.moe=null", "model.moe.n_experts=4", "model.moe.top_k=1"])
    assert again.model.moe is not None and again.model.moe.n_experts == 4


def test_the_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(TINY_MOE, ["train.lr=0.002"])
    (tmp_path / "r.yaml").write_text(dump_yaml(cfg))
    again = load_config(tmp_path / "r.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)


@pytest.mark.parametrize("override, fragments", [
    ("train.lrr=1e-3", ["unknown config key 'train.lrr'", "did you mean 'train.lr'"]),
    ("modle.d_model=64", ["unknown config key 'modle'", "did you mean 'model'"]),
    ("model.moe.top_kk=1", ["did you mean 'model.moe.top_k'"]),
    ("train.batch_size=abc", ["train.batch_size = 'abc'", "expected an integer"]),
    ("train.compile=maybe", ["train.compile = 'maybe'", "expected true or false"]),
    ("model.moe.top_k=9", ["model.moe.top_k = 9", "between 1 and model.moe.n_experts (8)"]),
    ("model.d_model=130", ["model.d_model = 130", "divisible by model.n_heads (4)"]),
    ("train.lr=-0.001", ["train.lr = -0.001", "positive"]),
    ("model.activation=tanh", ["model.activation = 'tanh'", "relu | gelu | swiglu"]),
    ("train.lr", ["not of the form key=value"]),
])
def test_each_config_error_names_the_key_the_value_and_what_is_allowed(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_MOE, [override])
    for frag in fragments:
        assert frag in str(err.value)
    assert "\n" not in str(err.value)


def test_an_unknown_key_in_the_yaml_file_is_caught_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  warmup_step: 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.warmup_step'.*did you mean 'train.warmup_steps'"):
        load_config(path)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def moe_lm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_print_config_shows_the_resolved_config(tmp_path):
    proc = moe_lm("train", "--config", str(TINY_MOE), "--print-config", "train.lr=0.002", "model.moe.top_k=1",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["train"]["lr"] == 0.002 and shown["model"]["moe"]["top_k"] == 1
    assert shown == yaml.safe_load(dump_yaml(load_config(TINY_MOE, ["train.lr=0.002", "model.moe.top_k=1"])))
    assert not (tmp_path / "runs").exists()  # printing trains nothing


def test_a_config_error_on_the_command_line_is_one_line_exit_2(tmp_path):
    proc = moe_lm("train", "--config", str(TINY_MOE), "--print-config", "model.moe.top_k=0", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.moe.top_k = 0" in lines[0]
