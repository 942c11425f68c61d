"""One config tree for every command: dataclasses, YAML loading, dotted overrides, validation.

    cfg = load_config("configs/tiny-moe.yaml", ["train.lr=1e-3", "model.moe.top_k=1"])

Every key has a type and a default here; a YAML file or an override only changes values.
Unknown keys fail with a "did you mean" hint; wrong types and out-of-range values fail naming
the key, the value and what is allowed (`ConfigError`, printed as one line by the CLI).
Every number is checked where it is read: floats must be finite (no .inf / .nan), and every int
and float key has a range in `LIMITS` (validate() refuses a numeric key without one), e.g.
train.seed in [0, 2^63 - 1] (what torch.manual_seed takes), sizes and step counts bounded far
above any real run but below overflow; then the keys that depend on each other are checked.
Settings that are valid but probably not meant (train.warmup_steps ≥ train.max_steps) are not
refused: `config_warnings` lists them, and train and info print them.
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

from . import checks
from .checks import DEVICES, SEED_MAX
from .errors import ConfigError

ROUTERS = ("noisy_topk", "softmax_topk", "switch", "expert_choice", "sigmoid_bias")
BALANCE_LOSSES = ("none", "switch", "shazeer")
ACTIVATIONS = ("relu", "gelu", "swiglu")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class DataConfig:
    dir: str = "data/builtin"  # a folder written by `moe-lm prepare`
    # the BPE vocabulary `moe-lm prepare -c <config>` trains for data.dir (null = prepare's default);
    # the model always takes its vocabulary from the folder's tokenizer (or model.vocab_size)
    vocab_size: Optional[int] = None


@dataclass
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2  # experts per token (token-choice routers); ignored by expert_choice
    every: int = 1  # every n-th block is MoE: block i when i % every == every - 1 (moe_layer_ids)
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
    # balance statistics stay the whole batch's (training.step.accumulate_gradients)
    grad_accum: int = 1
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    max_steps: int = 300
    weight_decay: float = 0.1
    # multiplier of the learning rate of every FFN's output matrix (dense down_proj, the experts'
    # w_down): muP's Adam rule for an FFN wider than the one whose rate was tuned is base width /
    # width (Yang et al. 2022, "Tensor Programs V", Table 3). compare-dense's equal-total-parameters
    # dense model sets it to twin width / its width (accounting.dense_total); 1 elsewhere. AdamW's
    # decoupled decay of those matrices (rate x weight_decay) scales with it.
    ffn_out_lr_scale: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 10  # validation batches of batch_size windows each (whatever grad_accum)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # keep the last K checkpoints
    seed: int = 0
    device: str = "auto"  # one of DEVICES
    dtype: str = "auto"  # one of DTYPES; auto = float32 on CPU, bf16 autocast on CUDA
    # torch.compile the training forward (training.step.compile_model): the whole model on a GPU
    # (2.5x small-moe's MoE on an H200); each block on a CPU, where the demo's dense twin gained
    # 4-16 % and its MoE -6 to +4 % (docs/PERFORMANCE.md); the first steps compile
    compile: bool = False
    tensorboard: bool = False


@dataclass
class Config:
    name: str = "tiny-moe"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def moe_layer_ids(m: ModelConfig) -> list[int]:
    """Indices of the blocks whose FFN is an MoE layer, ascending (the order of
    ModelOutput.moe_stats): every `moe.every`-th block, the last of each group; [] for a dense model.
    The one statement of the rule: the model builds its blocks by it (and answers
    `Transformer.moe_layer_ids()`), the parameter and FLOP counts count by it."""
    if m.moe is None:
        return []
    return [i for i in range(m.n_layers) if i % m.moe.every == m.moe.every - 1]


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
        number: Optional[float] = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key} = {value!r}: expected a number")
        if not math.isfinite(number):  # .inf, .nan, 1e999, "nan"
            raise ConfigError(f"{key} = {value!r}: must be a finite number")
        return number
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


class Limit(typing.NamedTuple):
    """The range of one numeric key: [lo, hi], ends open when lo_open / hi_open; `hint` says why."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    hint: Optional[str] = None


_STEPS = 10**12  # a bound on step counts no run reaches, far below int64 overflow
# NOTE: every int and float key has its range here (validate() refuses a numeric key without one,
# so a new key cannot slip through unchecked); floats must also be finite (_coerce). The limits
# that depend on another key (top_k ≤ n_experts, ...) are checked in validate().
LIMITS: dict[str, Limit] = {
    "model.vocab_size": Limit(2, 2**32, hint="token files hold uint16 or uint32 ids; null = from the data folder"),
    "data.vocab_size": Limit(257, 2**32, hint="the 256 bytes + end-of-text at least; null = prepare's default"),
    "model.d_model": Limit(1, 2**17),
    "model.n_layers": Limit(1, 4096),
    "model.n_heads": Limit(1, 2**17),
    "model.seq_len": Limit(1, 2**24),
    "model.ffn_hidden": Limit(1, 2**20),
    "model.rope_theta": Limit(0, 1e12, lo_open=True),
    "model.norm_eps": Limit(0, 1, lo_open=True),
    "model.init_std": Limit(0, 10, lo_open=True),
    "model.moe.n_experts": Limit(1, 2**16),
    "model.moe.top_k": Limit(1, 2**16),
    "model.moe.every": Limit(1, 4096),
    "model.moe.n_shared_experts": Limit(0, 2**16),
    "model.moe.capacity_factor": Limit(0, 2**16, lo_open=True, hint="or null for dropless routing"),
    "model.moe.balance_coef": Limit(0, 1000),
    "model.moe.z_loss_coef": Limit(0, 1000),
    "model.moe.bias_update_rate": Limit(0, 1),
    "train.batch_size": Limit(1, 2**24),
    "train.grad_accum": Limit(1, 2**24),
    "train.lr": Limit(0, 10, lo_open=True, hint="the peak learning rate must be positive; AdamW rates are ~1e-4 to 1e-2"),
    "train.min_lr_ratio": Limit(0, 1),
    "train.warmup_steps": Limit(0, _STEPS),
    "train.max_steps": Limit(1, _STEPS),
    "train.weight_decay": Limit(0, 100),
    "train.ffn_out_lr_scale": Limit(0, 1000, lo_open=True, hint="1 = the same rate as every other matrix"),
    "train.beta1": Limit(0, 1, hi_open=True),
    "train.beta2": Limit(0, 1, hi_open=True),
    "train.grad_clip": Limit(0, 1e12, hint="0 = no clipping"),
    "train.log_every": Limit(1, _STEPS),
    "train.eval_every": Limit(1, _STEPS),
    "train.eval_batches": Limit(1, 2**20),
    "train.checkpoint_every": Limit(1, _STEPS),
    "train.keep_checkpoints": Limit(1, 10**6),
    "train.seed": Limit(0, SEED_MAX, hint="torch takes 64-bit seeds"),
}


def numeric_leaves(cfg: Any, prefix: str = "") -> dict[str, tuple[Any, type]]:
    """{dotted key: (value, int or float)} of every numeric leaf of a config (sections that are null skipped)."""
    out: dict[str, tuple[Any, type]] = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        inner = _is_optional(hints[f.name])[1]
        if dataclasses.is_dataclass(inner):
            if value is not None:
                out.update(numeric_leaves(value, key + "."))
        elif inner in (int, float):
            out[key] = (value, inner)
    return out


def validate(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    _check(bool(cfg.name) and "/" not in cfg.name, "name", cfg.name, "must be a non-empty name without '/'")
    # 1. every number on its own: finite, an integer where one is expected, in its range
    for key, (value, kind) in numeric_leaves(cfg).items():
        if value is None:
            continue
        if key not in LIMITS:
            raise AssertionError(f"config key {key} has no range in config.LIMITS")  # a bug in this file
        lim = LIMITS[key]
        checks.number(key, value, lim.lo, lim.hi, lo_open=lim.lo_open, hi_open=lim.hi_open, integer=kind is int,
                      hint=lim.hint)
    # 2. the values that depend on each other
    _check(m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
           f"must be divisible by model.n_heads ({m.n_heads})")
    _check((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", m.n_heads,
           "must leave an even head size d_model / n_heads (rotary embeddings rotate pairs)")
    _check(m.activation in ACTIVATIONS, "model.activation", m.activation, f"allowed: {' | '.join(ACTIVATIONS)}")
    if m.moe is not None:
        e = m.moe
        _check(e.router in ROUTERS, "model.moe.router", e.router, f"allowed: {' | '.join(ROUTERS)}")
        _check(1 <= e.top_k <= e.n_experts, "model.moe.top_k", e.top_k,
               f"must be between 1 and model.moe.n_experts ({e.n_experts})")
        _check(e.router != "noisy_topk" or e.top_k > 1 or (e.balance_loss != "none" and e.balance_coef > 0),
               "model.moe.top_k", e.top_k, "noisy_topk with top_k=1 gates every token by a softmax over one "
               "value (= 1), so its router learns only through a balance loss and here there is none: use "
               "top_k >= 2, a balance loss (model.moe.balance_loss=shazeer), or the switch router")
        _check(e.router != "noisy_topk" or e.top_k < e.n_experts, "model.moe.top_k", e.top_k,
               f"noisy_topk needs top_k below model.moe.n_experts ({e.n_experts}): its load estimator "
               "(Shazeer et al. 2017, Appendix A) compares each score with the k-th best of the others, "
               "which does not exist when every expert is chosen")
        _check(e.router != "switch" or e.top_k == 1, "model.moe.top_k", e.top_k,
               "the switch router sends each token to exactly 1 expert: set top_k=1")
        _check(1 <= e.every <= m.n_layers, "model.moe.every", e.every,
               f"must be between 1 and model.n_layers ({m.n_layers})")
        _check(e.capacity_factor is None or e.capacity_factor <= e.n_experts, "model.moe.capacity_factor",
               e.capacity_factor, f"must be at most model.moe.n_experts ({e.n_experts}): at that factor an expert may "
               "already take every token of the batch (null = dropless routing)")
        _check(e.router != "expert_choice" or e.capacity_factor is not None, "model.moe.capacity_factor",
               e.capacity_factor, "expert_choice needs a capacity factor (each expert takes T·cf/E tokens), e.g. 2.0")
        _check(e.balance_loss in BALANCE_LOSSES, "model.moe.balance_loss", e.balance_loss,
               f"allowed: {' | '.join(BALANCE_LOSSES)}")
        _check(e.balance_loss != "shazeer" or e.router == "noisy_topk", "model.moe.balance_loss",
               e.balance_loss, "the shazeer load estimator needs the noisy_topk router")
    _check(t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
           f"must divide train.batch_size ({t.batch_size})")
    _check(t.device in DEVICES, "train.device", t.device, f"allowed: {' | '.join(DEVICES)}")
    _check(t.dtype in DTYPES, "train.dtype", t.dtype, f"allowed: {' | '.join(DTYPES)}")


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but probably not meant, one line each (train and info print them).

    Warned, not refused: train.warmup_steps ≥ train.max_steps, where the learning rate never
    reaches train.lr (or reaches it only at the last step) and never decays. Short smoke runs of a
    shipped config (train.max_steps=4 with its 20 warmup steps) are legitimate, and a run whose
    max_steps is raised on --resume gets its full schedule, so refusing would be wrong.

    Allowed silently, on purpose: train.eval_every, train.checkpoint_every and train.log_every
    larger than train.max_steps - the trainer always logs, evaluates and checkpoints at the last
    step, so a value past the end only means "at the end".
    """
    t = cfg.train
    out = []
    if t.warmup_steps > t.max_steps:
        out.append(f"train.warmup_steps ({t.warmup_steps}) > train.max_steps ({t.max_steps}): the learning rate "
                   f"only climbs to {t.max_steps}/{t.warmup_steps} of train.lr and never decays (set "
                   f"train.warmup_steps ≤ {t.max_steps}, e.g. {max(0, t.max_steps // 10)})")
    elif t.warmup_steps == t.max_steps and t.max_steps > 1:
        out.append(f"train.warmup_steps = train.max_steps ({t.max_steps}): the learning rate reaches train.lr at "
                   f"the last step and never decays (e.g. train.warmup_steps={max(0, t.max_steps // 10)})")
    return out


# ---------------------------------------------------------------------------------------------
# public entry points


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, mark):
        super().__init__(f"key {key!r} appears twice")
        self.key, self.problem_mark = key, mark


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last one silently, so `lr: 1e-3` further down would quietly override the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged by the base class
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key (a list): the base class names that error
                pass
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder, not a file", "pass a YAML file, e.g. configs/tiny-moe.yaml")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}", "see configs/ for the shipped configs")
        try:
            loaded = yaml.load(path.read_text(), Loader=_StrictLoader)
        except _DuplicateKey as exc:
            raise ConfigError(f"{path}: key {exc.key!r} appears twice in one section (line "
                              f"{exc.problem_mark.line + 1}); YAML would keep only the last",
                              "delete one of them") from exc
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


def flat_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict (or a config) as {dotted key: leaf value}; a null section is one leaf."""
    if dataclasses.is_dataclass(d):
        d = to_dict(d)
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flat_dict(v, key))
        else:
            out[key] = v
    return out


def config_differences(a: Config | dict, b: Config | dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (Config objects or their dicts), sorted.

    A key present on one side only counts as a difference; a section null on one side (model.moe:
    null) is one difference, "model.moe", not one per key under it. `ignore`: keys left out,
    with everything under them. Used to match checkpoints to configs and to describe the dense twin.
    """
    fa, fb = flat_dict(a), flat_dict(b)
    diffs = {k for k in set(fa) | set(fb) if (k in fa, fa.get(k)) != (k in fb, fb.get(k))
             and not any(k == i or k.startswith(i + ".") for i in ignore)}
    return sorted(k for k in diffs if not any(k.startswith(p + ".") for p in diffs))


# Keys added after runs were first saved, with the value that trains as the code did before them:
# a saved config without such a key means that value (checkpoint matching, config_hash), so runs
# saved before the key existed still resume and are still reused.
ADDED_KEYS: dict[str, object] = {"train.ffn_out_lr_scale": 1.0}


def with_added_keys(d: dict) -> dict:
    """A config dict (as saved in config.yaml) with every ADDED_KEYS key it lacks set to its value."""
    out = copy.deepcopy(d)
    for key, value in ADDED_KEYS.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:  # a section the saved config lacks (or holds null) is left as it is
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(last, value)
    return out


def config_hash(cfg: Config, *, ignore: tuple[str, ...] = ("train.max_steps",)) -> str:
    """A short hash of what defines the model and its training, to match checkpoints to runs.

    `ignore` lists dotted keys left out (extending max_steps on resume is allowed); ADDED_KEYS at
    their old-behaviour value are left out too, so a config hashes as it did before they existed.
    """
    data = to_dict(cfg)
    flat = flat_dict(data)
    ignore = tuple(ignore) + tuple(k for k, v in ADDED_KEYS.items() if flat.get(k) == v)
    for key in ignore:
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.get(p) or {}
        node.pop(last, None)
    blob = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
