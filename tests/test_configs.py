"""The shipped configs: each says what it demonstrates, holds the recipe it names, and trains (its
loss falls over a few steps of a shrunken copy on the tiny corpus)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from moe_lm.config import load_config
from moe_lm.training.metrics import read_metrics
from moe_lm.training.trainer import train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
EXPECTED = {"tiny-moe", "step-limited", "tiny-dense", "shazeer-2017", "switch", "mixtral", "expert-choice", "deepseek", "small-moe"}


def test_every_expected_config_ships():
    assert {p.stem for p in CONFIGS} >= EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_starts_by_saying_what_it_demonstrates_and_is_named_after_its_file(path):
    text = path.read_text()
    assert text.startswith(f"# {path.stem}: "), "first line: '# <name>: what it demonstrates'"
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_each_family_config_holds_its_recipe():
    c = {p.stem: load_config(p) for p in CONFIGS}
    sh = c["shazeer-2017"].model
    assert (sh.moe.router, sh.activation, sh.moe.balance_loss) == ("noisy_topk", "relu", "shazeer")
    sw = c["switch"].model.moe
    assert (sw.router, sw.top_k, sw.balance_loss) == ("switch", 1, "switch") and sw.capacity_factor is not None
    mx = c["mixtral"].model
    assert (mx.moe.router, mx.moe.top_k, mx.activation, mx.moe.n_shared_experts) == ("softmax_topk", 2, "swiglu", 0)
    assert mx.moe.capacity_factor is None and not mx.tie_embeddings
    ec = c["expert-choice"].model.moe
    assert ec.router == "expert_choice" and ec.balance_loss == "none"
    ds = c["deepseek"].model
    assert ds.moe.router == "sigmoid_bias" and ds.moe.n_shared_experts >= 1 and ds.moe.balance_loss == "none"
    sl = c["step-limited"].model  # deepseek is step-limited's layer made fine-grained, with shared experts
    assert ds.moe.n_experts * ds.ffn_hidden == sl.moe.n_experts * sl.ffn_hidden  # same total expert width
    assert (ds.moe.top_k + ds.moe.n_shared_experts) * ds.ffn_hidden == sl.moe.top_k * sl.ffn_hidden  # same active
    tm = c["tiny-moe"].model
    assert c["tiny-dense"].model.moe is None
    assert c["tiny-dense"].model.ffn_hidden == tm.moe.top_k * tm.ffn_hidden  # the dense twin at equal active width
    assert {k: v for k, v in vars(c["tiny-dense"].model).items() if k not in ("moe", "ffn_hidden")} == \
        {k: v for k, v in vars(tm).items() if k not in ("moe", "ffn_hidden")}
    assert vars(c["tiny-dense"].train) == vars(c["tiny-moe"].train) and c["tiny-dense"].data == c["tiny-moe"].data
    sm = c["small-moe"].model
    assert sm.d_model > tm.d_model and sm.n_layers > tm.n_layers and sm.moe is not None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_and_its_loss_falls(path, tiny_data_dir, tmp_path):
    """A shrunken copy (width 32, 2 layers, 32-token windows) keeps the config's routing recipe."""
    cfg = load_config(path)
    shrink = [f"data.dir={tiny_data_dir}", "model.d_model=32", "model.n_heads=2", "model.n_layers=2",
              "model.seq_len=32", "model.ffn_hidden=16" if cfg.model.ffn_hidden <= 64 else "model.ffn_hidden=32",
              "train.batch_size=4", "train.grad_accum=1", "train.max_steps=10", "train.warmup_steps=2",
              "train.lr=1e-2", "train.log_every=1", "train.eval_every=10", "train.eval_batches=2",
              "train.checkpoint_every=10", "train.compile=false", "train.device=cpu", "train.dtype=float32"]
    if cfg.model.moe is not None:
        shrink.append(f"model.moe.every={min(cfg.model.moe.every, 2)}")
    cfg = load_config(path, shrink)
    result = train(cfg, out_dir=tmp_path / "run", console=Console(file=io.StringIO()), plots=False)
    recs = read_metrics(result.run_dir / "metrics.jsonl")
    ce = [r["ce_loss"] for r in recs if r["kind"] == "train"]
    evals = [r["val_loss"] for r in recs if r["kind"] == "eval"]
    assert sum(ce[-3:]) / 3 < ce[0] - 0.2, ce
    assert evals[-1] < evals[0], evals


def test_the_demo_config_itself_trains_and_its_loss_falls(tiny_data_dir, tmp_path):
    """configs/tiny-moe.yaml at its own shape (32 experts of width 64, top-4, batch 32 x 128), only
    shortened and pointed at the tiny corpus."""
    cfg = load_config(CONFIGS[0].parent / "tiny-moe.yaml",
                      [f"data.dir={tiny_data_dir}", "train.max_steps=30",
                       "train.eval_every=30", "train.eval_batches=2", "train.checkpoint_every=30", "train.device=cpu"])
    assert (cfg.model.d_model, cfg.model.moe.n_experts, cfg.model.moe.top_k, cfg.train.batch_size) == (64, 32, 4, 32)
    result = train(cfg, out_dir=tmp_path / "run", console=Console(file=io.StringIO()), plots=False)
    recs = read_metrics(result.run_dir / "metrics.jsonl")
    ce = [r["ce_loss"] for r in recs if r["kind"] == "train"]
    evals = [r["val_loss"] for r in recs if r["kind"] == "eval"]
    assert ce[-1] < ce[0] - 1.0, ce
    assert evals[-1] < evals[0] - 1.0, evals
