"""Crash recovery: the record of running groups, and what the next start does with it.

Real processes throughout: the groups a record names are spawned by the test (in
sessions of their own, as the service spawns instances), recorded with their real
start times and boot id, and then either stopped by ``stop_leftovers`` or, for every
kind of record that must not be trusted, found still alive afterwards. The end-to-end
tests ``kill -9`` a real ``supervisor run`` (and its guardian) and start another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.handoff import leftovers, record
from supervisor.handoff.record import Entry, Record, RecordError, RecordKeeper
from supervisor.manager import Manager

from .helpers import manifest_from, pid_alive, wait_gone
from .service_fixture import SUPERVISOR, ServiceProcess, wait_until, write_manifest

pytestmark = pytest.mark.anyio


def unique_marker() -> str:
    """A sleep duration no other run on this machine uses (other checkouts run the same tests)."""
    return f"1003.{os.getpid()}{random.randrange(10**6):06d}"


def marked(marker: str) -> dict[int, int]:
    """pid -> start time of every live process with ``marker`` among its arguments."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        process = record.identity(int(entry.name))
        if marker.encode() in argv and process is not None and not process.zombie:
            found[process.pid] = process.start
    return found


def same_alive(pid: int, start: int) -> bool:
    """The process that had ``pid`` at tick ``start`` still runs (a reused pid is someone else)."""
    now = record.identity(pid)
    return now is not None and not now.zombie and now.start == start


@pytest.fixture
def groups() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Process groups the test starts; whatever is left of them is killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def start_group(groups: list[subprocess.Popen[bytes]], script: str, marker: str) -> subprocess.Popen[bytes]:
    """``sh -c SCRIPT`` in a session of its own, once it has printed ``up`` (its children forked)."""
    proc = subprocess.Popen(
        ["sh", "-c", script, "sh", marker],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    groups.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    # Forked, but maybe not yet exec'd: a child in the middle of its exec has no command line
    # for a moment, and a look at /proc then would not count it among the marked.
    wait_until(lambda: _children_run_sleep(proc.pid), proc, 10, "the group's children running sleep")
    return proc


def _children_run_sleep(pid: int) -> bool:
    children = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            if int(stat.rpartition(b")")[2].split()[1]) == pid:
                children.append(stat.partition(b"(")[2].rpartition(b")")[0])
    return bool(children) and all(comm == b"sleep" for comm in children)


FORKER = 'sleep "$1" & sleep "$1" & echo up; wait'
STUBBORN = "trap '' TERM; sleep \"$1\" & echo up; wait; wait"


def dead_service() -> tuple[int, int]:
    """(pid, start) of a process that has ended: a crashed service's identity."""
    proc = subprocess.Popen(["sh", "-c", "read line"], stdin=subprocess.PIPE)
    process = record.identity(proc.pid)
    assert process is not None
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)
    return process.pid, process.start


def record_of(
    entries: list[Entry], *, service: tuple[int, int] | None = None, boot: str | None = None
) -> Record:
    pid, start = service or dead_service()
    return Record(
        pid, start, boot or record.boot_id() or "", time.time(), tuple(entries), record.pid_namespace()
    )


def entry_for(pid: int, name: str = "web", *, signal_number: int = 15, timeout: float = 10.0) -> Entry:
    process = record.identity(pid)
    assert process is not None
    return Entry(name, pid, pid, process.start, signal_number, timeout)


def write(folder: Path, rec: Record) -> Path:
    path = folder / record.RECORD_NAME
    record.write_record(path, record.encode(rec))
    return path


# -- the format -------------------------------------------------------------------------------


def test_a_record_reads_back_as_written(tmp_path: Path) -> None:
    rec = Record(
        123, 456, "boot", 1.5, (Entry("web-0", 77, 77, 99, 15, 2.5), Entry("worker", 78, 78, 100, 2, 0.0))
    )
    path = write(tmp_path, rec)
    assert record.read_record(path) == rec
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [record.RECORD_NAME]  # no temporary left behind


GOOD = record.encode(Record(123, 456, "boot", 1.5, (Entry("web", 77, 77, 99, 15, 2.5),))).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "truncated or garbage"),
        (GOOD[: len(GOOD) // 2], "truncated or garbage"),
        ("\0\0\0\0", "truncated or garbage"),
        ("[" * 100_000, "truncated or garbage"),
        ("[]", "not a record"),
        ('{"format": "other"}', "not a record"),
        (GOOD.replace('"version":1', '"version":99'), "version 99 unknown"),
        (GOOD.replace('"written_at":1.5', '"written_at":NaN'), "truncated or garbage"),
        (GOOD.replace('"written_at":1.5', '"written_at":1e999'), "written_at"),
        (GOOD.replace('"pid":123', '"pid":' + "9" * 5000), "truncated or garbage"),
        (GOOD.replace('"pid":123', '"pid":1e3'), '"service" needs'),
        (GOOD.replace('"boot_id":"boot"', '"boot_id":""'), '"service" needs'),
        (GOOD.replace('"groups":[', '"groups":{"a":[').replace("]}", "]}}"), '"groups" a list'),
    ],
)
def test_a_document_that_is_not_a_whole_record_is_refused(text: str, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        record.decode(text.encode(), "instances.json")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ('"pid":77', '"pid":0', "pid, pgid and start"),
        ('"pid":77', '"pid":-5', "pid, pgid and start"),
        ('"pid":77', '"pid":99999999', "pid, pgid and start"),
        ('"pid":77', '"pid":true', "pid, pgid and start"),
        ('"pid":77', '"pid":77.0', "pid, pgid and start"),
        ('"pgid":77', '"pgid":78', "is not its pid"),
        ('"start":99', '"start":-1', "pid, pgid and start"),
        ('"start":99', '"start":' + "9" * 30, "pid, pgid and start"),
        ('"stop_signal":15', '"stop_signal":0', "stop_signal"),
        ('"stop_signal":15', '"stop_signal":1000', "stop_signal"),
        ('"stop_signal":15', '"stop_signal":"TERM"', "stop_signal"),
        ('"stop_timeout":2.5', '"stop_timeout":-1', "stop_timeout"),
        ('"stop_timeout":2.5', '"stop_timeout":1e300', "stop_timeout"),
        ('"stop_timeout":2.5', '"stop_timeout":' + "9" * 400, "stop_timeout"),
        ('"instance":"web"', '"instance":""', "expected a name"),
        ('"instance":"web"', '"instance":"a\\u0000b"', "expected a name"),
        ('"instance":"web"', '"instance":"a\\nb"', "expected a name"),
        ('"instance":"web"', '"instance":["web"]', "expected a name"),
    ],
)
def test_a_bad_entry_is_skipped_and_said_the_others_kept(field: str, value: str, message: str) -> None:
    other = '{"instance":"ok","pid":88,"pgid":88,"start":5,"stop_signal":2,"stop_timeout":1}'
    assert field in GOOD
    text = GOOD.replace(field, value).replace('"groups":[', f'"groups":[{other},')
    rec = record.decode(text.encode(), "instances.json")
    assert [e.instance for e in rec.entries] == ["ok"]
    (problem,) = rec.skipped
    assert problem.startswith("instances.json: groups[1]: ") and message in problem


def test_a_symlink_is_not_followed_and_a_write_replaces_it(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(GOOD)
    path = tmp_path / record.RECORD_NAME
    path.symlink_to(target)
    with pytest.raises(RecordError, match="is a symlink"):
        record.read_record(path)
    record.write_record(path, b"{}")
    assert not path.is_symlink() and path.read_bytes() == b"{}"
    assert target.read_text() == GOOD  # the file it pointed to is untouched


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_fifo_or_a_folder_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    path = tmp_path / record.RECORD_NAME
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(RecordError, match="not a regular file"):
        record.read_record(path)


def test_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / record.RECORD_NAME
    with path.open("wb") as file:
        file.truncate(record.MAX_RECORD_BYTES + 1)  # sparse: no disk needed
    with pytest.raises(RecordError, match="more than a record"):
        record.read_record(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / record.RECORD_NAME
    path.write_text(GOOD)
    os.chown(path, 65534, 65534)
    with pytest.raises(RecordError, match="belongs to uid 65534"):
        record.read_record(path)


def test_a_failed_write_leaves_the_old_record(tmp_path: Path) -> None:
    """A full disk, for real: a file-size limit makes write() fail (EFBIG) in a child process."""
    path = tmp_path / record.RECORD_NAME
    path.write_text(GOOD)
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from supervisor.handoff import record\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        "try:\n"
        "    record.write_record(Path(sys.argv[1]), b'x' * 1000)\n"
        "except OSError as exc:\n"
        "    print(exc.strerror)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "File too large", done.stderr
    assert path.read_text() == GOOD
    assert [p.name for p in tmp_path.iterdir()] == [record.RECORD_NAME]


# -- stopping what a crashed service left -----------------------------------------------------


async def test_a_crashed_services_groups_are_stopped_with_their_stop_signal(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    marker = unique_marker()
    flag = tmp_path / "got-term"
    script = f"trap 'echo term > {flag}; exit 0' TERM; " + FORKER
    first = start_group(groups, script, marker)
    second = start_group(groups, FORKER, marker)
    before = marked(marker)
    assert len(before) == 6
    write(tmp_path, record_of([entry_for(first.pid, "web-0"), entry_for(second.pid, "web-1")]))
    with caplog.at_level(logging.INFO, logger="supervisor"):
        found = await leftovers.stop_leftovers(tmp_path)
    assert {f.entry.instance for f in found} == {"web-0", "web-1"}
    assert all(not same_alive(pid, start) for pid, start in before.items())
    assert marked(marker) == {}
    assert flag.read_text() == "term\n"  # the stop signal first, as configured
    assert first.wait(timeout=30) == 0
    text = caplog.text
    assert f"web-0: process group {first.pid}" in text and f"web-1: process group {second.pid}" in text
    assert "stopped 2 process groups left by a service that ended without cleaning up" in text


async def test_a_group_that_ignores_the_stop_signal_gets_sigkill_after_the_timeout(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    marker = unique_marker()
    proc = start_group(groups, STUBBORN, marker)
    before = marked(marker)
    write(tmp_path, record_of([entry_for(proc.pid, timeout=0.2)]))
    with caplog.at_level(logging.INFO, logger="supervisor"), anyio.fail_after(20):
        await leftovers.stop_leftovers(tmp_path)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert all(not same_alive(pid, start) for pid, start in before.items())
    assert "SIGKILL after 0.2s" in caplog.text and "(2 SIGKILLed)" in caplog.text


async def test_a_process_forked_while_its_group_is_stopped_is_killed_too(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    marker = unique_marker()
    # On TERM, the shell forks one more sleep, after the look at /proc, and exits.
    proc = start_group(groups, "trap 'sleep \"$1\" & exit 0' TERM; " + FORKER, marker)
    before = marked(marker)
    write(tmp_path, record_of([entry_for(proc.pid)]))
    with caplog.at_level(logging.INFO, logger="supervisor"):
        await leftovers.stop_leftovers(tmp_path)
    assert proc.wait(timeout=30) == 0
    assert all(not same_alive(pid, start) for pid, start in before.items())
    assert marked(marker) == {}
    assert "(and SIGKILLed 1 processes forked meanwhile)" in caplog.text


async def test_grandchildren_whose_leader_is_gone_are_stopped(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """What a `kill -9` of the service leaves: the parent-death signal killed the leader only."""
    marker = unique_marker()
    proc = start_group(groups, FORKER, marker)
    entry = entry_for(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    orphans = marked(marker)
    assert len(orphans) == 2 and all(os.getpgid(pid) == proc.pid for pid in orphans)
    write(tmp_path, record_of([entry]))
    with caplog.at_level(logging.INFO, logger="supervisor"):
        (found,) = await leftovers.stop_leftovers(tmp_path)
    assert not found.leader_alive and {p.pid for p in found.processes} == set(orphans)
    for pid in orphans:
        await wait_gone(pid)
    assert marked(marker) == {}
    assert "its leader gone" in caplog.text


async def test_nothing_that_is_not_provably_ours_is_signalled(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    marker = unique_marker()
    reused = start_group(groups, FORKER, marker)  # its start time will not match: a reused pid
    not_leader = subprocess.Popen(["sleep", marker])  # in our session: alive, with its start time
    try:
        me = record.identity(os.getpid())
        assert me is not None
        fake = entry_for(reused.pid, "reused")
        entries = [
            Entry("init", 1, 1, 0, 9, 0),
            Entry("me", os.getpid(), os.getpid(), me.start, 9, 0),
            Entry("reused", reused.pid, reused.pid, fake.start - 1, 9, 0),
            Entry("reused-later", reused.pid, reused.pid, fake.start + 1, 9, 0),
            entry_for(not_leader.pid, "not-a-leader", signal_number=9),
        ]
        if os.getpgrp() != 1:
            entries.append(Entry("my-group", os.getpgrp(), os.getpgrp(), 0, 9, 0))
        before = marked(marker)
        write(tmp_path, record_of(entries))
        with caplog.at_level(logging.INFO, logger="supervisor"):
            assert await leftovers.stop_leftovers(tmp_path) == []
        assert marked(marker) == before and len(before) == 4
        assert pid_alive(1) and pid_alive(not_leader.pid)
        assert "has its start time but not its session: left alone" in caplog.text
        assert "with pid 1: never signalled" in caplog.text
    finally:
        not_leader.kill()
        not_leader.wait(timeout=30)


async def test_a_record_whose_service_still_runs_or_from_another_boot_or_namespace_is_left_alone(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    marker = unique_marker()
    proc = start_group(groups, FORKER, marker)
    me = record.identity(os.getpid())
    assert me is not None
    before = marked(marker)
    with caplog.at_level(logging.INFO, logger="supervisor"):
        write(tmp_path, record_of([entry_for(proc.pid)], service=(os.getpid(), me.start)))
        assert await leftovers.stop_leftovers(tmp_path) == []
        assert "the service that wrote it (this process) still runs" in caplog.text
        write(tmp_path, record_of([entry_for(proc.pid)], boot="00000000-0000-0000-0000-000000000000"))
        assert await leftovers.stop_leftovers(tmp_path) == []
        assert "is from another boot" in caplog.text
        other = record_of([entry_for(proc.pid)])
        write(tmp_path, dataclasses.replace(other, pid_ns=other.pid_ns + 1))
        assert await leftovers.stop_leftovers(tmp_path) == []
        assert "is from another PID namespace" in caplog.text
    assert marked(marker) == before


@pytest.mark.parametrize("content", [b"", b'{"format": "procward-instances", "vers', b"\xff" * 100])
async def test_a_broken_record_stops_nothing_and_says_so(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    marker = unique_marker()
    start_group(groups, FORKER, marker)
    before = marked(marker)
    (tmp_path / record.RECORD_NAME).write_bytes(content)
    with caplog.at_level(logging.INFO, logger="supervisor"):
        assert await leftovers.stop_leftovers(tmp_path) == []
    assert "nothing was stopped" in caplog.text
    assert marked(marker) == before


# -- keeping the record -----------------------------------------------------------------------


async def test_the_record_follows_spawns_and_exits_in_few_writes(tmp_path: Path) -> None:
    text = """
        version: 1
        instances:
          many: {command: [sleep, "60"], replicas: 200, restart: {min_uptime: 0}}
          short: {command: [sleep, "61"], autostart: false, restart: {policy: "no", min_uptime: 0}}
        """
    manager = Manager(manifest_from(text, tmp_path))
    keeper = RecordKeeper(manager)
    path = tmp_path / ".supervisor" / record.RECORD_NAME
    path.parent.mkdir(mode=0o700)

    def recorded() -> dict[str, Entry]:
        rec = record.read_record(path)
        return {} if rec is None else {e.instance: e for e in rec.entries}

    async def until(condition: object) -> None:
        assert callable(condition)
        with anyio.fail_after(30):
            while not condition():
                await keeper.next_write()

    async with anyio.create_task_group() as tg:
        await tg.start(keeper.run)
        await tg.start(manager.run)
        try:
            await until(lambda: len(recorded()) == 200)
            entries = recorded()
            for name, instance in manager.instances.items():
                if name.startswith("many"):
                    assert instance.pid is not None and entries[name].pid == instance.pid
                    assert entries[name].start == record.identity(instance.pid).start  # type: ignore[union-attr]
                    assert (entries[name].stop_signal, entries[name].stop_timeout) == (15, 10.0)
            # 200 spawns, a handful of writes: bursts are coalesced.
            assert keeper.writes <= 200 / 4, keeper.writes
            rec = record.read_record(path)
            assert rec is not None and rec.service_pid == os.getpid() and rec.boot_id == record.boot_id()
            short = manager.instances["short"]
            await short.start()
            await until(lambda: "short" in recorded())
            await manager.instances["many-3"].stop()
            os.kill(short.pid or 0, signal.SIGTERM)
            await until(lambda: "short" not in recorded() and "many-3" not in recorded())
            assert len(recorded()) == 199
        finally:
            with anyio.CancelScope(shield=True):
                await manager.shutdown()
            tg.cancel_scope.cancel()
    keeper.remove()
    assert not path.exists()


# -- end to end: kill -9 of a real service, and of its guardian -------------------------------


def process_state(pid: int) -> str | None:
    found = record.identity(pid)
    return None if found is None else found.state


def forkers(marker: str) -> str:
    """Shells that fork two sleeps each, and a program that puts a child in a group of its own."""
    regroup = (
        "import os, subprocess, sys; subprocess.Popen(['sleep', sys.argv[1]], process_group=0); "
        "os.execvp('sleep', ['sleep', sys.argv[1]])"
    )
    return f"""
        version: 1
        instances:
          forker:
            command: ["sh", "-c", "sleep {marker} & sleep {marker} & wait", "{marker}"]
            replicas: 3
            restart: {{min_uptime: 0}}
            stop: {{timeout: 5s}}
          regrouper:
            command: ["{sys.executable}", "-c", "{regroup}", "{marker}"]
            restart: {{min_uptime: 0}}
        """


def test_kill_9_of_the_service_and_its_guardian_then_run_again_leaves_nothing_of_the_first_run(
    tmp_path: Path, service: Callable[..., ServiceProcess]
) -> None:
    marker = unique_marker()
    env = {"SUPERVISOR_CGROUP": "off"}  # the record alone, not a cgroup kill, must do it
    first = service(forkers(marker), env=env)
    first.wait_until(lambda: len(marked(marker)) == 3 * 3 + 2, 30, "every instance's children")
    before = marked(marker)
    pids = {name: s["pid"] for name, s in first.status().items()}
    path = tmp_path / ".supervisor" / record.RECORD_NAME

    def recorded() -> dict[str, int]:
        try:
            rec = record.read_record(path)
        except RecordError:
            return {}
        return {} if rec is None else {e.instance: e.pid for e in rec.entries}

    first.wait_until(lambda: recorded() == pids, 30, "every instance in the record")
    (keeper,) = [
        pid
        for pid in map(int, Path(f"/proc/{first.pid}/task/{first.pid}/children").read_text().split())
        if b"guardian.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    os.kill(keeper, signal.SIGSTOP)  # the guardian cannot act: the record must
    first.wait_until(lambda: process_state(keeper) == "T", 10, "the guardian stopped")
    first.proc.kill()
    assert first.proc.wait(timeout=30) == -signal.SIGKILL
    first.expected_exit = None
    os.kill(keeper, signal.SIGKILL)
    with anyio.from_thread.start_blocking_portal() as portal:
        portal.call(wait_gone, keeper)
    left = marked(marker)
    assert left and set(left.items()) <= set(before.items())  # the grandchildren outlived it

    second = service(tmp_path / "supervisor.yaml", env=env)
    second.wait_log("stopped 4 process groups left by a service that ended without cleaning up")
    second.wait_for(["forker-0", "forker-1", "forker-2", "regrouper"], "running")
    assert all(not same_alive(pid, start) for pid, start in before.items())
    now = marked(marker)
    assert not set(now.items()) & set(before.items())
    for name, pid in pids.items():
        assert f"{name}: process group {pid} " in second.log()
    second.wait_until(lambda: len(marked(marker)) == 3 * 3 + 2, 30, "the new instances' children")
    new_pids = {name: s["pid"] for name, s in second.status().items()}
    second.wait_until(lambda: recorded() == new_pids, 30, "the new instances in the record")
    assert second.stop() == 0
    second.expected_exit = None
    assert not path.exists()  # a clean stop leaves no record: nothing runs


# -- the service as init of its own PID namespace ---------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root (CAP_SYS_ADMIN)")


def wait_all_gone(processes: dict[int, int]) -> None:
    async def wait() -> None:
        for pid, start in processes.items():
            if same_alive(pid, start):
                await wait_gone(pid, timeout=20)

    with anyio.from_thread.start_blocking_portal() as portal:
        portal.call(wait)


def escapers(marker: str) -> str:
    """forkers(), and a daemon that leaves its instance's session: only the namespace catches it."""
    return (
        forkers(marker)
        + f"""
          daemon:
            command: ["sh", "-c", "setsid sleep {marker} & exec sleep {marker}", "{marker}"]
            restart: {{min_uptime: 0}}
        """
    )


@needs_root
def test_kill_9_of_a_service_in_its_pid_namespace_ends_everything_it_started(
    tmp_path: Path, service: Callable[..., ServiceProcess]
) -> None:
    marker = unique_marker()
    pidfile = tmp_path / "service.pid"
    env = {"SUPERVISOR_CGROUP": "off"}  # the namespace alone
    svc = service(escapers(marker), args=("--pid-namespace", "--pidfile", str(pidfile)), env=env)

    def sessions() -> int:  # of the marked processes (0 if one is gone meanwhile)
        with contextlib.suppress(ProcessLookupError):
            return len({os.getsid(pid) for pid in marked(marker)})
        return 0

    # Waited for by sessions too: the daemon is counted from its fork, before its setsid().
    svc.wait_until(
        lambda: len(marked(marker)) == 3 * 3 + 2 + 2 and sessions() == 5 + 1,
        30,
        "every instance's children, the daemon out of its instance's session",
    )
    svc.wait_until(pidfile.exists, 30, "the pidfile")
    assert pidfile.read_text() == f"{svc.pid}\n"  # the pid outside, not the namespace's 1
    before = marked(marker)
    statuses = svc.status()
    assert set(statuses) == {"forker-0", "forker-1", "forker-2", "regrouper", "daemon"}
    # The pids status shows are the namespace's: not the host's pids of those processes.
    assert all(s["pid"] not in before for s in statuses.values())
    svc.proc.kill()
    assert svc.proc.wait(timeout=30) == -signal.SIGKILL
    svc.expected_exit = None
    wait_all_gone(before)
    assert marked(marker) == {}


@needs_root
def test_a_service_in_its_pid_namespace_stops_cleanly_on_sigterm(
    tmp_path: Path, service: Callable[..., ServiceProcess]
) -> None:
    marker = unique_marker()
    pidfile = tmp_path / "service.pid"
    svc = service(forkers(marker), args=("--pid-namespace", "--pidfile", str(pidfile)))
    svc.wait_until(lambda: len(marked(marker)) == 3 * 3 + 2, 30, "every instance's children")
    svc.wait_until(pidfile.exists, 30, "the pidfile")
    before = marked(marker)
    assert svc.cli("status").returncode == 0
    assert svc.client().health()["pid"] == svc.pid  # what `kill` from outside must aim at, never 1
    assert svc.stop() == 0  # SIGTERM to the outer process, forwarded; its exit status passed on
    svc.expected_exit = None
    assert "stopped" in svc.log() and "shutting down" in svc.log()
    assert all(not same_alive(pid, start) for pid, start in before.items())
    assert not pidfile.exists() and not (tmp_path / ".supervisor" / record.RECORD_NAME).exists()


def watch_until(done: Callable[[], bool], pid: int, what: str, timeout: float = 30) -> None:
    """Until ``done()``; between looks, a bounded wait on the pidfd of ``pid`` (which must not end)."""
    pidfd = os.pidfd_open(pid)
    try:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"{what} did not happen within {timeout}s"
            assert not select.select([pidfd], [], [], min(0.05, left))[0], f"{pid} ended before {what}"
    finally:
        os.close(pidfd)


@needs_root
def test_run_detached_in_a_pid_namespace_answers_with_the_outer_pid(tmp_path: Path) -> None:
    marker = unique_marker()
    write_manifest(tmp_path, forkers(marker))
    pidfile = tmp_path / "svc.pid"
    result = subprocess.run(
        [*SUPERVISOR, "run", "-d", "--pid-namespace", "--pidfile", str(pidfile)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert result.returncode == 0, result.stderr
        assert pid is not None and f"the service runs (pid {pid}," in result.stderr
        assert f"supervisor run -f {tmp_path / 'supervisor.yaml'}".encode() in Path(
            f"/proc/{pid}/cmdline"
        ).read_bytes().replace(b"\0", b" ")
        watch_until(lambda: len(marked(marker)) == 3 * 3 + 2, pid, "every instance's children")
        before = marked(marker)
        os.kill(pid, signal.SIGTERM)
        with anyio.from_thread.start_blocking_portal() as portal:
            portal.call(wait_gone, pid)
        assert all(not same_alive(p, start) for p, start in before.items())
        assert not pidfile.exists()
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@needs_root
def test_ctrl_c_at_a_terminal_stops_a_service_in_its_pid_namespace_gracefully(tmp_path: Path) -> None:
    """^C reaches the service once (its group is the terminal's foreground), not once more forwarded."""
    import fcntl
    import termios

    marker = unique_marker()
    manifest = write_manifest(tmp_path, forkers(marker))
    master, slave = os.openpty()
    log = tmp_path / "service.log"

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    with log.open("wb") as output:
        proc = subprocess.Popen(
            [*SUPERVISOR, "run", "-f", str(manifest), "--pid-namespace"],
            stdin=slave,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=take_terminal,
        )
    os.close(slave)
    try:
        wait_until(lambda: "supervising 4 instances" in log.read_text(), proc, 30, "the service up")
        assert os.tcgetpgrp(master) != proc.pid  # the service's group has the terminal, not the outer one
        os.write(master, b"\x03")
        assert proc.wait(timeout=60) == 0, log.read_text()
        text = log.read_text()
        assert text.count("got SIGINT") == 1 and "killing every instance now" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


async def test_a_record_that_cannot_be_written_is_said_once_and_again_when_it_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = Manager(manifest_from("version: 1\ninstances: {}\n", tmp_path))
    keeper = RecordKeeper(manager)
    keeper.path.parent.mkdir(mode=0o700)
    keeper.path.mkdir()  # in the way: rename() fails, as on a read-only or broken folder
    with caplog.at_level(logging.INFO, logger="supervisor"):
        await keeper.write_now()
        await keeper.write_now()
        assert caplog.text.count(f"cannot write {keeper.path}") == 1 and keeper.writes == 0
        keeper.path.rmdir()
        await keeper.write_now()
    assert f"{keeper.path} written again" in caplog.text and keeper.writes == 1
    rec = record.read_record(keeper.path)
    assert rec is not None and rec.entries == () and rec.service_pid == os.getpid()
    assert [p.name for p in keeper.path.parent.iterdir()] == [record.RECORD_NAME]


async def test_the_record_moves_with_the_state_folder_on_reload(tmp_path: Path) -> None:
    text = "version: 1\nsupervisor: {{state_dir: {where}}}\ninstances:\n  web: {{command: [sleep, '60']}}\n"
    manager = Manager(manifest_from(text.format(where="first"), tmp_path))
    keeper = RecordKeeper(manager)
    first, second = tmp_path / "first" / record.RECORD_NAME, tmp_path / "second" / record.RECORD_NAME
    for folder in (first.parent, second.parent):
        folder.mkdir(mode=0o700)

    def names(path: Path) -> list[str]:
        rec = record.read_record(path)
        return [] if rec is None else [e.instance for e in rec.entries]

    async with anyio.create_task_group() as tg:
        await tg.start(keeper.run)
        await tg.start(manager.run)
        try:
            with anyio.fail_after(30):
                while names(first) != ["web"]:
                    await keeper.next_write()
                await manager.apply(manifest_from(text.format(where="second"), tmp_path))
                while not (second.exists() and names(second) == ["web"] and not first.exists()):
                    await keeper.next_write()
        finally:
            with anyio.CancelScope(shield=True):
                await manager.shutdown()
            tg.cancel_scope.cancel()
