"""The training loop, in process: it learns, writes a self-describing run folder, resumes exactly,
refuses to clobber a run, and stops cleanly on a non-finite loss."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from moe_lm.config import load_config
from moe_lm.errors import DataError, RunError, TrainingError
from moe_lm.model import gemm
from moe_lm.training import checkpoint as ckpt_io
from moe_lm.training.metrics import read_metrics
from moe_lm.training.step import build_optimizer, lr_at
from moe_lm.training.trainer import TrainResult, train

ROOT = Path(__file__).resolve().parents[1]
# the 8-expert top-2 config these tests were written against (tiny-moe is the 32-expert demo now)
TINY_MOE = ROOT / "configs" / "step-limited.yaml"


def tiny(data_dir: Path, *extra: str) -> list[str]:
    """Overrides that shrink any shipped config to a model that trains in a fraction of a second."""
    return [f"data.dir={data_dir}", "model.d_model=32", "model.n_heads=2", "model.n_layers=2",
            "model.seq_len=32", "model.ffn_hidden=32", "train.batch_size=4", "train.warmup_steps=2",
            "train.eval_batches=2", "train.device=cpu", *extra]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def tiny_run(tiny_data_dir, tmp_path_factory) -> TrainResult:
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.max_steps=12", "train.lr=1e-2", "train.log_every=2",
                                     "train.eval_every=4", "train.checkpoint_every=4", "train.keep_checkpoints=2"))
    return train(cfg, out_dir=tmp_path_factory.mktemp("runs") / "tiny", console=quiet(), command_line=["moe-lm", "train"])


# ---------------------------------------------------------------------------------------------
# a run: it learns, and its folder describes it


def test_training_lowers_the_validation_loss(tiny_run):
    evals = [r for r in read_metrics(tiny_run.run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert tiny_run.steps == 12 and tiny_run.val_loss == evals[-1]["val_loss"]
    assert tiny_run.val_ppl == pytest.approx(math.exp(tiny_run.val_loss), rel=1e-4)
    assert tiny_run.tokens == 12 * 4 * 32 and tiny_run.tokens_per_s > 0 and tiny_run.wall_s > 0
    assert tiny_run.flops > 0


def test_run_folder_holds_config_env_metrics_plots_and_checkpoints(tiny_run, tiny_data_dir):
    d = tiny_run.run_dir
    resolved = load_config(d / "config.yaml")
    from moe_lm.data.shards import TokenData

    assert resolved.model.vocab_size == TokenData.open(tiny_data_dir).vocab_size  # filled in from the data
    env = json.loads((d / "env.json").read_text())
    for key in ("moe_lm", "python", "torch", "device", "command_line", "precision"):
        assert key in env
    assert env["command_line"] == ["moe-lm", "train"] and env["device"] == "cpu" and env["precision"] == "float32"
    assert env["cpu_matmul"] == gemm.backend() in ("onednn", "blas")
    assert (d / "plots" / "loss.png").stat().st_size > 0
    assert (d / "plots" / "expert_load.png").stat().st_size > 0
    # keep the last 2 checkpoints; `latest` names the final one
    assert [p.name for _, p in ckpt_io.list_checkpoints(d / "checkpoints")] == ["step-0000008", "step-0000012"]
    assert (d / "checkpoints" / "latest").read_text().strip() == "step-0000012"
    assert tiny_run.checkpoint == d / "checkpoints" / "step-0000012"
    ckpt = tiny_run.checkpoint
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.yaml", "tokenizer.json"} <= \
        {p.name for p in ckpt.iterdir()}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 12 and state["tokens"] == 12 * 4 * 32 and state["next_batch_index"] == 12
    assert state["config_hash"] == ckpt_io.resume_hash(resolved)


def test_metrics_per_expert_load_vectors_sum_to_one_per_layer(tiny_run):
    records = [r for r in read_metrics(tiny_run.run_dir / "metrics.jsonl") if r["kind"] in ("train", "eval")]
    assert records
    for r in records:
        assert [ll["layer"] for ll in r["layers"]] == [0, 1]  # every block is an MoE layer in tiny-moe
        for ll in r["layers"]:
            assert len(ll["load"]) == 8
            assert sum(ll["load"]) == pytest.approx(1.0, abs=1e-4)
            assert all(s >= 0 for s in ll["load"])
            assert ll["max_mean"] >= 1.0 - 1e-6 and ll["cv"] >= 0 and 0 <= ll["dropped_frac"] <= 1


def test_metrics_records_carry_the_budget_for_loss_vs_flops_and_wall_clock(tiny_run):
    recs = read_metrics(tiny_run.run_dir / "metrics.jsonl")
    evals = [r for r in recs if r["kind"] == "eval"]
    for r in evals:
        for key in ("step", "tokens", "flops", "wall_s", "val_loss", "val_ppl"):
            assert key in r
        assert r["tokens"] == r["step"] * 4 * 32
    fpt = evals[-1]["flops"] / evals[-1]["tokens"]
    assert all(r["flops"] == pytest.approx(fpt * r["tokens"]) for r in evals)
    walls = [r["wall_s"] for r in evals]
    assert walls == sorted(walls) and walls[-1] > 0
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4, 6, 8, 10, 12]
    for r in train:
        assert r["loss"] == pytest.approx(r["ce_loss"] + r["aux_loss"] + r["z_loss"], rel=1e-4, abs=1e-6)
        assert r["aux_loss"] > 0  # the switch balance loss is on in tiny-moe


# ---------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("router", ["noisy_topk", "sigmoid_bias"])
def test_resume_is_exact_n_steps_plus_n_equals_2n(tiny_data_dir, tmp_path, router):
    """Noisy routing draws from the RNG; sigmoid_bias carries bias buffers; grad_accum = 2 splits
    each batch: all must survive a stop and resume bit for bit on CPU."""
    balance = "shazeer" if router == "noisy_topk" else "none"
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.max_steps=6", "train.log_every=1", "train.eval_every=2",
                                     "train.grad_accum=2", f"model.moe.router={router}",
                                     f"model.moe.balance_loss={balance}", "model.moe.bias_update_rate=0.01"))
    straight = train(cfg, out_dir=tmp_path / "straight", console=quiet(), plots=False)
    first = train(cfg, out_dir=tmp_path / "resumed", console=quiet(), plots=False, stop_after=3)
    assert first.steps == 3
    resumed = train(cfg, out_dir=tmp_path / "resumed", console=quiet(), plots=False, resume="auto")

    losses = lambda d: [(r["step"], r["loss"], r["grad_norm"]) for r in train_records(d)]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 6
    from safetensors.torch import load_file

    a = load_file(straight.checkpoint / "model.safetensors")
    b = load_file(resumed.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val_loss == straight.val_loss
    assert resumed.tokens == straight.tokens and resumed.wall_s > first.wall_s


def test_train_compile_on_a_cpu_compiles_each_block_and_trains_as_eager_does(tiny_data_dir, tmp_path, monkeypatch):
    """train.compile=true on a CPU: each block goes through torch.compile (here with the lighter
    aot_eager backend: dynamo's graphs and AOTAutograd's forward and backward, without generating
    C++), the fused head and loss stay eager (no logits: lm_loss ran outside the graph), and the
    run trains, evaluates and checkpoints as the eager run does: the same losses, the same
    state-dict keys."""
    from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

    from moe_lm.model.transformer import Transformer
    from moe_lm.training import step

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    real = step.compile_model
    monkeypatch.setattr(step, "compile_model", lambda model, ddp=None: real(model, ddp, backend=counter))
    args = ["train.max_steps=4", "train.log_every=1", "train.eval_every=2"]
    eager = train(load_config(TINY_MOE, tiny(tiny_data_dir, *args)), out_dir=tmp_path / "eager", console=quiet(), plots=False)
    compiled = train(load_config(TINY_MOE, tiny(tiny_data_dir, *args, "train.compile=true")),
                     out_dir=tmp_path / "compiled", console=quiet(), plots=False)
    assert counter.frame_count >= 2  # both blocks' graphs (more: the MoE layer's graph break)
    losses = lambda d: [(r["step"], r["loss"]) for r in train_records(d)]  # noqa: E731
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-4)
    from safetensors.torch import load_file

    assert load_file(compiled.checkpoint / "model.safetensors").keys() == load_file(eager.checkpoint / "model.safetensors").keys()

    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "model.vocab_size=64"))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    forward = real(model, backend=CompileCounter())
    assert forward is model and all(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers)
    idx = torch.randint(0, 64, (2, 9))
    assert forward(idx[:, :-1], idx[:, 1:]).logits is None  # the fused head and loss, eager
    torch._dynamo.reset()


def test_compiled_blocks_of_one_kind_share_their_graphs():
    """Every block runs Block.forward, whose graphs dynamo caches together (8 by default, for all
    blocks): four MoE blocks must take the graphs one takes, not new ones per layer index (which
    the Transformer passes on only for a KV cache)."""
    from torch._dynamo.testing import CompileCounter

    from moe_lm.config import ModelConfig, MoEConfig
    from moe_lm.model.transformer import Transformer
    from moe_lm.training.step import compile_model

    def graphs(n_layers: int) -> int:
        torch._dynamo.reset()
        counter = CompileCounter()
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=n_layers, n_heads=2, ffn_hidden=16,
                                        seq_len=8, moe=MoEConfig(n_experts=4, top_k=2)))
        forward = compile_model(model, backend=counter)
        idx = torch.randint(0, 64, (2, 9))
        forward(idx[:, :-1], idx[:, 1:]).loss.backward()
        return counter.frame_count

    one, four = graphs(1), graphs(4)
    assert one >= 1 and four == one, (one, four)
    torch._dynamo.reset()


def test_resume_from_an_earlier_checkpoint_sets_later_ones_aside(tiny_data_dir, tmp_path):
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.max_steps=6", "train.checkpoint_every=2",
                                     "train.keep_checkpoints=5", "train.log_every=1"))
    run = tmp_path / "run"
    train(cfg, out_dir=run, console=quiet(), plots=False)
    shown = io.StringIO()
    train(cfg, out_dir=run, console=Console(file=shown, width=200), plots=False,
          resume=str(run / "checkpoints" / "step-0000002"))
    assert ("set aside 2 later checkpoints of the abandoned branch: superseded-step-0000004, "
            "superseded-step-0000006") in shown.getvalue()  # said, not done silently
    assert [r["message"][:33] for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "superseded"] == [
        "set aside 2 later checkpoints of "]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    # the abandoned continuation stays on disk, out of `--resume auto` and pruning
    assert names == ["latest", "step-0000002", "step-0000004", "step-0000006",
                     "superseded-step-0000004", "superseded-step-0000006"]
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4, 5, 6]  # one trajectory, no duplicates


def test_resume_auto_without_a_checkpoint_starts_fresh(tiny_data_dir, tmp_path):
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.max_steps=2"))
    r = train(cfg, out_dir=tmp_path / "new", console=quiet(), plots=False, resume="auto")
    assert r.steps == 2


# ---------------------------------------------------------------------------------------------
# refusals and stops


def test_existing_run_folder_is_refused_without_resume_or_overwrite(tiny_data_dir, tmp_path):
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.max_steps=2"))
    train(cfg, out_dir=tmp_path / "run", console=quiet(), plots=False)
    with pytest.raises(RunError, match="already exists"):
        train(cfg, out_dir=tmp_path / "run", console=quiet(), plots=False)
    r = train(cfg, out_dir=tmp_path / "run", console=quiet(), plots=False, overwrite=True)
    assert r.steps == 2
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "thesis.tex").write_text("precious")
    with pytest.raises(RunError, match="does not look like a run folder"):
        train(cfg, out_dir=tmp_path / "not-a-run", console=quiet(), plots=False, overwrite=True)
    assert (tmp_path / "not-a-run" / "thesis.tex").exists()


def test_vocabulary_mismatch_is_a_data_error_before_any_work(tiny_data_dir, tmp_path):
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "model.vocab_size=7"))
    with pytest.raises(DataError, match="model.vocab_size = 7 but the tokenizer"):
        train(cfg, out_dir=tmp_path / "run", console=quiet())
    assert not (tmp_path / "run").exists()


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data_dir, tmp_path, monkeypatch):
    from moe_lm.model import transformer

    real_forward = transformer.Transformer.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        out = real_forward(self, idx, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th training step
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(transformer.Transformer, "forward", forward)
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.max_steps=10", "train.checkpoint_every=2"))
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite \(nan\) at step 4.*step-0000002"):
        train(cfg, out_dir=run, console=quiet(), plots=False)
    assert ckpt_io.find_latest(run).name == "step-0000002"
    assert ckpt_io.read_state(ckpt_io.find_latest(run))["step"] == 2
    assert any(r.get("event") == "nonfinite" for r in read_metrics(run / "metrics.jsonl"))


# ---------------------------------------------------------------------------------------------
# optimiser pieces


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    t = load_config(None, ["train.lr=1.0", "train.warmup_steps=4", "train.max_steps=14", "train.min_lr_ratio=0.1"]).train
    assert [lr_at(s, t) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, t) == pytest.approx(1.0)
    assert lr_at(9, t) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert lr_at(14, t) == pytest.approx(0.1)
    lrs = [lr_at(s, t) for s in range(4, 15)]
    assert lrs == sorted(lrs, reverse=True)


def test_adamw_decays_matrices_but_not_norms_or_biases(tiny_data_dir):
    from moe_lm.model.transformer import Transformer

    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "model.vocab_size=64"))
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_grad_accumulation_splits_the_same_batch(tiny_data_dir, tmp_path):
    """A dense model sees the same data and (up to float order) the same gradient with any
    grad_accum: micro-batches are slices of the step's batch."""
    dense = ROOT / "configs" / "tiny-dense.yaml"
    runs = {}
    for k in (1, 2):
        cfg = load_config(dense, tiny(tiny_data_dir, "train.max_steps=3", "train.log_every=1", f"train.grad_accum={k}"))
        train(cfg, out_dir=tmp_path / f"k{k}", console=quiet(), plots=False)
        runs[k] = [r["ce_loss"] for r in train_records(tmp_path / f"k{k}")]
    assert runs[1] == pytest.approx(runs[2], rel=1e-4)
    # and the same validation: the windows are train.batch_size's, run in micro-batches (they were
    # drawn at the micro-batch's size: half the tokens, other windows, another val loss)
    from moe_lm.evaluation import run_eval

    val = {k: [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / f"k{k}" / "metrics.jsonl")
               if r["kind"] == "eval"] for k in (1, 2)}
    assert [s for s, _ in val[1]] == [s for s, _ in val[2]] and len(val[1]) >= 2
    assert [v for _, v in val[1]] == pytest.approx([v for _, v in val[2]], rel=1e-5)
    reports = {k: run_eval(tmp_path / f"k{k}", device="cpu")[0] for k in (1, 2)}
    assert reports[1].n_tokens == reports[2].n_tokens and reports[1].windows == reports[2].windows
    assert reports[1].loss == pytest.approx(reports[2].loss, rel=1e-5)
    assert reports[2].loss == pytest.approx(val[2][-1][1], rel=1e-5)  # eval reproduces the trainer's sample


@pytest.mark.parametrize("router,balance", [("softmax_topk", "switch"), ("noisy_topk", "shazeer"),
                                            ("sigmoid_bias", "switch")])
def test_grad_accumulation_keeps_the_whole_batch_balance_loss_and_its_gradient(router, balance):
    """Issue 14 case 3: the balance loss was computed per micro-batch, so with balance_coef 1 the
    step-1 aux loss was 1.001469 at grad_accum 1 and 1.003200 at 2, and the router's balance-loss
    gradient moved by 41% (2 micro-batches) and 121% (4). One rule for micro-batches and ranks:
    balance statistics are the whole step's batch's. The aux loss and the router's balance-loss
    gradient (with - without the balance loss) agree to 1e-6 at grad_accum 1, 2 and 4."""
    import warnings

    from moe_lm.config import ModelConfig, MoEConfig
    from moe_lm.model.transformer import Transformer
    from moe_lm.training.step import accumulate_gradients

    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, 1)

    def step(grad_accum: int, coef: float):
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=16, seq_len=16,
                          moe=MoEConfig(n_experts=4, top_k=2, router=router, balance_loss=balance, balance_coef=coef))
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = Transformer(cfg).train()
        if router == "noisy_topk":  # out of the all-tied zero init, so the statistics move
            with torch.no_grad():
                for layer in model.moe_layers():
                    layer.router.w_gate.normal_(std=0.5)
                    layer.router.w_noise.normal_(std=0.5)
            # the noise is drawn per forward, so grad_accum changes the draws themselves (as it
            # would any random draw): compare without noise; the shazeer loss is still computed
            model.eval()
        torch.manual_seed(1)  # the noise draws
        sums = accumulate_gradients(model, model, x, y, grad_accum=grad_accum, device=torch.device("cpu"))
        routers = [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in layer.router.parameters()]) for layer in model.moe_layers()]
        load = [layer.router.load_since_update.clone() for layer in model.moe_layers()
                if hasattr(layer.router, "load_since_update")]
        return sums, torch.cat(routers), load

    ref_sums, ref_with, ref_load = step(1, 1.0)
    _, ref_without, _ = step(1, 0.0)
    ref_balance_grad = ref_with - ref_without
    assert ref_balance_grad.norm() > 1e-3 * ref_with.norm()  # the balance loss does reach the router
    for k in (2, 4):
        sums, with_, load = step(k, 1.0)
        _, without, _ = step(k, 0.0)
        assert sums[1].item() == pytest.approx(ref_sums[1].item(), rel=1e-6)  # the aux loss
        assert sums[0].item() == pytest.approx(ref_sums[0].item(), rel=1e-5)  # cross-entropy
        rel = ((with_ - without) - ref_balance_grad).norm() / ref_balance_grad.norm()
        assert rel.item() < 1e-5, f"grad_accum {k}: balance-loss gradient off by {rel.item():.2e}"
        for a, b in zip(load, ref_load):  # the pre-pass does not count the load twice
            assert torch.equal(a, b)


def test_ffn_out_lr_scale_moves_ffn_output_matrices_by_that_fraction_of_the_rate(tiny_data_dir):
    """Adam's first step moves a weight by lr · g / (|g| + eps) (both moments bias-corrected from one
    gradient): lr wherever |g| >> eps. With weight decay 0, the FFN output matrices - and only they
    - must move by scale × lr (muP's rule for a wider FFN, train.ffn_out_lr_scale)."""
    from moe_lm.model.transformer import Transformer
    from moe_lm.training.step import is_ffn_output, set_lr

    for config in (TINY_MOE, ROOT / "configs" / "tiny-dense.yaml"):
        cfg = load_config(config, tiny(tiny_data_dir, "model.vocab_size=64", "train.weight_decay=0",
                                       "train.ffn_out_lr_scale=0.25"))
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        idx = torch.randint(0, 64, (4, 16))
        out = model(idx, idx)
        (out.loss + out.aux_loss + out.z_loss).backward()
        before = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in model.named_parameters()}
        set_lr(opt, 1e-3)
        opt.step()
        outputs = {n for n, _ in model.named_parameters() if is_ffn_output(n)}
        assert outputs == {n for n, _ in model.named_parameters() if n.endswith(("down_proj.weight", "w_down"))}
        assert len(outputs) == cfg.model.n_layers
        for n, p in model.named_parameters():
            w0, g = before[n]
            moved = (p.detach() - w0).abs()[g.abs() > 1e-5]
            if moved.numel():
                expected = 1e-3 * (0.25 if n in outputs else 1.0)
                assert moved.median().item() == pytest.approx(expected, rel=1e-3), n


def test_resuming_a_finished_run_names_whether_it_is_at_or_past_max_steps(tiny_data_dir, tmp_path):
    from moe_lm.errors import RunError

    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.max_steps=4"))
    run = train(cfg, out_dir=tmp_path / "run", console=quiet(), plots=False).run_dir
    for steps, where in ((4, "at step 4, already at train.max_steps = 4"), (2, "at step 4, past train.max_steps = 2")):
        with pytest.raises(RunError, match=where):
            train(load_config(TINY_MOE, tiny(tiny_data_dir, f"train.max_steps={steps}")), out_dir=run, console=quiet(),
                  plots=False, resume="auto")
