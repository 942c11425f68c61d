"""The training loop, as a recipe; each job is owned by one part:

    Checkpointer        runs.py        the run folder: where to start, set-up, saving, restoring
    Parts, train_step   step.py        the model and optimizer; one optimizer step
    Evaluator           evaluator.py   the validation windows, their expert load, the collapse alarm
    RunLog              metrics.py     metrics.jsonl (+ TensorBoard)
    TrainDisplay        display.py     the console

    result = train(load_config("configs/tiny-moe.yaml"))

The recipe (`Trainer`): 1. check everything (config, data folder, vocabulary, run folder,
checkpoint) before any work; 2. seed, build the model and optimizer; 3. resume from the planned
checkpoint, or start a fresh run folder; 4. per step: batch `step` of the seeded stream ->
train_step (micro-batches forward/backward, clip, AdamW step, router biases), then log, evaluate
and checkpoint when due; 5. a final checkpoint, plots, a TrainResult.

Exact resume: the model, optimizer and RNG states are in the checkpoint; the learning rate is a
pure function of the step; batch i of the data stream is a pure function of (seed, i); and the
evaluation runs under a forked RNG, so N steps + resume + N steps equals 2N steps on CPU.

Under torchrun (docs/DISTRIBUTED.md) every rank runs this same recipe on its rows of each global
batch (moe_lm.distributed); rank 0 alone writes the run folder.
"""

from __future__ import annotations

import copy
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import checks, distributed, signals
from ..config import Config, config_warnings, validate
from ..data.shards import get_batch, open_for_config
from ..device import precision_name, resolve_device
from ..errors import ConfigError, RunError, TrainingError
from ..model.accounting import flops_per_token
from .display import TrainDisplay, fmt_duration
from .evaluator import Evaluator
from .load import LoadMeter
from .metrics import event_record, read_metrics, tensorboard_available, train_record
from .runs import Checkpointer
from .step import Parts, lr_at, seed_everything, train_step


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # the step training stopped at
    tokens: int  # training tokens seen, over all resumes
    val_loss: Optional[float]  # the last evaluation's
    val_ppl: Optional[float]
    train_loss: Optional[float]  # the last step's cross-entropy
    tokens_per_s: float  # training throughput of this session (excludes evaluation)
    wall_s: float  # training wall clock over all resumes (excludes evaluations, checkpoints and logging)
    flops: float  # training FLOPs = flops_per_token x tokens
    checkpoint: Optional[Path]  # the last checkpoint written
    interrupted: bool = False


class TrainingInterrupted(signals.Interrupted):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved; the CLI exits 128 + signum
    (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, step: int, checkpoint: Path, signum: int = signal.SIGINT):
        super().__init__(signum, f"interrupted at step {step} ({signals.name(signum)}); checkpoint saved to {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


def train(cfg: Config, out_dir: Optional[Path | str] = None, resume: Optional[str] = None,
          overwrite: bool = False, console: Any = None, command_line: Optional[list[str]] = None,
          *, stop_after: Optional[int] = None, plots: bool = True) -> TrainResult:
    """Train `cfg`'s model on its data folder; write runs/<name>/ (or `out_dir`).

    resume: "auto" (this run's latest checkpoint, if any, else start fresh) or a checkpoint folder
    (or a run folder) to continue from, into this run's folder. overwrite: delete the run folder
    first. stop_after: stop (with a checkpoint) after this step while the learning-rate schedule
    still spans train.max_steps - a time-boxed session that a later --resume continues exactly.
    plots: draw runs/<name>/plots/ at the end (compare-dense and tests may skip it).

    Errors before any work: ConfigError, DataError, RunError, CheckpointError (see Trainer).
    Launched by torchrun (WORLD_SIZE > 1), every rank calls this; it joins the process group and
    leaves it at the end. A rank that loses its peers stops with a TrainingError.
    """
    with distributed.process_group(cfg.train.device) as ctx:
        try:
            trainer = Trainer(cfg, ctx, out_dir=out_dir, resume=resume, overwrite=overwrite, console=console,
                              command_line=command_line)
            return trainer.train(stop_after=stop_after, plots=plots)
        except Exception as exc:
            if not (ctx.enabled and distributed.is_comm_error(exc)):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = re.sub(r"\[[^\]]*\.(?:cc|cpp|h)(?::\d+)?\]\s*", "", first)  # gloo's source location
            first = first.split(". ")[0][:200]
            raise TrainingError(
                f"rank {ctx.rank} of {ctx.world_size} lost contact with the other processes ({first}): another rank "
                f"probably died (see its error above) or hangs", "fix that, then continue with --resume auto",
            ) from exc


class Trainer:
    """One training session. Constructing it is step 1 of the recipe (every check, no work);
    `train()` is the rest, top-down."""

    def __init__(self, cfg: Config, ctx: distributed.Dist = distributed.SINGLE, *,
                 out_dir: Optional[Path | str] = None, resume: Optional[str] = None, overwrite: bool = False,
                 console: Any = None, command_line: Optional[list[str]] = None):
        """1. Validate everything before any training work: the config (ConfigError), the
        torchrun split, the options, the data folder and its vocabulary (DataError; a null
        model.vocab_size is taken from it), the device, and the run folder or checkpoint to start
        from (Checkpointer.plan: RunError, CheckpointError, DataError)."""
        from rich.console import Console

        # NOTE: under torchrun only rank 0 talks; the others run the same code with a silent console
        self.console = (console if console is not None else Console()) if ctx.is_main else Console(quiet=True)
        self.cfg = cfg = copy.deepcopy(cfg)
        self.ctx, self.overwrite, self.command_line = ctx, overwrite, command_line
        validate(cfg)
        _check_parallel(cfg, ctx)
        if resume is not None and overwrite:
            raise RunError("--resume and --overwrite contradict each other", "pass one of them")
        run_dir = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
        checks.out_folder("--out" if out_dir is not None else "the run folder", run_dir,
                          "pass --out with a folder path" if out_dir is not None else "pass --out DIR or name=...")
        if resume is not None and resume != "auto":
            checks.in_folder("--resume", resume, "pass 'auto' or a checkpoint folder (runs/<name>/checkpoints/step-N)")
        self.data = open_for_config(cfg)
        cfg.model.vocab_size = int(self.data.vocab_size)
        self.device, self.amp_dtype = resolve_device(cfg.train.device, cfg.train.dtype)
        if ctx.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", ctx.local_rank)
        self.checkpointer = Checkpointer(run_dir, cfg, ctx, self.data)
        self.checkpointer.plan(resume, overwrite)
        if cfg.train.tensorboard and not tensorboard_available():
            raise ConfigError("train.tensorboard = true but the tensorboard package is not installed",
                              "pip install tensorboard (or: pip install 'moe-lm[tensorboard]'), "
                              "or set train.tensorboard=false")

    def train(self, stop_after: Optional[int] = None, plots: bool = True) -> TrainResult:
        """Steps 2-5 of the recipe; `stop_after`, `plots`: as `train()` takes them."""
        cfg, t, ctx = self.cfg, self.cfg.train, self.ctx
        # 2. seed, model, optimizer ----------------------------------------------------------------
        seed_everything(t.seed)
        self.parts = Parts.build(cfg, ctx, self.device, self.amp_dtype)
        layer_ids = self.parts.model.moe_layer_ids()
        self.evaluator = Evaluator(cfg, self.data, ctx, layer_ids)
        self.meter = LoadMeter(layer_ids, ctx)  # the training steps' expert load, per log window
        self.train_split = self.data.split("train")

        # 3. resume, or start a fresh run folder -----------------------------------------------------
        self.progress = self.checkpointer.restore(self.parts, self.evaluator.alarm,
                                                  float(flops_per_token(cfg.model)["total"]))
        ctx.barrier()  # every rank has checked the run folder before rank 0 changes it
        self.log = self.checkpointer.open(self.overwrite, self.device, self.amp_dtype, self.command_line,
                                          t.tensorboard)
        self._announce()
        end_step = t.max_steps if stop_after is None else min(t.max_steps, stop_after)
        self.window, self.session_tokens, self.session_wall, self.last_ce = _Window(), 0, 0.0, None

        # 4. the loop ----------------------------------------------------------------------------------
        stop = _StopRequest(synced=ctx.enabled)
        with stop, TrainDisplay(self.console, name=cfg.name, start_step=self.progress.step, max_steps=t.max_steps,
                                log_every=t.log_every) as self.display:
            if self.checkpointer.start is None:
                self.progress.last_val = self._evaluate()  # the untrained baseline, ~ln(vocab)
            while self.progress.step < end_step and not stop.requested:
                self.step(stop)
                self._log_evaluate_checkpoint(end_step, stop)
            # 5. the end: interrupted, or done ------------------------------------------------------
            interrupted = stop.requested and self.progress.step < end_step
            if interrupted:
                self._save_interrupted(stop)
        return self._finish(interrupted, stop, plots)

    def step(self, stop: _StopRequest) -> None:
        """Optimizer step number `progress.step` on batch `progress.step` of the seeded stream
        (step.train_step); a non-finite loss or gradient norm stops training (TrainingError)."""
        p, t = self.progress, self.cfg.train
        distributed.maybe_die_for_test(self.ctx, p.step)
        t0 = time.perf_counter()
        self.lr = lr_at(p.step, t)
        x, y = get_batch(self.train_split, p.step, t.batch_size, self.cfg.model.seq_len, t.seed)
        r = train_step(self.parts, x, y, self.lr, self.meter, stop)
        if r.nonfinite is not None:
            raise self._nonfinite(*r.nonfinite)
        tokens, dt = t.batch_size * self.cfg.model.seq_len, time.perf_counter() - t0
        p.advance(tokens, dt)
        self.session_tokens += tokens
        self.session_wall += dt
        self.last_ce = r.ce
        self.window.add(r.ce, r.aux, r.z, r.grad_norm, tokens, dt)
        self.display.on_step(p.step)

    def _log_evaluate_checkpoint(self, end_step: int, stop: _StopRequest) -> None:
        """After a step: the train record at log steps, an evaluation at eval steps, a checkpoint at
        checkpoint steps - and all three at the last step (and a checkpoint when asked to stop)."""
        p, t = self.progress, self.cfg.train
        if p.step % t.log_every == 0 or p.step == end_step or p.step == 1:
            w = self.window
            rec = train_record(step=p.step, tokens=p.tokens, flops=p.flops, wall_s=p.wall_s, lr=self.lr,
                               loss=w.mean("loss"), ce_loss=w.mean("ce"), aux_loss=w.mean("aux"), z_loss=w.mean("z"),
                               grad_norm=w.mean("gn"), tokens_per_s=w.tokens_per_s(), layers=self.meter.read())
            self.log.write(rec)
            self.display.on_train(rec)
            self.window = _Window()
        if p.step % t.eval_every == 0 or p.step == t.max_steps:
            p.last_val = self._evaluate()
        if p.step % t.checkpoint_every == 0 or p.step == end_step or stop.requested:
            self.checkpointer.save(p, self.log)

    def _evaluate(self) -> dict:
        return self.evaluator.evaluate(self.parts, self.progress, self.log, self.display)

    def _announce(self) -> None:
        """The run's first event (start, or resume), the start line, the config's warnings."""
        cfg, step, start = self.cfg, self.progress.step, self.checkpointer.start
        if start is not None:
            self.log.write(event_record(step=step, event="resume", message=f"resumed from {start.checkpoint}"))
        else:
            self.log.write(event_record(step=0, event="start", message=f"{cfg.name} on {self.device.type}"))
        line = _start_line(cfg, self.parts.n_params, self.device, self.amp_dtype, self.checkpointer.run_dir, step,
                           start.checkpoint if start is not None else None, self.ctx)
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        aside = self.checkpointer.set_aside
        if aside:  # resumed from an earlier checkpoint: the later ones leave --resume auto and pruning
            message = (f"set aside {len(aside)} later checkpoint{'s' if len(aside) > 1 else ''} of the abandoned "
                       f"branch: {', '.join(p.name for p in aside)} (kept in {aside[0].parent})")
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)
            self.log.write(event_record(step=step, event="superseded", message=message))
        for warning in config_warnings(cfg):  # valid but probably not meant (config.config_warnings)
            self.console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
            self.log.write(event_record(step=step, event="config_warning", message=warning))

    def _nonfinite(self, name: str, value: float) -> TrainingError:
        step = self.progress.step + 1
        self.log.write(event_record(step=step, event="nonfinite", message=f"{name} = {value}"))
        return TrainingError(
            f"the {name} became non-finite ({value}) at step {step}; stopped without saving this state "
            f"(last good checkpoint: {self.checkpointer.last or 'none'})",
            "lower train.lr, raise train.warmup_steps or set train.grad_clip=1.0, then --resume auto",
        )

    def _save_interrupted(self, stop: _StopRequest) -> None:
        step = self.progress.step
        if self.checkpointer.saved_step != step:
            self.checkpointer.save(self.progress, self.log)
        how, last = signals.name(stop.signum), self.checkpointer.last
        self.log.write(event_record(step=step, event="interrupted", message=f"{how}; checkpoint {last}", signal=how))
        self.display.note(f"interrupted at step {step} ({how}): checkpoint saved to {last}")

    def _finish(self, interrupted: bool, stop: _StopRequest, plots: bool) -> TrainResult:
        """Close the log, draw the plots, say how it ended; raise TrainingInterrupted if it was."""
        p, ctx, run_dir = self.progress, self.ctx, self.checkpointer.run_dir
        if interrupted:
            self.console.print(f"continue with: {_resume_command(self.command_line, run_dir, ctx.world_size)}",
                               markup=False, highlight=False, soft_wrap=True)
            if ctx.enabled:
                # NOTE: every rank leaves together, after rank 0 has written and said all that matters:
                # torchrun sends SIGTERM to the others as soon as one worker exits
                ctx.all_reduce_(torch.zeros(1, device=self.device))
        self.log.close()
        figures = _make_plots(run_dir, self.console) if plots and ctx.is_main else []
        val, session_s = p.last_val, self.session_wall
        result = TrainResult(
            run_dir=run_dir, steps=p.step, tokens=p.tokens,
            val_loss=val["val_loss"] if val else None, val_ppl=val["val_ppl"] if val else None,
            train_loss=self.last_ce, tokens_per_s=self.session_tokens / session_s if session_s > 0 else 0.0,
            wall_s=p.wall_s, flops=p.flops, checkpoint=self.checkpointer.last, interrupted=interrupted,
        )
        if interrupted:
            raise TrainingInterrupted(p.step, self.checkpointer.last, stop.signum)
        _print_summary(self.console, result, figures)
        return result


# ---------------------------------------------------------------------------------------------
# step 1: checks of a torchrun launch


def _check_parallel(cfg: Config, ctx: distributed.Dist) -> None:
    """Under torchrun: the global batch must split evenly over ranks and micro-batches, and the
    experts over the ranks (expert parallel)."""
    if not ctx.enabled:
        return
    t, moe, n = cfg.train, cfg.model.moe, ctx.world_size
    if t.batch_size % (n * t.grad_accum) != 0:
        step = n * t.grad_accum
        raise ConfigError(
            f"train.batch_size = {t.batch_size} is the global batch and must be divisible by the number of processes "
            f"x train.grad_accum = {n} x {t.grad_accum} = {step}",
            f"e.g. train.batch_size={max(step, t.batch_size // step * step)}")
    if moe is not None and moe.expert_parallel and moe.n_experts % n != 0:
        raise ConfigError(f"model.moe.expert_parallel = true needs model.moe.n_experts ({moe.n_experts}) divisible by "
                          f"the number of processes ({n})", "change --nproc_per_node or model.moe.n_experts")


# ---------------------------------------------------------------------------------------------
# step 4: stopping, logging windows


class _StopRequest:
    """The first stop signal - Ctrl-C (SIGINT) or SIGTERM (kill, docker stop, a scheduler's
    preemption, torchrun's agent) - finishes the step, saves a checkpoint and stops. A second
    Ctrl-C stops at once (a person insisting). SIGTERM never does: its senders give a grace
    period and send SIGKILL themselves when it runs out.

    synced (torchrun): the loop acts on `requested`, which the trainer sets (`agree`) from every
    rank's `flags()` at the step's all-reduce, so all ranks stop after the same step, and exit with
    the same status (SIGTERM's when any rank got one)."""

    def __init__(self, synced: bool = False):
        self.requested = False
        self.seen: list[int] = []  # this process's own stop signals, in order
        self.signum: int = signal.SIGINT  # the signal that stops the run (a peer's, under torchrun)
        self.synced = synced
        self._prev: dict = {}

    @property
    def signalled(self) -> bool:
        return bool(self.seen)

    def flags(self) -> list[float]:
        """[got SIGINT, got SIGTERM] for the all-reduce."""
        return [float(signal.SIGINT in self.seen), float(signal.SIGTERM in self.seen)]

    def agree(self, sigint: float, sigterm: float) -> None:
        """The flags summed over the ranks: stop when any rank was signalled."""
        if sigint > 0 or sigterm > 0:
            self.requested = True
            self.signum = signal.SIGTERM if sigterm > 0 else signal.SIGINT

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in signals.STOP_SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._prev[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        signals.note(signum)
        if self.seen and signum == signal.SIGINT:
            raise signals.Interrupted(signum)
        if not self.seen and not self.synced:
            self.requested = True
            self.signum = signum
        self.seen.append(signum)

    def __exit__(self, *exc):
        for s, prev in self._prev.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._prev = {}


class _Window:
    """Sums between two log steps."""

    def __init__(self):
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self.sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0, "gn": 0.0}

    def add(self, ce: float, aux: float, z: float, gn: float, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        for k, v in (("loss", ce + aux + z), ("ce", ce), ("aux", aux), ("z", z), ("gn", gn)):
            self.sums[k] += v

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.steps, 1)

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# step 5: reporting


def _make_plots(run_dir: Path, console) -> list[Path]:
    try:
        from ..plots import plot_run

        return plot_run(read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots", title=run_dir.name)
    except Exception as exc:  # noqa: BLE001 - a figure must never cost the user a finished run
        console.print(f"warning: could not draw plots ({type(exc).__name__}: {exc})", markup=False, highlight=False)
        return []


def _start_line(cfg: Config, n: int, device, amp_dtype, run_dir: Path, step: int, start_ckpt,
                ctx: distributed.Dist = distributed.SINGLE) -> str:
    prec = precision_name(amp_dtype) + ("" if amp_dtype is None else " autocast")
    moe = cfg.model.moe
    kind = (f"MoE {moe.n_experts} experts top-{moe.top_k} {moe.router}" if moe is not None else "dense")
    where = f"resuming at step {step} from {start_ckpt}" if start_ckpt is not None else "starting"
    if ctx.enabled:
        ep = moe is not None and moe.expert_parallel
        prec += f", {ctx.world_size} processes ({'data + expert parallel' if ep else 'data parallel'})"
    return (f"{cfg.name}: {kind}, {n / 1e6:.2f}M parameters, {device.type} {prec}, "
            f"{cfg.train.max_steps} steps x {cfg.train.batch_size * cfg.model.seq_len:,} tokens; "
            f"{where} -> {run_dir}")


def _print_summary(console, r: TrainResult, plots: list[Path]) -> None:
    val = f"val loss {r.val_loss:.4f}, val ppl {r.val_ppl:.2f}" if r.val_loss is not None else "no evaluation"
    console.print(
        f"done: {r.steps} steps, {r.tokens:,} tokens, {val}, {r.tokens_per_s:,.0f} tok/s, "
        f"training time {fmt_duration(r.wall_s)}; {r.run_dir}"
        + (f" (plots: {', '.join(p.name for p in plots)})" if plots else ""),
        markup=False, highlight=False, soft_wrap=True,
    )


def _resume_command(command_line: Optional[list[str]], run_dir: Path, world_size: int = 1) -> str:
    if not command_line:
        return f"moe-lm train --config {run_dir / 'config.yaml'} --out {run_dir} --resume auto"
    args = [a for a in command_line if a != "--overwrite"]
    prog = "moe-lm" if Path(args[0]).name in ("moe-lm", "__main__.py", "cli.py") else args[0]
    if world_size > 1:  # a torchrun worker: its own command line lacks the launcher
        prog = f"torchrun --nproc_per_node={world_size} -m moe_lm"
    args = [prog] + args[1:]
    if "--resume" in args:
        i = args.index("--resume")
        args[i:i + 2] = ["--resume", "auto"]
    elif not any(a.startswith("--resume=") for a in args):
        args.append("--resume auto")
    return " ".join(args)
