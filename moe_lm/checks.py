"""Checks of single values shared by the config and every command's options: each raises a
ConfigError (one line, exit 2) naming the key or option, the value and what is allowed.

    number("--temperature", t, lo=0)                     # finite, >= 0
    number("train.seed", s, lo=0, hi=SEED_MAX, integer=True)
    choice("--dispatch", d, ("fused", "grouped_mm"))
    device("--device", name)                             # one of DEVICES, and present on this machine
    cpu_matmul()                                         # MOE_LM_CPU_MATMUL: one of CPU_MATMULS (device checks it)
    cpu_kernel()                                         # MOE_LM_CPU_KERNEL: one of CPU_KERNELS (device checks it)
    out_folder("--out", path)                            # not a file, no file on the way to it
    in_file("--config", path, hint) / in_folder("--data", path, hint)

Commands call them before any work starts (loading a model, training, writing), so a bad value
never costs a finished run or leaves anything half-written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
CPU_MATMUL_ENV = "MOE_LM_CPU_MATMUL"
CPU_MATMULS = ("auto", "onednn", "blas")  # the library of float32 CPU matmuls (model.gemm)
CPU_KERNEL_ENV = "MOE_LM_CPU_KERNEL"
CPU_KERNELS = ("auto", "off")  # the C++ expert kernel of the "cpu_kernel" dispatch path (model.cpu_kernel)
SEED_MAX = 2**63 - 1  # torch.manual_seed takes a 64-bit integer; numpy any non-negative one


def _fmt(v: float) -> str:
    if isinstance(v, int) and abs(v) >= 2**20 and (abs(v) & (abs(v) - 1)) == 0:
        return f"2^{abs(v).bit_length() - 1}"
    if isinstance(v, int) and abs(v) >= 2**20 and ((abs(v) + 1) & abs(v)) == 0:
        return f"2^{(abs(v) + 1).bit_length() - 1} - 1"
    return f"{v:g}" if isinstance(v, float) else f"{v:,}" if abs(v) >= 10**6 else str(v)


def allowed_range(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
                  hi_open: bool = False, integer: bool = False) -> str:
    """'a finite number ≥ 0', 'an integer between 1 and 1,048,576', ..."""
    what = "an integer" if integer else "a finite number"
    if lo is not None and hi is not None:
        if not lo_open and not hi_open:
            return f"must be {what} between {_fmt(lo)} and {_fmt(hi)}"
        return f"must be {what} in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"must be {what} {'>' if lo_open else '≥'} {_fmt(lo)}"
    if hi is not None:
        return f"must be {what} {'<' if hi_open else '≤'} {_fmt(hi)}"
    return f"must be {what}"


def in_range(value: Any, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
             hi_open: bool = False, integer: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer and not isinstance(value, int):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if lo is not None and (value <= lo if lo_open else value < lo):
        return False
    if hi is not None and (value >= hi if hi_open else value > hi):
        return False
    return True


def number(name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False, hint: Optional[str] = None, sep: str = " = ") -> None:
    """ConfigError unless `value` is a finite number (an int when `integer`) within [lo, hi]
    (open ends with lo_open / hi_open). `name` is the config key or the option."""
    if not in_range(value, lo, hi, lo_open=lo_open, hi_open=hi_open, integer=integer):
        shown = repr(value)
        if isinstance(value, int) and len(shown) > 40:  # e.g. YAML's 1e300 read into an int key
            shown = f"{float(value):.4g}"
        raise ConfigError(f"{name}{sep}{shown}: {allowed_range(lo, hi, lo_open=lo_open, hi_open=hi_open, integer=integer)}",
                          hint)


def option_number(option: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None,
                  **kw: Any) -> None:
    """number() for a command-line option, worded as `--option VALUE: ...`; None passes (not given)."""
    if value is not None:
        number(option, value, lo, hi, sep=" ", **kw)


def _said(name: str, value: Any) -> str:
    """How a value reads in a message: `--device tpu` for an option, `train.device = 'tpu'` for a key."""
    return f"{name} {value}" if name.startswith("-") else f"{name} = {value!r}"


def _fix(name: str, value: str) -> str:
    return f"{name} {value}" if name.startswith("-") else f"{name}={value}"


def choice(name: str, value: Any, allowed: Iterable[str], hint: Optional[str] = None) -> None:
    """ConfigError unless `value` is one of `allowed` (listed in the message)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{_said(name, value)}: allowed: {' | '.join(allowed)}", hint)


def device(name: str, value: str, allowed: Iterable[str] = DEVICES) -> None:
    """One of `allowed` (DEVICES by default) and, for cuda / mps, present on this machine; and the
    environment's MOE_LM_CPU_MATMUL and MOE_LM_CPU_KERNEL (cpu_matmul, cpu_kernel). Every
    command's --device and train.device go through here before any work."""
    allowed = tuple(allowed)
    choice(name, value, allowed)
    cpu_matmul()
    cpu_kernel()
    if value not in ("cuda", "mps"):
        return
    import torch

    mps = getattr(torch.backends, "mps", None)
    present = torch.cuda.is_available() if value == "cuda" else (mps is not None and mps.is_available())
    if not present:
        others = " or ".join(_fix(name, v) for v in ("auto", "cpu") if v in allowed)
        raise ConfigError(f"{_said(name, value)} but torch sees no {value.upper()} device", f"use {others}")


def _env_choice(env: str, allowed: tuple, what: str) -> str:
    """The environment variable `env` as one of `allowed` ("auto" when unset or empty; case and
    spaces ignored); anything else is a ConfigError calling it "not a <what>"."""
    raw = os.environ.get(env, "")
    want = raw.strip().lower() or "auto"
    if want not in allowed:
        raise ConfigError(f"{env}={raw!r} is not a {what}", f"set it to one of {', '.join(allowed)}, or unset it")
    return want


def cpu_matmul() -> str:
    """The library asked for float32 matmuls on a CPU, from the environment variable
    MOE_LM_CPU_MATMUL: "auto" (unset or empty; model.gemm.backend resolves it), "onednn" or "blas";
    case and spaces ignored. Anything else is a ConfigError."""
    return _env_choice(CPU_MATMUL_ENV, CPU_MATMULS, "CPU matmul library")


def cpu_kernel() -> str:
    """Whether MoE layers on a CPU may build and use the C++ expert kernel, from the environment
    variable MOE_LM_CPU_KERNEL: "auto" (unset or empty: where it builds) or "off"; case and spaces
    ignored. Anything else is a ConfigError."""
    return _env_choice(CPU_KERNEL_ENV, CPU_KERNELS, "CPU kernel setting")


def blocking_file(path: Path) -> Optional[Path]:
    """The existing non-folder at `path` or on the way to it (a file where a folder must be), or None."""
    for p in [path, *path.parents]:
        if p.exists():
            return None if p.is_dir() else p
    return None


def out_folder(name: str, path: Optional[Path | str], hint: str = "pass a folder path") -> None:
    """An output folder: it may exist (as a folder) or not yet, but no file may stand at it or above it."""
    if path is None:
        return
    path = Path(path)
    blocker = blocking_file(path)
    if blocker == path:
        raise ConfigError(f"{name} {path} is a file, not a folder", hint)
    if blocker is not None:
        raise ConfigError(f"{name} {path}: {blocker} is a file, not a folder", hint)


def in_file(name: str, path: Optional[Path | str], hint: Optional[str] = None) -> None:
    """An input that must be an existing file."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{name} {path} is a folder, not a file", hint)
    _exists(name, path, hint)


def in_folder(name: str, path: Optional[Path | str], hint: Optional[str] = None) -> None:
    """An input that must be an existing folder."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name} {path} is a file, not a folder", hint)
    _exists(name, path, hint)


def _exists(name: str, path: Path, hint: Optional[str]) -> None:
    if path.exists():
        return
    blocker = blocking_file(path)
    if blocker is not None:
        raise ConfigError(f"{name} {path}: {blocker} is a file, not a folder", hint)
    raise ConfigError(f"{name} {path} does not exist", hint)


def refuse_torchrun(command: Optional[str]) -> None:
    """Only `train` runs as several processes (docs/DISTRIBUTED.md). Under torchrun every other
    command would run once per process, each writing the same files (compare-dense's ranks then
    stopped each other with a misleading "no checkpoint"): refused, one line, before any work."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world > 1 and command not in (None, "train"):
        raise ConfigError(f"`moe-lm {command}` runs as one process, but torchrun started {world} (WORLD_SIZE={world})",
                          f"run `moe-lm {command} ...` without torchrun: torchrun is for `moe-lm train`, "
                          "see docs/DISTRIBUTED.md")
