"""Resource figures of process groups, read from ``/proc`` when someone asks.

Part of the OS edge (ARCHITECTURE.md puts "resource figures from /proc" there),
kept apart from ``process.py`` because nothing here spawns or waits: it only
reads. Nothing runs on a timer: a ``ResourceSampler`` reads ``/proc`` when a
status, the metrics or the dashboard ask, and answers again from what it read
for ``max_age`` seconds, so a thousand requests a second cost one scan a
second, and nobody asking costs nothing.

One scan reads ``/proc/PID/stat`` of every process once (the only place the
process group is written), keeps those in a group asked for, and counts their
fds. Its cost grows with the machine's processes, not ours: 15 ms with 600
processes, 300 ms with a few thousand on the reference machine. So a group
given with its cgroup (``cgroups``: pgid → the folder of an instance's own
cgroup, cgroups.py) is read from there instead: its members are that folder's
``cgroup.procs`` (which also holds what left the group with ``setsid``), and
only theirs is read; the whole of /proc is scanned only for groups without one.

CPU percent is the CPU time the group used between this scan and the one
before it, over the wall time between the two; a group never seen before gets
its average since its leader started, and so does one whose previous scan is
older than ``window`` seconds (a figure averaged over an hour would mislead).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple

__all__ = ["GroupFigures", "ResourceSampler"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class GroupFigures(NamedTuple):
    """One process group's figures at one scan (the sums over its live processes).

    A tuple, as cheap to make as it gets: a scan makes one per instance, 10,000 of them.
    """

    cpu_percent: float
    cpu_seconds: float
    rss_bytes: int
    open_fds: int
    threads: int
    processes: int
    #: The group's leader (the program) is stopped: SIGSTOP, a terminal's SIGTSTP/SIGTTIN/SIGTTOU,
    #: or a debugger. It runs nothing until SIGCONT, and the instance's state (running) cannot say it.
    paused: bool


class _Proc(NamedTuple):
    """One process's line of ``/proc/PID/stat``: a tuple, made for every process on the machine."""

    pgid: int
    started: int  # clock ticks after boot: (pid, started) names a process even if the pid is reused
    cpu_ticks: int
    threads: int
    rss_pages: int
    stopped: bool  # state T (stopped by a signal) or t (by a debugger)


def _read_stat(pid: str) -> _Proc | None:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 1024)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        ticks = int(fields[11]) + int(fields[12])
        stopped = fields[0] in (b"T", b"t")
        return _Proc(int(fields[2]), int(fields[19]), ticks, int(fields[17]), int(fields[21]), stopped)
    except (IndexError, ValueError):
        return None


def _count_fds(pid: int) -> int:
    """Open fds: since Linux 6.2 the size of /proc/PID/fd says it, for the price of one stat."""
    try:
        counted = os.stat(f"/proc/{pid}/fd").st_size
        return counted if counted > 0 else len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # gone meanwhile, or not ours to look at
        return 0


def _cgroup_members(folder: str) -> list[str] | None:
    """The pids in a cgroup (None if it is gone: its group is then looked for in /proc)."""
    try:
        fd = os.open(os.path.join(folder, "cgroup.procs"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while data := os.read(fd, 65536):
            chunks.append(data)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode().split()


def _uptime() -> float:
    with open("/proc/uptime", "rb") as uptime:
        return float(uptime.read().split()[0])


class ResourceSampler:
    """Figures for process groups by pgid, from one ``/proc`` scan at most every ``max_age`` seconds."""

    def __init__(
        self,
        max_age: float = 1.0,
        *,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age = max_age
        self.window = window
        self._clock = clock
        # The last scan: when, which groups it was asked for, what it found. One tuple, replaced
        # whole, so that ``cached`` (called on the event loop while a worker thread scans) never
        # sees one scan's time with another's figures.
        self._last: tuple[float, frozenset[int], dict[int, GroupFigures]] | None = None
        # Per group, the previous scan's time and its processes' CPU ticks: the next percentage.
        self._seen: dict[int, float] = {}
        self._ticks: dict[int, dict[tuple[int, int], int]] = {}
        self.scans = 0

    def figures(
        self, pgids: Collection[int], cgroups: Mapping[int, str] | None = None
    ) -> Mapping[int, GroupFigures]:
        """The figures of each group in ``pgids`` that has a live process (others are left out).

        ``cgroups``: for groups that have a cgroup of their own, its folder (see above).
        """
        if not pgids:
            return {}
        cached = self.cached(pgids)
        if cached is not None:
            return cached
        now = self._clock()
        last = self._last
        fresh = last is not None and now - last[0] < self.max_age
        wanted = frozenset(pgids)
        figures = self._scan(wanted | (last[1] if last is not None and fresh else frozenset()), now, cgroups)
        return {pgid: figures[pgid] for pgid in wanted if pgid in figures}

    def cached(
        self, pgids: Collection[int], max_age: float | None = None
    ) -> Mapping[int, GroupFigures] | None:
        """The last scan's figures, if it covered ``pgids`` and is younger than ``max_age``; else None."""
        last = self._last
        limit = self.max_age if max_age is None else max_age
        if last is None or self._clock() - last[0] >= limit:
            return None
        _, scanned, figures = last
        wanted = frozenset(pgids)
        if not wanted <= scanned:
            return None
        return {pgid: figures[pgid] for pgid in wanted if pgid in figures}

    def age(self) -> float | None:
        """Seconds since the last scan; None before the first."""
        last = self._last
        return None if last is None else self._clock() - last[0]

    def covered(
        self, pgids: Collection[int], max_age: float
    ) -> tuple[dict[int, GroupFigures], frozenset[int]] | None:
        """The last scan's figures of those of ``pgids`` it covered, and the rest; None if it is too old."""
        last = self._last
        if last is None or self._clock() - last[0] >= max_age:
            return None
        _, scanned, figures = last
        wanted = frozenset(pgids)
        return {pgid: figures[pgid] for pgid in wanted & scanned if pgid in figures}, wanted - scanned

    def quick(
        self, pgids: Collection[int], cgroups: Mapping[int, str] | None = None
    ) -> dict[int, GroupFigures]:
        """Figures of a few groups without a scan of /proc: their cgroup's members, else the leader alone.

        For groups the last scan did not cover (instances started since): the leader of a
        group that has just started is usually all of it, and the next whole scan counts
        the rest. Safe beside a scan running in a worker thread.
        """
        wanted = frozenset(pgids)
        members = self._members(wanted, cgroups, whole=False)
        return self._summarize(members, wanted, self._clock(), forget_old=False)

    def _scan(
        self, wanted: frozenset[int], now: float, cgroups: Mapping[int, str] | None = None
    ) -> dict[int, GroupFigures]:
        self.scans += 1
        figures = self._summarize(self._members(wanted, cgroups, whole=True), wanted, now, forget_old=True)
        self._last = (now, wanted, figures)
        return figures

    @staticmethod
    def _members(
        wanted: frozenset[int], cgroups: Mapping[int, str] | None, *, whole: bool
    ) -> dict[int, list[tuple[int, _Proc]]]:
        """Each group's live processes: from its cgroup where it has one; else from a scan of all of
        /proc (``whole``), or its leader alone."""
        members: dict[int, list[tuple[int, _Proc]]] = {}
        rest = set(wanted)
        for pgid, folder in (cgroups or {}).items():
            # An empty cgroup: the program has not joined it yet (its gate writes its pid there
            # just after the spawn). Read like a group without one, or a status asked in that
            # moment had no figures, and kept none for the next second's requests.
            if pgid in rest and (pids := _cgroup_members(folder)):
                rest.discard(pgid)
                for pid in pids:
                    proc = _read_stat(pid)
                    if proc is not None:
                        members.setdefault(pgid, []).append((int(pid), proc))
        if rest and whole:
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                proc = _read_stat(name)
                if proc is not None and proc.pgid in rest:
                    members.setdefault(proc.pgid, []).append((int(name), proc))
        elif rest:
            for pgid in rest:
                proc = _read_stat(str(pgid))
                if proc is not None and proc.pgid == pgid:
                    members[pgid] = [(pgid, proc)]
        return members

    def _summarize(
        self,
        members: dict[int, list[tuple[int, _Proc]]],
        wanted: frozenset[int],
        now: float,
        *,
        forget_old: bool,
    ) -> dict[int, GroupFigures]:
        uptime = _uptime() if members else 0.0
        figures: dict[int, GroupFigures] = {}
        for pgid, procs in members.items():
            total = sum(p.cpu_ticks for _, p in procs)
            seen = self._seen.get(pgid)
            before = self._ticks.get(pgid, {})
            if seen is not None and 0 < now - seen <= self.window:
                # A process the previous scan did not see started (or joined) since: all its time counts.
                used = sum(p.cpu_ticks - before.get((pid, p.started), 0) for pid, p in procs)
                percent = max(used, 0) / _TICKS / (now - seen) * 100
            else:
                leader = next((p for pid, p in procs if pid == pgid), procs[0][1])
                lifetime = uptime - leader.started / _TICKS
                percent = total / _TICKS / lifetime * 100 if lifetime > 0 else 0.0
            if seen is None or now - seen >= self.max_age:
                # The next percentage is measured from here. A scan sooner than that (another
                # group asked for meanwhile) keeps the older base: no percentage over a blink.
                self._ticks[pgid] = {(pid, p.started): p.cpu_ticks for pid, p in procs}
                self._seen[pgid] = now
            if len(procs) == 1:  # most groups: no generator for each sum
                pid, proc = procs[0]
                rss, fds, threads = proc.rss_pages, _count_fds(pid), proc.threads
            else:
                rss = sum(p.rss_pages for _, p in procs)
                fds = sum(_count_fds(pid) for pid, _ in procs)
                threads = sum(p.threads for _, p in procs)
            paused = any(p.stopped for pid, p in procs if pid == pgid)  # no leader: not the program's
            figures[pgid] = GroupFigures(
                round(percent, 2), total / _TICKS, rss * _PAGE, fds, threads, len(procs), paused
            )
        # Groups asked for and gone are forgotten; those not asked for this time keep their
        # previous scan (a one-instance GET must not restart every other group's CPU window)
        # until it is too old to use.
        for pgid, seen in list(self._seen.items()):
            if pgid not in members and (pgid in wanted or (forget_old and now - seen > self.window)):
                self._seen.pop(pgid, None)
                self._ticks.pop(pgid, None)
        return figures
