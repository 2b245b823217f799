"""Shared test helpers: a manager running in a task group, and event collection."""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from supervisor.config import Manifest, parse_manifest
from supervisor.events import Dropped, Transition, Update
from supervisor.instance import Instance
from supervisor.manager import Manager


def manifest_from(text: str, folder: Path) -> Manifest:
    path = folder / "supervisor.yaml"
    path.write_text(textwrap.dedent(text))
    return parse_manifest(path.read_text(), path)


class Recorder:
    """Every transition the bus publishes, kept in order, with a way to wait for one."""

    def __init__(self) -> None:
        self.events: list[Transition] = []
        self.updates: list[Update] = []
        self._changed = anyio.Event()

    async def collect(self, manager: Manager, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with manager.events.subscribe(buffer=100_000) as events:
            task_status.started()
            async for event in events:
                assert not isinstance(event, Dropped), f"events were dropped: {event}"
                if isinstance(event, Update):
                    self.updates.append(event)
                else:
                    self.events.append(event)
                changed, self._changed = self._changed, anyio.Event()
                changed.set()

    async def until(self, condition: object, timeout: float = 10) -> None:
        """Wait, event by event, until ``condition()`` holds."""
        assert callable(condition)
        with anyio.fail_after(timeout):
            while not condition():
                await self._changed.wait()

    def of(self, name: str) -> list[Transition]:
        return [e for e in self.events if e.instance == name]

    async def wait_for(self, predicate: object, timeout: float = 10) -> Transition:
        """The first event (past or future) for which ``predicate(event)`` is true."""
        assert callable(predicate)
        with anyio.fail_after(timeout):
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                await self._changed.wait()


@asynccontextmanager
async def running(manifest: Manifest) -> AsyncIterator[tuple[Manager, Recorder]]:
    """A manager running ``manifest``, shut down (gracefully) when the block ends."""
    manager = Manager(manifest)
    recorder = Recorder()
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.collect, manager)
        await tg.start(manager.run)
        try:
            yield manager, recorder
        finally:
            with anyio.CancelScope(shield=True):
                await manager.shutdown()
            tg.cancel_scope.cancel()


async def wait_for_output(instance: Instance, needle: bytes, timeout: float = 10) -> None:
    """Wait until the instance's stdout log shows ``needle`` (a readiness line the test's program prints)."""
    sink = instance.sinks["stdout"]
    with anyio.fail_after(timeout):
        async with sink.follow() as chunks:
            if any(needle in line for line in sink.tail(1000)):
                return
            async for chunk in chunks:
                if needle in chunk:
                    return


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone between the open and the read
        return False


async def wait_gone(pid: int, timeout: float = 10) -> None:
    """Wait for a process that is not our child to end, through a pidfd (no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with anyio.fail_after(timeout):
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)


def under_open_files_limit(limit: int, argv: list[str]) -> list[str] | None:
    """``argv`` under a hard open-files limit of ``limit`` that it may not raise; None without util-linux.

    As root, CAP_SYS_RESOURCE is dropped from the bounding set first: with it, the service
    may raise its hard limit to fs.nr_open, and the load-time check counts with that.
    """
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        return None
    prefix = [prlimit, f"--nofile={limit}:{limit}", "--"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            return None
        prefix = [setpriv, "--bounding-set=-sys_resource", "--", *prefix]
    return [*prefix, *argv]


def handoff_record(*, version: int | None = None, **service: object) -> dict[str, object]:
    """A state record of the shape a re-exec'd service reads (handoff/shape.py): a service with
    one socket and one running instance; ``service`` replaces fields of its service section."""
    from supervisor.handoff.state import FORMAT, VERSION

    body: dict[str, object] = {
        "pid": 100,
        "service_pid": 100,
        "manifest": {"version": 1, "instances": {"a": {"command": ["sleep", "1000"]}}},
        "source": None,
        "listeners": {
            "path": "/run/x.sock",
            "inode": [1, 2],
            "token": None,
            "sockets": [{"fd": 3, "name": "unix"}],
        },
        "guardian": None,
        "nofile": None,
        "handoffs": 1,
        "events_seq": 0,
        "scaled": [],
        "written_at": 10.0,
        **service,
    }
    instance = {
        "name": "a",
        "group": "a",
        "state": "running",
        "reason": None,
        "counters": {"restarts": 0, "failures": 0},
        "last_exit": {"pid": 101, "code": 3, "signal": None, "at": 1.7e9},
        "child": {
            "pid": 102,
            "pgid": 102,
            "pidfd": 4,
            "argv": ["sleep", "1000"],
            "started_at": 1.7e9,
            "kill_group_on_exit": True,
            "start_ticks": 5,
        },
        "next_try": None,
        "kill_at": None,
        "trouble": None,
        "targets": {"stdin": "null", "stdout": "log", "stderr": "log"},
        "pipes": {"stdout": 5, "stderr": 6},
        "sinks": {"stdout": {"at_line_start": True}, "stderr": {"at_line_start": True}},
        "health": {
            "ready": None,
            "last_check": None,
            "status_text": None,
            "main_pid": None,
            "notified": False,
            "armed": False,
            "notify": None,
        },
        "cgroup": False,
    }
    version = VERSION if version is None else version
    return {"format": FORMAT, "version": version, "service": body, "instances": [instance]}
