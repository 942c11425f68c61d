"""A lever measured, not built: the experts' work in C++, whole experts per thread.

On two threads the demo's MoE step runs at ~0.8 of its dense twin's tokens/s, where on one thread
it runs at ~0.9 (docs/PERFORMANCE.md): every small operation of the fused path (a gather, two
matmuls, the activation, the scaling, per block of experts) is split over both threads, and such
small operations gain little from the second one. The cure tried here: each thread takes whole
experts and runs all of an expert's operations alone (`at::parallel_for` over the experts, ATen
ops inside, which then run single-threaded), in a C++ extension built at first use with torch's
`cpp_extension` (needs a C++ compiler and ninja). One fork-join per direction and layer, no Python
and no GIL between the operations, each expert's rows staying in one core's cache. The dispatch is
the fused path's: the same sort, the same per-expert formulas, and the combine by one index_add
over the expert-sorted rows, so the two agree bitwise here.

It reports (1) the largest difference from the fused path, outputs and gradients; (2) one MoE
layer of the demo's shape (4,096 tokens, 32 SwiGLU experts of width 64, top-4), forward and
backward, on one thread and on two; (3) the training step (`moe_lm.bench._train_step`) of the demo
model with the fused path, with this C++ path, and of the dense twin, alternating in one process.

    python benchmarks/bench_cpp_experts.py                  # about a minute after the build
    python benchmarks/bench_cpp_experts.py --rounds 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_lm  # noqa: E402,F401 - before torch: the OpenMP spin count (moe_lm/__init__.py)
import torch  # noqa: E402

CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
using at::Tensor;

// act: 0 SwiGLU (w_in holds gate then up), 1 ReLU, 2 GELU. Rows sorted by expert, sizes[e] each.
std::vector<Tensor> forward(Tensor x, Tensor token_s, Tensor weight_s, Tensor w_in, Tensor w_down,
                            std::vector<int64_t> sizes, int64_t act) {
  int64_t E = sizes.size(), hid = w_down.size(1);
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; e++) start[e + 1] = start[e] + sizes[e];
  std::vector<Tensor> saved(4 * E);  // per expert: h, act, silu(gate), y
  Tensor scaled = at::empty({token_s.size(0), x.size(1)}, x.options());
  at::parallel_for(0, E, 1, [&](int64_t lo, int64_t hi) {
    at::NoGradGuard no_grad;  // grad mode is per thread: OpenMP's workers start with it on
    for (int64_t e = lo; e < hi; e++) {
      int64_t n = sizes[e], s = start[e];
      if (!n) { for (int i = 0; i < 4; i++) saved[4 * e + i] = at::empty({0}, x.options()); continue; }
      Tensor h = at::mm(x.index_select(0, token_s.narrow(0, s, n)), w_in[e]), a, sg = at::empty({0}, x.options());
      if (act == 0) { sg = at::silu(h.narrow(1, 0, hid)); a = sg * h.narrow(1, hid, hid); }
      else a = act == 1 ? at::relu(h) : at::gelu(h);
      Tensor y = at::mm(a, w_down[e]), out = scaled.narrow(0, s, n);
      at::mul_out(out, y, weight_s.narrow(0, s, n).unsqueeze(1));
      saved[4 * e] = h; saved[4 * e + 1] = a; saved[4 * e + 2] = sg; saved[4 * e + 3] = y;
    }
  });
  saved.insert(saved.begin(), at::zeros_like(x).index_add_(0, token_s, scaled));
  return saved;  // out, then the saved tensors
}

std::vector<Tensor> backward(Tensor g, Tensor x, Tensor token_s, Tensor weight_s, Tensor w_in, Tensor w_down,
                             std::vector<int64_t> sizes, int64_t act, std::vector<Tensor> saved) {
  int64_t E = sizes.size(), hid = w_down.size(1), A = token_s.size(0);
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; e++) start[e + 1] = start[e] + sizes[e];
  Tensor dw = at::empty({A}, g.options()), dwin = at::empty_like(w_in), dwd = at::empty_like(w_down);
  Tensor dxs = at::empty({A, x.size(1)}, g.options());
  at::parallel_for(0, E, 1, [&](int64_t lo, int64_t hi) {
    at::NoGradGuard no_grad;  // grad mode is per thread: OpenMP's workers start with it on
    for (int64_t e = lo; e < hi; e++) {
      int64_t n = sizes[e], s = start[e];
      Tensor dwin_e = dwin[e], dwd_e = dwd[e];
      if (!n) { dwin_e.zero_(); dwd_e.zero_(); continue; }
      Tensor h = saved[4 * e], a = saved[4 * e + 1], sg = saved[4 * e + 2], y = saved[4 * e + 3];
      Tensor tok = token_s.narrow(0, s, n), gb = g.index_select(0, tok), dw_e = dw.narrow(0, s, n);
      at::sum_out(dw_e, gb * y, {1});
      gb.mul_(weight_s.narrow(0, s, n).unsqueeze(1));  // now dL/dy
      at::mm_out(dwd_e, a.t(), gb);
      Tensor da = at::mm(gb, w_down[e].t()), dh;
      if (act == 0) {
        dh = at::empty_like(h);
        Tensor d_up = dh.narrow(1, hid, hid), d_gate = dh.narrow(1, 0, hid);
        at::mul_out(d_up, da, sg);
        at::silu_backward_out(d_gate, da.mul_(h.narrow(1, hid, hid)), h.narrow(1, 0, hid));
      } else dh = act == 1 ? at::threshold_backward(da, h, 0) : at::gelu_backward(da, h);
      at::mm_out(dwin_e, x.index_select(0, tok).t(), dh);
      Tensor dx_e = dxs.narrow(0, s, n);
      at::mm_out(dx_e, dh, w_in[e].t());
    }
  });
  return {at::zeros_like(x).index_add_(0, token_s, dxs), dw, dwin, dwd};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
"""

ACTIVATIONS = {"swiglu": 0, "relu": 1, "gelu": 2}


def build():
    """The extension, built once into torch's extensions folder (~30 s on 2 cores)."""
    from torch.utils.cpp_extension import load_inline

    try:
        # NOTE: -fopenmp: at::parallel_for is a header template, so without it this file's loop runs
        # serially (each ATen op inside then splits itself over the threads, as in Python)
        return load_inline("moe_lm_cpp_experts", cpp_sources=CPP, extra_cflags=["-O2", "-fopenmp"],
                           extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError) as exc:
        sys.exit(f"error: building the C++ extension failed ({str(exc).splitlines()[0]}); it needs a C++ "
                 "compiler and ninja (pip install ninja)")


def cpp_experts_ffn(ext):
    """An autograd Function with dispatch.ExpertsFFN's signature, run by the extension."""

    class CppExpertsFFN(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight_s, w_in, w_down, token_s, sizes, activation):
            out, *saved = ext.forward(x, token_s, weight_s, w_in, w_down, sizes, ACTIVATIONS[activation])
            ctx.sizes, ctx.act, ctx.saved = sizes, ACTIVATIONS[activation], saved
            ctx.save_for_backward(x, weight_s, w_in, w_down, token_s)
            return out

        @staticmethod
        def backward(ctx, g):
            x, weight_s, w_in, w_down, token_s = ctx.saved_tensors
            dx, dw, dwin, dwd = ext.backward(g.contiguous(), x, token_s, weight_s, w_in, w_down, ctx.sizes,
                                             ctx.act, ctx.saved)
            return dx, dw, dwin, dwd, None, None, None

    return CppExpertsFFN


def demo_layer(cfg):
    """The demo's MoE layer, 4,096 routed tokens (its assignments) and an upstream gradient."""
    from moe_lm.model.moe import MoELayer

    torch.manual_seed(0)
    m = cfg.model
    layer = MoELayer(m.d_model, m.ffn_hidden, m.activation, m.moe, 0.02, 0.01)
    x = torch.randn(cfg.train.batch_size * m.seq_len, m.d_model)
    with torch.no_grad():
        r = layer.router(x, torch.arange(m.seq_len).repeat(cfg.train.batch_size))
    return layer, x, r.token, r.expert, r.weight.detach(), torch.randn_like(x)


def agreement(cfg, cpp_ffn) -> float:
    """Largest absolute difference between the fused path and the C++ one: output and the four
    gradients (x, gate weights, w_in, w_down)."""
    from moe_lm.model import dispatch

    layer, x, token, expert, weight, g = demo_layer(cfg)
    results = []
    for fn in (dispatch.ExpertsFFN, cpp_ffn):
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        dispatch.ExpertsFFN = fn
        y = dispatch.moe_ffn(xs, token, expert, ws, layer.experts)
        y.backward(g)
        results.append([y.detach(), xs.grad, ws.grad, layer.experts.w_in.grad, layer.experts.w_down.grad])
    return max(float((a - b).abs().max()) for a, b in zip(*results))


def time_layer(cfg, fused, cpp_ffn, rounds: int) -> dict:
    """Median forward and backward ms of one MoE layer, fused vs C++, on 1 and on 2+ threads."""
    from moe_lm.model import dispatch

    layer, x, token, expert, weight, g = demo_layer(cfg)
    xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
    keep, out = torch.get_num_threads(), {}
    for threads in sorted({1, keep}):
        torch.set_num_threads(threads)
        times = {"fused": [], "cpp": []}
        for i in range(rounds + 5):
            for name, fn in (("fused", fused), ("cpp", cpp_ffn)):
                dispatch.ExpertsFFN = fn
                t0 = time.perf_counter()
                y = dispatch.moe_ffn(xs, token, expert, ws, layer.experts)
                t1 = time.perf_counter()
                y.backward(g)
                if i >= 5:
                    times[name].append(((t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3))
        out[f"{threads}_threads"] = {name: {"forward_ms": statistics.median(f for f, _ in v),
                                            "backward_ms": statistics.median(b for _, b in v)}
                                     for name, v in times.items()}
    torch.set_num_threads(keep)
    return out


def time_steps(cfg, fused, cpp_ffn, rounds: int, steps: int) -> dict:
    """Tokens/s of the demo model's training step: fused path, C++ path, dense twin (alternating)."""
    from moe_lm.bench import _train_step
    from moe_lm.model import dispatch
    from moe_lm.model.accounting import dense_twin
    from moe_lm.model.transformer import Transformer
    from moe_lm.training.step import build_optimizer, seed_everything

    gen = torch.Generator().manual_seed(0)
    bs, seq = cfg.train.batch_size, cfg.model.seq_len
    batch = torch.randint(0, cfg.model.vocab_size, (bs, seq + 1), generator=gen)
    inp, tgt = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    arms = {}
    for name, c, fn in (("moe_fused", cfg, fused), ("moe_cpp", cfg, cpp_ffn), ("dense", dense_twin(cfg), fused)):
        seed_everything(0)
        model = Transformer(c.model)
        arms[name] = ({"model": model, "opt": build_optimizer(model, c, torch.device("cpu")), "fwd": model}, fn, [])
    for i in range(rounds + 1):  # the first round warms up
        for run, fn, times in arms.values():
            dispatch.ExpertsFFN = fn
            t0 = time.perf_counter()
            for _ in range(steps):
                _train_step(run, inp, tgt, nullcontext)
            if i:
                times.append((time.perf_counter() - t0) / steps)
    tps = {name: bs * seq / statistics.median(times) for name, (_, _, times) in arms.items()}
    same = all(torch.equal(p, q) for p, q in zip(arms["moe_fused"][0]["model"].parameters(),
                                                  arms["moe_cpp"][0]["model"].parameters()))
    return {"tokens_per_s": tps, "moe_fused_over_dense": tps["moe_fused"] / tps["dense"],
            "moe_cpp_over_dense": tps["moe_cpp"] / tps["dense"], "cpp_over_fused": tps["moe_cpp"] / tps["moe_fused"],
            "same_weights_after_training": same}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-moe.yaml"))
    ap.add_argument("--rounds", type=int, default=12, help="timed rounds per arm (median counts)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per round")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from moe_lm.config import load_config
    from moe_lm.model import dispatch

    cfg = load_config(args.config, ["model.vocab_size=2048"])
    fused, cpp_ffn = dispatch.ExpertsFFN, cpp_experts_ffn(build())
    try:
        r = {"threads": torch.get_num_threads(), "max_abs_difference": agreement(cfg, cpp_ffn),
             "layer": time_layer(cfg, fused, cpp_ffn, args.rounds * 4), "step": time_steps(cfg, fused, cpp_ffn,
                                                                                          args.rounds, args.steps)}
    finally:
        dispatch.ExpertsFFN = fused
    print(f"largest difference from the fused path (output, gradients): {r['max_abs_difference']:.3g}")
    for threads, v in r["layer"].items():
        print(f"MoE layer, {threads.replace('_', ' ')}: " + ", ".join(
            f"{name} forward {t['forward_ms']:.2f} ms + backward {t['backward_ms']:.2f} ms" for name, t in v.items()))
    s = r["step"]
    print("training step, tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in s["tokens_per_s"].items()))
    print(f"MoE / dense: fused {s['moe_fused_over_dense']:.3f}, C++ {s['moe_cpp_over_dense']:.3f}; "
          f"C++ / fused {s['cpp_over_fused']:.3f}; same weights after training: {s['same_weights_after_training']}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
