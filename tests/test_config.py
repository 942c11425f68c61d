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
# the error-message tests below name values of an 8-expert, d_model-128, 4-head config
EIGHT = ROOT / "configs" / "step-limited.yaml"


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
    ("train.ffn_out_lr_scale=0", ["train.ffn_out_lr_scale = 0", "1 = the same rate"]),
    ("model.activation=tanh", ["model.activation = 'tanh'", "relu | gelu | swiglu"]),
    ("train.lr", ["not of the form key=value"]),
])
def test_each_config_error_names_the_key_the_value_and_what_is_allowed(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(EIGHT, [override])
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


def test_a_key_given_twice_is_refused_not_silently_overridden(tmp_path):
    # PyYAML keeps the last of two equal keys without a word: the lr a user reads first is not the
    # one that trains
    (tmp_path / "dup.yaml").write_text("name: x\ntrain:\n  lr: 1.0e-3\n  max_steps: 5\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice in one section \(line 5\)"):
        load_config(tmp_path / "dup.yaml")
    # the same key in two sections is two keys
    (tmp_path / "ok.yaml").write_text("name: x\ndata:\n  vocab_size: 600\nmodel:\n  vocab_size: 512\n")
    ok = load_config(tmp_path / "ok.yaml")
    assert (ok.data.vocab_size, ok.model.vocab_size) == (600, 512)
    # YAML merge keys still merge (a later key wins over the merged one, as YAML says)
    (tmp_path / "merge.yaml").write_text("train:\n  <<: {lr: 1.0e-3, max_steps: 5}\n  max_steps: 7\n")
    merged = load_config(tmp_path / "merge.yaml")
    assert (merged.train.lr, merged.train.max_steps) == (1.0e-3, 7)
    # a key YAML cannot use (a list) stays a one-line ConfigError, not a crash
    (tmp_path / "listkey.yaml").write_text("? [1, 2]\n: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 1"):
        load_config(tmp_path / "listkey.yaml")


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


def _numeric_keys(cls=Config, prefix=""):
    """(dotted key, int | float) of every numeric key, walked from the dataclasses here."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        inner = args[0]
        if dataclasses.is_dataclass(inner):
            yield from _numeric_keys(inner, f"{prefix}{f.name}.")
        elif inner in (int, float):
            yield f"{prefix}{f.name}", inner


NUMERIC = list(_numeric_keys())
FLOATS = [k for k, t in NUMERIC if t is float]
INTS = [k for k, t in NUMERIC if t is int]


def test_the_walk_finds_the_numeric_keys():
    assert {"train.lr", "model.moe.capacity_factor", "model.rope_theta", "model.moe.balance_coef"} <= set(FLOATS)
    assert {"train.seed", "train.max_steps", "model.vocab_size", "model.d_model"} <= set(INTS)


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("raw", [".inf", "-.inf", ".nan", "nan", "inf", "1e999", "1e300", "-1e300"])
def test_every_float_key_refuses_non_finite_and_absurd_values_naming_the_key(key, raw):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_MOE, [f"{key}={raw}"])
    assert str(err.value).startswith(f"{key} = "), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", INTS)
@pytest.mark.parametrize("value", [2**70, -(2**70), 1180591620717411303424])
def test_every_integer_key_refuses_values_out_of_its_range_naming_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_MOE, [f"{key}={value}"])
    assert str(err.value).startswith(f"{key} = {value}: must be an integer between"), str(err.value)


def test_non_finite_values_in_a_yaml_file_are_refused_naming_the_key(tmp_path):
    for text, key in (("train:\n  lr: .nan\n", "train.lr"), ("model:\n  moe:\n    capacity_factor: .inf\n",
                                                               "model.moe.capacity_factor"),
                      ("train:\n  grad_clip: -.inf\n", "train.grad_clip")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"^{key} = .*must be a finite number"):
            load_config(path)


def test_the_seed_takes_every_value_torch_and_numpy_accept():
    import numpy as np
    import torch

    top = 2**63 - 1
    assert load_config(TINY_MOE, [f"train.seed={top}"]).train.seed == top
    torch.manual_seed(top)  # the reference: both libraries take it
    np.random.default_rng([top % 2**64, 0])
    with pytest.raises(ConfigError, match="train.seed = -1"):
        load_config(TINY_MOE, ["train.seed=-1"])


def test_a_capacity_factor_above_the_number_of_experts_is_refused():
    assert load_config(EIGHT, ["model.moe.capacity_factor=8"]).model.moe.capacity_factor == 8.0
    with pytest.raises(ConfigError, match=r"model.moe.capacity_factor = 8.5: must be at most model.moe.n_experts \(8\)"):
        load_config(EIGHT, ["model.moe.capacity_factor=8.5"])


def test_noisy_topk_with_every_expert_chosen_is_refused():
    # top_k = n_experts leaves no k-th best "other" score for Shazeer's load estimator (it gave NaN)
    with pytest.raises(ConfigError, match=r"model.moe.top_k = 4: noisy_topk needs top_k below model.moe.n_experts \(4\)"):
        load_config(EIGHT, ["model.moe.router=noisy_topk", "model.moe.balance_loss=shazeer", "model.moe.n_experts=4",
                            "model.moe.top_k=4"])
    assert load_config(EIGHT, ["model.moe.router=noisy_topk", "model.moe.n_experts=4", "model.moe.top_k=3"])
