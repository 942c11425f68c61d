"""The training loop. It reads top-down like a recipe:

    1. validate everything (config, data folder, vocabulary, run folder, checkpoint) - no work yet
    2. seed, pick the device and precision, build the model and the optimizer
    3. resume from a checkpoint, or start a fresh run folder
    4. loop: batch -> forward -> loss = CE + balance + z -> backward -> clip -> AdamW step ->
       router-bias update; log, evaluate, warn about collapsed experts, checkpoint
    5. final evaluation, final checkpoint, plots, a TrainResult

    result = train(load_config("configs/tiny-moe.yaml"))

Exact resume: the model, optimizer and RNG states are in the checkpoint; the learning rate is a
pure function of the step; batch i of the data stream is a pure function of (seed, i); and the
evaluation runs under a forked RNG, so N steps + resume + N steps equals 2N steps on CPU.

Under torchrun (docs/DISTRIBUTED.md) every rank runs this same recipe on its rows of each global
batch (moe_lm.distributed); rank 0 alone writes the run folder.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from .. import checks, distributed, signals
from ..config import Config, config_warnings, dump_yaml, validate
from ..errors import ConfigError, DataError, RunError, TrainingError
from ..device import device_name, resolve_device, synchronize
from ..files import write_atomic
from . import checkpoint as ckpt_io
from .alarm import CollapseAlarm
from .display import TrainDisplay, fmt_duration
from .load import LayerLoad, LoadMeter
from .metrics import (JsonlSink, TensorBoardSink, eval_record, event_record, read_metrics, tensorboard_available,
                      train_record, truncate_metrics)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # the step training stopped at
    tokens: int  # training tokens seen, over all resumes
    val_loss: Optional[float]  # the last evaluation's
    val_ppl: Optional[float]
    train_loss: Optional[float]  # the last step's cross-entropy
    tokens_per_s: float  # training throughput of this session (excludes evaluation)
    wall_s: float  # training wall clock over all resumes (excludes evaluation and checkpoints)
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


# ---------------------------------------------------------------------------------------------
# the recipe


def train(cfg: Config, out_dir: Optional[Path | str] = None, resume: Optional[str] = None,
          overwrite: bool = False, console: Any = None, command_line: Optional[list[str]] = None,
          *, stop_after: Optional[int] = None, plots: bool = True) -> TrainResult:
    """Train `cfg`'s model on its data folder; write runs/<name>/ (or `out_dir`).

    resume: "auto" (this run's latest checkpoint, if any, else start fresh) or a checkpoint folder
    (or a run folder) to continue from, into this run's folder. overwrite: delete the run folder
    first. stop_after: stop (with a checkpoint) after this step while the learning-rate schedule
    still spans train.max_steps - a time-boxed session that a later --resume continues exactly.
    plots: draw runs/<name>/plots/ at the end (compare-dense and tests may skip it).

    Launched by torchrun (WORLD_SIZE > 1), every rank calls this; it joins the process group and
    leaves it at the end. A rank that loses its peers stops with a TrainingError.
    """
    with distributed.process_group(cfg.train.device) as ctx:
        try:
            return _train(cfg, ctx, out_dir, resume, overwrite, console, command_line, stop_after, plots)
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


def _train(cfg: Config, ctx: distributed.Dist, out_dir, resume, overwrite, console, command_line, stop_after,
           plots) -> TrainResult:
    from rich.console import Console

    # NOTE: under torchrun only rank 0 talks; the others run the same code with a silent console
    console = (console if console is not None else Console()) if ctx.is_main else Console(quiet=True)
    cfg = copy.deepcopy(cfg)
    t = cfg.train

    # 1. validate everything before any training work ------------------------------------------
    validate(cfg)
    _check_parallel(cfg, ctx)
    if resume is not None and overwrite:
        raise RunError("--resume and --overwrite contradict each other", "pass one of them")
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    checks.out_folder("--out" if out_dir is not None else "the run folder", run_dir,
                      "pass --out with a folder path" if out_dir is not None else "pass --out DIR or name=...")
    if resume is not None and resume != "auto":
        checks.in_folder("--resume", resume, "pass 'auto' or a checkpoint folder (runs/<name>/checkpoints/step-N)")
    data = _open_data(cfg)  # also sets model.vocab_size from the tokenizer when null
    device, amp_dtype = resolve_device(t.device, t.dtype)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    start_ckpt, _ = _plan_resume(run_dir, resume, overwrite, cfg, data)
    if t.tensorboard and not tensorboard_available():
        raise ConfigError("train.tensorboard = true but the tensorboard package is not installed",
                          "pip install tensorboard (or: pip install 'moe-lm[tensorboard]'), or set train.tensorboard=false")

    from ..data.shards import eval_windows, get_batch
    from ..model.accounting import flops_per_token
    from ..model.transformer import Transformer

    # 2. seed, model, optimizer ----------------------------------------------------------------
    seed_everything(t.seed)
    model = Transformer(cfg.model).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    expert_parallel = ctx.enabled and cfg.model.moe is not None and cfg.model.moe.expert_parallel
    distributed.prepare_model(model, ctx, expert_parallel)  # no-op in one process
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ddp = distributed.wrap_ddp(model, ctx) if ctx.enabled else None
    forward = torch.compile(ddp or model) if t.compile else (ddp or model)
    moe_layers = moe_layer_ids(cfg)
    fpt = training_flops_per_token(flops_per_token, cfg.model)
    tokens_per_step = t.batch_size * cfg.model.seq_len
    micro_bs = t.batch_size // t.grad_accum
    rank_bs = micro_bs // ctx.world_size  # this rank's rows of each micro-batch
    train_tokens, val_tokens = data.split("train"), data.split("val")
    # the same seeded validation windows at every evaluation (each rank takes its rows)
    val_batches = [(x[ctx.rank * rank_bs:(ctx.rank + 1) * rank_bs], y[ctx.rank * rank_bs:(ctx.rank + 1) * rank_bs])
                   for x, y in eval_windows(val_tokens, cfg.model.seq_len, micro_bs, n_batches=t.eval_batches,
                                            seed=t.seed)]

    # 3. resume, or start a fresh run folder -----------------------------------------------------
    alarm = CollapseAlarm(cfg.model.moe)
    step, tokens, wall_s, last_val = 0, 0, 0.0, None
    if start_ckpt is not None:
        # every rank loads the single-process checkpoint (expert parallel: its own experts of it)
        layout = distributed.LocalLayout(model, optimizer) if expert_parallel else None
        st = ckpt_io.load_checkpoint(start_ckpt, model, optimizer, scaler=scaler, map_location=device, layout=layout)
        step, tokens, wall_s = st["step"], st["tokens"], st.get("wall_s", 0.0)
        alarm.load_state_dict(st.get("alarm", {}))
        last_val = st.get("last_val")
        if step != st.get("next_batch_index", step):
            raise ConfigError(f"checkpoint {start_ckpt} has a data position unknown to this trainer")
    ctx.barrier()  # every rank has checked the run folder before rank 0 changes it
    sink = tb = None
    if ctx.is_main:
        _prepare_run_dir(run_dir, cfg, start_ckpt, step, overwrite, data, device, amp_dtype, command_line)
        sink = JsonlSink(run_dir / "metrics.jsonl")
        tb = TensorBoardSink(run_dir / "tensorboard") if t.tensorboard else None
    write = lambda rec: (sink.write(rec), tb.write(rec) if tb else None) if sink else None  # noqa: E731
    if start_ckpt is not None:
        write(event_record(step=step, event="resume", message=f"resumed from {start_ckpt}"))
    else:
        write(event_record(step=0, event="start", message=f"{cfg.name} on {device.type}"))

    end_step = t.max_steps if stop_after is None else min(t.max_steps, stop_after)
    console.print(_start_line(cfg, n_params, device, amp_dtype, run_dir, step, start_ckpt, ctx), markup=False,
                  highlight=False, soft_wrap=True)
    for warning in config_warnings(cfg):  # valid but probably not meant (config.config_warnings)
        console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
        write(event_record(step=step, event="config_warning", message=warning))
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    meter, val_meter = LoadMeter(moe_layers, ctx), LoadMeter(moe_layers, ctx)
    last_ckpt: Optional[Path] = start_ckpt
    saved_step: Optional[int] = None
    last_ce: Optional[float] = None
    session_tokens, session_wall = 0, 0.0
    window = _Window()

    def evaluate_now() -> dict:
        val_loss = evaluate(forward, model, val_batches, device, amp, val_meter, ctx)
        rec = eval_record(step=step, tokens=tokens, flops=fpt * tokens, wall_s=wall_s, val_loss=val_loss,
                          layers=val_meter.read())
        write(rec)
        display.on_eval(rec)
        fired = alarm.update(step, [_layer_from_json(ll) for ll in rec["layers"]])
        for a in fired:
            write(event_record(step=step, event="collapse", message=a.message, alarm=a.to_json()))
        display.on_alarms(alarm.active, fired)
        return {"step": step, "val_loss": rec["val_loss"], "val_ppl": rec["val_ppl"]}

    def save_now() -> Path:
        nonlocal saved_step
        saved_step = step
        extra = {"tokens": tokens, "wall_s": wall_s, "flops": fpt * tokens, "next_batch_index": step,
                 "data_seed": t.seed, "alarm": alarm.state_dict(), "last_val": last_val}
        # expert parallel: the experts of every rank gathered, so the checkpoint reads as one process's
        weights, opt_state = distributed.full_states(model, optimizer, ctx) if expert_parallel else (None, None)
        path = run_dir / "checkpoints" / ckpt_io.step_dir_name(step)
        if ctx.is_main:
            path = ckpt_io.save_checkpoint(run_dir, step=step, model=model, optimizer=optimizer, cfg=cfg, state=extra,
                                           tokenizer_path=data.tokenizer_path, scaler=scaler, keep=t.keep_checkpoints,
                                           model_state=weights, optimizer_state=opt_state)
        write(event_record(step=step, event="checkpoint", message=str(path)))
        return path

    stop = _StopRequest(synced=ctx.enabled)
    with stop, TrainDisplay(console, name=cfg.name, start_step=step, max_steps=t.max_steps,
                            log_every=t.log_every) as display:
        if step == 0 and start_ckpt is None:
            last_val = evaluate_now()  # the untrained baseline, ~ln(vocab)

        # 4. the loop -----------------------------------------------------------------------
        while step < end_step and not stop.requested:
            distributed.maybe_die_for_test(ctx, step)
            t0 = time.perf_counter()
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # batch `step` of the seeded stream, split into micro-batches (and rows per rank)
            x, y = get_batch(train_tokens, step, t.batch_size, cfg.model.seq_len, t.seed)
            sums = accumulate_gradients(forward, model, x, y, grad_accum=t.grad_accum, device=device, amp=amp,
                                        ctx=ctx, scaler=scaler, ddp=ddp, meter=meter)
            if expert_parallel:
                distributed.finish_expert_grads(model, ctx)
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = distributed.clip_grad_norm_(model, t.grad_clip if t.grad_clip > 0 else float("inf"), ctx)
            flags = []
            if ctx.enabled:
                # NOTE: the ranks' means -> the global batch's; a Ctrl-C or SIGTERM seen by any rank
                # stops them all after this same step
                both = ctx.all_reduce_(torch.cat([sums, sums.new_tensor(stop.flags())]))
                sums, flags = both[:3] / ctx.world_size, [both[3:]]
            # one host sync per step: the values to log, the finiteness check (and the stop flags)
            ce, aux_v, z_v, gn, *stop_flags = torch.cat([sums, grad_norm.detach().float().reshape(1).to(device),
                                                         *flags]).tolist()
            if ctx.enabled:
                stop.agree(*stop_flags)
            # (with float16 the grad scaler handles an inf gradient norm itself: it skips the step)
            checked = [("cross-entropy", ce), ("balance loss", aux_v), ("z-loss", z_v)]
            bad = [(n, v) for n, v in checked + ([("gradient norm", gn)] if scaler is None else []) if not math.isfinite(v)]
            if bad:
                write(event_record(step=step + 1, event="nonfinite", message=f"{bad[0][0]} = {bad[0][1]}"))
                raise TrainingError(
                    f"the {bad[0][0]} became non-finite ({bad[0][1]}) at step {step + 1}; stopped without saving "
                    f"this state (last good checkpoint: {last_ckpt or 'none'})",
                    "lower train.lr, raise train.warmup_steps or set train.grad_clip=1.0, then --resume auto",
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_router_biases()

            step += 1
            tokens += tokens_per_step
            dt = time.perf_counter() - t0
            wall_s += dt
            session_wall += dt
            session_tokens += tokens_per_step
            last_ce = ce
            window.add(ce, aux_v, z_v, gn, tokens_per_step, dt)
            display.on_step(step)

            if step % t.log_every == 0 or step == end_step or step == 1:
                rec = train_record(step=step, tokens=tokens, flops=fpt * tokens, wall_s=wall_s, lr=lr,
                                   loss=window.mean("loss"), ce_loss=window.mean("ce"),
                                   aux_loss=window.mean("aux"), z_loss=window.mean("z"),
                                   grad_norm=window.mean("gn"), tokens_per_s=window.tokens_per_s(),
                                   layers=meter.read())
                write(rec)
                display.on_train(rec)
                window = _Window()
            if step % t.eval_every == 0 or step == t.max_steps:
                last_val = evaluate_now()
            if step % t.checkpoint_every == 0 or step == end_step or stop.requested:
                last_ckpt = save_now()

        # 5. the end: interrupted, or done ----------------------------------------------------
        interrupted = stop.requested and step < end_step
        if interrupted:
            if saved_step != step:
                last_ckpt = save_now()
            how = signals.name(stop.signum)
            write(event_record(step=step, event="interrupted", message=f"{how}; checkpoint {last_ckpt}", signal=how))
            display.note(f"interrupted at step {step} ({how}): checkpoint saved to {last_ckpt}")
    if interrupted:
        console.print(f"continue with: {_resume_command(command_line, run_dir, ctx.world_size)}", markup=False,
                      highlight=False, soft_wrap=True)
        if ctx.enabled:
            # NOTE: every rank leaves together, after rank 0 has written and said all that matters:
            # torchrun sends SIGTERM to the others as soon as one worker exits
            ctx.all_reduce_(torch.zeros(1, device=device))
    if sink:
        sink.close()
    if tb:
        tb.close()
    figures = _make_plots(run_dir, console) if plots and ctx.is_main else []
    result = TrainResult(
        run_dir=run_dir, steps=step, tokens=tokens,
        val_loss=last_val["val_loss"] if last_val else None, val_ppl=last_val["val_ppl"] if last_val else None,
        train_loss=last_ce, tokens_per_s=session_tokens / session_wall if session_wall > 0 else 0.0,
        wall_s=wall_s, flops=fpt * tokens, checkpoint=last_ckpt, interrupted=interrupted,
    )
    if interrupted:
        raise TrainingInterrupted(step, last_ckpt, stop.signum)
    _print_summary(console, result, figures)
    return result


# ---------------------------------------------------------------------------------------------
# step 1: validation


def _open_data(cfg: Config):
    """Open the data folder; take or check the vocabulary size; check the splits are long enough."""
    from ..data.shards import TokenData

    data_dir = Path(cfg.data.dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data.dir {data_dir} is a file, not a data folder",
                        "set data.dir to a folder written by `moe-lm prepare`")
    if not data_dir.is_dir():
        how = (f"moe-lm prepare --out {data_dir} --vocab-size {cfg.data.vocab_size}" if cfg.data.vocab_size
               else "moe-lm prepare")
        raise DataError(f"data folder {data_dir} does not exist",
                        f"prepare it with `{how}` (built-in corpus; or `moe-lm prepare -c <this config>`), "
                        "or set data.dir=...")
    data = TokenData.open(data_dir)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = int(data.vocab_size)
    elif cfg.model.vocab_size != data.vocab_size:
        raise DataError(
            f"model.vocab_size = {cfg.model.vocab_size} but the tokenizer of {data_dir} has {data.vocab_size} tokens",
            "set model.vocab_size=null to take it from the data, or point data.dir at the matching folder",
        )
    need = cfg.model.seq_len + 1
    for split in ("train", "val"):
        try:
            n = len(data.split(split))
        except (KeyError, FileNotFoundError) as exc:
            raise DataError(f"data folder {data_dir} has no {split} split",
                            "prepare it again with `moe-lm prepare --overwrite`") from exc
        if n < need:
            raise DataError(f"the {split} split of {data_dir} has {n} tokens, fewer than model.seq_len + 1 = {need}",
                            "lower model.seq_len or prepare more text")
    return data


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


def _plan_resume(run_dir: Path, resume: Optional[str], overwrite: bool, cfg: Config, data) -> tuple[Optional[Path], Optional[dict]]:
    """Which checkpoint to start from (verified: files, config, tokenizer), or None to start fresh."""
    exists = run_dir.exists() and any(run_dir.iterdir()) if run_dir.is_dir() else run_dir.exists()
    if resume is None:
        if exists and not overwrite:
            raise RunError(f"run folder {run_dir} already exists",
                           "continue it with --resume auto, replace it with --overwrite, or choose --out / name=")
        if exists and overwrite and not _looks_like_run_dir(run_dir):
            raise RunError(f"refusing to delete {run_dir}: it does not look like a run folder",
                           "choose another --out")
        return None, None
    ckpt = ckpt_io.find_latest(run_dir) if resume == "auto" else ckpt_io.resolve_checkpoint(Path(resume))
    if ckpt is None:
        return None, None  # auto with nothing to resume: start fresh
    state = ckpt_io.read_state(ckpt)
    ckpt_io.check_config(ckpt, state, cfg)
    saved_tok = ckpt / "tokenizer.json"
    if saved_tok.is_file() and data.tokenizer_path and Path(data.tokenizer_path).is_file() and \
            saved_tok.read_bytes() != Path(data.tokenizer_path).read_bytes():
        raise DataError(f"checkpoint {ckpt} was trained with another tokenizer than {data.tokenizer_path}",
                        "point data.dir at the data folder the run was trained on")
    if state["step"] >= cfg.train.max_steps:
        raise RunError(f"checkpoint {ckpt} is at step {state['step']}, already at train.max_steps = {cfg.train.max_steps}",
                       f"train longer with train.max_steps={state['step'] * 2}")
    return ckpt, state


def _looks_like_run_dir(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl", "checkpoints"))


# ---------------------------------------------------------------------------------------------
# step 2: seeds, optimizer, schedule


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (ndim >= 2: linear layers, stacked experts, embeddings),
    none on vectors (norm gains, biases) - nanoGPT's rule."""
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # NOTE: the fused kernel (one call per parameter group's step, CUDA and, since torch 2.4, CPU)
    # measured +15 % tokens/s for the demo-sized dense model on 2 CPU cores (+5 % MoE), against the
    # default foreach implementation; any other device keeps torch's default.
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=True)
        except (RuntimeError, TypeError):  # a torch without the fused kernel for this device
            pass
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


def lr_at(step: int, t) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps.
    `step` counts optimizer steps done (0 = the first step)."""
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    lo = t.lr * t.min_lr_ratio
    return lo + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - lo)


def moe_layer_ids(cfg: Config) -> list[int]:
    """Block indices of the MoE layers, in the order of ModelOutput.moe_stats."""
    moe = cfg.model.moe
    if moe is None:
        return []
    return [i for i in range(cfg.model.n_layers) if i % moe.every == moe.every - 1]


def training_flops_per_token(flops_fn, model_cfg) -> float:
    """accounting.flops_per_token as one number (a dict result: its total, router included)."""
    v = flops_fn(model_cfg)
    if isinstance(v, dict):
        for key in ("total", "train", "training"):
            if key in v:
                return float(v[key])
        return float(sum(x for x in v.values() if isinstance(x, (int, float))))
    return float(v)


# ---------------------------------------------------------------------------------------------
# step 3: the run folder


def _prepare_run_dir(run_dir: Path, cfg: Config, start_ckpt: Optional[Path], step: int, overwrite: bool,
                     data, device: torch.device, amp_dtype, command_line) -> None:
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt_io.clean_partial(run_dir / "checkpoints")
    metrics = run_dir / "metrics.jsonl"
    if start_ckpt is None:
        metrics.write_text("")
    else:
        ckpt_root = (run_dir / "checkpoints").resolve()
        ckpt_io.set_aside_later(ckpt_root, step)  # checkpoints past the resume point: an abandoned branch
        if start_ckpt.resolve().parent == ckpt_root:
            truncate_metrics(metrics, step)
        else:  # another run's checkpoint: carry its history over, if this run has none yet
            source = start_ckpt.resolve().parent.parent / "metrics.jsonl"
            if not metrics.exists() or metrics.stat().st_size == 0:
                truncate_metrics(metrics, step, source=source if source.is_file() else metrics)
            else:
                truncate_metrics(metrics, step)
    write_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    write_atomic(run_dir / "env.json", json.dumps(environment(device, amp_dtype, command_line, data,
                                                                       start_ckpt), indent=1))


def environment(device: torch.device, amp_dtype, command_line, data=None, resumed_from=None) -> dict:
    import numpy as np

    env = {
        "moe_lm": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "world_size": distributed.env_world_size(),
        "device": device.type, "device_name": _device_name(device),
        "precision": "float32" if amp_dtype is None else f"{str(amp_dtype).removeprefix('torch.')} autocast",
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------
# step 4: evaluation, stopping, logging windows


@torch.no_grad()
def evaluate(forward, model: torch.nn.Module, batches: list, device: torch.device, amp, meter: LoadMeter,
             ctx: distributed.Dist = distributed.SINGLE) -> float:
    """Mean validation cross-entropy over fixed windows. Runs under a forked RNG so an evaluation
    never changes what training draws next (exact resume). Under torchrun each rank passes its rows
    of the windows and gets the mean over all of them."""
    model.eval()
    total, count = 0.0, 0
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with amp():
                out = forward(x, y)
            total += float(out.loss) * y.numel()
            count += y.numel()
            meter.add(out.moe_stats)
    model.train()
    if ctx.enabled:
        total, count = ctx.all_reduce_(torch.tensor([total, count], dtype=torch.float64, device=device)).tolist()
    return total / max(count, 1)


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


def accumulate_gradients(forward, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, grad_accum: int,
                         device: torch.device, amp=nullcontext, ctx: distributed.Dist = distributed.SINGLE,
                         scaler=None, ddp=None, meter: Optional[LoadMeter] = None) -> torch.Tensor:
    """Forward and backward of one optimizer step's batch x, y [batch_size, T] in `grad_accum`
    micro-batches (this rank's rows of each under torchrun); the gradients accumulate in the
    parameters. Returns this rank's (ce, balance, z) losses of the step, as a (3,) tensor.

    grad_accum changes memory use, not the data, the losses or the gradient - balance loss included:
    ONE RULE for micro-batches and torchrun ranks, balance statistics are the whole step's batch's.
    The ranks' shares are summed inside the loss (MoELayer.sum_over_ranks); the micro-batches'
    by a no-gradient pre-pass over the step's micro-batches (`_balance_rest`, same RNG draws), whose
    statistics of the OTHER micro-batches each micro-batch adds as a constant (MoELayer.balance_rest):
    every micro-batch's balance loss then has the whole batch's value, and the sum of their
    gradients is the whole-batch loss's gradient. The pre-pass runs only with grad_accum > 1 and a
    balance loss on, and costs one extra forward without gradient per step (~1/3 of a step).
    (Capacity drops are per sequence, so micro-batching never changes them; expert_choice picks
    among each forward's tokens, so its routing does depend on the micro-batch size.)
    """
    micro_bs = x.shape[0] // grad_accum
    rank_bs = micro_bs // ctx.world_size
    parts = [(x[lo:lo + rank_bs], y[lo:lo + rank_bs])
             for lo in (m * micro_bs + ctx.rank * rank_bs for m in range(grad_accum))]
    rests = _balance_rest(model, parts, device, amp, ctx) if grad_accum > 1 else None
    sums = torch.zeros(3, device=device)  # ce, balance, z
    try:
        for micro, (xs, ys) in enumerate(parts):
            xs, ys = xs.to(device, non_blocking=True), ys.to(device, non_blocking=True)
            if rests is not None:
                for layer, rest in zip(rests[0], rests[1][micro]):
                    layer.balance_rest = rest
            # DDP averages the gradients over the ranks once, after the last micro-batch
            with ddp.no_sync() if ddp is not None and micro < grad_accum - 1 else nullcontext():
                with amp():
                    out = forward(xs, ys)
                aux = _as_tensor(out.aux_loss, out.loss)
                z = _as_tensor(out.z_loss, out.loss)
                # cross-entropy and z-loss are means over tokens: the micro-batches' means / grad_accum.
                # The balance loss already is the whole batch's (see above): its gradient, not divided,
                # is this micro-batch's share of the whole-batch gradient.
                loss = (out.loss + z) / grad_accum + aux
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            sums += torch.stack([out.loss.detach(), aux.detach(), z.detach()]).float() / grad_accum
            if meter is not None:
                meter.add(out.moe_stats)
    finally:
        if rests is not None:
            for layer in rests[0]:
                layer.balance_rest = None
    return sums


@torch.no_grad()
def _balance_rest(model, parts: list, device: torch.device, amp, ctx: distributed.Dist):
    """The pre-pass of `accumulate_gradients`: (layers, rests) where rests[m][i] = the balance
    statistics of every micro-batch but m (all ranks'), for MoE layer layers[i]; None when no layer
    has a balance loss. The RNG (noisy routing) and the sigmoid_bias load counters are restored, so
    the real pass draws the same noise and counts the load once."""
    layers = [layer for layer in getattr(model, "moe_layers", lambda: [])() if layer.has_balance_loss]
    if not layers:
        return None
    counters = [(b, b.clone()) for layer in layers for name, b in layer.router.named_buffers()
                if name == "load_since_update"]
    devices = [device] if device.type == "cuda" else []
    try:
        for layer in layers:
            layer.measure_balance = True
        with torch.random.fork_rng(devices=devices):
            per_micro = []
            for xs, _ in parts:
                with amp():
                    out = model(xs.to(device, non_blocking=True))
                per_micro.append(torch.stack([s.balance_stats for s in out.moe_stats if s.balance_stats is not None]))
    finally:
        for layer in layers:
            layer.measure_balance = False
        for buf, saved in counters:
            buf.copy_(saved)
    stats = ctx.all_reduce_(torch.stack(per_micro).float())  # (micro, layer, stat), every rank's rows
    total = stats.sum(0)
    return layers, [total - stats[m] for m in range(len(parts))]


def _as_tensor(v, like: torch.Tensor) -> torch.Tensor:
    if v is None:
        return torch.zeros((), device=like.device, dtype=like.dtype)
    if isinstance(v, torch.Tensor):
        return v
    return torch.tensor(float(v), device=like.device, dtype=like.dtype)


def _layer_from_json(d: dict):
    return LayerLoad(d["layer"], d["load"], d["max_mean"], d["cv"], d["dropped_frac"], d["entropy"],
                     d["balance_loss"], d["z_loss"])


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
    prec = "float32" if amp_dtype is None else f"{str(amp_dtype).removeprefix('torch.')} autocast"
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
