"""A burst of signals that overflows the event loop's wakeup fd leaves no traceback, and loses no wake-up.

asyncio sets the wakeup fd with Python's default, a warning and a traceback for each byte that
does not fit: a shutdown of 2,000 instances (2,000 SIGCHLDs) put 881 of them in the service's log.
Real signals, sent to this process faster than the loop reads them.
"""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from supervisor.orphans import run_orphan_reaper
from supervisor.signal_wakeup import quiet_when_full, signal_receiver

pytestmark = pytest.mark.anyio

BURST = 5000  # well over what the loop's socket pair holds (about a thousand one-byte writes)


async def test_a_burst_overflowing_the_wakeup_fd_prints_nothing_and_still_wakes_the_loop(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with signal_receiver(signal.SIGUSR1) as signals:
        for _ in range(BURST):  # no await: the loop reads none of them meanwhile
            os.kill(os.getpid(), signal.SIGUSR1)
        with anyio.fail_after(10):
            assert await anext(signals) == signal.SIGUSR1  # the fd is still the loop's
    assert "Exception ignored" not in capfd.readouterr().err


async def test_the_orphan_reaper_takes_a_burst_of_sigchld_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    """What a shutdown of thousands of instances sends (orphans.py registers the receiver)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_orphan_reaper)
        await anyio.wait_all_tasks_blocked()  # the reaper registered, and waits for a SIGCHLD
        for _ in range(BURST):  # each overflow's report is printed at once, in this loop
            os.kill(os.getpid(), signal.SIGCHLD)
        await anyio.wait_all_tasks_blocked()  # it took them
        tg.cancel_scope.cancel()
    assert "Exception ignored" not in capfd.readouterr().err


def test_without_a_loop_the_wakeup_fd_stays_unset() -> None:
    assert signal.set_wakeup_fd(-1) == -1
    quiet_when_full()
    assert signal.set_wakeup_fd(-1) == -1
