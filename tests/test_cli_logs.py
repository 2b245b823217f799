"""``supervisor logs`` over several instances: names, globs, prefixes, lines interleaved as they arrive."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from .service_fixture import SUPERVISOR, ServiceProcess
from .test_cli import _read_until, ok

Start = Callable[..., ServiceProcess]


def _manifest(fifo: Path) -> str:
    # echo-0 and echo-1 print two lines, then one line per poke through their own fifo.
    # The fifo is opened once, read-write: a writer closing never reads as an empty line.
    echo = f"echo $N one; echo $N two; while read l; do echo $N $l; done <> {fifo}-$N"
    return f"""
    version: 1
    instances:
      echo-0:
        command: ["sh", "-c", "{echo}"]
        env: {{N: echo-0}}
        restart: {{min_uptime: 0}}
      echo-1:
        command: ["sh", "-c", "{echo}"]
        env: {{N: echo-1}}
        restart: {{min_uptime: 0}}
      rep:
        command: ["sh", "-c", "echo rep up; exec sleep 300"]
        replicas: 2
        restart: {{min_uptime: 0}}
      solo:
        command: ["sh", "-c", "echo solo says hi; echo solo err >&2; exec sleep 300"]
        stderr: stdout
        restart: {{min_uptime: 0}}
    """


def _start(service: Start, tmp_path: Path) -> ServiceProcess:
    fifo = tmp_path / "poke"
    for n in (0, 1):
        os.mkfifo(f"{fifo}-echo-{n}")
    svc = service(_manifest(fifo))
    ok(svc.cli("wait", "--all", "--state", "running"))
    for name in ("echo-0", "echo-1"):
        svc.wait_output(name, b"two")
    for name in ("rep-0", "rep-1"):
        svc.wait_output(name, b"rep up")
    svc.wait_output("solo", b"solo err")
    return svc


def _poke(tmp_path: Path, name: str, text: str) -> None:
    with open(tmp_path / f"poke-{name}", "w") as fifo:
        fifo.write(text + "\n")


def test_several_names_and_globs_get_a_prefix(service: Start, tmp_path: Path) -> None:
    svc = _start(service, tmp_path)
    assert set(svc.status()) == {"echo-0", "echo-1", "rep-0", "rep-1", "solo"}

    both = ok(svc.cli("logs", "echo-*", "-n", "1")).stdout
    assert both == "echo-0 | echo-0 two\necho-1 | echo-1 two\n"
    # A manifest name with replicas is several instances too; in the order asked; names padded to the longest.
    mixed = ok(svc.cli("logs", "solo", "rep", "echo-1", "-n", "1")).stdout.splitlines()
    assert mixed == ["solo   | solo err", "rep-0  | rep up", "rep-1  | rep up", "echo-1 | echo-1 two"]

    plain = ok(svc.cli("logs", "echo-*", "-n", "1", "--no-prefix")).stdout
    assert plain == "echo-0 two\necho-1 two\n"
    # One exact name: today's output, for scripts (and --prefix when asked).
    assert ok(svc.cli("logs", "echo-1", "-n", "2")).stdout == "echo-1 one\necho-1 two\n"
    assert ok(svc.cli("logs", "echo-1", "-n", "1", "--prefix")).stdout == "echo-1 | echo-1 two\n"

    none = svc.cli("logs", "nothing-*")
    assert none.returncode == 1 and none.stdout == ""
    assert "no instance matches 'nothing-*'" in none.stderr


def test_stderr_not_captured_is_skipped_with_a_note(service: Start, tmp_path: Path) -> None:
    svc = _start(service, tmp_path)
    # solo's stderr goes into its stdout log: nothing to show for --stderr, and it says so.
    only = svc.cli("logs", "solo", "echo-0", "--stderr")
    assert only.returncode == 0, only.stderr
    assert only.stderr == "supervisor: solo's stderr is not captured (it goes to stdout): skipped\n"
    alone = svc.cli("logs", "solo", "--stderr")
    assert alone.returncode == 1 and "not captured" in alone.stderr


def test_follow_interleaves_in_arrival_order(service: Start, tmp_path: Path) -> None:
    svc = _start(service, tmp_path)
    follower = subprocess.Popen(
        [*SUPERVISOR, "logs", "echo-*", "solo", "-n", "1", "-f", "-s", str(svc.socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        out = follower.stdout.fileno()
        seen = _read_until(out, b"echo-0 | echo-0 two\n")
        seen += _read_until(out, b"echo-1 | echo-1 two\n") if b"echo-1 two" not in seen else b""
        seen += _read_until(out, b"solo   | solo err\n") if b"solo err" not in seen else b""
        # Every stream is followed now: pokes come out in the order they were written.
        _poke(tmp_path, "echo-1", "first")
        after = _read_until(out, b"echo-1 | echo-1 first\n")
        _poke(tmp_path, "echo-0", "second")
        after += _read_until(out, b"echo-0 | echo-0 second\n")
        _poke(tmp_path, "echo-1", "third")
        after += _read_until(out, b"echo-1 | echo-1 third\n")
        assert after.splitlines() == [
            b"echo-1 | echo-1 first",
            b"echo-0 | echo-0 second",
            b"echo-1 | echo-1 third",
        ]
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=20) == 130
    assert follower.stderr is not None and follower.stderr.read() == b""


def test_follow_ends_when_the_service_does(service: Start, tmp_path: Path) -> None:
    svc = _start(service, tmp_path)
    follower = subprocess.Popen(
        [*SUPERVISOR, "logs", "rep", "-n", "1", "-f", "-s", str(svc.socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        seen = _read_until(follower.stdout.fileno(), b"rep-0 | rep up\n")
        if b"rep-1 | rep up\n" not in seen:
            _read_until(follower.stdout.fileno(), b"rep-1 | rep up\n")  # both followed now
        ok(svc.cli("shutdown"))
        assert svc.proc.wait(timeout=30) == 0
        assert follower.wait(timeout=20) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_chunked_decoder_takes_the_wire_in_any_slices() -> None:
    from supervisor.api.multiplex import ChunkedDecoder

    wire = b"5\r\nhello\r\n1;ext=1\r\n\n\r\nc\r\n" + b"x" * 12 + b"\r\n0\r\n\r\n"
    for step in (1, 2, 3, 7, len(wire)):
        decoder = ChunkedDecoder()
        out = b"".join(decoder.feed(wire[i : i + step]) for i in range(0, len(wire), step))
        assert out == b"hello\n" + b"x" * 12 and decoder.done
    try:
        ChunkedDecoder().feed(b"zz\r\n")
    except ValueError as exc:
        assert "zz" in str(exc) or "invalid literal" in str(exc)
    else:
        raise AssertionError("a chunk size that is not hex was taken")
    endless = ChunkedDecoder()
    try:
        endless.feed(b"1" * 2000)
    except ValueError as exc:
        assert "longer than 1 KiB" in str(exc)
    else:
        raise AssertionError("a size line without end was buffered without bound")


def test_following_many_raises_the_open_file_limit_or_says_why(service: Start, tmp_path: Path) -> None:
    import resource

    svc = service(
        """
        version: 1
        instances:
          many:
            command: ["sh", "-c", "echo up; exec sleep 300"]
            replicas: 40
            restart: {min_uptime: 0}
        """
    )
    ok(svc.cli("wait", "--all", "--state", "running"))
    svc.wait_output("many-39", b"up")

    def limit(soft: int, hard: int) -> Callable[[], None]:
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    # 40 sockets under a soft limit of 30: raised to the hard limit, and every stream followed.
    follower = subprocess.Popen(
        [*SUPERVISOR, "logs", "many", "-n", "1", "-f", "-s", str(svc.socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit(30, 1024),
    )
    try:
        assert follower.stdout is not None
        seen = b""
        for n in range(40):
            line = f"many-{n}".ljust(7).encode() + b" | up\n"
            if line not in seen:
                seen += _read_until(follower.stdout.fileno(), line)
    finally:
        follower.send_signal(signal.SIGINT)
        assert _ends(follower, 20) == 130
    # A hard limit too low: one clear line, not "no service answers".
    capped = subprocess.run(
        [*SUPERVISOR, "logs", "many", "-f", "-s", str(svc.socket)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit(30, 30),
        check=False,
    )
    assert capped.returncode == 1
    assert capped.stderr == "supervisor: following 40 instances needs 72 open files; the limit is 30\n"


def _ends(process: subprocess.Popen[bytes], timeout: float) -> int:
    """Its exit status; if it is still there after ``timeout``, a failure that says where it is
    (it failed once in a full run, 20 s after a SIGINT it should have ended on at once)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc = Path(f"/proc/{process.pid}")
        report = []
        for name in ("status", "wchan", "stack"):
            try:
                text = (proc / name).read_text()
            except OSError as exc:
                text = f"({exc.strerror})"
            if name == "status":
                keep = ("State", "Threads", "SigQ", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
                text = "\n".join(line for line in text.splitlines() if line.startswith(keep))
            report.append(f"{name}:\n{text}")
        process.kill()
        _, err = process.communicate(timeout=20)
        report.append(f"stderr:\n{err.decode(errors='replace')[-2000:]}")
        raise AssertionError(f"pid {process.pid} still runs {timeout} s on:\n" + "\n".join(report)) from None

