"""The pacer: work that can wait, done in order, a slice at a time, with the loop's turns between."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from supervisor.events import State
from supervisor.pacer import Pacer

from .helpers import manifest_from, running, wait_for_output

pytestmark = pytest.mark.anyio


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

    async def ticker() -> None:
        while not done.is_set():
            order.append("t")
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pacer.run)
        for n in range(40):
            pacer.add(lambda n=n: item(n))
        tg.start_soon(ticker)
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    work = [entry for entry in order if entry != "t"]
    assert work == [f"w{n}" for n in range(40)]
    longest = 0
    run = 0
    for entry in order:
        run = run + 1 if entry != "t" else 0
        longest = max(longest, run)
    assert longest <= 2 * 3, order
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
