"""Byte-level BPE: train one with `tokenizers`, or load a tokenizer.json, and encode documents.

Every prepared corpus has one special token, `<|endoftext|>` (EOT), written after each document.
The tokenizer round-trips exactly: `decode(encode(text)) == text` for any string, because
- the ByteLevel pre-tokenizer maps every byte to a symbol (no unknown tokens, no normalizer),
- `add_prefix_space=False` (no space invented in front of a document),
- the ByteLevel decoder maps the symbols back to the original bytes,
- a literal "<|endoftext|>" inside a document is encoded as ordinary text (see `encode_batch`),
  so EOT ids in a token file always mark document ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import DataError

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + EOT


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with the settings that make decoding exact."""
    tok = Tokenizer(models.BPE())
    # NOTE: add_prefix_space=False, else a space would be added in front of every document.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: Optional[int] = None) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (EOT included, id 0) on an iterable of texts.

    The iterable is consumed once, lazily, so it may stream; the trainer keeps only word counts.
    Training is deterministic: the same texts give the same tokenizer.json.
    """
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small",
                        f"a byte-level BPE needs at least {MIN_VOCAB} tokens: 256 bytes + end-of-text")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # NOTE: all 256 byte symbols, even those absent from the sample, so any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return _ready(tok)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; DataError when it is missing, not a tokenizer, or has no EOT token."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"tokenizer {path} is a folder, not a tokenizer.json file",
                        f"pass the file inside it, e.g. --tokenizer {path / 'tokenizer.json'}")
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}",
                        "pass the tokenizer.json of a prepared folder, e.g. --tokenizer data/builtin/tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a readable tokenizer.json: {reason}",
                        "pass a tokenizer.json written by `moe-lm prepare` or by the `tokenizers` library") from exc
    if tok.token_to_id(EOT) is None:
        raise DataError(f"tokenizer {path} has no {EOT} token",
                        "moe-lm marks document ends with it; train a new tokenizer by leaving out --tokenizer")
    return _ready(tok)


def _ready(tok: Tokenizer) -> Tokenizer:
    # NOTE: not saved in tokenizer.json, so set on every load: a literal "<|endoftext|>" in a
    # document must not become the EOT id, or a document would be split in two.
    tok.encode_special_tokens = True
    return tok


def eot_id(tok: Tokenizer) -> int:
    return int(tok.token_to_id(EOT))


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, EOT *not* appended. Parallel over texts (Rust threads)."""
    if not texts:
        return []
    encs = tok.encode_batch_fast(texts, add_special_tokens=False) if hasattr(tok, "encode_batch_fast") \
        else tok.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encs]


def decode_documents(tok: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Split a token stream at EOT ids and decode each document (the inverse of prepare).

    ids: a 1-D sequence of token ids (e.g. a split's memmap). A trailing piece without EOT is
    yielded too.
    """
    import numpy as np

    ids = np.asarray(ids)
    eot = eot_id(tok)
    ends = np.flatnonzero(ids == eot)
    start = 0
    for end in ends:
        yield tok.decode(ids[start:end].tolist(), skip_special_tokens=False)
        start = end + 1
    if start < len(ids):
        yield tok.decode(ids[start:].tolist(), skip_special_tokens=False)


def _byte_level_alphabet() -> dict[str, int]:
    """The ByteLevel symbol -> byte table (GPT-2's bytes_to_unicode, inverted): printable bytes
    stand for themselves, the others for the code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, n = {}, 0
    for b in range(256):
        if b in keep:
            symbols[chr(b)] = b
        else:
            symbols[chr(256 + n)] = b
            n += 1
    return symbols


_SYMBOL_BYTE = _byte_level_alphabet()


def token_texts(tok: Tokenizer, ids: Iterable[int]) -> list[str]:
    """The text each token adds, one string per id, joined = the decoded text.

    The tokens' bytes go through one incremental UTF-8 decoder, so each character is given to
    the token that completes it: a token holding only the first bytes of a character gets ""
    (its character appears on the next token), and bytes that never form a character (a
    window that starts or ends inside one) become U+FFFD. Special tokens (EOT) give their own
    text, e.g. "<|endoftext|>". Raises nothing for ids in the vocabulary; an unknown id gives "".
    """
    import codecs

    special = {int(i) for i in tok.get_added_tokens_decoder()}
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out: list[str] = []

    def flush() -> None:
        rest = decoder.decode(b"", final=True)
        if rest and out:
            out[-1] += rest
        decoder.reset()

    for i in ids:
        i = int(i)
        symbols = tok.id_to_token(i)
        if i in special:
            flush()
            out.append(symbols)
            continue
        if symbols is None:
            out.append("")
            continue
        try:
            raw = bytes(_SYMBOL_BYTE[c] for c in symbols)
        except KeyError:  # not a byte-level vocabulary: the tokenizer's own decoding of the id
            out.append(tok.decode([i], skip_special_tokens=False))
            continue
        out.append(decoder.decode(raw))
    flush()
    return out
