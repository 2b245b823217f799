"""Orphans: the service is a child subreaper, so it reaps what its instances leave behind.

Orphaned grandchildren become the service's children; their exit statuses are
reaped here without stealing a registered direct child's (process.py's ``Child``
waits for those). Runs in the event-loop thread, like the registry it reads.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio

from .launcher import prctl
from .process import ExitStatus, exit_status, registered
from .signal_wakeup import signal_receiver

log = logging.getLogger("supervisor")

__all__ = [
    "become_subreaper", "kill_leftover_children", "living_children", "reap_orphans", "run_orphan_reaper",
]

_PR_SET_CHILD_SUBREAPER = 36
_SWEEP_INTERVAL = 5.0
_COALESCE = 0.02


def become_subreaper() -> bool:
    """Adopt orphaned descendants (instead of init), so they can be reaped and counted."""
    if prctl is None:
        return False
    return prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_orphans() -> list[ExitStatus]:
    """Reap every exited child that is not a registered direct child, without blocking.

    ``waitid(P_ALL, WNOWAIT)`` shows one exited child without reaping it. An orphan is
    reaped and the peek repeated; a registered child is left alone for its ``wait``,
    but it hides whatever exited after it, so then every child is looked at by pid.
    """
    reaped: list[ExitStatus] = []
    seen: set[int] = set()
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no children at all
            return reaped
        if info is None:
            return reaped
        if info.si_pid in registered() or info.si_pid in seen:
            break
        seen.add(info.si_pid)
        _reap_orphan(info.si_pid, reaped)
    for pid in living_children():
        if pid not in registered():
            _reap_orphan(pid, reaped)
    return reaped


def _reap_orphan(pid: int, into: list[ExitStatus]) -> None:
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return
    if got:
        into.append(exit_status(pid, status))


async def run_orphan_reaper(sweep_interval: float = _SWEEP_INTERVAL) -> None:
    """Reap orphans on every SIGCHLD, and sweep once ``sweep_interval`` after the last one.

    Pending signals coalesce, so a sweep after a burst of exits catches what a lost
    signal would leave. Once a sweep has found the service quiet, the reaper waits for
    the next SIGCHLD without a deadline: a sweep reads every child's pid from
    ``/proc`` (10,000 of them with 10,000 instances), and an idle service must cost
    no CPU at all (issue 13: 0 clock ticks over 30 s).
    """
    with signal_receiver(signal.SIGCHLD) as signals:  # a burst of exits overflows it, quietly
        while True:
            reap_orphans()
            with anyio.move_on_after(sweep_interval) as quiet:
                await anext(signals)
            if quiet.cancelled_caught:
                reap_orphans()
                await anext(signals)
            # One scan for a burst: a shutdown of 2,000 instances sends 2,000 SIGCHLDs, and a
            # scan each (every child's pid, from /proc) kept the loop busy for a minute. The
            # signals that come within _COALESCE of the first are taken without a scan.
            with anyio.move_on_after(_COALESCE):
                while True:
                    await anext(signals)


def living_children() -> list[int]:
    """Pids whose parent is this process (any thread), exited-but-unreaped ones included."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except FileNotFoundError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            if tid == str(os.getpid()):  # the main thread is never gone: no CONFIG_PROC_CHILDREN
                return _children_from_stat()
    return pids


def _children_from_stat() -> list[int]:
    """The slower way to list children: the ppid field of every /proc/PID/stat."""
    me = os.getpid()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            pids.append(int(name))
    return pids


def kill_leftover_children() -> None:
    """Kill and reap what is still our child at the end (daemons that escaped their group and
    were reparented to us: the service is their subreaper)."""
    leftovers = living_children()
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in leftovers:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    if leftovers:
        log.warning("killed %d processes left behind by instances", len(leftovers))
