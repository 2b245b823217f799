"""PipeReactor: one task reads every log pipe, fairly, on real pipes and real children.

What a sink does with the bytes is test_logs.py's; here: that many pipes are read by one
task, that a chatty pipe starves neither a quiet one nor the rest of the event loop, EOF,
a pipe closed under the reactor, a reader that fails, and a follower that never reads.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from supervisor.logs import LogSink
from supervisor.logtail import dropped_marker
from supervisor.reactor import ROUND_BYTES, TURN_BUDGET, PipeReactor, Turn

from .test_logs import Pipe, Reader, settle

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def reactor_running() -> AsyncIterator[PipeReactor]:
    reactor = PipeReactor()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reactor.run)
            yield reactor
            tg.cancel_scope.cancel()
    finally:
        reactor.close()


class Recording:
    """A reader that reads what it is given and notes each turn in a shared log."""

    def __init__(self, name: str, fd: int, log: list[tuple[str, int]]) -> None:
        self.name = name
        self.fd = fd
        self.log = log
        self.data = bytearray()
        self.changed = anyio.Event()

    def read_turn(self, budget: int) -> tuple[Turn, int]:
        taken = 0
        outcome = Turn.MORE
        while taken < budget:
            try:
                data = os.read(self.fd, min(65536, budget - taken))
            except BlockingIOError:
                outcome = Turn.EMPTY
                break
            if not data:
                outcome = Turn.EOF
                break
            taken += len(data)
            self.data += data
        self.log.append((self.name, taken))
        self.changed.set()
        self.changed = anyio.Event()
        return outcome, taken

    async def until(self, size: int) -> None:
        with anyio.fail_after(10):
            while len(self.data) < size:
                await self.changed.wait()


def spew(fd: int, total: int) -> subprocess.Popen[bytes]:
    """A child that writes ``total`` bytes of lines to ``fd`` as fast as the pipe takes them."""
    code = (
        "import os, sys\n"
        f"left = {total}\n"
        "block = b'spam' * 16383 + b'\\n'\n"
        "while left > 0:\n"
        "    left -= os.write(1, block[:left])\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=fd)


async def reap(child: subprocess.Popen[bytes]) -> None:
    with anyio.fail_after(30):
        assert await anyio.to_thread.run_sync(child.wait) == 0


async def test_many_pipes_one_task_every_line_in_its_own_file(tmp_path: Path) -> None:
    pipes = [Pipe() for _ in range(200)]
    sinks = [LogSink(p.read_fd, tmp_path / f"{i}.log") for i, p in enumerate(pipes)]
    try:
        async with reactor_running() as reactor:
            tasks = len(anyio.get_running_tasks())
            for sink in sinks:
                sink.attach(reactor)
            assert len(anyio.get_running_tasks()) == tasks  # no task per pipe
            writers = [p.open_writer(s) for p, s in zip(pipes, sinks, strict=True)]
            for i, fd in enumerate(writers):
                os.write(fd, b"pipe %d\n" % i)
            for p, fd in zip(pipes, writers, strict=True):
                p.close_writer(fd)
            with anyio.fail_after(10):
                while any(sink.bytes_written == 0 for sink in sinks) or len(reactor) > 0:
                    await anyio.lowlevel.checkpoint()
            # All at EOF: none is watched, so an idle reactor reads nothing at all.
            turns = reactor.turns
            await settle()
            assert reactor.turns == turns
    finally:
        for sink in sinks:
            sink.close()
        for p in pipes:
            p.close()
    for i in range(200):
        assert (tmp_path / f"{i}.log").read_bytes() == b"pipe %d\n" % i


async def test_a_chatty_pipe_does_not_starve_a_quiet_one(tmp_path: Path) -> None:
    chatty, quiet = Pipe(), Pipe()
    log: list[tuple[str, int]] = []
    loud, calm = Recording("chatty", chatty.read_fd, log), Recording("quiet", quiet.read_fd, log)
    try:
        async with reactor_running() as reactor:
            # A writer on each before they are watched: a pipe without one is at EOF.
            quiet_fd = os.open(f"/proc/self/fd/{quiet.read_fd}", os.O_WRONLY | os.O_CLOEXEC)
            fd = os.open(f"/proc/self/fd/{chatty.read_fd}", os.O_WRONLY | os.O_CLOEXEC)
            child = spew(fd, 64 * 1024 * 1024)
            os.close(fd)
            reactor.watch(chatty.read_fd, loud)
            reactor.watch(quiet.read_fd, calm)
            await loud.until(4 * TURN_BUDGET)  # it is flooding: each turn reads a full budget
            start = len(log)
            os.write(quiet_fd, b"me too\n")
            await calm.until(7)
            # The quiet pipe got its turn within the pass under way and the next one.
            assert [name for name, _ in log[start:]].index("quiet") <= 2
            assert child.poll() is None, "the chatty child ended first: the test proves nothing"
            child.kill()
            await anyio.to_thread.run_sync(child.wait)
            os.close(quiet_fd)
    finally:
        chatty.close()
        quiet.close()


async def test_chatty_pipes_leave_the_event_loop_its_rounds(tmp_path: Path) -> None:
    """Between two rounds of the loop the reactor reads about ROUND_BYTES, however much is waiting
    (a reactor that read until the pipes were empty would read 48 MiB in one go here)."""
    pipes = [Pipe() for _ in range(3)]
    log: list[tuple[str, int]] = []
    readers = [Recording(str(i), p.read_fd, log) for i, p in enumerate(pipes)]
    total = 16 * 1024 * 1024
    try:
        async with reactor_running() as reactor:
            for p, reader in zip(pipes, readers, strict=True):
                reactor.watch(p.read_fd, reader)
            children = []
            for p in pipes:
                fd = os.open(f"/proc/self/fd/{p.read_fd}", os.O_WRONLY | os.O_CLOEXEC)
                children.append(spew(fd, total))
                os.close(fd)
            read_at_rounds = []
            with anyio.fail_after(60):
                while sum(len(r.data) for r in readers) < 3 * total:
                    read_at_rounds.append(sum(len(r.data) for r in readers))
                    await anyio.lowlevel.checkpoint()
            for child in children:
                await reap(child)
        steps = [b - a for a, b in itertools.pairwise(read_at_rounds)]
        # One step of the reactor reads less than ROUND_BYTES + TURN_BUDGET before it yields;
        # two may fall between two of ours (trio runs a batch of tasks in reverse now and then).
        assert max(steps) < 2 * (ROUND_BYTES + TURN_BUDGET)
        assert len(read_at_rounds) >= 3 * total // (ROUND_BYTES + TURN_BUDGET)
        assert [len(r.data) for r in readers] == [total] * 3
    finally:
        for p in pipes:
            p.close()


async def test_eof_stops_watching_until_a_writer_is_attached(tmp_path: Path) -> None:
    pipe = Pipe()
    sink = LogSink(pipe.read_fd, tmp_path / "out.log")
    try:
        async with reactor_running() as reactor, sink.follow() as follower:
            sink.attach(reactor)
            reader = Reader(follower)
            fd = pipe.open_writer(sink)
            assert reactor.watching(pipe.read_fd)
            os.write(fd, b"first\n")
            pipe.close_writer(fd)
            await reader.until(6)
            with anyio.fail_after(10):
                while reactor.watching(pipe.read_fd):
                    await anyio.lowlevel.checkpoint()
            reads = sink.reads
            await settle()
            assert sink.reads == reads  # a pipe with no writer is readable for ever: not read
            fd = pipe.open_writer(sink)
            assert reactor.watching(pipe.read_fd)
            os.write(fd, b"second\n")
            await reader.until(13)
            pipe.close_writer(fd)
    finally:
        sink.close()
        pipe.close()
    assert (tmp_path / "out.log").read_bytes() == b"first\nsecond\n"


async def test_a_pipe_closed_under_the_reactor(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A read end closed by its owner without close(), in the middle of a pass: the reactor goes
    on with the others, and a new pipe that gets the same fd number is read by its own sink."""
    doomed, other = Pipe(), Pipe()
    log: list[tuple[str, int]] = []
    doomed_sink = LogSink(doomed.read_fd, tmp_path / "doomed.log")
    doomed_fd = doomed.read_fd

    class Closer(Recording):
        def read_turn(self, budget: int) -> tuple[Turn, int]:
            if not self.data:
                os.close(doomed_fd)  # in the same pass, before the doomed pipe's turn
            return super().read_turn(budget)

    closer = Closer("other", other.read_fd, log)
    try:
        async with reactor_running() as reactor:
            doomed_sink.attach(reactor)
            dw = doomed.open_writer(doomed_sink)
            reactor.watch(other.read_fd, closer)
            ow = os.open(f"/proc/self/fd/{other.read_fd}", os.O_WRONLY | os.O_CLOEXEC)
            await anyio.wait_all_tasks_blocked()  # the reactor waits: neither pipe has data
            os.write(ow, b"hello\n")  # ready first, so its turn comes first
            os.write(dw, b"never read\n")
            await closer.until(6)
            with anyio.fail_after(10):
                while reactor.watching(doomed_fd):
                    await anyio.lowlevel.checkpoint()
            assert "cannot be read any more" in caplog.text
            # The fd number comes back for a new pipe: a new sink takes it over.
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            if read_fd != doomed_fd:  # it is the lowest number free, most often
                os.dup2(read_fd, doomed_fd, inheritable=False)
                os.close(read_fd)
            os.set_blocking(doomed_fd, False)
            reborn = LogSink(doomed_fd, tmp_path / "reborn.log")
            reborn.attach(reactor)
            async with reborn.follow() as follower:
                reborn.writer_attached()
                os.write(write_fd, b"new\n")
                assert await Reader(follower).until(4) == b"new\n"
            reborn.close()
            os.close(write_fd)
            os.close(doomed_fd)
            os.write(ow, b"again\n")
            await closer.until(12)
            os.close(ow)
            os.close(dw)
    finally:
        doomed_sink.close()  # its fd is gone: nothing to drain, no error
        os.close(other.read_fd)
    assert bytes(closer.data) == b"hello\nagain\n"
    assert not (tmp_path / "doomed.log").exists()  # nothing read, so nothing written: not even made
    assert (tmp_path / "reborn.log").read_bytes() == b"new\n"


async def test_a_reader_that_fails_is_dropped_and_the_others_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken_pipe, good_pipe = Pipe(), Pipe()
    log: list[tuple[str, int]] = []

    class Broken(Recording):
        def read_turn(self, budget: int) -> tuple[Turn, int]:
            raise RuntimeError("injected fault")

    good = Recording("good", good_pipe.read_fd, log)
    try:
        async with reactor_running() as reactor:
            reactor.watch(broken_pipe.read_fd, Broken("broken", broken_pipe.read_fd, log))
            reactor.watch(good_pipe.read_fd, good)
            bw = os.open(f"/proc/self/fd/{broken_pipe.read_fd}", os.O_WRONLY | os.O_CLOEXEC)
            gw = os.open(f"/proc/self/fd/{good_pipe.read_fd}", os.O_WRONLY | os.O_CLOEXEC)
            os.write(bw, b"boom\n")
            os.write(gw, b"fine\n")
            await good.until(5)
            with anyio.fail_after(10):
                while reactor.watching(broken_pipe.read_fd):
                    await anyio.lowlevel.checkpoint()
            assert "injected fault" in caplog.text
            os.write(gw, b"still\n")
            await good.until(11)
            os.close(bw)
            os.close(gw)
    finally:
        broken_pipe.close()
        good_pipe.close()


async def test_a_follower_that_never_reads_loses_what_it_missed_not_the_service(tmp_path: Path) -> None:
    """Its queue is bounded: it misses data and is told exactly how much; the file gets all,
    and another pipe read by the same reactor meanwhile is read as usual."""
    flooded, other = Pipe(), Pipe()
    sink = LogSink(flooded.read_fd, tmp_path / "flooded.log", follower_bytes=64 * 1024)
    calm = LogSink(other.read_fd, tmp_path / "calm.log")
    total = 8 * 1024 * 1024
    try:
        async with reactor_running() as reactor, sink.follow() as idle, calm.follow() as calm_lines:
            sink.attach(reactor)
            calm.attach(reactor)
            fd = flooded.open_writer(sink)
            child = spew(fd, total)
            flooded.close_writer(fd)
            await reap(child)  # it wrote everything: the reactor never waited for the follower
            cw = other.open_writer(calm)
            os.write(cw, b"calm\n")
            assert await Reader(calm_lines).until(5) == b"calm\n"
            other.close_writer(cw)
            with anyio.fail_after(10):
                while sink.bytes_written < total:
                    await anyio.lowlevel.checkpoint()
            sink.close()  # ends the follower after what it holds and the marker
            got = [chunk async for chunk in idle]
    finally:
        sink.close()
        calm.close()
        flooded.close()
        other.close()
    assert (tmp_path / "flooded.log").stat().st_size == total
    assert got[-1].startswith(b"[supervisor] follower too slow")
    delivered = sum(len(chunk) for chunk in got[:-1])
    assert 0 < delivered < total
    assert got[-1] == dropped_marker(total - delivered)  # every byte accounted for


async def test_an_idle_reactor_holds_no_reader_it_served() -> None:
    """The last reader served stayed in the loop's frame while it waited for the next round: a
    removed instance's sink, and through it the instance, stayed reachable, so the collection
    a change makes before it freezes what lives could not free it (test_apply.py)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    log: list[tuple[str, int]] = []
    try:
        async with reactor_running() as reactor:
            reader = Recording("served", read_fd, log)
            gone = weakref.ref(reader)
            reactor.watch(read_fd, reader)
            os.write(write_fd, b"a line\n")
            await reader.until(7)
            reactor.unwatch(read_fd)
            del reader  # the reactor went back to its wait in the step that served it
            assert gone() is None, "the reactor still holds the reader it served last"
    finally:
        os.close(read_fd)
        os.close(write_fd)
