"""The stdio mapping layer on real files, fifos, pipes and processes.

Nothing is mocked: a test opens real paths and then asks the kernel what it got
(``/proc/self/fd`` and ``/proc/self/fdinfo``). Whatever touches the process's own 0/1/2, or
could block, runs in a fresh Python subprocess: the initial stdio is saved once per process,
and pytest's own capture sits on 0/1/2 of this one.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.config import (
    FifoStream,
    FileStream,
    InheritStream,
    LogStream,
    NullStream,
    StdoutStream,
    parse_manifest,
)
from supervisor.stdio import LogPipe, Stdio, StdioError, StdioStream

REPO = Path(__file__).resolve().parent.parent
DEVNULL = "/dev/null"


# -- helpers -----------------------------------------------------------------------------------


def fd_target(fd: int) -> str:
    """What the kernel says a fd of this process is: a path, or pipe:[inode]."""
    return os.readlink(f"/proc/self/fd/{fd}")


def fd_flags(fd: int) -> int:
    """The open file description's flags (O_ACCMODE, O_APPEND, O_NONBLOCK...), from fdinfo."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags in fdinfo of {fd}")


def is_cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def open_fds() -> set[int]:
    """This process's open fds, without the one listdir used to list them (closed by now)."""
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if not is_closed(fd)}


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return True
    return False


def run_script(folder: Path, code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (its own initial stdio), stdout and stderr captured."""
    script = folder / "script.py"
    script.write_text(textwrap.dedent(code))
    # Buffered like a service's own print()s, so that the tests see the layer flush them.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stderr
    return result


def read_all(fd: int) -> bytes:
    """Read a non-blocking pipe end up to EOF; every writer must be gone already."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


@pytest.fixture
def stdio_list() -> Iterator[list[Stdio]]:
    """Stdio objects a test opened, closed after it whatever happens."""
    opened: list[Stdio] = []
    yield opened
    for stdio in opened:
        stdio.close()


@pytest.fixture
def log_pipes() -> Iterator[dict[str, LogPipe]]:
    pipes = {"stdout": LogPipe(), "stderr": LogPipe()}
    yield pipes
    for pipe in pipes.values():
        pipe.close()


def pipe_inode(fd: int) -> str:
    target = fd_target(fd)
    assert target.startswith("pipe:["), target
    return target


# -- not set up --------------------------------------------------------------------------------


def test_empty_path_is_not_set_up_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, log_pipes: dict[str, LogPipe], stdio_list: list[Stdio]
) -> None:
    caplog.set_level(logging.DEBUG, logger="supervisor.stdio")
    stdio = Stdio.from_config("web", FileStream(path=""), FileStream(path=""), FifoStream(path=""))
    stdio_list.append(stdio)
    assert stdio.describe() == {"stdin": "null", "stdout": "null", "stderr": "null"}
    assert fd_flags(stdio.stdin.fd) & os.O_ACCMODE == os.O_RDONLY  # type: ignore[arg-type]
    for stream in (stdio.stdin, stdio.stdout, stdio.stderr):
        assert stream.fd is not None and fd_target(stream.fd) == DEVNULL

    # With the instance's log pipes, output that is not set up goes to the log.
    stdio = Stdio.from_config(
        "web", FileStream(path=""), FileStream(path=""), FifoStream(path=""), log_pipes=log_pipes
    )
    stdio_list.append(stdio)
    assert stdio.describe() == {"stdin": "null", "stdout": "log", "stderr": "log"}
    assert fd_target(stdio.stdout.fd) == pipe_inode(log_pipes["stdout"].read_fd)  # type: ignore[arg-type]
    assert fd_target(stdio.stderr.fd) == pipe_inode(log_pipes["stderr"].read_fd)  # type: ignore[arg-type]
    assert caplog.records == []


def test_none_path_is_not_set_up(tmp_path: Path, stdio_list: list[Stdio]) -> None:
    # The models refuse None; a hand-built record still must not crash the layer.
    spec = FileStream(path=None)
    stdio = Stdio.from_config("web", spec, spec, spec)
    stdio_list.append(stdio)
    assert stdio.describe() == {"stdin": "null", "stdout": "null", "stderr": "null"}
    assert fd_target(stdio.stdout.fd) == DEVNULL  # type: ignore[arg-type]


def test_missing_stdin_file_and_fifo_are_not_set_up_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, log_pipes: dict[str, LogPipe], stdio_list: list[Stdio]
) -> None:
    caplog.set_level(logging.WARNING, logger="supervisor.stdio")
    missing_in = tmp_path / "no-such-input"
    missing_fifo = tmp_path / "no-such-fifo"
    stdio = Stdio.from_config(
        "web",
        FileStream(path=str(missing_in)),
        FifoStream(path=str(missing_fifo)),
        FifoStream(path=str(tmp_path / "nope" / "fifo")),
        log_pipes={"stdout": log_pipes["stdout"]},
    )
    stdio_list.append(stdio)
    assert stdio.describe() == {"stdin": "null", "stdout": "log", "stderr": "null"}
    assert fd_target(stdio.stdin.fd) == DEVNULL  # type: ignore[arg-type]
    assert fd_target(stdio.stdout.fd) == pipe_inode(log_pipes["stdout"].read_fd)  # type: ignore[arg-type]
    assert fd_target(stdio.stderr.fd) == DEVNULL  # type: ignore[arg-type]
    assert not missing_in.exists()  # an input file is never created

    messages = [r.getMessage() for r in caplog.records if r.name == "supervisor.stdio"]
    assert len(messages) == 3, messages
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    stdin_msg, stdout_msg, stderr_msg = messages
    assert "web" in stdin_msg and "stdin" in stdin_msg and str(missing_in) in stdin_msg
    assert "/dev/null" in stdin_msg
    assert "web" in stdout_msg and "stdout" in stdout_msg and str(missing_fifo) in stdout_msg
    assert "log" in stdout_msg
    assert "stderr" in stderr_msg and "nope" in stderr_msg


def test_existing_paths_give_fds(tmp_path: Path, stdio_list: list[Stdio]) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes(b"hello\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.log"
    stdio = Stdio.from_config(
        "web", FileStream(path=str(source)), FileStream(path=str(out)), FifoStream(path=str(fifo))
    )
    stdio_list.append(stdio)
    assert stdio.describe() == {
        "stdin": f"file:{source}",
        "stdout": f"file:{out} (append)",
        "stderr": f"fifo:{fifo}",
    }
    assert fd_target(stdio.stdin.fd) == str(source)  # type: ignore[arg-type]
    assert os.read(stdio.stdin.fd, 100) == b"hello\n"  # type: ignore[arg-type]
    assert out.exists() and fd_target(stdio.stdout.fd) == str(out)  # type: ignore[arg-type]
    assert fd_target(stdio.stderr.fd) == str(fifo)  # type: ignore[arg-type]
    assert fd_flags(stdio.stdin.fd) & os.O_ACCMODE == os.O_RDONLY  # type: ignore[arg-type]
    assert fd_flags(stdio.stdout.fd) & os.O_ACCMODE == os.O_WRONLY  # type: ignore[arg-type]
    assert fd_flags(stdio.stderr.fd) & os.O_ACCMODE == os.O_RDWR  # type: ignore[arg-type]


def test_null_and_inherit(stdio_list: list[Stdio]) -> None:
    stdio = Stdio.from_config("web", NullStream(), InheritStream(), InheritStream())
    stdio_list.append(stdio)
    assert stdio.describe() == {"stdin": "null", "stdout": "inherit", "stderr": "inherit"}
    assert fd_target(stdio.stdin.fd) == DEVNULL  # type: ignore[arg-type]
    assert fd_flags(stdio.stdin.fd) & os.O_ACCMODE == os.O_RDONLY  # type: ignore[arg-type]
    # A dup of this process's fd 1: the same open file description (same inode and flags).
    assert fd_target(stdio.stdout.fd) == fd_target(1)  # type: ignore[arg-type]
    assert fd_target(stdio.stderr.fd) == fd_target(2)  # type: ignore[arg-type]
    assert stdio.stdout.fd not in (0, 1, 2)


def test_log_stream_opens_a_writer_of_the_instance_pipe(
    log_pipes: dict[str, LogPipe], stdio_list: list[Stdio]
) -> None:
    stdio = Stdio.from_config("web", NullStream(), LogStream(), LogStream(), log_pipes=log_pipes)
    stdio_list.append(stdio)
    assert stdio.describe() == {"stdin": "null", "stdout": "log", "stderr": "log"}
    assert fd_target(stdio.stdout.fd) == pipe_inode(log_pipes["stdout"].read_fd)  # type: ignore[arg-type]
    assert fd_target(stdio.stderr.fd) == pipe_inode(log_pipes["stderr"].read_fd)  # type: ignore[arg-type]
    assert fd_flags(stdio.stdout.fd) & os.O_ACCMODE == os.O_WRONLY  # type: ignore[arg-type]

    with pytest.raises(StdioError, match=r"instance web: .*stdout.*no log pipe"):
        Stdio.from_config("web", NullStream(), LogStream(), NullStream())
    with pytest.raises(StdioError, match="stdin"):
        Stdio.from_config("web", LogStream(), NullStream(), NullStream(), log_pipes=log_pipes)
    with pytest.raises(StdioError, match=r"stdout.*stderr only"):
        Stdio.from_config("web", NullStream(), StdoutStream(), NullStream())


# -- errors ------------------------------------------------------------------------------------


def _denied_for_writing(tmp_path: Path) -> str:
    """A path this process is refused when it opens it for writing, root included."""
    if os.geteuid() != 0:
        path = tmp_path / "locked.log"
        path.write_text("")
        path.chmod(0)
        return str(path)
    # Root passes DAC checks, but sysfs (kernfs) refuses writing a file with no write
    # permission bits to everyone: EACCES.
    for candidate in ("/sys/kernel/notes", "/sys/devices/system/cpu/online", "/sys/kernel/uevent_seqnum"):
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_APPEND)
        except PermissionError:
            return candidate
        except OSError:
            continue
        os.close(fd)
    pytest.skip("running as root, and no read-only sysfs file refuses root here")


def test_permission_denied_is_an_error_naming_instance_stream_and_path(tmp_path: Path) -> None:
    path = _denied_for_writing(tmp_path)
    with pytest.raises(StdioError) as caught:
        Stdio.from_config("web", NullStream(), FileStream(path=path), NullStream())
    error = caught.value
    assert (error.instance, error.stream, error.path) == ("web", "stdout", path)
    assert error.reason == os.strerror(errno.EACCES)
    assert str(error) == f"instance web: cannot open stdout file {path}: Permission denied"


def test_a_directory_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "adir"
    folder.mkdir()
    cases = [
        ("stdout", (NullStream(), FileStream(path=str(folder)), NullStream())),
        ("stderr", (NullStream(), NullStream(), FifoStream(path=str(folder)))),
        ("stdin", (FileStream(path=str(folder)), NullStream(), NullStream())),
    ]
    for stream, specs in cases:
        with pytest.raises(StdioError) as caught:
            Stdio.from_config("db", *specs)
        error = caught.value
        assert (error.instance, error.stream, error.path) == ("db", stream, str(folder))
        assert error.reason == "Is a directory"
        assert str(error).startswith(f"instance db: cannot open {stream} ")
        assert str(error).endswith(f" {folder}: Is a directory")


def test_missing_parent_folder_of_an_output_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "no-such-folder" / "out.log"
    with pytest.raises(StdioError) as caught:
        Stdio.from_config("web", NullStream(), NullStream(), FileStream(path=str(path)))
    error = caught.value
    assert (error.instance, error.stream, error.path) == ("web", "stderr", str(path))
    assert str(error) == (
        f"instance web: cannot open stderr file {path}: folder {path.parent} does not exist"
    )
    assert not path.parent.exists()


def test_a_fifo_spec_on_a_regular_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_text("keep me")
    with pytest.raises(StdioError, match=r"instance web: cannot open stdout fifo .*plain: not a fifo"):
        Stdio.from_config("web", NullStream(), FifoStream(path=str(path)), NullStream())
    assert path.read_text() == "keep me"


# -- fifos never block -------------------------------------------------------------------------


def test_a_fifo_without_the_other_end_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # In a subprocess with a timeout: were opening to block, the test fails instead of hanging.
    result = run_script(
        tmp_path,
        f"""
        import os
        from supervisor.config import FifoStream, FileStream
        from supervisor.stdio import Stdio, StdioError

        fifo = {str(fifo)!r}
        stdio = Stdio.from_config("web", FifoStream(path=fifo), FifoStream(path=fifo), FifoStream(path=fifo))
        for stream in (stdio.stdin, stdio.stdout, stdio.stderr):
            assert os.get_blocking(stream.fd), "the child must get a blocking fd"
        print(stdio.describe())
        stdio.close()

        # A `file` that names a fifo: reading opens at once; writing with no reader is an error, not a hang.
        stdio = Stdio.from_config(
            "web", FileStream(path=fifo), FileStream(path="/dev/null"), FileStream(path="")
        )
        assert os.get_blocking(stdio.stdin.fd)
        stdio.close()
        try:
            Stdio.from_config("web", FileStream(path=""), FileStream(path=fifo), FileStream(path=""))
        except StdioError as exc:
            print(exc)
        else:
            raise AssertionError("opened a fifo with no reader write-only")
        """,
        timeout=20,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == repr({"stdin": f"fifo:{fifo}", "stdout": f"fifo:{fifo}", "stderr": f"fifo:{fifo}"})
    assert lines[1].startswith(f"instance web: cannot open stdout file {fifo}: a fifo with no reader")


def test_a_fifo_carries_a_childs_output_to_a_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    stdio = Stdio.from_config("web", NullStream(), FifoStream(path=str(fifo)), StdoutStream())
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with stdio.take() as fds:
            child = subprocess.Popen(
                ["sh", "-c", "echo through the fifo"], stdin=fds.stdin, stdout=fds.stdout, stderr=fds.stderr
            )
        assert child.wait(timeout=20) == 0
        os.set_blocking(reader, True)
        # The child's fd was read-write, so it held no extra writer after exiting; the bytes wait in the fifo.
        assert os.read(reader, 100) == b"through the fifo\n"
    finally:
        os.close(reader)
        stdio.close()


# -- take, clone, close ------------------------------------------------------------------------


def test_take_moves_the_fd_out_of_every_clone(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
    stream = StdioStream(1, fd, target="file")
    clone = stream.clone()
    merged = stream.clone(number=2, target="stdout")
    assert (clone.number, clone.target, clone.fd) == (1, "file", fd)
    assert (merged.number, merged.target, merged.fd) == (2, "stdout", fd)
    assert stream.shares_fd_with(merged)

    taken = clone.take()
    assert taken == fd
    assert stream.fd is None and clone.fd is None and merged.fd is None
    assert stream.take() is None and merged.take() is None  # taken once only
    for holder in (stream, clone, merged):
        holder.close()
    assert not is_closed(fd)  # the taker owns it now: no holder may close it
    os.close(taken)


def test_the_last_holder_closes_the_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
    stream = StdioStream(1, fd)
    clone = stream.clone()
    stream.close()
    assert stream.fd is None  # this holder let go
    assert clone.fd == fd and not is_closed(fd)
    stream.close()  # idempotent: does not count twice
    assert not is_closed(fd)
    with clone:
        pass
    assert clone.fd is None
    assert is_closed(fd)
    clone.close()
    with pytest.raises(ValueError, match="closed"):
        clone.clone()


def test_stdio_take_gives_a_merged_stderr_the_same_fd_once(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    stdio = Stdio.from_config("web", NullStream(), FileStream(path=str(out)), StdoutStream())
    assert stdio.describe()["stderr"] == "stdout"
    assert stdio.stderr.number == 2 and stdio.stderr.fd == stdio.stdout.fd
    before = open_fds()
    fds = stdio.take()
    assert fds.stdout == fds.stderr and fds.stdin is not None
    assert stdio.stdin.fd is None and stdio.stdout.fd is None and stdio.stderr.fd is None
    stdio.close()
    assert open_fds() == before  # closing the Stdio closes nothing it handed over
    handed = {fds.stdin, fds.stdout}
    fds.close()
    assert open_fds() == before - handed
    fds.close()  # idempotent


def test_taken_fds_close_each_distinct_fd_once(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    before = open_fds()
    stdio = Stdio.from_config("web", NullStream(), FileStream(path=str(out)), StdoutStream())
    with stdio.take() as fds:
        stdout_fd, stdin_fd = fds.stdout, fds.stdin
        assert stdout_fd is not None and stdin_fd is not None
        assert not is_closed(stdout_fd)
    assert is_closed(stdout_fd) and is_closed(stdin_fd)
    assert (fds.stdin, fds.stdout, fds.stderr) == (None, None, None)
    stdio.close()
    assert open_fds() == before


# -- a real child ------------------------------------------------------------------------------


def test_merged_stderr_goes_with_stdout_into_one_file(tmp_path: Path) -> None:
    out = tmp_path / "both.log"
    stdio = Stdio.from_config("web", NullStream(), FileStream(path=str(out)), StdoutStream())
    try:
        with stdio.take() as fds:
            child = subprocess.Popen(
                ["sh", "-c", "echo out; echo err >&2"], stdin=fds.stdin, stdout=fds.stdout, stderr=fds.stderr
            )
    finally:
        stdio.close()
    assert child.wait(timeout=20) == 0
    assert out.read_text() == "out\nerr\n"


def test_yaml_short_forms(tmp_path: Path, log_pipes: dict[str, LogPipe], stdio_list: list[Stdio]) -> None:
    os.mkfifo(tmp_path / "p")
    (tmp_path / "x").write_text("old content\n")
    manifest = parse_manifest(
        textwrap.dedent(
            """
            version: 1
            instances:
              web:
                command: sh -c 'echo out; echo err >&2'
                stdin: {fifo: p}
                stdout: out.log
                stderr: stdout
              job:
                command: sh -c 'echo new'
                stdout: {file: x, mode: truncate}
            """
        ),
        tmp_path / "m.yaml",
    )
    web = manifest.instances["web"]
    stdio = Stdio.from_config("web", web.stdin, web.stdout, web.stderr, log_pipes=log_pipes)
    stdio_list.append(stdio)
    assert stdio.describe() == {
        "stdin": f"fifo:{tmp_path / 'p'}",
        "stdout": f"file:{tmp_path / 'out.log'} (append)",
        "stderr": "stdout",
    }
    with stdio.take() as fds:
        child = subprocess.Popen(web.argv, stdin=fds.stdin, stdout=fds.stdout, stderr=fds.stderr)
    assert child.wait(timeout=20) == 0
    assert (tmp_path / "out.log").read_text() == "out\nerr\n"

    job = manifest.instances["job"]
    stdio = Stdio.from_config("job", job.stdin, job.stdout, job.stderr, log_pipes=log_pipes)
    stdio_list.append(stdio)
    assert stdio.describe() == {
        "stdin": "null",
        "stdout": f"file:{tmp_path / 'x'} (truncate)",
        "stderr": "log",
    }
    with stdio.take() as fds:
        child = subprocess.Popen(job.argv, stdin=fds.stdin, stdout=fds.stdout, stderr=fds.stderr)
    assert child.wait(timeout=20) == 0
    assert (tmp_path / "x").read_text() == "new\n"


def test_append_keeps_and_truncate_empties(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    path.write_text("old\n")
    for mode, expected in (("append", "old\nnew\n"), ("truncate", "new\n")):
        path.write_text("old\n")
        spec = FileStream(path=str(path), mode=mode)
        with Stdio.from_config("web", NullStream(), spec, NullStream()) as stdio:
            assert stdio.stdout.target == f"file:{path} ({mode})"
            assert path.read_text() == ("" if mode == "truncate" else "old\n")  # emptied on open
            os.write(stdio.stdout.fd, b"new\n")  # type: ignore[arg-type]
        assert path.read_text() == expected

    # A missing output file is created, mode 0644 (before the umask).
    created = tmp_path / "created.log"
    with Stdio.from_config("web", NullStream(), FileStream(path=str(created)), NullStream()):
        assert created.is_file()
    assert stat.S_IMODE(created.stat().st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- log pipes ---------------------------------------------------------------------------------


def write_ends_of(read_fd: int) -> list[int]:
    """The fds of this process that are write ends of the pipe whose read end is ``read_fd``."""
    inode = pipe_inode(read_fd)
    ends = []
    for fd in open_fds():
        try:
            if fd_target(fd) == inode and fd_flags(fd) & os.O_ACCMODE != os.O_RDONLY:
                ends.append(fd)
        except FileNotFoundError:  # the fd listdir itself used
            continue
    return ends


def test_log_pipe_keeps_every_byte_across_runs() -> None:
    with LogPipe() as pipe:
        assert not os.get_blocking(pipe.read_fd) and is_cloexec(pipe.read_fd)
        assert write_ends_of(pipe.read_fd) == []  # the first write end was closed at once
        pipes = {"stdout": pipe}
        received = b""
        for run in (1, 2, 3):
            stdio = Stdio.from_config("web", NullStream(), LogStream(), StdoutStream(), log_pipes=pipes)
            with stdio.take() as fds:
                assert fds.stdout is not None
                assert os.get_blocking(fds.stdout) and is_cloexec(fds.stdout)
                child = subprocess.Popen(
                    ["sh", "-c", f"echo run {run}; echo err {run} >&2"],
                    stdin=fds.stdin,
                    stdout=fds.stdout,
                    stderr=fds.stderr,
                )
            stdio.close()
            # Right after the spawn, the service holds no write end: only the child does.
            assert write_ends_of(pipe.read_fd) == []
            assert child.wait(timeout=20) == 0
            # The child is gone, so the pipe is at EOF: read_all ends instead of blocking.
            received += read_all(pipe.read_fd)
        assert received == b"run 1\nerr 1\nrun 2\nerr 2\nrun 3\nerr 3\n"

        # Bytes a run leaves unread stay in the pipe for the reader, across the next run.
        for run in (4, 5):
            with Stdio.from_config("web", NullStream(), LogStream(), NullStream(), log_pipes=pipes) as stdio:
                with stdio.take() as fds:
                    child = subprocess.Popen(["echo", f"run {run}"], stdout=fds.stdout)
                assert child.wait(timeout=20) == 0
        assert read_all(pipe.read_fd) == b"run 4\nrun 5\n"
    assert pipe.closed
    pipe.close()  # idempotent
    with pytest.raises(OSError):
        pipe.open_writer()
    with pytest.raises(StdioError, match="instance web: cannot open stdout log pipe: the log pipe is closed"):
        Stdio.from_config("web", NullStream(), LogStream(), NullStream(), log_pipes=pipes)


# -- close-on-exec and leaks ---------------------------------------------------------------------


def test_every_fd_the_layer_opens_is_close_on_exec(
    tmp_path: Path, log_pipes: dict[str, LogPipe], stdio_list: list[Stdio]
) -> None:
    source = tmp_path / "in"
    source.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    specs = [
        (NullStream(), NullStream(), NullStream()),
        (InheritStream(), InheritStream(), InheritStream()),
        (
            FileStream(path=str(source)),
            FileStream(path=str(tmp_path / "o")),
            FileStream(path=str(tmp_path / "e")),
        ),
        (FifoStream(path=str(fifo)), FifoStream(path=str(fifo)), FifoStream(path=str(fifo))),
        (NullStream(), LogStream(), LogStream()),
        (FileStream(path=""), FileStream(path=str(tmp_path / "missing-fifo")), StdoutStream()),
    ]
    for triple in specs:
        stdio = Stdio.from_config("web", *triple, log_pipes=log_pipes)
        stdio_list.append(stdio)
        for stream in (stdio.stdin, stdio.stdout, stdio.stderr):
            assert stream.fd is not None and stream.fd > 2
            assert is_cloexec(stream.fd), (triple, stream)
    stdio = Stdio.service()
    stdio_list.append(stdio)
    assert stdio.describe() == {"stdin": "inherit", "stdout": "inherit", "stderr": "inherit"}
    for number, stream in enumerate((stdio.stdin, stdio.stdout, stdio.stderr)):
        assert stream.fd is not None and is_cloexec(stream.fd)
        assert fd_target(stream.fd) == fd_target(number)
    for pipe in log_pipes.values():
        assert is_cloexec(pipe.read_fd)


def test_no_fd_leaks_when_a_later_stream_fails(tmp_path: Path, log_pipes: dict[str, LogPipe]) -> None:
    source = tmp_path / "in"
    source.write_text("x")
    bad = str(tmp_path / "no-such-folder" / "err.log")
    before = open_fds()
    cases = [
        (FileStream(path=str(source)), LogStream(), FileStream(path=bad)),
        (NullStream(), FileStream(path=str(tmp_path / "out")), FileStream(path=bad)),
        (InheritStream(), FileStream(path=bad), LogStream()),
        (FileStream(path=str(source)), LogStream(), FifoStream(path=str(tmp_path))),
    ]
    for triple in cases:
        with pytest.raises(StdioError):
            Stdio.from_config("web", *triple, log_pipes=log_pipes)
        assert open_fds() == before, triple
        assert write_ends_of(log_pipes["stdout"].read_fd) == []


# -- the service's own stdio: redirect and the guard -----------------------------------------------


def test_redirect_then_guard_restores_the_original_stdout(tmp_path: Path) -> None:
    log_file = tmp_path / "service.log"
    result = run_script(
        tmp_path,
        f"""
        import fcntl, os, subprocess, sys
        from supervisor.config import FileStream, NullStream
        from supervisor.stdio import Stdio, initial_stdio

        log_file = {str(log_file)!r}
        os.write(1, b"before\\n")
        print("printed before", flush=False)  # buffered: must come out before the switch
        own = Stdio.service()
        with own.guard():
            log = FileStream(path=log_file)
            stdio = Stdio.from_config("service", NullStream(), log, log)
            stdio.redirect()
            stdio.close()
            os.write(1, b"during\\n")
            os.write(2, b"during on 2\\n")
            print("printed during")  # buffered until the guard flushes it on the way out
            # What redirect put on 0/1/2 is inherited by children: not close-on-exec.
            for number in (0, 1, 2):
                assert not fcntl.fcntl(number, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, number
            assert os.readlink("/proc/self/fd/0") == "/dev/null"
            subprocess.run(["sh", "-c", "echo child during; echo child err >&2"], check=True)
        os.write(1, b"after\\n")
        print("printed after")
        for fd in initial_stdio():
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, fd
        own.close()
        """,
    )
    assert result.stdout == "before\nprinted before\nafter\nprinted after\n"
    assert result.stderr == ""
    assert log_file.read_text() == "during\nduring on 2\nchild during\nchild err\nprinted during\n"


def test_the_guard_restores_when_an_exception_passes_through(tmp_path: Path) -> None:
    log_file = tmp_path / "service.log"
    result = run_script(
        tmp_path,
        f"""
        import os
        from supervisor.stdio import Stdio, StdioStream

        log_file = {str(log_file)!r}
        os.write(1, b"before\\n")
        own = Stdio.service()
        try:
            with own.guard():
                # The way the service redirects for --log-file.
                fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
                redirected = Stdio(own.stdin.clone(), StdioStream(1, fd), StdioStream(2, os.dup(fd)))
                redirected.redirect()
                redirected.close()
                os.write(1, b"during\\n")
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        os.write(1, b"after\\n")

        # The initial stdio is saved once: a second guard, entered while redirected, still unwinds
        # to the original stream, not to the log file.
        with own.guard():
            with open(log_file, "ab") as file:
                os.dup2(file.fileno(), 1)
            with own.guard():
                os.write(1, b"nested\\n")
            os.write(1, b"restored\\n")
        own.close()
        """,
    )
    assert result.stdout == "before\nafter\nrestored\n"
    assert log_file.read_text() == "during\nnested\n"
