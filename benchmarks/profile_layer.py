"""Where the MoE layer's time goes: torch.profiler over forward+backward of the layer that
`moe-lm bench layer` times (SwiGLU, softmax top-k, d_model 512, 8192 tokens), grouped into
matmuls, gathers/scatters, routing and the rest.

    python benchmarks/profile_layer.py                    # 8 experts top-2, 2 threads
    python benchmarks/profile_layer.py --experts 64 --top-k 8
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# CPU op names -> the bucket they belong to (first match wins; the rest is "other")
BUCKETS = [
    ("matmul (expert and router GEMMs)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm")),
    ("gather / scatter (index_select, index_add)", ("aten::index_select", "aten::index_add", "aten::index",
                                                    "aten::gather", "aten::scatter")),
    ("activation (silu, mul)", ("aten::silu", "aten::mul", "aten::sigmoid", "aten::silu_backward")),
    ("routing (softmax, top-k, sort, bincount)", ("aten::softmax", "aten::_softmax", "aten::topk", "aten::sort",
                                                  "aten::argsort", "aten::bincount", "aten::logsumexp")),
    ("memory (empty, zeros, copy)", ("aten::empty", "aten::zeros", "aten::zero_", "aten::fill_", "aten::copy_",
                                     "aten::cat", "aten::clone")),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)

    import moe_lm  # noqa: F401, I001 - first: it sets torch's OpenMP spin count before torch loads
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moe_lm.config import MoEConfig
    from moe_lm.model.moe import MoELayer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h = 4 * args.d_model // args.top_k
    layer = MoELayer(args.d_model, h, "swiglu", MoEConfig(n_experts=args.experts, top_k=args.top_k,
                                                         router="softmax_topk", balance_loss="switch"), 0.02, 0.02)
    x = torch.randn(1, args.tokens, args.d_model)
    gy = torch.randn_like(x)

    def step():
        xi = x.detach().requires_grad_(True)
        layer(xi)[0].backward(gy)
        layer.zero_grad(set_to_none=True)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()

    # self time per op, so nested ops are not counted twice
    per_op = defaultdict(float)
    for e in prof.key_averages():
        per_op[e.key] += e.self_cpu_time_total
    total = sum(per_op.values())
    buckets = defaultdict(float)
    for op, us in per_op.items():
        name = next((b for b, ops in BUCKETS if any(op == o or op.startswith(o + "_") for o in ops)), "other")
        buckets[name] += us
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, d_model {args.d_model}, {args.experts} experts top-{args.top_k} "
          f"x {h} (SwiGLU), {args.threads} threads: {total / args.steps / 1e3:.0f} ms per step (profiled)")
    for name, us in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * us / total:5.1f}%  {us / args.steps / 1e3:7.1f} ms  {name}")
    print("top ops by self time:")
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {100 * us / total:5.1f}%  {op}")


if __name__ == "__main__":
    main()
