"""Dispatch and combine: run flat assignments (token, expert, weight) through stacked experts.

    y = moe_ffn(x, token, expert, weight, experts)     # x (T, d) -> y (T, d)

    y[t] = Σ over assignments a with token[a] = t of  weight[a] · expert_{expert[a]}(x[t])

Sort the assignments by expert, run each expert on its contiguous slice, scale by the weight and
index_add back. Tokens with no assignment (capacity drops) get 0: the residual stream carries
them. Never a loop over tokens, no one-hot (T, E, C) tensors.

Four paths, the same function (tests/test_model_dispatch.py checks each against a per-token
reference, outputs and gradients):

- "fused": a custom autograd Function walking over blocks of consecutive experts (plan_blocks).
  A block gathers its rows by index, runs gate_up -> activation -> down, and index_adds its
  scaled output; the backward does the same walk with only the gathers/scatters it needs. A
  block's matmuls are one torch grouped_mm call each on a CPU where torch has it and takes the
  shapes (use_grouped_blocks), else one mm per expert (_expert_mm). On a CPU with several torch threads
  and experts big enough
  (use_expert_threads) the blocks are shared out over worker
  threads that each run torch single-threaded (ExpertThreads), and their outputs are summed on
  the caller in block order, so the result is bitwise that of one thread. Why: ~7 small
  operations per expert, each a fork-join across all cores, made one descheduled thread stall
  every join when another program held a core (64 experts top-8 went from 1.0x to 6.9x the
  dense FFN with two busy loops on 2 cores; with whole blocks per thread: 1.03x, see
  docs/PERFORMANCE.md). Per-block buffers stay small (on a CPU, glibc serves allocations under
  32 MiB from its heap, while each larger one is a fresh mmap whose pages fault in at first
  touch), and it saves only each block's pre-activation and output for the backward. No
  padding. The CPU's path for big experts and where the kernel below does not build, and
  everywhere the path for unbalanced routing.
- "cpu_kernel": the fused path's function as one C++ call per direction (model/cpu_kernel.py,
  csrc/experts_cpu.cpp), float32 on an x86 CPU where it builds: the experts shared out over the
  threads, their products in oneDNN's brgemm micro-kernels, each token's rows scaled and summed in
  their expert-sorted order (index_add's order). The CPU's path for experts below THREADS_MIN_MACS (the demo's); asked
  for where it cannot run, it runs "fused".
- "padded": a custom autograd Function (`PaddedFFN`) that copies every expert's rows into one
  (E, C, d) buffer, C = the largest expert's rows, zero elsewhere; each matmul is then ONE bmm
  over all experts and the activation one call: about a dozen operations per direction whatever
  E is. It computes E·C rows instead of A, so it is taken only while E·C ≤ PAD_SLACK·A (balanced
  routing), and only off the CPU, where "fused" measured faster quiet and busy alike
  (docs/PERFORMANCE.md).
- "grouped_mm": one gather, `torch.nn.functional.grouped_mm` (or `torch._grouped_mm`) for
  gate_up and down over all experts, autograd through torch's own ops, and no host sync. Used on
  CUDA with bf16 where this torch has it (real grouped GEMM kernels there); on a CPU torch runs it
  as a loop and it measured slower than "fused".

`choose_path` is that rule; `MoELayer.dispatch_path` overrides it.
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_kernel, gemm
from .routing import count_per_expert

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
PATHS = ("fused", "cpu_kernel", "padded") + (("grouped_mm",) if _grouped_mm is not None else ())

# NOTE: the padded path computes E x max(rows) rows; it is taken while that is at most this much
# more than the real rows (the measured trade: one bmm instead of E matmuls, see choose_path).
PAD_SLACK = 1.5


def argsort_experts(expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """torch.argsort(expert, stable=True) for expert ids (A,) in [0, n_experts): the permutation
    that puts the assignments in expert order, each expert's in their own order -> (A,) int64.

    On a CPU, for up to 32,768 experts, numpy's stable argsort of the ids as 8- or 16-bit integers,
    which is a radix sort: the demo's 16,384 assignments in ~25 us, where torch's stable sort takes
    ~450 us (twice a step per MoE layer; docs/PERFORMANCE.md). A stable sort has one answer, so the
    permutation is torch's. Elsewhere (a GPU, torch.compile) torch's."""
    if expert.device.type == "cpu" and n_experts <= 1 << 15 and not torch.compiler.is_compiling():
        keys = expert.numpy().astype(np.uint8 if n_experts <= 1 << 8 else np.int16)
        return torch.from_numpy(np.argsort(keys, kind="stable"))
    return torch.argsort(expert, stable=True)


def sort_by_expert(token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, n_experts: int):
    """-> token (A,), weight (A,) sorted by expert (stable), and counts (E,) of assignments per expert."""
    order = argsort_experts(expert, n_experts)
    counts = count_per_expert(expert, n_experts)
    return token[order], weight[order], counts


def choose_path(x: torch.Tensor, sizes: Optional[list[int]] = None, width: Optional[int] = None) -> str:
    """The rule: grouped_mm on CUDA in bf16 where torch has it; on a CPU cpu_kernel for float32
    experts below THREADS_MIN_MACS multiply-adds a product where the kernel builds (~2x the fused
    path's dispatch at the demo's shape), else fused (big experts: its expert threads and oneDNN
    products, measured fastest quiet or beside busy programs; docs/PERFORMANCE.md); on other
    accelerators padded (a few large kernels instead of ~20 per expert) while
    E x max(sizes) ≤ PAD_SLACK x sum(sizes), else fused. sizes: assignments per expert (None:
    assume balanced); width: the experts' first matrix's columns (w_in's last dimension; None:
    taken as small)."""
    if x.device.type == "cuda" and _grouped_mm is not None and x.dtype == torch.bfloat16:
        return "grouped_mm"
    if x.device.type == "cpu":
        small = sizes is None or width is None or not big_experts(x, sizes, width)
        return "cpu_kernel" if small and cpu_kernel.applies(x) else "fused"
    if sizes is None or padded_rows(sizes) <= PAD_SLACK * max(1, sum(sizes)):
        return "padded"
    return "fused"


def padded_rows(sizes: list[int]) -> int:
    """Rows the padded path computes: E x the largest expert's rows."""
    return len(sizes) * max(sizes, default=0)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def moe_ffn(x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, experts,
            path: Optional[str] = None) -> torch.Tensor:
    """x (T, d); token, expert (A,) int64; weight (A,) float32 -> (T, d) in the compute dtype.

    `experts` is a moe.Experts (w_in (E, d, 2h | h), w_down (E, h, d), activation). Under autocast
    the experts run in the autocast dtype (cast here, once, autocast off inside)."""
    dev = x.device.type
    dtype = _autocast_dtype(dev)
    w_in, w_down = experts.w_in, experts.w_down
    if dtype is not None:
        x, w_in, w_down = x.to(dtype), w_in.to(dtype), w_down.to(dtype)
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown dispatch path {path!r} (known: {', '.join(PATHS)})")
    if path == "grouped_mm" or (path is None and choose_path(x) == "grouped_mm"):
        experts.last_path = "grouped_mm"
        token_s, weight_s, counts = sort_by_expert(token, expert, weight, experts.n_experts)
        with torch.autocast(dev, enabled=False):
            return _grouped_path(x, token_s, weight_s, counts, w_in, w_down, experts.activation)
    # NOTE: torch.compiler.disable here, not as a decorator: that would import torch._dynamo into
    # every process that builds a model (+1.3 s; and torchrun's gloo workers then hung at exit,
    # docs/DISTRIBUTED.md)
    host_sized = torch.compiler.disable(_host_sized) if torch.compiler.is_compiling() else _host_sized
    return host_sized(x, token, expert, weight, w_in, w_down, experts, path)


def _host_sized(x, token, expert, weight, w_in, w_down, experts, path: Optional[str]) -> torch.Tensor:
    """The "fused", "cpu_kernel" and "padded" paths, which read the slice sizes back to the host
    (one sync per layer) and loop over them. Under torch.compile they run outside the graph
    (torch.compiler.disable, in moe_ffn): traced, each new list of sizes made a new graph (a
    recompile per step until dynamo gave up, docs/PERFORMANCE.md); so the graph breaks there and
    these paths run as in eager mode. "cpu_kernel" asked for where the kernel cannot take the
    tensors (not float32 on a CPU, or not built) runs "fused", the same function."""
    token_s, weight_s, counts = sort_by_expert(token, expert, weight, experts.n_experts)
    sizes = counts.tolist()
    path = path or choose_path(x, sizes, w_in.shape[2])
    if path == "cpu_kernel" and not cpu_kernel.applies(x, w_in, w_down):
        path = "fused"
    experts.last_path = path
    with torch.autocast(x.device.type, enabled=False):
        if path == "cpu_kernel":
            return cpu_kernel.KernelExpertsFFN.apply(x, weight_s, w_in, w_down, token_s, sizes, experts.activation)
        if path == "padded":
            C = max(sizes, default=0)
            starts = torch.cumsum(counts, 0) - counts
            expert_s = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), counts, output_size=len(token_s))
            slot = expert_s * C + torch.arange(len(token_s), device=x.device) - starts[expert_s]
            return PaddedFFN.apply(x, weight_s, w_in, w_down, token_s, slot, C, experts.activation)
        return ExpertsFFN.apply(x, weight_s, w_in, w_down, token_s, sizes, experts.activation)


def moe_ffn_expert_parallel(x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
                            experts, ep, path: Optional[str] = None) -> torch.Tensor:
    """moe_ffn when this rank holds only experts [ep.first, ep.first + ep.n_local) of
    E = ep.n_local · ep.world_size (`ep`: a distributed.ExpertParallel; expert ids are global).

    Rows go to the rank of their expert and come back with all_to_all_single (autograd through
    both exchanges); the gate weight is applied here, on the token's own rank, so the router's
    gradient never leaves it. Exchanged per layer: the (N, E_local) counts, then the rows.
    """
    from .. import distributed

    N, n_local = ep.world_size, ep.n_local
    order = argsort_experts(expert, N * n_local)  # by expert = by destination rank, then expert
    token_s, weight_s = token[order], weight[order]
    sent = count_per_expert(expert, N * n_local)  # (E,) rows for each expert
    got = distributed.exchange_counts(sent).view(N, n_local)  # (source rank, local expert)
    # NOTE: one host sync per layer: all_to_all_single takes its split sizes as Python ints.
    send_splits, recv_splits = sent.view(N, n_local).sum(1).tolist(), got.sum(1).tolist()
    rows = distributed.all_to_all(x.index_select(0, token_s), send_splits, recv_splits)  # (R, d)
    local_expert = torch.arange(n_local, device=x.device).repeat(N).repeat_interleave(got.reshape(-1))
    R = rows.shape[0]
    # each received row through its expert, unscaled and in place (token = its own row)
    out = moe_ffn(rows, torch.arange(R, device=x.device), local_expert, rows.new_ones(R, dtype=torch.float32),
                  experts, path=path)
    back = distributed.all_to_all(out, recv_splits, send_splits)  # (A, d), in token_s order
    y = back.new_zeros((x.shape[0], back.shape[1]))
    return y.index_add(0, token_s, back * weight_s[:, None].to(back.dtype))


# ---------------------------------------------------------------------------------------------
# activations (forward, and backward from the pre-activation h)


def _act(h: torch.Tensor, activation: str, hid: int) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(h[:, :hid]).mul_(h[:, hid:])
    return F.relu(h) if activation == "relu" else F.gelu(h)


def _act_backward(h: torch.Tensor, da: torch.Tensor, activation: str, hid: int,
                  silu_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dL/dh from dL/da; may overwrite da. silu_gate: silu(gate) when already computed."""
    if activation == "swiglu":
        gate, up = h[:, :hid], h[:, hid:]
        dh = torch.empty_like(h)
        torch.mul(da, silu_gate if silu_gate is not None else F.silu(gate), out=dh[:, hid:])  # d/d up
        torch.ops.aten.silu_backward(da.mul_(up), gate, grad_input=dh[:, :hid])  # d/d gate
        return dh
    if activation == "relu":
        return torch.ops.aten.threshold_backward(da, h, 0)
    return torch.ops.aten.gelu_backward(da, h)


# NOTE: experts whose rows together fit this many bytes of activations run as one block: their
# elementwise work (activation, scaling, gather, scatter) is one call each instead of one per
# expert - the difference for small experts; a bigger expert is a block of its own (no split).
BLOCK_BYTES = 4 << 20


class Block(NamedTuple):
    """Consecutive experts first, first + 1, ... run together: their rows [start, end) of the
    expert-sorted assignments, `rows` each one's row count (0 for an empty expert inside the range;
    what Tensor.split takes: one call makes every expert's view)."""

    start: int
    end: int
    first: int
    rows: list[int]


def plan_blocks(sizes: list[int], row_bytes: int) -> list[Block]:
    """Group consecutive experts into blocks of at most BLOCK_BYTES // row_bytes rows (a bigger
    expert alone). A block starts and ends at an expert with rows; experts without rows before the
    first block or after the last one are in none."""
    max_rows = max(1, BLOCK_BYTES // max(1, row_bytes))
    blocks: list[Block] = []
    rows: list[int] = []
    first = block_start = start = 0
    for e, n in enumerate(sizes):
        if n == 0:
            if rows:
                rows.append(0)
            continue
        if rows and start + n - block_start > max_rows:
            blocks.append(Block(block_start, start, first, _trim(rows)))
            rows = []
        if not rows:
            first, block_start = e, start
        rows.append(n)
        start += n
    if rows:
        blocks.append(Block(block_start, start, first, _trim(rows)))
    return blocks


def _trim(rows: list[int]) -> list[int]:
    """rows without its trailing zeros (a block ends at an expert with rows)."""
    while rows and rows[-1] == 0:
        rows.pop()
    return rows


# NOTE: on a CPU the fused path multiplies a block's rows by their experts' matrices with ONE
# call of torch's grouped matmul (a loop over the experts inside torch, no Python between them),
# where torch has it and takes the tensors; else with one mm per expert (_expert_mm). Measured at the
# demo's size (d_model 64, 32 experts of width 64, 2 threads): see docs/PERFORMANCE.md.
GROUPED_BLOCKS = True


@functools.cache
def _cpu_grouped_mm_runs() -> bool:
    """Whether this torch's grouped_mm runs on a CPU: torch 2.8 has the function but no CPU kernel
    (NotImplementedError), 2.9 on have one. Tried once, on a (4 x 4) problem."""
    if _grouped_mm is None:
        return False
    try:
        _grouped_mm(torch.ones(4, 4), torch.ones(1, 4, 4), offs=torch.tensor([4], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def use_grouped_blocks(x: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor) -> bool:
    """Whether the fused path runs each block's matmuls as grouped matmuls: a CPU tensor, a torch
    whose grouped_mm runs on a CPU, float32 / bfloat16 / float16, every matrix row a multiple of 16
    bytes and the weights 16-byte aligned (what grouped_mm requires; the rows it multiplies are
    fresh tensors); not under torch.compile (its grouped_mm takes bfloat16 only)."""
    if not GROUPED_BLOCKS or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not (x.dtype == w_in.dtype == w_down.dtype):
        return False
    if any(n * x.element_size() % 16 for n in (x.shape[1], w_in.shape[2], w_down.shape[1])):
        return False
    return w_in.data_ptr() % 16 == 0 and w_down.data_ptr() % 16 == 0 and _cpu_grouped_mm_runs()


# NOTE: one expert's product goes to oneDNN (model.gemm, where this machine takes it) from this
# many multiply-adds: oneDNN builds a kernel for each new row count (~80 us, and the counts change
# every step), and at 2 threads it gained ~1.1x on the demo's 4M (512 x 64 by 64 x 128); a d_model
# 512 expert's 268M+ run ~2x faster (docs/PERFORMANCE.md, "The matmul library").
ONEDNN_MIN_MACS = 16 << 20


def _expert_mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a (n, k) @ b (k, m) for one expert's rows: gemm.mm for products of at least ONEDNN_MIN_MACS
    multiply-adds, else torch.mm (into `out` when given)."""
    if a.shape[0] * a.shape[1] * b.shape[1] >= ONEDNN_MIN_MACS:
        return gemm.mm(a, b, out=out)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def _times_experts(a: torch.Tensor, w: torch.Tensor, b: Block, offs: Optional[torch.Tensor]) -> torch.Tensor:
    """Block b's rows a (n, k), each row times its expert's w[e] (k, m) -> (n, m). w (E, k, m) may
    be a transposed view. offs: the block's row ends as int32 (grouped matmul), or None (one mm per
    expert: also every block of a single expert, where grouping saves nothing)."""
    w = w[b.first:b.first + len(b.rows)]
    if offs is not None:
        return _grouped_mm(a, w, offs=offs)
    if len(b.rows) == 1:  # one expert alone in its block: no copy into a block buffer
        return _expert_mm(a, w[0])
    out = a.new_empty(a.shape[0], w.shape[2])
    for ae, we, oe in zip(a.split(b.rows), w.unbind(0), out.split(b.rows)):
        if ae.shape[0]:
            _expert_mm(ae, we, out=oe)
    return out


def _expert_grads(a: torch.Tensor, g: torch.Tensor, grad: torch.Tensor, b: Block,
                  offs: Optional[torch.Tensor]) -> None:
    """grad[e] = a_e^T @ g_e for each expert e of block b (a (n, k), g (n, m): the block's rows);
    an empty expert inside the block gets zeros."""
    grad = grad[b.first:b.first + len(b.rows)]
    if offs is not None:
        grad.copy_(_grouped_mm(a.t(), g, offs=offs))
        return
    for ae, ge, ow in zip(a.split(b.rows), g.split(b.rows), grad.unbind(0)):
        _expert_mm(ae.t(), ge, out=ow)


# ---------------------------------------------------------------------------------------------
# expert threads (CPU): whole blocks of experts per thread instead of every operation split


class ExpertThreads:
    """A pool of `n` worker threads, each running torch single-threaded, that share out a list of
    independent jobs (one block of experts each) by taking the next one off a counter.

    Why: the fused path is ~7 small operations per expert; with torch's usual threading each one is
    a fork-join across all cores, so when another program holds a core one descheduled thread
    stalls every join (measured: 64 experts top-8 went from 1.0x to 6.9x the dense FFN with two
    busy loops on 2 cores, docs/PERFORMANCE.md). Here a thread runs a whole block alone and takes
    the next one when done, so a thread that is descheduled just does fewer blocks: one join per
    layer and direction, like the dense FFN's few large matmuls.

    Each worker sets its own OpenMP/MKL thread count to 1 (torch keeps those per thread); the
    process-wide count is left as it was. Jobs run under no_grad. The first exception a job
    raises is raised again in the caller, after every worker is idle.
    """

    def __init__(self, n: int):
        self.n = n
        self._queues = [queue.SimpleQueue() for _ in range(n)]
        ready = threading.Barrier(n + 1)
        keep = torch.get_num_threads()
        for q in self._queues:
            threading.Thread(target=self._worker, args=(q, ready), daemon=True,
                             name="moe-lm-experts").start()
        ready.wait()
        torch.set_num_threads(keep)  # the workers' set_num_threads(1) also wrote the global value

    @staticmethod
    def _worker(q, ready) -> None:
        torch.get_num_threads()  # torch's per-thread lazy init first, or it would undo the next line
        torch.set_num_threads(1)
        ready.wait()
        while True:
            job = q.get()
            job()

    def map(self, fn, n_jobs: int) -> list:
        """[fn(0), ..., fn(n_jobs - 1)], run on the worker threads; blocks until all are done."""
        results: list = [None] * n_jobs
        errors: list = []
        taken = itertools.count()
        done = threading.Semaphore(0)

        def drain():
            try:
                with torch.no_grad():
                    while (i := next(taken)) < n_jobs and not errors:
                        results[i] = fn(i)
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller
                errors.append(exc)
            finally:
                done.release()

        workers = self._queues[:max(1, min(self.n, n_jobs))]
        for q in workers:
            q.put(drain)
        for _ in workers:
            done.acquire()
        if errors:
            raise errors[0]
        return results


_POOLS: dict[int, ExpertThreads] = {}
os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of the worker threads


def expert_threads() -> Optional[ExpertThreads]:
    """The pool for this process's torch thread count, or None when that count is 1 (run inline)."""
    n = torch.get_num_threads()
    if n <= 1 or threading.current_thread().name == "moe-lm-experts":
        return None
    if n not in _POOLS:
        _POOLS[n] = ExpertThreads(n)
    return _POOLS[n]


# NOTE: the expert threads pay a Python-level handoff and share the GIL between small operations,
# so they are used only when an expert's matmul is big enough to hide that: at least this many
# multiply-adds on average (d_model 512 experts of width 256 with ~1,000 rows: 134M; the demo's
# d_model 64, width 64, ~500 rows: 4M, where the inline loop measured as fast or faster).
THREADS_MIN_MACS = 16 << 20


def big_experts(x: torch.Tensor, sizes: list[int], width: int) -> bool:
    """Whether the experts with rows multiply at least THREADS_MIN_MACS on average in their first
    product (rows x d_model x width)."""
    busy = [n for n in sizes if n]
    return bool(busy) and sum(busy) * x.shape[1] * width / len(busy) >= THREADS_MIN_MACS


def use_expert_threads(x: torch.Tensor, sizes: list[int], width: int) -> bool:
    """Whether the fused path shares its blocks over the expert threads: a CPU tensor, several
    torch threads, and experts' matmuls of at least THREADS_MIN_MACS on average (big_experts)."""
    if x.device.type != "cpu" or torch.get_num_threads() <= 1:
        return False
    return big_experts(x, sizes, width)


def run_blocks(fn, n_jobs: int, threaded: bool) -> list:
    """fn over range(n_jobs): on the expert threads when `threaded` (see use_expert_threads),
    else inline in order."""
    pool = expert_threads() if threaded and n_jobs > 1 else None
    if pool is None:
        return [fn(i) for i in range(n_jobs)]
    return pool.map(fn, n_jobs)


class ExpertsFFN(torch.autograd.Function):
    """The "fused" path. Inputs sorted by expert: token_s (A,), weight_s (A,), sizes (E ints).

    Forward, per expert e with rows R_e:   h_e = x[R_e] @ w_in[e];  a_e = act(h_e);
                                           y_e = a_e @ w_down[e];   out.index_add_(R_e, weight_e · y_e)
    run block by block (plan_blocks). Saved per block: h, a, silu(gate) (SwiGLU) and y (unscaled:
    dL/dweight = <g[R_e], y_e> without a matmul) - about what autograd keeps for a dense FFN.
    """

    @staticmethod
    def forward(ctx, x, weight_s, w_in, w_down, token_s, sizes, activation):
        hid, d, width = w_down.shape[1], x.shape[1], w_in.shape[2]
        blocks = plan_blocks(sizes, x.element_size() * (width + 2 * hid + d))
        grouped = use_grouped_blocks(x, w_in, w_down)
        offs = [torch.tensor(list(itertools.accumulate(b.rows)), dtype=torch.int32)
                if grouped and len(b.rows) > 1 else None for b in blocks]

        def block(i):  # -> h, act, silu(gate), y, and y scaled by the gate weights
            b = blocks[i]
            h = _times_experts(x.index_select(0, token_s[b.start:b.end]), w_in, b, offs[i])
            if activation == "swiglu":
                sg = F.silu(h[:, :hid])
                act = sg * h[:, hid:]
            else:
                sg, act = None, _act(h, activation, hid)
            y = _times_experts(act, w_down, b, offs[i])
            return h, act, sg, y, y * weight_s[b.start:b.end, None].to(y.dtype)

        threaded = use_expert_threads(x, sizes, width)
        done = run_blocks(block, len(blocks), threaded)
        out = torch.zeros_like(x)
        saved = []
        for b, (h, act, sg, y, scaled) in zip(blocks, done):  # in block order: deterministic sums
            out.index_add_(0, token_s[b.start:b.end], scaled)
            saved += [h, act, sg, y]
        ctx.blocks, ctx.offs, ctx.activation, ctx.threaded = blocks, offs, activation, threaded
        ctx.empty_experts = [e for e, n in enumerate(sizes) if n == 0]
        ctx.save_for_backward(x, weight_s, w_in, w_down, token_s, *saved)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight_s, w_in, w_down, token_s, *saved = ctx.saved_tensors
        act_name, hid = ctx.activation, w_down.shape[1]
        need_x, need_w, need_win, need_wd = ctx.needs_input_grad[:4]
        g = g.contiguous()
        dw = torch.zeros(weight_s.shape, dtype=g.dtype, device=g.device) if need_w else None
        # NOTE: empty, not zeros: a (64, 512, 1024) zero fill is a page-faulting 128 MiB write;
        # only the experts without rows are zeroed.
        dwin = torch.empty_like(w_in) if need_win else None
        dwd = torch.empty_like(w_down) if need_wd else None
        for e in ctx.empty_experts:
            for grad in (dwin, dwd):
                if grad is not None:
                    grad[e].zero_()
        blocks, offs = ctx.blocks, ctx.offs
        w_in_t, w_down_t = w_in.transpose(1, 2), w_down.transpose(1, 2)

        def block(i):  # writes this block's slices of dw, dwd, dwin; -> its rows of dL/dx or None
            b = blocks[i]
            h, act, sg, y = saved[4 * i:4 * i + 4]
            tok = token_s[b.start:b.end]
            gb = g.index_select(0, tok)  # (n, d)
            if need_w:
                torch.linalg.vecdot(gb, y, out=dw[b.start:b.end])
            gb.mul_(weight_s[b.start:b.end, None].to(gb.dtype))  # now dL/dy
            if need_wd:
                _expert_grads(act, gb, dwd, b, offs[i])
            if not (need_x or need_win):
                return None
            dh = _act_backward(h, _times_experts(gb, w_down_t, b, offs[i]), act_name, hid, sg)
            if need_win:
                _expert_grads(x.index_select(0, tok), dh, dwin, b, offs[i])
            return _times_experts(dh, w_in_t, b, offs[i]) if need_x else None

        done = run_blocks(block, len(blocks), ctx.threaded)
        dx = None
        if need_x:
            dx = torch.zeros_like(x)
            for b, dxb in zip(blocks, done):  # in block order: deterministic sums
                dx.index_add_(0, token_s[b.start:b.end], dxb)
        if dw is not None:
            dw = dw.to(weight_s.dtype)
        return dx, dw, dwin, dwd, None, None, None


class PaddedFFN(torch.autograd.Function):
    """The "padded" path: every expert's rows in one (E, C, d) buffer, C = the largest expert's
    rows (the rest zero), so each matmul is ONE bmm over all experts and the activation one call:
    about a dozen operations per direction whatever E is, against ~7 per expert for "fused".
    slot (A,): the buffer row of each expert-sorted assignment (expert · C + its rank there).

    Forward: xp[slot] = x[token_s];  h = xp @ w_in;  a = act(h);  y = a @ w_down;
             out.index_add_(token_s, weight · y[slot]).
    Padding rows stay exactly zero in xp, h, a, and in the backward's gradients, so they add
    nothing to any weight gradient. Saved: xp, h, a, silu(gate) and the unscaled y[slot].
    """

    @staticmethod
    def forward(ctx, x, weight_s, w_in, w_down, token_s, slot, C, activation):
        E, d, width = w_in.shape
        hid = w_down.shape[1]
        xp = x.new_zeros(E * C, d)
        xp.index_copy_(0, slot, x.index_select(0, token_s))
        h = torch.bmm(xp.view(E, C, d), w_in)  # (E, C, width)
        hf = h.view(E * C, width)
        if activation == "swiglu":
            sg = F.silu(hf[:, :hid])
            act = sg * hf[:, hid:]
        else:
            sg, act = None, _act(hf, activation, hid)
        y = torch.bmm(act.view(E, C, hid), w_down).view(E * C, d).index_select(0, slot)  # (A, d)
        out = torch.zeros_like(x).index_add_(0, token_s, y * weight_s[:, None].to(y.dtype))
        ctx.activation, ctx.C = activation, C
        ctx.save_for_backward(xp, weight_s, w_in, w_down, token_s, slot, h, act, sg, y)
        return out

    @staticmethod
    def backward(ctx, g):
        xp, weight_s, w_in, w_down, token_s, slot, h, act, sg, y = ctx.saved_tensors
        need_x, need_w, need_win, need_wd = ctx.needs_input_grad[:4]
        E, d, width = w_in.shape
        hid, C = w_down.shape[1], ctx.C
        gb = g.contiguous().index_select(0, token_s)  # (A, d)
        dw = torch.linalg.vecdot(gb, y).to(weight_s.dtype) if need_w else None
        gb.mul_(weight_s[:, None].to(gb.dtype))  # now dL/dy
        gp = gb.new_zeros(E * C, d).index_copy_(0, slot, gb).view(E, C, d)
        dwd = torch.bmm(act.view(E, C, hid).transpose(1, 2), gp) if need_wd else None
        dx = dwin = None
        if need_x or need_win:
            da = torch.bmm(gp, w_down.transpose(1, 2)).view(E * C, hid)
            dh = _act_backward(h.view(E * C, width), da, ctx.activation, hid, sg).view(E, C, width)
            if need_win:
                dwin = torch.bmm(xp.view(E, C, d).transpose(1, 2), dh)
            if need_x:
                dxp = torch.bmm(dh, w_in.transpose(1, 2)).view(E * C, d)
                dx = torch.zeros_like(g).index_add_(0, token_s, dxp.index_select(0, slot))
        return dx, dw, dwin, dwd, None, None, None, None


def _grouped_path(x, token_s, weight_s, counts, w_in, w_down, activation) -> torch.Tensor:
    """The "grouped_mm" path: autograd through torch's grouped matmul, no host sync."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x.index_select(0, token_s)
    h = _grouped_mm(xs, w_in, offs=offs)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
    else:
        a = F.relu(h) if activation == "relu" else F.gelu(h)
    y = _grouped_mm(a, w_down, offs=offs) * weight_s.to(h.dtype).unsqueeze(1)
    return torch.zeros_like(x).index_add(0, token_s, y)
