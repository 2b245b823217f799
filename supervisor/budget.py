"""A budget of units that refills at a steady rate up to a burst: how often something may happen.

Two things in the service must not happen as often as a program's behaviour would make them:
a log file's rotations (renames in the event loop) and an instance's restarts (spawns). Each
holds a ``Budget``: what it does takes units, which may leave the budget in debt; it acts again
once the refill has paid that back. Counted in units, not in the loop's time, so that what is
allowed does not depend on how busy the machine was a moment ago.
"""

from __future__ import annotations

import time

__all__ = ["Budget"]


class Budget:
    """``burst`` units at first and at most; ``per_second`` more each second."""

    __slots__ = ("_at", "_burst", "_left", "_rate")

    def __init__(self, burst: float, per_second: float) -> None:
        self._burst = float(burst)
        self._rate = float(per_second)
        self._left = self._burst
        self._at = time.monotonic()

    def left(self) -> float:
        """The units there are now (negative while a debt is being paid back)."""
        now = time.monotonic()
        self._left = min(self._burst, self._left + (now - self._at) * self._rate)
        self._at = now
        return self._left

    def spend(self, units: float) -> None:
        self._left -= units

    def wait_for(self, units: float) -> float:
        """Seconds until ``units`` are there (0: now), and takes them: they are spent when it ends."""
        wait = max(0.0, (units - self.left()) / self._rate)
        self.spend(units)
        return wait
