"""At start: stop what a crashed service left running, as its record names it, before anything starts.

Only processes that are provably that service's are touched. A process is one when

- the record is from this boot (the boot id: start times count from boot), and the
  service that wrote it is gone (a live one, this process after a re-exec included,
  still owns its instances);
- its session or process group is a recorded instance's (the instance's pid: each
  instance leads a session of its own), and it started no earlier than that instance;
- and the recorded leader is either gone, or alive with the recorded start time and
  still leading that session. A leader's pid alive with another start time means the
  pid was handed out again, which the kernel does only once no process is left in the
  session or group it numbered: nothing of ours is left there, and nothing is done.

pid 1, this process and this process's own group and session are never touched,
whatever the record says. Each process is signalled through a pidfd opened and then
checked again (start time and session), so a pid reused between the look and the
signal is not hit.

What the record cannot cover: a process that left its instance's session (``setsid``,
a double-forking daemon) is in a session no record names (the cgroup covers it, where
there is one); and when every process of a recorded session has ended and the
kernel has given the same number to a new session, that session's processes look
like ours while the recorded leader is gone (so the guide says to raise pid_max, and
a PID namespace or a cgroup removes the question).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from .record import (
    RECORD_NAME,
    Entry,
    ProcessIdentity,
    Record,
    RecordError,
    boot_id,
    identity,
    pid_namespace,
    read_record,
)

__all__ = ["Leftover", "find_leftovers", "stop_leftovers"]

log = logging.getLogger("supervisor.recovery")

#: How long SIGKILLed processes get to be gone before the next look for new members.
KILL_WAIT = 5.0
#: At most this many looks for members forked while we were stopping a group.
SCAN_ROUNDS = 20
#: Groups stopped at the same time (each holds one pidfd per process while it waits).
CONCURRENT = 1024


@dataclass(frozen=True, slots=True)
class Leftover:
    """A recorded group with processes still alive, and those processes."""

    entry: Entry
    processes: tuple[ProcessIdentity, ...]
    leader_alive: bool


async def stop_leftovers(state_dir: Path) -> list[Leftover]:
    """Read the record in ``state_dir`` and stop every group it names that still runs.

    Returns what was found (and stopped). Never raises for a bad record: it is said
    in the log, and nothing is stopped.
    """
    path = state_dir / RECORD_NAME
    try:
        record = read_record(path)
    except RecordError as exc:
        log.warning("crash record: %s; nothing was stopped", exc)
        return []
    if record is None:
        return []
    for problem in record.skipped:
        log.warning("crash record: %s; that entry is ignored", problem)
    try:
        leftovers = find_leftovers(record, path)
    except OSError as exc:  # no /proc (a container without it): nothing can be proven
        log.warning("crash record %s: cannot look at the processes (%s); nothing was stopped", path, exc)
        return []
    if not leftovers:
        return []
    limiter = anyio.CapacityLimiter(CONCURRENT)
    async with anyio.create_task_group() as tg:
        for leftover in leftovers:
            tg.start_soon(_stop_limited, limiter, leftover)
    latecomers = await _kill_latecomers([leftover.entry for leftover in leftovers])
    more = f" (and SIGKILLed {latecomers} processes forked meanwhile)" if latecomers else ""
    log.warning(
        "stopped %d process groups left by a service that ended without cleaning up%s", len(leftovers), more
    )
    return leftovers


def find_leftovers(record: Record, path: Path | str = RECORD_NAME) -> list[Leftover]:
    """The recorded groups still alive and provably the recording service's, each with its processes."""
    boot = boot_id()
    if boot is None or record.boot_id != boot:
        log.info("crash record %s is from another boot: nothing of it runs", path)
        return []
    if record.pid_ns != pid_namespace():
        # A PID namespace that is not ours: its pids are not the pids /proc shows us. If it was
        # a `run --pid-namespace`, the kernel ended every process in it when its init died.
        log.info("crash record %s is from another PID namespace: its pids are not ours to judge", path)
        return []
    writer = identity(record.service_pid)
    if writer is not None and not writer.zombie and writer.start == record.service_start:
        who = "this process" if writer.pid == os.getpid() else f"pid {writer.pid}"
        log.info(
            "crash record %s: the service that wrote it (%s) still runs; its instances are its own", path, who
        )
        return []
    table = _Table(_processes())
    return [leftover for entry in record.entries if (leftover := _leftover(entry, table)) is not None]


class _Table:
    """The processes of one look at /proc, by pid and by the session and group they are in."""

    def __init__(self, processes: list[ProcessIdentity]) -> None:
        self.by_pid = {p.pid: p for p in processes}
        self.by_number: dict[int, list[ProcessIdentity]] = {}
        for p in processes:
            self.by_number.setdefault(p.sid, []).append(p)
            if p.pgid != p.sid:
                self.by_number.setdefault(p.pgid, []).append(p)


def _leftover(entry: Entry, table: _Table) -> Leftover | None:
    number = entry.pgid
    if number in _untouchable():
        log.warning("crash record names %s with pid %d: never signalled", entry.instance, number)
        return None
    leader = table.by_pid.get(entry.pid)
    if leader is not None:
        if leader.start != entry.start:
            return None  # the pid was handed out again: the recorded session and group are empty
        if leader.sid != number or leader.pgid != number:
            log.warning(
                "crash record: pid %d (%s) has its start time but not its session: left alone",
                entry.pid,
                entry.instance,
            )
            return None
    members = tuple(_members(entry, table))
    if not members:
        return None
    return Leftover(entry, members, leader is not None and not leader.zombie)


def _members(entry: Entry, table: _Table) -> list[ProcessIdentity]:
    """The live processes in the entry's session or group that started no earlier than its leader."""
    untouchable = _untouchable()
    return [
        p
        for p in table.by_number.get(entry.pgid, ())
        if p.start >= entry.start and p.pid not in untouchable and not p.zombie
    ]


def _untouchable() -> set[int]:
    return {0, 1, os.getpid(), os.getpgrp(), os.getsid(0)}


def _processes() -> list[ProcessIdentity]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (process := identity(int(entry.name))) is not None:
            found.append(process)
    return found


async def _stop_limited(limiter: anyio.CapacityLimiter, leftover: Leftover) -> None:
    async with limiter:
        await _stop(leftover)


async def _stop(leftover: Leftover) -> None:
    """The stop signal to every process of the group, SIGKILL to what is left after the timeout."""
    entry = leftover.entry
    handles = _open(entry.pgid, leftover.processes)
    try:
        leader = "its leader alive" if leftover.leader_alive else "its leader gone"
        log.warning(
            "%s: process group %d (started at tick %d) was left running by a service that ended "
            "without cleaning up (%d processes, %s): sending %s, SIGKILL after %gs",
            entry.instance,
            entry.pgid,
            entry.start,
            len(handles),
            leader,
            _name(entry.stop_signal),
            entry.stop_timeout,
        )
        _signal(handles, entry.stop_signal)
        if entry.stop_signal not in (signal.SIGKILL, signal.SIGCONT):
            _signal(handles, signal.SIGCONT)  # a stopped process cannot act on the stop signal
        handles = await _wait_gone(handles, entry.stop_timeout)
        killed = len(handles)
        if handles:
            _signal(handles, signal.SIGKILL)
            handles = await _wait_gone(handles, KILL_WAIT)
        if handles:
            log.error("%s: %d processes still there after SIGKILL", entry.instance, len(handles))
            return
        log.warning(
            "%s: group %d stopped%s", entry.instance, entry.pgid, f" ({killed} SIGKILLed)" if killed else ""
        )
    finally:
        for _, fd in handles:
            os.close(fd)


async def _kill_latecomers(entries: list[Entry]) -> int:
    """SIGKILL what was forked into the groups while they were being stopped; how many.

    One look at /proc a round for all groups (not one a group: 10,000 groups must not cost
    10,000 looks), until a round finds no one.
    """
    killed = 0
    for _ in range(SCAN_ROUNDS):
        table = _Table(_processes())
        handles = [h for entry in entries for h in _open(entry.pgid, _members(entry, table))]
        if not handles:
            break
        killed += len(handles)
        _signal(handles, signal.SIGKILL)
        for _, fd in await _wait_gone(handles, KILL_WAIT):
            os.close(fd)
    return killed


def _open(number: int, processes: Sequence[ProcessIdentity]) -> list[tuple[ProcessIdentity, int]]:
    """A pidfd for each process still the one seen and still in session or group ``number``.

    Checked after the open: a pidfd pins its process, so what passes the check is what
    the signals reach, even if the pid is handed out again a moment later.
    """
    handles = []
    for seen in processes:
        try:
            fd = os.pidfd_open(seen.pid)
        except OSError:
            continue  # gone, or out of descriptors: the next round looks again
        now = identity(seen.pid)
        if now is None or now.zombie or now.start != seen.start or number not in (now.sid, now.pgid):
            os.close(fd)
            continue
        handles.append((now, fd))
    return handles


def _signal(handles: list[tuple[ProcessIdentity, int]], sig: int) -> None:
    for _, fd in handles:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, sig)


async def _wait_gone(
    handles: list[tuple[ProcessIdentity, int]], timeout: float
) -> list[tuple[ProcessIdentity, int]]:
    """Wait (up to ``timeout``) for every pidfd to turn readable; the handles of the survivors."""
    with anyio.move_on_after(timeout):
        for _, fd in handles:
            await anyio.wait_readable(fd)
    survivors = []
    for process, fd in handles:
        now = identity(process.pid)
        if now is not None and not now.zombie and now.start == process.start:
            survivors.append((process, fd))
        else:
            os.close(fd)
    return survivors


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
