"""Shared fixtures. `tiny_data_dir`: a small prepared corpus that every test may read.

The Hugging Face libraries are put offline for the whole test session: no test may reach the
network (a test that needs the "Hub unreachable" path sets its own environment).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """data/<name>/ of the built-in corpus's first 80 documents, vocabulary 512 (about 2 s).

    Splits: train (most), val (≥ 4k tokens), test. Read-only: copy it before changing it.
    """
    from rich.console import Console

    from moe_lm.data.prepare import PrepareOptions, prepare_corpus
    from moe_lm.data.shards import TokenData

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare_corpus(PrepareOptions(out=out, max_documents=80, vocab_size=512, val_fraction=0.15,
                                  test_fraction=0.05), console=Console(file=io.StringIO()))
    data = TokenData.open(out)
    assert len(data.split("val")) >= 4096, "the tiny corpus must give val at least 4k tokens"
    return out
