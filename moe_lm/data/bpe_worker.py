"""The child process that trains `prepare`'s BPE: `python -m moe_lm.data.bpe_worker VOCAB MAX_WORD_CHARS`.

Why a process: the training runs in Rust, where Python's signal handlers wait until it returns
(42 s after a Ctrl-C in issue 14), and a thread stuck in Rust can be neither stopped nor left
behind safely at exit. A process is killed at once. `tokenizer.TrainingProcess` is the parent's
side.

Protocol: stdin carries pickled lists of texts, then None; stdout gets one pickled dict,
{"tokenizer": the tokenizer.json text, "cut_words": n}. Errors: one line on stderr, exit 1.
Ctrl-C is ignored here: the parent handles it and kills this process.
"""

from __future__ import annotations

import pickle
import signal
import sys


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (even by SIGKILL). Best effort."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - the parent also kills it; this only covers a parent's SIGKILL
        pass


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    from .tokenizer import WordCutter, train_tokenizer

    vocab, max_word_chars = int(argv[0]), int(argv[1])
    stdin = sys.stdin.buffer

    def texts():
        while True:
            batch = pickle.load(stdin)
            if batch is None:
                return
            yield from batch

    cutter = WordCutter(max_word_chars)
    try:
        tok = train_tokenizer(texts(), vocab, cutter=cutter)
    except Exception as exc:  # noqa: BLE001 - reported to the parent in one line
        print(f"{type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    pickle.dump({"tokenizer": tok.to_str(), "cut_words": cutter.cut_words}, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
