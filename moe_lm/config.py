"""One config tree for every command: dataclasses, YAML loading, dotted overrides, validation.

    cfg = load_config("configs/tiny-moe.yaml", ["train.lr=1e-3", "model.moe.top_k=1"])

Every key has a type and a default here; a YAML file or an override only changes values.
Unknown keys fail with a "did you mean" hint; wrong types and out-of-range values fail naming
the key, the value and what is allowed (`ConfigError`, printed as one line by the CLI).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

ROUTERS = ("noisy_topk", "softmax_topk", "switch", "expert_choice", "sigmoid_bias")
BALANCE_LOSSES = ("none", "switch", "shazeer")
ACTIVATIONS = ("relu", "gelu", "swiglu")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class DataConfig:
    dir: str = "data/builtin"  # a folder written by `moe-lm prepare`


@dataclass
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2  # experts per token (token-choice routers); ignored by expert_choice
    every: int = 1  # block i is MoE when i % every == every - 1
    router: str = "softmax_topk"  # one of ROUTERS
    n_shared_experts: int = 0  # always-on experts (DeepSeekMoE), each ffn_hidden wide
    # null = dropless; else each expert keeps at most C = ceil(cf * seq_len * k / E) assignments PER
    # SEQUENCE, the earliest positions first (causal); expert_choice: C = ceil(cf * T / E) over the batch
    capacity_factor: Optional[float] = None
    balance_loss: str = "switch"  # one of BALANCE_LOSSES
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.001  # sigmoid_bias router: step of the balancing bias
    expert_parallel: bool = False  # spread experts over torchrun ranks


@dataclass
class ModelConfig:
    vocab_size: Optional[int] = None  # null = taken from the data folder's tokenizer
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    ffn_hidden: int = 256  # hidden width of a dense FFN and of each expert
    activation: str = "swiglu"  # one of ACTIVATIONS
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    moe: Optional[MoEConfig] = field(default_factory=MoEConfig)  # null = dense model


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per optimizer step (the global batch)
    # micro-batches per step; each holds batch_size / grad_accum sequences. Changes memory use (and,
    # with a balance loss, adds one no-gradient forward per step), not the data, losses or gradient:
    # balance statistics stay the whole batch's (training.trainer.accumulate_gradients)
    grad_accum: int = 1
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    max_steps: int = 300
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # keep the last K checkpoints
    seed: int = 0
    device: str = "auto"  # one of DEVICES
    dtype: str = "auto"  # one of DTYPES; auto = float32 on CPU, bf16 autocast on CUDA
    compile: bool = False
    tensorboard: bool = False


@dataclass
class Config:
    name: str = "tiny-moe"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, T) for Optional[T], else (False, tp)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert: int -> float, "1e-3" -> float) one leaf value."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} = null: a value of type {inner.__name__} is required")
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping of {inner.__name__} keys")
        return _from_dict(inner, value, key)
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected a number")
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r}: expected a string")
    raise AssertionError(f"unsupported config type {tp!r} at {key}")  # a bug in this file


def _unknown_key(prefix: str, key: str, allowed: list[str]) -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else None
    where = f"'{prefix}'" if prefix else "the top level"
    return ConfigError(
        f"unknown config key '{full}'", hint or f"keys allowed in {where}: {', '.join(allowed)}"
    )


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(prefix, str(key), list(fields))
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = _from_dict(Config, data or {})
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# overrides


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` to a nested dict; the value is parsed as YAML (1e-3, null, true)."""
    if "=" not in override:
        raise ConfigError(
            f"override '{override}' is not of the form key=value",
            "e.g. train.lr=1e-3 or model.moe.top_k=1",
        )
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node, cls, prefix = data, Config, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise _unknown_key(prefix, part, names)
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_tp = _is_optional(typing.get_type_hints(cls)[part])[1]
        if not dataclasses.is_dataclass(sub_tp):
            raise ConfigError(f"'{prefix + '.' if prefix else ''}{part}' is a value, not a section")
        if node.get(part) is None:  # e.g. model.moe.top_k=2 on a dense config: start from defaults
            node[part] = {}
        node, cls = node[part], sub_tp
        prefix = f"{prefix}.{part}" if prefix else part


# ---------------------------------------------------------------------------------------------
# validation


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {allowed}")


def validate(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    _check(bool(cfg.name) and "/" not in cfg.name, "name", cfg.name, "must be a non-empty name without '/'")
    _check(m.vocab_size is None or m.vocab_size >= 2, "model.vocab_size", m.vocab_size, "must be ≥ 2 or null")
    for key in ("d_model", "n_layers", "n_heads", "seq_len", "ffn_hidden"):
        v = getattr(m, key)
        _check(v >= 1, f"model.{key}", v, "must be ≥ 1")
    _check(m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
           f"must be divisible by model.n_heads ({m.n_heads})")
    _check((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", m.n_heads,
           "must leave an even head size d_model / n_heads (rotary embeddings rotate pairs)")
    _check(m.activation in ACTIVATIONS, "model.activation", m.activation, f"allowed: {' | '.join(ACTIVATIONS)}")
    _check(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    _check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
    _check(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")
    if m.moe is not None:
        e = m.moe
        _check(e.router in ROUTERS, "model.moe.router", e.router, f"allowed: {' | '.join(ROUTERS)}")
        _check(e.n_experts >= 1, "model.moe.n_experts", e.n_experts, "must be ≥ 1")
        _check(1 <= e.top_k <= e.n_experts, "model.moe.top_k", e.top_k,
               f"must be between 1 and model.moe.n_experts ({e.n_experts})")
        _check(e.router != "noisy_topk" or e.top_k > 1 or (e.balance_loss != "none" and e.balance_coef > 0),
               "model.moe.top_k", e.top_k, "noisy_topk with top_k=1 gates every token by a softmax over one "
               "value (= 1), so its router learns only through a balance loss and here there is none: use "
               "top_k >= 2, a balance loss (model.moe.balance_loss=shazeer), or the switch router")
        _check(e.router != "switch" or e.top_k == 1, "model.moe.top_k", e.top_k,
               "the switch router sends each token to exactly 1 expert: set top_k=1")
        _check(1 <= e.every <= m.n_layers, "model.moe.every", e.every,
               f"must be between 1 and model.n_layers ({m.n_layers})")
        _check(e.n_shared_experts >= 0, "model.moe.n_shared_experts", e.n_shared_experts, "must be ≥ 0")
        _check(e.capacity_factor is None or e.capacity_factor > 0, "model.moe.capacity_factor",
               e.capacity_factor, "must be > 0, or null for dropless routing")
        _check(e.router != "expert_choice" or e.capacity_factor is not None, "model.moe.capacity_factor",
               e.capacity_factor, "expert_choice needs a capacity factor (each expert takes T·cf/E tokens), e.g. 2.0")
        _check(e.balance_loss in BALANCE_LOSSES, "model.moe.balance_loss", e.balance_loss,
               f"allowed: {' | '.join(BALANCE_LOSSES)}")
        _check(e.balance_loss != "shazeer" or e.router == "noisy_topk", "model.moe.balance_loss",
               e.balance_loss, "the shazeer load estimator needs the noisy_topk router")
        _check(e.balance_coef >= 0, "model.moe.balance_coef", e.balance_coef, "must be ≥ 0")
        _check(e.z_loss_coef >= 0, "model.moe.z_loss_coef", e.z_loss_coef, "must be ≥ 0")
        _check(e.bias_update_rate >= 0, "model.moe.bias_update_rate", e.bias_update_rate, "must be ≥ 0")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be ≥ 1")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be ≥ 1")
    _check(t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
           f"must divide train.batch_size ({t.batch_size})")
    _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "must be a positive number")
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be between 0 and 1")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be ≥ 0")
    _check(t.max_steps >= 1, "train.max_steps", t.max_steps, "must be ≥ 1")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be ≥ 0")
    _check(0 <= t.beta1 < 1, "train.beta1", t.beta1, "must be in [0, 1)")
    _check(0 <= t.beta2 < 1, "train.beta2", t.beta2, "must be in [0, 1)")
    _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be ≥ 0 (0 = no clipping)")
    for key in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
        v = getattr(t, key)
        _check(v >= 1, f"train.{key}", v, "must be ≥ 1")
    _check(t.device in DEVICES, "train.device", t.device, f"allowed: {' | '.join(DEVICES)}")
    _check(t.dtype in DTYPES, "train.dtype", t.dtype, f"allowed: {' | '.join(DTYPES)}")


# ---------------------------------------------------------------------------------------------
# public entry points


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}", "see configs/ for the shipped configs")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path} is not valid YAML{where}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, not {type(loaded).__name__}")
        data = loaded or {}
    data = copy.deepcopy(data)
    for override in overrides or []:
        apply_override(data, override)
    return from_dict(data)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config, *, ignore: tuple[str, ...] = ("train.max_steps",)) -> str:
    """A short hash of what defines the model and its training, to match checkpoints to runs.

    `ignore` lists dotted keys left out (extending max_steps on resume is allowed).
    """
    data = to_dict(cfg)
    for key in ignore:
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.get(p) or {}
        node.pop(last, None)
    blob = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
