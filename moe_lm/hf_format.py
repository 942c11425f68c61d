"""The transformers folder format that `export` writes and `loading` reads back: which
transformers architecture computes exactly a model, and where each of its tensors lives in ours.

    target = hf_target(cfg.model)              # HFTarget: architecture, model_type, config.json
    tensors = hf_state_dict(model, target)     # transformers' names and layout, float32
    load_hf_state_dict(model, tensors, target, source)   # and back, exactly

Which architecture computes exactly our function (`hf_target`):

    dense, swiglu                                          -> LlamaForCausalLM
    softmax_topk (top_k >= 2) or noisy_topk, swiglu,
      every MoE block, no shared experts                   -> MixtralForCausalLM
    softmax_topk / noisy_topk / switch, swiglu, with
      shared experts, or MoE every n-th block, or
      weights not renormalised (switch, softmax top-1)     -> Qwen2MoeForCausalLM

Qwen2-MoE scales its shared expert by sigmoid(x · g): exporting g = 0 gives exactly 0.5, and the
shared expert's down projection is stored doubled (exact in floating point), so the product is our
plain always-on sum. Everything else (relu/gelu FFNs, expert_choice, sigmoid_bias, capacity
limits) has no exact counterpart and is refused with ExportError - never exported approximately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import ModelConfig, moe_layer_ids
from .errors import CheckpointError, ExportError

FORMAT = 1
META = "moe_lm.json"  # our config, the step and the files' sha256, beside transformers' files
EOT = "<|endoftext|>"


@dataclass
class HFTarget:
    """The transformers architecture that computes exactly a model config's function."""

    architecture: str  # e.g. "MixtralForCausalLM"
    model_type: str  # e.g. "mixtral"
    config: dict  # config.json, without the token ids


# ---------------------------------------------------------------------------------------------
# which architecture


def hf_target(cfg: ModelConfig) -> HFTarget:
    """The architecture for `cfg`, or ExportError naming every setting that none matches exactly."""
    problems = []
    if cfg.activation != "swiglu":
        problems.append(f"model.activation = {cfg.activation} (Llama, Mixtral and Qwen2-MoE FFNs are gated "
                        "SiLU: only swiglu exports)")
    moe = cfg.moe
    if moe is not None:
        if moe.router == "expert_choice":
            problems.append("model.moe.router = expert_choice (experts pick tokens across the whole batch; every "
                            "transformers MoE routes each token on its own)")
        elif moe.router == "sigmoid_bias":
            problems.append("model.moe.router = sigmoid_bias (Mixtral and Qwen2-MoE route by softmax)")
        if moe.capacity_factor is not None and moe.router != "expert_choice":
            problems.append(f"model.moe.capacity_factor = {moe.capacity_factor} (a capacity limit drops a "
                            "sequence's later tokens once an expert is full; transformers' MoE blocks are dropless)")
    if problems:
        raise ExportError("no transformers architecture computes this model exactly: " + "; ".join(problems),
                          "train with model.activation=swiglu, a softmax_topk / noisy_topk / switch router and "
                          "model.moe.capacity_factor=null to export")

    d = cfg.d_model
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=d, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, head_dim=d // cfg.n_heads,
        hidden_act="silu", intermediate_size=cfg.ffn_hidden, max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, attention_dropout=0.0,
        use_cache=True, dtype="float32",
    )
    if moe is None:
        return HFTarget("LlamaForCausalLM", "llama",
                        dict(common, attention_bias=False, mlp_bias=False, pretraining_tp=1))
    # Are the kept weights renormalised to sum to 1? softmax over the kept noisy_topk logits is the
    # renormalised top-k of the full softmax; softmax_topk keeps p at top_k = 1; switch keeps p.
    renormalised = moe.router == "noisy_topk" or (moe.router == "softmax_topk" and moe.top_k > 1)
    if renormalised and moe.n_shared_experts == 0 and moe.every == 1:
        return HFTarget("MixtralForCausalLM", "mixtral", dict(
            common, num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k, router_jitter_noise=0.0,
            sliding_window=None, output_router_logits=False, router_aux_loss_coef=hf_aux_coef(cfg)))
    return HFTarget("Qwen2MoeForCausalLM", "qwen2_moe", dict(
        common, num_experts=moe.n_experts, num_experts_per_tok=moe.top_k, norm_topk_prob=renormalised,
        moe_intermediate_size=cfg.ffn_hidden, shared_expert_intermediate_size=moe.n_shared_experts * cfg.ffn_hidden,
        decoder_sparse_step=moe.every, mlp_only_layers=[], qkv_bias=False, use_sliding_window=False,
        sliding_window=None, max_window_layers=cfg.n_layers, output_router_logits=False,
        router_aux_loss_coef=hf_aux_coef(cfg)))


def hf_aux_coef(cfg: ModelConfig) -> float:
    """transformers' router_aux_loss_coef for our balance_coef. Ours is per MoE layer, the layers'
    losses summed; transformers computes ONE loss over all layers' router logits pooled (about the
    mean of the layers' losses) and multiplies it by its coefficient - so the same total weight is
    balance_coef x the number of MoE layers. Only fine-tuning with output_router_logits reads it."""
    return cfg.moe.balance_coef * len(moe_layer_ids(cfg))


# ---------------------------------------------------------------------------------------------
# the weights: every transformers tensor is a view of one of ours (times a scale), or a constant


@dataclass
class _Entry:
    view: Optional[torch.Tensor]  # a view into our model's parameter storage; None for a constant
    scale: float = 1.0  # stored tensor = view * scale
    const: Optional[torch.Tensor] = None  # for view None: the exact tensor transformers expects


def _weight_map(model, target: HFTarget) -> dict[str, _Entry]:
    """transformers' on-disk tensor names -> where each lives in `model` (a Transformer)."""
    sd = model.state_dict()  # detached tensors sharing the parameters' storage
    m: dict[str, _Entry] = {"model.embed_tokens.weight": _Entry(sd["embed_tokens.weight"]),
                            "model.norm.weight": _Entry(sd["norm.weight"])}
    if model.lm_head is not None:
        m["lm_head.weight"] = _Entry(sd["lm_head.weight"])
    mixtral = target.model_type == "mixtral"
    for i, block in enumerate(model.layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj"):
            m[f"{hf}{name}.weight"] = _Entry(sd[f"{ours}{name}.weight"])
        if not block.is_moe:
            for name in ("gate_proj", "up_proj", "down_proj"):
                m[f"{hf}mlp.{name}.weight"] = _Entry(sd[f"{ours}mlp.{name}.weight"])
            continue
        router = block.mlp.router
        router_w = sd[f"{ours}mlp.router.{'w_gate' if hasattr(router, 'w_gate') else 'weight'}"]
        h = block.mlp.experts.hidden
        w_in, w_down = sd[f"{ours}mlp.experts.w_gate_up"], sd[f"{ours}mlp.experts.w_down"]  # (E, d, 2h), (E, h, d)
        moe = f"{hf}{'block_sparse_moe' if mixtral else 'mlp'}."
        m[f"{moe}gate.weight"] = _Entry(router_w)
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for e in range(w_in.shape[0]):
            m[f"{moe}experts.{e}.{names[0]}.weight"] = _Entry(w_in[e, :, :h].t())  # (h, d)
            m[f"{moe}experts.{e}.{names[1]}.weight"] = _Entry(w_in[e, :, h:].t())
            m[f"{moe}experts.{e}.{names[2]}.weight"] = _Entry(w_down[e].t())  # (d, h)
        if mixtral:
            continue
        d = w_in.shape[1]
        # sigmoid(0) = 0.5 exactly, so a zero gate and a doubled down projection add our plain sum.
        m[f"{moe}shared_expert_gate.weight"] = _Entry(None, const=torch.zeros(1, d))
        if block.mlp.shared_experts is not None:
            for name, scale in (("gate_proj", 1.0), ("up_proj", 1.0), ("down_proj", 2.0)):
                m[f"{moe}shared_expert.{name}.weight"] = _Entry(sd[f"{ours}mlp.shared_experts.{name}.weight"], scale)
        else:  # a zero-width shared expert adds exactly 0
            for name, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                m[f"{moe}shared_expert.{name}.weight"] = _Entry(None, const=torch.zeros(shape))
    return m


def hf_state_dict(model, target: Optional[HFTarget] = None) -> dict[str, torch.Tensor]:
    """Our model's weights under transformers' on-disk names and layout (contiguous float32 copies)."""
    target = target or hf_target(model.cfg)
    out = {}
    for name, e in _weight_map(model, target).items():
        t = e.const if e.view is None else e.view * e.scale
        out[name] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def load_hf_state_dict(model, tensors: dict[str, torch.Tensor], target: HFTarget, source: str) -> None:
    """Copy transformers-named `tensors` into `model`; CheckpointError unless they fit exactly."""
    entries = _weight_map(model, target)
    missing = sorted(set(entries) - set(tensors))
    unexpected = sorted(set(tensors) - set(entries))
    if missing or unexpected:
        what = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
        raise CheckpointError(f"{source} does not fit its moe_lm.json config ({'; '.join(what)})",
                              "export the run again with `moe-lm export`")
    with torch.no_grad():
        for name, e in entries.items():
            t = tensors[name]
            want = e.const if e.view is None else e.view
            if tuple(t.shape) != tuple(want.shape):
                raise CheckpointError(f"{source}: {name} has shape {tuple(t.shape)}, expected {tuple(want.shape)}",
                                      "export the run again with `moe-lm export`")
            if e.view is None:
                if not torch.equal(t.to(want.dtype), want):
                    raise CheckpointError(f"{source}: {name} is no longer {want.flatten()[:1].item():g} everywhere "
                                          "(changed after export?), so moe-lm cannot compute this model",
                                          "load it with transformers instead")
                continue
            e.view.copy_(t.to(e.view.dtype) / e.scale)
