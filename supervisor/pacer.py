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

    A turn's slice begins when the first task passes. A task that comes once it is spent
    waits in line; ``run`` ends each turn that let tasks through once the loop has gone
    round (its sockets looked at), and wakes the next in line, a few more than the last turn
    let through: they run back to back, each passing while the new slice lasts, the rest
    back at the head of the line. What a task does after it passed, until it next awaits, is
    what the slice pays for: the gate measures the turn's time, not the task's.

    The first ``burst`` tasks after the gate was idle pass whatever their time: a small burst
    (a level of a dependency graph: ten spawns, 25 ms) goes in one turn, where slicing it
    spread it over ten turns, each with the loop's other work, and made every level of the
    graph 9 ms longer. What comes beyond it, or before the line is empty again, is sliced.
    ``slice_seconds`` None: no gate.
    """

    def __init__(self, slice_seconds: float | None, burst: int = 16) -> None:
        self._slice = slice_seconds
        self._burst = self._free = burst  # passes left before the slice counts
        self._began: float | None = None  # when this turn's slice began
        self._passed = 0  # how many this turn let through
        self._line: deque[anyio.Event] = deque()
        self._again: list[anyio.Event] = []  # woken, but the slice was spent: the line's new head
        self._turned = anyio.Event()  # a turn let tasks through, or some wait: run() looks a turn later

    async def run(self) -> None:
        """Ends the turns and wakes the line, until cancelled (the gate is then of no use)."""
        while True:
            await self._turned.wait()  # set in an earlier turn: this is a later one
            self._turned = anyio.Event()
            self._began = None
            wake, self._passed = max(16, 2 * self._passed), 0
            self._line.extendleft(reversed(self._again))
            self._again.clear()
            if not self._line:  # idle again: the next burst passes whole
                self._free = self._burst
            for _ in range(min(wake, len(self._line))):
                self._line.popleft().set()
            if self._line:
                self._turned.set()  # the next turn wakes more, whether anyone passes or not

    async def wait(self) -> None:
        """Return when the current turn may go on: at once, or in a later turn."""
        if self._slice is None:
            return
        woken = False
        while True:
            if woken or not self._line:
                now = time.monotonic()
                if self._began is None:
                    self._began = now
                    self._turned.set()
                if self._free or now - self._began < self._slice:
                    self._free = max(0, self._free - 1)
                    self._passed += 1
                    return
            mine = anyio.Event()
            if woken:
                self._again.append(mine)
            else:
                self._line.append(mine)
                self._turned.set()
            try:
                await mine.wait()
            except BaseException:  # cancelled (its instance stopped): out of the line
                if not mine.is_set():
                    (self._again.remove if mine in self._again else self._line.remove)(mine)
                raise
            woken = True
