"""A TERM, INT, HUP or USR2 sent during a re-exec reaches the service that acts on it.

From the moment ``Service.reexec`` commits to the handover until the new service listens, the
main thread blocks these signals: the mask and whatever is pending in it survive ``execve``, so
a signal that no thread takes crosses the exec and comes when the new service unblocks it.

The kernel does not leave a process-directed signal pending while some thread accepts it,
though: it hands it to an idle worker thread (the sampler's, a resolver's), whose C-level
handler only marks it for the main thread and writes its number to the wakeup fd. A Python
handler in the main thread would run at its next bytecode, which never comes once the main
thread is inside ``execv``: that signal would be lost, and it was (a TERM after the 202 left the
new service running, once under load). So the record of a signal is that byte, written by
whichever thread takes it: ``HeldSignals`` points the wakeup fd at a pipe of its own and hands
the pipe's read end over. Each signal is then either pending (no thread took it) or in the
pipe (one did), never both and never neither.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

__all__ = ["HANDOFF_SIGNALS", "HeldSignals", "read_held"]

#: Blocked from the handoff's start until the new service listens for them.
HANDOFF_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2})
_CHUNK = 4096


class HeldSignals:
    """The handoff's signals, held from ``__init__`` (in the main thread) to the exec or ``release``."""

    def __init__(self) -> None:
        self.fd, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDOFF_SIGNALS)
        # A Python handler that does nothing: the event loop's (trio's routes the signal to the
        # receiver, which would act on it now) must not run, and the C handler is still installed.
        self._handlers: dict[int, Any] = {signum: signal.signal(signum, _held) for signum in HANDOFF_SIGNALS}
        self._wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def add(self, signum: int) -> None:
        """One the event loop had taken before the wakeup fd pointed here: held like the others."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, bytes([signum]))

    def release(self) -> list[int]:
        """The exec did not happen: the loop's wakeup fd and handlers back; what came meanwhile.

        The signals stay blocked: the caller unblocks them, then raises each of these again.
        """
        signal.set_wakeup_fd(self._wakeup, warn_on_full_buffer=False)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        try:
            return read_held(self.fd)
        finally:
            os.close(self.fd)
            os.close(self._write)


def read_held(fd: int) -> list[int]:
    """The handoff's signals written to ``fd`` (each once, in the order they came), read to the end.

    Other signals' numbers (any signal with a Python handler writes to the wakeup fd) are not
    the handoff's to carry, and a byte that is not a signal number is nobody's: both are dropped.
    """
    found: list[int] = []
    while True:
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return found
        if not data:
            return found
        for signum in data:
            if signum in HANDOFF_SIGNALS and signum not in found:
                found.append(signum)


def _held(signum: int, frame: object) -> None:
    """Nothing: the signal's byte is in the pipe already (see the module's docstring)."""
