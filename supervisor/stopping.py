"""How a run is stopped: the supervise loop cancelled first, then the signal, then SIGKILL.

``Stopping`` is mixed into ``Instance`` (as ``RunSetup`` and ``Adoption`` are). The
order is the point: the loop is cancelled before the child is signalled, so an exit a
stop caused is never taken for a crash; the wait for the child is shielded and bounded
(``stop.timeout``, then SIGKILL to the group), so a stop abandoned halfway never leaves
a live child in ``stopping``. The SIGKILL's deadline is kept while it runs: a re-exec
hands it over (adoption.py).
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import anyio

from .events import State

if TYPE_CHECKING:
    from .config import InstanceConfig
    from .instance import Retry
    from .process import Child, ExitStatus


class Stopping:
    """The stop methods of ``Instance`` (see the module's docstring)."""

    if TYPE_CHECKING:  # what Instance provides
        config: InstanceConfig
        _state: State
        _child: Child | None
        _last_exit: ExitStatus | None
        _kill_at: float | None
        _loop_scope: anyio.CancelScope | None
        _loop_exited: anyio.Event | None
        _reason: str | None
        _trouble: Retry | None

        def _transition(
            self, to: State, *, reason: str | None = None, exit: ExitStatus | None = None
        ) -> None: ...

    async def _stop_locked(self, reason: str) -> None:
        # Shielded: a stop abandoned halfway (a client hung up) would leave a live child in
        # `stopping` for ever. It is bounded anyway, by stop.timeout and then SIGKILL.
        with anyio.CancelScope(shield=True):
            await self._stop_shielded(reason)

    async def _stop_shielded(self, reason: str) -> None:
        await self._cancel_loop()
        if self._state in (State.BACKOFF, State.WAITING):
            self._transition(State.STOPPED, reason=reason)
            return
        if self._state in (State.STARTING, State.RUNNING):
            self._transition(State.STOPPING, reason=reason)
        elif self._state is State.STOPPING:
            # A check was stopping the run, to start it again: this request takes that stop
            # over, and it ends ``stopped``, for the request's reason (a re-exec meanwhile too).
            self._reason = reason
            self._trouble = None
        child = self._child
        if child is not None and child.exit is None:
            if await self._terminate(child, self.config.stop.signal):
                reason = f"{reason}; killed after {self.config.stop.timeout:g}s"
            self._last_exit = child.exit
        if self._state is State.STOPPING:
            self._transition(State.STOPPED, reason=reason, exit=self._last_exit)

    async def _cancel_loop(self) -> None:
        scope = self._loop_scope
        if scope is not None:
            scope.cancel()
            exited = self._loop_exited = anyio.Event()
            await exited.wait()

    async def _kill_now(self) -> None:
        """The service is going away: no grace, but reap what we started."""
        child = self._child
        if child is not None and child.exit is None:
            child.send_signal(signal.SIGKILL, group=True)
            self._last_exit = await child.wait()

    async def _terminate(self, child: Child, sig: int) -> bool:
        """``sig``, then SIGKILL to the group after stop.timeout; True if it took the SIGKILL.

        Returns once the leader is reaped.
        """
        stop = self.config.stop
        child.send_signal(sig, group=stop.group)
        if sig not in (signal.SIGKILL, signal.SIGCONT):
            # A process stopped (SIGSTOP, ^Z, a debugger) takes the signal only once it runs:
            # without SIGCONT it sat until the SIGKILL, its handler never run. systemd does so too.
            child.send_signal(signal.SIGCONT, group=stop.group)
        return await self._kill_after(child, time.monotonic() + stop.timeout)

    async def _kill_after(self, child: Child, deadline: float) -> bool:
        """Wait for the leader until ``deadline`` (time.monotonic()), then SIGKILL the group.

        The deadline is kept in ``_kill_at`` while it runs: a re-exec hands it over.
        """
        self._kill_at = deadline
        try:
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                await child.wait()
            if child.exit is not None:
                return False
            child.send_signal(signal.SIGKILL, group=True)
            await child.wait()
            return True
        finally:
            self._kill_at = None
