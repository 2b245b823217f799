"""Where an instance's requests meet its one task: the request lock and the start announcement.

Both exist for a moment per request, not for the instance's whole life: a thousand
idle instances would otherwise hold a thousand ``anyio.Lock``s and as many set Events
(about 1 KB each: an asyncio Event or Lock keeps a deque; docs/performance.md).
"""

from __future__ import annotations

from types import TracebackType

import anyio


class RequestLock:
    """Serialises an instance's requests (``async with``), first come first served.

    The ``anyio.Lock`` behind it is made by the first request that finds none and
    dropped by the last one out: with no holder and no waiter, a fresh lock is the
    same as the old one.
    """

    __slots__ = ("_lock", "_users")

    def __init__(self) -> None:
        self._lock: anyio.Lock | None = None
        self._users = 0

    async def __aenter__(self) -> None:
        if self._lock is None:
            self._lock = anyio.Lock()
        lock = self._lock
        self._users += 1
        try:
            await lock.acquire()
        except BaseException:  # cancelled while waiting: not a user any more
            self._leave()
            raise

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._lock is not None
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._lock = None


class Announcement:
    """The ``task_status`` of a supervise loop ``start()`` handed to ``run()``.

    The loop calls ``started()`` once the first spawn was tried (or it waits for its
    dependencies); ``start()`` waits for that. The Event is made only if it must
    wait, and let go of once set: the loop keeps its ``task_status`` for the run.
    """

    __slots__ = ("_done", "_event")

    def __init__(self) -> None:
        self._done = False
        self._event: anyio.Event | None = None

    def started(self, value: None = None) -> None:
        self._done = True
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self) -> None:
        if not self._done:
            event = self._event = anyio.Event()
            await event.wait()
