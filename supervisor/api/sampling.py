"""Resource figures for the API's answers: one shared ``ResourceSampler``, read off the event loop.

A scan of ``/proc`` on a machine with a few thousand processes takes tens of
milliseconds of system calls: it runs in a worker thread so that the loop goes
on serving meanwhile, and under a lock so that requests that come together
share one scan (the sampler answers the later ones from its cache).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import anyio
import anyio.to_thread

from ..resources import GroupFigures, ResourceSampler

__all__ = ["Sampler"]


class Sampler:
    """The API's figures by pgid (an instance's pgid is its pid: each starts its own session)."""

    def __init__(self, max_age: float = 1.0) -> None:
        self.sampler = ResourceSampler(max_age)
        self._lock = anyio.Lock()

    async def figures(self, pgids: Collection[int | None]) -> Mapping[int, GroupFigures]:
        wanted = [pgid for pgid in pgids if pgid is not None]
        if not wanted:
            return {}
        cached = self.sampler.cached(wanted)
        if cached is not None:
            return cached
        async with self._lock:
            return await anyio.to_thread.run_sync(self.sampler.figures, wanted)
