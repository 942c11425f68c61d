"""Run folders (`runs/<name>/`): what one holds, and the trainer's keeper of one.

    found = find_run(run_dir, cfg, asked_by="compare-dense")   # None, or FoundRun
    found.checkpoint, found.step, found.finished

`find_run` is the one answer to "is there a run here, of this config, finished or not", for
`train --resume`, for compare-dense (which reuses its finished runs and resumes the others) and
for `compare-dense --reuse-moe` (`finished_run`). Its errors are the same for the three: a damaged
checkpoint is a CheckpointError naming an earlier one; a run of another config is a RunError
naming what differs, with the fix in the words of the command that asked (OTHER_CONFIG_FIX).

During training the `Checkpointer` owns the run folder: it plans where to start (`plan`: a
verified checkpoint of this config, or a fresh folder), loads that checkpoint (`restore`), sets
the folder up (`open`: config.yaml, env.json, metrics.jsonl cut back to the resume point) and
saves checkpoints (`save`). Under torchrun every rank plans and restores; rank 0 alone writes.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__, checks, distributed
from ..config import Config, dump_yaml
from ..device import device_name, openmp_settings, precision_name
from ..errors import ConfigError, DataError, RunError
from ..files import write_atomic
from ..model import cpu_kernel, gemm
from . import checkpoint as ckpt_io
from .metrics import RunLog, event_record, truncate_metrics

# What to do about a run of another config, in the words of the command that found it.
OTHER_CONFIG_FIX = {
    "train": "resume with the same settings (only train.max_steps and logging/checkpoint/device settings may "
             "change), or start a new run under another name",
    "compare-dense": "rerun compare-dense with --overwrite, or give it another --out",
    "--reuse-moe": "pass a run of the same config and seed, or leave out --reuse-moe",
}


@dataclass
class FoundRun:
    """A run of the config asked about, as its checkpoint (verified) says."""

    checkpoint: Path  # the run's latest checkpoint (or the checkpoint folder asked about)
    state: dict  # its state.json, every file checked against it
    finished: bool  # its step reached the config's train.max_steps (see length_problem for "exactly")

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @functools.cached_property
    def schedules(self) -> list[int]:
        """The train.max_steps of each learning-rate schedule the run was trained under, in order
        (one unless `train --resume` changed it; the cosine decay ends at max_steps, so a run
        extended that way followed a bent schedule). Checkpoints that predate the record: the
        max_steps in the checkpoint's config.yaml; [] when that cannot be read."""
        try:
            if "max_steps_history" in self.state:
                return [int(n) for n in self.state["max_steps_history"]]
            return [int(ckpt_io.saved_config(self.checkpoint)["train"]["max_steps"])]
        except (KeyError, TypeError, ValueError):  # unreadable: not known
            return []

    @property
    def extended(self) -> bool:
        """Trained under more than one schedule (`train --resume` with another max_steps)."""
        return len(self.schedules) > 1

    def length_problem(self, max_steps: int) -> Optional[str]:
        """Why this run cannot stand for a run of exactly `max_steps` steps (finished, or
        interrupted and resumed with the same schedule), or None when it can. compare-dense's
        rule: every arm is trained to train.max_steps under that one schedule (equal FLOPs)."""
        if self.step > max_steps:
            return f"it is at step {self.step}, past train.max_steps = {max_steps}"
        if self.schedules and self.schedules != [max_steps]:
            ran = ", then ".join(str(n) for n in self.schedules)
            return f"its learning-rate schedule ran to train.max_steps = {ran}, not {max_steps}"
        return None


def find_run(where: Path | str, cfg: Config, asked_by: str = "train") -> Optional[FoundRun]:
    """Is there a run at `where`, of `cfg`'s config, finished or not?

    where: a run folder (its latest checkpoint counts) or a checkpoint folder. None when it holds
    no checkpoint (or does not exist). Raises CheckpointError when the checkpoint is truncated or
    corrupt (every file is checked against state.json first), RunError when it was trained with
    another config than `cfg` (up to checkpoint.RESUMABLE_CHANGES: max_steps, logging, device...),
    naming the differences and the fix for `asked_by` (a key of OTHER_CONFIG_FIX).
    """
    where = Path(where)
    if ckpt_io.is_checkpoint_dir(where):
        ckpt: Optional[Path] = where
    else:
        ckpt = ckpt_io.find_latest(where) if where.is_dir() else None
    if ckpt is None:
        return None
    state = ckpt_io.read_state(ckpt)
    diffs = ckpt_io.config_mismatch(ckpt, state, cfg)
    if diffs:
        raise RunError(f"checkpoint {ckpt} was trained with another config ({ckpt_io.summarize_differences(diffs)})",
                       OTHER_CONFIG_FIX[asked_by])
    return FoundRun(ckpt, state, state["step"] >= cfg.train.max_steps)


def check_reusable(src: Path, option: str = "--reuse-moe") -> None:
    """compare-dense --reuse-moe, before anything is trained or the config is complete: `src` is a
    folder holding a checkpoint (RunError otherwise: no finished run there)."""
    src = Path(src)
    if src.exists() or checks.blocking_file(src) is not None:  # a file where the run folder should be
        checks.in_folder(option, src, "pass a finished `moe-lm train` run folder, or leave out --reuse-moe")
    if (ckpt_io.find_latest(src) if src.is_dir() else None) is None:
        raise RunError(f"{option} {src}: no finished run there (no checkpoint)",
                       "train it first (moe-lm train --config ...), or leave out --reuse-moe")


def run_lr(src: Path) -> Optional[float]:
    """train.lr of the run at `src`, from its latest checkpoint's config.yaml (None when unreadable)."""
    latest = ckpt_io.find_latest(Path(src))
    try:
        return float(ckpt_io.saved_config(latest)["train"]["lr"]) if latest is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def finished_run(src: Path, cfg: Config, option: str = "--reuse-moe") -> FoundRun:
    """The finished run of `cfg` at `src` (compare-dense --reuse-moe's run, or a sweep's run taken
    as a first seed; `option` names it in messages); RunError when there is none, it is of another
    config, of another length (FoundRun.length_problem), or it stopped before train.max_steps."""
    check_reusable(src, option)
    found = find_run(src, cfg, asked_by=option if option in OTHER_CONFIG_FIX else "compare-dense")
    problem = found.length_problem(cfg.train.max_steps)
    if problem is not None:
        fix = ("pass a run trained to train.max_steps from its start (this one was extended by `train --resume`)"
               if found.extended else "give compare-dense the run's own train.max_steps, or pass a run trained to this one")
        raise RunError(f"{option} {src} is not a run of train.max_steps = {cfg.train.max_steps}: {problem}", fix)
    if not found.finished:
        raise RunError(f"{option} {src} stopped at step {found.step} of {cfg.train.max_steps}",
                       f"finish it first (moe-lm train --config ... --resume auto --out {src})")
    return found


def looks_like_run_dir(run_dir: Path) -> bool:
    """A folder `moe-lm train` wrote (so --overwrite may delete it)."""
    return run_dir.is_dir() and any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl", "checkpoints"))


# ---------------------------------------------------------------------------------------------
# the trainer's side


@dataclass
class Progress:
    """Where a run stands; a checkpoint saves it and `Checkpointer.restore` brings it back."""

    flops_per_token: float  # training FLOPs per token (accounting.flops_per_token's total)
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, over all resumes
    wall_s: float = 0.0  # training seconds over all resumes (evaluations, checkpoints, logging excluded)
    last_val: Optional[dict] = None  # the last evaluation: step, val_loss, val_ppl
    schedules: list[int] = field(default_factory=list)  # FoundRun.schedules (+ this session's, from its first step)

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    def advance(self, tokens: int, seconds: float) -> None:
        """One optimizer step done, on `tokens` tokens in `seconds` of training time."""
        self.step += 1
        self.tokens += tokens
        self.wall_s += seconds


class Checkpointer:
    """The run folder during training: where to start, its files, its checkpoints.

    checkpointer = Checkpointer(run_dir, cfg, ctx, data)
    checkpointer.plan(resume, overwrite)        # before any work: RunError / CheckpointError / DataError
    progress = checkpointer.restore(parts, alarm, flops_per_token)   # after the model is built
    log = checkpointer.open(overwrite, device, amp_dtype, command_line, tensorboard)
    checkpointer.save(progress, log)             # -> the checkpoint folder; `last` remembers it
    """

    def __init__(self, run_dir: Path, cfg: Config, ctx: distributed.Dist, data: Any):
        self.run_dir, self.cfg, self.ctx, self.data = Path(run_dir), cfg, ctx, data
        self.start: Optional[FoundRun] = None  # the checkpoint training continues from; None = a fresh run
        self.last: Optional[Path] = None  # the last checkpoint saved (or started from)
        self.saved_step: Optional[int] = None  # the step of the last checkpoint this session saved
        self.parts: Any = None  # the model, optimizer and grad scaler (step.Parts), from `restore` on
        self.alarm: Any = None  # the collapse alarm, whose counters a checkpoint keeps
        self.set_aside: list[Path] = []  # later checkpoints `open` renamed superseded-* (resumed from an earlier one)

    def plan(self, resume: Optional[str], overwrite: bool) -> None:
        """Where training starts: `self.start`, a verified checkpoint of this config (its files,
        its config, its tokenizer against the data's), or None for a fresh run folder.

        resume None: the run folder must be new, or overwrite must be set and it must look like a
        run folder. "auto": this run's latest checkpoint, or a fresh start when there is none.
        A path: that checkpoint folder, or that run folder's latest checkpoint."""
        if resume is None:
            self._check_fresh(overwrite)
            return
        where = self.run_dir if resume == "auto" else ckpt_io.resolve_checkpoint(Path(resume))
        found = find_run(where, self.cfg, asked_by="train")
        if found is None:
            return  # auto with nothing to resume: start fresh
        saved_tok, tok = found.checkpoint / "tokenizer.json", self.data.tokenizer_path
        if saved_tok.is_file() and tok and Path(tok).is_file() and saved_tok.read_bytes() != Path(tok).read_bytes():
            raise DataError(f"checkpoint {found.checkpoint} was trained with another tokenizer than {tok}",
                            "point data.dir at the data folder the run was trained on")
        if found.finished:
            where = "already at" if found.step == self.cfg.train.max_steps else "past"
            raise RunError(f"checkpoint {found.checkpoint} is at step {found.step}, {where} train.max_steps = "
                           f"{self.cfg.train.max_steps}", f"train longer with train.max_steps={found.step * 2}")
        self.start = found

    def _check_fresh(self, overwrite: bool) -> None:
        run_dir = self.run_dir
        exists = run_dir.exists() and any(run_dir.iterdir()) if run_dir.is_dir() else run_dir.exists()
        if exists and not overwrite:
            raise RunError(f"run folder {run_dir} already exists",
                           "continue it with --resume auto, replace it with --overwrite, or choose --out / name=")
        if exists and overwrite and not looks_like_run_dir(run_dir):
            raise RunError(f"refusing to delete {run_dir}: it does not look like a run folder", "choose another --out")

    def restore(self, parts: Any, alarm: Any, flops_per_token: float) -> Progress:
        """Load the planned checkpoint into `parts` (model, optimizer, grad scaler, RNG states)
        and `alarm`'s counters; keep both for `save`. Returns where the run stands (step 0 when
        fresh). Every rank loads the single-process checkpoint (expert parallel: its experts)."""
        self.parts, self.alarm = parts, alarm
        progress = Progress(flops_per_token)
        if self.start is None:
            return progress
        progress.schedules = list(self.start.schedules)  # save adds this session's max_steps
        ckpt = self.start.checkpoint
        layout = distributed.LocalLayout(parts.model, parts.optimizer) if parts.expert_parallel else None
        st = ckpt_io.load_checkpoint(ckpt, parts.model, parts.optimizer, scaler=parts.scaler,
                                     map_location=parts.device, layout=layout)
        progress.step, progress.tokens, progress.wall_s = st["step"], st["tokens"], st.get("wall_s", 0.0)
        alarm.load_state_dict(st.get("alarm", {}))
        progress.last_val = st.get("last_val")
        if progress.step != st.get("next_batch_index", progress.step):
            raise ConfigError(f"checkpoint {ckpt} has a data position unknown to this trainer")
        self.last = ckpt
        return progress

    def open(self, overwrite: bool, device: torch.device, amp_dtype: Optional[torch.dtype],
             command_line: Optional[list[str]], tensorboard: bool) -> RunLog:
        """Set the run folder up (rank 0): replace it when overwrite, set aside checkpoints past
        the resume point, cut metrics.jsonl back to it (or carry over another run's history), write
        config.yaml and env.json. Returns where the records go (nowhere on the other ranks)."""
        if not self.ctx.is_main:
            return RunLog(None)
        run_dir, step = self.run_dir, self.start.step if self.start is not None else 0
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_partial(run_dir / "checkpoints")
        metrics = run_dir / "metrics.jsonl"
        if self.start is None:
            metrics.write_text("")
        else:
            ckpt_root = (run_dir / "checkpoints").resolve()
            # checkpoints past the resume point: an abandoned branch (the trainer names them)
            self.set_aside = ckpt_io.set_aside_later(ckpt_root, step)
            source = self.start.checkpoint.resolve().parent.parent / "metrics.jsonl"
            if self.start.checkpoint.resolve().parent == ckpt_root:
                truncate_metrics(metrics, step)
            elif not metrics.exists() or metrics.stat().st_size == 0:  # another run's: carry its history over
                truncate_metrics(metrics, step, source=source if source.is_file() else metrics)
            else:
                truncate_metrics(metrics, step)
        write_atomic(run_dir / "config.yaml", dump_yaml(self.cfg))
        env = environment(device, amp_dtype, command_line, self.data, self.start.checkpoint if self.start else None)
        write_atomic(run_dir / "env.json", json.dumps(env, indent=1))
        return RunLog(run_dir, tensorboard=tensorboard)

    def save(self, progress: Progress, log: RunLog) -> Path:
        """Checkpoint the run at progress.step (atomic; the last train.keep_checkpoints kept) and
        log it. Expert parallel: every rank's experts are gathered first (a collective), so the
        checkpoint reads as one process's. Returns its folder."""
        parts, t = self.parts, self.cfg.train
        self.saved_step = progress.step
        # this session's schedule joins the history once it has trained a step (a resume stopped
        # before its first step rewrites its checkpoint as it was)
        if progress.step > (self.start.step if self.start is not None else 0) and progress.schedules[-1:] != [t.max_steps]:
            progress.schedules.append(t.max_steps)
        state = {"tokens": progress.tokens, "wall_s": progress.wall_s, "flops": progress.flops,
                 "next_batch_index": progress.step, "data_seed": t.seed, "alarm": self.alarm.state_dict(),
                 "last_val": progress.last_val, "max_steps_history": progress.schedules}
        weights, opt_state = (distributed.full_states(parts.model, parts.optimizer, self.ctx) if parts.expert_parallel
                              else (None, None))
        path = self.run_dir / "checkpoints" / ckpt_io.step_dir_name(progress.step)
        if self.ctx.is_main:
            path = ckpt_io.save_checkpoint(self.run_dir, step=progress.step, model=parts.model,
                                           optimizer=parts.optimizer, cfg=self.cfg, state=state,
                                           tokenizer_path=self.data.tokenizer_path, scaler=parts.scaler,
                                           keep=t.keep_checkpoints, model_state=weights, optimizer_state=opt_state)
        log.write(event_record(step=progress.step, event="checkpoint", message=str(path)))
        self.last = path
        return path


def environment(device: torch.device, amp_dtype: Optional[torch.dtype], command_line: Optional[list[str]],
                data: Any = None, resumed_from: Optional[Path] = None) -> dict:
    """env.json: versions, machine, device and precision, command line, data folder, git commit."""
    import numpy as np

    env = {
        "moe_lm": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        **openmp_settings(), "cpu_matmul": gemm.backend_for(device),
        "cpu_kernel": cpu_kernel.state_for(device),
        "world_size": distributed.env_world_size(),
        "device": device.type, "device_name": device_name(device),
        "precision": precision_name(amp_dtype) + ("" if amp_dtype is None else " autocast"),
        "command_line": list(command_line) if command_line else None, "cwd": os.getcwd(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "data_dir": str(data.dir) if data is not None else None, "git_commit": _git_commit(),
    }
    for mod in ("safetensors", "tokenizers", "rich"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - versions are informative only
            pass
    return env


def _git_commit() -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
