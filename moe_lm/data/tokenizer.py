"""Byte-level BPE: train one with `tokenizers`, or load a tokenizer.json, and encode documents.

Every prepared corpus has one special token, `<|endoftext|>` (EOT), written after each document.
The tokenizer round-trips exactly: `decode(encode(text)) == text` for any string, because
- the ByteLevel pre-tokenizer maps every byte to a symbol (no unknown tokens, no normalizer),
- `add_prefix_space=False` (no space invented in front of a document),
- the ByteLevel decoder maps the symbols back to the original bytes,
- a literal "<|endoftext|>" inside a document is encoded as ordinary text (see `encode_batch`),
  so EOT ids in a token file always mark document ends.

Training bounds the work per word: BPE training costs about (word length)^2 per merge for each
word (`tokenizers` updates a word's symbols in a vector), so one 300 KB run of letters made the
training 20 times slower and a 1 MB run never finished. `WordCutter` cuts every run of
non-whitespace (or of whitespace) longer than `MAX_WORD_CHARS` into pieces for *training* only; a
pre-tokenised word lies within such a run (plus one leading space), so no word the trainer sees,
and no token it makes, is longer than about that. Encoding is untouched and stays exact: a long
word is encoded with the merges learnt from the pieces.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import DataError

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + EOT
MAX_WORD_CHARS = 1000  # longer runs of (non-)whitespace are cut into pieces for BPE training


class WordCutter:
    """Cuts runs of non-whitespace or whitespace longer than `max_chars` characters into pieces of
    `max_chars` (the last one shorter), for BPE training. `cut_words` counts the runs cut.

    A text with no long run comes back as it is; otherwise as a list of pieces, which the trainer
    pre-tokenises separately, so no word spans two pieces.
    """

    def __init__(self, max_chars: int = MAX_WORD_CHARS):
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.max_chars = max_chars
        self.cut_words = 0
        self._space_run = re.compile(r"\s{%d}" % (max_chars + 1))
        # NOTE: the lookbehinds anchor each match at the start of its run (linear time)
        self._runs = re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (max_chars + 1, max_chars + 1))

    def __call__(self, text: str) -> Union[str, list[str]]:
        n = self.max_chars
        # NOTE: a cheap test first (str.split runs in C); the exact search only for the rare text
        # that has a long run
        if len(text) <= n or (max(map(len, text.split()), default=0) <= n and not self._space_run.search(text)):
            return text
        cuts = []
        for m in self._runs.finditer(text):
            self.cut_words += 1
            cuts.extend(range(m.start() + n, m.end(), n))
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with the settings that make decoding exact."""
    tok = Tokenizer(models.BPE())
    # NOTE: add_prefix_space=False, else a space would be added in front of every document.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: Optional[int] = None,
                    cutter: Optional[WordCutter] = None) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (EOT included, id 0) on an iterable of texts.

    The iterable is consumed once, lazily, so it may stream; the trainer keeps only word counts.
    Training is deterministic: the same texts give the same tokenizer.json. Runs longer than
    `cutter.max_chars` (default MAX_WORD_CHARS) are cut for training; `cutter.cut_words` then
    says how many were.
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
    cutter = cutter if cutter is not None else WordCutter()
    tok.train_from_iterator((cutter(t) for t in texts), trainer=trainer, length=length)
    return _ready(tok)


class TrainingProcess:
    """`train_tokenizer` in a child process (moe_lm.data.bpe_worker), fed through a pipe.

        with TrainingProcess(vocab_size, max_word_chars) as trainer:
            trainer.feed(texts)              # blocks while the child is busy (bounded memory)
            tok, cut_words = trainer.result()

    The caller's thread stays in Python the whole time (writing to or reading from a pipe), so its
    signal handlers run at once; leaving the block by an exception (Ctrl-C, SIGTERM, an error
    while reading the corpus) kills the child. Same texts, same tokenizer as `train_tokenizer`.
    """

    def __init__(self, vocab_size: int, max_word_chars: int = MAX_WORD_CHARS, batch_chars: int = 1 << 20):
        import subprocess
        import sys
        import tempfile

        if vocab_size < MIN_VOCAB:
            raise DataError(f"--vocab-size {vocab_size} is too small",
                            f"a byte-level BPE needs at least {MIN_VOCAB} tokens: 256 bytes + end-of-text")
        self.batch_chars = batch_chars
        self._stderr = tempfile.TemporaryFile()  # NOTE: a file, not a pipe nobody reads (no deadlock)
        # NOTE: the child imports this very moe_lm (a source tree, an install), added to its path
        # only when that folder is not on it already
        root = str(Path(__file__).resolve().parents[2])
        start = ("import sys; r = sys.argv.pop(1); r in sys.path or sys.path.insert(0, r); "
                 "from moe_lm.data.bpe_worker import main; sys.exit(main(sys.argv[1:]))")
        self.process = subprocess.Popen(
            [sys.executable, "-c", start, root, str(vocab_size), str(max_word_chars)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)

    def __enter__(self) -> "TrainingProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def feed(self, texts: Iterable[str]) -> None:
        """Send every text, then the end mark."""
        import pickle

        batch: list[str] = []
        size = 0
        try:
            for text in texts:
                batch.append(text)
                size += len(text)
                if size >= self.batch_chars:
                    self._send(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
                    batch, size = [], 0
            self._send(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL) + pickle.dumps(None))
            self.process.stdin.close()
        except BrokenPipeError:
            self._failed()

    def result(self) -> tuple[Tokenizer, int]:
        """Wait for the child: (the trained tokenizer, how many words it cut)."""
        import pickle

        data = self._receive()
        if self.process.wait() != 0 or not data:
            self._failed()
        out = pickle.loads(data)
        return _ready(Tokenizer.from_str(out["tokenizer"])), int(out["cut_words"])

    # NOTE: the pipes are written and read in steps of at most 0.1 s: a signal the kernel hands to
    # another thread (a progress bar's, say) does not interrupt a blocking read or write, and
    # Python runs its handler only when the main thread gets back to Python.

    def _send(self, data: bytes) -> None:
        import os
        import select

        fd = self.process.stdin.fileno()
        if os.name == "nt":  # no select() on pipes
            self.process.stdin.write(data)
            return
        os.set_blocking(fd, False)
        view = memoryview(data)
        while view:
            if not select.select([], [fd], [], 0.1)[1]:
                continue
            try:
                view = view[os.write(fd, view[:1 << 16]):]
            except BlockingIOError:
                continue

    def _receive(self) -> bytes:
        import os
        import select

        if os.name == "nt":
            return self.process.stdout.read()
        fd = self.process.stdout.fileno()
        chunks = []
        while True:
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self) -> None:
        """Kill the child if it still runs; release the pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for f in (self.process.stdin, self.process.stdout, self._stderr):
            try:
                f.close()
            except (OSError, ValueError):  # a broken pipe's buffered bytes
                pass

    def _failed(self) -> None:
        code = self.process.wait()
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {code}"
        raise DataError(f"the tokenizer training process failed: {why}",
                        "rerun with less text (--max-bytes) if it ran out of memory")


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
