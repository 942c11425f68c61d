"""Generation: KV-cached decoding gives the tokens of full recomputation; sampling keeps exactly the
top-k / nucleus set and draws from the renormalised softmax; greedy is argmax; seeds repeat; it
stops at end-of-text; streamed text never cuts a UTF-8 character; `moe-lm generate` prints text."""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from moe_lm.config import ModelConfig, MoEConfig, load_config
from moe_lm.errors import ConfigError
from moe_lm.generate import GenerationStats, generate_ids, generate_text, sample_next
from moe_lm.model.transformer import ModelOutput, Transformer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and are not slowed by other processes' threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model_of(moe: MoEConfig | None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, ffn_hidden=32, seq_len=32,
                                    init_std=0.1, moe=moe)).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            for name, p in layer.router.named_parameters():
                if name != "w_noise":
                    p.normal_(std=1.0)
    return model


# ---------------------------------------------------------------------------------------------
# the KV cache


@pytest.mark.parametrize("moe", [None, MoEConfig(n_experts=4, top_k=2), MoEConfig(n_experts=4, top_k=1, router="switch"),
                                 MoEConfig(n_experts=4, top_k=2, router="noisy_topk", balance_loss="shazeer"),
                                 MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, every=2),
                                 MoEConfig(n_experts=4, top_k=1, router="switch", capacity_factor=0.5),
                                 MoEConfig(n_experts=4, top_k=2, capacity_factor=0.75)],
                         ids=["dense", "softmax_topk", "switch", "noisy_topk", "shared+every2", "switch-capacity",
                              "softmax_topk-capacity"])
def test_cached_generation_equals_uncached_recomputation(moe):
    model = model_of(moe)
    prompt = [5, 17, 3, 42, 8, 60, 2]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3), dict(temperature=0.7, top_p=0.9, seed=4)):
        cached = list(generate_ids(model, prompt, max_new_tokens=40, use_cache=True, **kw))
        full = list(generate_ids(model, prompt, max_new_tokens=40, use_cache=False, **kw))
        assert cached == full and len(cached) == 40, kw


def test_cached_step_logits_equal_the_full_forward_at_each_position():
    model = model_of(MoEConfig(n_experts=4, top_k=2))
    idx = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx).logits[0]
        cache = model.new_cache()
        steps = [model(idx[:, :10], cache=cache).logits[0, -1]]
        steps += [model(idx[:, t:t + 1], cache=cache).logits[0, -1] for t in range(10, 30)]
    torch.testing.assert_close(torch.stack(steps), full[9:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# sampling


def test_temperature_zero_and_top_k_1_are_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=2.0, top_k=1), logits.argmax(-1))


def test_top_k_sampling_draws_from_the_softmax_renormalised_over_the_k_best():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    k, T, n = 3, 0.8, 20000
    draws = sample_next(logits.expand(n, -1), temperature=T, top_k=k, generator=torch.Generator().manual_seed(0))
    best = [5, 0, 1]  # the 3 largest logits
    z = sum(math.exp(logits[0, i].item() / T) for i in best)
    freq = torch.bincount(draws, minlength=6).float() / n
    for i in range(6):
        expected = math.exp(logits[0, i].item() / T) / z if i in best else 0.0
        assert abs(freq[i].item() - expected) < 0.015, (i, freq[i].item(), expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.5, 0.25, 0.15, 0.07, 0.03]
    logits = torch.tensor([probs]).log()
    n = 20000
    for p, kept in ((0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]), (0.9, [0, 1, 2]), (0.95, [0, 1, 2, 3])):
        draws = sample_next(logits.expand(n, -1), temperature=1.0, top_p=p, generator=torch.Generator().manual_seed(1))
        freq = torch.bincount(draws, minlength=5).float() / n
        z = sum(probs[i] for i in kept)
        for i in range(5):
            expected = probs[i] / z if i in kept else 0.0
            assert abs(freq[i].item() - expected) < 0.015, (p, i, freq[i].item(), expected)


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    model = model_of(MoEConfig(n_experts=4, top_k=2))
    run = lambda seed: list(generate_ids(model, [1, 2, 3], 30, temperature=1.5, seed=seed))  # noqa: E731
    assert run(7) == run(7) and run(7) != run(8)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_options_are_config_errors(kw):
    with pytest.raises(ConfigError):
        list(generate_ids(model_of(None), [1], 3, **kw))


# ---------------------------------------------------------------------------------------------
# stopping and streaming, with a scripted model


class Scripted(torch.nn.Module):
    """A 'model' whose next token is always the next one of `script` (one-hot logits)."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen = 0

    def new_cache(self):
        return SimpleNamespace(pos=0)

    def forward(self, idx, cache=None):
        pos = (cache.pos if cache is not None else 0) + idx.shape[1]
        if cache is not None:
            cache.pos = pos
        logits = torch.full((1, idx.shape[1], self.vocab), -10.0)
        logits[0, -1, self.script[min(pos - self.prompt_len, len(self.script) - 1)]] = 10.0
        return ModelOutput(logits, None, torch.zeros(()), torch.zeros(()))


def test_generation_stops_at_end_of_text_and_counts_tokens():
    m = Scripted([4, 5, 6, 0, 7, 8], vocab=10)
    m.prompt_len = 2
    stats = GenerationStats()
    assert list(generate_ids(m, [1, 2], 10, temperature=0, eot_id=0, stats=stats)) == [4, 5, 6]
    assert stats.new_tokens == 3 and stats.stopped_at_eot and stats.prompt_tokens == 2 and stats.seconds > 0


def test_streamed_text_is_the_decoded_text_and_never_cuts_a_character(tiny_data_dir):
    from moe_lm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_data_dir / "tokenizer.json")
    text = "naïve ✓ 日本語 🙂 done"
    script = tok.encode(text, add_special_tokens=False).ids + [tok.token_to_id("<|endoftext|>")]
    assert any("\ufffd" in tok.decode([i]) for i in script)  # some tokens are parts of a character
    m = Scripted(script, vocab=tok.get_vocab_size())
    m.prompt_len = 1 + len(tok.encode("x", add_special_tokens=False).ids)  # EOT + the prompt
    loaded = SimpleNamespace(model=m, tokenizer_path=tiny_data_dir / "tokenizer.json")
    pieces = list(generate_text(loaded, "x", max_new_tokens=100, temperature=0))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces) and len(pieces) > 3


# ---------------------------------------------------------------------------------------------
# the command


def test_cli_generate_streams_text_from_a_trained_run(tiny_data_dir, tmp_path, cli_here):
    from moe_lm.training.trainer import train

    cfg = load_config(ROOT / "configs" / "tiny-moe.yaml", [
        f"data.dir={tiny_data_dir}", "model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.seq_len=32",
        "model.ffn_hidden=32", "model.moe.n_experts=4", "train.batch_size=4", "train.max_steps=2", "train.eval_every=2",
        "train.eval_batches=1", "train.checkpoint_every=2", "train.device=cpu"])
    run = train(cfg, out_dir=tmp_path / "run", plots=False, console=Console(file=io.StringIO()))

    moe_lm = cli_here
    code, out, err = moe_lm("generate", str(run.run_dir), "--prompt", "def ", "-n", "20", "--seed", "1")
    assert code == 0 and out.startswith("def ") and len(out) > len("def \n"), err
    assert "tokens/s" in err
    assert moe_lm("generate", str(run.run_dir), "--prompt", "def ", "-n", "20", "--seed", "1")[1] == out
    code, out, err = moe_lm("generate", str(run.run_dir), "--temperature", "-1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--temperature" in err
