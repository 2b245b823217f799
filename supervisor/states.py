"""The instance states and the range of the events' numbers: plain values, without the event loop.

``events.py`` makes and fans out events with anyio; these are what the re-exec record's
check needs of them (handoff/shape.py), in the child interpreter that checks it, which
imports no event loop.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["MAX_SEQ", "State"]

#: The largest sequence number (a signed 64-bit integer: what a JSON reader in any language keeps).
MAX_SEQ = (1 << 63) - 1


class State(StrEnum):
    """The states of ARCHITECTURE.md's table."""

    STOPPED = "stopped"
    WAITING = "waiting"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"

    @property
    def alive(self) -> bool:
        """A process exists, or one is about to be started again without anyone asking."""
        return self in (State.WAITING, State.STARTING, State.RUNNING, State.BACKOFF, State.STOPPING)
