"""Parameter and FLOP accounting against independent counts: the parameters of the built model,
and torch's own FLOP counter over a real forward + backward."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe_lm.config import load_config
from moe_lm.errors import ConfigError
from moe_lm.model import cpu_kernel, dispatch, gemm
from moe_lm.model.accounting import dense_total, dense_twin, flops_per_token, param_counts, render_info
from moe_lm.model.transformer import Transformer

CONFIGS = sorted(p.stem for p in Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))
VARIANTS = [
    [],
    ["model.moe.every=2"],
    ["model.moe.n_shared_experts=2", "model.tie_embeddings=true"],
    ["model.moe.router=noisy_topk", "model.moe.balance_loss=shazeer", "model.activation=relu"],
    ["model.moe.router=expert_choice", "model.moe.capacity_factor=2.0", "model.activation=gelu"],
    ["model.moe.router=sigmoid_bias", "model.moe.n_experts=16", "model.moe.top_k=6", "model.moe.n_shared_experts=1"],
]


ROOT = Path(__file__).resolve().parents[1]


def cfg_of(name="tiny-moe", extra=()):
    return load_config(Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml",
                       ["model.vocab_size=97", *extra])


def build(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Transformer(cfg.model)


@pytest.mark.parametrize("name", CONFIGS)
def test_param_counts_equal_the_built_models_parameters(name):
    cfg = cfg_of(name)
    assert param_counts(cfg.model)["total"] == build(cfg).num_params()


@pytest.mark.parametrize("extra", VARIANTS, ids=lambda v: ",".join(v) or "tiny-moe")
def test_param_counts_of_variants_and_active_params(extra):
    cfg = cfg_of("tiny-moe", extra)
    p = param_counts(cfg.model)
    model = build(cfg)
    assert p["total"] == model.num_params()
    expert_params = sum(layer.experts.w_in.numel() + layer.experts.w_down.numel() for layer in model.moe_layers())
    m = cfg.model.moe
    per_token = m.capacity_factor if m.router == "expert_choice" else m.top_k
    assert p["active"] == pytest.approx(p["total"] - expert_params * (1 - per_token / m.n_experts), abs=1)


def counted_training_flops(cfg, batch=2):
    """torch's FLOP counter over forward + backward, attention through the math kernel (matmuls),
    the experts through the fused path's one torch.mm each and every other product through
    torch's BLAS: the counter has no formula for grouped_mm nor for oneDNN's linear (it counts 0),
    which the fused path and model.gemm use on a CPU where torch has them, and does not see inside
    the C++ expert kernel (the cpu_kernel path): the same multiplications."""
    model = build(cfg)
    for layer in model.moe_layers():
        layer.dispatch_path = "fused"
    cpu_kernel.load()  # its first call checks the kernel with a few products: not inside the counter
    idx = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_len))
    counter = FlopCounterMode(display=False)
    grouped, dispatch.GROUPED_BLOCKS = dispatch.GROUPED_BLOCKS, False
    backend, gemm.backend = gemm.backend, lambda: "blas"
    try:
        with counter, sdpa_kernel(SDPBackend.MATH):
            out = model(idx, idx)
            out.loss.backward()
    finally:
        dispatch.GROUPED_BLOCKS, gemm.backend = grouped, backend
    return counter.get_total_flops() / (batch * cfg.model.seq_len)


@pytest.mark.parametrize("extra", [v for v in VARIANTS if "expert_choice" not in ",".join(v)] + [["model.moe=null"]],
                         ids=lambda v: ",".join(v) or "tiny-moe")
def test_training_flops_per_token_equal_torchs_flop_counter(extra):
    """Exact for dropless token choice and dense: 3 × forward matmuls + full-context attention."""
    cfg = cfg_of("tiny-moe", ["model.seq_len=16", "model.n_layers=2", *extra])
    f = flops_per_token(cfg.model)
    assert counted_training_flops(cfg) == f["total"]
    assert f["total"] == f["matmul"] + f["attention"] + f["router"] and f["dense"] == f["total"] - f["router"]


@pytest.mark.parametrize("extra", VARIANTS, ids=lambda v: ",".join(v) or "tiny-moe")
def test_dense_twin_flops_equal_moe_active_flops_minus_the_router_exactly(extra):
    cfg = cfg_of("tiny-moe", extra)
    twin = dense_twin(cfg)
    assert twin.model.moe is None and twin.train == cfg.train and twin.model.activation == cfg.model.activation
    m = cfg.model.moe
    if m.every == 1:
        per_token = m.capacity_factor if m.router == "expert_choice" else m.top_k
        assert twin.model.ffn_hidden == (per_token + m.n_shared_experts) * cfg.model.ffn_hidden
    f_moe, f_twin = flops_per_token(cfg.model), flops_per_token(twin.model)
    assert f_twin["total"] == f_moe["total"] - f_moe["router"]
    assert f_twin["router"] == 0 and f_moe["router"] > 0


def test_dense_twin_of_the_shipped_configs_runs_at_equal_counted_flops():
    """The twin's FLOPs counted by torch equal the MoE's counted FLOPs minus the router's."""
    cfg = cfg_of("tiny-moe", ["model.seq_len=16", "model.n_layers=2"])
    moe_counted = counted_training_flops(cfg)
    twin_counted = counted_training_flops(dense_twin(cfg))
    assert twin_counted == moe_counted - flops_per_token(cfg.model)["router"]


def test_dense_total_has_as_many_parameters_as_the_moe():
    cfg = cfg_of("tiny-moe")
    big = dense_total(cfg)
    assert big.model.moe is None
    total, dense = param_counts(cfg.model)["total"], param_counts(big.model)["total"]
    assert abs(dense - total) / total < 0.005
    # muP: the output matrices' rate scaled by twin width (top-4 experts of 64) / its own width
    assert big.train.ffn_out_lr_scale == pytest.approx(4 * 64 / big.model.ffn_hidden)
    assert cfg.train.ffn_out_lr_scale == 1.0


def test_info_renders_total_active_twin_and_memory(tmp_path):
    buf = io.StringIO()
    render_info(cfg_of("tiny-moe"), vocab_size=None, console=Console(file=buf, width=200))
    text = buf.getvalue()
    for word in ("total params", "active params", "dense twin", "FLOPs/token", "memory"):
        assert word in text


def test_info_takes_the_vocabulary_from_the_data_folder_or_says_how_to_get_it(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"vocab_size": 321}))
    buf = io.StringIO()
    render_info(load_config(None, [f"data.dir={tmp_path / 'd'}"]), vocab_size=None, console=Console(file=buf, width=200))
    assert "vocab 321" in buf.getvalue()
    # the folder also wins over a config's data.vocab_size (tiny-moe: 2048): train takes the folder's
    buf = io.StringIO()
    render_info(load_config(ROOT / "configs" / "tiny-moe.yaml", [f"data.dir={tmp_path / 'd'}"]),
                console=Console(file=buf, width=200))
    assert "vocab 321" in buf.getvalue()
    buf = io.StringIO()
    render_info(load_config(None, [f"data.dir={tmp_path / 'nowhere'}"]), vocab_size=500, console=Console(file=buf, width=200))
    assert "vocab 500" in buf.getvalue()


def test_info_works_before_prepare_and_says_which_vocabulary_it_used(tmp_path):
    # a newcomer's first look at a shipped config, before any `moe-lm prepare`
    proc = subprocess.run([sys.executable, "-m", "moe_lm", "info", "-c", str(ROOT / "configs" / "tiny-moe.yaml"),
                           f"data.dir={tmp_path / 'not-prepared'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    # the config's data.vocab_size: what `moe-lm prepare -c` will train for it (tiny-moe.yaml: 2048)
    assert "vocab 2048" in proc.stdout
    assert "vocabulary: 2,048 tokens, from data.vocab_size" in proc.stdout
    # the parameter count is the model's with that vocabulary
    from moe_lm.model.transformer import Transformer

    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", ["model.vocab_size=2048"])
    n = sum(p.numel() for p in Transformer(cfg.model).parameters())
    assert f"{n / 1e6:.2f}M" in proc.stdout
    # no vocabulary anywhere: prepare's default (8192 in `moe-lm prepare --help`)
    buf = io.StringIO()
    render_info(load_config(ROOT / "configs" / "tiny-moe.yaml", ["data.vocab_size=null", f"data.dir={tmp_path / 'x'}"]),
                console=Console(file=buf, width=200))
    assert "vocabulary: 8,192 tokens, from the default of `moe-lm prepare`" in buf.getvalue()
    buf = io.StringIO()
    render_info(load_config(ROOT / "configs" / "tiny-moe.yaml", ["model.vocab_size=1000", f"data.dir={tmp_path}"]),
                console=Console(file=buf, width=200))
    assert "vocabulary: 1,000 tokens, from model.vocab_size" in buf.getvalue()


def test_info_warns_about_a_warmup_longer_than_the_run():
    buf = io.StringIO()
    render_info(load_config(ROOT / "configs" / "tiny-moe.yaml", ["train.max_steps=4", "train.warmup_steps=20", "model.vocab_size=512"]),
                console=Console(file=buf, width=300))
    assert "warning: train.warmup_steps (20) > train.max_steps (4)" in buf.getvalue()
