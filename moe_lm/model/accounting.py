"""Parameter and FLOP counts, from the config alone (no model is built); the dense twin; `info`.

    param_counts(cfg.model)    -> {"total", "active", "embedding", "attention", "ffn", "experts", "router", ...}
    flops_per_token(cfg.model) -> {"total", "dense", "router", "matmul", "attention", "forward"}
    dense_twin(cfg)            -> the same Config with every MoE FFN replaced by a dense FFN of the
                                  active expert width (equal FLOPs per token, router excepted)
    dense_total(cfg)           -> a dense Config with as many total parameters as the MoE

Conventions (those of nanoGPT / PaLM / Chinchilla): training FLOPs = 3 × forward FLOPs (the
backward costs two forward's worth), a matmul with N weights costs 2N FLOPs per token forward,
attention scores and values cost 2·2·T·d per layer per token forward with T = seq_len (the full
context, as nanoGPT's estimate_mfu counts; a causal kernel could skip half). Embedding lookups,
norms, activations and softmaxes are not counted. Router FLOPs are reported apart: "dense" is
everything but the router, and equals the dense twin's "total" exactly.
"""

from __future__ import annotations

import copy
import json
from fractions import Fraction
from pathlib import Path
from typing import Optional

from ..config import Config, ModelConfig, config_warnings, moe_layer_ids
from ..errors import ConfigError


def _ffn_matrices(activation: str) -> int:
    """Weight matrices in one FFN of the given activation (SwiGLU has gate, up, down)."""
    return 3 if activation == "swiglu" else 2


def experts_per_token(m: ModelConfig) -> Fraction:
    """Routed experts each token visits on average: top_k, or capacity_factor for expert choice."""
    moe = m.moe
    if moe.router == "expert_choice":
        return Fraction(moe.capacity_factor).limit_denominator(10**6)
    return Fraction(moe.top_k)


def active_width(m: ModelConfig) -> Fraction:
    """The hidden width a token sees in an MoE FFN: routed experts + shared experts."""
    return (experts_per_token(m) + m.moe.n_shared_experts) * m.ffn_hidden


def router_params(m: ModelConfig) -> int:
    moe = m.moe
    return (2 if moe.router == "noisy_topk" else 1) * moe.n_experts * m.d_model


def param_counts(m: ModelConfig) -> dict:
    """Parameters by part. "active" = per token: everything but the routed experts a token does not
    visit (for expert choice, the mean experts per token, rounded)."""
    V = m.vocab_size or 0
    d, h, L = m.d_model, m.ffn_hidden, m.n_layers
    c = _ffn_matrices(m.activation)
    ffn_one = c * d * h
    moe_ids = set(moe_layer_ids(m))
    embedding = V * d
    head = 0 if m.tie_embeddings else V * d
    attention = L * 4 * d * d
    norms = L * 2 * d + d
    dense_ffn = (L - len(moe_ids)) * ffn_one
    experts = shared = router = 0
    active_experts = 0.0
    if m.moe is not None:
        n = len(moe_ids)
        experts = n * m.moe.n_experts * ffn_one
        shared = n * m.moe.n_shared_experts * ffn_one
        router = n * router_params(m)
        active_experts = float(n * experts_per_token(m) * ffn_one)
    total = embedding + head + attention + norms + dense_ffn + experts + shared + router
    active = embedding + head + attention + norms + dense_ffn + active_experts + shared + router
    return {"total": total, "active": int(round(active)), "embedding": embedding, "head": head,
            "attention": attention, "norms": norms, "dense_ffn": dense_ffn, "experts": experts,
            "shared_experts": shared, "router": router}


def flops_per_token(m: ModelConfig) -> dict:
    """Training FLOPs per token (forward + backward = 3 × forward). Keys: total (router
    included), dense (all but the router), router, matmul (weights, router excluded), attention
    (scores and values), forward (total / 3)."""
    V = m.vocab_size or 0
    d, h, L, T = m.d_model, m.ffn_hidden, m.n_layers, m.seq_len
    c = _ffn_matrices(m.activation)
    moe_ids = set(moe_layer_ids(m))
    fwd_matmul = Fraction(0)
    fwd_router = Fraction(0)
    for i in range(L):
        fwd_matmul += 2 * 4 * d * d  # q, k, v, o
        width = active_width(m) if i in moe_ids else h
        fwd_matmul += 2 * c * d * width
        if i in moe_ids:
            fwd_router += 2 * router_params(m)
    fwd_matmul += 2 * V * d  # the head (the embedding lookup is free)
    fwd_attention = Fraction(L * 2 * 2 * T * d)
    matmul, attention, router = 3 * fwd_matmul, 3 * fwd_attention, 3 * fwd_router
    dense = matmul + attention
    total = dense + router
    as_num = lambda f: int(f) if f.denominator == 1 else float(f)  # noqa: E731
    return {"total": as_num(total), "dense": as_num(dense), "router": as_num(router),
            "matmul": as_num(matmul), "attention": as_num(attention), "forward": as_num(total / 3)}


def dense_twin(cfg: Config) -> Config:
    """The same config with model.moe = None and model.ffn_hidden = the active expert width
    (top_k · ffn_hidden + n_shared · ffn_hidden; expert choice: capacity_factor experts per token).

    With moe.every > 1 the twin has one width for all layers: the mean of the MoE layers' active
    width and the dense layers' width, which keeps FLOPs per token equal when it is an integer
    (rounded otherwise). The name gets a "-dense" suffix."""
    m = cfg.model
    twin = copy.deepcopy(cfg)
    if m.moe is None:
        return twin
    n_moe = len(moe_layer_ids(m))
    width = (n_moe * active_width(m) + (m.n_layers - n_moe) * m.ffn_hidden) / m.n_layers
    twin.model.moe = None
    twin.model.ffn_hidden = max(1, int(round(width)))
    twin.name = f"{cfg.name}-dense"
    return twin


def dense_total(cfg: Config) -> Config:
    """A dense config with (to rounding) as many total parameters as the MoE: every FFN one dense
    FFN holding the MoE's FFN parameters (experts, shared experts and router) spread over the
    layers, its output matrices' learning rate scaled by twin width / its width (muP,
    train.ffn_out_lr_scale). The name gets a "-dense-total" suffix."""
    m = cfg.model
    out = copy.deepcopy(cfg)
    if m.moe is None:
        return out
    p = param_counts(m)
    ffn_params = p["dense_ffn"] + p["experts"] + p["shared_experts"] + p["router"]
    c = _ffn_matrices(m.activation)
    out.model.moe = None
    out.model.ffn_hidden = max(1, int(round(ffn_params / (c * m.d_model * m.n_layers))))
    # muP: the twin's tuned rate carries over to the wider FFN with its output matrix's rate scaled
    # by twin width / this width (at one shared rate it trailed the twin: docs/RESULTS.md)
    out.train.ffn_out_lr_scale = cfg.train.ffn_out_lr_scale * dense_twin(cfg).model.ffn_hidden / out.model.ffn_hidden
    out.name = f"{cfg.name}-dense-total"
    return out


def training_memory(cfg: Config) -> dict:
    """A rough training-memory estimate in bytes for fp32 AdamW: weights 4 + gradients 4 + Adam
    moments 8 bytes per parameter, plus activations kept for the backward of one micro-batch
    (per token and layer: ~10·d for attention and norms, the FFN's hidden activations (3 × the
    active width for SwiGLU, 2 × otherwise) plus the expert gather/scatter copies (2·d per routed
    expert), and H·T attention probabilities when the math SDPA kernel is used), plus the logits
    and their gradient (2·V)."""
    m, t = cfg.model, cfg.train
    p = param_counts(m)
    states = 16 * p["total"]
    tokens = (t.batch_size // t.grad_accum) * m.seq_len
    per_token = 0.0
    moe_ids = set(moe_layer_ids(m))
    for i in range(m.n_layers):
        per_token += 10 * m.d_model + m.n_heads * m.seq_len
        width = float(active_width(m)) if i in moe_ids else m.ffn_hidden
        per_token += (3 if m.activation == "swiglu" else 2) * width
        if i in moe_ids:
            per_token += 2 * m.d_model * float(experts_per_token(m)) + 2 * m.moe.n_experts
    per_token += 2 * (m.vocab_size or 0)
    activations = 4 * tokens * per_token
    return {"states": states, "activations": int(activations), "total": int(states + activations),
            "tokens_per_micro_batch": tokens}


DEFAULT_VOCAB = 8192  # what `moe-lm prepare` trains when no --vocab-size is given (data.prepare.DEFAULT_VOCAB)


def resolve_vocab_size(cfg: Config, vocab_size: Optional[int] = None) -> tuple[int, str]:
    """(vocabulary size, where it came from): --vocab-size, else model.vocab_size, else the data
    folder's meta.json, else data.vocab_size (what `moe-lm prepare -c <config>` will train), else
    DEFAULT_VOCAB - so `info` and `bench train` see the demo's model before `prepare` has run.
    model.vocab_size comes before the data folder because it is the size the model is built
    with (train refuses a data folder whose tokenizer differs)."""
    if vocab_size is not None:
        return int(vocab_size), "--vocab-size"
    if cfg.model.vocab_size is not None:
        other = cfg.data.vocab_size
        if other is not None and other != cfg.model.vocab_size:
            return int(cfg.model.vocab_size), (f"model.vocab_size (data.vocab_size is {other}: `moe-lm prepare -c "
                                               "<config>` would train that, and train would refuse the folder)")
        return int(cfg.model.vocab_size), "model.vocab_size"
    meta = Path(cfg.data.dir) / "meta.json"
    if meta.is_file():
        try:
            return int(json.loads(meta.read_text())["vocab_size"]), f"the tokenizer of {cfg.data.dir}"
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{meta} has no readable vocab_size", "re-run moe-lm prepare, or set model.vocab_size=N") from exc
    if cfg.data.vocab_size is not None:
        return int(cfg.data.vocab_size), (f"data.vocab_size ({cfg.data.dir} is not prepared yet; "
                                          "`moe-lm prepare -c <config>` trains this vocabulary)")
    return DEFAULT_VOCAB, (f"the default of `moe-lm prepare`: {cfg.data.dir} is not prepared yet and model.vocab_size "
                           "and data.vocab_size are null; set model.vocab_size=N for another")


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def render_info(cfg: Config, vocab_size: Optional[int] = None, console=None) -> None:
    """`moe-lm info`: total vs active parameters, FLOPs per token, the dense twin, memory."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size, vocab_from = resolve_vocab_size(cfg, vocab_size)
    m = cfg.model
    rows = [("model", cfg)]
    if m.moe is not None:
        rows += [("dense twin (equal active FLOPs)", dense_twin(cfg)), ("dense, equal total params", dense_total(cfg))]
    table = Table(title=f"{cfg.name}: vocab {m.vocab_size}, d_model {m.d_model}, {m.n_layers} layers, seq_len {m.seq_len}")
    for col in ("", "ffn width", "total params", "active params", "train FLOPs/token", "router FLOPs/token", "train memory"):
        table.add_column(col, justify="left" if col == "" else "right")
    for label, c in rows:
        p, f, mem = param_counts(c.model), flops_per_token(c.model), training_memory(c)
        if c.model.moe is not None:
            mo = c.model.moe
            k = f"cf {mo.capacity_factor:g}" if mo.router == "expert_choice" else f"top-{mo.top_k}"
            width = f"{mo.n_experts}×{c.model.ffn_hidden} ({k}" + (f" +{mo.n_shared_experts} shared)" if mo.n_shared_experts else ")")
        else:
            width = str(c.model.ffn_hidden)
        table.add_row(label, width, _fmt(p["total"]), _fmt(p["active"]), _fmt(f["total"]), _fmt(f["router"]),
                      _fmt_bytes(mem["total"]))
    console.print(table)
    console.print(f"vocabulary: {m.vocab_size:,} tokens, from {vocab_from}", markup=False, highlight=False,
                  soft_wrap=True)
    mem = training_memory(cfg)
    console.print(f"memory: {_fmt_bytes(mem['states'])} weights+grads+AdamW (fp32), ~{_fmt_bytes(mem['activations'])} "
                  f"activations for {mem['tokens_per_micro_batch']:,} tokens per micro-batch (rough estimate)",
                  markup=False, highlight=False)
    if m.moe is not None:
        console.print(f"routing: {m.moe.router}, balance loss {m.moe.balance_loss} (coef {m.moe.balance_coef:g}), "
                      f"z-loss coef {m.moe.z_loss_coef:g}, capacity "
                      f"{'dropless' if m.moe.capacity_factor is None else m.moe.capacity_factor}",
                      markup=False, highlight=False)
    for warning in config_warnings(cfg):
        console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
