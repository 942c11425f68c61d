"""Dispatch and combine: run flat assignments (token, expert, weight) through stacked experts.

    y = moe_ffn(x, token, expert, weight, experts)     # x (T, d) -> y (T, d)

    y[t] = Σ over assignments a with token[a] = t of  weight[a] · expert_{expert[a]}(x[t])

Sort the assignments by expert, run each expert on its contiguous slice, scale by the weight and
index_add back. Tokens with no assignment (capacity drops) get 0: the residual stream carries
them. Never a loop over tokens, no one-hot (T, E, C) tensors.

Two paths, the same function (tests/test_model_dispatch.py checks both against a per-token
reference, outputs and gradients):

- "fused": a custom autograd Function looping over experts. Each expert gathers its rows by index,
  runs gate_up -> activation -> down, and index_adds its scaled output; the backward does the
  same walk with only the gathers/scatters it needs. Per-expert buffers stay small (on a CPU,
  glibc serves allocations under 32 MiB from its heap, while each larger one is a fresh mmap whose
  pages fault in at first touch - measured at ~50 ms per 128 MiB on the reference machine; see
  docs/PERFORMANCE.md), and it saves only each expert's pre-activation and output for the
  backward. Fastest measured on CPU for 8 and 64 experts.
- "grouped_mm": one gather, `torch.nn.functional.grouped_mm` (or `torch._grouped_mm`) for
  gate_up and down over all experts, autograd through torch's own ops, and no host sync. Used on
  CUDA with bf16 where this torch has it (real grouped GEMM kernels there); on a CPU torch runs it
  as a loop and it measured slower than "fused".

`choose_path` is that rule; `MoELayer.dispatch_path` overrides it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
PATHS = ("fused", "grouped_mm") if _grouped_mm is not None else ("fused",)


def sort_by_expert(token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, n_experts: int):
    """-> token (A,), weight (A,) sorted by expert (stable), and counts (E,) of assignments per expert."""
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=n_experts)
    return token[order], weight[order], counts


def choose_path(x: torch.Tensor) -> str:
    """The measured rule: grouped_mm on CUDA in bf16 where torch has it, else fused."""
    if x.device.type == "cuda" and _grouped_mm is not None and x.dtype == torch.bfloat16:
        return "grouped_mm"
    return "fused"


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
    token_s, weight_s, counts = sort_by_expert(token, expert, weight, experts.n_experts)
    path = path or choose_path(x)
    with torch.autocast(dev, enabled=False):
        if path == "grouped_mm":
            return _grouped_path(x, token_s, weight_s, counts, w_in, w_down, experts.activation)
        if path == "fused":
            # NOTE: one host sync per layer (the slice sizes); the grouped_mm path has none.
            return ExpertsFFN.apply(x, weight_s, w_in, w_down, token_s, counts.tolist(), experts.activation)
    raise ValueError(f"unknown dispatch path {path!r} (known: {', '.join(PATHS)})")


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


class ExpertsFFN(torch.autograd.Function):
    """The "fused" path. Inputs sorted by expert: token_s (A,), weight_s (A,), sizes (E ints).

    Forward, per expert e with rows R_e:   h_e = x[R_e] @ w_in[e];  y_e = act(h_e) @ w_down[e];
                                           out.index_add_(R_e, weight_e · y_e)
    Saved: h_e and y_e (unscaled) per expert - y_e gives dL/dweight = <g[R_e], y_e> without a matmul.
    """

    @staticmethod
    def forward(ctx, x, weight_s, w_in, w_down, token_s, sizes, activation):
        hid = w_down.shape[1]
        out = torch.zeros_like(x)
        hs, ys = [], []
        start = 0
        for e, n in enumerate(sizes):
            h = y = None
            if n:
                rows = token_s[start:start + n]
                h = torch.mm(x.index_select(0, rows), w_in[e])  # (n, 2h | h)
                y = torch.mm(_act(h, activation, hid), w_down[e])  # (n, d)
                out.index_add_(0, rows, y * weight_s[start:start + n, None].to(y.dtype))
            hs.append(h)
            ys.append(y)
            start += n
        ctx.sizes, ctx.activation = sizes, activation
        ctx.save_for_backward(x, weight_s, w_in, w_down, token_s, *hs, *ys)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight_s, w_in, w_down, token_s, *saved = ctx.saved_tensors
        E = len(ctx.sizes)
        hs, ys = saved[:E], saved[E:]
        act, hid = ctx.activation, w_down.shape[1]
        need_x, need_w, need_win, need_wd = ctx.needs_input_grad[:4]
        g = g.contiguous()
        dx = torch.zeros_like(x) if need_x else None
        dw = torch.empty(weight_s.shape, dtype=g.dtype, device=g.device) if need_w else None
        dwin = torch.zeros_like(w_in) if need_win else None
        dwd = torch.zeros_like(w_down) if need_wd else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            if n == 0:
                continue
            rows = token_s[start:start + n]
            h = hs[e]
            ge = g.index_select(0, rows)  # (n, d)
            if need_w:
                torch.linalg.vecdot(ge, ys[e], out=dw[start:start + n])
            ge.mul_(weight_s[start:start + n, None].to(ge.dtype))  # now dL/dy_e
            s = F.silu(h[:, :hid]) if act == "swiglu" else None
            if need_wd:
                a = s * h[:, hid:] if s is not None else _act(h, act, hid)
                torch.mm(a.t(), ge, out=dwd[e])
            if need_x or need_win:
                dh = _act_backward(h, torch.mm(ge, w_down[e].t()), act, hid, s)
                if need_win:
                    torch.mm(x.index_select(0, rows).t(), dh, out=dwin[e])
                if need_x:
                    dx.index_add_(0, rows, torch.mm(dh, w_in[e].t()))
            start += n
        if dw is not None:
            dw = dw.to(weight_s.dtype)
        return dx, dw, dwin, dwd, None, None, None


def _grouped_path(x, token_s, weight_s, counts, w_in, w_down, activation) -> torch.Tensor:
    """The "grouped_mm" path: autograd through torch's grouped matmul, no host sync."""
    hid = w_down.shape[1]
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
