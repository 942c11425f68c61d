"""Routers: hidden states `x (T, d)` -> flat assignments `(token, expert, weight)`.

Every router returns a `Routing`: three flat tensors of length A (token-choice top-k: A = T·k,
token-major; expert choice: A = E·C) plus what the losses and statistics need (the router's
logits and probabilities). The MoE layer applies capacity limits and dispatches; the routers know
nothing about experts' weights.

Router math runs in float32 whatever the model's dtype (autocast is switched off inside): the
softmax/top-k of a bf16 logit vector ties and flips too easily.

Exact ties (an untrained router: noisy_topk starts at zero weights, so every score ties) are broken
fairly by `fair_topk`: the token at position p prefers, among equal scores, expert p mod E, then
p + 1, ... - so an untrained router spreads the tokens instead of sending all of them to the same
experts (which torch.topk does, and which reads as a collapse). Unequal scores are ranked exactly
as by torch.topk, the weights and gradients are untouched, and the rule depends only on the token's
own scores and position (causal, the same cached or recomputed).

    router = ROUTERS[cfg.router](d_model, cfg)
    r = router(x, pos)         # Routing(token, expert, weight, logits, probs, score, ...); pos (T,): positions
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from . import cpu_kernel, gemm


@dataclass
class Routing:
    """A router's decision for one batch of T tokens over E experts.

    token, expert: (A,) int64; weight: (A,) float32, differentiable (the gate value that scales
    the expert's output). score: (A,) float32, detached - the router's score of the assignment
    (capacity limits do not rank by it: they keep the earliest positions, moe.capacity_keep). logits: (T, E) float32 clean router logits (z-loss).
    probs: (T, E) float32, rows summing to 1 (Switch f·P loss, entropy). noisy_logits and
    noise_std: (T, E), only from noisy_topk (Shazeer's smooth load estimator). lse: (T,)
    float32, differentiable, logsumexp(logits) (the z-loss's), and entropy: () detached, the mean
    over tokens of -sum p log p (the layer's statistic): where the router made them on the way
    (softmax_topk and switch through the CPU kernel), else None and the losses compute them.
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    score: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    top_k: int  # assignments per token for token-choice routers; 0 for expert choice
    noisy_logits: Optional[torch.Tensor] = None
    noise_std: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None


def count_per_expert(expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """expert (A,) int64 ids in [0, n_experts) -> (n_experts,) int64: assignments per expert.

    What torch.bincount(expert, minlength=n_experts) gives, without its host sync: on CUDA bincount
    reads the ids' min and max back to the host to size its output, which stalled the training
    step's kernel queue 3 times per MoE layer (seen on an H200, docs/PERFORMANCE.md); adding ones
    into n_experts zeros needs no size from the device. Integer sums: the same result in any order."""
    return torch.zeros(n_experts, dtype=torch.int64, device=expert.device).scatter_add_(0, expert, torch.ones_like(expert))


def _router_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (T, d) @ weight (E, d)^T in float32 with autocast off."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return gemm.linear(x.float(), weight.float())


def fair_topk(scores: torch.Tensor, k: int, pos: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores (T, E), k) with exact ties broken fairly -> (values, indices), (T, k).

    One int64 key per score: the float32's bits made monotone (so different scores keep their exact
    order), times E, plus a tie rank that prefers expert (pos mod E), then (pos + 1) mod E, ...
    pos (T,) int64: each row's position in its sequence (None: the row index).

    On a CPU the common case takes a shortcut: torch.topk of k + 1, and when no two neighbours of
    any sorted row are equal (no tie inside the top k nor at its edge) and nothing is NaN, that
    top k is exactly what the keys would pick, in the same order; otherwise the keys decide. Half
    the time of the keys at the demo's shape (4,096 x 32); for float32 scores the C++ kernel
    (cpu_kernel.topk_indices) makes the same check by ranking each row's scores (~0.14 ms there,
    ~6x torch.topk). Not on a GPU, where the check would make the host wait for the device, nor
    under torch.compile, where it would break the graph."""
    E = scores.shape[1]
    if scores.device.type == "cpu" and k <= E and not torch.compiler.is_compiling():
        idx = cpu_kernel.topk_indices(scores, k)  # the same shortcut in C++ (float32, where it is built)
        if idx is not None:
            return scores.gather(1, idx), idx
        v, i = scores.topk(min(k + 1, E), dim=-1)
        vf = v.float()  # the keys compare float32 values: scores equal there are ties for both
        if not (bool((vf[:, 1:] == vf[:, :-1]).any()) or bool(vf.isnan().any())):
            return v[:, :k], i[:, :k]
    return topk_by_keys(scores, k, pos)


def topk_by_keys(scores: torch.Tensor, k: int, pos: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fair_topk's rule in full, on every device: the top k of one unique int64 key per score."""
    T, E = scores.shape
    if pos is None:
        pos = torch.arange(T, device=scores.device)
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 ties +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip to keep the order
    experts = torch.arange(E, device=scores.device)
    tie = (E - 1) - (experts[None, :] - pos[:, None]) % E  # E - 1 for expert pos mod E
    idx = (ordered * E + tie).topk(k, dim=-1).indices
    return scores.gather(1, idx), idx


def _token_major(top_idx: torch.Tensor, top_w: torch.Tensor, probs_at: torch.Tensor) -> tuple:
    """(T, k) choices -> flat (token, expert, weight, score), token-major (A = T·k)."""
    T, k = top_idx.shape
    token = torch.arange(T, device=top_idx.device).repeat_interleave(k)
    return token, top_idx.reshape(-1), top_w.reshape(-1), probs_at.reshape(-1).detach()


def _softmax_topk(logits: torch.Tensor, k: int, renorm: bool, pos: Optional[torch.Tensor]) -> Routing:
    """p = softmax(logits (T, E)); the top k of p (fair_topk); weights = those p, divided by their
    sum when renorm. On a CPU the kernel does all of it after the product in one pass per row
    (cpu_kernel.softmax_topk: the same function, and logsumexp and entropy on the way) where no
    row ties; otherwise these lines."""
    fused = cpu_kernel.softmax_topk(logits, k, renorm)  # None off a CPU (cpu_kernel.applies)
    if fused is not None:
        probs, top_idx, top_p, weight, lse, ent = fused
        token, expert, weight, score = _token_major(top_idx, weight, top_p)
        return Routing(token, expert, weight, score, logits, probs, k, lse=lse, entropy=ent.mean())
    probs = logits.softmax(dim=-1)
    top_p, top_idx = fair_topk(probs, k, pos)  # (T, k)
    weight = top_p / top_p.sum(dim=-1, keepdim=True) if renorm else top_p
    token, expert, weight, score = _token_major(top_idx, weight, top_p)
    return Routing(token, expert, weight, score, logits, probs, k)


class SoftmaxTopK(nn.Module):
    """GShard / Mixtral: p = softmax(x W^T) over all E experts, keep the top k, renormalise the kept
    k to sum to 1 (transformers' MixtralTopKRouter, `norm_topk_prob=True`).

    NOTE: with top_k = 1 the renormalised weight is exactly 1 and the router would get no gradient
    from the model's loss (softmax after top-1). So for k = 1 the weight stays p_i, as in Switch
    (= Qwen2-MoE's `norm_topk_prob=False`, not Mixtral's arithmetic).
    """

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, d_model))  # = Mixtral's gate.weight
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> Routing:
        logits = _router_linear(x, self.weight)  # (T, E)
        return _softmax_topk(logits, self.top_k, self.top_k > 1, pos)


class Switch(nn.Module):
    """Switch Transformer: the top-1 expert of p = softmax(x W^T), scaled by its probability p_i
    (not renormalised - renormalising one value gives 1 and the router no gradient)."""

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, d_model))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> Routing:
        logits = _router_linear(x, self.weight)
        return _softmax_topk(logits, 1, False, pos)


class NoisyTopK(nn.Module):
    """Shazeer et al. 2017, Eq. 3-5:

        H(x)_i = (x W_g)_i + N(0, 1) · softplus((x W_noise)_i)      (noise only in training)
        G(x)   = softmax(KeepTopK(H(x), k))                          (softmax over the kept k)

    W_g and W_noise start at zero, as in the paper: routing begins uniform-at-random through the
    noise (softplus(0) = 0.69) and learns from there.

    NOTE: with k = 1 the paper's gate is softmax over one value = 1: the router then learns only
    through the balance loss (a warning says so, and config validation refuses k = 1 without a
    balance loss, where it would not learn at all); the paper used k >= 2. Every other router gives
    its weights a gradient from the model's loss at every top_k (tests/test_routing.py).
    """

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        if cfg.top_k == 1:
            warnings.warn("router noisy_topk with top_k=1: the gate softmax over one kept value is 1, so the "
                          "router learns only through the shazeer load loss; use top_k >= 2 or the switch router",
                          stacklevel=2)
        self.w_gate = nn.Parameter(torch.zeros(cfg.n_experts, d_model))
        self.w_noise = nn.Parameter(torch.zeros(cfg.n_experts, d_model))
        # (rank, world size) under torchrun: x holds this rank's rows of the global batch
        self.batch_share = (0, 1)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> Routing:
        clean = _router_linear(x, self.w_gate)  # (T, E)
        noise_std = F.softplus(_router_linear(x, self.w_noise))
        if self.training:
            rank, world = self.batch_share
            T = clean.shape[0]
            # NOTE: every rank draws the whole batch's noise and keeps its rows: the ranks' RNGs stay
            # in step, and N ranks draw exactly what one process would.
            noise = torch.randn_like(clean) if world == 1 else \
                torch.randn(world * T, clean.shape[1], dtype=clean.dtype, device=clean.device)[rank * T:(rank + 1) * T]
            noisy = clean + noise * noise_std
        else:
            noisy = clean
        top_h, top_idx = fair_topk(noisy, self.top_k, pos)  # zero init, no noise (eval): all tie
        weight = top_h.softmax(dim=-1)  # softmax over the kept k = softmax(KeepTopK(H))
        probs = noisy.softmax(dim=-1)  # over all experts: for entropy and the Switch f·P loss
        token, expert, weight, score = _token_major(top_idx, weight, probs.gather(1, top_idx))
        return Routing(token, expert, weight, score, clean, probs, self.top_k,
                       noisy_logits=noisy, noise_std=noise_std)


class ExpertChoice(nn.Module):
    """Zhou et al. 2022: each expert takes its top C = ceil(T · capacity_factor / E) tokens by
    softmax score p = softmax(x W^T) (over experts); the weight is that score. A token may get
    0, 1 or several experts, and the load is balanced by construction.

    NOTE: an expert chooses among all T tokens of the batch at once, so a token's routing depends
    on LATER tokens of its sequence (and on other sequences): not causal. Fine for comparing
    training curves; at generation time the model sees other batches than in training.
    """

    _warned = False

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.capacity_factor = cfg.capacity_factor if cfg.capacity_factor is not None else 1.0
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, d_model))
        nn.init.normal_(self.weight, std=init_std)
        if not ExpertChoice._warned:
            ExpertChoice._warned = True
            warnings.warn("router expert_choice: a token's routing depends on later tokens of its sequence "
                          "(experts choose among the whole batch), so the model is not strictly causal",
                          stacklevel=2)

    def capacity(self, n_tokens: int) -> int:
        return min(n_tokens, math.ceil(n_tokens * self.capacity_factor / self.n_experts))

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> Routing:
        logits = _router_linear(x, self.weight)
        probs = logits.softmax(dim=-1)  # (T, E)
        C = self.capacity(x.shape[0])
        top_p, top_tok = probs.t().topk(C, dim=-1)  # (E, C)
        expert = torch.arange(self.n_experts, device=x.device).repeat_interleave(C)
        return Routing(top_tok.reshape(-1), expert, top_p.reshape(-1), top_p.reshape(-1).detach(),
                       logits, probs, 0)


class SigmoidBias(nn.Module):
    """DeepSeek-V3 aux-loss-free balancing: s = sigmoid(x W^T); choose the top k of s + bias; the
    weights are the chosen s renormalised to sum to 1 for top_k > 1, and the raw s for top_k = 1
    (one value renormalised is exactly 1: the router would get no gradient from the model's loss -
    the same rule as softmax_topk and switch at k = 1). `bias` is a buffer, moved outside autograd by
    `update_bias()` after each optimizer step: bias_i += rate · sign(mean load - load_i), with the
    load counted since the previous update - it steers which experts are chosen, never the weights.

    probs (for entropy and an optional Switch f·P loss) are the normalised scores s / sum(s), the
    quantity DeepSeek-V3's small sequence-wise balance loss uses.
    """

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.n_experts, self.top_k, self.rate = cfg.n_experts, cfg.top_k, cfg.bias_update_rate
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, d_model))
        nn.init.normal_(self.weight, std=init_std)
        self.register_buffer("bias", torch.zeros(cfg.n_experts))
        # NOTE: non-persistent: a checkpoint taken between a step and its update holds no load.
        self.register_buffer("load_since_update", torch.zeros(cfg.n_experts), persistent=False)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> Routing:
        logits = _router_linear(x, self.weight)
        s = torch.sigmoid(logits)  # (T, E)
        _, top_idx = fair_topk(s + self.bias, self.top_k, pos)
        top_s = s.gather(1, top_idx)
        weight = top_s / top_s.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_s
        if self.training:
            self.load_since_update += count_per_expert(top_idx.reshape(-1), self.n_experts).to(self.bias.dtype)
        probs = s / s.sum(dim=-1, keepdim=True)
        token, expert, weight, score = _token_major(top_idx, weight, top_s)
        return Routing(token, expert, weight, score, logits, probs, self.top_k)

    @torch.no_grad()
    def update_bias(self) -> None:
        load = self.load_since_update
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank moves its bias by the global load
        if load.sum() > 0:
            self.bias += self.rate * torch.sign(load.mean() - load)
        load.zero_()


ROUTERS: dict[str, type[nn.Module]] = {
    "noisy_topk": NoisyTopK,
    "softmax_topk": SoftmaxTopK,
    "switch": Switch,
    "expert_choice": ExpertChoice,
    "sigmoid_bias": SigmoidBias,
}
