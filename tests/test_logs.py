"""LogSink on real pipes and files.

Each test builds the pipe the way the stdio layer does: the test keeps the read end
(non-blocking) and opens a fresh write end per "run" through /proc/self/fd. A
``PipeReactor`` (reactor.py) reads the sinks, as the manager's does. Nothing here
sleeps: a test knows the sink has taken bytes in when a follower hands them over, or
because ``close()`` drains the pipe.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from supervisor import logs
from supervisor.logs import LogSink
from supervisor.reactor import PipeReactor

pytestmark = pytest.mark.anyio

STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


class Pipe:
    """A log pipe: one read end for the test's whole life, write ends opened and closed per run."""

    def __init__(self) -> None:
        self.read_fd, first = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        os.close(first)  # like the stdio layer between runs: no writer yet
        self._writers: set[int] = set()

    def open_writer(self, sink: LogSink) -> int:
        """Hand out a new write end, and tell the sink in the same breath, as the instance does."""
        fd = os.open(f"/proc/self/fd/{self.read_fd}", os.O_WRONLY | os.O_CLOEXEC)
        self._writers.add(fd)
        sink.writer_attached()
        return fd

    def close_writer(self, fd: int) -> None:
        self._writers.discard(fd)
        os.close(fd)

    def close(self) -> None:
        for fd in (*self._writers, self.read_fd):
            os.close(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


@asynccontextmanager
async def running(*sinks: LogSink) -> AsyncIterator[PipeReactor]:
    """A reactor reading the sinks; on the way out close them (which drains the pipes), then it."""
    reactor = PipeReactor()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reactor.run)
            for sink in sinks:
                sink.attach(reactor)
            yield reactor
            tg.cancel_scope.cancel()
    finally:
        for sink in sinks:
            sink.close()
        reactor.close()


class Reader:
    """Collects what a follower hands over, so a test can wait for bytes to go through the sink."""

    def __init__(self, follower: AsyncIterator[bytes]) -> None:
        self.follower = follower
        self.data = bytearray()
        self.chunks: list[bytes] = []

    async def until(self, size: int) -> bytes:
        with anyio.fail_after(10):
            while len(self.data) < size:
                chunk = await anext(self.follower)
                self.chunks.append(chunk)
                self.data += chunk
        return bytes(self.data)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def run_child(pipe: Pipe, sink: LogSink, code: str) -> None:
    """Run a Python child with a fresh write end of the pipe as its stdout, and wait for it."""
    fd = pipe.open_writer(sink)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=fd)
    pipe.close_writer(fd)  # the child holds the only write end now
    with anyio.fail_after(15):
        assert await anyio.to_thread.run_sync(child.wait) == 0


def numbered(start: int, stop: int) -> bytes:
    return b"".join(b"line %06d %s\n" % (i, b"x" * (i % 37)) for i in range(start, stop))


async def settle() -> None:
    """Let the event loop go round many times: a sink that spins would read on each round."""
    for _ in range(500):
        await anyio.lowlevel.checkpoint()


# -- runs, EOF and order ----------------------------------------------------------------------


async def test_successive_writers_every_line_once_in_order(pipe: Pipe, tmp_path: Path) -> None:
    sink = LogSink(pipe.read_fd, tmp_path / "out.log")
    expected = b""
    async with running(sink), sink.follow() as follower:
        reader = Reader(follower)
        for run in range(4):
            start, stop = run * 500, (run + 1) * 500
            expected += numbered(start, stop)
            code = (
                "import sys\n"
                f"for i in range({start}, {stop}):\n"
                "    sys.stdout.write('line %06d %s\\n' % (i, 'x' * (i % 37)))\n"
                "    if i % 100 == 0: sys.stdout.flush()\n"
            )
            await run_child(pipe, sink, code)
            await reader.until(len(expected))

            # The child is gone and its bytes are in: the pipe is at EOF, and the reactor
            # leaves it be until writer_attached() instead of reading it again and again.
            await settle()
            reads = sink.reads
            await settle()
            assert sink.reads == reads
    assert (tmp_path / "out.log").read_bytes() == expected
    assert reader.data == expected
    assert sink.bytes_written == len(expected)


async def test_direct_writes_across_runs_and_partial_last_line(pipe: Pipe, tmp_path: Path) -> None:
    sink = LogSink(pipe.read_fd, tmp_path / "out.log")
    # Subscribed before the reactor starts and unsubscribed after the sink is closed, so
    # the follower sees what close() hands over.
    async with sink.follow() as follower, running(sink):
        reader = Reader(follower)
        fd = pipe.open_writer(sink)
        os.write(fd, b"one\ntw")
        pipe.close_writer(fd)
        await reader.until(4)
        await settle()
        fd = pipe.open_writer(sink)  # the next run finishes the line the last one started
        os.write(fd, b"o\nthree")
        pipe.close_writer(fd)
    assert (tmp_path / "out.log").read_bytes() == b"one\ntwo\nthree"
    assert sink.tail(3) == [b"one", b"two", b"three"]
    # A sink that is closed hands followers the unfinished last line, then ends them.
    assert reader.data + b"".join([chunk async for chunk in follower]) == b"one\ntwo\nthree"


async def test_writer_attached_before_run_is_not_missed(pipe: Pipe, tmp_path: Path) -> None:
    sink = LogSink(pipe.read_fd, tmp_path / "out.log")
    fd = pipe.open_writer(sink)
    os.write(fd, b"early\n")
    async with running(sink), sink.follow() as follower:
        os.write(fd, b"late\n")
        assert await Reader(follower).until(11) == b"early\nlate\n"
    assert (tmp_path / "out.log").read_bytes() == b"early\nlate\n"


# -- rotation ---------------------------------------------------------------------------------


async def test_rotation_keeps_whole_lines_and_backups(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path, max_bytes=1000, backups=3)
    stream = numbered(0, 600)
    lines = set(stream.splitlines(keepends=True))
    async with running(sink), sink.follow() as follower:
        reader = Reader(follower)
        fd = pipe.open_writer(sink)
        # Slices that cut lines anywhere, each read in by itself: a follower gets the
        # lines a slice completes only after the sink has read that slice.
        for start in range(0, len(stream), 333):
            os.write(fd, stream[start : start + 333])
            await reader.until(stream.rfind(b"\n", 0, start + 333) + 1)
        pipe.close_writer(fd)

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["out.log", "out.log.1", "out.log.2", "out.log.3"]
    longest = max(len(line) for line in lines)
    contents = [(tmp_path / name).read_bytes() for name in ("out.log.3", "out.log.2", "out.log.1", "out.log")]
    for content in contents:
        assert content.endswith(b"\n")
        assert all(line in lines for line in content.splitlines(keepends=True))
        # Only the rest of a line that was started in a file can take it past the limit.
        assert len(content) <= 1000 + longest
    kept = b"".join(contents)
    assert stream.endswith(kept)
    assert stream[-len(kept) - 1 : -len(kept)] == b"\n"
    assert sum(len(c) for c in contents[:-1]) > 2000


async def test_rotation_of_one_big_chunk(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path, max_bytes=1000, backups=2)
    stream = numbered(0, 300)
    async with running(sink):
        fd = pipe.open_writer(sink)
        os.write(fd, stream)  # one read, many rotations within it
        pipe.close_writer(fd)
    assert not (tmp_path / "out.log.3").exists()
    contents = [(tmp_path / name).read_bytes() for name in ("out.log.2", "out.log.1", "out.log")]
    assert all(0 < len(c) <= 1000 and c.endswith(b"\n") for c in contents)
    assert stream.endswith(b"".join(contents))


async def test_line_longer_than_max_bytes_is_cut_at_the_limit(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path, max_bytes=100, backups=3)
    long_line = b"L" * 250 + b"\n"
    async with running(sink):
        fd = pipe.open_writer(sink)
        os.write(fd, b"short\n" + long_line + b"after\n")
        pipe.close_writer(fd)
    # The long line starts in a file of its own; no file may take it whole, so it is cut
    # at the size limit (its end is not within an eighth of max_bytes of the limit).
    assert (tmp_path / "out.log.3").read_bytes() == b"short\n"
    assert (tmp_path / "out.log.2").read_bytes() == b"L" * 100
    assert (tmp_path / "out.log.1").read_bytes() == b"L" * 100
    assert path.read_bytes() == b"L" * 50 + b"\n" + b"after\n"


async def test_a_line_that_ends_within_reach_is_not_cut(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path, max_bytes=1000, backups=3)
    started = b"s" * 900  # a line started in this file, its end beyond the limit but within reach
    longer = b"m" * 1100 + b"\n"  # longer than max_bytes, but its end is within reach
    async with running(sink), sink.follow() as follower:
        reader = Reader(follower)
        fd = pipe.open_writer(sink)
        os.write(fd, b"x" * 10 + b"\n" + started)
        await reader.until(11)
        os.write(fd, b"s" * 150 + b"\n" + longer + b"end\n")
        pipe.close_writer(fd)
    assert (tmp_path / "out.log.2").read_bytes() == b"x" * 10 + b"\n" + started + b"s" * 150 + b"\n"
    assert (tmp_path / "out.log.1").read_bytes() == longer
    assert path.read_bytes() == b"end\n"


async def test_output_without_newlines_still_rotates(pipe: Pipe, tmp_path: Path) -> None:
    """A progress bar redrawn with \\r never ends a line: the file is cut at max_bytes anyway."""
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path, max_bytes=10_000, backups=3)
    total = 100 * 1000
    code = (
        "import sys\n"
        f"for i in range({total // 10}):\n"
        "    sys.stdout.write('\\r[%7d]' % i)\n"
        "    if i % 97 == 0: sys.stdout.flush()\n"
    )
    async with running(sink):
        await run_child(pipe, sink, code)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["out.log", "out.log.1", "out.log.2", "out.log.3"]
    sizes = [(tmp_path / name).stat().st_size for name in names]
    assert sizes == [10_000] * 4  # 100,000 bytes: ten files' worth, exactly
    assert sink.bytes_written == total
    order = ("out.log.3", "out.log.2", "out.log.1", "out.log")
    content = b"".join((tmp_path / name).read_bytes() for name in order)
    assert content == b"".join(b"\r[%7d]" % i for i in range(total // 10 - 4000, total // 10))


async def test_no_backups_starts_the_file_anew(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path, max_bytes=500, backups=0)
    stream = numbered(0, 100)
    async with running(sink), sink.follow() as follower:
        reader = Reader(follower)
        fd = pipe.open_writer(sink)
        for start in range(0, len(stream), 200):
            os.write(fd, stream[start : start + 200])
            await reader.until(stream.rfind(b"\n", 0, start + 200) + 1)
        pipe.close_writer(fd)
    assert [p.name for p in tmp_path.iterdir()] == ["out.log"]
    content = path.read_bytes()
    assert 0 < len(content) <= 500 + 60
    assert stream.endswith(content)
    assert stream[-len(content) - 1 : -len(content)] == b"\n"


# -- tail -------------------------------------------------------------------------------------


async def test_tail_last_lines(pipe: Pipe, tmp_path: Path) -> None:
    sink = LogSink(pipe.read_fd, tmp_path / "out.log")
    stream = numbered(0, 50)
    async with running(sink), sink.follow() as follower:
        fd = pipe.open_writer(sink)
        for line in stream.splitlines(keepends=True):
            os.write(fd, line)
        await Reader(follower).until(len(stream))
        assert sink.tail(10) == stream.splitlines()[-10:]
        assert sink.tail(1000) == stream.splitlines()
        assert sink.tail(0) == []
        os.write(fd, b"\npartial")
        pipe.close_writer(fd)
    assert sink.tail(3) == [stream.splitlines()[-1], b"", b"partial"]


async def test_tail_is_bounded_and_leaves_out_a_cut_line(pipe: Pipe, tmp_path: Path) -> None:
    sink = LogSink(pipe.read_fd, tmp_path / "out.log", tail_bytes=100)
    async with running(sink), sink.follow() as follower:
        reader = Reader(follower)
        fd = pipe.open_writer(sink)
        sent = 0
        for i in range(40):
            line = b"%02d-%s\n" % (i, b"y" * 20)  # 24 bytes: 100 is never a line boundary
            os.write(fd, line)
            sent += len(line)
            await reader.until(sent)
        pipe.close_writer(fd)
    assert sink.tail(100) == [b"%02d-%s" % (i, b"y" * 20) for i in range(36, 40)]
    assert sink.tail(2) == [b"38-" + b"y" * 20, b"39-" + b"y" * 20]


# -- followers --------------------------------------------------------------------------------


async def test_follow_gets_only_what_comes_after_subscribing(pipe: Pipe, tmp_path: Path) -> None:
    sink = LogSink(pipe.read_fd, tmp_path / "out.log")
    async with running(sink), sink.follow() as early:
        fd = pipe.open_writer(sink)
        os.write(fd, b"before\n")
        await Reader(early).until(7)
        async with sink.follow() as late:
            os.write(fd, b"after 1\nafter")
            os.write(fd, b" 2\n")
            assert await Reader(late).until(16) == b"after 1\nafter 2\n"
        pipe.close_writer(fd)


async def test_slow_follower_never_blocks_the_writer(pipe: Pipe, tmp_path: Path) -> None:
    sink = LogSink(pipe.read_fd, tmp_path / "out.log", follower_bytes=64 * 1024)
    total = 100 * 100_000
    code = f"import sys; sys.stdout.buffer.write((b'x' * 99 + b'\\n') * {total // 100})"
    async with sink.follow() as slow, running(sink):
        # The follower reads nothing while a child writes 10 MB: the child still ends.
        await run_child(pipe, sink, code)
        sink.close()  # takes in what is left in the pipe, then ends the follower
    chunks = [chunk async for chunk in slow]
    # Bounded in bytes: what it holds while it does not read is at most 64 KiB, or one
    # chunk when a single chunk is bigger than that (it is taken whole into an empty queue).
    assert sum(map(len, chunks[:-1])) <= max(64 * 1024, len(chunks[0]))
    match = re.fullmatch(rb"\[supervisor\] follower too slow: (\d+) bytes dropped\n", chunks[-1])
    assert match is not None
    # Nothing unaccounted for: what it got plus what it was told it missed is everything.
    assert sum(map(len, chunks[:-1])) + int(match[1]) == total
    assert sink.bytes_written == total
    assert os.path.getsize(tmp_path / "out.log") == total


async def test_follower_gets_marker_then_live_lines(pipe: Pipe, tmp_path: Path) -> None:
    sink = LogSink(pipe.read_fd, tmp_path / "out.log", follower_bytes=4)
    async with running(sink), sink.follow() as slow, sink.follow() as fast:
        fast_reader, slow_reader = Reader(fast), Reader(slow)
        fd = pipe.open_writer(sink)
        for i in range(5):
            os.write(fd, b"%d\n" % i)
            await fast_reader.until(2 * (i + 1))
        assert await slow_reader.until(2) == b"0\n"
        # Room again, but it has not caught up yet: still dropped, so the marker stays
        # where the gap is instead of one marker after every line.
        os.write(fd, b"gone\n")
        await fast_reader.until(15)
        marker = b"[supervisor] follower too slow: 11 bytes dropped\n"
        # It reads what it had, then learns about the gap at once, not at the next line.
        assert await slow_reader.until(4 + len(marker)) == b"0\n1\n" + marker
        os.write(fd, b"live\n")
        assert await slow_reader.until(4 + len(marker) + 5) == b"0\n1\n" + marker + b"live\n"
        pipe.close_writer(fd)


# -- bytes kept exactly -----------------------------------------------------------------------


async def test_timestamps_prefix_each_line_once(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path, timestamps=True)
    async with running(sink), sink.follow() as follower:
        reader = Reader(follower)
        fd = pipe.open_writer(sink)
        os.write(fd, b"first\nsplit ")  # one atomic write: read in together
        await reader.until(len(b"2026-01-01T00:00:00.000Z first\n"))
        os.write(fd, b"line\n\nlast")
        pipe.close_writer(fd)
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 4
    assert all(STAMP.match(line) for line in lines)
    assert [STAMP.sub(b"", line) for line in lines] == [b"first", b"split line", b"", b"last"]
    assert [STAMP.sub(b"", line) for line in sink.tail(4)] == [b"first", b"split line", b"", b"last"]


async def test_one_megabyte_line_and_binary_bytes_kept_exactly(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path, max_bytes=512 * 1024, backups=3)
    big_line = os.urandom(1024 * 1024).replace(b"\n", b"\0") + b"\n"
    binary = bytes(range(256)) * 3 + b"\xff\xfe\x00\xc3(\x00"  # \0, invalid UTF-8, no last newline
    data = big_line + binary
    async with running(sink):
        fd = pipe.open_writer(sink)
        await anyio.to_thread.run_sync(write_all, fd, data)  # 1 MB does not fit in the pipe
        pipe.close_writer(fd)
    # The line twice as long as max_bytes was cut at the limit, twice; the newline that
    # ends it was within reach of the second cut, so it stays with the line's end.
    files = [(tmp_path / name).read_bytes() for name in ("out.log.2", "out.log.1", "out.log")]
    assert b"".join(files) == data
    assert [len(f) for f in files] == [512 * 1024, 512 * 1024 + 1, len(binary)]


async def test_one_megabyte_line_without_rotation(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path)
    big_line = b"z" * (1024 * 1024) + b"\n"
    async with running(sink), sink.follow() as follower:
        fd = pipe.open_writer(sink)
        await anyio.to_thread.run_sync(write_all, fd, big_line)
        # Followers get the line whole, however many reads it took.
        assert (await Reader(follower).until(len(big_line))) == big_line
        pipe.close_writer(fd)
    assert path.read_bytes() == big_line


# -- reopen, cancellation, closing ------------------------------------------------------------


async def test_reopen_after_the_file_was_moved_away(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path)
    async with running(sink), sink.follow() as follower:
        reader = Reader(follower)
        fd = pipe.open_writer(sink)
        os.write(fd, b"old 1\nold 2\n")
        await reader.until(12)
        path.rename(tmp_path / "out.log.moved")
        os.write(fd, b"still old\n")  # goes where the open file went
        await reader.until(22)
        sink.reopen()
        os.write(fd, b"new\n")
        await reader.until(26)
        pipe.close_writer(fd)
    assert (tmp_path / "out.log.moved").read_bytes() == b"old 1\nold 2\nstill old\n"
    assert path.read_bytes() == b"new\n"
    assert sink.path == path


async def test_close_drains_the_pipe_after_the_reactor_ended(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path)
    pending = numbered(0, 1000)[:50_000]  # fits in the pipe; ends mid-line
    fd = pipe.open_writer(sink)
    reactor = PipeReactor()
    async with anyio.create_task_group() as tg, sink.follow() as follower:
        tg.start_soon(reactor.run)
        sink.attach(reactor)
        os.write(fd, b"ready\n")
        await Reader(follower).until(6)  # the reactor is up and watches the pipe
        os.write(fd, pending)
        tg.cancel_scope.cancel()  # no await in between: the reactor never sees it
    # What a child wrote after the reactor ended (the service stopping, it being killed)
    # is taken in by close(), the unfinished last line included.
    os.write(fd, b"\nlast words\n")
    sink.close()
    assert path.read_bytes() == b"ready\n" + pending + b"\nlast words\n"
    assert not reactor.watching(pipe.read_fd)
    reactor.close()
    pipe.close_writer(fd)


async def test_close_while_the_reactor_runs_leaves_the_others_be(tmp_path: Path) -> None:
    first, second = Pipe(), Pipe()
    try:
        one = LogSink(first.read_fd, tmp_path / "one.log")
        two = LogSink(second.read_fd, tmp_path / "two.log")
        async with running(one, two) as reactor, one.follow() as ones, two.follow() as twos:
            fd1, fd2 = first.open_writer(one), second.open_writer(two)
            os.write(fd1, b"hello\n")
            await Reader(ones).until(6)
            os.write(fd1, b"bye\n")
            one.close()  # drains: "bye" is in, and the reactor lets go of the pipe
            assert (tmp_path / "one.log").read_bytes() == b"hello\nbye\n"
            assert not reactor.watching(first.read_fd)
            one.writer_attached()  # a closed sink is not watched again
            one.attach(reactor)  # nor attached
            assert not reactor.watching(first.read_fd)
            os.write(fd2, b"still here\n")
            assert await Reader(twos).until(11) == b"still here\n"
            first.close_writer(fd1)
            second.close_writer(fd2)
    finally:
        first.close()
        second.close()


async def test_file_is_created_at_run_and_not_inherited(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    sink = LogSink(pipe.read_fd, path)
    assert not path.exists()
    async with running(sink), sink.follow() as follower:
        fd = pipe.open_writer(sink)
        os.write(fd, b"x\n")
        await Reader(follower).until(2)
        assert path.stat().st_mode & 0o007 == 0
        target = os.path.realpath(path)
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
        same = [n for n in fds if os.path.realpath(f"/proc/self/fd/{n}") == target]
        assert len(same) == 1
        assert fcntl.fcntl(same[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        pipe.close_writer(fd)


# -- pipe size --------------------------------------------------------------------------------


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


async def test_a_full_pipe_grows_and_a_quiet_one_does_not(tmp_path: Path) -> None:
    chatty, quiet = Pipe(), Pipe()
    try:
        default = pipe_size(chatty.read_fd)
        loud = LogSink(chatty.read_fd, tmp_path / "chatty.log")
        calm = LogSink(quiet.read_fd, tmp_path / "quiet.log")
        before = logs._PIPE_GROWTH.used
        async with running(loud, calm):
            fd = chatty.open_writer(loud)
            for _ in range(default // 1024):  # exactly full: the sink finds it so on its next read
                os.write(fd, (b"y" * 63 + b"\n") * 16)
            chatty.close_writer(fd)
            fd = quiet.open_writer(calm)
            os.write(fd, b"hello\n")
            quiet.close_writer(fd)
            await anyio.wait_all_tasks_blocked()  # both sinks have read all and wait for a writer
            assert (loud.bytes_written, calm.bytes_written) == (default, 6)
            assert pipe_size(chatty.read_fd) == 1024 * 1024
            assert pipe_size(quiet.read_fd) == default
            assert logs._PIPE_GROWTH.used == before + 1024 * 1024 - default
        assert logs._PIPE_GROWTH.used == before  # given back at close
    finally:
        chatty.close()
        quiet.close()


PIPE_BUDGET = """
    import fcntl, json, os, sys
    import anyio
    from supervisor import logs
    from supervisor.logs import LogSink
    from supervisor.reactor import PipeReactor

    async def main():
        pipes, sinks = [], []
        count = logs._PIPE_GROWTH.limit // (1024 * 1024 - 65536) + 3
        for i in range(count):
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read_fd, False)
            os.write(write_fd, b"x" * fcntl.fcntl(read_fd, fcntl.F_GETPIPE_SZ))  # full
            pipes.append((read_fd, write_fd))
            sinks.append(LogSink(read_fd, sys.argv[1] + f"/{i}.log"))
        reactor = PipeReactor()
        async with anyio.create_task_group() as tg:
            tg.start_soon(reactor.run)
            for sink in sinks:
                sink.attach(reactor)
            await anyio.wait_all_tasks_blocked()  # every sink has read its pipe and waits for more
            assert all(sink.bytes_written == 65536 for sink in sinks)
            tg.cancel_scope.cancel()
        sizes = [fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) for r, _ in pipes]
        print(json.dumps({"sizes": sizes, "used": logs._PIPE_GROWTH.used, "limit": logs._PIPE_GROWTH.limit}))

    anyio.run(main)
"""


def test_pipe_growth_stops_at_its_budget(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PIPE_BUDGET), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    grown = [size for size in report["sizes"] if size == 1024 * 1024]
    assert len(grown) == report["limit"] // (1024 * 1024 - 65536)  # as many as fit, then no more
    assert report["used"] <= report["limit"]
    assert len(report["sizes"]) - len(grown) == 3


def test_a_file_first_written_after_a_restart_rotates_by_its_real_size(tmp_path: Path) -> None:
    """A file is opened by its first write (after a re-exec, a quiet instance's never is): the
    rotation must count what the file holds already, not start from nothing."""
    from supervisor.logfile import RotatingFile

    path = tmp_path / "web.out.log"
    path.write_bytes(b"x" * 89 + b"\n")  # 90 of 100 bytes, from before the handover
    log = RotatingFile(path, max_bytes=100, backups=1)
    try:
        assert not log.is_open  # nothing opened it yet
        log.write(b"y" * 19 + b"\n")  # 20 bytes: past the limit with what is there
        assert Path(f"{path}.1").read_bytes() == b"x" * 89 + b"\n"
        assert path.read_bytes() == b"y" * 19 + b"\n"
    finally:
        log.close()
