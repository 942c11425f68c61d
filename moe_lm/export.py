"""Export a trained model as a Hugging Face `transformers` folder, and read such a folder back.

    export_hf("runs/tiny-moe", "exports/tiny-moe")   # -> ExportResult (architecture, files, ...)
    loaded = load_hf_folder("exports/tiny-moe")      # -> loading.Loaded, as load_model gives

The folder loads offline with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`:

    config.json              the architecture and its hyper-parameters
    model.safetensors        float32 weights, experts stored one per module (the on-disk layout
                             that transformers 5.x fuses into (E, 2h, d) / (E, d, h) when loading)
    generation_config.json   bos = eos = pad = <|endoftext|>
    tokenizer.json           the run's byte-level BPE, plus a post-processor that puts <|endoftext|>
                             before the text: `moe-lm generate`'s prompt convention (the document
                             start seen in training), so AutoTokenizer(prompt) + model.generate gives
                             the tokens `moe-lm generate --temperature 0` gives
    tokenizer_config.json    PreTrainedTokenizerFast, bos = eos <|endoftext|>, no added prefix space
    moe_lm.json              the resolved moe-lm config, the step and the files' sha256, so that
                             `moe-lm eval DIR` and `generate DIR` read the export back exactly

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

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .config import Config, ModelConfig, from_dict, to_dict
from .errors import CheckpointError, ConfigError, ExportError

FORMAT = 1
META = "moe_lm.json"
EOT = "<|endoftext|>"


@dataclass
class HFTarget:
    """The transformers architecture that computes exactly a model config's function."""

    architecture: str  # e.g. "MixtralForCausalLM"
    model_type: str  # e.g. "mixtral"
    config: dict  # config.json, without the token ids


@dataclass
class ExportResult:
    out_dir: Path
    architecture: str
    checkpoint: Path  # the checkpoint exported
    step: int
    n_params: int
    files: list[str] = field(default_factory=list)


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
    moe = cfg.moe
    n_moe = sum(1 for i in range(cfg.n_layers) if i % moe.every == moe.every - 1)
    return moe.balance_coef * n_moe


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


# ---------------------------------------------------------------------------------------------
# write


def _tokenizer_config(seq_len: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "pad_token": EOT, "bos_token": EOT,
            "unk_token": None, "model_max_length": seq_len, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False}


def write_hf_tokenizer(tokenizer_path: Path, out: Path) -> int:
    """The run's tokenizer.json, with a post-processor that puts <|endoftext|> before every text
    (`moe-lm generate`'s prompt convention: the document start the model saw in training), so that
    `AutoTokenizer(prompt)` gives the ids `moe-lm generate` feeds the model. Vocabulary, merges,
    pre-tokenizer and decoder are the run's, unchanged. Returns the end-of-text id."""
    from tokenizers import Tokenizer, processors

    from .data.tokenizer import load_tokenizer

    eot = load_tokenizer(tokenizer_path).token_to_id(EOT)  # checks it (DataError when damaged)
    tok = Tokenizer.from_file(str(tokenizer_path))  # as stored: load_tokenizer's runtime settings left out
    bos = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, eot)])
    tok.post_processor = bos if tok.post_processor is None else processors.Sequence([tok.post_processor, bos])
    tok.save(str(out))
    return eot


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # folders cannot be fsync'ed everywhere; the renames stay atomic
        pass
    finally:
        os.close(fd)


def export_hf(path: Path | str, out_dir: Path | str, overwrite: bool = False) -> ExportResult:
    """A run folder (its latest checkpoint) or checkpoint folder -> a transformers folder at `out_dir`."""
    from .loading import load_model

    _check_out(Path(out_dir), overwrite)
    loaded = load_model(path, device="cpu")
    return write_hf_folder(loaded.model, loaded.cfg, loaded.tokenizer_path, out_dir, overwrite=overwrite,
                           step=loaded.step, source=loaded.checkpoint)


def _check_out(out_dir: Path, overwrite: bool) -> None:
    from .checks import out_folder

    out_folder("--out", out_dir)  # not a file, nor under one
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"--out {out_dir} exists and is not empty", "pass --overwrite to replace it")


def write_hf_folder(model, cfg: Config, tokenizer_path: Path, out_dir: Path | str, overwrite: bool = False,
                    step: int = 0, source: Path | str = "") -> ExportResult:
    """Write `model` (a Transformer of `cfg.model`) and its tokenizer as a transformers folder.

    Written into a temporary folder next to `out_dir`, then renamed into place: a failure or a
    kill leaves no half-written export. An existing non-empty `out_dir` needs `overwrite`.
    """
    from safetensors.torch import save_file

    from .data.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    target = hf_target(cfg.model)
    load_tokenizer(tokenizer_path)  # a damaged tokenizer is refused before anything is written
    tensors = hf_state_dict(model, target)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        eot = write_hf_tokenizer(tokenizer_path, tmp / "tokenizer.json")
        config = dict(target.config, architectures=[target.architecture], model_type=target.model_type,
                      bos_token_id=eot, eos_token_id=eot, pad_token_id=None)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(cfg.model.seq_len))
        _write_json(tmp / META, {
            "format": FORMAT, "architecture": target.architecture, "step": step, "exported_from": str(source),
            "config": to_dict(cfg),
            "files": {n: _sha256(tmp / n) for n in ("model.safetensors", "tokenizer.json")},
        })
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)  # NOTE: two renames; a kill between them leaves the old one aside
        os.replace(tmp, out_dir)
        _fsync(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir=out_dir, architecture=target.architecture, checkpoint=Path(source), step=step,
                        n_params=model.num_params(), files=sorted(p.name for p in out_dir.iterdir()))


# ---------------------------------------------------------------------------------------------
# read back


def load_hf_folder(path: Path | str, device: str | torch.device = "cpu"):
    """A folder written by `export_hf` -> loading.Loaded (our Transformer, eval mode, on `device`)."""
    from safetensors.torch import load_file

    from .loading import Loaded
    from .model.transformer import Transformer

    path = Path(path)
    hint = "export the run again with `moe-lm export`, or pass a run or checkpoint folder"
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        cfg: Config = from_dict(meta["config"])
    except FileNotFoundError:
        raise CheckpointError(f"{path} has a config.json but no {META}: not written by `moe-lm export`",
                              "load it with transformers, or pass a run or checkpoint folder") from None
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}/{META} is not readable ({type(exc).__name__})", hint) from exc
    for name, digest in meta.get("files", {}).items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise CheckpointError(f"export {path} is truncated or changed ({name} "
                                  f"{'is missing' if not f.is_file() else 'does not match its checksum'})", hint)
    try:
        target = hf_target(cfg.model)
        written = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (ExportError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a moe-lm export ({exc})", hint) from exc
    if written != [target.architecture]:
        raise CheckpointError(f"{path}/config.json names {written}, but its moe-lm config exports as "
                              f"{target.architecture}", hint)
    model = Transformer(cfg.model)
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - any failure to read the weights is the export's
        raise CheckpointError(f"{path}/model.safetensors cannot be read ({type(exc).__name__})", hint) from exc
    load_hf_state_dict(model, tensors, target, str(path))
    model.to(device).eval()
    return Loaded(model=model, cfg=cfg, checkpoint=path, run_dir=None, step=int(meta.get("step", 0)), state=meta,
                  tokenizer_path=path / "tokenizer.json")
