"""`moe-lm prepare`: every source, an exact round trip, a deterministic split that never cuts a
document, and clear one-line errors that leave nothing behind.

References are independent of the code under test: the documents the test wrote itself, the
stdlib files read directly, hashlib over the written files, the split rule as meta.json states it.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from moe_lm.data.prepare import PrepareOptions, prepare_corpus
from moe_lm.data.shards import TokenData
from moe_lm.data.tokenizer import decode_documents
from moe_lm.errors import DataError

# Documents that trip up byte-level BPE set-ups: a space invented in front (add_prefix_space),
# trimmed whitespace, \r\n, control characters, non-ASCII, and the EOT string itself.
TRICKY = [
    "def f(x):\n    return x  # plain code\n",
    "  leading and trailing spaces  ",
    "unicode: héllo wörld — ελληνικά, 中文, emoji 😀🚀\n",
    "windows\r\nline\r\nendings\r\n",
    "tabs\tand\x00nul and \x7f control\x1b[0m\n",
    "a literal <|endoftext|> inside a document stays text",
    "\n\n\nonly newlines around\n\n",
    " ",
    "x",
]


def corpus(n: int = 120, seed: int = 0) -> list[str]:
    """TRICKY + n documents of seeded pseudo-words (enough text to train a small BPE)."""
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", " ", "\n", ", ", "."]
    docs = ["".join(rng.choice(syll, size=int(rng.integers(20, 300)))) for _ in range(n)]
    return TRICKY + [f"doc {i}: {d}" for i, d in enumerate(docs)]


def write_jsonl(path: Path, texts: list[str], domains: list[str] | None = None, column: str = "text") -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            row = {column: t, "id": i}
            if domains is not None:
                row["domain"] = domains[i]
            f.write(json.dumps(row) + "\n")
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def prepare(**kw):
    kw.setdefault("vocab_size", 300)
    return prepare_corpus(PrepareOptions(**kw), console=quiet())


def decoded(out: Path) -> dict[str, list[str]]:
    """Each split's documents, decoded from its token file (split at EOT)."""
    data = TokenData.open(out)
    tok = data.tokenizer()
    return {s: list(decode_documents(tok, data.split(s))) for s in data.splits}


def moe_lm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


# ---------------------------------------------------------------------------------------------
# sources and the round trip


def test_jsonl_round_trip_gives_back_every_document_exactly(tmp_path):
    docs = corpus()
    write_jsonl(tmp_path / "c.jsonl", docs)
    s = prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "out", val_fraction=0.1, test_fraction=0.1)
    back = decoded(tmp_path / "out")
    assert collections.Counter(sum(back.values(), [])) == collections.Counter(docs)
    assert all(len(back[k]) == s.splits[k].documents for k in back)
    for name in ("train", "val", "test"):  # the token files end with EOT: no document is left open
        assert TokenData.open(tmp_path / "out").split(name)[-1] == s.meta["eot_id"]


def test_txt_files_are_one_document_each_with_python_newlines(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    docs = corpus(40)
    for i, text in enumerate(docs):
        (d / f"{i:03d}.txt").write_bytes(text.encode("utf-8"))
    s = prepare(data_files=str(d / "*.txt"), out=tmp_path / "out")
    # reference: each file as Python's text mode reads it (universal newlines: \r\n -> \n)
    expect = [p.read_text(encoding="utf-8") for p in sorted(d.glob("*.txt"))]
    assert collections.Counter(sum(decoded(tmp_path / "out").values(), [])) == collections.Counter(expect)
    assert s.meta["source"]["format"] == "text" and s.meta["domains"] is None
    assert not (tmp_path / "out" / "train.domains.bin").exists()


def test_parquet_with_a_domain_column_writes_per_token_domains(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus(60)
    domains = ["code" if "def" in t or i % 3 == 0 else "prose" for i, t in enumerate(docs)]
    pq.write_table(pa.table({"body": docs, "domain": domains}), tmp_path / "c.parquet")
    prepare(data_files=str(tmp_path / "c.parquet"), text_column="body", out=tmp_path / "out")
    data = TokenData.open(tmp_path / "out")
    tok, names = data.tokenizer(), data.meta["domains"]
    assert sorted(names) == ["code", "prose"]
    want = collections.Counter(zip(docs, domains))
    got = collections.Counter()
    for split in data.splits:
        ids, dom = np.asarray(data.split(split)), np.asarray(data.domains(split))
        ends = np.flatnonzero(ids == data.eot_id)
        for start, end in zip(np.r_[0, ends[:-1] + 1], ends):
            assert len(set(dom[start:end + 1].tolist())) == 1  # one domain per document, EOT included
            got[(tok.decode(ids[start:end].tolist()), names[dom[start]])] += 1
    assert got == want


def test_builtin_corpus_documents_are_stdlib_files_tagged_with_their_module(tiny_data_dir):
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
    by_text = collections.defaultdict(set)  # text -> top-level module names of files holding it
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).parts
        if not excluded & set(rel[:-1]):
            by_text[p.read_bytes().decode("utf-8", "replace")].add(rel[0] if len(rel) > 1 else p.stem)
    data = TokenData.open(tiny_data_dir)
    tok, names = data.tokenizer(), data.meta["domains"]
    n = 0
    for split in data.splits:
        ids, dom = np.asarray(data.split(split)), np.asarray(data.domains(split))
        ends = np.flatnonzero(ids == data.eot_id)
        for start, end in zip(np.r_[0, ends[:-1] + 1], ends):
            text = tok.decode(ids[start:end].tolist())
            assert names[dom[start]] in by_text[text]  # a real stdlib file, tagged with its module
            n += 1
    assert n == 80 == data.meta["splits"]["train"]["documents"] + data.meta["splits"]["val"]["documents"] \
        + data.meta["splits"]["test"]["documents"]
    assert data.meta["source"]["kind"] == "builtin" and data.meta["dtype"] == "uint16"


def test_meta_records_counts_dtype_and_the_sha256_of_each_file(tiny_data_dir):
    import moe_lm

    meta = json.loads((tiny_data_dir / "meta.json").read_text())
    assert meta["version"] == moe_lm.__version__ and meta["vocab_size"] == 512
    for name, info in meta["files"].items():
        blob = (tiny_data_dir / name).read_bytes()
        assert info == {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    for split, info in meta["splits"].items():
        assert info["tokens"] * 2 == (tiny_data_dir / f"{split}.bin").stat().st_size
    assert meta["split"]["val_fraction"] == 0.03 and meta["split"]["test_fraction"] == 0.05  # conftest's


def test_hf_dataset_folder_uses_its_own_validation_split(tmp_path):
    """A dataset in the `datasets` layout (train/validation files), read offline with --streaming."""
    ds = tmp_path / "my_dataset"
    ds.mkdir()
    train, val = corpus(80, seed=1), [f"validation document {i} " * 5 for i in range(12)]
    write_jsonl(ds / "train.jsonl", train)
    write_jsonl(ds / "validation.jsonl", val)
    s = prepare(dataset=str(ds), streaming=True, out=tmp_path / "out", test_fraction=0.1)
    back = decoded(tmp_path / "out")
    assert back["val"] == val  # the dataset's own split, whole and in order
    assert collections.Counter(back["train"] + back["test"]) == collections.Counter(train)
    assert s.meta["splits"]["val"]["made_by"] == "validation" and s.meta["split"]["val_fraction"] is None


def test_reused_tokenizer_gives_the_same_ids(tmp_path, tiny_data_dir):
    docs = corpus(30)
    write_jsonl(tmp_path / "c.jsonl", docs)
    s = prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "out",
                tokenizer=tiny_data_dir / "tokenizer.json", vocab_size=None)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tiny_data_dir / "tokenizer.json").read_bytes()
    assert s.meta["vocab_size"] == 512 and s.meta["tokenizer"]["trained"] is False
    assert collections.Counter(sum(decoded(tmp_path / "out").values(), [])) == collections.Counter(docs)


def test_tokenizer_sample_cap_trains_on_the_first_documents_and_still_encodes_all(tmp_path):
    """Past tokenizer_sample_bytes the BPE stops reading, and the tokenising pass reads the source
    again from the start (nothing held in memory)."""
    docs = corpus(200)
    write_jsonl(tmp_path / "c.jsonl", docs)
    s = prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "out", tokenizer_sample_bytes=5000)
    trained = s.meta["tokenizer"]["trained_on"]
    assert trained["sample"].startswith("the first") and trained["bytes"] <= 5000
    assert s.documents == len(docs)
    assert collections.Counter(sum(decoded(tmp_path / "out").values(), [])) == collections.Counter(docs)


# ---------------------------------------------------------------------------------------------
# the split


def documented_split(text: str, val: float, test: float) -> str:
    """The rule meta.json states: u = BLAKE2b-64(text) / 2^64; test below `test`, then val."""
    u = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def test_split_is_per_document_deterministic_and_follows_the_stated_rule(tmp_path):
    docs = corpus(400, seed=2)
    write_jsonl(tmp_path / "c.jsonl", docs)
    a = prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "a", val_fraction=0.2, test_fraction=0.1)
    prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "b", val_fraction=0.2, test_fraction=0.1)
    for name in a.meta["files"]:  # the same bytes twice, tokenizer included
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    back = decoded(tmp_path / "a")
    for split, texts in back.items():
        assert all(documented_split(t, 0.2, 0.1) == split for t in texts)
    n = len(docs)
    assert abs(len(back["val"]) - 0.2 * n) < 3 * (0.2 * 0.8 * n) ** 0.5  # fractions within 3 sigma
    assert abs(len(back["test"]) - 0.1 * n) < 3 * (0.1 * 0.9 * n) ** 0.5
    # adding documents never moves the old ones to another split
    write_jsonl(tmp_path / "more.jsonl", docs + corpus(50, seed=3)[len(TRICKY):])
    prepare(data_files=str(tmp_path / "more.jsonl"), out=tmp_path / "c", val_fraction=0.2, test_fraction=0.1)
    more = decoded(tmp_path / "c")
    for split in back:
        assert set(back[split]) <= set(more[split])


def test_caps_stop_before_a_document_and_never_cut_one(tmp_path):
    docs = corpus(100)
    write_jsonl(tmp_path / "c.jsonl", docs)
    s = prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "a", max_documents=50)
    assert s.documents == 50
    limit = sum(len(t.encode()) for t in docs[:70]) + 5
    s = prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "b", max_bytes=limit)
    assert s.documents == 70 and s.bytes <= limit
    assert collections.Counter(sum(decoded(tmp_path / "b").values(), [])) == collections.Counter(docs[:70])


# ---------------------------------------------------------------------------------------------
# atomic output


def test_overwrite_replaces_the_folder_and_leaves_no_temporary_folders(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", corpus(30))
    out = tmp_path / "data" / "c"
    prepare(data_files=str(tmp_path / "c.jsonl"), out=out)
    (out / "marker").write_text("old")
    prepare(data_files=str(tmp_path / "c.jsonl"), out=out, overwrite=True)
    assert not (out / "marker").exists() and TokenData.open(out)
    assert os.listdir(out.parent) == ["c"]


def test_overwrite_never_deletes_a_folder_prepare_did_not_write_nor_its_own_input(tmp_path):
    # --overwrite deleted whatever --out named: a folder of the user's files, even the corpus itself
    texts = tmp_path / "notes"
    texts.mkdir()
    for i, t in enumerate(corpus(20)):
        (texts / f"{i}.txt").write_text(t)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    for out, data_files, why in ((texts, str(texts / "*.txt"), "holds .*0.txt, an input of this prepare"),
                                 (mine, str(texts / "*.txt"), "not a data folder `moe-lm prepare` wrote")):
        before = {p: p.read_bytes() for p in out.rglob("*")}
        with pytest.raises(DataError, match=why):
            prepare(data_files=data_files, out=out, overwrite=True)
        assert {p: p.read_bytes() for p in out.rglob("*")} == before
    proc = moe_lm("prepare", "--data-files", str(texts), "--out", str(texts), "--overwrite", cwd=tmp_path)
    assert_one_line_error(proc, "an input of this prepare")
    # an empty folder, and a folder prepare wrote, are replaced as before
    (tmp_path / "empty").mkdir()
    prepare(data_files=str(texts / "*.txt"), out=tmp_path / "empty", overwrite=True)
    prepare(data_files=str(texts / "*.txt"), out=tmp_path / "empty", overwrite=True)
    assert TokenData.open(tmp_path / "empty")


def test_ctrl_c_leaves_no_partial_folder(tmp_path, monkeypatch):
    from moe_lm.data import sources

    real, calls = sources.read_python_source, []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(sources, "read_python_source", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(out=tmp_path / "data" / "builtin", max_documents=60)
    assert not (tmp_path / "data").exists()  # neither data/builtin nor data/.builtin.tmp-*


def test_a_long_run_of_letters_is_cut_for_tokenizer_training_and_still_round_trips_exactly(tmp_path):
    # one 200 KB "word" among ordinary documents: BPE training costs ~length^2 per merge for it
    # (minutes at 1 MB). A repeated pattern also makes the untouched trainer learn tokens tens of
    # thousands of characters long, which the cut must prevent.
    long_doc = "before " + "abcdefgh" * 25_000 + " after\n"
    docs = corpus(40) + [long_doc]
    write_jsonl(tmp_path / "c.jsonl", docs)
    s = prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "out", val_fraction=0.1, test_fraction=0)
    back = decoded(tmp_path / "out")
    assert long_doc in back["train"]  # by its hash (0.72 > val_fraction): the tokenizer trained on it
    trained_on = s.meta["tokenizer"]["trained_on"]
    assert trained_on["max_word_chars"] == 1000  # the documented default
    assert trained_on["cut_words"] == 1
    tok = TokenData.open(tmp_path / "out").tokenizer()
    longest = max(len(tok.decode([i])) for i in range(tok.get_vocab_size()))
    assert 100 < longest <= 1000 + 1  # pieces were learnt, none longer than the cap (+ a leading space)
    # the corpus itself is encoded exactly, long word included
    assert collections.Counter(sum(back.values(), [])) == collections.Counter(docs)
    # and the summary says so
    from moe_lm.data.prepare import render_summary

    console = quiet()
    render_summary(s, console)
    assert "1 word(s) longer than 1,000 characters were cut" in console.file.getvalue()


def test_the_word_cap_is_a_setting_and_cuts_every_long_run(tmp_path):
    # letters, digits, punctuation and whitespace each form words of their own
    runs = ["x" * 700, "7" * 650, "-" * 900, " " * 800, "\n" * 620]
    docs = corpus(40) + [f"doc {i}: " + r + " end" for i, r in enumerate(runs)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    s = prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "out", val_fraction=0.05, test_fraction=0,
                max_word_chars=64)
    back = decoded(tmp_path / "out")
    assert collections.Counter(sum(back.values(), [])) == collections.Counter(docs)
    assert all(d in back["train"] for d in docs[-len(runs):])  # by their hashes (all > 0.27)
    # reference: every maximal run of whitespace / non-whitespace over 64 characters in the
    # documents the tokenizer trained on
    long_runs = sum(len(r) > 64 for d in back["train"] for r in re.findall(r"\S+|\s+", d))
    assert long_runs >= len(runs) and s.meta["tokenizer"]["trained_on"]["cut_words"] == long_runs
    tok = TokenData.open(tmp_path / "out").tokenizer()
    assert max(len(tok.decode([i])) for i in range(tok.get_vocab_size())) <= 64 + 1


def test_ctrl_c_acts_while_the_tokenizer_is_still_training(tmp_path, monkeypatch):
    # The BPE training runs in Rust, which holds Python's signal handlers back until it returns
    # (42 s in the issue). Here the training is made slow on purpose (no word cap, a long run of
    # random letters) and Ctrl-C comes 0.3 s after its last text: prepare must stop without
    # waiting for the training (its process is killed, not left to finish) and leave nothing behind.
    import random
    import signal
    import string
    import threading

    from moe_lm.data import prepare as prep

    started = []

    class Recorded(prep.TrainingProcess):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            started.append(self.process)

        def feed(self, texts):
            super().feed(texts)
            threading.Timer(0.3, signal.raise_signal, (signal.SIGINT,)).start()

    monkeypatch.setattr(prep, "TrainingProcess", Recorded)
    rng = random.Random(0)
    letters = "".join(rng.choice(string.ascii_letters) for _ in range(100_000))
    write_jsonl(tmp_path / "c.jsonl", corpus(40) + [f"x {letters} y"])
    with pytest.raises(KeyboardInterrupt):
        prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "out", vocab_size=2000, max_word_chars=10**9)
    assert len(started) == 1 and started[0].returncode == -signal.SIGKILL  # stopped, not waited for
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]  # no output, no temporary folder
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler put back


def test_bad_tokenizer_path_and_vocab_mismatch_are_clear_errors(tmp_path, tiny_data_dir):
    write_jsonl(tmp_path / "c.jsonl", corpus(10))
    with pytest.raises(DataError, match="tokenizer file not found"):
        prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "o", tokenizer=tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable tokenizer.json"):
        prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "o", tokenizer=tmp_path / "bad.json")
    with pytest.raises(DataError, match="--vocab-size 300 does not match .* 512 tokens"):
        prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "o", tokenizer=tiny_data_dir / "tokenizer.json")
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "c.jsonl"]


# ---------------------------------------------------------------------------------------------
# the command line: one line, exit 2, nothing left behind


def test_unreachable_hub_fails_fast_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: the Hub is "down"
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    t0 = time.perf_counter()
    proc = moe_lm("prepare", "--dataset", "some/name", cwd=tmp_path, env=env)
    assert time.perf_counter() - t0 < 10
    assert_one_line_error(proc, "cannot reach the Hugging Face Hub", "some/name", "--data-files")
    assert not (tmp_path / "data").exists()


def test_empty_corpus_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("")
    proc = moe_lm("prepare", "--data-files", "*.txt", "--name", "empty", cwd=tmp_path)
    assert_one_line_error(proc, "corpus is empty", "3 empty document")
    assert sorted(os.listdir(tmp_path)) == ["0.txt", "1.txt", "2.txt"]  # no data/ left behind


def test_unreadable_file_is_named(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", corpus(20))
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    proc = moe_lm("prepare", "--data-files", "*.jsonl", "--vocab-size", "300", cwd=tmp_path)
    assert_one_line_error(proc, "cannot read b.jsonl")
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl"]


def test_wrong_text_column_names_the_available_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", corpus(20), column="body")
    proc = moe_lm("prepare", "--data-files", "a.jsonl", "--text-column", "content", cwd=tmp_path)
    assert_one_line_error(proc, "no column 'content'", "body, id", "--text-column")
    assert os.listdir(tmp_path) == ["a.jsonl"]


def test_existing_output_folder_is_refused_and_kept(tmp_path):
    out = tmp_path / "data" / "builtin"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    proc = moe_lm("prepare", cwd=tmp_path)
    assert_one_line_error(proc, "data/builtin already exists", "--overwrite")
    assert os.listdir(tmp_path / "data") == ["builtin"] and os.listdir(out) == ["keep.txt"]


def test_glob_that_matches_nothing_is_an_error(tmp_path):
    proc = moe_lm("prepare", "--data-files", "notes/*.txt", cwd=tmp_path)
    assert_one_line_error(proc, "no file matches --data-files 'notes/*.txt'")
    assert os.listdir(tmp_path) == []


def test_cli_prepares_and_prints_the_summary(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", corpus(40))
    proc = moe_lm("prepare", "--data-files", "c.jsonl", "--vocab-size", "300", "--test-fraction", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for word in ("documents", "tokens", "bytes/token", "MB/s", "total"):
        assert word in proc.stdout
    data = TokenData.open(tmp_path / "data" / "c")  # the name defaults to the file's stem
    assert data.splits == ["train", "val"] and data.vocab_size == 300



@pytest.mark.parametrize("where", ["TrainingProcess.result", "encode_batch"])
def test_a_ctrl_c_that_a_library_swallows_still_stops_prepare_with_nothing_written(where, tmp_path, monkeypatch):
    # tokenizers' Rust code can consume the KeyboardInterrupt of a Ctrl-C that lands inside it;
    # simulate exactly that: a real SIGINT whose exception the library catches and drops
    import signal

    from moe_lm.data import prepare as prep

    owner, _, name = where.rpartition(".")
    owner = getattr(prep, owner) if owner else prep
    real = getattr(owner, name)

    def swallowing(*args, **kw):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, swallowing)
    write_jsonl(tmp_path / "c.jsonl", corpus(40))
    with pytest.raises(KeyboardInterrupt):
        prepare(data_files=str(tmp_path / "c.jsonl"), out=tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]  # no temporary folder either
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler put back


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_or_sigterm_on_the_command_line_exits_128_plus_signal_and_writes_nothing(signame, status, tmp_path):
    # SIGTERM: kill, docker stop, a job scheduler; the shell's convention is 128 + the signal number
    import signal

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "moe_lm", "prepare"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until it reads the corpus, then send the signal
        if "training a byte-level BPE" in line:
            break
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert f"interrupted ({signame})" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # neither data/builtin nor a hidden data/.builtin.tmp-*


def test_a_ctrl_c_outside_prepare_s_own_handler_still_exits_130(tmp_path, monkeypatch):
    # click, run without standalone mode, *returns* 130 for a Ctrl-C it catches; run() must exit with it
    from moe_lm import cli
    from moe_lm.data import prepare as prep

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "render_summary", interrupted)
    write_jsonl(tmp_path / "c.jsonl", corpus(40))
    monkeypatch.setattr(sys, "argv", ["moe-lm", "prepare", "--data-files", str(tmp_path / "c.jsonl"),
                                      "--out", str(tmp_path / "out"), "--vocab-size", "300"])
    with pytest.raises(SystemExit) as e:
        cli.run()
    assert e.value.code == 130


def test_prepare_for_a_config_writes_its_data_dir_at_its_vocabulary(tmp_path):
    """`moe-lm prepare -c X.yaml` prepares what `train -c X.yaml` reads: data.dir, model.vocab_size."""
    from moe_lm.config import load_config
    from moe_lm.data.prepare import for_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-moe.yaml",
                      [f"data.dir={tmp_path / 'demo'}", "data.vocab_size=600"])
    opts = for_config(PrepareOptions(max_documents=40, val_fraction=0.2, test_fraction=0.0), cfg)
    assert (opts.out, opts.vocab_size, opts.max_documents) == (tmp_path / "demo", 600, 40)
    prepare_corpus(opts, console=Console(file=io.StringIO()))
    assert TokenData.open(tmp_path / "demo").vocab_size == 600
    # the command line's own choices win where they do not contradict the config
    assert for_config(PrepareOptions(out=tmp_path / "x"), cfg).out == tmp_path / "x"
    with pytest.raises(DataError, match="contradicts the config"):
        for_config(PrepareOptions(vocab_size=512), cfg)
