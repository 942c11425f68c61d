"""The `prepare` command's library side: source -> tokenizer -> token shards, written atomically.

    summary = prepare_corpus(PrepareOptions())          # the built-in corpus -> data/builtin/
    render_summary(summary, console)

The recipe, top to bottom:
1. resolve the output folder and refuse an existing one (unless overwrite);
2. open the source (built-in corpus, HF dataset or local files; see sources.py);
3. pass 1: train a byte-level BPE on the training documents (or load --tokenizer);
4. pass 2: read the documents again, give each a split by a hash of its text (or take the
   source's own split), tokenise in batches and append to `<split>.bin` (+ `<split>.domains.bin`);
5. write meta.json, then rename the temporary folder into place.
Everything is built in a hidden sibling folder `.<name>.tmp-XXXX`; any error, Ctrl-C or SIGTERM
removes it, so `data/<name>/` is either the old folder, the new one, or absent, never half-written.

The BPE training runs in a child process (tokenizer.TrainingProcess) fed through a pipe: the
Rust code holds no signal handler of ours back, so Ctrl-C and SIGTERM act at once, and the child
is killed. Words longer than `max_word_chars` are cut for training (tokenizer.WordCutter), which
bounds the training time; the summary and meta.json say how many were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import __version__, checks, signals
from ..errors import DataError
from ..files import umask
from . import sources as src
from .shards import DOMAIN_DTYPE, META, TOKENIZER, ShardWriter, token_dtype
from .tokenizer import EOT, MAX_WORD_CHARS, MIN_VOCAB, TrainingProcess, encode_batch, eot_id, load_tokenizer

DEFAULT_VOCAB = 8192
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


def _option(default, help: str, show_default: bool = True):
    """A PrepareOptions field that is also a `moe-lm prepare` option (its help and whether the
    help shows the default)."""
    return field(default=default, metadata={"help": help, "show_default": show_default})


@dataclass
class PrepareOptions:
    """What the `prepare` command was asked for. The fields with a help text are the command's
    options, declared here once: cli.py makes `--field-name` of each, with the field's type,
    default and help. The others are for callers of the library (tests, benchmarks)."""

    dataset: Optional[str] = _option(None, "A Hugging Face dataset name, e.g. roneneldan/TinyStories.")  # or a folder
    dataset_config: Optional[str] = _option(None, "The dataset's configuration (subset) name.")
    split: Optional[str] = _option(
        None, "Split to read (default: train; the dataset's own validation split is used when it has one).")
    text_column: str = _option("text", "Column holding the text (HF datasets and jsonl/json/parquet files).")
    streaming: bool = _option(False, "Stream the HF dataset instead of downloading it whole.")
    data_files: Optional[str] = _option(None, "Local files: a glob of txt, jsonl, json or parquet files.")
    name: Optional[str] = _option(None, "Output name: writes data/<name>/ (default: the source's name).")
    out: Optional[Path] = _option(None, "Output folder (instead of data/<name>/).")
    vocab_size: Optional[int] = _option(
        None, "Size of the byte-level BPE vocabulary to train [default: 8192; with --tokenizer: its size].",
        show_default=False)
    tokenizer: Optional[Path] = _option(None, "Reuse this tokenizer.json instead of training one.")
    val_fraction: float = _option(0.05, "Share of documents held out for validation (by a hash of each document).")
    test_fraction: float = _option(
        0.02, "Share of documents held out for test.bin when the source has no test split of its own (0 = none).")
    max_documents: Optional[int] = _option(None, "Read at most this many documents.")  # per stream of the source
    max_bytes: Optional[int] = _option(None, "Read at most this many bytes of text.")  # UTF-8 bytes, per stream
    overwrite: bool = _option(False, "Replace an existing output folder.")
    tokenizer_sample_bytes: int = 200_000_000  # train the BPE on at most this much training text
    max_word_chars: int = MAX_WORD_CHARS  # longer runs of (non-)whitespace are cut for BPE training
    batch_bytes: int = 1 << 20  # text per encode_batch call (and per append to the shards)
    data_root: Path = Path("data")  # where data/<name>/ lives


def for_config(opts: PrepareOptions, cfg) -> PrepareOptions:
    """The options that prepare the data a config trains on (`moe-lm prepare --config X.yaml`).

    The output folder becomes the config's `data.dir` and the vocabulary its `data.vocab_size`
    (else `model.vocab_size`), unless the command line gave them (--out / --name, --vocab-size);
    the source stays what the options say (the built-in corpus by default). So `moe-lm prepare -c
    configs/tiny-moe.yaml` writes data/builtin-2k/ with a 2,048-token vocabulary, and `moe-lm
    train -c configs/tiny-moe.yaml` finds it. Raises DataError when --vocab-size contradicts the
    config.
    """
    out = dataclasses.replace(opts)
    if out.out is None and out.name is None:
        out.out = Path(cfg.data.dir)
    want = cfg.data.vocab_size or cfg.model.vocab_size
    if want is not None:
        if out.vocab_size is not None and out.vocab_size != want:
            raise DataError(f"--vocab-size {out.vocab_size} contradicts the config's vocabulary ({want})",
                            "leave out --vocab-size (the config's is used), or override data.vocab_size")
        if out.tokenizer is None:
            out.vocab_size = want
    return out


@dataclass
class SplitStats:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0  # EOTs included


@dataclass
class PrepareSummary:
    out_dir: Path
    meta: dict
    splits: dict[str, SplitStats]
    seconds: dict[str, float]  # tokenizer, tokenise, total
    notes: list[str] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.splits.values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    @property
    def tokenise_mb_s(self) -> float:
        """Text MB per second of pass 2 (read + encode + write)."""
        return self.bytes / 1e6 / max(self.seconds["tokenise"], 1e-9)


# ---------------------------------------------------------------------------------------------
# the recipe


def prepare_corpus(opts: PrepareOptions, console: Optional[Console] = None) -> PrepareSummary:
    """Prepare the corpus `opts` names into its output folder; returns the figures for the summary."""
    console = console or Console(file=io.StringIO())
    t_start = time.perf_counter()
    _check_options(opts)
    out = _output_dir(opts)
    checks.out_folder("--out" if opts.out is not None else "output path", out, "pass another --name or --out")
    if out.exists() and not opts.overwrite:
        raise DataError(f"output folder {out} already exists",
                        "pass --overwrite to replace it, or --name / --out to write elsewhere")
    _check_replaceable(out, opts)
    tok = load_tokenizer(opts.tokenizer) if opts.tokenizer is not None else None
    if tok is not None and opts.vocab_size is not None and opts.vocab_size != tok.get_vocab_size():
        raise DataError(f"--vocab-size {opts.vocab_size} does not match tokenizer {opts.tokenizer}, "
                        f"which has {tok.get_vocab_size()} tokens",
                        "leave out --vocab-size when reusing a tokenizer")

    source = src.open_source(opts.dataset, opts.dataset_config, opts.split, opts.text_column,
                             opts.streaming, opts.data_files)
    splits = _split_plan(source, opts)

    with _stop_signals_noted() as stop:
        with stop.held():  # NOTE: a signal in between would leave the folder behind
            created = _make_parents(out.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            stop.check()
            os.chmod(tmp, 0o777 & ~umask())  # NOTE: mkdtemp makes it 0700; the result is an ordinary folder
            with _Progress(console) as progress:
                cache: dict[int, list[src.Document]] = {}  # streams read whole in pass 1
                skipped: dict[int, int] = {}  # empty documents per stream
                t0 = time.perf_counter()
                if tok is None:
                    tok, trained_on = _train(source, opts, splits, cache, skipped, progress, console)
                    stop.check()
                    tok.save(str(tmp / TOKENIZER))
                    tok = load_tokenizer(tmp / TOKENIZER)  # NOTE: as every later user will see it
                else:
                    shutil.copyfile(opts.tokenizer, tmp / TOKENIZER)
                    trained_on = None
                t_tok = time.perf_counter() - t0
                t0 = time.perf_counter()
                stats, files, domains = _tokenise(source, opts, splits, cache, skipped, tok, tmp, progress, console)
                t_enc = time.perf_counter() - t0
                stop.check()
            notes = list(source.notes) + _check_splits(stats, source)
            seconds = {"tokenizer": t_tok, "tokenise": t_enc}
            meta = _meta(opts, out, source, splits, tok, trained_on, stats, files, domains, tmp)
            meta["skipped_empty_documents"] = sum(skipped.values())
            seconds["total"] = time.perf_counter() - t_start
            meta["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
            _move_into_place(tmp, out, opts.overwrite)
        except BaseException:  # NOTE: Ctrl-C and SIGTERM too: no half-written folder may survive
            with stop.held():  # and a second signal must not cut the cleaning short
                shutil.rmtree(tmp, ignore_errors=True)
                _remove_if_empty(created)
            raise
    return PrepareSummary(out, meta, stats, seconds, notes=notes)


class _StopNoted:
    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the first stop signal
        self.holding = False

    def check(self) -> None:
        """Raise again a stop signal whose exception was swallowed or held back."""
        if self.signum is not None:
            raise signals.Interrupted(self.signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Signals are noted, not raised, inside this block."""
        before, self.holding = self.holding, True
        try:
            yield
        finally:
            self.holding = before


@contextmanager
def _stop_signals_noted() -> Iterator[_StopNoted]:
    """Ctrl-C (SIGINT) and SIGTERM raise `signals.Interrupted` (a KeyboardInterrupt) and are
    noted; `check()` raises the noted one again; inside `held()` they are only noted.

    NOTE: a Ctrl-C that lands while tokenizers' Rust code runs a Python callback can have its
    KeyboardInterrupt consumed there (seen as a prepare that finished with exit 0 after Ctrl-C);
    the note survives. A signal that is ignored (SIG_IGN) stays ignored.
    """
    stop = _StopNoted()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # not ours to handle
        return

    def on_signal(signum, frame):
        signals.note(signum)
        if stop.signum is None:
            stop.signum = signum
        if not stop.holding:
            raise signals.Interrupted(signum)

    prev = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    for s, handler in prev.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, on_signal)
    try:
        yield stop
    finally:
        for s, handler in prev.items():
            if handler is not signal.SIG_IGN:
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _check_options(o: PrepareOptions) -> None:
    for flag, v in (("--val-fraction", o.val_fraction), ("--test-fraction", o.test_fraction)):
        if not 0 <= v < 1:
            raise DataError(f"{flag} {v} is out of range", "use a fraction in [0, 1), e.g. 0.05")
    if o.val_fraction + o.test_fraction >= 1:
        raise DataError(f"--val-fraction {o.val_fraction} + --test-fraction {o.test_fraction} leave no training documents",
                        "keep their sum below 1, e.g. 0.05 and 0.02")
    if o.max_word_chars < 1:
        raise DataError(f"max_word_chars {o.max_word_chars} must be ≥ 1", f"the default is {MAX_WORD_CHARS}")
    for flag, v in (("--max-documents", o.max_documents), ("--max-bytes", o.max_bytes)):
        if v is not None and v < 1:
            raise DataError(f"{flag} {v} must be ≥ 1", "or leave it out for no cap")
    if o.vocab_size is not None and not MIN_VOCAB <= o.vocab_size <= 2**32:
        raise DataError(f"--vocab-size {o.vocab_size} is out of range",
                        f"a byte-level BPE needs between {MIN_VOCAB} and 2^32 tokens; 8192 is the default")
    if o.name is not None and (not o.name or o.name.startswith(".") or any(c in o.name for c in "/\\")):
        raise DataError(f"--name '{o.name}' is not a folder name", "use a plain name such as 'notes', or --out DIR")


def _output_dir(o: PrepareOptions) -> Path:
    if o.out is not None:
        return Path(o.out)
    return Path(o.data_root) / (o.name or src.default_name(o.dataset, o.dataset_config, o.data_files))


def _split_plan(source: src.Source, o: PrepareOptions) -> dict:
    """Which splits exist and how each is made: {"train": "rest", "val": "hash" | <own split name>, ...}."""
    own = {s.split: s.label for s in source.streams if s.split is not None}
    plan = {"train": "rest"}  # what the hash leaves of the training stream
    plan["val"] = own.get("val", "hash" if o.val_fraction > 0 else None)
    plan["test"] = own.get("test", "hash" if o.test_fraction > 0 else None)
    if plan["val"] is None:
        raise DataError("--val-fraction 0 leaves no validation split (this source has none of its own)",
                        "training needs one: use e.g. --val-fraction 0.05")
    return {k: v for k, v in plan.items() if v is not None}


def hash_fraction(data: bytes) -> float:
    """A document's place in [0, 1): the first 8 bytes of its BLAKE2b hash. Stable across runs,
    platforms and Python versions (unlike hash()), and equal texts always land together."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / 2**64


def assign_split(data: bytes, val_fraction: float, test_fraction: float, own: tuple[str, ...] = ()) -> str:
    """train / val / test for a document of the hashed stream. Fractions of splits the source
    supplies itself (`own`) are not carved out of it."""
    u = hash_fraction(data)
    test = 0.0 if "test" in own else test_fraction
    val = 0.0 if "val" in own else val_fraction
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def _documents(stream: src.Stream, o: PrepareOptions, skipped: dict, key: int) -> Iterator[tuple[src.Document, bytes]]:
    """A stream's non-empty documents with their UTF-8 bytes, within --max-documents / --max-bytes.

    skipped[key]: how many empty documents this reading of the stream has skipped so far.
    """
    n, total = 0, 0
    skipped[key] = 0
    for doc in stream.read():
        if not doc.text:
            skipped[key] += 1
            continue
        data = doc.text.encode("utf-8")  # NOTE: every source gives valid Unicode (Arrow strings are UTF-8)
        if o.max_bytes is not None and total + len(data) > o.max_bytes:
            return  # NOTE: never cut a document; stop before the one that would pass the cap
        yield doc, data
        n, total = n + 1, total + len(data)
        if o.max_documents is not None and n >= o.max_documents:
            return


def _split_of(stream: src.Stream, data: bytes, o: PrepareOptions, splits: dict) -> str:
    if stream.split is not None:
        return stream.split
    own = tuple(k for k, v in splits.items() if v not in ("hash", "rest"))
    return assign_split(data, o.val_fraction if "val" in splits else 0.0,
                        o.test_fraction if "test" in splits else 0.0, own)


# ---------------------------------------------------------------------------------------------
# pass 1: the tokenizer


def _train(source: src.Source, o: PrepareOptions, splits: dict, cache: dict, skipped: dict,
           progress: "_Progress", console: Console):
    """Train the BPE on the training documents (the first `tokenizer_sample_bytes` of them).

    Streams read whole within the cap are kept in `cache` so pass 2 need not read them again.
    The training itself runs in a child process, fed as the documents are read.
    """
    vocab = o.vocab_size or DEFAULT_VOCAB
    seen = {"documents": 0, "bytes": 0, "sampled": False}
    progress.start("training tokenizer", source.total_bytes, o)
    console_line(console, progress, f"reading {src.describe_stream_source(source)}")
    console_line(console, progress, f"training a byte-level BPE tokenizer (vocab {vocab}) on the training split")

    def texts() -> Iterator[str]:
        for i, stream in enumerate(source.streams):
            if stream.split is not None:
                continue  # a held-out split of the source's own: never seen by the tokenizer
            kept: Optional[list] = []
            kept_bytes = 0
            for doc, data in _documents(stream, o, skipped, i):
                progress.advance(len(data), 1, 0)
                if kept is not None:
                    kept.append(doc)
                    kept_bytes += len(data)
                    if kept_bytes > o.tokenizer_sample_bytes:
                        kept = None  # too big to hold: pass 2 reads the stream again
                if _split_of(stream, data, o, splits) != "train":
                    continue
                if seen["bytes"] + len(data) > o.tokenizer_sample_bytes and seen["documents"] > 0:
                    seen["sampled"] = True
                    return
                seen["documents"] += 1
                seen["bytes"] += len(data)
                yield doc.text
            if kept is not None:
                cache[i] = kept

    with TrainingProcess(vocab, o.max_word_chars) as trainer:
        trainer.feed(texts())
        if seen["documents"] == 0:
            _raise_empty(source, sum(skipped.values()), had_documents=progress.documents > 0)
        console_line(console, progress, f"read {seen['documents']:,} training documents "
                                        f"({seen['bytes'] / 1e6:,.1f} MB); computing the BPE merges")
        progress.describe("training tokenizer: computing merges")
        tok, cut_words = trainer.result()
    how = (f"the first {seen['documents']} training documents in source order "
           f"({seen['bytes']} bytes; cap tokenizer_sample_bytes={o.tokenizer_sample_bytes})") if seen["sampled"] \
        else f"all {seen['documents']} training documents ({seen['bytes']} bytes)"
    return tok, {"documents": seen["documents"], "bytes": seen["bytes"], "sample": how,
                 "requested_vocab_size": vocab, "max_word_chars": o.max_word_chars, "cut_words": cut_words}


def _raise_empty(source: src.Source, skipped: int, had_documents: bool) -> None:
    where = src.describe_stream_source(source)
    if had_documents:
        raise DataError(f"no document of {where} fell into the training split",
                        "add documents or lower --val-fraction / --test-fraction; splits go by a hash of each text")
    extra = f", {skipped} empty document(s) skipped" if skipped else ""
    raise DataError(f"the corpus is empty: no document with text in {where}{extra}",
                    "check the source, --text-column, and --max-documents / --max-bytes")


# ---------------------------------------------------------------------------------------------
# pass 2: tokenise and write


def _tokenise(source: src.Source, o: PrepareOptions, splits: dict, cache: dict, skipped: dict, tok,
              tmp: Path, progress: "_Progress", console: Console):
    """Encode every document in batches and append ids (+ EOT) to `<split>.bin` in `tmp`.

    Returns (stats per split, {file name: {"bytes", "sha256"}}, domain names or None).
    """
    vocab, eot = tok.get_vocab_size(), eot_id(tok)
    dtype = token_dtype(vocab)
    writers = {s: ShardWriter(tmp / f"{s}.bin", dtype) for s in splits}
    dom_writers = {s: ShardWriter(tmp / f"{s}.domains.bin", np.dtype(DOMAIN_DTYPE).name) for s in splits}
    stats = {s: SplitStats() for s in splits}
    domain_ids: dict[Optional[str], int] = {}
    progress.start("tokenising", source.total_bytes, o)
    console_line(console, progress, f"tokenising into {', '.join(s + '.bin' for s in splits)} ({dtype})")

    batch: list[tuple[str, str, int]] = []  # (split, text, domain id)
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        ids = encode_batch(tok, [text for _, text, _ in batch])
        n_tokens = 0
        for split in splits:
            rows = [(i, d) for i, (s, _, d) in enumerate(batch) if s == split]
            if not rows:
                continue
            flat: list[int] = []
            lengths = []
            for i, _ in rows:
                flat += ids[i]
                flat.append(eot)  # NOTE: EOT after each document, so documents never merge
                lengths.append(len(ids[i]) + 1)
            writers[split].write(np.array(flat, dtype=np.uint32))
            dom_writers[split].write(np.repeat(np.array([d for _, d in rows], dtype=DOMAIN_DTYPE), lengths))
            stats[split].tokens += len(flat)
            n_tokens += len(flat)
        progress.advance(0, 0, n_tokens)
        batch, batch_bytes = [], 0

    try:
        for i, stream in enumerate(source.streams):
            docs = ((d, d.text.encode("utf-8")) for d in cache[i]) if i in cache \
                else _documents(stream, o, skipped, i)
            for doc, data in docs:
                split = _split_of(stream, data, o, splits)
                if doc.domain not in domain_ids:
                    if len(domain_ids) > np.iinfo(DOMAIN_DTYPE).max:
                        raise DataError(f"more than {np.iinfo(DOMAIN_DTYPE).max + 1} distinct domain tags",
                                        "the 'domain' column should name a few sources or topics, not each row")
                    domain_ids[doc.domain] = len(domain_ids)
                batch.append((split, doc.text, domain_ids[doc.domain]))
                batch_bytes += len(data)
                stats[split].documents += 1
                stats[split].bytes += len(data)
                progress.advance(len(data), 1, 0)
                if batch_bytes >= o.batch_bytes:
                    flush()
        if batch:
            flush()
    finally:
        files = {f"{s}.bin": w.close() for s, w in writers.items()}
        dom_files = {f"{s}.domains.bin": w.close() for s, w in dom_writers.items()}

    if sum(s.documents for s in stats.values()) == 0:
        _raise_empty(source, sum(skipped.values()), had_documents=False)
    if any(d is not None for d in domain_ids):
        files.update(dom_files)
        names = [("(none)" if d is None else d) for d in domain_ids]
    else:  # no document carries a domain: no domain files
        for name in dom_files:
            (tmp / name).unlink()
        names = None
    return stats, files, names


def _check_splits(stats: dict[str, SplitStats], source: src.Source) -> list[str]:
    """DataError when train or val got no document; a note (returned) when test got none."""
    for split in ("train", "val"):
        if stats[split].documents == 0:
            total = sum(s.documents for s in stats.values())
            how = "raise --val-fraction" if split == "val" else "lower --val-fraction / --test-fraction"
            raise DataError(f"the {split} split got none of the {total} documents of "
                            f"{src.describe_stream_source(source)}",
                            f"add documents or {how}; documents go to splits by a hash of their text")
    if "test" in stats and stats["test"].documents == 0:
        return ["note: the test split got no documents (raise --test-fraction for a test.bin with text)"]
    return []


# ---------------------------------------------------------------------------------------------
# meta.json and the atomic move


def _meta(o: PrepareOptions, out: Path, source: src.Source, splits: dict, tok, trained_on: Optional[dict],
          stats: dict, files: dict, domains: Optional[list], tmp: Path) -> dict:
    vocab = tok.get_vocab_size()
    tok_bytes = (tmp / TOKENIZER).read_bytes()
    files = dict(files)
    files[TOKENIZER] = {"bytes": len(tok_bytes), "sha256": hashlib.sha256(tok_bytes).hexdigest()}
    split_info = {}
    for s, st in stats.items():
        info = {"file": f"{s}.bin", "documents": st.documents, "tokens": st.tokens, "bytes": st.bytes,
                "made_by": splits[s]}
        info["domains_file"] = f"{s}.domains.bin" if domains is not None else None
        split_info[s] = info
    own = {k: v for k, v in splits.items() if v not in ("hash", "rest")}
    hashed = [k for k, v in splits.items() if v == "hash" and k != "train"]
    return {
        "format": FORMAT_VERSION,
        "tool": "moe-lm",
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "name": out.name,
        "source": source.description,
        "vocab_size": vocab,
        "eot_id": eot_id(tok),
        "eot_token": EOT,
        "dtype": token_dtype(vocab),
        "tokenizer_file": TOKENIZER,
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "trained": trained_on is not None,
                      "trained_on": trained_on, "reused_from": str(o.tokenizer) if o.tokenizer else None},
        "split": {
            "method": "per document: BLAKE2b-64 of its UTF-8 text / 2^64 = u; u < test_fraction -> test, "
                      "u < test_fraction + val_fraction -> val, else train (documents are never cut)",
            "val_fraction": o.val_fraction if "val" in hashed else None,
            "test_fraction": o.test_fraction if "test" in hashed else None,
            "own_splits": own,
            "caps": {"max_documents": o.max_documents, "max_bytes": o.max_bytes},
        },
        "splits": split_info,
        "domains": domains,
        "files": files,
    }


def _make_parents(parent: Path) -> Optional[Path]:
    """mkdir -p parent; returns the top-most folder it created (to remove on failure), or None."""
    top = None
    p = parent
    while not p.exists():
        top = p
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return top


def _remove_if_empty(top: Optional[Path]) -> None:
    if top is None:
        return
    for d in sorted((p for p in [top, *top.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            d.rmdir()
        except OSError:
            return


def _check_replaceable(out: Path, opts: PrepareOptions) -> None:
    """What --overwrite may replace: an empty folder or a data folder `moe-lm prepare` wrote (its
    meta.json), never one that holds an input of this prepare (--data-files, --tokenizer).
    DataError otherwise, before anything is read or written (`train --overwrite` has the same rule
    for run folders)."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    inputs = [Path(opts.tokenizer)] if opts.tokenizer is not None else []
    if opts.data_files:
        inputs += src.expand_data_files(opts.data_files)
    root = out.resolve()
    for p in inputs:
        if p.resolve() == root or root in p.resolve().parents:
            raise DataError(f"the output folder {out} holds {p}, an input of this prepare: --overwrite would delete it",
                            "write the output elsewhere (--out DIR)")
    try:
        meta = json.loads((out / META).read_text(encoding="utf-8"))
        ours = isinstance(meta, dict) and {"splits", "vocab_size", "files"} <= set(meta)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise DataError(f"refusing to replace {out}: it is not a data folder `moe-lm prepare` wrote (no meta.json "
                        "of one)", "choose another --out or --name, or empty the folder yourself")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename tmp -> out. With overwrite: old aside, new in, old deleted (two renames, no gap
    where a reader could see a half-written folder)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite:  # appeared while we worked
        raise DataError(f"output folder {out} already exists", "pass --overwrite to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:  # put the old folder back rather than leave none
        os.rename(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# progress and summary


class _Progress:
    """A rich progress bar (bytes, documents, tokens) on a terminal; plain lines elsewhere."""

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.bar: Optional[Progress] = None
        self.task = None
        self.documents = 0

    def __enter__(self) -> "_Progress":
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                TextColumn("{task.fields[docs]:,} docs"), TextColumn("{task.fields[tokens]:,} tokens"),
                TimeElapsedColumn(), console=self.console, transient=True)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start(self, what: str, total_bytes: Optional[int], o: PrepareOptions) -> None:
        if o.max_bytes is not None and total_bytes is not None:
            total_bytes = min(total_bytes, o.max_bytes)
        if o.max_documents is not None:
            total_bytes = None  # NOTE: unknown share of the source: a pulsing bar, not a false total
        self.documents = 0
        self._tokens = 0
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(what, total=total_bytes, docs=0, tokens=0)

    def describe(self, what: str) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, description=what)

    def advance(self, nbytes: int, docs: int, tokens: int) -> None:
        self.documents += docs
        self._tokens += tokens
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes, docs=self.documents, tokens=self._tokens)


def console_line(console: Console, progress: _Progress, text: str) -> None:
    (progress.bar.console if progress.bar is not None else console).print(text, markup=False, highlight=False)


def render_summary(summary: PrepareSummary, console: Optional[Console] = None) -> None:
    """The table of figures at the end of `prepare`: per split and in total."""
    console = console or Console()
    table = Table(title=f"prepared {summary.out_dir}", title_justify="left")
    for col in ("split", "documents", "MB", "tokens", "bytes/token"):
        table.add_column(col, justify="left" if col == "split" else "right")
    rows = [(s, st) for s, st in summary.splits.items()]
    rows.append(("total", SplitStats(summary.documents, summary.bytes, summary.tokens)))
    for name, st in rows:
        table.add_row(name, f"{st.documents:,}", f"{st.bytes / 1e6:,.2f}", f"{st.tokens:,}",
                      f"{st.bytes / st.tokens:.2f}" if st.tokens else "-", end_section=name == rows[-2][0])
    console.print(table)
    m, sec = summary.meta, summary.seconds
    tok = m["tokenizer"]
    tok_line = (f"trained in {sec['tokenizer']:.1f} s on {tok['trained_on']['sample']}" if tok["trained"]
                else f"reused {tok['reused_from']}")
    console.print(f"vocab {m['vocab_size']:,} ({m['dtype']}), eot id {m['eot_id']}; tokenizer {tok_line}",
                  markup=False, highlight=False)
    cut = (tok.get("trained_on") or {}).get("cut_words", 0)
    if cut:
        console.print(f"{cut:,} word(s) longer than {tok['trained_on']['max_word_chars']:,} characters were cut "
                      f"into pieces for the tokenizer's training (the token files encode them exactly)",
                      markup=False, highlight=False)
    console.print(f"tokenisation {summary.tokenise_mb_s:.2f} MB/s ({summary.bytes / 1e6:.2f} MB in "
                  f"{sec['tokenise']:.1f} s); total time {sec['total']:.1f} s", markup=False, highlight=False)
    if m.get("domains"):
        console.print(f"{len(m['domains'])} domains (per-token ids in <split>.domains.bin)", markup=False, highlight=False)
    for note in summary.notes:
        console.print(note, markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------
# benchmark


def bench_prepare(max_bytes: Optional[int] = None, vocab_size: int = DEFAULT_VOCAB) -> dict:
    """Prepare the built-in corpus into a temporary folder and return its figures.

    Returns {"documents", "bytes", "tokens", "vocab_size", "tokenizer_s", "tokenise_s",
    "total_s", "tokenise_mb_s", "bytes_per_token"}; the folder is deleted.
    """
    with tempfile.TemporaryDirectory(prefix="moe-lm-bench-prepare-") as d:
        s = prepare_corpus(PrepareOptions(out=Path(d) / "builtin", max_bytes=max_bytes, vocab_size=vocab_size))
        return {
            "documents": s.documents, "bytes": s.bytes, "tokens": s.tokens,
            "vocab_size": s.meta["vocab_size"], "tokenizer_s": s.seconds["tokenizer"],
            "tokenise_s": s.seconds["tokenise"], "total_s": s.seconds["total"],
            "tokenise_mb_s": s.tokenise_mb_s, "bytes_per_token": s.bytes / max(s.tokens, 1),
        }
