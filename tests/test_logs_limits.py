"""What a log sink holds and where it writes: memory bounded in bytes, losses counted exactly,
and no symlink or planted file in its folder can make it write anywhere else.

Real pipes, files, fifos and symlinks; a real full disk is stood in for by a real file-size
limit (RLIMIT_FSIZE) in a child process, which fails writes the same way (EFBIG).
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import anyio
import pytest

from supervisor.logs import LogFileError, LogSink
from supervisor.logtail import Tail

from .test_logs import Pipe, Reader, pipe, running  # noqa: F401  (pipe is a fixture)

pytestmark = pytest.mark.anyio


# -- the tail: memory, not text --------------------------------------------------------------


def test_tail_of_tiny_writes_costs_about_its_size_in_memory() -> None:
    """2-byte lines, one per read, used to cost 30 times the tail's size (an object per chunk)."""
    limit = 256 * 1024
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tail = Tail(limit)
        for i in range(300_000):
            tail.append(b"%c\n" % (97 + i % 26))  # a new 2-byte object each time, as os.read gives
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < limit * 1.25, f"a {limit}-byte tail holds {held} bytes"
    assert tail.lines(3) == [b"%c" % (97 + i % 26) for i in range(299_997, 300_000)]


def test_tail_of_big_chunks_costs_about_its_size_in_memory() -> None:
    limit = 256 * 1024
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tail = Tail(limit)
        for i in range(40):
            tail.append(bytes([65 + i % 26]) * (limit - 1) + b"\n")  # each one nearly the whole tail
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < limit * 1.25, f"a {limit}-byte tail holds {held} bytes"
    assert tail.lines(2) == [bytes([65 + 39 % 26]) * (limit - 1)]


def reference_lines(stream: bytes, limit: int, n: int) -> list[bytes]:
    """What the tail must answer: the last ``n`` lines of the last ``limit`` bytes, a cut line left out."""
    if n <= 0 or not stream or limit <= 0:
        return []
    kept = stream[-limit:]
    starts_line = len(stream) <= limit or stream[-limit - 1] == ord("\n")
    if kept.endswith(b"\n"):
        kept = kept[:-1]
    lines = kept.rsplit(b"\n", n)
    if len(lines) > n or not starts_line:
        del lines[0]
    return lines


@pytest.mark.parametrize("limit", [1, 7, 100, 5000, 70_000])
def test_tail_answers_as_the_plain_definition_does(limit: int) -> None:
    rng = random.Random(limit)
    tail = Tail(limit)
    stream = bytearray()
    for step in range(600):
        size = rng.choice([0, 1, 2, 3, 17, 250, 4000, 20_000, 100_000])
        chunk = bytes(rng.choice(b"ab\n") if rng.random() < 0.3 else 120 for _ in range(min(size, 64)))
        chunk = (chunk * (size // max(1, len(chunk)) + 1))[:size]
        tail.append(chunk)
        stream += chunk
        if step % 50 == 0 or step == 599:
            for n in (0, 1, 2, 10, 10_000):
                assert tail.lines(n) == reference_lines(bytes(stream), limit, n), (step, n)


# -- losses on the disk: exact, and said when they start and end ------------------------------

FULL_DISK = """
    import json, os, resource, signal, sys, threading
    import anyio
    from supervisor.logs import LogSink
    from supervisor.reactor import PipeReactor

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not death
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    def write_all(fd, data):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    async def main():
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_fd, False)
        changes = []
        sink = LogSink(read_fd, sys.argv[1], max_bytes=0,
                       on_loss_change=lambda s: changes.append([s.write_error, s.bytes_lost]))
        reactor = PipeReactor()
        async with anyio.create_task_group() as tg, sink.follow() as follower:
            tg.start_soon(reactor.run)
            sink.attach(reactor)
            sink.writer_attached()
            seen = 0
            async def until(total):
                nonlocal seen
                while seen < total:
                    seen += len(await anext(follower))
            await anyio.to_thread.run_sync(write_all, write_fd, b"y" * 999 + b"\\n" + b"z" * 2999 + b"\\n")
            await until(4000)
            data = (b"x" * 99 + b"\\n") * 3000
            await anyio.to_thread.run_sync(write_all, write_fd, data)
            await until(304_000)
            lost_while_full = sink.bytes_lost
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            write_all(write_fd, b"back again\\n")
            await until(304_011)
            tg.cancel_scope.cancel()
        sink.close()
        print(json.dumps({"written": sink.bytes_written, "lost": sink.bytes_lost,
                          "lost_while_full": lost_while_full, "changes": changes,
                          "size": os.path.getsize(sys.argv[1]), "error": sink.write_error}))

    anyio.run(main)
"""


def test_losses_on_a_full_disk_are_counted_exactly_and_announced(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FULL_DISK), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # The file took 100,000 bytes and no more; every other byte is counted as lost, once.
    assert report["lost_while_full"] == 304_000 - 100_000
    assert report["size"] == 100_000 + len(b"back again\n")
    assert report["written"] == report["size"]
    assert report["written"] + report["lost"] == 304_011
    # One notice when the losses start (with the reason), one when writing works again.
    assert len(report["changes"]) == 2
    (error, lost_then), (cleared, lost_at_end) = report["changes"]
    assert "File too large" in error and str(path) in error
    assert lost_then > 0
    assert cleared is None and lost_at_end == 204_000
    assert report["error"] is None


# -- the file and its folder are what they claim to be -----------------------------------------


async def test_a_log_file_that_is_a_symlink_is_refused(pipe: Pipe, tmp_path: Path) -> None:  # noqa: F811
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a.out.log").symlink_to(victim)
    sink = LogSink(pipe.read_fd, folder / "a.out.log")
    with pytest.raises(LogFileError, match=r"a\.out\.log.*symlink") as caught:
        sink.open()
    assert str(folder / "a.out.log") in str(caught.value)
    # Run anyway (as an instance whose start failed still owns its sink): nothing reaches the target.
    async with running(sink), sink.follow() as follower:
        fd = pipe.open_writer(sink)
        os.write(fd, b"secret output\n")
        await Reader(follower).until(14)
        pipe.close_writer(fd)
    assert victim.read_bytes() == b"precious\n"
    assert sink.bytes_lost == 14
    assert sink.write_error is not None and "symlink" in sink.write_error


async def test_a_log_folder_that_is_a_symlink_is_refused(pipe: Pipe, tmp_path: Path) -> None:  # noqa: F811
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "logs").symlink_to(elsewhere)
    sink = LogSink(pipe.read_fd, tmp_path / "logs" / "a.out.log")
    with pytest.raises(LogFileError, match="symlink"):
        sink.open()
    async with running(sink):
        fd = pipe.open_writer(sink)
        os.write(fd, b"secret output\n")
        pipe.close_writer(fd)
    assert list(elsewhere.iterdir()) == []
    assert sink.bytes_lost == 14


async def test_a_fifo_planted_as_the_log_file_is_refused_without_blocking(
    pipe: Pipe, tmp_path: Path  # noqa: F811
) -> None:
    path = tmp_path / "a.out.log"
    os.mkfifo(path)
    sink = LogSink(pipe.read_fd, path)
    try:
        with anyio.fail_after(10):  # an open(O_WRONLY) of a fifo would wait for a reader for ever
            with pytest.raises(LogFileError, match="not a regular file"):
                await anyio.to_thread.run_sync(sink.open, abandon_on_cancel=True)
    finally:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # frees a thread stuck on it, if any


async def test_a_rotated_name_that_is_a_symlink_is_replaced_not_followed(
    pipe: Pipe, tmp_path: Path  # noqa: F811
) -> None:
    """Backups are renamed over, never opened: a planted ``out.log.1`` symlink is just replaced."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (tmp_path / "out.log.1").symlink_to(victim)
    sink = LogSink(pipe.read_fd, tmp_path / "out.log", max_bytes=10, backups=1)
    async with running(sink):
        fd = pipe.open_writer(sink)
        os.write(fd, b"0123456789\nabc\n")
        pipe.close_writer(fd)
    assert victim.read_bytes() == b"precious\n"
    assert not (tmp_path / "out.log.1").is_symlink()
    assert (tmp_path / "out.log.1").read_bytes() == b"0123456789\n"
    assert (tmp_path / "out.log").read_bytes() == b"abc\n"


async def test_a_missing_log_folder_is_created(pipe: Pipe, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "state" / "logs" / "a.out.log"
    sink = LogSink(pipe.read_fd, path)
    sink.open()
    sink.close()
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("file/logs", "Not a directory"),  # under a regular file
        ("/proc/supervisor-logs-test", "No such file or directory"),  # a place that refuses
        ("/sys/supervisor-logs-test", "Operation not permitted"),
        ("x" * 300, "File name too long"),
    ],
)
async def test_a_log_folder_that_cannot_be_created_is_a_clear_error(
    pipe: Pipe, tmp_path: Path, where: str, reason: str  # noqa: F811
) -> None:
    (tmp_path / "file").write_text("a regular file\n")
    folder = tmp_path / where
    sink = LogSink(pipe.read_fd, folder / "a.out.log")
    with pytest.raises(LogFileError) as caught:
        sink.open()
    message = str(caught.value)
    assert f"cannot create the log folder {folder}" in message
    assert reason in message
    assert "Errno" not in message
    sink.close()


async def test_reopen_follows_a_log_folder_that_was_moved_away(pipe: Pipe, tmp_path: Path) -> None:  # noqa: F811
    folder = tmp_path / "logs"
    sink = LogSink(pipe.read_fd, folder / "out.log")
    async with running(sink), sink.follow() as follower:
        reader = Reader(follower)
        fd = pipe.open_writer(sink)
        os.write(fd, b"old\n")
        await reader.until(4)
        folder.rename(tmp_path / "logs.old")  # the whole folder, as some rotation schemes do
        sink.reopen()  # makes the folder again, and the file in it
        os.write(fd, b"new\n")
        await reader.until(8)
        pipe.close_writer(fd)
    assert (tmp_path / "logs.old" / "out.log").read_bytes() == b"old\n"
    assert (folder / "out.log").read_bytes() == b"new\n"
    assert sink.bytes_lost == 0


async def test_a_nul_byte_in_the_path_is_a_clear_error(pipe: Pipe, tmp_path: Path) -> None:  # noqa: F811
    sink = LogSink(pipe.read_fd, tmp_path / "a\0b" / "out.log")
    with pytest.raises(LogFileError, match="contains a NUL byte"):
        sink.open()
    async with running(sink):  # and the loop counts the losses instead of raising ValueError
        fd = pipe.open_writer(sink)
        os.write(fd, b"lost\n")
        pipe.close_writer(fd)
    assert sink.bytes_lost == 5
