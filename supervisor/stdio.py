"""The stdio mapping layer: a manifest's stream settings turned into file descriptors for one spawn.

Three decisions shape it (ARCHITECTURE.md, decisions 1–3):

* **Redirection happens in the child.** The service opens the child's fds, hands them to the
  spawn, and lets go of its own copies at once ("take" semantics). Two spawns at once would race
  if the service ``dup2``-ed over its own 0/1/2 to start a child; and a reader of a fifo or pipe
  only sees EOF when the *last* write end closes, so a copy kept by the service would keep a
  reader waiting forever after the child has gone.
* **The guard.** Where the service does redirect its own streams (``--log-file``, a detached
  start, tests), it first saves dups of the original 0/1/2, once per process, and a guard puts
  them back on exit, also when an exception passes through.
* **Path semantics.** An empty path, or a fifo or stdin file that does not exist, is *not set
  up* (stdin then reads ``/dev/null``, output goes to the instance's log); any other failure is a
  `StdioError` a person can act on. Nothing here may block the service's event loop, and every fd
  the service holds is close-on-exec, so that no child inherits another child's streams.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import logging
import os
import stat
import sys
import threading
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Self

from .config import StreamSpec

__all__ = [
    "LogPipe",
    "Stdio",
    "StdioError",
    "StdioStream",
    "TakenFds",
    "initial_stdio",
    "open_path",
    "restore_initial_stdio",
]

log = logging.getLogger("supervisor.stdio")

_NAMES = ("stdin", "stdout", "stderr")




class StdioError(Exception):
    """A stream could not be opened for a spawn; ``str()`` says which, where, and why.

    It is the reason of a failed start, shown in ``status`` and in events, so it names the
    instance, the stream and the path, and gives the OS's reason rather than a traceback.
    """

    def __init__(self, instance: str, stream: str, path: str, reason: str, what: str = "file") -> None:
        # Every field goes to Exception.__init__ so that the error survives pickling.
        super().__init__(instance, stream, path, reason, what)
        self.instance = instance
        self.stream = stream
        self.path = path
        self.reason = reason
        self.what = what

    def __str__(self) -> str:
        where = " ".join(part for part in (self.stream, self.what, self.path) if part)
        return f"instance {self.instance}: cannot open {where}: {self.reason}"


class _Box:
    """The fd shared by a stream and its clones, and how many of them still hold it."""

    __slots__ = ("fd", "holders")

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.holders = 1


class _ClosedOnExit(abc.ABC):
    """``with thing:`` closes it on the way out, whatever passes through."""

    __slots__ = ()

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class StdioStream(_ClosedOnExit):
    """One standard stream's file descriptor (or none), shareable by clones.

    Clones exist for ``2>&1``: stderr is the *same* fd as stdout, not a dup of it, so the child
    gets one open file description for both and the two interleave in write order. The fd is
    refcounted across clones: it is closed when the last holder lets go, and `take` moves it out
    for every holder at once, so the service can never close (or keep) a fd it has handed over.
    A stream belongs to one thread.
    """

    __slots__ = ("_box", "_closed", "number", "target")

    def __init__(self, number: int, fd: int | None = None, *, target: str = "") -> None:
        if number not in (0, 1, 2):
            raise ValueError(f"a standard stream number is 0, 1 or 2, not {number}")
        self.number = number
        self.target = target
        self._box = _Box(fd)
        self._closed = False

    @property
    def fd(self) -> int | None:
        """The fd; None once taken or closed (taken: in every clone)."""
        return None if self._closed else self._box.fd

    def clone(self, *, number: int | None = None, target: str | None = None) -> StdioStream:
        """Another holder of the same fd, for ``number`` (default: the same), e.g. stderr as stdout."""
        if self._closed:
            raise ValueError("cannot clone a closed stream")
        other = StdioStream.__new__(StdioStream)
        other.number = self.number if number is None else number
        if other.number not in (0, 1, 2):
            raise ValueError(f"a standard stream number is 0, 1 or 2, not {other.number}")
        other.target = self.target if target is None else target
        other._box = self._box
        other._closed = False
        self._box.holders += 1
        return other

    def shares_fd_with(self, other: StdioStream) -> bool:
        """Whether the two are clones of one another (the same fd, taken and closed together)."""
        return self._box is other._box

    def take(self) -> int | None:
        """Move the fd out: the caller owns it now and must close it; no holder has it any more.

        This is how the parent lets go of the child's fds right after a spawn (decision 1):
        once the spawn has dup2-ed them into the child, the caller closes what it took, and the
        service holds no write end of the child's pipe or fifo that would hide an EOF.
        """
        if self._closed:
            return None
        fd, self._box.fd = self._box.fd, None
        return fd

    def redirect(self) -> None:
        """Put this stream's fd on its standard number in this process (not close-on-exec there).

        The initial stdio is saved first, so that a guard can always put it back.
        """
        fd = self.fd
        if fd is None:
            raise ValueError(f"stream {self.number} has no fd to redirect (taken or closed)")
        initial_stdio()
        _flush_python_streams()
        if fd == self.number:
            os.set_inheritable(fd, True)
        else:
            os.dup2(fd, self.number, inheritable=True)

    def close(self) -> None:
        """This holder lets go; the fd is closed when the last holder does. Idempotent."""
        if self._closed:
            return
        self._closed = True
        box = self._box
        box.holders -= 1
        if box.holders == 0 and box.fd is not None:
            fd, box.fd = box.fd, None
            os.close(fd)

    def __repr__(self) -> str:
        return f"StdioStream({self.number}, fd={self.fd}, target={self.target!r})"


class LogPipe(_ClosedOnExit):
    """The pipe of a `log` stream. It belongs to the instance, not to one run (decision 7).

    The service keeps the read end for the instance's whole life; each run gets a fresh write end
    opened through ``/proc/self/fd/<read end>``. So the service never keeps a child's write end
    open after the spawn (the reader sees EOF when a run's processes are gone), and no line is
    lost between runs: the read end, with whatever is still buffered in it, survives a restart.
    The write end made with the pipe is closed at once for the same reason: a service-held
    writer would mean the reader never sees EOF.
    """

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            # Its buffer size is the reader's business: LogSink grows a chatty child's pipe.
            os.set_blocking(read_fd, False)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.read_fd = read_fd
        self._closed = False

    @classmethod
    def adopt(cls, read_fd: int) -> LogPipe:
        """The read end a re-exec'd service inherited (handoff): close-on-exec and non-blocking again."""
        os.set_inheritable(read_fd, False)
        os.set_blocking(read_fd, False)
        pipe = cls.__new__(cls)
        pipe.read_fd = read_fd
        pipe._closed = False
        return pipe

    @property
    def closed(self) -> bool:
        return self._closed

    def open_writer(self) -> int:
        """A new write end for one run: blocking (the child waits when the pipe is full), close-on-exec."""
        if self._closed:
            raise OSError(errno.EBADF, "the log pipe is closed")
        # A pipe opened by path is opened like a fifo: O_WRONLY does not block, a reader exists.
        return os.open(f"/proc/self/fd/{self.read_fd}", os.O_WRONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """Close the read end (after the sink reading it has finished). Idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self.read_fd)

    def __repr__(self) -> str:
        return f"LogPipe(read_fd={self.read_fd}{', closed' if self._closed else ''})"


class TakenFds(_ClosedOnExit):
    """The fds moved out of a `Stdio` for one spawn: pass them to the spawn, then close them.

    Closing right after the spawn is the point (decision 1): the child has its own copies, and
    the service must not keep a writer that would hide the child's EOF from a reader.
    """

    __slots__ = ("stderr", "stdin", "stdout")

    def __init__(self, stdin: int | None, stdout: int | None, stderr: int | None) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    def close(self) -> None:
        """Close each distinct fd once (a merged stderr is stdout's fd). Idempotent."""
        fds = {fd for fd in (self.stdin, self.stdout, self.stderr) if fd is not None}
        self.stdin = self.stdout = self.stderr = None
        for fd in fds:
            os.close(fd)

    def __repr__(self) -> str:
        return f"TakenFds(stdin={self.stdin}, stdout={self.stdout}, stderr={self.stderr})"


class Stdio(_ClosedOnExit):
    """The three standard streams of one spawn (or of the service itself)."""

    __slots__ = ("stderr", "stdin", "stdout")

    def __init__(self, stdin: StdioStream, stdout: StdioStream, stderr: StdioStream) -> None:
        for expected, stream in enumerate((stdin, stdout, stderr)):
            if stream.number != expected:
                raise ValueError(f"{_NAMES[expected]} must be a stream for {expected}, not {stream.number}")
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    @classmethod
    def from_config(
        cls,
        instance: str,
        stdin: StreamSpec,
        stdout: StreamSpec,
        stderr: StreamSpec,
        *,
        log_pipes: Mapping[str, LogPipe] | None = None,
    ) -> Stdio:
        """Open what the specs say, for one spawn: called before every run.

        Opening per run (rather than once) means a file removed or rotated by hand is created
        again at the next start, and ``mode: truncate`` empties it at every start. Should a later
        stream fail, those already opened are closed before the error goes up: a start that
        fails every few seconds for a night must not leak a fd each time.
        """
        opener = _Opener(instance, log_pipes or {})
        opened: list[StdioStream] = []
        try:
            opened.append(opener.open(0, stdin))
            opened.append(opener.open(1, stdout))
            if stderr.kind == "stdout":
                opened.append(opened[1].clone(number=2, target="stdout"))
            else:
                opened.append(opener.open(2, stderr))
        except BaseException:
            for stream in opened:
                stream.close()
            raise
        return cls(*opened)

    @classmethod
    def service(cls) -> Stdio:
        """The service's own 0/1/2 as streams: close-on-exec dups of what they are now.

        A stream the service runs without (closed) comes back with no fd.
        """
        streams = []
        for number in (0, 1, 2):
            try:
                fd: int | None = fcntl.fcntl(number, fcntl.F_DUPFD_CLOEXEC, 3)
            except OSError:
                fd = None
            streams.append(StdioStream(number, fd, target="inherit" if fd is not None else ""))
        return cls(*streams)

    def take(self) -> TakenFds:
        """Move all three fds out (see `StdioStream.take`); clones share one fd, taken once."""
        taken: list[int | None] = []
        streams = (self.stdin, self.stdout, self.stderr)
        for index, stream in enumerate(streams):
            earlier = next((i for i in range(index) if streams[i].shares_fd_with(stream)), None)
            taken.append(taken[earlier] if earlier is not None else stream.take())
        return TakenFds(*taken)

    def redirect(self) -> None:
        """Put each stream that has an fd on its number in this process (the initial stdio saved first)."""
        initial_stdio()
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream.fd is not None:
                stream.redirect()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Put the initial stdio (the service's original 0/1/2) back on exit, also on an exception.

        The initial stdio is saved on entry if it was not yet; it is the *original* streams that
        come back, not this object's, so nested or repeated redirections all unwind to the start.
        """
        initial_stdio()
        try:
            yield
        finally:
            restore_initial_stdio()

    def close(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            stream.close()

    def describe(self) -> dict[str, str]:
        """Where each stream goes, for status: ``{"stdin": "null", "stdout": "log", ...}``."""
        return {"stdin": self.stdin.target, "stdout": self.stdout.target, "stderr": self.stderr.target}

    def __repr__(self) -> str:
        return f"Stdio({self.stdin!r}, {self.stdout!r}, {self.stderr!r})"


# -- opening one stream ----------------------------------------------------------------------------


class _Opener:
    """Opens one instance's streams by the path semantics of decision 3."""

    def __init__(self, instance: str, log_pipes: Mapping[str, LogPipe]) -> None:
        self.instance = instance
        self.log_pipes = log_pipes

    def open(self, number: int, spec: StreamSpec) -> StdioStream:
        name = _NAMES[number]
        kind = spec.kind
        if kind == "null":
            return StdioStream(number, _open_null(number), target="null")
        if kind == "inherit":
            try:
                fd = fcntl.fcntl(number, fcntl.F_DUPFD_CLOEXEC, 3)
            except OSError:
                return self._not_set_up(number, f"the service's own {name} is closed")
            return StdioStream(number, fd, target="inherit")
        if kind == "log":
            if number == 0:
                raise StdioError(self.instance, name, "", "'log' is for stdout and stderr only", what="")
            pipe = self.log_pipes.get(name)
            if pipe is None:
                raise StdioError(self.instance, name, "", "no log pipe was made for it", what="log")
            return StdioStream(number, self._open_writer(name, pipe), target="log")
        if kind == "stdout":
            raise StdioError(self.instance, name, "", "'stdout' is for stderr only", what="")
        path: str = getattr(spec, "path", "") or ""
        if not path:
            return self._not_set_up(number, None)
        if kind == "fifo":
            return self._open_fifo(number, path)
        if kind == "file":
            if number == 0:
                return self._open_input_file(path)
            return self._open_output_file(number, path, getattr(spec, "mode", "append"))
        raise StdioError(self.instance, name, "", f"unknown stream kind {kind!r}", what="")

    def _open_fifo(self, number: int, path: str) -> StdioStream:
        """Open read-write, so that opening never waits for the other end.

        A fifo opened for reading alone blocks until a writer comes (and for writing alone until
        a reader comes, or fails with O_NONBLOCK): either would stall the event loop, or the
        start, on a process that may never appear. O_NONBLOCK is still asked for, in case the
        path is something else whose open would wait, then cleared: the child gets a blocking fd.
        """
        name = _NAMES[number]
        try:
            fd = open_path(path, os.O_RDWR)
        except FileNotFoundError:
            return self._not_set_up(number, f"{name} fifo {path} does not exist")
        except OSError as exc:
            raise StdioError(self.instance, name, path, _reason(exc), what="fifo") from None
        if not stat.S_ISFIFO(_fstat_mode(fd)):
            os.close(fd)
            raise StdioError(self.instance, name, path, "not a fifo (use a file for a regular file)", "fifo")
        return StdioStream(number, fd, target=f"fifo:{path}")

    def _open_input_file(self, path: str) -> StdioStream:
        try:
            fd = open_path(path, os.O_RDONLY)
        except FileNotFoundError:
            return self._not_set_up(0, f"stdin file {path} does not exist")
        except OSError as exc:
            raise StdioError(self.instance, "stdin", path, _reason(exc)) from None
        if stat.S_ISDIR(_fstat_mode(fd)):
            # Opening a directory read-only succeeds; the child would only fail at its first read.
            os.close(fd)
            raise StdioError(self.instance, "stdin", path, os.strerror(errno.EISDIR))
        return StdioStream(0, fd, target=f"file:{path}")

    def _open_output_file(self, number: int, path: str, mode: str) -> StdioStream:
        """Created when missing; appended to, or emptied first with ``mode: truncate``.

        O_APPEND is set in both modes: when two streams (or the service and an instance) write
        one file through separate opens, each write still lands at the end instead of
        overwriting the other's; and a file truncated by hand is not refilled from the old offset.
        """
        name = _NAMES[number]
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        if mode == "truncate":
            flags |= os.O_TRUNC
        try:
            fd = open_path(path, flags)
        except FileNotFoundError:
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                raise StdioError(self.instance, name, path, f"folder {parent} does not exist") from None
            raise StdioError(self.instance, name, path, os.strerror(errno.ENOENT)) from None
        except OSError as exc:
            raise StdioError(self.instance, name, path, _reason(exc)) from None
        return StdioStream(number, fd, target=f"file:{path} ({mode})")

    def _not_set_up(self, number: int, why: str | None) -> StdioStream:
        """What a stream that is not set up becomes: stdin /dev/null; output the log, else /dev/null."""
        name = _NAMES[number]
        pipe = self.log_pipes.get(name) if number else None
        if pipe is not None:
            stream = StdioStream(number, self._open_writer(name, pipe), target="log")
        else:
            stream = StdioStream(number, _open_null(number), target="null")
        if why is not None:
            instead = "reads /dev/null" if number == 0 else f"goes to {stream.target}"
            log.warning("instance %s: %s: %s %s instead", self.instance, why, name, instead)
        return stream

    def _open_writer(self, name: str, pipe: LogPipe) -> int:
        try:
            return pipe.open_writer()
        except OSError as exc:
            raise StdioError(self.instance, name, "", _reason(exc), what="log pipe") from None


def open_path(path: str, flags: int) -> int:
    """Open without blocking and without taking a controlling terminal; hand back a blocking fd.

    O_NONBLOCK guards the event loop when a path names a fifo without the other end (a `file`
    pointing at a fifo) or a device that waits on open; the flag is shared with the child
    through the open file description, so it is cleared before the fd is handed over.
    """
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK, 0o644)
    try:
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_null(number: int) -> int:
    return os.open(os.devnull, (os.O_RDONLY if number == 0 else os.O_WRONLY) | os.O_CLOEXEC)


def _fstat_mode(fd: int) -> int:
    try:
        return os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENXIO:
        # O_WRONLY|O_NONBLOCK on a fifo nobody reads: say what to do, not "No such device".
        return "a fifo with no reader (use {fifo: PATH} to open it read-write)"
    return exc.strerror or str(exc)


# -- the service's own stdio -----------------------------------------------------------------------

_initial: tuple[int, int, int] | None = None
_initial_lock = threading.Lock()


def initial_stdio() -> tuple[int, int, int]:
    """Close-on-exec dups of the original 0/1/2, taken on the first call and kept for the process.

    Saved once per process, on purpose: a second snapshot taken after a redirection would save
    the redirected streams, and the guard would then "restore" the log file instead of the
    terminal. Kept forever: they are three fds, and any later guard may need them. A stream the
    process started without (closed) is saved as /dev/null, so that restoring never leaves a
    hole at 0, 1 or 2 for the next open() to fall into.
    """
    global _initial
    with _initial_lock:
        if _initial is None:
            saved: list[int] = []
            try:
                for number in (0, 1, 2):
                    try:
                        saved.append(fcntl.fcntl(number, fcntl.F_DUPFD_CLOEXEC, 3))
                    except OSError:
                        null = _open_null(number)
                        try:
                            saved.append(fcntl.fcntl(null, fcntl.F_DUPFD_CLOEXEC, 3))
                        finally:
                            os.close(null)
            except BaseException:
                for fd in saved:
                    os.close(fd)
                raise
            _initial = (saved[0], saved[1], saved[2])
        return _initial


def restore_initial_stdio() -> None:
    """Put the initial stdio back onto 0/1/2 (what the guard does on exit)."""
    saved = initial_stdio()
    _flush_python_streams()
    for number, fd in enumerate(saved):
        os.dup2(fd, number, inheritable=True)


def _flush_python_streams() -> None:
    """Write out what Python buffered for the old target before the fd under it changes."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
