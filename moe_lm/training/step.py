"""One optimizer step, and what it needs.

    parts = Parts.build(cfg, ctx, device, amp_dtype)   # model, optimizer, DDP / compile, grad scaler
    result = train_step(parts, x, y, lr, meter, stop)  # x, y [batch_size, seq_len] -> StepResult

`train_step` is the body of the trainer's loop: forward and backward over the micro-batches
(`accumulate_gradients`, balance statistics of the whole batch), gradient clipping, the optimizer
step and the router-bias update; one host sync per step reads the losses, the gradient norm (and,
under torchrun, the ranks' stop signals) together. A step whose losses or gradient norm are not
finite is reported, not taken.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import distributed
from ..config import Config
from ..model import cpu_kernel
from ..model.transformer import Transformer
from .load import LoadMeter


@dataclass
class Parts:
    """What a training step works on. `forward` is the model itself, or its DDP wrapper (torchrun),
    compiled when train.compile; `amp()` opens the autocast context (a no-op in float32)."""

    model: Transformer
    forward: Callable
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]  # float16 only
    ddp: Any  # DistributedDataParallel under torchrun, else None
    device: torch.device
    amp: Callable
    ctx: distributed.Dist
    expert_parallel: bool  # the experts are sharded over the ranks
    grad_accum: int
    grad_clip: float  # 0 = no clipping
    n_params: int  # the whole model's parameters (before any expert sharding)

    @classmethod
    def build(cls, cfg: Config, ctx: distributed.Dist, device: torch.device,
              amp_dtype: Optional[torch.dtype]) -> "Parts":
        """The model of cfg.model on `device` (drawn from the torch RNG: seed first), AdamW,
        torchrun's sharding and DDP wrapper, torch.compile, the float16 grad scaler."""
        model = Transformer(cfg.model).to(device)
        if cfg.model.moe is not None and device.type == "cpu":
            cpu_kernel.load()  # built (once per machine) now, not inside the first step (the router's top-k uses it too)
        n_params = sum(p.numel() for p in model.parameters())
        expert_parallel = ctx.enabled and cfg.model.moe is not None and cfg.model.moe.expert_parallel
        distributed.prepare_model(model, ctx, expert_parallel)  # no-op in one process
        optimizer = build_optimizer(model, cfg, device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        ddp = distributed.wrap_ddp(model, ctx) if ctx.enabled else None
        forward = compile_model(model, ddp) if cfg.train.compile else (ddp or model)
        amp = functools.partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext
        return cls(model, forward, optimizer, scaler, ddp, device, amp, ctx, expert_parallel, cfg.train.grad_accum,
                   cfg.train.grad_clip, n_params)


def compile_model(model: Transformer, ddp: Any = None, backend: Any = "inductor") -> Callable:
    """train.compile: the training forward under torch.compile. -> what to call in place of the model
    (`ddp`, torchrun's DDP wrapper of `model`, or None; `backend`: torch.compile's, tests pass a
    lighter one).

    On a GPU the whole model (or its DDP wrapper): there inductor fuses the MoE layer's routing,
    sorting and scaling and the head with its loss (small-moe's MoE step 2.5x its eager one on an
    H200 in bf16, docs/PERFORMANCE.md); in bf16 the dispatch takes the grouped_mm path, inside the
    graph, while float32 and float16 break it once per MoE layer (the host-sized paths).

    On a CPU each transformer block is compiled in place (regional compilation, as torchtitan does),
    and the rest stays eager: the fused head and loss (`lm_loss`, faster on a CPU than inductor's
    plain head and cross-entropy, which compiling the whole model put in its place: the demo's dense
    twin ran 1.6x slower) and the MoE dispatch's host-sized paths (`dispatch._host_sized`). The
    state dict keeps its keys (nn.Module.compile wraps no module), and the blocks stay compiled on
    the model object: evaluation through it is compiled too (one more graph per block kind, for
    no_grad). All blocks share Block.forward's cache of graphs, one per block kind (MoE or dense),
    grad mode and shape: an MoE model with dense blocks and its dense twin, trained and evaluated
    in one process, take 6; dynamo's limit of 8 per function is raised to 32 here (for the whole
    process: compiling happens at call time), so that a third model in the process (compare-dense
    --with-dense-total) still compiles instead of falling back to eager."""
    if next(model.parameters()).device.type != "cpu":
        return torch.compile(ddp or model, backend=backend)
    dynamo = torch._dynamo.config  # NOTE: recompile_limit from torch 2.7, cache_size_limit before
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 32))
    for block in model.layers:
        block.compile(backend=backend)
    return ddp or model


@dataclass
class StepResult:
    """One step's values, the ranks' means: cross-entropy, balance loss, z-loss (nats), the
    gradient norm before clipping; `nonfinite` = (name, value) of the first that is not finite,
    in which case the optimizer step was not taken."""

    ce: float
    aux: float
    z: float
    grad_norm: float
    nonfinite: Optional[tuple[str, float]] = None


def train_step(parts: Parts, x: torch.Tensor, y: torch.Tensor, lr: float, meter: Optional[LoadMeter],
               stop: Any) -> StepResult:
    """One optimizer step on the batch x, y [batch_size, seq_len] at learning rate `lr`: forward
    and backward over the micro-batches (this rank's rows), clip, then - when every value is
    finite - the optimizer step and the router-bias update. `meter` sums the MoE statistics;
    `stop` (the trainer's stop request) shares its signal flags in the step's all-reduce, so all
    ranks stop after the same step."""
    p, ctx = parts, parts.ctx
    set_lr(p.optimizer, lr)
    sums = accumulate_gradients(p.forward, p.model, x, y, grad_accum=p.grad_accum, device=p.device, amp=p.amp,
                                ctx=ctx, scaler=p.scaler, ddp=p.ddp, meter=meter)
    if p.expert_parallel:
        distributed.finish_expert_grads(p.model, ctx)
    if p.scaler is not None:
        p.scaler.unscale_(p.optimizer)
    grad_norm = distributed.clip_grad_norm_(p.model, p.grad_clip if p.grad_clip > 0 else float("inf"), ctx)
    flags = []
    if ctx.enabled:
        # NOTE: the ranks' means -> the global batch's; a Ctrl-C or SIGTERM seen by any rank
        # stops them all after this same step
        both = ctx.all_reduce_(torch.cat([sums, sums.new_tensor(stop.flags())]))
        sums, flags = both[:3] / ctx.world_size, [both[3:]]
    # one host sync per step: the values to log, the finiteness check (and the stop flags)
    ce, aux, z, gn, *stop_flags = torch.cat([sums, grad_norm.detach().float().reshape(1).to(p.device), *flags]).tolist()
    if ctx.enabled:
        stop.agree(*stop_flags)
    # (with float16 the grad scaler handles an inf gradient norm itself: it skips the step)
    checked = [("cross-entropy", ce), ("balance loss", aux), ("z-loss", z)]
    bad = [(n, v) for n, v in checked + ([("gradient norm", gn)] if p.scaler is None else []) if not math.isfinite(v)]
    if bad:
        return StepResult(ce, aux, z, gn, nonfinite=bad[0])
    if p.scaler is not None:
        p.scaler.step(p.optimizer)
        p.scaler.update()
    else:
        p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)
    p.model.update_router_biases()
    return StepResult(ce, aux, z, gn)


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


# ---------------------------------------------------------------------------------------------
# seeds, optimizer, schedule


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
    none on vectors (norm gains, biases) - nanoGPT's rule. With train.ffn_out_lr_scale != 1 the
    FFN output matrices (is_ffn_output) form a third group whose rate is scaled by it (muP)."""
    t = cfg.train
    decay, no_decay, ffn_out = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if t.ffn_out_lr_scale != 1.0 and is_ffn_output(name):
            ffn_out.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if ffn_out:  # train_step sets each group's lr to the schedule's times its lr_scale
        groups.append({"params": ffn_out, "weight_decay": t.weight_decay, "lr_scale": t.ffn_out_lr_scale,
                       "lr": t.lr * t.ffn_out_lr_scale})
    # NOTE: the fused kernel (one call per parameter group's step, CUDA and, since torch 2.4, CPU)
    # measured +15 % tokens/s for the demo-sized dense model on 2 CPU cores (+5 % MoE), against the
    # default foreach implementation; any other device keeps torch's default.
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=True)
        except (RuntimeError, TypeError):  # a torch without the fused kernel for this device
            pass
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate into every parameter group, times the group's lr_scale (1 if none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def is_ffn_output(name: str) -> bool:
    """Whether a parameter (by its name in the Transformer) is an FFN's output matrix: a dense
    FFN's or a shared expert's down_proj, or the routed experts' stacked w_down."""
    return name.endswith("down_proj.weight") or name.endswith("experts.w_down")


def lr_at(step: int, t) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps.
    `step` counts optimizer steps done (0 = the first step)."""
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    lo = t.lr * t.min_lr_ratio
    return lo + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - lo)
