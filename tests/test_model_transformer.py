"""The Transformer: the same function as transformers' Llama / Mixtral given the same weights (the
independent reference for rotary embeddings, RMSNorm, attention and the Mixtral MoE block), the
KV cache, the init the fair comparison relies on, and the forward contract."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lm.config import ModelConfig, MoEConfig
from moe_lm.model.moe import MoEStats
from moe_lm.model.transformer import ModelOutput, Transformer



def small_cfg(moe: MoEConfig | None = None, **kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, ffn_hidden=24, seq_len=16, rope_theta=500.0,
                norm_eps=1e-5, init_std=0.1)
    base.update(kw)
    return ModelConfig(moe=moe, **base)


def randomise_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)


def hf_state_dict(model: Transformer) -> dict:
    """Our weights under transformers' Llama/Mixtral names: a renaming (and the experts' transpose)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("mlp.router.weight"):
            k = k.replace("mlp.router.weight", "mlp.gate.weight")
        elif k.endswith("mlp.experts.w_gate_up"):
            k, v = k.replace("w_gate_up", "gate_up_proj"), v.transpose(1, 2)
        elif k.endswith("mlp.experts.w_down"):
            k, v = k.replace("w_down", "down_proj"), v.transpose(1, 2)
        out[k if k.startswith("lm_head") else f"model.{k}"] = v
    if model.lm_head is None:
        out["lm_head.weight"] = model.embed_tokens.weight
    return out


def hf_common(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                rms_norm_eps=cfg.norm_eps, max_position_embeddings=64, tie_word_embeddings=cfg.tie_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


@pytest.mark.parametrize("tie", [False, True])
def test_dense_model_equals_transformers_llama_with_the_same_weights(tie):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = small_cfg(None, tie_embeddings=tie)
    ours = Transformer(cfg).eval()
    randomise_norms(ours)
    hf = LlamaForCausalLM(LlamaConfig(**hf_common(cfg), attention_bias=False, mlp_bias=False)).eval()
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_moe_model_with_softmax_top2_equals_transformers_mixtral_with_the_same_weights():
    pytest.importorskip("transformers")
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = small_cfg(MoEConfig(n_experts=4, top_k=2, router="softmax_topk"))
    ours = Transformer(cfg).eval()
    randomise_norms(ours)
    with torch.no_grad():
        for layer in ours.moe_layers():
            layer.router.weight.normal_(std=1.0)
    hf = MixtralForCausalLM(MixtralConfig(**hf_common(cfg), num_local_experts=4, num_experts_per_tok=2)).eval()
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_forward_contract_logits_loss_and_one_stats_per_moe_layer_in_order():
    torch.manual_seed(0)
    cfg = small_cfg(MoEConfig(n_experts=4, top_k=2, every=2), n_layers=4)
    model = Transformer(cfg)
    idx = torch.randint(0, 61, (3, 16))
    out = model(idx, idx)
    with torch.no_grad():  # inference: logits kept (training on a CPU fuses head and loss: none)
        logits = model(idx, idx).logits
    assert isinstance(out, ModelOutput) and out.logits is None and logits.shape == (3, 16, 61)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), idx.reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert [b.is_moe for b in model.layers] == [False, True, False, True]  # i % every == every - 1
    assert len(out.moe_stats) == 2 and all(isinstance(s, MoEStats) for s in out.moe_stats)
    s = out.moe_stats[0]
    assert s.load.shape == (4,) and s.load.sum() == 3 * 16 * 2 and s.importance.sum().item() == pytest.approx(48)
    assert float(s.dropped_frac) == 0.0 and 0 < float(s.entropy) <= math.log(4)
    assert model(idx).loss is None
    dense = Transformer(small_cfg(None))(idx, idx)
    assert dense.moe_stats == [] and float(dense.aux_loss) == 0.0 and float(dense.z_loss) == 0.0
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_vocab_size_must_be_set():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(small_cfg(None, vocab_size=None))


def test_kv_cache_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    model = Transformer(small_cfg(MoEConfig(n_experts=4, top_k=2))).eval()
    idx = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache()
        parts = [model(idx[:, :5], cache=cache).logits, model(idx[:, 5:9], cache=cache).logits]
        parts += [model(idx[:, t:t + 1], cache=cache).logits for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 12


def test_init_experts_match_the_dense_ffn_std_and_residual_projections_are_scaled():
    """Each expert matrix has the std of the matching dense FFN matrix (not d^-0.5), and the
    residual projections (o_proj, down) have init_std / sqrt(2 · n_layers)."""
    torch.manual_seed(0)
    L, std = 4, 0.02
    moe = Transformer(ModelConfig(vocab_size=100, d_model=128, n_layers=L, n_heads=4, ffn_hidden=256,
                                  init_std=std, moe=MoEConfig(n_experts=8, top_k=2)))
    dense = Transformer(ModelConfig(vocab_size=100, d_model=128, n_layers=L, n_heads=4, ffn_hidden=512,
                                    init_std=std, moe=None))
    out_std = std / math.sqrt(2 * L)

    def close(t, target):
        assert t.std().item() == pytest.approx(target, rel=0.03)

    ex = moe.layers[0].mlp.experts
    mlp = dense.layers[0].mlp
    close(ex.w_gate_up, std), close(mlp.gate_proj.weight, std), close(mlp.up_proj.weight, std)
    close(ex.w_down, out_std), close(mlp.down_proj.weight, out_std)
    close(moe.layers[0].self_attn.o_proj.weight, out_std), close(moe.layers[0].self_attn.q_proj.weight, std)
    close(moe.embed_tokens.weight, std), close(moe.lm_head.weight, std)
    close(moe.layers[0].mlp.router.weight, std)


def test_tied_head_shares_the_embedding():
    model = Transformer(small_cfg(None, tie_embeddings=True))
    assert model.lm_head is None and model.head_weight is model.embed_tokens.weight
