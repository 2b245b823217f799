"""One task reads every log pipe: an epoll descriptor, and a synchronous turn per ready pipe.

A task costs 3 to 4 KB (its coroutine frames, anyio's handle, the cancel scope and the
event around it; docs/performance.md); with a reader task per captured stream, a
thousand instances kept two thousand tasks alive to wait on pipes that are mostly
quiet. Here the read ends are registered with one ``select.epoll``, and one task awaits
that descriptor (``anyio.wait_readable`` works on it under asyncio and trio alike).
When it turns readable, the task asks epoll which pipes are ready and hands each to
its reader's ``read_turn(budget)``, synchronous code that reads and takes in up to
``budget`` bytes. A pipe costs an entry in a dict and one in the kernel's epoll set.

Fairness is the reactor's business now (it was a semaphore over the sinks' tasks):

* every ready pipe gets one turn per pass over epoll's answer, so a chatty pipe that
  stays ready cannot starve a quiet one: the quiet one waits at most one pass;
* a turn reads at most ``TURN_BUDGET`` bytes, and after ``ROUND_BYTES`` read (or
  ``ROUND_TURNS`` turns) the task lets the event loop go round once, so a hundred
  chatty children cannot hold the control plane: `supervisor status` is answered
  within a few rounds. Meanwhile the children wait on their full pipes: backpressure,
  nothing is dropped.

A pipe with no writer is always readable (epoll says EPOLLHUP): a reader says so by
returning ``Turn.EOF``, and the reactor stops watching that pipe until the reader asks
again (``watch``, when a new writer is attached). Each pipe is registered one-shot and
armed again after its turn (one ``epoll_ctl``): a pipe left with data is reported again
at the next pass, and an entry the reactor no longer knows (a read end closed by its
owner while a copy of it lived on elsewhere, which epoll keeps reporting under a number
that is gone) is reported once, not at every pass for ever.

One reader's fault (an exception from its turn) is logged and that pipe dropped; the
others go on (ARCHITECTURE.md, decision 12).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import select
from typing import Protocol

import anyio
import anyio.lowlevel

__all__ = ["ROUND_BYTES", "ROUND_TURNS", "TURN_BUDGET", "PipeReactor", "PipeReader", "Turn"]

logger = logging.getLogger(__name__)

#: Bytes one pipe's reader may take in per turn.
TURN_BUDGET = 512 * 1024
#: Bytes, and turns, after which the reactor lets the event loop go round once. 1 MiB: the
#: semaphore before it let 2 MiB in every other round (a sink handed its turn on only after
#: its checkpoint); 2 MiB every round made `supervisor status`'s tail under a hundred chatty
#: children longer (docs/performance.md, the chatty status benchmark).
ROUND_BYTES = 2 * TURN_BUDGET
ROUND_TURNS = 4
# How many ready pipes one epoll_wait reports; more are reported by the next one.
_MAX_EVENTS = 1024
_ARMED = select.EPOLLIN | select.EPOLLONESHOT


class Turn(enum.Enum):
    """What a reader's turn found, which tells the reactor what to do with the pipe next."""

    EMPTY = "the pipe is empty and a writer holds it open: watch it"
    MORE = "the budget is spent with data left: a turn again at the next pass"
    EOF = "no writer (or the pipe is gone): stop watching until watch() is called again"


class PipeReader(Protocol):
    """What the reactor calls when a pipe is readable (``LogSink`` in logs.py)."""

    def read_turn(self, budget: int) -> tuple[Turn, int]:
        """Read and take in up to ``budget`` bytes without blocking: what was found, and bytes read."""
        ...


class PipeReactor:
    """Reads every watched pipe from one task, ``run()``, hosted by the manager.

    ``watch`` and ``unwatch`` are synchronous and may be called whether ``run()`` runs
    yet or not: a pipe watched before it starts is read once it does. Used from the
    event loop's thread only, as everything in the core.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, PipeReader] = {}
        #: Turns taken, and passes over epoll's answer: tests and benchmarks see the loop idle.
        self.turns = 0
        self.passes = 0

    def __len__(self) -> int:
        return len(self._readers)

    def watch(self, fd: int, reader: PipeReader) -> None:
        """Read ``fd`` with ``reader`` whenever it is readable (again, after an EOF)."""
        if self._epoll.closed:
            return
        known = self._readers.get(fd)
        if known is reader:
            return
        if known is not None:  # the fd number was closed and reused without unwatch: take it over
            self.unwatch(fd)
        self._epoll.register(fd, _ARMED)
        self._readers[fd] = reader

    def unwatch(self, fd: int) -> None:
        """Stop reading ``fd``; call it before the fd is closed. Unknown fds are ignored."""
        if self._readers.pop(fd, None) is None or self._epoll.closed:
            return
        with contextlib.suppress(OSError):  # closed already (the kernel dropped it then) or not there
            self._epoll.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._readers

    def close(self) -> None:
        """Let go of the epoll descriptor; the pipes are their owners' to close."""
        self._readers.clear()
        self._epoll.close()

    async def run(self) -> None:
        """Wait for pipes to be readable and give each its turn, until cancelled."""
        epoll = self._epoll
        read = 0
        turns = 0
        reader: PipeReader | None = None
        while True:
            ready = epoll.poll(0, _MAX_EVENTS)
            if not ready:
                read = turns = 0
                # Not the last pipe's reader held while idle: it and its instance are garbage
                # once removed, which the collection before a change's freeze must find.
                reader = None
                await anyio.wait_readable(epoll.fileno())
                continue
            self.passes += 1
            for fd, _events in ready:
                reader = self._readers.get(fd)
                if reader is None:  # unwatched since epoll reported it
                    continue
                outcome, taken = self._turn(fd, reader)
                if self._readers.get(fd) is reader:  # else it was unwatched (or taken over) meanwhile
                    if outcome is Turn.EOF:
                        self.unwatch(fd)
                    else:
                        self._arm(fd)
                read += taken
                turns += 1
                if read >= ROUND_BYTES or turns >= ROUND_TURNS:
                    read = turns = 0
                    await anyio.lowlevel.checkpoint()  # the rest of the round belongs to others

    def _arm(self, fd: int) -> None:
        try:
            self._epoll.modify(fd, _ARMED)
        except OSError as exc:  # closed by its owner during the turn: nothing left to read
            logger.warning("log pipe %d: gone while watched: %s", fd, exc)
            self.unwatch(fd)

    def _turn(self, fd: int, reader: PipeReader) -> tuple[Turn, int]:
        self.turns += 1
        try:
            return reader.read_turn(TURN_BUDGET)
        except Exception:  # a fault of one reader must not stop every other pipe's
            logger.exception("log pipe %d: reading failed; it is no longer read", fd)
            return Turn.EOF, 0
