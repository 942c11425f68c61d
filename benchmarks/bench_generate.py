"""Generation speed with and without the KV cache: tokens/s for a prompt and N new tokens.

    python benchmarks/bench_generate.py runs/tiny-moe                   # a trained run (or an export)
    python benchmarks/bench_generate.py --config configs/tiny-moe.yaml  # random weights, same shape
    python benchmarks/bench_generate.py runs/tiny-moe --prompt-tokens 256 --new-tokens 256 --threads 2

Greedy decoding of the same tokens both ways (end-of-text does not stop it), alternating rounds,
median of the repeats. With the cache each token costs one position's forward; without it every
token recomputes the whole sequence, so the gap widens with the prompt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", type=Path, help="a run, checkpoint or exported folder")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny-moe.yaml",
                    help="without PATH: a random model of this config's shape")
    ap.add_argument("--vocab-size", type=int, default=8192, help="without PATH: the vocabulary size")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import moe_lm  # noqa: F401, I001 - first: it sets torch's OpenMP spin count before torch loads
    import torch

    from moe_lm.generate import GenerationStats, generate_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.path is not None:
        from moe_lm.loading import load_model

        model, name = load_model(args.path, device=args.device).model, str(args.path)
    else:
        from moe_lm.config import load_config
        from moe_lm.model.transformer import Transformer

        cfg = load_config(args.config, [f"model.vocab_size={args.vocab_size}"])
        torch.manual_seed(0)
        model, name = Transformer(cfg.model).to(args.device).eval(), f"{args.config.name} (random weights)"
    vocab = model.cfg.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    def once(use_cache: bool) -> tuple[float, list[int]]:
        stats = GenerationStats()
        ids = list(generate_ids(model, prompt, args.new_tokens, temperature=0, use_cache=use_cache, stats=stats))
        return stats.tokens_per_s, ids

    once(True), once(False)  # warm-up
    rates: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            rate, outputs[use_cache] = once(use_cache)
            rates[use_cache].append(rate)
    result = {
        "model": name, "params": model.num_params(), "device": args.device, "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "tokens_per_s_kv_cache": statistics.median(rates[True]),
        "tokens_per_s_no_cache": statistics.median(rates[False]),
        "same_tokens": outputs[True] == outputs[False],
    }
    result["speedup"] = result["tokens_per_s_kv_cache"] / result["tokens_per_s_no_cache"]
    print(f"{name}: {result['params']:,} parameters, {args.device}, {result['threads']} threads, "
          f"prompt {args.prompt_tokens} + {args.new_tokens} new tokens (greedy), median of {args.repeats}")
    print(f"  with KV cache    {result['tokens_per_s_kv_cache']:8.1f} tokens/s")
    print(f"  without (recompute) {result['tokens_per_s_no_cache']:5.1f} tokens/s")
    print(f"  speed-up x{result['speedup']:.1f}; same tokens both ways: {result['same_tokens']}")
    return result


if __name__ == "__main__":
    main()
