"""Work that can wait, done a slice at a time between the event loop's other business.

The service keeps one thread, so every millisecond of work done in the event loop is a
millisecond in which no socket is read: no status answered, no ``READY=1`` taken. Most
work must be done when it is asked for. Some can be done ahead of its need, like the
cgroup and the log files of an instance that waits for its dependencies, which its
spawn would otherwise make between the dependencies' readiness and its start. Done as
each instance begins to wait, that work came in one burst: ninety instances of a graph
began to wait together and held the loop for 90 to 180 ms (a kernel's mkdir and two file
creations each), and the first level's ``READY=1`` waited as long (bench/graph.py).

A ``Pacer`` takes such work and does it in the order it came, a slice of about
``SLICE`` seconds per turn of the event loop, which looks at its sockets between slices.

Other work cannot wait, but must not come all in one turn either: the spawns. A spawn
takes the loop for a millisecond or more, and a thousand instances asked to start at
once (``start --all``, a thousand dependents of one database that became ready, a
thousand restarts) spawned back to back, the socket deaf for seconds. ``Turns`` lets
tasks through a slice of a turn's time each, and those that come later wait for a
later turn.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import anyio

__all__ = ["SLICE", "Pacer", "Turns"]

#: The most work, in seconds, done in one turn of the event loop (one item at least).
SLICE = 0.002


class Pacer:
    """A queue of work (callables that take no argument and must not raise) and the task that does it.

    The work must still make sense whenever it runs: it checks, when it runs, that what it
    was for still waits (an instance may have started, stopped or gone meanwhile).
    """

    def __init__(self, slice_seconds: float = SLICE) -> None:
        self._slice = slice_seconds
        self._queue: deque[Callable[[], None]] = deque()
        self._wake = anyio.Event()

    def add(self, work: Callable[[], None]) -> None:
        self._queue.append(work)
        self._wake.set()

    def __len__(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Do the work as it comes, until cancelled (what is queued then is dropped)."""
        queue = self._queue
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while queue:
                began = time.monotonic()
                queue.popleft()()
                while queue and time.monotonic() - began < self._slice:
                    queue.popleft()()
                await anyio.sleep(0)  # a turn of the loop: its sockets are looked at in between


class Turns:
    """A gate that lets tasks through for ``slice_seconds`` of a turn of the event loop.

    A turn's slice begins when the first task passes; once it is spent, the next task
    takes the loop round (its sockets are looked at) and the slice begins anew. What a
    task does after it passed, until it next awaits, is what the slice pays for: the gate
    measures the turn's time, not the task's. Tasks that come meanwhile wait in line and
    are woken one at a time, each by the one before it as that one passes: a thousand
    waiters cost a thousand wake-ups, not a thousand per turn. ``None``: no gate.
    """

    def __init__(self, slice_seconds: float | None) -> None:
        self._slice = slice_seconds
        self._began: float | None = None  # when this turn's slice began
        self._line: deque[anyio.Event] = deque()
        self._going_round = False

    async def wait(self) -> None:
        """Return when the current turn may go on: at once, or once the loop has gone round."""
        if self._slice is None:
            return
        if self._line or self._going_round:
            mine = anyio.Event()
            self._line.append(mine)
            try:
                await mine.wait()
            except BaseException:  # cancelled (its instance stopped)
                if mine.is_set():
                    self._wake_next()  # its turn had come: the next one's has
                else:
                    self._line.remove(mine)
                raise
        while True:
            now = time.monotonic()
            if self._began is None:
                self._began = now
            if now - self._began < self._slice:
                self._wake_next()  # it looks once this task awaits again (after its spawn)
                return
            self._going_round = True
            try:
                await anyio.sleep(0)  # the loop goes round: its sockets are looked at
            except BaseException:
                self._wake_next()  # the line must not wait for a task that is gone
                raise
            finally:
                self._going_round = False
                self._began = None

    def _wake_next(self) -> None:
        if self._line:
            self._line.popleft().set()
