"""A lever measured, not built: data parallelism over threads inside one process.

The trainer's step runs torch's intra-op threads: every operation is split over all cores. This
script times that step (`moe_lm.bench._train_step`, as `moe-lm bench train` does) against the
same step with the batch split over N threads, each holding a replica of the model (the same
parameter storage, its own gradients) and running torch single-threaded; the replicas' gradients
are summed in a fixed order, then clipping and AdamW run once. The MoE arm and its dense twin
alternate, so clock drifts hit both alike.

Why it is not in the trainer (docs/PERFORMANCE.md): the replicas' balance losses would each see
their own share of the batch (the project's rule is the whole step's batch: that needs an exchange
between the threads in the middle of every forward and backward), a noisy router would draw its
noise from one generator in two threads (order not reproducible), and on more cores the Python
half of each step holds the GIL, which this 2-core machine cannot measure.

    python benchmarks/bench_thread_replicas.py                       # tiny-moe and its twin
    python benchmarks/bench_thread_replicas.py -c configs/switch.yaml --rounds 9 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_lm  # noqa: E402,F401 - before torch: the OpenMP spin count (moe_lm/__init__.py)
import torch  # noqa: E402


class ThreadReplicas:
    """n replicas of `model` on n threads (torch single-threaded in each) sharing its parameters."""

    def __init__(self, model: torch.nn.Module, n: int):
        self.model, self.replicas = model, []
        for _ in range(n):
            rep = copy.deepcopy(model)
            for p, q in zip(model.parameters(), rep.parameters()):
                q.data = p.data  # the same storage: the optimizer's updates reach every replica
            self.replicas.append(rep)
        self.jobs: list = [None] * n
        self.go = [threading.Semaphore(0) for _ in range(n)]
        self.done = threading.Semaphore(0)
        self.errors: list = []
        ready = threading.Barrier(n + 1)
        keep = torch.get_num_threads()
        for i in range(n):
            threading.Thread(target=self._worker, args=(i, ready), daemon=True).start()
        ready.wait()
        torch.set_num_threads(keep)  # the workers' set_num_threads(1) also wrote the process-wide count

    def _worker(self, i: int, ready: threading.Barrier) -> None:
        # as dispatch.ExpertThreads: torch's per-thread lazy init first, or it would undo the next line
        torch.get_num_threads()
        torch.set_num_threads(1)
        ready.wait()
        while True:
            self.go[i].acquire()
            try:
                inp, tgt = self.jobs[i]
                out = self.replicas[i](inp, tgt)
                ((out.loss + out.aux_loss + out.z_loss) / len(self.replicas)).backward()
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller
                self.errors.append(exc)
            finally:
                self.done.release()

    def backward(self, inp: torch.Tensor, tgt: torch.Tensor) -> None:
        """Replace the model's .grad by the gradient of the batch's loss: each replica takes an
        equal share of the rows (its loss the mean over them, / n), the shares' gradients summed in
        replica order. Exact without a balance loss; with one, each replica's balance loss sees only
        its own share (the one way this differs from the trainer's step)."""
        n = len(self.replicas)
        if inp.shape[0] % n:
            raise ValueError(f"a batch of {inp.shape[0]} rows does not split into {n} equal shares")
        for i, (a, b) in enumerate(zip(inp.chunk(n), tgt.chunk(n))):
            self.jobs[i] = (a, b)
            self.go[i].release()
        for _ in range(n):
            self.done.acquire()
        if self.errors:
            errors, self.errors = self.errors, []
            for r in self.replicas:
                r.zero_grad(set_to_none=True)
            raise errors[0]
        for p, *qs in zip(self.model.parameters(), *(r.parameters() for r in self.replicas)):
            grads = [q.grad for q in qs if q.grad is not None]  # None: unused in that replica's forward
            p.grad = torch.stack(grads).sum(0) if grads else None  # in replica order: deterministic
            for q in qs:
                q.grad = None

    def step(self, opt, inp: torch.Tensor, tgt: torch.Tensor) -> None:
        """One optimizer step as the trainer's (clipping at 1.0, AdamW), the gradient from `backward`."""
        self.backward(inp, tgt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    from moe_lm.bench import _train_step
    from moe_lm.config import load_config
    from moe_lm.model.accounting import dense_twin
    from moe_lm.model.transformer import Transformer
    from moe_lm.training.step import build_optimizer, seed_everything

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=str(ROOT / "configs/tiny-moe.yaml"))
    ap.add_argument("--replicas", type=int, default=torch.get_num_threads(), help="threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=12, help="steps per round and contender (median taken)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args()
    cfg = load_config(a.config)
    cfg.model.vocab_size = cfg.model.vocab_size or a.vocab_size
    bs, seq = cfg.train.batch_size // cfg.train.grad_accum, cfg.model.seq_len
    if cfg.model.moe is not None and cfg.model.moe.router in ("noisy_topk", "sigmoid_bias", "expert_choice"):
        sys.exit(f"error: router {cfg.model.moe.router} is not measured here (noise from one generator in"
                 " several threads; a bias update from one replica's counts; experts choosing among a share"
                 " of the batch): take a softmax_topk or switch config")
    if bs % a.replicas:
        sys.exit(f"error: the batch of {bs} sequences does not split into {a.replicas} replicas")
    x = torch.randint(0, cfg.model.vocab_size, (bs, seq + 1), generator=torch.Generator().manual_seed(0))
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    steps = {}
    for name, c in {"moe": cfg, "dense": dense_twin(cfg)}.items():
        seed_everything(0)
        model = Transformer(c.model)
        opt = build_optimizer(model, c, torch.device("cpu"))
        r = {"model": model, "opt": opt, "fwd": model}
        reps = ThreadReplicas(model, a.replicas)
        steps[f"{name} intra-op"] = lambda r=r: _train_step(r, inp, tgt, nullcontext)
        steps[f"{name} replicas"] = lambda reps=reps, opt=opt: reps.step(opt, inp, tgt)
    times: dict = {k: [] for k in steps}
    for fn in steps.values():
        for _ in range(3):
            fn()
    for rnd in range(a.rounds):
        for k, fn in steps.items():  # NOTE: alternate, so drifts in clock speed hit every contender alike
            ts = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            times[k].append(bs * seq / statistics.median(ts))
        row = {k: v[-1] for k, v in times.items()}
        print(f"round {rnd + 1}: " + "  ".join(f"{k} {v:,.0f}" for k, v in row.items())
              + f"  | MoE/dense intra-op {row['moe intra-op'] / row['dense intra-op']:.3f},"
              f" replicas {row['moe replicas'] / row['dense replicas']:.3f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"config": a.config, "threads": torch.get_num_threads(), "replicas": a.replicas,
           "tokens_per_s_median": med, "tokens_per_s_rounds": times,
           "moe_over_dense": {m: med[f"moe {m}"] / med[f"dense {m}"] for m in ("intra-op", "replicas")},
           "replicas_over_intra_op": {n: med[f"{n} replicas"] / med[f"{n} intra-op"] for n in ("moe", "dense")}}
    print(f"median tokens/s over {a.rounds} rounds: " + ", ".join(f"{k} {v:,.0f}" for k, v in med.items()))
    print("MoE / dense: intra-op {intra-op:.3f}, replicas {replicas:.3f}".format(**out["moe_over_dense"]))
    print("replicas / intra-op: MoE {moe:.3f}, dense {dense:.3f}".format(**out["replicas_over_intra_op"]))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
