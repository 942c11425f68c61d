"""The benchmarks' harness (never their timings): busy-loop processes are gone however
bench_layer ends, and the gpu-check script's dry run works on a CPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_lm import bench
from moe_lm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (nobody reaped it yet); busy_loops reaps its own, so none should be left
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def test_busy_loops_run_during_the_block_and_are_gone_after_it():
    with bench.busy_loops(2) as pids:
        assert len(pids) == 2 and all(alive(p) for p in pids)
    assert not any(alive(p) for p in pids)


def test_busy_loops_are_stopped_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with bench.busy_loops(1) as pids:
            raise RuntimeError("boom")
    assert pids and not any(alive(p) for p in pids)


def test_bench_layer_with_a_busy_loop_leaves_no_process_behind():
    r = bench.bench_layer(d_model=16, tokens=64, experts=4, top_k=2, repeats=1, warmup=0, hf=False, busy=1)
    assert r["busy"] == 1 and len(r["busy_pids"]) == 1
    assert not alive(r["busy_pids"][0])


def test_bench_layer_that_raises_leaves_no_busy_process_behind(monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*a, **kw):
        p = real_popen(*a, **kw)
        started.append(p.pid)
        return p

    monkeypatch.setattr(bench.subprocess, "Popen", recording_popen)

    def broken_peak(*a, **kw):  # fails inside the busy block, after the timing
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(bench, "measure_peak", broken_peak)
    with pytest.raises(RuntimeError, match="measurement failed"):
        bench.bench_layer(d_model=16, tokens=64, experts=4, top_k=2, repeats=1, warmup=0, hf=False, busy=1)
    assert len(started) == 1 and not alive(started[0])


def test_busy_loops_stop_on_sigterm():
    """A benchmark process killed with SIGTERM takes its busy loops with it."""
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from moe_lm.bench import busy_loops\n"
            "with busy_loops(1) as pids:\n"
            "    print(pids[0], flush=True)\n"
            "    time.sleep(60)\n") % str(ROOT)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline())
    assert alive(pid)
    p.terminate()
    p.wait(timeout=30)
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_bench_layer_refuses_a_negative_busy_count_and_an_unknown_path():
    with pytest.raises(ConfigError):
        bench.bench_layer(d_model=16, tokens=64, experts=4, top_k=2, repeats=1, hf=False, busy=-1)
    with pytest.raises(ConfigError):
        bench.bench_layer(d_model=16, tokens=64, experts=4, top_k=2, repeats=1, hf=False, also_paths=("nope",))


def test_bench_layer_times_forced_paths_beside_the_default():
    r = bench.bench_layer(d_model=16, tokens=64, experts=4, top_k=2, repeats=1, warmup=0, hf=False,
                          also_paths=("fused", "padded"))
    assert set(r["paths"]) == {"fused", "padded"} and r["dispatch"] in ("cpu_kernel", "fused")


def test_gpu_check_dry_run_prints_the_plan_and_exits_0(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for what in ("pytest -m cuda", "bench_layer.py --device cuda --dtype bfloat16", "configs/small-moe.yaml",
                 "torch.distributed.run --standalone --nproc_per_node=2", "compare-dense"):
        assert what in p.stdout, what
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_gpu_check_plan_fits_its_time_budget_and_drops_torchrun_on_one_gpu(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert sum(s.budget_s for s in gpu_check.plan(tmp_path, None)) <= 480
    one = [s.name for s in gpu_check.plan(tmp_path, 1)]
    assert not any("torchrun" in n for n in one) and len(one) == len(gpu_check.plan(tmp_path, 2)) - 1


@pytest.mark.parametrize("env, first, expect", [({}, "", "10000"), ({"GOMP_SPINCOUNT": "5"}, "", "5"),
                                                ({"OMP_WAIT_POLICY": "PASSIVE"}, "", "None"),
                                                ({}, "import torch; ", "None")],
                         ids=["default", "user-spincount", "user-wait-policy", "torch-already-loaded"])
def test_importing_moe_lm_bounds_openmp_spinning_before_torch_loads(env, first, expect):
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: moe_lm sets a short spin before any
    torch import (docs/PERFORMANCE.md: the busy-core stalls), never over the user's own
    GOMP_SPINCOUNT or OMP_WAIT_POLICY (a passive policy would be overridden by a spin count), and
    not once torch is loaded (it would change nothing and the run records would say it did)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = first + "import os, sys; loaded = 'torch' in sys.modules; import moe_lm; " \
                   "print(loaded, os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(bool(first)), expect]


def _thread_replicas_and_a_tiny_moe():
    """benchmarks/bench_thread_replicas.py as a module, and a tiny MoE without a balance loss (the
    one term that is not a mean over tokens, so the replicas' step equals the whole batch's)."""
    import torch

    from moe_lm.config import ModelConfig, MoEConfig
    from moe_lm.model.transformer import Transformer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_thread_replicas
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, seq_len=16, ffn_hidden=16,
                      moe=MoEConfig(n_experts=4, top_k=2, balance_loss="none", z_loss_coef=1e-2))
    return bench_thread_replicas, Transformer(cfg)


def test_thread_replicas_step_as_the_single_process_step():
    """benchmarks/bench_thread_replicas.py (a lever measured, not built) must time a real step:
    three of its steps (replicas' summed gradients, clipping, AdamW) give the parameters that plain
    autograd on the whole batch and the same clipping and AdamW give, on another batch each step;
    a thread started afterwards keeps torch's thread count; an uneven split is refused."""
    import copy
    import threading

    import torch

    threads = torch.get_num_threads()
    bench_thread_replicas, plain = _thread_replicas_and_a_tiny_moe()
    model = copy.deepcopy(plain)
    reps = bench_thread_replicas.ThreadReplicas(model, 2)
    seen = []  # a thread started afterwards inherits the process-wide count: not the workers' 1
    (t := threading.Thread(target=lambda: seen.append(torch.get_num_threads()))).start()
    t.join()
    assert seen == [threads] and torch.get_num_threads() == threads
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, model)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 50, (4, 17), generator=gen)
        inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        out = plain(inp, tgt)
        (out.loss + out.aux_loss + out.z_loss).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opts[0].step()
        opts[0].zero_grad(set_to_none=True)
        reps.step(opts[1], inp, tgt)
        for (n, p), q in zip(plain.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="equal shares"):
        reps.backward(inp[:3], tgt[:3])


def test_thread_replicas_sum_to_the_whole_batch_gradient():
    """The replicas' summed gradient is plain autograd's on the whole batch, scale included (AdamW
    and clipping would hide a wrong scale from the step test above)."""
    import torch

    bench_thread_replicas, model = _thread_replicas_and_a_tiny_moe()
    x = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(1))
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    out = model(inp, tgt)
    (out.loss + out.aux_loss + out.z_loss).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    bench_thread_replicas.ThreadReplicas(model, 2).backward(inp, tgt)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bench_train_measures_the_configs_vocabulary_before_prepare(tmp_path):
    # a fresh clone has no data folder: bench train must time the model `moe-lm prepare -c` and then
    # `train` build (data.vocab_size), not a model with prepare's default vocabulary (it timed an
    # 8192-token head for tiny-moe's 2048 once, twice the step of the real model)
    from moe_lm.config import load_config

    small = [f"data.dir={tmp_path / 'not-prepared'}", "model.d_model=16", "model.n_heads=2", "model.seq_len=8",
             "model.ffn_hidden=8", "model.moe.n_experts=4", "model.moe.top_k=2", "train.batch_size=2"]
    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", small)
    assert cfg.data.vocab_size == 2048 and cfg.model.vocab_size is None
    r = bench.bench_train(cfg, steps=1, rounds=1, warmup=0, device="cpu")
    assert r["vocab_size"] == 2048 and r["vocab_from"].startswith("data.vocab_size")
    # and the model timed is the 2048-token one
    from moe_lm.model.transformer import Transformer

    want = Transformer(load_config(ROOT / "configs" / "tiny-moe.yaml", [*small, "model.vocab_size=2048"]).model).num_params()
    assert r["models"]["moe"]["params"] == want
    assert bench.bench_train(cfg, vocab_size=300, steps=1, rounds=1, warmup=0, device="cpu")["vocab_size"] == 300
    # a prepared folder wins over data.vocab_size: its tokenizer is what train builds the model with
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "meta.json").write_text('{"vocab_size": 321}')
    prepared = load_config(ROOT / "configs" / "tiny-moe.yaml", [*small, f"data.dir={tmp_path / 'prepared'}"])
    r = bench.bench_train(prepared, steps=1, rounds=1, warmup=0, device="cpu")
    assert r["vocab_size"] == 321 and r["vocab_from"] == f"the tokenizer of {tmp_path / 'prepared'}"
    # model.vocab_size is the model's, and a data.vocab_size that contradicts it is named
    r = bench.bench_train(load_config(ROOT / "configs" / "tiny-moe.yaml", [*small, "model.vocab_size=500"]),
                          steps=1, rounds=1, warmup=0, device="cpu")
    assert r["vocab_size"] == 500 and "data.vocab_size is 2048" in r["vocab_from"]
    with pytest.raises(ConfigError, match="vocab_size"):
        bench.bench_train(cfg, vocab_size=0, steps=1, rounds=1, warmup=0, device="cpu")


def test_bench_train_on_a_dense_config_times_it_alone_and_says_so(tmp_path):
    # it printed "tiny-dense vs its dense twin" over one row, and "(both models)"
    import io

    from rich.console import Console

    from moe_lm.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny-dense.yaml", [f"data.dir={tmp_path}", "model.d_model=16",
                                                            "model.n_heads=2", "model.seq_len=8", "train.batch_size=2"])
    r = bench.bench_train(cfg, steps=1, rounds=1, warmup=0, device="cpu")
    assert list(r["models"]) == ["dense"] and "moe_over_dense_tokens_per_s" not in r
    buf = io.StringIO()
    bench.render_train(r, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "(dense: no twin)" in text and "twin " not in text.replace("no twin)", "") and "both models" not in text


TINY_ARMS = ["--rounds", "2", "--steps", "1", "--warmup", "0", "model.d_model=16", "model.n_heads=2",
             "model.seq_len=8", "model.ffn_hidden=8", "model.moe.n_experts=4", "model.moe.top_k=2",
             "train.batch_size=2", "model.vocab_size=64"]


def _bench_against_commit():
    n_path = len(sys.path)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_against_commit
    finally:
        del sys.path[:len(sys.path) - n_path]
    return bench_against_commit


def _commit(rev: str):
    got = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                         capture_output=True, text=True)
    return got.stdout.strip() or None


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs this repository's git history")
def test_bench_against_commit_loads_the_commits_own_code_and_times_four_arms(tmp_path, capsys):
    """benchmarks/bench_against_commit.py: the commit's package must run its OWN code (an absolute
    `import moe_lm` inside it would silently time this checkout twice), every arm is timed, and the
    process is left as it was (no path to deleted files, no stale package)."""
    bac = _bench_against_commit()
    head = _commit("HEAD")
    n_path, modules = len(sys.path), set(sys.modules)
    r = bac.main(["HEAD", *TINY_ARMS])
    assert len(sys.path) == n_path and not any(m.startswith("moe_lm_at_") for m in set(sys.modules) - modules)
    assert set(r["tokens_per_s"]) == {"this moe", "this dense", f"{head[:10]} moe", f"{head[:10]} dense"}
    assert all(v > 0 for v in r["tokens_per_s"].values()) and r["vocab_size"] == 64 and r["batch_tokens"] == 16
    assert "this checkout / " in capsys.readouterr().out
    try:
        pkg, sha = bac.import_commit("HEAD", tmp_path)
        assert sha == head and pkg.__name__ == f"moe_lm_at_{head[:10]}"
        from moe_lm.model import transformer

        old_t = bac.find(pkg, ["model.transformer.Transformer"])
        assert Path(sys.modules[old_t.__module__].__file__).is_relative_to(tmp_path)
        assert old_t is not transformer.Transformer
        with pytest.raises(SystemExit, match="already loaded"):
            bac.import_commit("HEAD", tmp_path / "again")
    finally:
        del sys.path[:len(sys.path) - n_path]
        for m in [m for m in sys.modules if m.startswith("moe_lm_at_")]:
            del sys.modules[m]
    with pytest.raises(SystemExit, match="is not a commit"):
        bac.import_commit("no-such-commit-xyz", tmp_path / "x")


@pytest.mark.skipif(_commit("2d13d0b") is None, reason="needs the history back to 2d13d0b")
def test_bench_against_commit_runs_the_issues_commit():
    """The commit PERFORMANCE.md compares against: its optimizer lived in training.trainer and its
    package set no OpenMP spin count; the script must still build and time its arms."""
    r = _bench_against_commit().main(["2d13d0b", *TINY_ARMS])
    assert r["commit"].startswith("2d13d0b") and all(v > 0 for v in r["tokens_per_s"].values())


def test_bench_against_commit_refuses_this_only_overrides_that_change_the_batch_or_model(capsys):
    """--this applies to this checkout's arms only, so it may not change what both time (the batch,
    the model, its initial weights) or name what the script ignores (device, dtype); a wrong value
    fails before anything is built."""
    bac = _bench_against_commit()
    for bad in ("train.batch_size=8", "model.d_model=32", "train.grad_accum=2", "train.seed=3", "train.device=cuda"):
        with pytest.raises(SystemExit, match="only train.compile"):
            bac.main(["HEAD", "--this", bad, *TINY_ARMS])
    with pytest.raises(SystemExit, match="expected true or false"):
        bac.main(["HEAD", "--this", "train.compile=maybe", *TINY_ARMS])


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs this repository's git history")
def test_bench_against_commit_applies_this_to_this_checkouts_arms_only(monkeypatch):
    """--this train.compile=true: this checkout's MoE and dense arms go through its compile_model,
    the commit's arms (its own package, here HEAD's files) do not."""
    from moe_lm.training import step

    def boom(*args, **kwargs):
        raise AssertionError("the commit's arms were compiled: --this leaked into them")

    compiled = []
    monkeypatch.setattr(step, "compile_model", lambda model, ddp=None: compiled.append(model) or model)
    monkeypatch.setattr(torch, "compile", boom)  # what the commit's own compile would call
    monkeypatch.setattr(torch.nn.Module, "compile", boom)
    r = _bench_against_commit().main(["HEAD", "--this", "train.compile=true", *TINY_ARMS])
    assert len(compiled) == 2 and {type(m).__module__ for m in compiled} == {"moe_lm.model.transformer"}
    assert r["this_overrides"] == ["train.compile=true"] and all(v > 0 for v in r["tokens_per_s"].values())


def test_bench_train_reports_the_ratio_round_by_round_from_its_own_timings(tmp_path, monkeypatch):
    # one reading of the demo's ratio moved 0.79 -> 0.91 between processes: each round's pair of
    # back-to-back timings is shown too, so a reader sees how far one figure can be trusted
    import io

    from rich.console import Console

    from moe_lm.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", [f"data.dir={tmp_path}", "model.d_model=16", "model.n_heads=2",
                                                            "model.seq_len=8", "model.ffn_hidden=8",
                                                            "model.moe.n_experts=4", "model.moe.top_k=2",
                                                            "train.batch_size=2"])
    # a fake clock that only the steps move: the MoE's rounds take 2, 4, 2 s a step, the twin's 1 s
    now = [0.0]
    moe_steps = iter([2.0, 4.0, 2.0])

    def step(r, inp, tgt, amp):
        now[0] += next(moe_steps) if r["model"].moe_layer_ids() else 1.0

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(bench, "_train_step", step)
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda *a, **k: 1e12)
    r = bench.bench_train(cfg, steps=1, rounds=3, warmup=0, device="cpu", vocab_size=64)
    # tokens/s ratio = dense step time / MoE step time, round by round: 1/2, 1/4, 1/2
    assert r["moe_over_dense_per_round"] == [0.5, 0.25, 0.5]
    assert r["moe_over_dense_tokens_per_s"] == 0.5  # medians: MoE 2 s, dense 1 s a step
    buf = io.StringIO()
    bench.render_train(r, Console(file=buf, width=200))
    assert "MoE / dense tokens/s: 0.500 (round by round: median 0.500, 0.250..0.500 over 3 rounds)" in buf.getvalue()
