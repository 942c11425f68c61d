"""torch.distributed for moe-lm: torchrun's process group, differentiable collectives, and the
pieces of expert parallelism (docs/DISTRIBUTED.md is the user's side).

    with process_group(device) as ctx:      # under torchrun: join the others; else ctx = SINGLE
        prepare_model(model, ctx)            # global balance statistics, expert sharding
        ddp = wrap_ddp(model, ctx)           # DistributedDataParallel, experts left out

Without torchrun (no WORLD_SIZE > 1 in the environment) nothing here creates a process group and
the trainer runs exactly the single-process code.

The promise: N processes train the same model as one process with the same global batch.
- Each rank takes its rows of every micro-batch of the global batch; DDP averages the gradients.
- Balance losses need whole-batch statistics (load, importance, mean router probability): they
  are summed over the ranks with `sum_over_ranks`, whose backward sums the gradients again, so
  after DDP's averaging the router gets the single-process gradient.
- Expert parallel: rank r of N holds experts [r·E/N, (r+1)·E/N). Its expert gradients already sum
  every rank's loss (the tokens of all ranks ran through them), so they are divided by N - the
  mean over the ranks, as DDP does for the rest (`finish_expert_grads`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

# Seconds a collective waits for a peer before it fails (a rank that hangs rather than dies).
# torchrun itself stops every worker as soon as one exits with an error.
TIMEOUT_ENV = "MOE_LM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
# Test hook (tests/test_distributed.py): "RANK:STEP" - that rank kills itself (SIGKILL) at the
# start of that step, to show that the others stop with an error instead of hanging.
_TEST_DIE_ENV = "MOE_LM_TEST_DIE"


@dataclass
class Dist:
    """Where this process stands: rank of world_size (1 = no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks (no gradient); identity in one process."""
        if self.enabled:
            dist.all_reduce(t)
        return t


SINGLE = Dist()


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


@contextmanager
def process_group(device: str = "auto") -> Iterator[Dist]:
    """Join torchrun's process group for the duration and leave it after: NCCL when `device`
    (train.device) means CUDA, else gloo. Yields SINGLE without torchrun; a group the caller
    created is used and left in place."""
    world = env_world_size()
    if world <= 1:
        yield SINGLE
        return
    ctx = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        yield ctx
        return
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
    try:
        yield ctx
    finally:
        shutdown()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_comm_error(exc: BaseException) -> bool:
    """A collective failed: a peer died, its connection closed, or the timeout passed."""
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(exc)
    return isinstance(exc, backend_error) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "gloo",
                            "NCCL", "Broken pipe")))


def maybe_die_for_test(ctx: Dist, step: int) -> None:
    spec = os.environ.get(_TEST_DIE_ENV)
    if spec and ctx.enabled:
        rank, _, at = spec.partition(":")
        if int(rank) == ctx.rank and int(at) == step:
            import signal
            import sys

            print(f"test hook {_TEST_DIE_ENV}: rank {ctx.rank} dies at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# differentiable collectives


class _SumOverRanks(torch.autograd.Function):
    """y = Σ_ranks x. Every rank's loss uses y, so dL/dx on each rank = Σ_ranks dL_r/dy."""

    @staticmethod
    def forward(ctx, x):
        y = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g)
        return g


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Σ over the ranks of x, with gradients (balance-loss statistics of the global batch)."""
    return _SumOverRanks.apply(x)


class _AllToAll(torch.autograd.Function):
    """Rows of x (A, d) split into `send` chunks go to ranks 0..N-1; (sum(recv), d) come back.
    The backward sends the gradients the opposite way."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int]):
        ctx.send, ctx.recv = send, recv
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
        return out

    @staticmethod
    def backward(ctx, g):
        gx = g.new_empty((sum(ctx.send), *g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv)
        return gx, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    return _AllToAll.apply(x, send, recv)


def exchange_counts(counts: torch.Tensor) -> torch.Tensor:
    """counts (N·k,): k numbers for each rank -> (N·k,): the k numbers each rank sent to this one."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous())
    return out


# ---------------------------------------------------------------------------------------------
# expert parallelism


@dataclass
class ExpertParallel:
    """This rank's share of one MoE layer's experts: [rank·E_local, (rank+1)·E_local)."""

    rank: int
    world_size: int
    n_local: int  # experts held here (E / world_size)

    @property
    def first(self) -> int:
        return self.rank * self.n_local


def prepare_model(model: torch.nn.Module, ctx: Dist, expert_parallel: bool = False) -> None:
    """Before the optimizer is built: give the MoE layers the ranks' view of the batch, and under
    expert parallelism keep only this rank's experts (sliced from the full, identically seeded
    init, so the ranks start from the single-process weights)."""
    if not ctx.enabled:
        return
    for layer in model.moe_layers():
        layer.sum_over_ranks = sum_over_ranks
        if hasattr(layer.router, "batch_share"):
            layer.router.batch_share = (ctx.rank, ctx.world_size)
        if expert_parallel:
            n_local = layer.n_experts // ctx.world_size
            layer.shard_experts(ExpertParallel(ctx.rank, ctx.world_size, n_local))


def expert_param_names(model: torch.nn.Module) -> list[str]:
    """Names of the sharded expert tensors (each rank holds a different slice)."""
    names = []
    for name, module in model.named_modules():
        if getattr(module, "expert_parallel", None) is not None:
            names += [f"{name}.experts.{p}" for p, _ in module.experts.named_parameters()]
    return names


def wrap_ddp(model: torch.nn.Module, ctx: Dist):
    """DistributedDataParallel over everything but the sharded experts."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored = expert_param_names(model)
    if ignored:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    dev = next(model.parameters()).device
    # NOTE: no buffer sync at each forward: the sigmoid_bias router's load counter is a per-rank
    # buffer (summed over the ranks at its update), and rank 0's copy must not overwrite the others'.
    # (torch >= 2.13 names the switch forward_sync_buffers; the ranks' buffers are equal at init.)
    import inspect

    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, **no_sync)


def finish_expert_grads(model: torch.nn.Module, ctx: Dist) -> None:
    """Expert gradients sum the losses of all N ranks; the single-process gradient is their mean."""
    params = dict(model.named_parameters())
    for name in expert_param_names(model):
        if params[name].grad is not None:
            params[name].grad.div_(ctx.world_size)


def clip_grad_norm_(model: torch.nn.Module, max_norm: float, ctx: Dist) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over all parameters; with sharded experts, the norm counts
    every rank's experts once (the rest is the same on every rank)."""
    experts = set(expert_param_names(model)) if ctx.enabled else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not experts:
        return torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm)
    dense = [p.grad for n, p in named if n not in experts and p.grad is not None]
    local = [p.grad for n, p in named if n in experts and p.grad is not None]
    norm = lambda gs: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])) \
        if gs else torch.zeros(())  # noqa: E731
    expert_sq = norm(local).pow(2)
    dist.all_reduce(expert_sq)
    total = (norm(dense).pow(2) + expert_sq).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in dense + local:
        g.mul_(coef.to(g.device))
    return total


# ---------------------------------------------------------------------------------------------
# checkpoints in the single-process layout


def _gather_rows(t: torch.Tensor, ctx: Dist) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def _optimizer_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(param) -> its index in optimizer.state_dict() (params numbered in group order)."""
    out, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            out[id(p)] = i
            i += 1
    return out


def _sharded(model: torch.nn.Module, optimizer) -> list[tuple[str, torch.nn.Parameter, int]]:
    params = dict(model.named_parameters())
    index = _optimizer_index(optimizer) if optimizer is not None else {}
    return [(n, params[n], index.get(id(params[n]), -1)) for n in expert_param_names(model)]


def full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: Dist) -> tuple[dict, dict]:
    """(model state_dict, optimizer state_dict) in the single-process layout: sharded experts
    gathered from every rank (a collective: every rank calls it)."""
    weights, opt = model.state_dict(), optimizer.state_dict()
    for name, p, i in _sharded(model, optimizer):
        weights[name] = _gather_rows(p.detach(), ctx)
        if i in opt["state"]:  # NOTE: a new dict: state_dict() shares the optimizer's own per-param dicts
            opt["state"][i] = {key: _gather_rows(v, ctx) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                               for key, v in opt["state"][i].items()}  # exp_avg, exp_avg_sq; not step
    return weights, opt


class LocalLayout:
    """Maps a single-process checkpoint onto this rank's experts (checkpoint.load_checkpoint's
    `layout`): expert tensors (E, ...) -> rows [first, first + E_local)."""

    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]):
        self.model, self.optimizer = model, optimizer

    def _rows(self, name: str) -> slice:
        layer = self.model.get_submodule(name.rsplit(".experts.", 1)[0])
        ep = layer.expert_parallel
        return slice(ep.first, ep.first + ep.n_local)

    def weights(self, state: dict) -> dict:
        for name, _, _ in _sharded(self.model, None):
            state[name] = state[name][self._rows(name)]
        return state

    def optimizer_state(self, opt: dict) -> dict:
        for name, p, i in _sharded(self.model, self.optimizer):
            full_shape = (self.model.get_submodule(name.rsplit(".experts.", 1)[0]).n_experts, *p.shape[1:])
            state = opt["state"].get(i, {})
            for key, v in list(state.items()):
                if isinstance(v, torch.Tensor) and tuple(v.shape) == full_shape:
                    state[key] = v[self._rows(name)].clone()
        return opt
