"""Captured output: a pipe read into a rotating file, an in-memory tail and live followers.

A log pipe belongs to the instance, not to one run of it (ARCHITECTURE.md, decision 7):
the pipe's owner keeps the read end for the instance's whole life and hands each run a
fresh write end. So between runs the read end sees EOF, and a writer can come back
later. ``LogSink`` is the reader. It is built for the case where one chatty child
writes as fast as it can, which shapes everything here:

* Bytes are read in large chunks and handled with bytes methods (``find``,
  ``rfind``, ``replace``, ``split``) that run at C speed; nothing loops over bytes in
  Python. Work per chunk is a handful of Python operations whatever the chunk holds.
* The loop writes everything it read before it reads more. When the disk is slower
  than the child, the pipe fills and the child waits: backpressure, nothing dropped.
* A follower (``supervisor logs -f``) can never slow the loop: each one has a bounded
  queue, and a follower that falls behind misses data and is told how much.

The file is written with ``os.write`` on an ``O_APPEND`` descriptor: no user-space
buffer, so there is nothing to lose on a crash of the service and nothing to flush.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from glob import escape as glob_escape
from pathlib import Path

import anyio
import anyio.lowlevel
from anyio.lowlevel import RunVar

__all__ = ["LogSink"]

logger = logging.getLogger(__name__)

# One os.read asks for this much; a pipe hands over at most its capacity.
_READ_SIZE = 1024 * 1024
# Bytes one sink reads in one turn on the event loop, and how many sinks may read in one
# round of the loop (see _read_turn).
_TURN_BUDGET = 512 * 1024
_SINKS_PER_ROUND = 4
# Bytes read when draining without blocking at shutdown. A writer that keeps pace with
# the reader (a grandchild that outlived its parent, say) must not hold shutdown forever.
_DRAIN_LIMIT = 64 * _READ_SIZE
# Followers get whole lines; a "line" that grows past this without a newline is handed
# over in pieces rather than kept in memory without bound.
_MAX_CARRY = 4 * _READ_SIZE
# New files are not world-readable: captured output often holds secrets.
_FILE_MODE = 0o640
# What a chatty child's pipe grows to (see _PipeGrowth).
_BIG_PIPE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class _PipeGrowth:
    """Bigger pipe buffers for the children that fill theirs, within a budget.

    A pipe starts at the kernel's default (64 KiB). When the sink reads a whole pipe's
    worth in one go, the child refills it as fast as it is drained and waits on it: the
    sink grows it to ``_BIG_PIPE``, so that child wakes the service (and waits) far
    less often; one chatty child is then captured at
    about 0.9 of the speed of a direct write instead of 0.75 (bench/logs.py). Quiet
    children keep the small default.

    The budget bounds what full pipes may hold in kernel memory. And Linux caps the
    pipe buffers one unprivileged user holds (``fs.pipe-user-pages-soft``, 64 MiB by
    default); past that cap every *new* pipe gets 8 KiB, so an unprivileged service
    grows pipes by no more than a quarter of it. A sink gives its share back when it
    closes.
    """

    def __init__(self) -> None:
        self.used = 0

    @property
    def limit(self) -> int:
        return (256 if os.geteuid() == 0 else 16) * 1024 * 1024

    def grow(self, fd: int, current: int) -> int:
        """Grow the pipe at ``fd`` to ``_BIG_PIPE`` if the budget allows; its size now."""
        extra = _BIG_PIPE - current
        if extra <= 0 or self.used + extra > self.limit:
            return current
        try:
            size = fcntl.fcntl(fd, _F_SETPIPE_SZ, _BIG_PIPE)
        except OSError:  # a kernel limit or the user's quota: it stays as it is
            return current
        self.used += size - current
        return size

    def give_back(self, amount: int) -> None:
        self.used -= amount


_PIPE_GROWTH = _PipeGrowth()



# -- timestamps -------------------------------------------------------------------------------


def _utc_stamp() -> bytes:
    """``2026-11-28T19:40:01.123Z `` for now: UTC, so files from hosts in any zone sort alike."""
    now = time.time()
    seconds = int(now)
    clock = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode()
    return b"%s.%03dZ " % (clock, int((now - seconds) * 1000))


def _stamp_lines(data: bytes, stamp: bytes, at_line_start: bool) -> bytes:
    """Prefix every line that starts in ``data`` with ``stamp``.

    Whether the first byte starts a line is state carried over from the previous chunk,
    so a line split across two reads gets one prefix, not two. A newline that ends the
    chunk starts a line that has no bytes yet: it is left for the next chunk to stamp
    (``replace`` with a count stops short of it), so the stamp is the time the line's
    first byte arrived.
    """
    newlines = data.count(b"\n")
    if data.endswith(b"\n"):
        newlines -= 1
    body = data.replace(b"\n", b"\n" + stamp, newlines) if newlines else data
    return stamp + body if at_line_start else body


# Turns to read, shared by every sink of one event loop (a RunVar: tests run several loops).
_TURNS: RunVar[anyio.Semaphore] = RunVar("supervisor.logs.turns")


@contextlib.asynccontextmanager
async def _read_turn() -> AsyncIterator[None]:
    """A turn to read, held across one round of the event loop.

    Every ready task runs once per round of the loop, and a control request needs a few
    rounds to be answered. With a hundred chatty children, a round that let every sink
    read its fill would take tens of milliseconds, so `supervisor status` would take
    half a second. Instead at most ``_SINKS_PER_ROUND`` sinks read in one round; the
    others wait their turn, first come first served, off the loop's ready queue. The
    children meanwhile wait on their full pipes: backpressure, nothing is dropped.
    """
    try:
        turns = _TURNS.get()
    except LookupError:
        turns = anyio.Semaphore(_SINKS_PER_ROUND)
        _TURNS.set(turns)
    try:
        turns.acquire_nowait()  # no extra round when a turn is free (and nobody queues)
    except anyio.WouldBlock:
        await turns.acquire()
    try:
        yield
    finally:
        turns.release()


# -- dropped files --------------------------------------------------------------------------


class _Reclaimer:
    """Unlinks dropped log files on one background thread, shared by every sink.

    Unlinking a file frees its page cache there and then: about 15 ms for a 20 MB file
    just written. Done on the event loop at each rotation, that stalls every other
    instance's logs and the control API; with many chatty children it adds up to most
    of the loop's time. So a rotation only renames the doomed file out of the way (a
    cheap rename: its target is a fresh name) and hands it over here. One thread for
    the whole service, started on the first drop, is all this costs.

    A file handed over just before the service dies stays behind under its
    ``.dropped-…`` name; a sink removes such leftovers of its own when it starts.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._names = itertools.count()

    def doomed_name(self, path: Path) -> Path:
        """A fresh name beside ``path`` to rename a file to before it is dropped."""
        return path.with_name(f"{path.name}.dropped-{os.getpid()}-{next(self._names)}")

    def drop(self, path: Path) -> None:
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="log-reclaimer", daemon=True)
                self._thread.start()
        self._queue.put(path)

    def wait_idle(self) -> None:
        """Block until every file handed over so far is gone (at close: nothing left behind)."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def _work(self) -> None:
        while True:
            path = self._queue.get()
            try:
                path.unlink()
            except OSError as exc:
                logger.warning("cannot remove the dropped log file %s: %s", path, exc)
            with self._idle:
                self._pending -= 1
                if not self._pending:
                    self._idle.notify_all()


_RECLAIMER = _Reclaimer()


# -- the file -------------------------------------------------------------------------------


class _RotatingFile:
    """The file at ``path``, rotated by size at line boundaries.

    When a write would take the file past ``max_bytes``, the bytes up to the last
    newline that still fits go into the current file, the file is shifted to
    ``path.1`` (``path.1`` to ``path.2`` … and the oldest beyond ``backups`` dropped;
    with ``backups == 0`` the file is dropped and started anew), and the rest goes
    into a fresh file. So a line is never split across two files, and that wins over
    the size limit: a single line longer than ``max_bytes`` goes whole into one file,
    and a line that was already started in a file when its end arrives is finished in
    that file. Either way that file ends up larger than ``max_bytes``. A ``max_bytes``
    of 0 or less turns rotation off.

    Disk errors (full disk, a removed directory) must not take the instance down:
    they are logged once per streak, the bytes are counted in ``bytes_lost``, and the
    next write tries again.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = max(0, backups)
        self.bytes_written = 0
        self.bytes_lost = 0
        self._fd: int | None = None
        self._size = 0
        # The last byte written is not a newline: a line is in progress in this file.
        self._mid_line = False
        self._failing = False
        self._rotation_failing = False

    def open(self) -> None:
        if self._fd is None:
            self._remove_leftovers()
            self._open()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _remove_leftovers(self) -> None:
        """Files dropped by a service that died before its reclaimer removed them."""
        try:
            leftovers = list(self.path.parent.glob(f"{glob_escape(self.path.name)}*.dropped-*"))
        except OSError:
            return
        for leftover in leftovers:
            _RECLAIMER.drop(leftover)

    def reopen(self) -> None:
        """Let go of a file an external tool moved away, and start a new one at ``path``."""
        self.close()
        self._open()

    def write(self, data: bytes) -> None:
        limit = self.max_bytes
        view = memoryview(data)
        if limit <= 0:
            self._emit(view)
            return
        pos, end = 0, len(data)
        rotated = False  # just rotated for the line at pos
        while pos < end:
            room = limit - self._size
            if end - pos <= room:
                self._emit(view[pos:])
                return
            cut = data.rfind(b"\n", pos, pos + room) if room > 0 else -1
            if cut >= 0:
                stop = cut + 1  # what fits; the next pass rotates
            elif self._mid_line or self._size == 0 or rotated:
                # Finish the line in progress, or write whole a line that no file can take
                # (longer than max_bytes, or the file could not be moved away).
                newline = data.find(b"\n", pos)
                stop = end if newline < 0 else newline + 1
            else:
                self._rotate()
                rotated = True
                continue
            self._emit(view[pos:stop])
            pos = stop
            rotated = False

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, _FILE_MODE)
        except OSError as exc:
            self._size = 0
            self._failed(exc)
            return
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _rotate(self) -> None:
        """Shift the backups up by one and start a new file.

        The file that falls off the end is renamed away first and unlinked by the
        reclaimer's thread, so every rename here has a free target: replacing a file
        (by rename or truncation) would free the old one on the event loop.
        """
        self.close()
        try:
            oldest = self._backup(self.backups) if self.backups else self.path
            doomed = _RECLAIMER.doomed_name(oldest)
            try:
                os.rename(oldest, doomed)
            except FileNotFoundError:
                pass
            else:
                _RECLAIMER.drop(doomed)
            for index in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._backup(index), self._backup(index + 1))
            if self.backups:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path, self._backup(1))
        except OSError as exc:
            # The old file stays where it is and keeps growing; the next write tries again.
            if not self._rotation_failing:
                self._rotation_failing = True
                logger.error("log file %s: cannot rotate: %s", self.path, exc)
        else:
            self._rotation_failing = False
        self._open()

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _emit(self, view: memoryview) -> None:
        """Write all of ``view``: ``os.write`` may take only part of it."""
        self._mid_line = view[-1] != ord("\n")
        if self._fd is None:
            self._open()
            if self._fd is None:
                self.bytes_lost += len(view)
                return
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                self.bytes_lost += len(view)
                self._failed(exc)
                return
            view = view[written:]
            self._size += written
            self.bytes_written += written
        if self._failing:
            self._failing = False
            logger.warning("log file %s: writing again (%d bytes lost so far)", self.path, self.bytes_lost)

    def _failed(self, exc: OSError) -> None:
        if not self._failing:
            self._failing = True
            logger.error("log file %s: %s; output is dropped until writing works again", self.path, exc)


# -- the tail ---------------------------------------------------------------------------------


class _Tail:
    """The last ``limit`` bytes as written, as the chunks they came in.

    Appending is O(1) per chunk; splitting into lines waits until someone asks, which
    is rare next to how often chunks arrive.
    """

    def __init__(self, limit: int) -> None:
        self._limit = max(0, limit)
        self._chunks: deque[bytes] = deque()
        self._size = 0
        # The kept bytes begin a line (nothing trimmed yet, or trimmed right after a newline).
        self._starts_line = True

    def append(self, data: bytes) -> None:
        if not self._limit:
            return
        self._chunks.append(data)
        self._size += len(data)
        excess = self._size - self._limit
        while excess > 0:
            first = self._chunks[0]
            if len(first) <= excess:
                self._chunks.popleft()
                self._starts_line = first.endswith(b"\n")
                cut = len(first)
            else:
                self._chunks[0] = first[excess:]
                self._starts_line = first[excess - 1] == ord("\n")
                cut = excess
            self._size -= cut
            excess -= cut

    def lines(self, n: int) -> list[bytes]:
        """The last ``n`` lines, without newlines; a line cut off by trimming is left out."""
        if n <= 0 or not self._size:
            return []
        data = b"".join(self._chunks)
        if data.endswith(b"\n"):
            data = data[:-1]
        lines = data.rsplit(b"\n", n)
        if len(lines) > n or not self._starts_line:
            del lines[0]
        return lines


# -- followers --------------------------------------------------------------------------------


def _dropped_marker(count: int) -> bytes:
    return b"[supervisor] follower too slow: %d bytes dropped\n" % count


class _Follower:
    """One subscriber's bounded queue of whole-line chunks.

    ``offer`` never waits: a full queue means the follower misses the chunk, and the
    bytes are counted. Once it has read everything it had before the gap, it first
    gets a marker line saying how much it missed, then live data again. Until then
    new chunks are dropped too: a follower just a little slower than the child gets
    one marker per gap, not a marker after every other line.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._queue: deque[bytes] = deque()
        self._dropped = 0
        self._closed = False
        self._wakeup: anyio.Event | None = None

    def offer(self, chunk: bytes) -> None:
        if (self._dropped and self._queue) or len(self._queue) >= self._capacity:
            self._dropped += len(chunk)
            return
        if self._dropped:
            self._queue.append(_dropped_marker(self._dropped))
            self._dropped = 0
        self._queue.append(chunk)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def __aiter__(self) -> _Follower:
        return self

    async def __anext__(self) -> bytes:
        # A checkpoint even when data is ready: a follower that never waits must still
        # let the read loop (and everything else) run. Taken before popping, so a
        # cancellation here loses nothing.
        await anyio.lowlevel.checkpoint()
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._dropped:
                # The gap is the last thing that happened: say so now, not at the next line.
                count, self._dropped = self._dropped, 0
                return _dropped_marker(count)
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()


# -- the sink ---------------------------------------------------------------------------------


class _ReadOutcome(enum.Enum):
    EMPTY = "the pipe is empty and a writer holds it open: wait until it is readable"
    EOF = "no writer for now: wait for writer_attached()"
    BUDGET = "read enough for one wakeup: let others run, then read on"


class LogSink:
    """Reads one log pipe for the instance's whole life into a file, a tail and followers.

    ``run()`` is the loop; the instance runs it in its task group and cancels it on
    close. ``writer_attached()`` must be called each time a new write end is handed to
    a child, in the same synchronous stretch of code that opens that write end (no
    ``await`` in between), so the loop cannot see the pipe between the two.

    The sink does not own ``read_fd``: its owner closes it, after ``aclose()``. Like
    everything in the core, it is used from the event loop's thread only.
    """

    def __init__(
        self,
        read_fd: int,
        path: Path,
        *,
        max_bytes: int = 50 * 1024**2,
        backups: int = 5,
        timestamps: bool = False,
        tail_bytes: int = 256 * 1024,
        follower_buffer: int = 1024,
    ) -> None:
        self._read_fd = read_fd
        try:
            self._pipe_size = self._initial_pipe_size = fcntl.fcntl(read_fd, _F_GETPIPE_SZ)
        except OSError:  # not a pipe (a test's file, say): nothing to grow
            self._pipe_size = self._initial_pipe_size = _BIG_PIPE
        self._file = _RotatingFile(Path(path), max_bytes, backups)
        self._timestamps = timestamps
        self._tail = _Tail(tail_bytes)
        self._follower_buffer = follower_buffer
        self._followers: list[_Follower] = []
        # The line in progress (bytes since the last newline), so followers get whole lines.
        self._carry: list[bytes] = []
        self._carry_size = 0
        # The last byte read is a newline (or nothing was read yet): the next byte starts a line.
        self._at_line_start = True
        # Counts writer_attached() calls: after an EOF, the loop waits for it to move.
        self._generation = 0
        self._generation_moved: anyio.Event | None = None
        self._run_scope: anyio.CancelScope | None = None
        self._run_done: anyio.Event | None = None
        self._closed = False
        #: os.read calls that returned data or EOF: lets tests and benchmarks see the
        #: loop idle at EOF instead of spinning.
        self.reads = 0

    @property
    def path(self) -> Path:
        return self._file.path

    @property
    def bytes_written(self) -> int:
        """Bytes written to the file(s) since the sink was made, timestamps included."""
        return self._file.bytes_written

    @property
    def bytes_lost(self) -> int:
        """Bytes the file could not take (disk errors); tail and followers still got them."""
        return self._file.bytes_lost

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Read until cancelled; on the way out, take in what is still in the pipe.

        Returns at once if the sink is closed already: a task started just before
        ``aclose()`` has nothing left to do.
        """
        if self._closed:
            return
        if self._run_scope is not None:
            raise RuntimeError(f"log sink for {self.path} is already running")
        self._file.open()
        done = self._run_done = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                self._run_scope = scope
                await self._read_loop()
        finally:
            self._run_scope = None
            self._drain()
            done.set()

    def writer_attached(self) -> None:
        """A new writer holds the pipe: after an EOF, the loop may read again."""
        self._generation += 1
        if self._generation_moved is not None:
            self._generation_moved.set()
            self._generation_moved = None

    async def _read_loop(self) -> None:
        while True:
            generation = self._generation
            async with _read_turn():
                outcome = self._read(_TURN_BUDGET)
                if outcome is _ReadOutcome.BUDGET:
                    await anyio.lowlevel.checkpoint()  # the rest of the round belongs to others
            if outcome is _ReadOutcome.EMPTY:
                await anyio.wait_readable(self._read_fd)
            elif outcome is _ReadOutcome.EOF:
                # A pipe with no writer is always readable: waiting for that would spin.
                while self._generation == generation:
                    moved = self._generation_moved = anyio.Event()
                    await moved.wait()

    def _read(self, budget: int) -> _ReadOutcome:
        """Read and take in chunks until the pipe is empty or at EOF, or ``budget`` is spent."""
        taken = 0
        while budget > 0:
            try:
                data = os.read(self._read_fd, min(budget, _READ_SIZE))
            except BlockingIOError:
                return _ReadOutcome.EMPTY
            self.reads += 1
            if not data:
                return _ReadOutcome.EOF
            taken += len(data)
            if taken >= self._pipe_size:  # it refills as fast as we read: the child waits on us
                self._pipe_size = _PIPE_GROWTH.grow(self._read_fd, self._pipe_size)
            self._take(data)
            budget -= len(data)
        return _ReadOutcome.BUDGET

    def _drain(self) -> None:
        """Take in what the pipe holds without waiting: bytes a child wrote are not lost at stop."""
        try:
            self._read(_DRAIN_LIMIT)
        except OSError as exc:  # the owner closed the pipe already
            logger.debug("log pipe for %s: not drained: %s", self.path, exc)

    def _take(self, data: bytes) -> None:
        if self._timestamps:
            data = _stamp_lines(data, _utc_stamp(), self._at_line_start)
        self._at_line_start = data.endswith(b"\n")
        self._file.write(data)
        self._tail.append(data)
        self._publish(data)

    def _publish(self, data: bytes) -> None:
        """Hand followers the lines that ``data`` completes; keep the unfinished one.

        The unfinished line is kept even with no follower (it is usually short), so a
        follower that subscribes mid-line still gets that line whole.
        """
        complete = data.rfind(b"\n") + 1
        if not complete:
            self._carry.append(data)
            self._carry_size += len(data)
            if self._carry_size < _MAX_CARRY:
                return
            lines = self._carry  # too long a line: followers get it in pieces
            self._carry, self._carry_size = [], 0
        else:
            rest = data[complete:]
            lines = self._carry
            if self._followers:
                lines.append(data[:complete] if rest else data)
            self._carry, self._carry_size = ([rest], len(rest)) if rest else ([], 0)
        if self._followers:
            chunk = lines[0] if len(lines) == 1 else b"".join(lines)
            for follower in self._followers:
                follower.offer(chunk)

    # -- what others ask for --------------------------------------------------------------

    def tail(self, n: int) -> list[bytes]:
        """The last ``n`` lines, as written to the file (timestamps included), without newlines.

        A last line without a newline counts. At most ``tail_bytes`` are kept, so fewer
        lines come back when they are long; a line only partly kept is left out.
        """
        return self._tail.lines(n)

    @contextlib.asynccontextmanager
    async def follow(self) -> AsyncIterator[AsyncIterator[bytes]]:
        """Subscribe to what arrives from now on, as chunks of whole lines.

        The iterator ends when the sink is closed. Leaving the context unsubscribes.
        """
        follower = _Follower(self._follower_buffer)
        if self._closed:
            follower.close()
        self._followers.append(follower)
        try:
            yield follower
        finally:
            self._followers.remove(follower)

    def reopen(self) -> None:
        """Start a new file at ``path`` (after logrotate or ``logs --reopen`` moved it away)."""
        if not self._closed:
            self._file.reopen()

    async def aclose(self) -> None:
        """Stop ``run()`` if it still runs, take in what is left in the pipe, close the file.

        Call it before the pipe's owner closes ``read_fd``: the last drain here catches
        what a child wrote between the loop's end and its own death.
        """
        with anyio.CancelScope(shield=True):
            if self._run_scope is not None and self._run_done is not None:
                self._run_scope.cancel()
                await self._run_done.wait()
        if self._closed:
            return
        self._closed = True
        self._drain()
        _PIPE_GROWTH.give_back(self._pipe_size - self._initial_pipe_size)
        _RECLAIMER.wait_idle()  # rotated-out files are gone before the sink is
        if self._carry:
            line = b"".join(self._carry)
            self._carry.clear()
            self._carry_size = 0
            for follower in self._followers:
                follower.offer(line)
        for follower in self._followers:
            follower.close()
        self._file.close()
