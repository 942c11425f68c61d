"""Checkpoints that survive a kill at any instant and resume training exactly.

A checkpoint is a folder `runs/<name>/checkpoints/step-NNNNNNN/`:

    model.safetensors   weights and persistent buffers (router biases); tied tensors stored once
    optimizer.pt        optimizer (and grad-scaler) state, loadable with torch.load(weights_only=True)
    rng.pt              torch CPU/CUDA, numpy and python RNG states, also weights_only-loadable
    config.yaml         the resolved config it was trained with
    tokenizer.json      a copy of the data folder's tokenizer
    state.json          step, tokens, data-sampler position, config hash, versions, wall clock,
                        the collapse alarm's counters, and the size and sha256 of every file above

Writing: every file goes into a temporary folder next to the checkpoints, is fsync'ed, and the
folder is renamed into place in one step; only then is the `latest` pointer replaced (write a
temporary file, then os.replace). A kill at any instant leaves the previous checkpoint whole and
`latest` pointing at a complete folder. Loading checks every file's size and sha256 first.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import __version__
from ..config import Config, config_differences, config_hash, to_dict, with_added_keys
from ..errors import CheckpointError
from ..files import fsync_dir, fsync_file, save_safetensors, sha256_file, write_atomic, write_text_synced

FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d{7,})$")
LATEST = "latest"

# Keys that may differ between a checkpoint and the config resuming it: they change how long to
# train, what is logged and where, not the model or the optimisation that the checkpoint holds.
RESUMABLE_CHANGES = (
    "name", "data.dir", "train.max_steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "train.device", "train.dtype", "train.compile",
    "train.tensorboard", "model.moe.expert_parallel",
)

# Test hook (used only by tests/test_checkpoint*.py): "STEP:SECONDS" sleeps inside the write of
# the checkpoint of that step, after the weights are written and before the rename, so a test can
# SIGKILL the process mid-write.
_TEST_SLEEP_ENV = "MOE_LM_TEST_CHECKPOINT_SLEEP"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def resume_hash(cfg: Config) -> str:
    return config_hash(cfg, ignore=RESUMABLE_CHANGES)


# ---------------------------------------------------------------------------------------------
# weights (tied tensors stored once) and RNG states


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory: keep the first name, record the aliases."""
    seen: dict[tuple, str] = {}
    unique, tied = {}, {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() > 0 and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = t.detach().to("cpu").contiguous()
    return unique, tied


def save_weights(model: torch.nn.Module, path: Path, state: Optional[dict] = None) -> None:
    """state: model.state_dict() unless given (expert parallel: the experts gathered from all ranks)."""
    unique, tied = _dedupe_tied(model.state_dict() if state is None else state)
    save_safetensors(unique, path, metadata={"format": "pt", "tied": json.dumps(tied)})


def load_weights(model: torch.nn.Module, path: Path, layout: Any = None) -> None:
    """layout: maps the single-process weights onto this rank's share (distributed.LocalLayout)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    state = load_file(str(path))
    for alias, target in json.loads(meta.get("tied", "{}")).items():
        state[alias] = state[target]
    if layout is not None:
        state = layout.weights(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            what.append(f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{path} does not fit this model ({'; '.join(what)})",
                              "resume with the config the checkpoint was trained with")


def rng_state() -> dict:
    """Every RNG the run may draw from, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


# ---------------------------------------------------------------------------------------------
# finding checkpoints


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under `ckpt_root`, by step."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` points to, else the highest step folder, else None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if STEP_DIR.match(name) and (root / name).is_dir():
            return root / name
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` names a checkpoint folder (it holds a state.json, or is named step-NNNNNNN),
    rather than a run folder."""
    path = Path(path)
    return (path / "state.json").is_file() or STEP_DIR.match(path.name) is not None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder (-> its latest checkpoint)."""
    path = Path(path)
    if is_checkpoint_dir(path):
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist", _earlier_hint(path))
        return path
    for run_dir in (path, path.parent):
        if (run_dir / "checkpoints").is_dir():
            latest = find_latest(run_dir)
            if latest is not None:
                return latest
    raise CheckpointError(f"no checkpoint at {path}",
                          "pass a checkpoint folder like runs/<name>/checkpoints/step-0000100, or a run folder")


def _earlier_hint(path: Path) -> str:
    m = STEP_DIR.match(path.name)
    step = int(m.group(1)) if m else None
    others = [p for s, p in list_checkpoints(path.parent) if p != path and (step is None or s < step)]
    if not others:
        others = [p for s, p in list_checkpoints(path.parent) if p != path]
    if others:
        return f"use an earlier checkpoint: --resume {others[-1]}"
    return "no other checkpoint in this run; start again with --overwrite"


# ---------------------------------------------------------------------------------------------
# verify (before any training work) and load


def read_state(ckpt: Path) -> dict:
    """state.json of a checkpoint after checking every file it lists (size and sha256)."""
    ckpt = Path(ckpt)
    broken = lambda why: CheckpointError(  # noqa: E731
        f"checkpoint {ckpt} is truncated or corrupt ({why})", _earlier_hint(ckpt))
    try:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise broken("state.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise broken("state.json is not valid JSON") from None
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or "step" not in state:
        raise broken("state.json lacks its step or file list")
    if state.get("format", 0) > FORMAT:
        raise CheckpointError(f"checkpoint {ckpt} has format {state['format']}, newer than this moe-lm "
                              f"({__version__}) reads", "upgrade moe-lm")
    for name, info in state["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise broken(f"{name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise broken(f"{name} has {size} bytes, expected {info['bytes']}")
        if sha256_file(f) != info["sha256"]:
            raise broken(f"{name} does not match its checksum")
    return state


def saved_config(ckpt: Path) -> dict:
    """The config a checkpoint was trained with, as its config.yaml holds it (a plain nested
    dict, not validated); {} when it cannot be read."""
    try:
        saved = yaml.safe_load((Path(ckpt) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def config_mismatch(ckpt: Path, state: dict, cfg: Config) -> list[str]:
    """What differs between the config a checkpoint was trained with and `cfg`, beyond
    RESUMABLE_CHANGES: one "key saved -> current" per difference ("its config hash differs" when
    its config.yaml cannot be read); [] for the same config."""
    if state.get("config_hash") == resume_hash(cfg):
        return []
    current = to_dict(cfg)
    saved = with_added_keys(saved_config(ckpt))  # a key added since it was saved: the value that trained as before
    diffs = config_differences(saved, current, ignore=RESUMABLE_CHANGES)
    return [f"{k} {_shown(saved, k)} -> {_shown(current, k)}" for k in diffs] or ["its config hash differs"]


def _shown(d: dict, key: str) -> str:
    """The value at a dotted key, as config_mismatch shows it: repr, a section as {...}."""
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return repr("(absent)")
        d = d[part]
    return "{...}" if isinstance(d, dict) else repr(d)


def check_config(ckpt: Path, state: dict, cfg: Config) -> None:
    """The checkpoint must come from this config (up to RESUMABLE_CHANGES); CheckpointError naming
    the differences otherwise."""
    diffs = config_mismatch(ckpt, state, cfg)
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with another config ({summarize_differences(diffs)})",
            "resume with the same settings (only train.max_steps and logging/checkpoint/device settings may "
            "change), or start a new run under another name",
        )


def summarize_differences(diffs: list[str], at_most: int = 6) -> str:
    """config_mismatch's lines as one: the first `at_most`, then how many more."""
    return "; ".join(diffs[:at_most]) + (f"; and {len(diffs) - at_most} more" if len(diffs) > at_most else "")


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, scaler: Any = None, map_location: Any = "cpu", restore_rng: bool = True,
                    layout: Any = None) -> dict:
    """Load weights (+ optimizer, grad scaler, RNG) from a checkpoint verified by read_state.

    layout (expert parallel): a distributed.LocalLayout that keeps this rank's experts of the
    single-process layout checkpoints are saved in. Returns state.json's dict.
    """
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    try:
        load_weights(model, ckpt / "model.safetensors", layout)
        if optimizer is not None:
            opt = torch.load(ckpt / "optimizer.pt", map_location=map_location, weights_only=True)
            optimizer.load_state_dict(opt["optimizer"] if layout is None else layout.optimizer_state(opt["optimizer"]))
            if scaler is not None and opt.get("scaler"):
                scaler.load_state_dict(opt["scaler"])
        if restore_rng:
            set_rng_state(torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True))
    except CheckpointError:
        raise
    except (SafetensorError, RuntimeError, ValueError, KeyError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''})",
                              _earlier_hint(ckpt)) from exc
    return state


# ---------------------------------------------------------------------------------------------
# save


def clean_partial(ckpt_root: Path) -> None:
    """Remove folders left by a write or a prune that was killed half-way."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    cfg: Config, state: dict, tokenizer_path: Optional[Path] = None, scaler: Any = None,
                    keep: int = 2, model_state: Optional[dict] = None, optimizer_state: Optional[dict] = None) -> Path:
    """Write checkpoints/step-NNNNNNN atomically, point `latest` at it, keep the last `keep`.

    `state`: the trainer's extra state for state.json (tokens, wall clock, alarm counters...).
    model_state, optimizer_state: instead of the model's and optimizer's own state_dict() (expert
    parallel: gathered into the single-process layout).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_weights(model, tmp / "model.safetensors", model_state)
    _maybe_sleep_for_test(step)
    torch.save({"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state, "scaler": scaler.state_dict() if scaler is not None else None},
               tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    write_text_synced(tmp / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")

    files = {}
    for f in sorted(tmp.iterdir()):
        fsync_file(f)
        files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    full_state = {
        "format": FORMAT, "step": step, "config_hash": resume_hash(cfg), "moe_lm_version": __version__,
        "torch_version": torch.__version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **state, "files": files,
    }
    write_text_synced(tmp / "state.json", json.dumps(full_state, indent=1))
    fsync_dir(tmp)

    # NOTE: a folder of the same step exists when a resumed run passes a step it had saved before
    # (e.g. resumed from an earlier checkpoint): move it aside, move the new one in, then delete.
    trash = None
    if final.exists():
        trash = root / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_dir(root)
    write_atomic(root / LATEST, final.name + "\n")
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    prune(root, keep=keep, protect=final)
    return final


def prune(ckpt_root: Path, *, keep: int, protect: Optional[Path] = None) -> None:
    """Delete all but the `keep` highest-step checkpoints (renamed away first, so a kill mid-way
    never leaves a half-deleted folder that looks like a checkpoint)."""
    found = list_checkpoints(ckpt_root)
    for _, p in found[: max(0, len(found) - keep)]:
        if protect is not None and p.resolve() == Path(protect).resolve():
            continue
        trash = p.with_name(f".trash-{p.name}-{os.getpid()}")
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)


def set_aside_later(ckpt_root: Path, step: int) -> list[Path]:
    """Rename checkpoints after `step` to superseded-step-N (a run resumed from an earlier
    checkpoint abandons them; they stay on disk, out of `--resume auto` and pruning)."""
    moved = []
    for s, p in list_checkpoints(ckpt_root):
        if s > step:
            dest = p.with_name(f"superseded-{p.name}")
            if dest.exists():
                dest = p.with_name(f"superseded-{p.name}-{int(time.time())}")
            os.rename(p, dest)
            moved.append(dest)
    return moved


def _maybe_sleep_for_test(step: int) -> None:
    spec = os.environ.get(_TEST_SLEEP_ENV)
    if not spec:
        return
    at, _, seconds = spec.partition(":")
    if at.strip() and int(at) == step:
        time.sleep(float(seconds or 60))
