"""Captured output: a pipe read into a rotating file, an in-memory tail and live followers.

A log pipe belongs to the instance, not to one run of it (ARCHITECTURE.md, decision 7):
the pipe's owner keeps the read end for the instance's whole life and hands each run a
fresh write end. So between runs the read end sees EOF, and a writer can come back
later. ``LogSink`` takes in what the pipe brings; it has no task of its own: one
``PipeReactor`` (reactor.py) waits on every sink's pipe at once and gives each ready
one a turn, ``read_turn``, synchronous code bounded by a budget. It is built for the
case where one chatty child writes as fast as it can, which shapes everything here:

* Bytes are read in large chunks and handled with bytes methods (``find``,
  ``rfind``, ``replace``, ``split``) that run at C speed; nothing loops over bytes in
  Python. Work per chunk is a handful of Python operations whatever the chunk holds.
* A turn writes everything it read before it reads more. When the disk is slower
  than the child, the pipe fills and the child waits: backpressure, nothing dropped.
* A follower (``supervisor logs -f``) can never slow the reading, nor hold the service's
  memory: each one has a queue bounded in bytes, and a follower that falls behind
  misses data and is told how much. The tail too is bounded by what it costs
  (``logtail.py``).

The file, its rotation, its folder and what it refuses to follow are ``logfile.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .logfile import LogFileError, RotatingFile
from .logtail import Follower, Tail
from .reactor import PipeReactor, Turn

__all__ = ["LogFileError", "LogSink"]

logger = logging.getLogger(__name__)

# One os.read asks for this much; a pipe hands over at most its capacity.
_READ_SIZE = 1024 * 1024
# Bytes read when draining without blocking at shutdown. A writer that keeps pace with
# the reader (a grandchild that outlived its parent, say) must not hold shutdown forever.
_DRAIN_LIMIT = 64 * _READ_SIZE
# Followers get whole lines; a "line" that grows past this without a newline is handed
# over in pieces rather than kept in memory without bound.
_MAX_CARRY = 4 * _READ_SIZE
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


# -- the sink ---------------------------------------------------------------------------------


class LogSink:
    """Reads one log pipe for the instance's whole life into a file, a tail and followers.

    ``attach(reactor)`` has the reactor read it; ``close()`` ends that (and drains the
    pipe). ``writer_attached()`` must be called each time a new write end is handed to
    a child, in the same synchronous stretch of code that opens that write end (no
    ``await`` in between): after an EOF, the reactor watches the pipe again from then.

    The sink does not own ``read_fd``: its owner closes it, after ``close()``. Like
    everything in the core, it is used from the event loop's thread only.

    ``open()`` opens the file (and creates its folder) up front and raises
    ``LogFileError`` when it cannot: the instance calls it before each spawn, so a log
    that cannot be written fails that instance with the reason, not the service. A
    turn never raises for the file: from then on, trouble with it is counted in
    ``bytes_lost`` and said in ``write_error``, and ``on_loss_change(sink)`` is called
    when a streak of losses starts and when it ends (it must be quick, and not raise).

    ``state_dir``: the service's state folder. Where the file's folder is in it and has to be
    made again (deleted under the running service, the state folder with it), the state folder
    is made again as private as the service's start made it (``logfile.open_folder``), not with
    the umask's mode.
    """

    # Two per instance: no __dict__ each.
    __slots__ = (
        "_at_line_start", "_carry", "_carry_size", "_closed", "_file", "_follower_bytes", "_followers",
        "_initial_pipe_size", "_on_loss_change", "_pipe_size", "_reactor", "_read_fd", "_tail",
        "_tail_bytes", "_tail_in_file", "_timestamps", "reads",
    )

    def __init__(
        self,
        read_fd: int,
        path: Path,
        *,
        max_bytes: int = 50 * 1024**2,
        backups: int = 5,
        timestamps: bool = False,
        tail_bytes: int = 256 * 1024,
        follower_bytes: int = 1024 * 1024,
        on_loss_change: Callable[[LogSink], None] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self._read_fd = read_fd
        try:
            self._pipe_size = self._initial_pipe_size = fcntl.fcntl(read_fd, _F_GETPIPE_SZ)
        except OSError:  # not a pipe (a test's file, say): nothing to grow
            self._pipe_size = self._initial_pipe_size = _BIG_PIPE
        self._on_loss_change = on_loss_change
        hook = None if on_loss_change is None else self._loss_changed
        self._file = RotatingFile(Path(path), max_bytes, backups, on_change=hook, state_dir=state_dir)
        self._timestamps = timestamps
        self._tail = Tail(tail_bytes)
        self._tail_bytes = tail_bytes
        # After a re-exec, the tail is read back from the file at the first tail() (see adopt).
        self._tail_in_file = False
        self._follower_bytes = follower_bytes
        self._followers: list[Follower] = []
        # The line in progress (bytes since the last newline), so followers get whole lines.
        self._carry: list[bytes] = []
        self._carry_size = 0
        # The last byte read is a newline (or nothing was read yet): the next byte starts a line.
        self._at_line_start = True
        self._reactor: PipeReactor | None = None
        self._closed = False
        #: os.read calls that returned data or EOF: lets tests and benchmarks see the
        #: reactor leave the pipe alone at EOF instead of spinning.
        self.reads = 0

    def _loss_changed(self) -> None:
        assert self._on_loss_change is not None
        self._on_loss_change(self)

    @property
    def path(self) -> Path:
        return self._file.path

    @property
    def bytes_written(self) -> int:
        """Bytes written to the file(s) since the sink was made, timestamps included."""
        return self._file.bytes_written

    @property
    def bytes_lost(self) -> int:
        """Bytes the file could not take (disk errors, a refused path), exactly, timestamps included.

        The tail and the followers got them all the same.
        """
        return self._file.bytes_lost

    @property
    def write_error(self) -> str | None:
        """Why output is being dropped right now (names the file); None while writing works."""
        return self._file.write_error

    def open(self) -> None:
        """Open the file, creating its folder, if not open yet.

        Raises ``LogFileError`` (with a message naming the path and the reason) when the
        folder cannot be created or opened, or the file is a symlink, not a regular
        file, or cannot be opened. Call it from the event loop's thread, as the rest.
        """
        if not self._closed:
            self._file.open()

    def create_ahead(self) -> None:
        """Create the file (and its folder) now, and let go of its descriptor again.

        For an instance that waits for its dependencies: its spawn's ``open`` then finds the
        file there. Creating a file is a change to its folder, which the filesystem records
        (85 to 450 µs on the ext4 of the machine in docs/performance.md, against 4 µs to open
        a file that is there), and the spawns of a level of a dependency graph run one after
        another in the event loop. A failure is the spawn's to report, with its reason.
        """
        if self._closed or self._file.is_open:
            return
        try:
            self._file.open()
        except LogFileError:
            return
        self._file.idle()

    # -- reading (the reactor calls read_turn) -------------------------------------------

    def attach(self, reactor: PipeReactor) -> None:
        """Have ``reactor`` read the pipe from now on, until ``close()``.

        The file is not opened here: a spawn opens it (``open()``, whose failure fails that
        start), and so does the first write after a re-exec. An instance never started, or an
        adopted one with nothing to say, holds no descriptor for it: 2,000 opens fewer in the
        handover of 1,000 quiet instances. Does nothing for a sink closed already: an instance
        closed before it ran has nothing left to read.
        """
        if self._closed:
            return
        if self._reactor is not None:
            raise RuntimeError(f"log sink for {self.path} is read already")
        self._reactor = reactor
        reactor.watch(self._read_fd, self)  # at EOF for now (no writer yet), its first turn says so

    def writer_attached(self) -> None:
        """A new writer holds the pipe: after an EOF, the reactor reads it again."""
        if self._reactor is not None and not self._closed and self._read_fd >= 0:
            self._reactor.watch(self._read_fd, self)

    def read_turn(self, budget: int) -> tuple[Turn, int]:
        """The reactor's call when the pipe is readable: take in up to ``budget`` bytes.

        At EOF the file is let go of (no run writes: no descriptor held until the next
        one does), and the reactor stops watching the pipe until ``writer_attached()``.
        A read end closed under the sink counts as EOF; ``close()`` says the rest.
        """
        try:
            outcome, taken = self._read(budget)
        except OSError as exc:  # EBADF: its owner closed the read end without close()
            logger.warning("log pipe for %s: cannot be read any more: %s", self.path, exc)
            # Its number may come back for another file (a socket, another pipe): never touched again.
            self._read_fd = -1
            return Turn.EOF, 0
        if outcome is Turn.EOF:
            self._file.idle()
        return outcome, taken

    def _read(self, budget: int) -> tuple[Turn, int]:
        """Read and take in chunks until the pipe is empty or at EOF, or ``budget`` is spent.

        Returns what it found and how many bytes it read.
        """
        taken = 0
        while taken < budget:
            try:
                data = os.read(self._read_fd, min(budget - taken, _READ_SIZE))
            except BlockingIOError:
                return Turn.EMPTY, taken
            self.reads += 1
            if not data:
                return Turn.EOF, taken
            taken += len(data)
            if taken >= self._pipe_size:  # it refills as fast as we read: the child waits on us
                self._pipe_size = _PIPE_GROWTH.grow(self._read_fd, self._pipe_size)
            self._take(data)
        return Turn.MORE, taken

    def _drain(self) -> None:
        """Take in what the pipe holds without waiting: bytes a child wrote are not lost at stop."""
        if self._read_fd < 0:
            return
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
        if self._tail_in_file:
            self._tail_in_file = False
            self._tail_from_file()
        return self._tail.lines(n)

    # -- the handoff (re-exec) ------------------------------------------------------------

    def handoff_state(self) -> dict[str, object]:
        """What a re-exec'd service needs to go on where this sink stopped (the pipe keeps the rest)."""
        return {"at_line_start": self._at_line_start}

    def adopt(self, state: dict[str, object]) -> None:
        """Go on from ``handoff_state``: timestamps stay one per line; the tail comes from the file.

        The file already holds everything the old tail held; it is read back lazily, at
        the first ``tail()``, so that adopting 1,000 sinks reads no file at all.
        """
        self._at_line_start = bool(state["at_line_start"])
        self._tail_in_file = True
        self._file.leftovers_removed = True

    def _tail_from_file(self) -> None:
        tail = Tail(self._tail_bytes)
        try:
            with open(self.path, "rb") as file:
                size = file.seek(0, os.SEEK_END)
                file.seek(max(0, size - self._tail_bytes - 1))
                tail.append(file.read(self._tail_bytes + 1))
        except OSError:  # gone or unreadable: the tail holds what arrived since the adoption
            return
        self._tail = tail  # the file has what arrived since the adoption too: written as it came

    @contextlib.asynccontextmanager
    async def follow(self) -> AsyncIterator[AsyncIterator[bytes]]:
        """Subscribe to what arrives from now on, as chunks of whole lines.

        The iterator ends when the sink is closed. Leaving the context unsubscribes.
        """
        follower = Follower(self._follower_bytes)
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

    def close(self) -> None:
        """Stop reading, take in what is left in the pipe, hand followers the rest, close the file.

        Call it before the pipe's owner closes ``read_fd``: the last drain here catches
        what a child wrote between the reactor's last turn and its own death.
        """
        if self._closed:
            return
        self._closed = True
        if self._reactor is not None:
            self._reactor.unwatch(self._read_fd)
        self._drain()
        _PIPE_GROWTH.give_back(self._pipe_size - self._initial_pipe_size)
        if self._carry:
            line = b"".join(self._carry)
            self._carry.clear()
            self._carry_size = 0
            for follower in self._followers:
                follower.offer(line)
        for follower in self._followers:
            follower.close()
        self._file.close()
