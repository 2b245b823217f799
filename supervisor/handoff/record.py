"""The record of running process groups, ``<state_dir>/instances.json``, for crash recovery.

A service killed with SIGKILL (or by the OOM killer, or a kernel bug in a dependency)
cannot clean up. The guardian (guardian.py) usually does it for it; this record is
the line of defence behind that one: while the service runs it keeps, for every
instance whose program runs, the process group it leads (its pid, which is also the
group and session id: every instance starts in a session of its own), the process's
start time (field 22 of ``/proc/PID/stat``, in clock ticks since boot) with the boot
id (a reboot starts the tick count again, so a record from before it names nothing),
and the stop signal and timeout configured for it. The next ``supervisor run`` on the
same state folder stops what of that is still alive (``leftovers.py``).

Writes are atomic (a temporary file in the same folder, then a rename; see
``write_record`` for why there is no fsync): a reader sees the old record or the
new one, never half of one, and a full disk leaves the last good record in place.
They are coalesced: transitions only mark the record dirty, and one task writes it
at most once per window (see ``RecordKeeper``), so 10,000 instances starting cost a few writes, not 10,000.

The record is fed from the manager's event bus (a transition to ``starting``
carries the new pid) and checked against the manager's instances at each write,
so a subscriber that missed events (``Dropped``) cannot leave a stale pid in it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from ..events import Dropped, State, Transition

if TYPE_CHECKING:
    from collections.abc import Iterable

    from anyio.abc import TaskStatus

    from ..manager import Manager

__all__ = [
    "MAX_RECORD_BYTES",
    "MAX_WINDOW",
    "RECORD_NAME",
    "Entry",
    "ProcessIdentity",
    "Record",
    "RecordError",
    "RecordKeeper",
    "boot_id",
    "decode",
    "encode",
    "identity",
    "pid_namespace",
    "read_record",
    "remove_record",
    "write_record",
]

log = logging.getLogger("supervisor.record")

RECORD_NAME = "instances.json"
FORMAT = "procward-instances"
VERSION = 1
#: A record larger than this is not one we wrote (10,000 instances take about 1.5 MB).
MAX_RECORD_BYTES = 32 * 1024 * 1024
#: The largest pid Linux can hand out (PID_MAX_LIMIT).
PID_MAX = 1 << 22
#: The coalescing window: a transition reaches the file within MAX_WINDOW (plus one write).
MIN_WINDOW = 0.05
MAX_WINDOW = 1.0
#: The longest stop timeout a record may give (the manifest's limit for a duration).
MAX_TIMEOUT = 365 * 86400.0
#: An instance name longer than this is not one a manifest can give.
MAX_NAME = 1024

#: Signal numbers this kernel knows (as ints: the enum conversion costs a lot per entry).
_SIGNALS = frozenset(int(sig) for sig in signal.valid_signals())

_EXIT_STATES = frozenset({State.BACKOFF, State.EXITED, State.STOPPED, State.FAILED})


class RecordError(Exception):
    """The record cannot be read or trusted; the message names the file and why."""


# -- processes as /proc shows them ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """One process as ``/proc/PID/stat`` shows it: what tells it from a later one with its pid."""

    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    #: Clock ticks after boot at which the process was forked; an exec does not change it.
    start: int

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def identity(pid: int, proc: str = "/proc") -> ProcessIdentity | None:
    """``pid`` as it is now, or None if there is no such process."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as file:
            text = file.read()
    except OSError:
        return None
    return _parse_stat(pid, text)


def _parse_stat(pid: int, text: bytes) -> ProcessIdentity | None:
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = text.rpartition(b")")[2].split()
    try:
        return ProcessIdentity(
            pid=pid,
            state=fields[0].decode(),
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            start=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def pid_namespace() -> int:
    """The inode of our PID namespace (0 if unknown): a record's pids are pids in its writer's."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def boot_id() -> str | None:
    """This boot's random id: start times from another boot count from another zero."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read(64).strip() or None
    except OSError:
        return None


# -- the format -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One running instance's process group, and how to stop it."""

    instance: str
    pid: int
    #: The group (and session) the instance leads: its pid, since it starts in a session of its own.
    pgid: int
    start: int
    stop_signal: int
    stop_timeout: float


@dataclass(frozen=True, slots=True)
class Record:
    """What a service had running when it last wrote the record."""

    service_pid: int
    service_start: int
    boot_id: str
    written_at: float
    entries: tuple[Entry, ...]
    #: The inode of the writer's PID namespace: its pids mean nothing in another one.
    pid_ns: int = 0
    #: Why an entry of the file was skipped (bad fields): said in the log, never acted on.
    skipped: tuple[str, ...] = ()


def encode(record: Record) -> bytes:
    groups = [
        {
            "instance": e.instance,
            "pid": e.pid,
            "pgid": e.pgid,
            "start": e.start,
            "stop_signal": e.stop_signal,
            "stop_timeout": e.stop_timeout,
        }
        for e in record.entries
    ]
    document = {
        "format": FORMAT,
        "version": VERSION,
        "service": {
            "pid": record.service_pid,
            "start": record.service_start,
            "boot_id": record.boot_id,
            "pid_ns": record.pid_ns,
        },
        "written_at": record.written_at,
        "groups": groups,
    }
    # orjson: during a start of thousands, a write every 50 ms took 1.6 ms of the loop for 1,000
    # entries with the standard encoder, 0.5 ms so. No NaN can be here (a pid, a start time, the
    # clock, a stop timeout the manifest's models found finite); orjson would write it as null,
    # which the reader refuses, as it refuses any record it cannot use.
    return orjson.dumps(document) + b"\n"


def decode(data: bytes, source: str = RECORD_NAME) -> Record:
    """Parse and check a record; a bad entry is skipped (and said), a bad document refused."""
    try:
        document = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # garbage, truncated, NaN, 5,000-digit numbers
        raise RecordError(f"{source}: not a record (truncated or garbage): {_short(exc)}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise RecordError(f'{source}: not a record (no "format": "{FORMAT}")')
    if document.get("version") != VERSION:
        raise RecordError(
            f"{source}: record version {document.get('version')!r} unknown (this one reads {VERSION})"
        )
    service = document.get("service")
    groups = document.get("groups")
    written_at = document.get("written_at")
    if not isinstance(service, dict) or not isinstance(groups, list):
        raise RecordError(f'{source}: "service" must be an object and "groups" a list')
    service_pid = _pid(service.get("pid"))
    service_start = _tick(service.get("start"))
    boot = service.get("boot_id")
    pid_ns = _tick(service.get("pid_ns"))
    if service_pid is None or service_start is None or not isinstance(boot, str) or not 0 < len(boot) <= 64:
        raise RecordError(f'{source}: "service" needs a pid, a start time and a boot_id')
    if pid_ns is None:
        raise RecordError(f'{source}: "service" needs its pid_ns')
    if (
        not isinstance(written_at, int | float)
        or isinstance(written_at, bool)
        or not math.isfinite(written_at)
    ):
        raise RecordError(f'{source}: "written_at" must be a number of seconds')
    entries: list[Entry] = []
    skipped: list[str] = []
    for index, group in enumerate(groups):
        entry, why = _entry(group)
        if entry is None:
            skipped.append(f"{source}: groups[{index}]: {why}")
        else:
            entries.append(entry)
    return Record(service_pid, service_start, boot, float(written_at), tuple(entries), pid_ns, tuple(skipped))


def _entry(group: Any) -> tuple[Entry | None, str]:
    if not isinstance(group, dict):
        return None, "expected an object"
    name = group.get("instance")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        return None, f"instance: expected a name (got {_short(name)})"
    pid, pgid, start = _pid(group.get("pid")), _pid(group.get("pgid")), _tick(group.get("start"))
    if pid is None or pgid is None or start is None:
        return None, f"{name}: pid, pgid and start must be whole numbers in range"
    if pgid != pid:
        return None, f"{name}: pgid {pgid} is not its pid {pid} (an instance leads its own group)"
    sig = group.get("stop_signal")
    if not isinstance(sig, int) or isinstance(sig, bool) or sig not in _SIGNALS:
        return None, f"{name}: stop_signal: expected a signal number (got {_short(sig)})"
    timeout = group.get("stop_timeout")
    if not _number(timeout) or not 0 <= timeout <= MAX_TIMEOUT:
        return None, f"{name}: stop_timeout: expected 0 to {MAX_TIMEOUT:g} seconds (got {_short(timeout)})"
    return Entry(name, pid, pgid, start, sig, float(timeout)), ""


def _number(value: Any) -> bool:
    """A finite JSON number (a 400-digit int would overflow ``math.isfinite``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) < 1 << 63 if isinstance(value, int) else math.isfinite(value)


def _pid(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= PID_MAX
    return value if ok else None


def _tick(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63
    return value if ok else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a record holds")


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- the file ---------------------------------------------------------------------------------


def read_record(path: Path) -> Record | None:
    """The record at ``path``; None if there is none. RecordError for anything not ours or not whole.

    Never follows a symlink, never blocks on a fifo, never reads more than
    MAX_RECORD_BYTES: the folder is ours, but a record is input like any other.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise RecordError(f"{path} is a symlink, not a record this service wrote") from None
        raise RecordError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise RecordError(f"{path} is not a regular file")
        if found.st_uid != os.geteuid():
            raise RecordError(f"{path} belongs to uid {found.st_uid}, not to this service's user")
        if found.st_size > MAX_RECORD_BYTES:
            raise RecordError(f"{path} is {found.st_size} bytes, more than a record ({MAX_RECORD_BYTES})")
        chunks = []
        total = 0
        while total <= MAX_RECORD_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_RECORD_BYTES:  # it grew while we read
            raise RecordError(f"{path} is more than {MAX_RECORD_BYTES} bytes")
    except OSError as exc:
        raise RecordError(f"{path}: cannot read it: {exc.strerror}") from None
    finally:
        os.close(fd)
    return decode(b"".join(chunks), str(path))


def write_record(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; OSError leaves the old record as it was.

    Not fsync'ed: the record only means something within the boot that wrote it (a
    reboot changes the boot id and voids it), and the page cache outlives any crash
    of the service short of the kernel's own. So a power cut loses nothing that
    still mattered, and the write costs no disk flush in the event loop.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # ours from an earlier failed write, or planted: never written through
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temporary, path)  # replaces a symlink at path; never follows it
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _encode_and_write(path: Path, record: Record) -> None:
    write_record(path, encode(record))


def remove_record(path: Path) -> None:
    """At a clean exit: nothing runs, so nothing is left to record."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- keeping it current -----------------------------------------------------------------------


class RecordKeeper:
    """Keeps ``<state_dir>/instances.json`` current while the service runs.

    Transitions set a "dirty" event; one task waits for it, then writes the whole
    record, and lets at least ``window`` pass before the next write. The window is
    MIN_WINDOW, or four times what the last write took when that is longer, and
    never more than MAX_WINDOW: so writing costs at most about a fifth of the
    event loop's time however fast instances start and exit, and the file is at
    most MAX_WINDOW plus one write behind. A group spawned in that window is
    covered by the guardian (the child registers with it before the program runs).
    """

    def __init__(self, manager: Manager) -> None:
        self._manager = manager
        self._dirty = anyio.Event()
        self._known: dict[int, ProcessIdentity] = {}  # pid -> identity, learnt when it started
        self._written: Path | None = None
        self._failing: str | None = None
        self._me = identity(os.getpid())
        self._boot = boot_id() or "unknown"
        self._pid_ns = pid_namespace()
        #: How many times the file was written (for tests and the benchmark).
        self.writes = 0
        self._wrote = anyio.Event()

    @property
    def path(self) -> Path:
        return Path(self._manager.manifest.state_dir) / RECORD_NAME

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe (before any instance starts), write once now, then after every burst."""
        async with self._manager.events.subscribe(buffer=65536) as events:
            self._dirty.set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listen, events)
                task_status.started()
                await self._write_bursts()

    async def next_write(self) -> None:
        """Return after the next successful write (what a test waits on, instead of polling the file)."""
        await self._wrote.wait()

    def remove(self) -> None:
        """At a clean exit, once every instance is stopped."""
        if self._written is not None:
            remove_record(self._written)

    async def _listen(self, events: Any) -> None:
        async for event in events:
            if isinstance(event, Transition):
                if event.to_state is State.STARTING:
                    if event.pid is not None:
                        self._learn(event.pid)
                    self._dirty.set()
                elif event.to_state in _EXIT_STATES:
                    self._dirty.set()
            elif isinstance(event, Dropped):
                self._dirty.set()  # the write looks at the instances themselves

    def adopt(self, found: Iterable[ProcessIdentity]) -> None:
        """After a re-exec: the groups the old service ran are ours, known as if just started.

        ``found``: the adopted children as the handover read them from /proc (``prepare_resume``
        checked each one's start time): read once, not again here.
        """
        me = os.getpid()
        for process in found:
            if process.ppid == me and process.sid == process.pid:
                self._known[process.pid] = process

    def start_ticks(self, pid: int) -> int | None:
        """The start time of our child ``pid``: as learnt when it started, else read now.

        Learnt while it was surely ours; an unreaped child keeps its pid, so it is still right.
        """
        known = self._known.get(pid)
        if known is None:
            found = identity(pid)
            return None if found is None else found.start
        return known.start

    def _learn(self, pid: int) -> None:
        """Read the start time while the process is surely ours: our child, not reaped yet."""
        found = identity(pid)
        if found is not None and found.ppid == os.getpid() and found.sid == pid:
            self._known[pid] = found

    async def _write_bursts(self) -> None:
        last = -math.inf
        cost = 0.0
        while True:
            await self._dirty.wait()
            window = min(MAX_WINDOW, max(MIN_WINDOW, 4 * cost))
            pause = last + window - time.monotonic()
            if pause > 0:
                await anyio.sleep(pause)  # a rate limit, not a synchronisation: the next burst joins in
            self._dirty = anyio.Event()
            began = time.monotonic()
            await self.write_now()
            last = time.monotonic()
            cost = last - began

    async def write_now(self) -> None:
        """Write what runs now (the instances' live pids); a failure is logged once, not raised."""
        record = self.snapshot()
        path = self.path
        # In the event loop (the service keeps one thread): 10,000 entries encode and write in
        # about 30 ms, and the window between writes keeps that under a fifth of the loop's time.
        try:
            _encode_and_write(path, record)
        except OSError as exc:
            problem = f"cannot write {path}: {exc.strerror or exc}"
            if problem != self._failing:
                log.warning(
                    "%s; a crash now would leave its instances' groups unknown to the next start", problem
                )
                self._failing = problem
            return
        self.writes += 1
        wrote, self._wrote = self._wrote, anyio.Event()
        wrote.set()
        if self._failing is not None:
            log.info("%s written again", path)
            self._failing = None
        if self._written is not None and self._written != path:  # the state folder changed in a reload
            remove_record(self._written)
        self._written = path

    def snapshot(self) -> Record:
        entries = []
        alive: dict[int, ProcessIdentity] = {}
        for name, instance in self._manager.instances.items():
            pid = instance.pid
            if pid is None:
                continue
            known = self._known.get(pid)
            if known is None:  # started before we subscribed, or an event we missed
                self._learn(pid)
                known = self._known.get(pid)
                if known is None:
                    continue
            alive[pid] = known
            stop = instance.config.stop
            entries.append(Entry(name, pid, pid, known.start, int(stop.signal), float(stop.timeout)))
        self._known = alive
        me = self._me
        return Record(
            service_pid=os.getpid(),
            service_start=me.start if me is not None else 0,
            boot_id=self._boot,
            written_at=time.time(),
            entries=tuple(entries),
            pid_ns=self._pid_ns,
        )
