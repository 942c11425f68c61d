"""A decoder-only Transformer whose FFN blocks may be MoE layers.

    model = Transformer(cfg.model)                   # cfg.model.vocab_size must be set
    out = model(idx, targets)                        # ModelOutput(logits, loss, aux_loss, z_loss, moe_stats)
    (out.loss + out.aux_loss + out.z_loss).backward(); opt.step(); model.update_router_biases()

The arithmetic is Llama's / Mixtral's in transformers, so an export is a renaming of weights:
RMSNorm computed in float32 (x · rsqrt(mean(x²) + eps), then weight · x cast back), rotary
embeddings with rotate_half on the two halves of each head and inv_freq = θ^(-2i/d_head), separate
q/k/v/o projections without biases, pre-norm blocks, a final norm, a tied or untied head.

Generation: `forward(idx, cache=KVCache(...))` appends this call's keys/values and attends to the
past ones (positions continue from cache.pos).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, moe_layer_ids
from . import gemm, lm_loss
from .moe import FeedForward, MoELayer, MoEStats


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]  # (B, T, V); None when the loss was fused (lm_loss.fused_applies)
    loss: Optional[torch.Tensor]  # mean cross-entropy, or None without targets
    # The papers' convention (Shazeer 2017's w, Switch's 0.01, ST-MoE's z-loss 0.001; tensor2tensor
    # and mesh-tensorflow add the layers' losses): each MoE layer's loss times the coefficient,
    # SUMMED over the MoE layers - so a coefficient copied from a paper means what it meant there.
    aux_loss: torch.Tensor  # Σ over MoE layers of balance_coef · that layer's balance loss (0 if none)
    z_loss: torch.Tensor  # Σ over MoE layers of z_loss_coef · that layer's router z-loss (0 if none)
    moe_stats: list[MoEStats] = field(default_factory=list)  # one per MoE layer, in layer order


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """cos/sin tables for positions [start, start + T) (Llama's default rope)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, start: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + T, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd), cos/sin (T, hd)."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Past keys and values per layer, for incremental decoding. `pos` = tokens seen so far;
    `moe_kept`: the causal capacity counts of MoE layers that have a capacity limit."""

    def __init__(self, n_layers: int):
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * n_layers
        self.pos = 0
        # MoE layers with a capacity limit: (B, E) assignments kept so far per sequence and expert
        self.moe_kept: dict[int, torch.Tensor] = {}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, std: float, out_std: float):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.q_proj = gemm.Linear(d, d, bias=False)
        self.k_proj = gemm.Linear(d, d, bias=False)
        self.v_proj = gemm.Linear(d, d, bias=False)
        self.o_proj = gemm.Linear(d, d, bias=False)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        B, T, d = x.shape
        shape = (B, T, self.n_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            if cache.layers[layer] is not None:
                pk, pv = cache.layers[layer]
                past = pk.shape[2]
                k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
            cache.layers[layer] = (k, v)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # NOTE: is_causal aligns the mask top-left; with a past, queries sit at the bottom
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)  # residual projections (GPT-2 / nanoGPT)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, std, out_std)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = layer in moe_layer_ids(cfg)
        if self.is_moe:
            self.mlp: nn.Module = MoELayer(cfg.d_model, cfg.ffn_hidden, cfg.activation, cfg.moe, std, out_std,
                                           seq_len=cfg.seq_len)
        else:
            self.mlp = FeedForward(cfg.d_model, cfg.ffn_hidden, cfg.activation, std, out_std)

    def forward(self, x, cos, sin, cache=None, layer=0) -> tuple[torch.Tensor, Optional[MoEStats]]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, stats = self.mlp(h, cache, layer)
            return x + y, stats
        return x + self.mlp(h), None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (the trainer takes it from the data folder)")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed_tokens.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_theta)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = gemm.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> ModelOutput:
        B, T = idx.shape
        x = self.embed_tokens(idx)
        start = cache.pos if cache is not None else 0
        cos, sin = self.rotary(start, T, x.dtype)
        stats: list[MoEStats] = []
        for i, block in enumerate(self.layers):
            # NOTE: the index matters to a KV cache only; without one it is left out, so that
            # torch.compile's per-block graphs (training.step.compile_model) do not specialise on it
            x, s = block(x, cos, sin, cache, i) if cache is not None else block(x, cos, sin)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        logits = loss = None
        if lm_loss.fused_applies(x, targets):  # CPU training: head + loss fused, no logits kept
            loss = lm_loss.linear_cross_entropy(x, self.head_weight, targets)
        else:
            logits = gemm.linear(x, self.head_weight)
            if targets is not None:
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        if stats:
            aux = torch.stack([s.balance_loss for s in stats]).sum()  # per-layer coefficients, summed
            z = torch.stack([s.z_loss for s in stats]).sum()
        else:
            aux = z = x.new_zeros((), dtype=torch.float32)
        return ModelOutput(logits, loss, aux, z, stats)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """After each optimizer step: sigmoid_bias routers move their bias toward balance."""
        for block in self.layers:
            if block.is_moe and hasattr(block.mlp.router, "update_bias"):
                block.mlp.router.update_bias()

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in block order (that of ModelOutput.moe_stats)."""
        return [b.mlp for b in self.layers if b.is_moe]

    def moe_layer_ids(self) -> list[int]:
        """The indices of the blocks whose FFN is an MoE layer (config.moe_layer_ids: the rule)."""
        return [i for i, b in enumerate(self.layers) if b.is_moe]

    def num_params(self) -> int:
        """Total parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())
