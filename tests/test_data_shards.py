"""The batch reader: seeded windows that a resume can replay, rank slices of one global batch,
evaluation windows that predict every token once, and a data folder that checks itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_lm.data.shards import TokenData, eval_windows, get_batch
from moe_lm.errors import DataError

# NOTE: tokens[i] = i, so a window's values say exactly where it was cut from.
RAMP = np.arange(5000, dtype=np.uint32)


def test_batch_is_a_pure_function_of_its_arguments():
    a = get_batch(RAMP, 7, 8, 32, seed=3)
    b = get_batch(RAMP, 7, 8, 32, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(get_batch(RAMP, 8, 8, 32, seed=3)[0], a[0])  # next batch differs
    assert not torch.equal(get_batch(RAMP, 7, 8, 32, seed=4)[0], a[0])  # another seed differs


def test_batch_rows_are_contiguous_windows_and_y_is_x_shifted_by_one():
    x, y = get_batch(RAMP, 0, 64, 16, seed=0)
    assert x.shape == y.shape == (64, 16) and x.dtype == y.dtype == torch.int64
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(16))  # contiguous slices of the split
    assert torch.equal(y, x + 1)  # the next token of each position
    assert starts.min() >= 0 and (y[:, -1] <= len(RAMP) - 1).all()  # never past the end


def test_windows_reach_both_ends_of_the_split():
    small = np.arange(20, dtype=np.uint16)
    starts = torch.cat([get_batch(small, i, 16, 4, seed=0)[0][:, 0] for i in range(20)])
    assert set(starts.tolist()) == set(range(20 - 4))  # every start 0..N-L-1, and no other


def test_rank_slices_concatenate_to_the_single_process_batch():
    full_x, full_y = get_batch(RAMP, 5, 12, 8, seed=1)
    for world in (2, 3, 4):
        parts = [get_batch(RAMP, 5, 12, 8, seed=1, rank=r, world_size=world) for r in range(world)]
        assert all(p[0].shape == (12 // world, 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), full_y)
    with pytest.raises(ValueError):
        get_batch(RAMP, 0, 10, 8, seed=0, world_size=3)


@pytest.mark.parametrize("n, seq_len, batch_size", [(1001, 32, 4), (97, 8, 3), (33, 32, 2), (129, 32, 1)])
def test_eval_windows_predict_every_token_after_the_first_exactly_once(n, seq_len, batch_size):
    tokens = np.arange(n, dtype=np.uint32)
    targets = []
    for x, y in eval_windows(tokens, seq_len, batch_size):
        assert x.shape == y.shape and x.shape[0] <= batch_size and x.shape[1] <= seq_len
        assert torch.equal(y, x + 1)
        targets += y.flatten().tolist()
    assert sorted(targets) == list(range(1, n)) and len(targets) == n - 1


def test_eval_windows_sample_is_fixed_by_its_seed():
    a = list(eval_windows(RAMP, 16, 4, n_batches=3, seed=0))
    b = list(eval_windows(RAMP, 16, 4, n_batches=3, seed=0))
    c = list(eval_windows(RAMP, 16, 4, n_batches=3, seed=1))
    assert len(a) == 3 and all(x.shape == (4, 16) for x, _ in a)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_a_split_shorter_than_one_window_is_a_clear_error():
    short = np.arange(10, dtype=np.uint16)
    with pytest.raises(DataError, match="fewer than seq_len"):
        get_batch(short, 0, 2, 10, seed=0)
    with pytest.raises(DataError, match="fewer than seq_len"):
        eval_windows(short, 10, 2)  # raised at the call, not at the first batch


# ---------------------------------------------------------------------------------------------
# TokenData


def test_token_data_opens_a_prepared_folder(tiny_data_dir):
    data = TokenData.open(tiny_data_dir)
    tok = data.tokenizer()
    assert data.vocab_size == tok.get_vocab_size() == 512
    assert data.eot_id == tok.token_to_id("<|endoftext|>")
    train = data.split("train")
    assert train.dtype == np.uint16 and train.max() < data.vocab_size
    assert len(train) == (tiny_data_dir / "train.bin").stat().st_size // 2
    with pytest.raises(ValueError):  # read-only memmap
        train[0] = 1
    doms = data.domains("train")
    assert doms is not None and doms.shape == train.shape and doms.max() < len(data.meta["domains"])
    with pytest.raises(DataError, match="no nope split, only train, val, test"):
        data.split("nope")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_token_data_detects_a_truncated_token_file(tiny_data_dir, tmp_path):
    d = _copy(tiny_data_dir, tmp_path / "d")
    size = (d / "val.bin").stat().st_size
    with open(d / "val.bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(DataError, match=r"val\.bin has \d+ bytes but meta\.json records .*moe-lm prepare"):
        TokenData.open(d)


def test_token_data_detects_a_missing_file_meta_or_a_wrong_dtype(tiny_data_dir, tmp_path):
    d = _copy(tiny_data_dir, tmp_path / "d")
    (d / "test.bin").unlink()
    with pytest.raises(DataError, match=r"test\.bin is missing"):
        TokenData.open(d)
    d = _copy(tiny_data_dir, tmp_path / "e")
    meta = json.loads((d / "meta.json").read_text())
    meta["dtype"] = "uint32"
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="is not .* uint32 tokens"):
        TokenData.open(d)
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match="has no meta.json.*moe-lm prepare"):
        TokenData.open(d)


def test_token_dtype_is_uint16_while_every_id_fits():
    from moe_lm.data.shards import token_dtype

    assert token_dtype(512) == token_dtype(65536) == "uint16"  # ids 0..65535
    assert token_dtype(65537) == "uint32"


def test_a_token_id_past_the_vocabulary_is_named_when_the_split_is_opened(tiny_data_dir, tmp_path):
    # a file changed after prepare without changing its size (bit rot, a bad copy): the sizes
    # match meta.json, so only the ids can tell; left alone it was an IndexError in the embedding
    d = _copy(tiny_data_dir, tmp_path / "d")
    data = TokenData.open(d)
    ids = np.fromfile(d / "train.bin", dtype=data.dtype)
    ids[len(ids) // 2] = data.vocab_size  # one past the last id
    ids.tofile(d / "train.bin")
    data = TokenData.open(d)  # sizes unchanged: opening succeeds
    assert len(data.split("val")) > 0
    with pytest.raises(DataError, match=rf"train\.bin holds token id {data.vocab_size}, but the vocabulary has "
                                        rf"{data.vocab_size} tokens .*moe-lm prepare"):
        data.split("train")
