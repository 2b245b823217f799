"""Resource figures from /proc: the sampler on real process groups, then in a real service's status."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from supervisor.api.sampling import Sampler
from supervisor.resources import ResourceSampler

from .service_fixture import ServiceProcess, wait_until

Start = Callable[..., ServiceProcess]
MiB = 1024 * 1024


@contextmanager
def group(script: str) -> Iterator[subprocess.Popen[bytes]]:
    """``sh -c SCRIPT`` in a session of its own (as the service starts instances); killed at the end."""
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True, stdout=subprocess.PIPE)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_figures_sum_the_whole_group(tmp_path: Path) -> None:
    # A command name with ")", "(" and spaces: /proc/PID/stat must be split after the last ")".
    odd = tmp_path / "x) 1 2 (y"
    shutil.copy("/bin/sleep", odd)
    code = "b = bytearray(48 * 2**20); print('ready', flush=True); import signal; signal.pause()"
    hog = f'{sys.executable} -c "{code}"'
    with group(f"'{odd}' 300 & {hog} & wait") as proc:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        sampler = ResourceSampler(max_age=60)
        figures = sampler.figures([proc.pid])[proc.pid]
        assert figures.processes == 3  # sh, the oddly named sleep, python
        assert figures.threads >= 3
        assert figures.rss_bytes >= 48 * MiB
        assert figures.open_fds >= 6
        assert figures.cpu_seconds >= 0 and figures.cpu_percent >= 0
        # Asked again within max_age: the same scan answers.
        assert sampler.figures([proc.pid])[proc.pid] is figures and sampler.scans == 1
        # A group with no process left is left out, not zero.
        assert sampler.cached([proc.pid, 1 << 22]) is None  # not in the last scan: no cached answer
        assert set(sampler.figures([proc.pid, 1 << 22])) == {proc.pid}
        assert sampler.scans == 2


def test_cpu_percent_is_over_the_last_interval() -> None:
    with group("sleep 300 & while :; do :; done") as busy, group("sleep 300") as idle:
        sampler = ResourceSampler(max_age=0)
        first = sampler.figures([busy.pid, idle.pid])
        # Until the busy group has used a quarter of a second more CPU (bounded, no sleep),
        # looked at by another sampler: this one's next reading is over the whole wait.
        look = ResourceSampler(max_age=0)
        wait_until(
            lambda: look.figures([busy.pid])[busy.pid].cpu_seconds >= first[busy.pid].cpu_seconds + 0.25,
            idle,
            timeout=20,
            what="a quarter second of CPU",
        )
        later = sampler.figures([busy.pid, idle.pid])
        assert later[busy.pid].cpu_percent > 20, later[busy.pid]
        assert later[idle.pid].cpu_percent < 5, later[idle.pid]
        assert later[busy.pid].processes == 2


def test_asking_for_no_group_reads_nothing() -> None:
    sampler = ResourceSampler(max_age=0)
    assert sampler.figures([]) == {} and sampler.scans == 0


def test_status_has_the_figures(service: Start) -> None:
    svc = service(
        """
        version: 1
        instances:
          pair:
            command: ["sh", "-c", "sleep 300 & sleep 300 & wait"]
            restart: {min_uptime: 0}
          idle:
            command: ["sleep", "300"]
            autostart: false
        """
    )
    svc.wait_for(["pair"], "running")
    svc.wait_until(lambda: svc.status("pair")["pair"]["processes"] == 3, 10, "three processes in the group")
    pair = svc.status("pair")["pair"]
    assert pair["rss_bytes"] > 0 and pair["threads"] >= 3 and pair["open_fds"] >= 3
    assert 0 <= pair["cpu_percent"] < 100 and pair["cpu_seconds"] >= 0
    one = svc.client().status(["pair"])[0]
    assert one["processes"] == 3
    idle = svc.status("idle")["idle"]
    for key in ("cpu_percent", "cpu_seconds", "rss_bytes", "open_fds", "threads", "processes"):
        assert idle[key] is None, key


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_an_old_reading_answers_while_a_new_one_is_taken(anyio_backend: str) -> None:
    with group("sleep 300") as proc:
        async with anyio.create_task_group() as tg:
            sampler = Sampler(tg, max_age=0.0, stale=60)
            first = await sampler.figures([proc.pid])  # no reading yet: this one waits for it
            assert sampler.sampler.scans == 1 and first[proc.pid].processes >= 1
            assert sampler.after_response() is None
            again = await sampler.figures([proc.pid])  # expired, not stale: no wait, the old one
            assert again[proc.pid] is first[proc.pid] and sampler.sampler.scans == 1
            later = sampler.after_response()
            assert later is not None
            await later()  # the answer is out: the new reading starts, in the task group
            with anyio.fail_after(10):
                while sampler._refreshing:  # until it is done: it holds the lock while it reads
                    async with sampler._lock:
                        pass
            assert sampler.sampler.scans == 2
            assert sampler.sampler.cached([proc.pid]) is None  # (max_age 0)
            newer = await sampler.figures([proc.pid])
            assert newer[proc.pid] is not first[proc.pid] and sampler.sampler.scans == 2
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_group_started_since_the_last_reading_is_read_by_its_leader(anyio_backend: str) -> None:
    """During a spawn storm every status names groups the last reading did not cover: they are
    read on the spot (the leader alone, no scan of /proc), and the next whole reading counts the
    rest of each group."""
    with group("sleep 300") as old, group("sleep 301 & sleep 302 & echo up; wait") as new:
        assert new.stdout is not None and new.stdout.readline() == b"up\n"  # its two children run
        async with anyio.create_task_group() as tg:
            # A reading younger than max_age: the new group's leader is read, no new reading asked.
            young = Sampler(tg, max_age=60, stale=60)
            first = await young.figures([old.pid])
            both = await young.figures([old.pid, new.pid])
            assert young.sampler.scans == 1 and young.after_response() is None
            assert both[new.pid].processes == 1 and both[new.pid].rss_bytes > 0  # its leader, sh
            assert both[old.pid] is first[old.pid]  # from the reading
            # An older one: the same, and a whole reading once the answer is out.
            sampler = Sampler(tg, max_age=0.0, stale=60)
            await sampler.figures([old.pid])
            both = await sampler.figures([old.pid, new.pid])
            assert sampler.sampler.scans == 1 and both[new.pid].processes == 1
            later = sampler.after_response()
            assert later is not None
            await later()
            with anyio.fail_after(10):
                while sampler._refreshing:
                    async with sampler._lock:
                        pass
            assert sampler.sampler.scans == 2
            whole = await sampler.figures([old.pid, new.pid])
            assert whole[new.pid].processes == 3  # sh and both sleeps, from the whole reading
            tg.cancel_scope.cancel()
