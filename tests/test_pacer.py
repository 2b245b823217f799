"""The pacer: work that can wait, done in order, a slice at a time, with the loop's turns between;
and the turns every spawn passes, a slice of a turn each."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from supervisor.events import State
from supervisor.pacer import Pacer, Turns

from .helpers import manifest_from, running, wait_for_output

pytestmark = pytest.mark.anyio


async def _tick(order: list[str], done: anyio.Event) -> None:
    """A task that only yields: a "t" in ``order`` at each of its turns, until ``done``."""
    while not done.is_set():
        order.append("t")
        await anyio.lowlevel.checkpoint()


def _longest_run(order: list[str]) -> int:
    """The most entries of work in ``order`` with no turn of the ticker between them."""
    longest = run = 0
    for entry in order:
        run = run + 1 if entry != "t" else 0
        longest = max(longest, run)
    return longest


def _busy(seconds: float) -> None:
    """CPU work of ``seconds``, as a mkdir in cgroupfs or a file's creation holds the loop."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


async def test_the_work_is_done_in_order_and_other_tasks_get_turns_between_slices() -> None:
    """Forty items of 1 ms each: done in the order they came, at most a 2 ms slice (three items)
    at a time, and a task that only yields gets its turns in between: without the pacing it
    would get one before and one after the forty, as the burst of a graph's waiting instances
    held the first level's READY=1 for 90 to 180 ms (bench/graph.py). Trio runs the tasks of
    one turn in a random order: two slices may come together, never three."""
    pacer = Pacer(slice_seconds=0.002)
    order: list[str] = []
    done = anyio.Event()

    def item(n: int) -> None:
        _busy(0.001)
        order.append(f"w{n}")
        if n == 39:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pacer.run)
        for n in range(40):
            pacer.add(lambda n=n: item(n))
        tg.start_soon(_tick, order, done)
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    work = [entry for entry in order if entry != "t"]
    assert work == [f"w{n}" for n in range(40)]
    assert _longest_run(order) <= 2 * 3, order
    first, last = order.index("w0"), order.index("w39")
    assert order[first:last].count("t") >= 40 // (2 * 3), order


async def test_work_added_later_is_done_and_one_item_always_runs() -> None:
    """A slice shorter than one item still does that item; the task sleeps while there is
    nothing, and work added then wakes it."""
    pacer = Pacer(slice_seconds=0.0)
    seen: list[int] = []
    first, second = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(pacer.run)
        pacer.add(lambda: seen.append(1))
        pacer.add(lambda: (seen.append(2), first.set()))
        with anyio.fail_after(5):
            await first.wait()
        assert seen == [1, 2] and len(pacer) == 0  # and the pacer waits for work again
        pacer.add(lambda: (seen.append(3), second.set()))
        with anyio.fail_after(5):
            await second.wait()
        tg.cancel_scope.cancel()
    assert seen == [1, 2, 3]


async def test_a_waiting_instance_has_its_log_files_made_while_it_waits(tmp_path: Path) -> None:
    """Its spawn then opens files that are there: a creation is a change to the folder that the
    filesystem records (85 to 450 µs on the benchmarks' ext4), and a graph's level spawns one
    instance after another. A log folder that cannot be made leaves the instance waiting; its
    spawn says why, once the dependency is up."""
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          db: {{command: [sleep, "60"], autostart: false, restart: {{min_uptime: 0}}}}
          api:
            command: [sh, -c, "echo api-out; exec sleep 60"]
            depends_on: [db]
            restart: {{min_uptime: 0}}
          blocked:
            command: [sleep, "60"]
            depends_on: [db]
            logs: {{stdout_file: "{tmp_path}/a-file/blocked.log"}}
            restart: {{min_uptime: 0, max_restarts: 0}}
        """,
        tmp_path,
    )
    (tmp_path / "a-file").write_text("not a folder\n")
    async with running(manifest) as (manager, events):
        api = manager.instances["api"]
        assert api.state is State.WAITING
        files = {stream: Path(path) for stream, path in api.status().log_files.items()}
        assert sorted(files) == ["stderr", "stdout"]
        done = anyio.Event()  # the pacer does its work in order: once this is done, so is api's
        assert manager._pacer is not None
        manager._pacer.add(done.set)
        with anyio.fail_after(10):
            await done.wait()
        assert all(path.is_file() for path in files.values()), files
        assert [path.stat().st_size for path in files.values()] == [0, 0]
        assert api.state is State.WAITING
        assert manager.instances["blocked"].state is State.WAITING
        await manager.instances["db"].start()
        await events.wait_for(lambda e: e.instance == "api" and e.to_state is State.RUNNING, timeout=15)
        await wait_for_output(api, b"api-out")  # the sink writes the file before it tells followers
        assert files["stdout"].read_text() == "api-out\n"
        failed = await events.wait_for(
            lambda e: e.instance == "blocked" and e.to_state is State.BACKOFF, timeout=15
        )
        assert "a-file" in (failed.reason or ""), failed


# -- Turns: what every spawn passes -------------------------------------------------------------


async def test_turns_let_a_slice_of_work_through_then_the_loop_goes_round(anyio_backend_name: str) -> None:
    """Thirty tasks that each hold the loop 1 ms once through (as a spawn does), asked at once
    behind a 2.5 ms slice: three or so at a time, a task that only yields gets turns in
    between, and (where the loop runs tasks in the order they came: asyncio) they pass in that
    order. Without the gate all thirty pass in one turn, as a thousand spawns did."""
    turns = Turns(0.0025, burst=0)
    order: list[str] = []
    done = anyio.Event()

    async def spawner(n: int) -> None:
        await turns.wait()
        _busy(0.001)
        order.append(f"s{n}")
        if len(order) - order.count("t") == 30:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(turns.run)
        tg.start_soon(_tick, order, done)
        for n in range(30):
            tg.start_soon(spawner, n)
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    passes = [entry for entry in order if entry != "t"]
    assert sorted(passes) == sorted(f"s{n}" for n in range(30))
    if anyio_backend_name == "asyncio":
        assert passes == [f"s{n}" for n in range(30)]
    # A slice is three or four such tasks. Trio runs a turn's tasks in a random order, so the
    # ticker's one run in a turn may come before or after its slices, and run() may end a slice
    # in the middle of a turn: up to three slices may come with no tick between (once in a
    # whole suite beside a CPU hog, nine passes did). Without the gate: thirty.
    assert _longest_run(order) <= 3 * 4, order
    assert order[order.index(passes[0]) : order.index(passes[-1])].count("t") >= 30 // (3 * 4), order


@pytest.mark.parametrize("victim", ["b", "c", "d"])
async def test_a_task_cancelled_in_line_holds_no_one_up(victim: str) -> None:
    """The slice is spent; b, c and d (asked in that order) wait in line. Whichever is cancelled
    (its instance stopped before it spawned), the others pass, in later turns, in their order."""
    turns = Turns(0.001, burst=0)
    passed: list[str] = []
    scopes = {name: anyio.CancelScope() for name in "bcd"}

    async def task(name: str) -> None:
        with scopes[name]:
            await turns.wait()
            passed.append(name)
            _busy(0.002)  # each spends a slice: the next one passes a turn later

    async with anyio.create_task_group() as tg:
        await turns.wait()
        _busy(0.002)  # the slice of this turn is spent
        for name in "bcd":
            tg.start_soon(task, name)
        tg.start_soon(turns.run)
        await anyio.lowlevel.checkpoint()  # (asyncio) each has asked, and waits in line
        assert not passed
        scopes[victim].cancel()
        with anyio.fail_after(5):
            while len(passed) < 2:
                await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert sorted(passed) == sorted(set("bcd") - {victim})
    assert not turns._line and not turns._again  # nothing left behind


async def test_tasks_that_come_in_later_turns_pass_at_once() -> None:
    """A spawn a turn after the last one (a restart after a crash) passes without waiting for
    the loop to go round again: each turn's slice ends with the turn."""
    turns = Turns(0.002, burst=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(turns.run)
        for _ in range(5):
            await turns.wait()
            _busy(0.003)  # more than a slice
            with anyio.fail_after(5):
                while turns._began is not None:  # the turn ends: run() ends its slice
                    await anyio.lowlevel.checkpoint()
            with anyio.fail_after(0):  # it would time out at its first checkpoint: it passes at once
                await turns.wait()
            _busy(0.003)
        tg.cancel_scope.cancel()


async def test_a_burst_after_an_idle_gate_passes_whole_and_what_follows_is_sliced() -> None:
    """A level of a graph: spawns of 1 ms each, behind a 2 ms slice and a burst of 16. Of 36
    asked at once, the first 16 pass in one turn (sliced, a level spread over ten turns and the
    loop's other work), the other 20 a slice at a time. Once the gate is idle again, the next
    ten pass whole."""
    turns = Turns(0.002, burst=16)
    order: list[str] = []
    done = anyio.Event()
    passed = 0

    async def spawner(name: str) -> None:
        nonlocal passed
        await turns.wait()
        _busy(0.001)
        order.append(name)
        passed += 1
        if passed == 46:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(turns.run)
        tg.start_soon(_tick, order, done)
        for n in range(36):
            tg.start_soon(spawner, f"a{n}")
        with anyio.fail_after(10):
            while passed < 36 or turns._free != 16:  # all through, and run() has seen the gate idle
                await anyio.lowlevel.checkpoint()
        for n in range(10):
            tg.start_soon(spawner, f"c{n}")
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    passes = [at for at, entry in enumerate(order) if entry != "t"]
    ticks = [at for at, entry in enumerate(order) if entry == "t"]

    def turns_between(first: int, last: int) -> int:  # the ticker's turns between two passes
        return sum(1 for at in ticks if passes[first] < at < passes[last])

    # The burst in one turn (trio runs a turn's tasks in a random order: the ticker's one turn
    # may fall among them); the rest a slice (two or three) per turn; the next burst in one turn.
    assert turns_between(0, 15) <= 1, order
    assert turns_between(15, 35) >= 20 // (2 * 3), order
    assert turns_between(36, 45) <= 1, order
