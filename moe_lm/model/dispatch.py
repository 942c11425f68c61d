"""Dispatch and combine: run flat assignments (token, expert, weight) through stacked experts.

    y = moe_ffn(x, token, expert, weight, experts)     # x (T, d) -> y (T, d)

    y[t] = Σ over assignments a with token[a] = t of  weight[a] · expert_{expert[a]}(x[t])

Sort the assignments by expert, gather the rows, run each expert on its contiguous slice, scale by
the weight and index_add back. Tokens with no assignment (capacity drops) get 0: the residual
stream carries them. Never a loop over tokens, no one-hot (T, E, C) tensors.
"""

from __future__ import annotations

import torch

PATHS = ("loop",)


def sort_by_expert(token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, n_experts: int):
    """-> token, weight sorted by expert (stable), and counts (E,) of assignments per expert."""
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=n_experts)
    return token[order], weight[order], counts


def moe_ffn(x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, experts,
            path: str | None = None) -> torch.Tensor:
    token_s, weight_s, counts = sort_by_expert(token, expert, weight, experts.n_experts)
    xs = x.index_select(0, token_s)
    # NOTE: one host sync per layer for the slice sizes.
    sizes = counts.tolist()
    outs = []
    start = 0
    for e, n in enumerate(sizes):
        if n:
            outs.append(experts.expert_forward(e, xs[start:start + n]))
        start += n
    if not outs:
        return torch.zeros_like(x)
    ys = torch.cat(outs) * weight_s.to(x.dtype).unsqueeze(1)
    return torch.zeros_like(x).index_add(0, token_s, ys.to(x.dtype))
