"""SIGTERM and SIGINT while `supervisor run` checks its manifest: remembered, then acted on.

The service's own handlers come later (service.py). Until then SIGTERM killed the process
outright: harmless before the start made anything, but the instances' cgroup is made while the
check runs (placement.CgroupPlacement), and would have been left behind. So, while the check
runs, a stop signal is remembered, and the start ends where it can undo what it made
(``StopDuringCheck``, service_process.py), then the signal ends the process as it would have.

The handler only remembers. One that raised where the signal found the start was taken apart
by where that was: inside a class body's ``__set_name__`` (an import of the control plane)
Python turned it into a RuntimeError and the service ended with a traceback and status 1; a
handler runs only between two steps of Python code, so a signal that came just before the wait
on the check began its poll (or that the kernel gave another thread) left the service asleep
there for as long as the check took. The wait polls the signal wakeup fd instead
(ManifestCheck.result), and the start asks ``stop_if_signalled`` between its steps.

A SIGTERM that was ignored when the service started stays ignored; off the main thread (an
embedding caller) nothing is changed. SIGHUP is no stop: `supervisor run` remembers it and
reloads once the service listens (early_signals.py). SIGINT is taken the same way where
Python's own handler has it: a KeyboardInterrupt raised wherever the start was ended the
service, once in about fifteen starts, by SIGINT itself, with no word and nothing undone.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["CheckSignals", "StopDuringCheck"]


class StopDuringCheck(BaseException):
    """A stop signal came while the manifest was checked: the start is undone, then it ends it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class CheckSignals:
    """The stop signals' handlers and the wakeup fd, for the time of the check (a ``with`` block).

    Leaving the block restores what was there and raises ``StopDuringCheck`` for a signal that
    came and was not acted on yet, whatever else ended the block: a stop asked for wins over a
    manifest refused at the same moment.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.wakeup_fd: int | None = None  # the read end, for a wait to poll; None off the main thread
        self._taken: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup = -1

    def __enter__(self) -> CheckSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        for signum, default in defaults.items():
            if signal.getsignal(signum) == default:
                self._taken[signum] = signal.signal(signum, self._remember)
        self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup_fd = self._pipe[0]
        # The event loop sets its own later (trio warns when it finds one set): ours is undone on exit.
        self._previous_wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        return self

    def _remember(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def stop_if_signalled(self) -> None:
        """Raise ``StopDuringCheck`` for a stop signal that came: called where the start can undo."""
        if self.signum is not None:
            raise StopDuringCheck(self.signum)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = self.wakeup_fd = None
        for signum, previous in self._taken.items():
            signal.signal(signum, previous)  # one that comes from here on has its old effect
        self._taken.clear()
        if not isinstance(error, StopDuringCheck):
            self.stop_if_signalled()
