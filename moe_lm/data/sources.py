"""Where documents come from: the built-in corpus, a Hugging Face dataset, or local files.

A source is a list of *streams*; each stream is read from the start by calling it, and yields
`Document`s. A stream's `split` is the held-out split it supplies itself (a dataset's own
"validation" or "test" split), or None when prepare assigns each document a split by a hash
of its text. Sources open lazily (no file is read until the first stream is called), and every
failure a user can fix is a `DataError` of one line.

    builtin    the Python standard library source of this interpreter, one document per .py file
    dataset    `datasets.load_dataset(name, config)`; its own validation/test splits when it has them
    files      a glob of .txt (one document per file), .jsonl/.json or .parquet (one per row)
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import socket
import sys
import sysconfig
import threading
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

from ..errors import DataError, DatasetUnavailableError

# NOTE: directories of the standard library that are not library code (tests, the IDLE app,
# the removed 2to3 tool, installed third-party packages, demos, caches).
BUILTIN_EXCLUDED_DIRS = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                         "__pycache__", "turtledemo", "__phello__")
LOCAL_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HELD_OUT_NAMES = {"val": ("validation", "valid", "val", "dev"), "test": ("test",)}
DOMAIN_COLUMN = "domain"
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class Document:
    text: str
    domain: Optional[str] = None  # a tag such as the top-level module; None when the source has none


@dataclass
class Stream:
    """One pass over part of a source. `split` None = prepare assigns splits by hash."""

    label: str  # for messages and meta.json, e.g. "train" or "validation"
    split: Optional[str]
    read: Callable[[], Iterator[Document]]


@dataclass
class Source:
    kind: str  # builtin | dataset | files
    name: str  # the default output name: data/<name>/
    description: dict  # what was read, for meta.json
    streams: list[Stream]
    total_bytes: Optional[int] = None  # an estimate of the text size, for the progress bar
    notes: list[str] = field(default_factory=list)

    @property
    def own_splits(self) -> list[str]:
        return [s.split for s in self.streams if s.split is not None]


def open_source(dataset: Optional[str] = None, dataset_config: Optional[str] = None,
                split: Optional[str] = None, text_column: str = "text", streaming: bool = False,
                data_files: Optional[str] = None) -> Source:
    """The source the prepare options name: --dataset, --data-files, or (neither) the built-in corpus."""
    if dataset and data_files:
        raise DataError("--dataset and --data-files name two sources", "pass one of them")
    if dataset:
        return dataset_source(dataset, dataset_config, split, text_column, streaming)
    if data_files:
        return files_source(data_files, text_column)
    for flag, value in (("--dataset-config", dataset_config), ("--split", split)):
        if value:
            raise DataError(f"{flag} applies to --dataset only", "add --dataset NAME, or leave it out")
    return builtin_source()


# ---------------------------------------------------------------------------------------------
# built-in corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_files(root: Optional[Path] = None) -> list[Path]:
    """The library's .py files under `root` (default: this interpreter's stdlib), sorted.

    Leaves out BUILTIN_EXCLUDED_DIRS and anything that is not an importable name (lib-dynload,
    config-3.x-..., generated _sysconfigdata_*-linux-gnu.py): only modules a user can import.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise DataError(f"the standard library folder {root} does not exist",
                        "this Python has no stdlib source; use --data-files or --dataset instead")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in BUILTIN_EXCLUDED_DIRS and d.isidentifier()]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py") and f[:-3].isidentifier()]
    # NOTE: sort on path parts, not on os.walk's order (which is the filesystem's).
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def module_domain(path: Path, root: Path) -> str:
    """`json/decoder.py` -> "json"; a top-level module `os.py` -> "os"."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def read_python_source(path: Path) -> str:
    """A .py file's text, exactly (no newline translation), in its declared encoding (PEP 263)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            import io

            encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
            return raw.decode(encoding)
        except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
            raise DataError(f"cannot decode {path}: {exc}", "the file is neither UTF-8 nor in its declared encoding") from exc


def builtin_source(root: Optional[Path] = None) -> Source:
    root = Path(root) if root is not None else stdlib_root()
    files = builtin_files(root)

    def read() -> Iterator[Document]:
        for path in files:
            yield Document(read_python_source(path), module_domain(path, root))

    desc = {
        "kind": "builtin",
        "description": "Python standard library source, one document per .py file, domain = top-level module",
        "path": str(root),
        "python": sys.version.split()[0],
        "files": len(files),
        "excluded_dirs": list(BUILTIN_EXCLUDED_DIRS),
        "order": "sorted relative paths",
    }
    total = sum(p.stat().st_size for p in files)
    return Source("builtin", "builtin", desc, [Stream("stdlib", None, read)], total_bytes=total)


# ---------------------------------------------------------------------------------------------
# local files


def expand_data_files(pattern: str) -> list[Path]:
    """Files matching a glob (`**` allowed), or every supported file under a folder, sorted."""
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        paths = [p for p in Path(expanded).rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_KINDS]
    else:
        paths = [Path(p) for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p)]
    if not paths:
        raise DataError(f"no file matches --data-files '{pattern}'",
                        "check the path, and quote the glob so the shell leaves it alone: --data-files 'notes/*.txt'")
    return sorted(paths)


def files_source(pattern: str, text_column: str = "text") -> Source:
    files = expand_data_files(pattern)
    suffixes = sorted({p.suffix.lower() for p in files})
    unsupported = [s or "(none)" for s in suffixes if s not in LOCAL_KINDS]
    if unsupported:
        raise DataError(f"--data-files '{pattern}' matches files of unsupported type {', '.join(unsupported)}",
                        f"supported: {', '.join(LOCAL_KINDS)}; narrow the glob, e.g. 'notes/*.txt'")
    kinds = sorted({LOCAL_KINDS[s] for s in suffixes})
    if len(kinds) > 1:
        raise DataError(f"--data-files '{pattern}' mixes file types ({', '.join(suffixes)})",
                        "prepare one type at a time, e.g. 'notes/*.jsonl'")
    kind = kinds[0]
    column = "text" if kind == "text" else text_column

    def read() -> Iterator[Document]:
        yield from _read_local(kind, files, column, f"--data-files '{pattern}'")

    desc = {
        "kind": "files",
        "pattern": pattern,
        "format": kind,
        "files": [str(p) for p in files] if len(files) <= 100 else [str(p) for p in files[:100]] + ["..."],
        "n_files": len(files),
        "text_column": column,
        "documents": "one per file (text, newlines as read by Python: \\r\\n becomes \\n)" if kind == "text"
                     else "one per row",
    }
    total = sum(p.stat().st_size for p in files)
    return Source("files", default_files_name(pattern), desc, [Stream("files", None, read)], total_bytes=total)


def default_files_name(pattern: str) -> str:
    """'notes/*.txt' -> notes; 'corpus.jsonl' -> corpus; 'notes/' -> notes."""
    path = Path(os.path.expanduser(pattern))
    if not any(c in pattern for c in "*?[") and not path.is_dir():
        return path.stem or "files"
    while path.parts and any(c in path.name for c in "*?["):
        path = path.parent
    return path.resolve().name or "files"


def default_name(dataset: Optional[str] = None, dataset_config: Optional[str] = None,
                 data_files: Optional[str] = None) -> str:
    """The output name a source gets without --name (known before the source is opened)."""
    if dataset:
        return Path(dataset.rstrip("/")).name + (f"-{dataset_config}" if dataset_config else "")
    if data_files:
        return default_files_name(data_files)
    return "builtin"


def _read_local(kind: str, files: list[Path], column: str, where: str) -> Iterator[Document]:
    """Rows of local files through `datasets` in streaming mode (no Arrow cache is written)."""
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    ds = _load_local(kind, files, kwargs)
    rows = iter(ds)
    first = True
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - pyarrow, json and codec errors of many kinds
            raise _unreadable(kind, files, kwargs, exc) from exc
        if first:
            _check_column(row, column, where)
            first = False
        yield _row_document(row, column)


def _load_local(kind: str, files: list[Path], kwargs: dict):
    datasets = import_datasets()
    try:
        return datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train",
                                     streaming=True, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(kind, files, kwargs, exc) from exc


def _unreadable(kind: str, files: list[Path], kwargs: dict, exc: Exception) -> DataError:
    """Name the first file that fails on its own (only on the error path: one load per file)."""
    bad, reason = None, exc
    if len(files) == 1:
        bad = files[0]
    else:
        datasets = import_datasets()
        for path in files:
            try:
                for _ in datasets.load_dataset(kind, data_files=[str(path)], split="train", streaming=True, **kwargs):
                    pass
            except Exception as one:  # noqa: BLE001
                bad, reason = path, one
                break
    what = f"cannot read {bad}" if bad is not None else "cannot read the --data-files"
    hint = {"text": "text files must be UTF-8", "json": "a .jsonl file holds one JSON object per line",
            "parquet": "check that the file is a complete parquet file"}[kind]
    return DataError(f"{what}: {_one_line(reason)}", hint)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def dataset_source(name: str, config: Optional[str] = None, split: Optional[str] = None,
                   text_column: str = "text", streaming: bool = False) -> Source:
    """A dataset by Hub name (or a local dataset folder). Uses its own validation/test splits."""
    local = os.path.isdir(os.path.expanduser(name))
    if not local and name.startswith((".", "/", "~")):
        raise DataError(f"dataset folder {name} does not exist",
                        "pass a Hub name such as roneneldan/TinyStories, or local files with --data-files")
    if not local:
        _ensure_hub_or_offline(name)
    datasets = import_datasets()
    try:
        dd = datasets.load_dataset(os.path.expanduser(name) if local else name, config, streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - mapped to one line below
        raise _dataset_error(name, config, exc) from exc
    splits = list(dd.keys())
    if split is not None:
        if split not in dd:
            raise DataError(f"dataset {name} has no split '{split}'", f"its splits: {', '.join(splits)}")
        train_split = split
    elif "train" in dd:
        train_split = "train"
    elif len(splits) == 1:
        train_split = splits[0]
    else:
        raise DataError(f"dataset {name} has no 'train' split", f"pick one with --split: {', '.join(splits)}")

    streams = [Stream(train_split, None, lambda s=train_split: _read_hf(dd[s], name, s, text_column))]
    used = {"train": train_split}
    for ours, theirs in HELD_OUT_NAMES.items():
        own = next((s for s in theirs if s in dd and s != train_split), None)
        if own is not None:
            streams.append(Stream(own, ours, lambda s=own: _read_hf(dd[s], name, s, text_column)))
            used[ours] = own
    # fail now, not after tokenizer training, when the column is wrong
    columns = getattr(dd[train_split], "column_names", None)
    if columns:
        _check_column(dict.fromkeys(columns), text_column, f"dataset {name}")
    desc = {"kind": "dataset", "dataset": name, "config": config, "streaming": streaming,
            "available_splits": splits, "splits_used": used, "text_column": text_column}
    return Source("dataset", default_name(name, config), desc, streams)


def _read_hf(ds, name: str, split: str, column: str) -> Iterator[Document]:
    rows = iter(ds)
    first = True
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001
            raise _dataset_error(name, None, exc, f"while reading split {split}") from exc
        if first:
            _check_column(row, column, f"dataset {name}")
            first = False
        yield _row_document(row, column)


def hub_endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the Hub within `timeout` seconds?

    NOTE: in a thread, because the DNS lookup inside create_connection ignores the timeout.
    """
    host, port = hub_endpoint()
    ok = [False]

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return ok[0]


def _offline_env() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _ensure_hub_or_offline(name: str) -> None:
    """Probe the Hub once, quickly; when it is unreachable switch `datasets` to offline mode so it
    reads its local cache instead of retrying for half a minute."""
    if _offline_env() or hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # NOTE: both libraries read these at import; patch them if already imported.
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = True
        if hasattr(dc, "HF_DATASETS_OFFLINE"):
            dc.HF_DATASETS_OFFLINE = True


def _dataset_error(name: str, config: Optional[str], exc: Exception, where: str = "") -> DataError:
    reason = _one_line(exc)
    offline = _offline_env() or isinstance(exc, ConnectionError) or "offline" in reason.lower()
    if isinstance(exc, ConnectionError) or (offline and isinstance(exc, (FileNotFoundError, OSError))):
        host, _ = hub_endpoint()
        return DatasetUnavailableError(
            f"cannot reach the Hugging Face Hub ({host}) for dataset '{name}', and it is not in the local cache",
            "use local txt, jsonl, json or parquet files instead: --data-files 'corpus/*.jsonl'")
    if type(exc).__name__ in ("DatasetNotFoundError", "FileNotFoundError", "DataFilesNotFoundError"):
        return DatasetUnavailableError(f"dataset '{name}' was not found: {reason}",
                                       "check the name on huggingface.co/datasets, or use --data-files")
    suffix = f" {where}" if where else ""
    hint = "pass --dataset-config" if "config" in reason.lower() and config is None else "see the dataset's page on the Hub"
    return DataError(f"cannot load dataset '{name}'{suffix}: {reason}", hint)


# ---------------------------------------------------------------------------------------------
# shared


def import_datasets():
    """`import datasets`, with its log lines and progress bars for data files quietened: our own
    errors say what went wrong in one line."""
    import datasets

    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    return datasets


def _check_column(row: dict, column: str, where: str) -> None:
    if column not in row:
        available = ", ".join(str(c) for c in row) or "none"
        raise DataError(f"{where} has no column '{column}'; available columns: {available}",
                        "pick the text column with --text-column")


def _row_document(row: dict, column: str) -> Document:
    text = row[column]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise DataError(f"column '{column}' holds {type(text).__name__} values, not text",
                        "pick the text column with --text-column")
    domain = row.get(DOMAIN_COLUMN)
    return Document(text, None if domain is None else str(domain))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:300]


def describe_stream_source(source: Source) -> str:
    """A short human description for progress lines, e.g. 'builtin (Python 3.11 stdlib)'."""
    d: dict[str, Any] = source.description
    if source.kind == "builtin":
        return f"built-in corpus: Python {d['python']} standard library ({d['files']} files)"
    if source.kind == "files":
        return f"{d['n_files']} {d['format']} file(s) matching {d['pattern']}"
    return f"dataset {d['dataset']}" + (f" ({d['config']})" if d.get("config") else "")
