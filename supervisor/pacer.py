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
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import anyio

__all__ = ["SLICE", "Pacer"]

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
