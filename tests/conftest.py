"""Shared fixtures. `tiny_data_dir`: a small prepared corpus that every test may read.

The Hugging Face libraries are put offline for the whole test session: no test may reach the
network (a test that needs the "Hub unreachable" path sets its own environment).
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest

# A shell starts a background job (`make test &`, a CI step under nohup) with SIGINT ignored, and
# processes inherit that, ignored signals surviving exec: the Ctrl-C tests would then send a
# signal nobody hears. Give this process Python's own Ctrl-C handler back; the children it starts
# get the default disposition again at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """data/<name>/ of the built-in corpus's first 80 documents, vocabulary 512 (about 2 s).

    Splits: train (most), val (5,455 tokens: ≥ 4k, and few, since every comparison's final
    evaluation reads all of them: at 15 % (74k tokens) the suite took ~90 s longer), test.
    Read-only: copy it before changing it.
    """
    from rich.console import Console

    from moe_lm.data.prepare import PrepareOptions, prepare_corpus
    from moe_lm.data.shards import TokenData

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare_corpus(PrepareOptions(out=out, max_documents=80, vocab_size=512, val_fraction=0.03,
                                  test_fraction=0.05), console=Console(file=io.StringIO()))
    data = TokenData.open(out)
    assert len(data.split("val")) >= 4096, "the tiny corpus must give val at least 4k tokens"
    return out


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="session")
def dump_dom(tmp_path_factory):
    """A function url -> the DOM a headless Chromium holds after the page's scripts ran (a str).

    The browser: $MOE_LM_CHROMIUM, else the first of BROWSERS on PATH (`make test` installs
    Debian's chromium when it can). Skips, saying why, when there is none.
    """
    import shutil
    import subprocess

    exe = os.environ.get("MOE_LM_CHROMIUM") or next((p for p in map(shutil.which, BROWSERS) if p), None)
    if not exe:
        pytest.skip("no headless Chromium on this machine (looked for $MOE_LM_CHROMIUM and "
                    f"{', '.join(BROWSERS)}): `make test` as root installs Debian's chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")

    def dump(url: str) -> str:
        proc = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0 and "<html" in proc.stdout, f"{exe} failed: {proc.stderr[-2000:]}"
        return proc.stdout

    return dump


@pytest.fixture
def cli_here(monkeypatch, capsys):
    """Run `moe-lm ARGS...` in this process (the CLI's own entry point, no interpreter start):
    cli_here(*args) -> (exit code, stdout, stderr)."""
    import sys

    from moe_lm import cli

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["moe-lm", *args])
        try:
            cli.run()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run
