"""Stop signals: SIGTERM is treated as Ctrl-C (SIGINT) by every command.

`kill`, `docker stop`, job schedulers (preemption) and torchrun's teardown send SIGTERM, not
SIGINT. Python turns SIGINT into KeyboardInterrupt but lets SIGTERM kill the process at once, with
no cleanup; here both become `Interrupted` (a KeyboardInterrupt), so every `except
KeyboardInterrupt` / `except BaseException` cleanup runs for both, and the trainer's own handler
(finish the step, save a checkpoint) sees both.

The process then exits with the shell's convention, 128 + the signal's number: 130 for SIGINT,
143 for SIGTERM (`exit_status`).

    restore = raise_on_stop_signals()   # the CLI, for the duration of a command
    ...
    restore()
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # the stop signals this process received since the command started, in order


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT or SIGTERM) arrived. A KeyboardInterrupt, so Ctrl-C's cleanups run."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message or f"interrupted by {name(signum)}")
        self.signum = int(signum)


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def note(signum: int) -> None:
    """Record that a stop signal arrived (the exit status follows the first one)."""
    _received.append(int(signum))


def received() -> Optional[int]:
    """The first stop signal received since the command started, or None."""
    return _received[0] if _received else None


def signum_of(exc: Optional[BaseException] = None) -> int:
    """The signal that stopped the work: the exception's own, else the first one received,
    else SIGINT (a KeyboardInterrupt raised without a signal counts as Ctrl-C)."""
    own = getattr(exc, "signum", None)
    if own:
        return int(own)
    return received() or int(signal.SIGINT)


def exit_status(exc: Optional[BaseException] = None) -> int:
    """128 + the stopping signal's number: 130 after Ctrl-C, 143 after SIGTERM."""
    return 128 + signum_of(exc)


def raise_on_stop_signals() -> Callable[[], None]:
    """Make SIGINT and SIGTERM raise `Interrupted` in the main thread; returns a function that puts
    the previous handlers back. A signal that is ignored (SIG_IGN, e.g. SIGINT under nohup) stays
    ignored. Forgets the signals received before (one command, one record)."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, frame):
        note(signum)
        raise Interrupted(signum)

    for s in STOP_SIGNALS:
        prev = signal.getsignal(s)
        if prev is signal.SIG_IGN:
            continue
        previous[s] = signal.signal(s, handler)

    def restore() -> None:
        for s, prev in previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        previous.clear()

    return restore
