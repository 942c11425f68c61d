"""Token shards on disk: writing them, opening them (with checks), and reading batches.

A prepared folder holds, per split, one flat file of token ids `<split>.bin` (uint16 when the
vocabulary fits, else uint32; documents back to back, each followed by EOT) and, when the
documents carry domain tags, `<split>.domains.bin` (uint16, one domain id per token).
`meta.json` records every file's byte size and sha256.

Reading never loops over tokens in Python: a batch is one numpy fancy-index gather from a memmap.

    data = TokenData.open("data/builtin")        # or open_for_config(cfg): checked for training
    x, y = get_batch(data.split("train"), batch_index=0, batch_size=16, seq_len=128, seed=0)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Optional

import numpy as np

from ..errors import DataError
from ..files import sha256_file

if TYPE_CHECKING:
    import torch

    from ..config import Config

META = "meta.json"
TOKENIZER = "tokenizer.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
DOMAIN_DTYPE = np.uint16
PREPARE_HINT = "prepare it again with `moe-lm prepare --overwrite` (add the options you used)"


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (vocab ≤ 65536), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ---------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Appends arrays to one file and hashes them on the way (no second read for sha256)."""

    def __init__(self, path: Path, dtype: str):
        self.path = Path(path)
        self.dtype = np.dtype(DTYPES.get(dtype, dtype))
        self._f: BinaryIO = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self.count = 0  # elements written

    def write(self, values: np.ndarray) -> None:
        buf = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        self._f.write(buf)
        self._sha.update(buf)
        self.count += len(values)

    def close(self) -> dict:
        """Close; returns {"bytes", "sha256"} for meta.json."""
        if not self._f.closed:
            self._f.flush()
            self._f.close()
        return {"bytes": self.count * self.dtype.itemsize, "sha256": self._sha.hexdigest()}


# ---------------------------------------------------------------------------------------------
# reading


class TokenData:
    """A prepared data folder, checked against its meta.json. Open with `TokenData.open(dir)`."""

    def __init__(self, data_dir: Path, meta: dict):
        self.dir = Path(data_dir)
        self.meta = meta
        self.vocab_size = int(meta["vocab_size"])
        self.eot_id = int(meta["eot_id"])
        self.dtype = np.dtype(DTYPES[meta["dtype"]])
        self.tokenizer_path = self.dir / meta.get("tokenizer_file", TOKENIZER)
        self._splits: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, data_dir: str | Path) -> "TokenData":
        """Check meta.json and that every file it names exists with the recorded size and dtype."""
        data_dir = Path(data_dir)
        meta_path = data_dir / META
        if not meta_path.is_file():
            what = "does not exist" if not data_dir.exists() else f"has no {META}"
            raise DataError(f"data folder {data_dir} {what}",
                            "prepare it with `moe-lm prepare` for the built-in corpus, see `moe-lm prepare --help` for others")
        try:
            meta = json.loads(meta_path.read_text())
            files, splits = meta["files"], meta["splits"]
            dtype = meta["dtype"]
            int(meta["vocab_size"]), int(meta["eot_id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{meta_path} is not a moe-lm meta.json ({type(exc).__name__}: {exc})", PREPARE_HINT) from exc
        if dtype not in DTYPES:
            raise DataError(f"{meta_path}: dtype {dtype!r} is not one of {', '.join(DTYPES)}", PREPARE_HINT)
        if int(meta["vocab_size"]) > np.iinfo(DTYPES[dtype]).max + 1:
            raise DataError(f"{meta_path}: vocab_size {meta['vocab_size']} does not fit dtype {dtype}", PREPARE_HINT)
        for fname, info in files.items():
            path = data_dir / fname
            if not path.is_file():
                raise DataError(f"{path} is missing (meta.json lists it)", PREPARE_HINT)
            size = path.stat().st_size
            if size != info["bytes"]:
                raise DataError(f"{path} has {size} bytes but meta.json records {info['bytes']} "
                                "(truncated or changed after prepare)", PREPARE_HINT)
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        for split, info in splits.items():
            nbytes = files[info["file"]]["bytes"]
            if nbytes != info["tokens"] * itemsize:
                raise DataError(f"{data_dir / info['file']}: {nbytes} bytes is not {info['tokens']} {dtype} tokens",
                                PREPARE_HINT)
        _check_tokenizer(data_dir / meta.get("tokenizer_file", TOKENIZER), meta)
        return cls(data_dir, meta)

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def split(self, name: str) -> np.ndarray:
        """The token ids of split `name` as a read-only memmap, shape [n_tokens]. DataError when the
        split is missing or holds an id ≥ vocab_size (checked once, at the first call)."""
        if name not in self.meta["splits"]:
            raise DataError(f"data folder {self.dir} has no {name} split, only {', '.join(self.splits)}",
                            "pick one of those, or prepare again: --test-fraction 0.02 adds a test split")
        if name not in self._splits:
            info = self.meta["splits"][name]
            tokens = _memmap(self.dir / info["file"], self.dtype, info["tokens"])
            # NOTE: open() checks sizes, not contents; an id past the vocabulary (a file changed
            # after prepare, same size) would otherwise be an IndexError deep in the embedding,
            # after a run folder was already set up. One read of the file: the demo's 3.4M ids, ~15 ms.
            top = int(tokens.max()) if len(tokens) else -1
            if top >= self.vocab_size:
                raise DataError(f"{self.dir / info['file']} holds token id {top}, but the vocabulary has "
                                f"{self.vocab_size} tokens (the file was changed after prepare)", PREPARE_HINT)
            self._splits[name] = tokens
        return self._splits[name]

    def domains(self, name: str) -> Optional[np.ndarray]:
        """Domain id of each token of split `name` (uint16 memmap, parallel to `split(name)`), or None.

        The names of the ids are `meta["domains"]`.
        """
        info = self.meta["splits"].get(name)
        if info is None:
            self.split(name)  # raises the DataError naming the splits
        if not info.get("domains_file"):
            return None
        return _memmap(self.dir / info["domains_file"], np.dtype(DOMAIN_DTYPE), info["tokens"])

    @property
    def domain_names(self) -> list[str]:
        return list(self.meta.get("domains") or [])

    def tokenizer(self):
        from .tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    def verify(self) -> None:
        """Re-hash every file and compare with meta.json (slow for big corpora; `open` only checks sizes)."""
        for fname, info in self.meta["files"].items():
            if sha256_file(self.dir / fname) != info["sha256"]:
                raise DataError(f"{self.dir / fname} does not match the sha256 in meta.json", PREPARE_HINT)


def _check_tokenizer(path: Path, meta: dict) -> None:
    """The tokenizer is small, so opening a data folder checks it whole: the sha256 meta.json
    recorded, that it loads, and that its vocabulary and end-of-text id are the ones the token
    files were written with. A damaged tokenizer.json would otherwise be copied into every
    checkpoint and only fail (or silently mis-decode) at eval or generate time."""
    from .tokenizer import load_tokenizer

    if not path.is_file():
        raise DataError(f"{path} is missing (meta.json lists it)", PREPARE_HINT)
    want = (meta["files"].get(path.name) or {}).get("sha256")
    if want is not None and sha256_file(path) != want:
        raise DataError(f"{path} is damaged: its sha256 does not match meta.json (changed after prepare)", PREPARE_HINT)
    try:
        tok = load_tokenizer(path)
    except DataError as exc:  # its message names the file and what is wrong with it
        raise DataError(exc.message, PREPARE_HINT) from exc
    if tok.get_vocab_size() != int(meta["vocab_size"]) or tok.token_to_id("<|endoftext|>") != int(meta["eot_id"]):
        raise DataError(f"{path} has {tok.get_vocab_size()} tokens and end-of-text id "
                        f"{tok.token_to_id('<|endoftext|>')}, but meta.json records {meta['vocab_size']} and "
                        f"{meta['eot_id']}", PREPARE_HINT)


def _memmap(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # NOTE: np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def open_for_config(cfg: Config) -> TokenData:
    """The data folder `cfg` trains on (data.dir), checked for training: it is a folder written by
    `moe-lm prepare`, its vocabulary is model.vocab_size when that is set, and its train and val
    splits hold at least model.seq_len + 1 tokens (DataError otherwise, with the fix). A null
    model.vocab_size is the caller's to fill from `.vocab_size`; cfg is not changed here."""
    data_dir = Path(cfg.data.dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data.dir {data_dir} is a file, not a data folder",
                        "set data.dir to a folder written by `moe-lm prepare`")
    if not data_dir.is_dir():
        how = (f"moe-lm prepare --out {data_dir} --vocab-size {cfg.data.vocab_size}" if cfg.data.vocab_size
               else "moe-lm prepare")
        raise DataError(f"data folder {data_dir} does not exist",
                        f"prepare it with `{how}` (built-in corpus; or `moe-lm prepare -c <this config>`), "
                        "or set data.dir=...")
    data = TokenData.open(data_dir)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != data.vocab_size:
        raise DataError(
            f"model.vocab_size = {cfg.model.vocab_size} but the tokenizer of {data_dir} has {data.vocab_size} tokens",
            "set model.vocab_size=null to take it from the data, or point data.dir at the matching folder",
        )
    need = cfg.model.seq_len + 1
    for split in ("train", "val"):
        try:
            n = len(data.split(split))
        except (KeyError, FileNotFoundError) as exc:
            raise DataError(f"data folder {data_dir} has no {split} split",
                            "prepare it again with `moe-lm prepare --overwrite`") from exc
        if n < need:
            raise DataError(f"the {split} split of {data_dir} has {n} tokens, fewer than model.seq_len + 1 = {need}",
                            "lower model.seq_len or prepare more text")
    return data


# ---------------------------------------------------------------------------------------------
# batches


def _check_long_enough(tokens: np.ndarray, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be ≥ 1, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise DataError(f"the split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}",
                        "lower model.seq_len or prepare more text")


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather windows tokens[s : s + length + 1] for each start; x = first `length`, y = last `length`."""
    import torch  # NOTE: here, so that `prepare` (which writes shards) starts without torch

    idx = starts[:, None] + np.arange(length + 1)  # [B, length + 1]
    win = torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def batch_starts(n_tokens: int, batch_index: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """Window starts of global batch `batch_index`: [batch_size] ints in [0, n_tokens - seq_len - 1].

    NOTE: a generator seeded by (seed, batch_index) rather than one stream advanced step by step,
    so batch i is known without drawing batches 0..i-1 (exact resume is free).
    """
    rng = np.random.default_rng([seed % 2**64, batch_index])
    return rng.integers(0, n_tokens - seq_len, size=batch_size)


def get_batch(tokens: np.ndarray, batch_index: int, batch_size: int, seq_len: int, seed: int,
              rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `batch_index` of a seeded stream of random windows, this rank's rows.

    tokens: [N] token ids (a memmap). Returns x, y: int64 [batch_size // world_size, seq_len], the
    windows tokens[s : s + seq_len] and tokens[s + 1 : s + seq_len + 1]. The global batch is drawn
    whole and rank r takes rows r*b:(r+1)*b, so the ranks' rows concatenated = the world_size=1 batch.
    """
    if batch_size % world_size != 0:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_index < 0:
        raise ValueError(f"batch_index must be ≥ 0, got {batch_index}")
    _check_long_enough(tokens, seq_len)
    starts = batch_starts(len(tokens), batch_index, batch_size, seq_len, seed)
    b = batch_size // world_size
    return _windows(tokens, starts[rank * b:(rank + 1) * b], seq_len)


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: Optional[int] = None,
                 seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches (x, y), int64 [≤ batch_size, seq_len'].

    n_batches None: non-overlapping windows tokens[k*L : k*L + L + 1] covering the split, so every
    token but the first is a target exactly once. Full windows come in batches of `batch_size`
    (the last batch may have fewer rows); a remainder shorter than L comes last, as its own
    batch of one row [1, r].
    n_batches given: a fixed seeded sample of `n_batches` batches of `batch_size` random windows.
    The split is checked now (DataError when shorter than seq_len + 1), batches are made lazily.
    """
    _check_long_enough(tokens, seq_len)
    if n_batches is None:
        return _cover(tokens, seq_len, batch_size)
    return _sample(tokens, seq_len, batch_size, n_batches, seed)


def _cover(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n_targets = len(tokens) - 1
    n_full, rest = divmod(n_targets, seq_len)
    for first in range(0, n_full, batch_size):
        starts = np.arange(first, min(first + batch_size, n_full)) * seq_len
        yield _windows(tokens, starts, seq_len)
    if rest:
        yield _windows(tokens, np.array([n_full * seq_len]), rest)


def _sample(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int,
            seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # NOTE: a stream label (2**32 - 1) apart from get_batch's batch indices, so a sample of the
    # training split never repeats the training batches themselves.
    rng = np.random.default_rng([seed % 2**64, 2**32 - 1])
    starts = rng.integers(0, len(tokens) - seq_len, size=(n_batches, batch_size))
    for row in starts:
        yield _windows(tokens, row, seq_len)
