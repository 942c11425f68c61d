"""`moe-lm eval`: perplexity counted over every token once, the routing report, specialisation,
and one-line errors for runs it cannot evaluate."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from moe_lm.config import load_config
from moe_lm.data.shards import TokenData
from moe_lm.evaluation import evaluate_model, render_report, run_eval
from moe_lm.model.transformer import Transformer
from moe_lm.training.metrics import read_metrics
from moe_lm.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = ROOT / "configs" / "tiny-moe.yaml"


def tiny(data_dir: Path, *extra: str) -> list[str]:
    return [f"data.dir={data_dir}", "model.d_model=32", "model.n_heads=2", "model.n_layers=2",
            "model.seq_len=32", "model.ffn_hidden=32", "model.moe.n_experts=4", "model.moe.top_k=2", "train.batch_size=4",
            "train.warmup_steps=2", "train.eval_batches=3", "train.device=cpu", *extra]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=140)


@pytest.fixture(scope="module")
def run(tiny_data_dir, tmp_path_factory):
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.max_steps=8", "train.lr=1e-2", "train.eval_every=4",
                                     "train.checkpoint_every=4"))
    return train(cfg, out_dir=tmp_path_factory.mktemp("runs") / "tiny", console=quiet(), plots=False)


def moe_lm(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lm", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# perplexity


def test_perplexity_of_a_uniform_model_equals_the_vocabulary_size(tiny_data_dir):
    data = TokenData.open(tiny_data_dir)
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, f"model.vocab_size={data.vocab_size}")).model
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution over V tokens
    r = evaluate_model(model, data.split("val"), seq_len=32, batch_size=4, n_batches=None)
    assert r.ppl == pytest.approx(data.vocab_size, rel=1e-6)
    assert r.loss == pytest.approx(math.log(data.vocab_size), rel=1e-6)


def test_all_counts_every_validation_token_once_and_matches_a_log_softmax_sum(run, tiny_data_dir):
    """--all: non-overlapping windows, len(val) - 1 targets; the loss equals the negative
    log-likelihood summed by hand with log_softmax + gather over one long pass of windows."""
    from moe_lm.loading import load_model

    loaded = load_model(run.run_dir)
    val = np.asarray(TokenData.open(tiny_data_dir).split("val"), dtype=np.int64)
    r = evaluate_model(loaded.model, val, seq_len=32, batch_size=4, n_batches=None)
    assert r.n_tokens == len(val) - 1
    nll, n = 0.0, 0
    windows = [val[s:s + 33] for s in range(0, len(val) - 1, 32)]  # each its own sequence, float64
    full = [w for w in windows if len(w) == 33]
    batches = [np.stack(full[i:i + 64]) for i in range(0, len(full), 64)] + [w[None] for w in windows if len(w) < 33]
    with torch.no_grad():
        for chunk in map(torch.from_numpy, batches):
            x, y = chunk[:, :-1], chunk[:, 1:]
            logp = torch.log_softmax(loaded.model(x).logits.double(), dim=-1)
            nll -= logp.gather(2, y[..., None]).sum().item()
            n += y.numel()
    assert n == r.n_tokens
    assert r.loss == pytest.approx(nll / n, rel=1e-5)


def test_default_sample_reproduces_the_trainers_last_validation_loss(run):
    report, _ = run_eval(run.run_dir, write=False, device="cpu")
    last = [r for r in read_metrics(run.run_dir / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert report.step == last["step"] == 8
    assert report.loss == pytest.approx(last["val_loss"], abs=2e-5)


def test_eval_on_a_checkpoint_equals_eval_on_the_run(run):
    by_run, _ = run_eval(run.run_dir, n_batches=None, write=False, device="cpu")
    by_ckpt, _ = run_eval(run.run_dir / "checkpoints" / "step-0000008", n_batches=None, write=False, device="cpu")
    assert by_ckpt.loss == by_run.loss and by_ckpt.n_tokens == by_run.n_tokens
    earlier, _ = run_eval(run.run_dir / "checkpoints" / "step-0000004", n_batches=None, write=False, device="cpu")
    assert earlier.step == 4 and earlier.loss > by_run.loss  # a different checkpoint is really read


# ---------------------------------------------------------------------------------------------
# routing report and specialisation


def test_routing_report_shares_sum_to_one_and_load_counts_every_assignment(run):
    report, _ = run_eval(run.run_dir, n_batches=None, write=False, device="cpu")
    assert len(report.layers) == 2
    for lr in report.layers:
        assert sum(lr.load_share) == pytest.approx(1.0, abs=1e-9)
        assert sum(lr.importance_share) == pytest.approx(1.0, abs=1e-9)
        # dropless top-2: every token is sent to exactly 2 experts
        assert sum(lr.load) == 2 * report.n_tokens
        assert lr.dropped_pct == 0.0
        counts = np.array(lr.load, dtype=float)
        assert lr.cv_load == pytest.approx(counts.std() / counts.mean(), rel=1e-9)
        assert lr.max_mean == pytest.approx(counts.max() / counts.mean(), rel=1e-9)
        assert 0.0 < lr.entropy <= math.log(4) + 1e-6
        assert lr.dead == [e for e in range(4) if lr.load[e] == 0]
        for name, row in lr.domain_share.items():
            assert sum(row) == pytest.approx(1.0, abs=1e-4), name
        # each expert's most frequent tokens cannot exceed what it received
        for e, top in enumerate(lr.top_tokens):
            assert sum(c for _, c in top) <= lr.load[e]


def test_specialisation_counts_equal_a_per_token_recount(run, tiny_data_dir):
    """The per-expert token counts agree with routing every window again and counting the router's
    top-2 choices by hand."""
    from moe_lm.loading import load_model

    loaded = load_model(run.run_dir)
    data = TokenData.open(tiny_data_dir)
    val = data.split("val")
    report = evaluate_model(loaded.model, val, seq_len=32, batch_size=4, n_batches=2, seed=5,
                            decode=lambda i: str(i))
    from moe_lm.data.shards import eval_windows

    layer = loaded.model.layers[1].mlp
    counts = np.zeros((4, data.vocab_size))
    seen = []
    hook = layer.register_forward_hook(lambda m, inp, out: seen.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        for x, _ in eval_windows(val, 32, 4, n_batches=2, seed=5):
            seen.clear()
            loaded.model(x)
            logits = seen[0] @ layer.router.weight.T  # softmax_topk: the top-2 of the router's logits
            top2 = torch.topk(logits.float(), 2, dim=-1).indices
            for tok, experts in zip(x.reshape(-1).tolist(), top2.tolist()):
                for e in experts:
                    counts[e, tok] += 1
    hook.remove()
    lr = report.layers[1]
    for e in range(4):
        for tok, c in lr.top_tokens[e]:
            assert counts[e, int(tok)] == c


def test_render_report_shows_perplexity_routing_and_specialisation(run):
    report, files = run_eval(run.run_dir, n_batches=None, out_dir=run.run_dir / "evalout", device="cpu")
    buf = io.StringIO()
    render_report(report, Console(file=buf, width=160), files)
    text = buf.getvalue()
    assert f"{report.ppl:.2f}" in text and f"{report.n_tokens:,} tokens" in text
    assert "routing per MoE layer" in text and "specialisation" in text
    saved = json.loads((run.run_dir / "evalout" / "eval.json").read_text())
    assert saved["ppl"] == pytest.approx(report.ppl) and saved["n_tokens"] == report.n_tokens
    assert (run.run_dir / "evalout" / "plots" / "eval_expert_load.png").stat().st_size > 1000


@pytest.mark.parametrize("width", [60, 80, 200])
@pytest.mark.parametrize("experts", [4, 32])
def test_render_report_keeps_every_figure_readable_at_any_width(run, width, experts):
    # 80 columns is a pipe, a log file, `make demo | tee`: with the demo's 32 experts the figures
    # used to shrink to "0.…" beside the load bars, and the domains x experts grid to borders with
    # nothing in them. 32 experts: the run's report with every per-expert list repeated 8 times.
    import dataclasses

    report, _ = run_eval(run.run_dir, n_batches=2, device="cpu")
    if experts != len(report.layers[0].load):
        k = experts // len(report.layers[0].load)
        report.layers = [dataclasses.replace(
            lr, load=lr.load * k, load_share=[v / k for v in lr.load_share] * k,
            top_tokens=lr.top_tokens * k, selective_tokens=lr.selective_tokens * k,
            domain_share={n: [v / k for v in row] * k for n, row in lr.domain_share.items()})
            for lr in report.layers]
    buf = io.StringIO()
    render_report(report, Console(file=buf, width=width), None)
    text = buf.getvalue()
    for lr in report.layers:
        for figure in (f"{lr.cv_importance:.3f}", f"{lr.cv_load:.3f}", f"{lr.max_mean:.2f}", f"{lr.entropy:.3f}"):
            assert figure in text, (width, figure)
    table = text.split("specialisation")[0]
    assert "…" not in table
    assert table.count("▁") + sum(table.count(c) for c in "▂▃▄▅▆▇█") >= len(report.layers) * len(report.layers[0].load)
    last = report.layers[-1]
    assert last.domain_share, "the tiny corpus has domains"
    shown = [name for name in last.domain_share if name in text]
    assert shown, text
    for name in shown:  # its largest share is printed, whichever layout was chosen
        assert f"{max(last.domain_share[name]):.0%}" in text.split(name, 1)[1].splitlines()[0]


# ---------------------------------------------------------------------------------------------
# the command and its errors


def test_cli_eval_json_and_test_split(run):
    proc = moe_lm("eval", str(run.run_dir), "--split", "test", "--all", "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["split"] == "test" and out["windows"] == "all" and out["step"] == 8
    assert len(out["layers"]) == 2 and (run.run_dir / "eval.json").is_file()


def test_run_folder_without_checkpoints_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    assert_one_line_error(moe_lm("eval", str(tmp_path / "empty-run")), "no checkpoint")
    assert_one_line_error(moe_lm("eval", str(tmp_path / "missing")), "does not exist")


def test_data_folder_with_another_tokenizer_is_one_line_exit_2(run, tmp_path):
    from moe_lm.data.prepare import PrepareOptions, prepare_corpus

    other = tmp_path / "other"
    prepare_corpus(PrepareOptions(out=other, max_documents=40, vocab_size=300, val_fraction=0.2, test_fraction=0.0),
                   console=quiet())
    assert_one_line_error(moe_lm("eval", str(run.run_dir), "--data", str(other)), "another tokenizer")


def test_truncated_checkpoint_is_one_line_exit_2(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy)
    weights = copy / "checkpoints" / "step-0000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_one_line_error(moe_lm("eval", str(copy)), "truncated or corrupt")
