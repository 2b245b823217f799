"""The event loop's signal wakeup fd, set again so that a full one does not print a traceback.

The interpreter's C handler writes each signal's number to the wakeup fd, and the event loop
reads it there. asyncio points that fd at its self-pipe each time a signal handler is added,
with Python's default: a warning and a traceback on stderr for every byte that does not fit.
A shutdown of 2,000 instances sends 2,000 SIGCHLDs faster than the loop reads them, and the
service's log got 881 tracebacks. A byte that does not fit is harmless: the loop has as many
left to read, and the receivers take a burst as one (orphans.py) or act on each kind of signal
(service.py), never on a count; trio sets its fd without the warning for that reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator

import anyio

__all__ = ["quiet_when_full", "signal_receiver"]


@contextlib.contextmanager
def signal_receiver(*signals: int) -> Iterator[AsyncIterator[int]]:
    """``anyio.open_signal_receiver``, and the wakeup fd set again without the warning after it:
    the service's receivers open through here, so that none brings the tracebacks back."""
    with anyio.open_signal_receiver(*signals) as received:
        quiet_when_full()
        yield received


def quiet_when_full() -> None:
    """The current wakeup fd, set again without the warning, in the main thread (asyncio sets
    the fd again for each ``anyio.open_signal_receiver``: ``signal_receiver`` calls this after).

    There is no call that reads the fd without setting one, so a pipe of ours stands in for the
    moment between the two calls; a signal taken then (by any thread) wrote its number there, and
    it is passed on to the loop's fd, so none is lost.
    """
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        loops = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        signal.set_wakeup_fd(loops, warn_on_full_buffer=False)
        with contextlib.suppress(BlockingIOError):
            came = os.read(read, 4096)
            if came and loops != -1:
                with contextlib.suppress(OSError):  # full: the loop has bytes to read already
                    os.write(loops, came)
    finally:
        os.close(read)
        os.close(write)
