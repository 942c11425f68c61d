"""Auxiliary router losses, each computed for ONE MoE layer; the model sums the layers' losses, each
times its coefficient (the papers' convention: a coefficient is per layer).

NOTE: per layer on purpose. Pooling the loads of all layers before the loss scores "balanced"
when layer 1 sends everything to expert 0 and layer 2 everything to expert 1.

- shazeer_loss: Shazeer et al. 2017, w·CV(Importance)² + w·CV(Load)², Load from the smooth
  estimator of Appendix A (`smooth_load`).
- switch_loss: Switch Transformer, N · Σ_i f_i · P_i (= 1 at perfect balance, N when collapsed).
- z_loss: ST-MoE router z-loss, mean over tokens of logsumexp(logits)².
Coefficients are applied by the caller (the MoE layer).

Under torchrun each rank sees its share of the batch; `batch_sum` (distributed.sum_over_ranks, a
differentiable sum over the ranks) turns the sums over tokens into the global batch's, so every
rank computes the single-process loss. None = this process holds the whole batch.
"""

from __future__ import annotations

import math

import torch

from .routing import Routing


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


def shazeer_loss(r: Routing, n_experts: int, batch_sum=None) -> torch.Tensor:
    """CV(Importance)² + CV(Load)² (unweighted; the paper's w_importance = w_load = the coefficient)."""
    if r.noisy_logits is None or r.noise_std is None:
        raise ValueError("the shazeer balance loss needs the noisy_topk router")
    load = smooth_load(r.logits, r.noisy_logits, r.noise_std, r.top_k).sum(dim=0)
    imp = importance(r, n_experts)
    if batch_sum is not None:
        imp, load = batch_sum(torch.cat([imp, load.to(imp.dtype)])).split(n_experts)
    return cv_squared(imp) + cv_squared(load)


def switch_loss(r: Routing, n_experts: int, batch_sum=None) -> torch.Tensor:
    """N · Σ_i f_i · P_i: f_i = share of the router's assignments that went to expert i (counted,
    no gradient), P_i = mean router probability of expert i (the gradient's path)."""
    counts = torch.bincount(r.expert, minlength=n_experts).float()
    if batch_sum is None:
        P = r.probs.mean(dim=0)
    else:  # one sum over the ranks: counts, Σ_tokens p, and the token count
        n_tokens = counts.new_full((1,), r.probs.shape[0])
        counts, p_sum, n_tokens = batch_sum(torch.cat([counts, r.probs.sum(dim=0), n_tokens])).split(
            [n_experts, n_experts, 1])
        counts, P = counts.detach(), p_sum / n_tokens.detach()
    f = counts / counts.sum().clamp_min(1.0)
    return n_experts * (f * P).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)²."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def balance_loss(name: str, r: Routing, n_experts: int, batch_sum=None) -> torch.Tensor:
    if name == "switch":
        return switch_loss(r, n_experts, batch_sum)
    if name == "shazeer":
        return shazeer_loss(r, n_experts, batch_sum)
    return r.logits.new_zeros(())


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -Σ p log p (nats)."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1).mean()
