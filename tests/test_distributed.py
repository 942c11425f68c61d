"""torchrun with 2 CPU processes (gloo) trains the same model as one process with the same global
batch: data parallel, expert parallel, checkpoints that move between 2 processes and 1, and a
rank that dies stops the other instead of hanging.

The reference is always an independent single-process run of the same config, in this process.
Each torchrun start costs several seconds on 2 cores, so each launch serves several tests.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from moe_lm import distributed
from moe_lm.config import load_config
from moe_lm.errors import ConfigError
from moe_lm.training import checkpoint as ckpt_io
from moe_lm.training.metrics import read_metrics
from moe_lm.training.step import build_optimizer
from moe_lm.training.trainer import _check_parallel, train

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = ROOT / "configs" / "tiny-moe.yaml"
TORCHRUN = Path(sys.executable).parent / "torchrun"
TOL = 1e-5

# data parallel: noisy routing (the RNG must stay in step), the Shazeer loss on whole-batch
# statistics, 2 micro-batches per step (the ranks' rows of the same micro-batches)
DP = ("model.moe.router=noisy_topk", "model.moe.balance_loss=shazeer", "train.batch_size=8", "train.grad_accum=2")
# expert parallel, 2 of the 4 experts per rank: softmax top-2, Switch f·P loss and z-loss (tiny-moe's)
EP = ("model.moe.expert_parallel=true", "train.batch_size=4")


def tiny(data_dir: Path, *extra: str) -> list[str]:
    return [f"data.dir={data_dir}", "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.seq_len=32",
            "model.ffn_hidden=32", "model.moe.n_experts=4", "model.moe.top_k=2", "train.warmup_steps=2", "train.eval_batches=2",
            "train.device=cpu", "train.max_steps=6", "train.log_every=1", "train.eval_every=3",
            "train.checkpoint_every=3", "train.keep_checkpoints=5", *extra]


def torchrun(out: Path, overrides: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "moe_lm", "train", "--config", str(TINY_MOE),
           "--out", str(out), *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_process(out: Path, overrides: list[str], **kw):
    return train(load_config(TINY_MOE, overrides), out_dir=out, console=Console(file=io.StringIO()), plots=False, **kw)


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def max_record_diff(a_dir: Path, b_dir: Path, from_step: int = 0) -> float:
    """Largest difference of the logged per-step values (losses, gradient norm, per-expert load
    shares) and validation losses; the runs must log the same steps."""
    worst = 0.0
    for kind, keys in (("train", ("loss", "ce_loss", "aux_loss", "z_loss", "grad_norm")), ("eval", ("val_loss",))):
        a = [r for r in records(a_dir, kind) if r["step"] > from_step]
        b = [r for r in records(b_dir, kind) if r["step"] > from_step]
        assert [r["step"] for r in a] == [r["step"] for r in b] and a
        for ra, rb in zip(a, b):
            worst = max(worst, *(abs(ra[k] - rb[k]) for k in keys))
            for la, lb in zip(ra["layers"], rb["layers"]):
                worst = max(worst, *(abs(x - y) for x, y in zip(la["load"], lb["load"])))
    return worst


def max_weight_diff(a_ckpt: Path, b_ckpt: Path) -> float:
    a, b = load_file(a_ckpt / "model.safetensors"), load_file(b_ckpt / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # the single-process layout
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _pair(tiny_data_dir, tmp_path_factory, name: str, extra: tuple) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp(name)
    over = tiny(tiny_data_dir, *extra)
    proc = torchrun(base / "two", over)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one_process(base / "one", over)
    return base / "two", base / "one"


@pytest.fixture(scope="module")
def dp_runs(tiny_data_dir, tmp_path_factory):
    return _pair(tiny_data_dir, tmp_path_factory, "dp", DP)


@pytest.fixture(scope="module")
def ep_runs(tiny_data_dir, tmp_path_factory):
    return _pair(tiny_data_dir, tmp_path_factory, "ep", EP)


# ---------------------------------------------------------------------------------------------
# (a), (b): N processes train the same model as one


def test_data_parallel_two_processes_train_the_same_model_as_one(dp_runs):
    two, one = dp_runs
    assert len(records(two, "train")) == 6  # rank 0 alone writes metrics: each step once
    logged = max_record_diff(two, one)
    weights = max_weight_diff(two / "checkpoints" / "step-0000006", one / "checkpoints" / "step-0000006")
    print(f"data parallel, 2 processes vs 1: max |diff| logged values {logged:.2e}, final weights {weights:.2e}")
    assert logged < TOL and weights < TOL


def test_expert_parallel_two_experts_per_rank_train_the_same_model_as_one(ep_runs):
    two, one = ep_runs
    # the experts gathered from both ranks: w_gate_up (4, 32, 64) as in the single-process model
    w = load_file(two / "checkpoints" / "step-0000006" / "model.safetensors")
    assert w["layers.0.mlp.experts.w_gate_up"].shape == (4, 32, 64)
    logged = max_record_diff(two, one)
    weights = max_weight_diff(two / "checkpoints" / "step-0000006", one / "checkpoints" / "step-0000006")
    print(f"expert parallel, 2 processes vs 1: max |diff| logged values {logged:.2e}, final weights {weights:.2e}")
    assert logged < TOL and weights < TOL


# ---------------------------------------------------------------------------------------------
# (c): checkpoints move between 2 processes and 1


@pytest.mark.parametrize("runs, extra", [("dp_runs", DP), ("ep_runs", ("train.batch_size=4",))])
def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_next_loss(request, tmp_path, tiny_data_dir,
                                                                                 runs, extra):
    """The expert-parallel checkpoint resumes with expert_parallel off (a resumable change)."""
    two, one = request.getfixturevalue(runs)
    resumed = one_process(tmp_path / "resumed", tiny(tiny_data_dir, *extra),
                          resume=str(two / "checkpoints" / "step-0000003"))
    assert resumed.steps == 6
    assert [r["step"] for r in records(tmp_path / "resumed", "train")][3:] == [4, 5, 6]
    logged = max_record_diff(tmp_path / "resumed", one, from_step=3)  # the next loss, and the two after
    weights = max_weight_diff(resumed.checkpoint, one / "checkpoints" / "step-0000006")
    print(f"{runs}: step-3 checkpoint resumed in 1 process: max |diff| steps 4-6 {logged:.2e}, weights {weights:.2e}")
    assert logged < TOL and weights < TOL


def test_a_single_process_checkpoint_loads_each_ranks_share_of_the_experts(ep_runs, tiny_data_dir):
    """The reverse direction, rank by rank, without launching: the model and the AdamW moments of
    rank r are rows [2r, 2r + 2) of the single-process checkpoint."""
    _, one = ep_runs
    ckpt = one / "checkpoints" / "step-0000003"
    full = load_file(ckpt / "model.safetensors")
    full_opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, *EP))
    cfg.model.vocab_size = full["embed_tokens.weight"].shape[0]
    from moe_lm.model.transformer import Transformer

    for rank in (0, 1):
        model = Transformer(cfg.model)
        for layer in model.moe_layers():
            layer.shard_experts(distributed.ExpertParallel(rank, 2, 2))
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        ckpt_io.load_checkpoint(ckpt, model, opt, restore_rng=False, layout=distributed.LocalLayout(model, opt))
        name = "layers.1.mlp.experts.w_down"
        p = dict(model.named_parameters())[name]
        assert torch.equal(p.detach(), full[name][2 * rank:2 * rank + 2])
        i = next(i for i, q in enumerate(opt.param_groups[0]["params"]) if q is p)
        full_i = full_opt["param_groups"][0]["params"][i]
        assert torch.equal(opt.state[p]["exp_avg_sq"], full_opt["state"][full_i]["exp_avg_sq"][2 * rank:2 * rank + 2])


# ---------------------------------------------------------------------------------------------
# (d): a dying rank, and settings that cannot be split


def test_a_rank_that_dies_stops_the_others_with_an_error_not_a_hang(tmp_path, tiny_data_dir):
    """Rank 1 is SIGKILLed at step 2 (as by the OOM killer). The survivor must not wait for the
    process-group timeout (300 s): it stops on the broken connection with a one-line error, or
    torchrun stops it first, and torchrun names rank 1 in its failure summary."""
    t0 = time.monotonic()
    proc = torchrun(tmp_path / "run", tiny(tiny_data_dir, *EP, "train.max_steps=50"),
                    env={"MOE_LM_TEST_DIE": "1:2", distributed.TIMEOUT_ENV: "300"}, timeout=150)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and elapsed < 120
    assert "rank 1 dies at step 2" in out
    summary = out[out.index("moe_lm FAILED"):]
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : -9" in summary  # SIGKILL
    assert ("error: rank 0 of 2 lost contact with the other processes" in out
            and "rank      : 0 (local_rank: 0)\n  exitcode  : 2" in summary) or "SIGTERM" in summary


def _worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of this rank (a child of the agent, RANK in its environment)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == agent_pid and f"\0RANK={rank}\0".encode() in b"\0" + (stat.parent / "environ").read_bytes():
                return int(stat.parent.name)
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError(f"no worker of rank {rank} under pid {agent_pid}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_a_sigterm_to_one_rank_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path, tiny_data_dir):
    """A scheduler or `kill` sends SIGTERM to one worker only: rank 0 learns of it at the step's
    all-reduce, both stop after the same step, rank 0 writes one checkpoint, both exit 143, and
    the run resumes (here in one process) where it stopped."""
    import signal

    run = tmp_path / "run"
    over = tiny(tiny_data_dir, *DP, "train.eval_every=1000", "train.checkpoint_every=1000")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "moe_lm", "train", "--config", str(TINY_MOE),
           "--out", str(run), *over, "train.max_steps=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not any(r.get("kind") == "train" and r["step"] >= 2 for r in read_metrics(run / "metrics.jsonl")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    text = out + err
    assert "lost contact" not in text  # rank 1 did not leave rank 0 alone in a collective
    stopped = ckpt_io.read_state(ckpt_io.find_latest(run))["step"]
    assert stopped >= 2
    interrupted = [r for r in records(run, "event") if r["event"] == "interrupted"]
    assert [(r["step"], r["signal"]) for r in interrupted] == [(stopped, "SIGTERM")]
    assert f"interrupted at step {stopped} (SIGTERM)" in out and "torchrun --nproc_per_node=2" in out
    summary = text[text.index("moe_lm FAILED"):]
    assert "exitcode  : 143" in summary and "exitcode  : -" not in summary  # 128 + SIGTERM, not killed

    resumed = one_process(run, [*over, f"train.max_steps={stopped + 2}"], resume="auto")
    assert resumed.steps == stopped + 2
    assert [r["step"] for r in records(run, "train")] == list(range(1, stopped + 3))  # one unbroken run


def test_a_global_batch_or_expert_count_that_does_not_split_is_a_config_error(tiny_data_dir):
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "train.batch_size=6", "train.grad_accum=2"))
    _check_parallel(cfg, distributed.SINGLE)  # one process: anything goes
    with pytest.raises(ConfigError, match=r"train.batch_size = 6 is the global batch .* 2 x 2 = 4"):
        _check_parallel(cfg, distributed.Dist(rank=0, world_size=2))
    cfg = load_config(TINY_MOE, tiny(tiny_data_dir, "model.moe.expert_parallel=true", "train.batch_size=12"))
    with pytest.raises(ConfigError, match=r"n_experts \(4\) divisible by the number of processes \(3\)"):
        _check_parallel(cfg, distributed.Dist(rank=0, world_size=3))


def test_one_process_joins_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group("cpu") as ctx:
        assert ctx is distributed.SINGLE and not torch.distributed.is_initialized()


@pytest.mark.parametrize("command", [["compare-dense", "-c", "configs/tiny-moe.yaml"], ["eval", "runs/nowhere"],
                                     ["prepare", "--data-files", "nowhere/*.txt"], ["generate", "runs/nowhere"]])
def test_commands_other_than_train_refuse_to_run_under_torchrun(command, monkeypatch, cli_here, tmp_path):
    # under torchrun every rank ran compare-dense in full, writing the same folders; rank 1 then
    # failed with "no checkpoint" on a run rank 0 had written (a newcomer's trial)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = cli_here(*command)
    assert code == 2 and err.count("\n") == 1, err
    assert f"`moe-lm {command[0]}` runs as one process, but torchrun started 2" in err and "torchrun is for" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "torchrun" not in cli_here(*command)[2]  # one process: the command's own checks
