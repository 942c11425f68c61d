"""Sample text from a trained model, one token at a time, with a KV cache.

    for piece in generate_text(load_model("runs/tiny-moe"), "def main(", max_new_tokens=100, seed=0):
        print(piece, end="", flush=True)

    ids = list(generate_ids(model, prompt_ids, max_new_tokens=32, temperature=0))   # greedy

With the cache, the prompt is run once and each new token costs one position's forward (its
attention reads the cached keys/values); without it (`use_cache=False`, for benchmarks and as the
reference in tests) every step recomputes the whole sequence. For token-choice routers the two give
the same tokens, with or without a capacity limit (capacity is causal, per sequence, by position,
and the cache carries the per-expert counts). expert_choice routes a token depending on the other
tokens of the same forward, so there cached and recomputed generation differ (and both differ from
training, where the forward held a whole batch).

Sampling: temperature 0 = greedy (argmax); otherwise logits / temperature, then keep the top_k
most likely tokens, then the smallest set whose probability reaches top_p, and draw from a
generator seeded with `seed` (same seed, same text). Generation stops at <|endoftext|>.
Positions past the model's training length (seq_len) continue the rotary positions; the model
was not trained there, so expect text to degrade.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from .errors import ConfigError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0  # model time: forwards and sampling, prompt included
    stopped_at_eot: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float], max_new_tokens: int) -> None:
    """ConfigError unless every sampling option is a finite number in its range (the CLI calls it
    before loading the model)."""
    from . import checks

    checks.option_number("--temperature", temperature, 0, hint="0 = greedy, 1 = the model's distribution")
    checks.option_number("--top-k", top_k, 1, integer=True, hint="leave it out to keep every token")
    checks.option_number("--top-p", top_p, 0, 1, lo_open=True, hint="e.g. 0.9; leave it out to keep every token")
    checks.option_number("--max-new-tokens", max_new_tokens, 0, integer=True)


def check_options(*, temperature: float, top_k: Optional[int], top_p: Optional[float], max_new_tokens: int,
                  seed: int) -> Optional[int]:
    """`moe-lm generate`'s options, checked before the model is loaded (ConfigError naming the
    option). top_k: 0 or None keeps every token. Returns the top_k that generate_ids takes (None
    for every token)."""
    from . import checks

    checks.option_number("--top-k", top_k, 0, 2**32, integer=True, hint="0 = every token")
    check_sampling(temperature, top_k or None, top_p, max_new_tokens)
    checks.option_number("--seed", seed, 0, checks.SEED_MAX, integer=True)
    return top_k or None


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(model, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                 eot_id: Optional[int] = None, use_cache: bool = True,
                 stats: Optional[GenerationStats] = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt_ids` (not empty); stops after
    yielding nothing at `eot_id`. `model`: a Transformer in eval mode."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if len(prompt_ids) == 0:
        raise ConfigError("the prompt has no tokens", "start it with the end-of-text token, as generate_text does")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, T)
    cache = model.new_cache() if use_cache else None
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = idx.size(1)
    step_input = idx
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()  # NOTE: only model work is timed, not the consumer's printing
        if use_cache:
            logits = model(step_input, cache=cache).logits[:, -1]
        else:
            logits = model(idx).logits[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (1,)
        token = int(nxt.item())
        stats.seconds += time.perf_counter() - t0
        if eot_id is not None and token == eot_id:
            stats.stopped_at_eot = True
            return
        stats.new_tokens += 1
        yield token
        step_input = nxt.view(1, 1)
        if not use_cache:
            idx = torch.cat((idx, step_input), dim=1)


def generate_text(loaded, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: Optional[int] = 50, top_p: Optional[float] = None, seed: int = 0, use_cache: bool = True,
                  stats: Optional[GenerationStats] = None) -> Iterator[str]:
    """Yield decoded text as it is generated, never cutting a UTF-8 character in two.

    `loaded`: what loading.load_model returns. The prompt is encoded after <|endoftext|>, which
    marks a document start in the training data.
    """
    from .data.tokenizer import eot_id, load_tokenizer

    tok = load_tokenizer(loaded.tokenizer_path)
    eot = eot_id(tok)
    ids = [eot] + tok.encode(prompt, add_special_tokens=False).ids
    pending: list[int] = []
    for token in generate_ids(loaded.model, ids, max_new_tokens, temperature, top_k, top_p, seed, eot,
                              use_cache, stats):
        pending.append(token)
        text = tok.decode(pending, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next bytes
            pending = []
            yield text
    if pending:
        yield tok.decode(pending, skip_special_tokens=False)


def stream(loaded, prompt: str, write: Callable[[str], None], **kw) -> GenerationStats:
    """generate_text, writing each piece with `write` as it comes; returns the statistics."""
    stats = GenerationStats()
    for piece in generate_text(loaded, prompt, stats=stats, **kw):
        write(piece)
    return stats
