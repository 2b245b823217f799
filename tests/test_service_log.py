"""The service's own log never blocks its event loop (supervisor/service_log.py).

A stderr nobody reads (``supervisor run 2>&1 | sleep 1000``) used to stop the service for good
once the pipe was full: no answers on the socket, no restarts, SIGTERM ignored. Here the pipe
is real and the test simply never reads it until it chooses to; "full" is the kernel's own
answer (``poll`` on a write end says no POLLOUT), never a sleep.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from supervisor.api.client import Client, ClientError

from .service_fixture import SUPERVISOR, answers, write_manifest

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DROPPED = "log lines dropped: stderr was not being read"


class Blocked(Exception):
    """A write the test guards took longer than the watchdog allows: it blocked."""


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block does not end in time: a blocking write
    is interrupted by the signal, and the handler's exception ends it (PEP 475)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise Blocked(f"still inside after {seconds}s: a write blocked")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def writable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLOUT for _, events in poller.poll(0))


def unread(fd: int) -> int:
    """Bytes waiting in the pipe whose read end is ``fd``."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def drain(fd: int) -> bytes:
    """Everything the pipe holds now (the read end is non-blocking)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def fd_flags(pid: int, fd: int) -> int:
    """The flags of ``pid``'s open file description at ``fd`` (a new open of /proc/PID/fd/N has its own)."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as info:
        return next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))


def logger_on(handler: logging.Handler, name: str) -> logging.Logger:
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger(f"test_service_log.{name}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A real pipe; the read end non-blocking, for the test's own draining."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


# -- the handler against a real pipe ---------------------------------------------------------------


def test_a_full_pipe_drops_whole_records_counts_them_and_says_so_once_read(pipe: tuple[int, int]) -> None:
    from supervisor.service_log import NonBlockingHandler

    read_fd, write_fd = pipe
    handler = NonBlockingHandler(write_fd)
    logger = logger_on(handler, "full")
    assert os.get_blocking(write_fd)  # the write end stays blocking: instances may share it
    written = 0
    with watchdog(10):
        while handler.dropped == 0:
            written += 1
            assert written < 100_000, "the pipe never filled"
            logger.info("line %d %s", written, "x" * 60)
        assert not writable(write_fd)  # the kernel agrees: the pipe is full
        for _ in range(9):
            logger.info("lost while full")
    assert handler.dropped == 10
    assert os.get_blocking(write_fd)

    kept = drain(read_fd).decode()
    with watchdog(10):
        logger.info("after the reader came back")
    after = drain(read_fd).decode()

    lines = kept.splitlines(keepends=True)
    assert all(line.endswith("x" * 60 + "\n") for line in lines)  # only whole records went out
    assert [int(line.split()[4]) for line in lines] == list(range(1, written))
    notice, last = after.splitlines()
    assert notice.endswith(f"WARNING 10 {DROPPED}")
    assert last.endswith("INFO after the reader came back")
    assert handler.dropped == 0


def test_a_record_longer_than_pipe_buf_goes_out_whole_or_the_rest_is_dropped(pipe: tuple[int, int]) -> None:
    from supervisor.service_log import PIPE_BUF, NonBlockingHandler

    read_fd, write_fd = pipe
    handler = NonBlockingHandler(write_fd)
    logger = logger_on(handler, "long")
    capacity = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
    with watchdog(10):
        logger.info("%s", "a" * (5 * PIPE_BUF))  # fits: goes out in pieces, all of it
        assert drain(read_fd).decode().endswith(" INFO " + "a" * (5 * PIPE_BUF) + "\n")
        logger.info("%s", "b" * (2 * capacity))  # does not fit: what the pipe takes, then dropped
    assert handler.dropped == 1
    cut = drain(read_fd).decode()
    assert "b" * (capacity - PIPE_BUF) in cut and not cut.endswith("\n")
    with watchdog(10):
        logger.info("next")
    notice, last = drain(read_fd).decode().split("\n", 1)[1].splitlines()
    assert notice.endswith(f"WARNING 1 {DROPPED}")  # on a line of its own, after the cut record
    assert last.endswith("INFO next")


def test_a_reader_that_went_away_costs_the_records_and_nothing_else(pipe: tuple[int, int]) -> None:
    from supervisor.service_log import NonBlockingHandler

    read_fd, write_fd = pipe
    os.close(read_fd)
    handler = NonBlockingHandler(write_fd)
    logger = logger_on(handler, "epipe")
    with pytest.raises(BrokenPipeError):  # SIGPIPE is ignored (Python's default): EPIPE
        os.write(write_fd, b"x")
    with watchdog(10):
        for _ in range(3):
            logger.info("nobody reads this")
    assert handler.dropped == 3


def test_a_regular_file_and_dev_null_always_take_the_log(tmp_path: Path) -> None:
    from supervisor.service_log import NonBlockingHandler

    path = tmp_path / "own.log"
    with open(path, "ab") as file, open(os.devnull, "wb") as null:
        for target, name in ((file, "file"), (null, "null")):
            handler = NonBlockingHandler(target.fileno())
            logger = logger_on(handler, name)
            for number in range(2000):
                logger.info("line %d %s", number, "y" * 100)
            assert handler.dropped == 0
    assert path.read_text().count("\n") == 2000


def test_a_terminal_paused_by_xoff_drops_then_reports() -> None:
    from supervisor.service_log import NonBlockingHandler

    main, side = pty.openpty()
    try:
        os.set_blocking(main, False)
        handler = NonBlockingHandler(side)
        logger = logger_on(handler, "tty")
        termios.tcflow(side, termios.TCOOFF)  # what Ctrl-S does
        with watchdog(10):
            for _ in range(5):
                logger.info("while paused")
        assert handler.dropped == 5
        termios.tcflow(side, termios.TCOON)  # Ctrl-Q
        with watchdog(10):
            logger.info("resumed")
        shown = b""
        deadline = time.monotonic() + 10
        while b"resumed" not in shown and time.monotonic() < deadline:
            select.select([main], [], [], 0.1)  # bounded wait for the terminal's output
            with contextlib.suppress(BlockingIOError):
                shown += os.read(main, 65536)
        text = shown.decode().replace("\r\n", "\n")
        assert f"WARNING 5 {DROPPED}\n" in text and text.rstrip().endswith("INFO resumed")
    finally:
        os.close(main)
        os.close(side)


# -- a real service whose stderr nobody reads --------------------------------------------------------

FLAPPING = """
version: 1
instances:
  flap:
    command: [sh, -c, "exit 0"]
    replicas: 3
    restart:
      policy: always
      min_uptime: 0s
      delay: 20ms
      max_restarts: 1000000
      backoff: {initial: 20ms, factor: 1, max: 20ms}
"""


#: The pipe's size while the test leaves it unread: two pages, not the default 64 KiB, which
#: the flapping instances' lines (about 13 KB a second) took 3.5 s to fill, in each of four
#: tests. Full is the same thing at any size (no free slot in the pipe's ring: no POLLOUT), and
#: what a blocking writer could still put into the last page is as small (< 4 KiB).
SMALL_PIPE = 2 * os.sysconf("SC_PAGE_SIZE")


class UnreadService:
    """``supervisor run`` with stdout and stderr on one pipe (``2>&1 | sleep 1000``) that the
    test reads only when it says so. The test keeps a write end of its own, only to ask the
    kernel whether the pipe is full."""

    def __init__(self, tmp_path: Path, backend: str) -> None:
        manifest = write_manifest(tmp_path, FLAPPING)
        self.socket = tmp_path / ".supervisor" / "control.sock"
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.proc = subprocess.Popen(
            [*SUPERVISOR, "run", "-f", str(manifest), "--backend", backend],
            stdin=subprocess.DEVNULL,
            stdout=self.write_fd,
            stderr=self.write_fd,
        )
        self.read = b""
        self.size = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)  # the kernel's default

    def client(self, timeout: float = 5) -> Client:
        return Client(self.socket, timeout=timeout)

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``done()``; between looks, a bounded wait on the service (which must not exit)."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {timeout}s")
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=0.05)
                raise AssertionError(f"the service exited with {code} before {what}")

    def wait_ready(self) -> None:
        # Reading meanwhile: the start must not be what fills the pipe.
        def ready() -> bool:
            self.read += drain(self.read_fd)
            return answers(self.client())

        self.wait_until(ready, 30, "an answer on the socket")

    def resize(self, size: int) -> bool:
        """Set the pipe's size; False while it holds more than ``size`` takes (EBUSY)."""
        try:
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            return False
        return True

    def wait_full(self) -> None:
        # Shrunk after the start (read meanwhile, as in wait_ready), once what it holds fits.
        def shrunk() -> bool:
            self.read += drain(self.read_fd)
            return self.resize(SMALL_PIPE)

        self.wait_until(shrunk, 10, "a smaller pipe")
        self.wait_until(lambda: not writable(self.write_fd), 60, "a full pipe")
        assert fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ) == SMALL_PIPE
        assert unread(self.read_fd) >= SMALL_PIPE // 2

    def restarts(self) -> int:
        began = time.monotonic()
        try:
            statuses = self.client(timeout=5).status(["flap"])
        except ClientError as exc:
            raise AssertionError(f"no answer from the service with its stderr full: {exc}") from None
        assert time.monotonic() - began < 5
        return sum(s["restarts"] for s in statuses)

    def stop(self, timeout: float) -> int:
        """SIGTERM, and the exit status (TimeoutExpired if it does not come)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def unread_service(tmp_path: Path) -> Iterator[Callable[[str], UnreadService]]:
    started: list[UnreadService] = []

    def start(backend: str) -> UnreadService:
        svc = UnreadService(tmp_path, backend)
        started.append(svc)
        svc.wait_ready()
        return svc

    yield start
    for svc in started:
        svc.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_full_stderr_holds_neither_the_api_nor_restarts_nor_sigterm(
    unread_service: Callable[[str], UnreadService], backend: str
) -> None:
    svc = unread_service(backend)
    svc.wait_full()
    before = svc.restarts()
    # Restarts go on while the pipe stays full, each logging a line or more (dropped). "Full" is no
    # free slot: a short blocking write still fits into what is left of the last page (< 4 KiB),
    # so 100 restarts, more than that room holds the lines of, are what a blocking writer cannot do.
    svc.wait_until(lambda: svc.restarts() > before + 100 and not writable(svc.write_fd), 30, "more restarts")
    assert not fd_flags(svc.proc.pid, 2) & os.O_NONBLOCK  # instances inherit it: left blocking
    began = time.monotonic()
    try:
        code = svc.stop(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("SIGTERM did not stop the service with its stderr full") from None
    assert code == 0
    assert time.monotonic() - began < 15
    assert not svc.socket.exists()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_once_stderr_is_read_again_the_service_says_how_many_lines_it_dropped(
    unread_service: Callable[[str], UnreadService], backend: str
) -> None:
    svc = unread_service(backend)
    svc.wait_full()
    before = svc.restarts()
    svc.wait_until(lambda: svc.restarts() > before + 100, 30, "restarts while the pipe is full")
    kept = b""
    # The reader comes back to a pipe of its default size again: a reader that keeps up (the
    # notice must come once) then has the room it had before, not two pages a stall could fill.
    assert svc.resize(svc.size)

    def told() -> bool:
        nonlocal kept
        kept += drain(svc.read_fd)  # the reader comes back, and keeps reading
        return DROPPED.encode() in kept

    svc.wait_until(told, 30, "the line saying lines were dropped")
    svc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    while svc.proc.poll() is None:  # still reading, as a reader that came back does
        assert time.monotonic() < deadline, "SIGTERM did not stop the service"
        told()
        with contextlib.suppress(subprocess.TimeoutExpired):
            svc.proc.wait(timeout=0.05)
    assert svc.proc.returncode == 0
    told()
    text = kept.decode(errors="replace")
    notice = next(line for line in text.splitlines() if DROPPED in line)
    assert int(notice.split(" WARNING ")[1].split()[0]) > 100
    assert text.count(DROPPED) == 1  # the reader kept up after that
    assert text.rstrip().endswith("stopped")


# -- --log-file on a fifo -------------------------------------------------------------------------


def test_a_log_file_fifo_is_refused_at_once_without_a_reader_and_blocking_with_one(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "version: 1\ninstances:\n  one: {command: [sleep, '300']}\n")
    fifo = tmp_path / "own.fifo"
    os.mkfifo(fifo)
    command = [*SUPERVISOR, "run", "-f", str(manifest), "--log-file", str(fifo)]
    try:
        run = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15, check=False
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("run waited forever to open a fifo nobody reads") from None
    assert run.returncode == 1
    assert f"cannot open the log file {fifo}: a fifo with no reader" in run.stderr
    assert not (tmp_path / ".supervisor" / "control.sock").exists()

    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        read = b""
        deadline = time.monotonic() + 30
        while b"one: starting -> running" not in read:
            assert time.monotonic() < deadline, read
            with contextlib.suppress(subprocess.TimeoutExpired):
                raise AssertionError(f"the service exited with {proc.wait(timeout=0.05)}: {read!r}")
            with contextlib.suppress(BlockingIOError):
                read += os.read(reader, 65536)
        # The flag that kept the open from waiting is cleared: instances that inherit it write blocking.
        assert not fd_flags(proc.pid, 2) & os.O_NONBLOCK
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(reader)
