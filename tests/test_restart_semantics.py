"""Restart semantics, read from the transitions' timestamps.

Only failed starts (a run that ended before it was ``running``) grow the back-off and
count towards ``max_restarts``, in a row; a run that came up ends the streak and is
started again at once, as supervisord and pm2 do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.events import State, Transition

from .helpers import Recorder, manifest_from, running

pytestmark = pytest.mark.anyio


def _pauses(history: list[Transition]) -> list[float]:
    """Seconds from each BACKOFF to the STARTING after it."""
    return [
        after.at - before.at
        for before, after in itertools.pairwise(history)
        if before.to_state is State.BACKOFF and after.to_state is State.STARTING
    ]


def _restarted(events: Recorder, name: str, times: int) -> Callable[[], bool]:
    """A condition: ``name`` was started again ``times`` times, or it failed."""

    def done() -> bool:
        history = events.of(name)
        return len(_pauses(history)) >= times or any(e.to_state is State.FAILED for e in history)

    return done


async def test_a_run_that_came_up_is_restarted_at_once_however_often(tmp_path: Path) -> None:
    # Up 500 ms past a min_uptime of 50 ms, then it dies: more often than max_restarts
    # allows, and with a back-off that would pause 10 s if these counted as failures.
    manifest = manifest_from(
        """
        version: 1
        instances:
          flappy:
            command: ["sh", "-c", "sleep 0.5; exit 1"]
            restart: {min_uptime: 50ms, max_restarts: 1, backoff: {initial: 10s}}
        """,
        tmp_path,
    )
    async with running(manifest) as (_manager, events):
        await events.until(_restarted(events, "flappy", 4), timeout=30)
        history = events.of("flappy")
        assert State.FAILED not in [e.to_state for e in history]
        pauses = _pauses(history)
        assert len(pauses) >= 4
        assert max(pauses) < 1.0, pauses  # no back-off: the 10 s pause never happened
        ends = [e for e in history if e.to_state is State.BACKOFF]
        assert all(e.from_state is State.RUNNING for e in ends)
        assert all(e.reason == "exit code 1" for e in ends)


async def test_a_run_that_came_up_ends_the_streak_of_failed_starts(tmp_path: Path) -> None:
    # Runs 1-2 fail at once, run 3 comes up and then dies, runs 4-5 fail at once, run 6
    # stays up: four failed starts in all, never more than two in a row (max_restarts: 2).
    # min_uptime 500 ms: run 3 is up past it by 500 ms (as by 1 s past 1 s before), the failed
    # starts end ten times sooner than it, and run 6 is running half a second after its spawn.
    # The back-off's pauses stay as they were: their upper bounds are what a loaded machine needs.
    counter = tmp_path / "runs"
    script = (
        f'n=$(($(cat {counter} 2>/dev/null || echo 0) + 1)); echo $n > {counter}; '
        'case $n in 3) sleep 1.0; exit 1;; 6) exec sleep 300;; *) exit 1;; esac'
    )
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          streaky:
            command: ["sh", "-c", {script!r}]
            restart: {{min_uptime: 500ms, max_restarts: 2, backoff: {{initial: 500ms, factor: 2, max: 10s}}}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        streaky = manager.instances["streaky"]

        def settled() -> bool:
            six_up = streaky.state is State.RUNNING and counter.read_text().strip() == "6"
            return six_up or streaky.state is State.FAILED

        await events.until(settled, timeout=30)
        history = events.of("streaky")
        assert State.FAILED not in [e.to_state for e in history], history[-1].reason
        assert manager.instances["streaky"].state is State.RUNNING
        pauses = _pauses(history)
        assert len(pauses) == 5, pauses
        first, second, after_up, first_again, second_again = pauses
        # Lower bounds are exact (a pause never ends early); upper bounds leave room for a
        # loaded machine, and still fail where the streak went on (2 s, then 4 s).
        assert 0.5 <= first < 1.0 and 1.0 <= second < 2.0, pauses  # the back-off grows
        assert after_up < 0.5, pauses  # the run that came up: at once
        assert 0.5 <= first_again < 1.0, pauses  # and the streak started over
        assert 1.0 <= second_again < 2.0, pauses
        assert manager.instances["streaky"].status().restarts == 5


async def test_failed_starts_in_a_row_past_max_restarts_give_up(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          broken:
            command: ["sh", "-c", "exit 4"]
            restart: {min_uptime: 1s, max_restarts: 3, backoff: {initial: 10ms, factor: 1}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        failed = await events.wait_for(
            lambda e: e.instance == "broken" and e.to_state is State.FAILED, timeout=20
        )
        starts = [e for e in events.of("broken") if e.to_state is State.STARTING]
        assert len(starts) == 4  # the first start and max_restarts retries
        assert failed.reason is not None
        assert failed.reason.startswith("gave up after 4 failed starts in a row; last: exit code 4")
        assert manager.instances["broken"].status().restarts == 3


async def test_max_restarts_zero_gives_up_at_the_first_failed_start(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          once:
            command: ["sh", "-c", "exit 4"]
            restart: {min_uptime: 1s, max_restarts: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (_manager, events):
        await events.wait_for(lambda e: e.instance == "once" and e.to_state is State.FAILED, timeout=20)
        assert [e.to_state for e in events.of("once")] == [State.STARTING, State.BACKOFF, State.FAILED]


async def test_restart_delay_paces_a_run_that_came_up(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          paced:
            command: ["sh", "-c", "sleep 0.3; exit 1"]
            restart: {min_uptime: 10ms, delay: 400ms, backoff: {initial: 10ms}}
        """,
        tmp_path,
    )
    async with running(manifest) as (_manager, events):
        await events.until(_restarted(events, "paced", 2), timeout=20)
        pauses = _pauses(events.of("paced"))
        assert len(pauses) >= 2 and min(pauses) >= 0.4, pauses


async def test_runs_that_end_at_once_are_restarted_at_a_bounded_pace(tmp_path: Path) -> None:
    """``true`` under ``restart: always`` and ``min_uptime: 0``: every run is up, none a failed
    start, so each was restarted at once, 250 times a second for ever, the service's CPU and
    log all its. A second's worth (RESTARTS_PER_SECOND) goes at once, then that many a second:
    it still never fails, and a restart after a run that lasted is not held up by it."""
    from supervisor.instance import RESTARTS_PER_SECOND as rate

    manifest = manifest_from(
        """
        version: 1
        instances:
          spin:
            command: ["true"]
            restart: {policy: always, min_uptime: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (_manager, events):
        await events.until(_restarted(events, "spin", 3 * rate), timeout=60)
        history = events.of("spin")
        assert State.FAILED not in [e.to_state for e in history]
        starts = [e.at for e in history if e.to_state is State.STARTING]
        # The burst, then one every 1/rate s: 3 * rate restarts take at least 2 s (at once: 0.2 s).
        assert starts[3 * rate] - starts[0] >= 2 * 0.9, starts[3 * rate] - starts[0]
        assert max(_pauses(history)) < 2 / rate, max(_pauses(history))  # evenly, not in lumps
