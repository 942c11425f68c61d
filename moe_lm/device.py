"""Which device and precision a command runs on: one rule for train, eval, generate and bench.

    device, amp_dtype = resolve_device("auto", "auto")   # (cuda, bfloat16) on a GPU, (cpu, None) here
"""

from __future__ import annotations

import os
import platform
from typing import Optional

import torch

from . import checks
from .errors import ConfigError


def resolve_device(device: str = "auto", dtype: str = "auto",
                   name: str = "train.device") -> tuple[torch.device, Optional[torch.dtype]]:
    """-> (device, autocast dtype or None for plain float32).

    device: auto | cpu | cuda | mps; auto = cuda, else mps, else cpu. dtype: auto | float32 |
    bfloat16 | float16; auto = bfloat16 on CUDA, float32 elsewhere. `name`: the key or option the
    device came from, for the error (checks.device: ConfigError unless one of the above and
    present here). float16 off CUDA is a ConfigError (it needs the grad scaler's CUDA kernels).
    """
    checks.device(name, device)
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        # NOTE: bf16 on a CPU without bf16 units is slower than fp32, so auto means fp32 there.
        return dev, (torch.bfloat16 if dev.type == "cuda" else None)
    if dtype == "float32":
        return dev, None
    if dtype == "float16" and dev.type != "cuda":
        raise ConfigError(f"train.dtype = 'float16' needs a CUDA device (this run is on {dev.type})",
                          "use train.dtype=float32 or bfloat16")
    return dev, {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def precision_name(amp_dtype: Optional[torch.dtype]) -> str:
    """'float32', or e.g. 'bfloat16' for an autocast dtype."""
    return "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the processor's as the platform module reports it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def openmp_settings() -> dict[str, Optional[str]]:
    """How torch's CPU threads wait at the end of a parallel region, as run and benchmark records
    keep it: OMP_WAIT_POLICY and GOMP_SPINCOUNT from the environment (None where unset; moe_lm's
    import sets the spin count, see moe_lm/__init__.py)."""
    return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; a no-op elsewhere), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
