"""Auxiliary router losses, each computed for ONE MoE layer; the model sums the layers' losses, each
times its coefficient (the papers' convention: a coefficient is per layer).

NOTE: per layer on purpose. Pooling the loads of all layers before the loss scores "balanced"
when layer 1 sends everything to expert 0 and layer 2 everything to expert 1.

- shazeer_loss: Shazeer et al. 2017, w·CV(Importance)² + w·CV(Load)², Load from the smooth
  estimator of Appendix A (`smooth_load`).
- switch_loss: Switch Transformer, N · Σ_i f_i · P_i (= 1 at perfect balance, N when collapsed).
- z_loss: ST-MoE router z-loss, mean over tokens of logsumexp(logits)².
Coefficients are applied by the caller (the MoE layer).

A balance loss is a function of sums over the batch's tokens (its *statistics*: Switch's
assignment counts, Σ p and token count; Shazeer's importance and smooth load), not a mean of
per-token terms - so it is computed from `balance_stats` by `balance_from_stats`, and those sums
are ALWAYS the whole optimizer step's batch (one rule for torchrun ranks and for micro-batches):
- under torchrun each rank sees its share of the batch; `batch_sum` (distributed.sum_over_ranks, a
  differentiable sum over the ranks) adds the other ranks' statistics, so every rank computes the
  single-process loss. None = this process holds the whole (micro-)batch.
- with gradient accumulation (train.grad_accum > 1) `rest` holds the statistics of the step's OTHER
  micro-batches, measured beforehand without gradient (the trainer's pre-pass), as a constant: the
  loss then has the whole batch's value, and its gradient through this micro-batch's statistics is
  exactly this micro-batch's share of the whole-batch loss's gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .routing import Routing, count_per_expert


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, population variance / mean² (tensor2tensor's cv_squared)."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    mean = x.mean()
    return ((x - mean) ** 2).mean() / (mean**2 + eps)


def kth_excluding(h: torch.Tensor, k: int) -> torch.Tensor:
    """(T, E) -> (T, E): entry (t, i) is the k-th largest of h[t, j] over j != i.

    If h[t, i] is itself among the top k, excluding it moves the k-th largest one place down (the
    (k+1)-th of the row); otherwise it is the row's k-th largest.
    """
    T, E = h.shape
    if k >= E:  # every expert is always in the top k
        return h.new_full((T, E), float("-inf"))
    top = h.topk(k + 1, dim=-1).values  # (T, k+1), descending
    kth, kth1 = top[:, k - 1:k], top[:, k:k + 1]
    in_top = h >= kth
    return torch.where(in_top, kth1, kth)


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer 2017 Appendix A: P(x, i) = Φ((clean_i - kth_excluding(H, k, i)) / noise_std_i), the
    probability that expert i is in the top k under a fresh draw of ITS noise, the other experts'
    noise held at the sampled values. Differentiable in clean and noise_std. Returns (T, E)."""
    threshold = kth_excluding(noisy, k)  # (the paper's code lets the gradient through here too)
    z = (clean - threshold) / noise_std.clamp_min(1e-9)
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def importance(r: Routing, n_experts: int) -> torch.Tensor:
    """Σ over tokens of the gate weight of each expert (E,), differentiable."""
    return torch.zeros(n_experts, device=r.weight.device, dtype=r.weight.dtype).index_add(0, r.expert, r.weight)


def balance_stats(name: str, r: Routing, n_experts: int) -> torch.Tensor:
    """The sums over this forward's tokens that the balance loss `name` is a function of, as one
    float32 vector (differentiable where the loss's gradient flows):
    switch: [counts (E) (no gradient), Σ_tokens p (E), token count (1)]; shazeer: [importance (E),
    smooth load (E)]."""
    if name == "switch":
        counts = count_per_expert(r.expert, n_experts).float()
        return torch.cat([counts, r.probs.float().sum(dim=0), counts.new_full((1,), r.probs.shape[0])])
    if name == "shazeer":
        if r.noisy_logits is None or r.noise_std is None:
            raise ValueError("the shazeer balance loss needs the noisy_topk router")
        load = smooth_load(r.logits, r.noisy_logits, r.noise_std, r.top_k).sum(dim=0)
        imp = importance(r, n_experts)
        return torch.cat([imp.float(), load.float()])
    raise ValueError(f"no statistics for balance loss {name!r}")


def balance_from_stats(name: str, stats: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The balance loss from (summed) `balance_stats`."""
    if name == "switch":
        # N · Σ_i f_i · P_i: f_i = share of the assignments that went to expert i (counted, no
        # gradient), P_i = mean router probability of expert i (the gradient's path)
        counts, p_sum, n_tokens = stats.split([n_experts, n_experts, 1])
        f = counts.detach() / counts.detach().sum().clamp_min(1.0)
        return n_experts * (f * p_sum / n_tokens.detach().clamp_min(1.0)).sum()
    imp, load = stats.split(n_experts)  # shazeer: CV(Importance)² + CV(Load)²
    return cv_squared(imp) + cv_squared(load)


def shazeer_loss(r: Routing, n_experts: int, batch_sum=None, rest=None) -> torch.Tensor:
    """CV(Importance)² + CV(Load)² (unweighted; the paper's w_importance = w_load = the coefficient)."""
    return balance_loss("shazeer", r, n_experts, batch_sum, rest)


def switch_loss(r: Routing, n_experts: int, batch_sum=None, rest=None) -> torch.Tensor:
    """N · Σ_i f_i · P_i: f_i = share of the router's assignments that went to expert i (counted,
    no gradient), P_i = mean router probability of expert i (the gradient's path)."""
    return balance_loss("switch", r, n_experts, batch_sum, rest)


def z_loss(logits: torch.Tensor, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)²; `lse` (T,), where the router
    computed logsumexp(logits) already (Routing.lse)."""
    if lse is None:
        lse = torch.logsumexp(logits.float(), dim=-1)
    return lse.pow(2).mean()


def balance_loss(name: str, r: Routing, n_experts: int, batch_sum=None, rest=None) -> torch.Tensor:
    """The balance loss of the whole step's batch: this forward's statistics, summed over the ranks
    (`batch_sum`), plus the other micro-batches' (`rest`, a constant). See the module docstring."""
    if name not in ("switch", "shazeer"):
        return r.logits.new_zeros(())
    stats = balance_stats(name, r, n_experts)
    if batch_sum is not None:
        stats = batch_sum(stats)
    if rest is not None:
        stats = stats + rest
    return balance_from_stats(name, stats, n_experts)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -Σ p log p (nats)."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1).mean()
