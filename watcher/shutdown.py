"""Graceful stop on SIGINT/SIGTERM: finish the pair in hand, take no new one, exit 0.

The handler only flips a flag. It must not log, set a ``threading.Event`` or touch a queue:
it runs on the main thread between two bytecodes, possibly while that thread holds the very
(non-reentrant) lock such a call would take, which would deadlock. Loops poll the flag instead.
A second signal gets the default action, so an impatient user can still stop at once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Set once a stop was asked for; ``signal_name`` says which signal asked (if one did)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def request(self, signal_name: str | None = None) -> None:
        self.signal_name = signal_name
        self.requested = True


@contextmanager
def stop_on_signals(flag: StopFlag | None = None) -> Iterator[StopFlag]:
    """Install the handlers (main thread only) for the duration of the block."""
    flag = flag or StopFlag()

    def handle(signum: int, frame: FrameType | None) -> None:
        del frame
        flag.request(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
