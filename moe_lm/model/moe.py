"""The MoE layer: router -> assignments -> (capacity) -> dispatch over stacked experts -> combine.

    layer = MoELayer(d_model, ffn_hidden, activation, moe_cfg, std=0.02, down_std=0.02 / sqrt(2 L))
    y, stats = layer(x)          # x, y: (B, T, d); stats: MoEStats (detached statistics + losses)

Also the dense FFN (`FeedForward`), used by dense blocks and as the always-on shared experts.
Weight names follow transformers' Llama/Mixtral so an export is a renaming:
  FeedForward.gate_proj / up_proj / down_proj = LlamaMLP's (nn.Linear layout, (out, in));
  router.weight (E, d) = Mixtral's block_sparse_moe.gate.weight;
  Experts.w_gate_up (E, d, 2h) = [gate | up] in x @ W layout: Mixtral's experts.gate_up_proj is
  its transpose (E, 2h, d); Experts.w_down (E, h, d) transposed = Mixtral's experts.down_proj (E, d, h).
Shared experts (DeepSeekMoE) are plain always-on FFNs summed into the output; Qwen2-MoE's shared
expert has an extra sigmoid gate, so it is not the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from . import dispatch, gemm, losses
from .routing import ROUTERS, ExpertChoice, Routing, count_per_expert


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """relu | gelu on h; swiglu on h = [gate | up] (last dim 2h): silu(gate) * up."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "relu":
        return F.relu(h)
    return F.gelu(h)


class FeedForward(nn.Module):
    """Dense FFN without biases: down(silu(gate(x)) * up(x)) for swiglu (LlamaMLP), else
    down(act(up(x)))."""

    def __init__(self, d_model: int, hidden: int, activation: str, std: float, down_std: float):
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = gemm.Linear(d_model, hidden, bias=False)
            nn.init.normal_(self.gate_proj.weight, std=std)
        self.up_proj = gemm.Linear(d_model, hidden, bias=False)
        self.down_proj = gemm.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=down_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(activate(self.up_proj(x), self.activation))


class Experts(nn.Module):
    """E expert FFNs as stacked tensors (x @ W layout):

        swiglu: w_gate_up (E, d, 2h) = [gate | up], w_down (E, h, d)
        relu / gelu: w_up (E, d, h), w_down (E, h, d)

    Each matrix starts with exactly the std of the matching dense FFN matrix (`std` for gate/up,
    `down_std` for down), so an MoE and its dense twin differ in sparsity, not in init.
    """

    def __init__(self, n_experts: int, d_model: int, hidden: int, activation: str, std: float, down_std: float):
        super().__init__()
        self.n_experts, self.d_model, self.hidden, self.activation = n_experts, d_model, hidden, activation
        self.last_path: str | None = None  # the dispatch path of the last forward (dispatch.moe_ffn sets it)
        width = 2 * hidden if activation == "swiglu" else hidden
        w_in = nn.Parameter(torch.empty(n_experts, d_model, width))
        if activation == "swiglu":
            self.w_gate_up = w_in
        else:
            self.w_up = w_in
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        nn.init.normal_(w_in, std=std)
        nn.init.normal_(self.w_down, std=down_std)

    @property
    def w_in(self) -> torch.Tensor:
        """(E, d, 2h) for swiglu, else (E, d, h)."""
        return self.w_gate_up if self.activation == "swiglu" else self.w_up

    def keep(self, first: int, count: int) -> None:
        """Keep experts [first, first + count) only (expert parallelism: this rank's share)."""
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p.detach()[first:first + count].clone()))
        self.n_experts = count

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x (n, d) -> (n, d). The plain definition (reference and fallback)."""
        return activate(x @ self.w_in[e], self.activation) @ self.w_down[e]


@dataclass
class MoEStats:
    """One MoE layer's statistics for one forward. All but the losses are detached.

    load (E,): assignments each expert processed (tokens per expert, after capacity drops).
    importance (E,): sum of gate weights per expert (before drops).
    dropped_frac: share of assignments dropped by the capacity limit (token choice); for expert
        choice, the share of tokens that no expert took.
    entropy: mean router entropy (nats) of the router's probabilities.
    balance_loss, z_loss: this layer's losses, coefficient applied (differentiable).
    balance_stats: only while `MoELayer.measure_balance` is set (the trainer's gradient-accumulation
        pre-pass): this forward's balance statistics (losses.balance_stats), detached; else None.
    """

    load: torch.Tensor
    importance: torch.Tensor
    dropped_frac: torch.Tensor
    entropy: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    balance_stats: torch.Tensor | None = None


def capacity_keep(token: torch.Tensor, expert: torch.Tensor, n_experts: int, n_seqs: int, seq_len: int,
                  capacity: int, kept_before: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal capacity: which assignments the experts keep, PER SEQUENCE, BY POSITION.

    Rows `token` index a (n_seqs, seq_len) batch flattened sequence-major. Expert e keeps an
    assignment at position t of sequence b when fewer than `capacity` assignments of that sequence at
    positions < t (plus `kept_before[b, e]`, those of earlier forwards under a KV cache) went to e:
    the first `capacity` in position order are kept, the later ones dropped. So whether token t is
    dropped depends only on tokens at positions <= t of its own sequence - never on later tokens or
    on other sequences of the batch (mesh-tensorflow's position-ordered dispatch; a score-ordered
    choice over the batch would let the future decide). One stable sort, no loop.

    Returns (keep (A,) bool, kept (n_seqs, E) int64 = kept_before + what this forward kept).
    """
    seq, pos = token // seq_len, token % seq_len
    group = seq * n_experts + expert  # (sequence, expert)
    order = torch.argsort(group * seq_len + pos)  # by sequence and expert, then position (unique keys)
    counts = torch.bincount(group, minlength=n_seqs * n_experts)
    starts = torch.cumsum(counts, 0) - counts
    g = group[order]
    rank = torch.arange(token.numel(), device=token.device) - starts[g]  # earlier assignments to e
    if kept_before is not None:
        rank = rank + kept_before.reshape(-1)[g]
    keep = torch.empty_like(token, dtype=torch.bool)
    keep[order] = rank < capacity
    kept = torch.bincount(group[keep], minlength=n_seqs * n_experts).view(n_seqs, n_experts)
    return keep, kept if kept_before is None else kept_before + kept


class MoELayer(nn.Module):
    """Router + stacked experts (+ always-on shared experts), dispatch and combine."""

    def __init__(self, d_model: int, hidden: int, activation: str, cfg: MoEConfig, std: float, down_std: float,
                 seq_len: int | None = None):
        super().__init__()
        self.cfg = cfg
        # the model's training sequence length: the capacity per sequence (None = each forward's T)
        self.seq_len = seq_len
        self.n_experts = cfg.n_experts
        router_cls = ROUTERS[cfg.router]
        self.router = router_cls(d_model, cfg, init_std=std)
        self.experts = Experts(cfg.n_experts, d_model, hidden, activation, std, down_std)
        self.shared_experts = (FeedForward(d_model, cfg.n_shared_experts * hidden, activation, std, down_std)
                               if cfg.n_shared_experts > 0 else None)
        self.dispatch_path: str | None = None  # None = dispatch.choose_path's rule; tests force a path
        # eval sets record=True to read what the last forward routed: the kept (token, expert)
        # pairs, their gate weights, and the (token, expert) pairs a capacity limit dropped
        self.record = False
        self.last_assignments: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_dropped: tuple[torch.Tensor, torch.Tensor] | None = None
        # under torchrun (moe_lm.distributed.prepare_model): the differentiable sum over the ranks
        # that makes balance losses see the global batch, and this rank's share of the experts
        self.sum_over_ranks = None
        self.expert_parallel = None
        # gradient accumulation (training.step.accumulate_gradients): the step's other
        # micro-batches' balance statistics, a constant added to this forward's, so the balance loss
        # is the whole batch's; and the pre-pass flag that makes MoEStats carry the statistics
        self.balance_rest: torch.Tensor | None = None
        self.measure_balance = False

    @property
    def has_balance_loss(self) -> bool:
        return self.cfg.balance_loss != "none" and self.cfg.balance_coef > 0

    def shard_experts(self, ep) -> None:
        """Hold experts [ep.first, ep.first + ep.n_local) of n_experts (a distributed.ExpertParallel)."""
        self.experts.keep(ep.first, ep.n_local)
        self.expert_parallel = ep

    def capacity(self, seq_len: int) -> int | None:
        """Token-choice capacity limit PER SEQUENCE: C = ceil(cf · L · k / E) assignments per expert
        and sequence, L = the model's training seq_len (so a prefix is routed as in training, whatever
        the length of the forward), or the forward's T for a layer built without one. None =
        dropless (and for expert choice, whose capacity is its own)."""
        cf = self.cfg.capacity_factor
        if cf is None or isinstance(self.router, ExpertChoice):
            return None
        L = self.seq_len if self.seq_len is not None else seq_len
        return math.ceil(cf * L * self.cfg.top_k / self.n_experts)

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> tuple[torch.Tensor, MoEStats]:
        """x (B, T, d) (or (T, d): one sequence) -> y of x's shape, MoEStats.

        With a capacity limit, drops are causal (see `capacity_keep`); under a KV cache
        (`cache.moe_kept[layer]`) the counts of earlier forwards carry over, so cached generation
        drops exactly what recomputing the whole sequence drops."""
        shape = x.shape
        n_seqs, T = (shape[0], shape[1]) if x.dim() == 3 else (1, shape[0])
        x = x.reshape(-1, shape[-1])  # (n_seqs·T, d), sequence-major
        start = cache.pos if cache is not None else 0
        pos = torch.arange(start, start + T, device=x.device).repeat(n_seqs)  # each row's position (ties)
        r: Routing = self.router(x, pos)
        token, expert, weight = r.token, r.expert, r.weight
        n_assigned = token.numel()
        cap = self.capacity(T)
        dropped = None
        if cap is not None:
            before = cache.moe_kept.get(layer) if cache is not None else None
            # NOTE: boolean indexing syncs with the device once; only with a capacity limit.
            keep, kept = capacity_keep(token, expert, self.n_experts, n_seqs, T, cap, before)
            if cache is not None:
                cache.moe_kept[layer] = kept
            if self.record:
                dropped = (token[~keep].detach(), expert[~keep].detach())
            token, expert, weight = token[keep], expert[keep], weight[keep]
        if self.record:
            self.last_assignments = (token.detach(), expert.detach())  # token indexes x's (T, d) rows
            self.last_weights = weight.detach()
            self.last_dropped = dropped
        if self.expert_parallel is not None:
            y = dispatch.moe_ffn_expert_parallel(x, token, expert, weight, self.experts, self.expert_parallel,
                                                 path=self.dispatch_path)
        else:
            y = dispatch.moe_ffn(x, token, expert, weight, self.experts, path=self.dispatch_path)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.reshape(shape), self._stats(r, expert, n_assigned, x.shape[0], token)

    def _stats(self, r: Routing, kept_expert: torch.Tensor, n_assigned: int, n_tokens: int,
               kept_token: torch.Tensor) -> MoEStats:
        E, cfg = self.n_experts, self.cfg
        with torch.no_grad():
            load = count_per_expert(kept_expert, E).float()
            imp = losses.importance(r, E).detach()
            if r.top_k == 0:  # expert choice: tokens nobody took
                taken = torch.zeros(n_tokens, device=load.device).index_fill_(0, kept_token, 1.0)
                dropped = 1.0 - taken.mean()
            else:
                # NOTE: torch.full fills on the device; torch.tensor(v, device=...) would copy from the host and wait
                dropped = torch.full((), 1.0 - kept_expert.numel() / max(n_assigned, 1), device=load.device)
            ent = r.entropy if r.entropy is not None else losses.entropy(r.probs)
        zero = r.logits.new_zeros(())
        if self.measure_balance and self.has_balance_loss:  # the pre-pass: statistics, no loss
            st = losses.balance_stats(cfg.balance_loss, r, E).detach()
            return MoEStats(load, imp, dropped, ent, zero, zero, st)
        bal = (cfg.balance_coef * losses.balance_loss(cfg.balance_loss, r, E, self.sum_over_ranks,
                                                      self.balance_rest)
               if self.has_balance_loss else zero)
        z = cfg.z_loss_coef * losses.z_loss(r.logits, r.lse) if cfg.z_loss_coef > 0 else zero
        return MoEStats(load, imp, dropped, ent, bal, z)
