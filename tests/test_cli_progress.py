"""Progress for long CLI waits: a live count on a terminal's stderr (a real pty); silence otherwise."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .service_fixture import SUPERVISOR, ServiceProcess
from .test_cli import ok

Start = Callable[..., ServiceProcess]


def _manifest(fifo: Path) -> str:
    # `slow` takes its time to stop: on TERM it waits for a line on the fifo (the test's go-ahead).
    return f"""
    version: 1
    instances:
      fast:
        command: ["sleep", "300"]
        restart: {{min_uptime: 0}}
      slow:
        command: ["sh", "-c", "trap 'read x <> {fifo}; exit 0' TERM; echo up; while :; do sleep 0.1; done"]
        restart: {{min_uptime: 0}}
        stop: {{timeout: 60s}}
    """


SLEEPERS = """
version: 1
instances:
  fast:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
  slow:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
"""


class Terminal:
    """The CLI with its stderr on a real pty (stdout a pipe), and what it wrote there."""

    def __init__(self, svc: ServiceProcess, *args: str) -> None:
        master, slave = os.openpty()
        self.master = master
        self.seen = b""
        self.proc = subprocess.Popen(
            [*SUPERVISOR, *args, "-s", str(svc.socket)], stdout=subprocess.PIPE, stderr=slave
        )
        os.close(slave)

    def read_until(self, needle: bytes, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} did not come within {timeout}s; got {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the CLI has gone, with its end of the pty
                    chunk = b""
                assert chunk, f"the terminal closed before {needle!r}; got {self.seen!r}"
                self.seen += chunk
        return self.seen

    def finish(self, timeout: float = 30) -> tuple[int, str, bytes]:
        """Exit status, stdout, and all the terminal got."""
        out, _ = self.proc.communicate(timeout=timeout)
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        os.close(self.master)
        return self.proc.returncode, out.decode(), self.seen


def test_stop_counts_on_a_terminal_while_it_waits(service: Start, tmp_path: Path) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    svc = service(_manifest(fifo))
    ok(svc.cli("wait", "--all", "--state", "running"))
    svc.wait_output("slow", b"up")
    term = Terminal(svc, "stop", "--all")
    try:
        term.read_until(b"\rstopping: 0/2 done\x1b[K")
        term.read_until(b"\rstopping: 1/2 done\x1b[K")  # fast is down; slow waits for the go-ahead
        assert term.proc.poll() is None
        with open(fifo, "w") as go:
            go.write("go\n")
        code, out, seen = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()
    assert code == 0, out
    assert out == "fast: stopped\nslow: stopped\n"
    assert seen.endswith(b"\r\x1b[K"), seen  # the line is erased before the results


def test_wait_and_restart_count_too(service: Start) -> None:
    svc = service(SLEEPERS)
    ok(svc.cli("wait", "fast", "--state", "running"))
    term = Terminal(svc, "wait", "--all", "--state", "running")
    code, out, seen = term.finish()
    assert code == 0
    assert [line.split(" (")[0] for line in out.splitlines()] == ["fast: running", "slow: running"]
    assert seen.startswith(b"\rwaiting: ") and b"/2 done" in seen and seen.endswith(b"\r\x1b[K"), seen

    # restart counts only what went round again: nothing is done at the start.
    term = Terminal(svc, "restart", "fast")
    code, out, seen = term.finish()
    assert code == 0 and out.startswith("fast: running (pid ")
    assert seen.startswith(b"\rrestarting: 0/1 done\x1b[K") and seen.endswith(b"\r\x1b[K"), seen


def test_no_terminal_no_progress(service: Start) -> None:
    svc = service(SLEEPERS)
    ok(svc.cli("wait", "--all", "--state", "running"))
    for args in (("restart", "fast"), ("wait", "--all", "--state", "running"), ("start", "--all")):
        result = ok(svc.cli(*args))
        assert result.stderr == "", args
        assert "\r" not in result.stdout and "done" not in result.stdout
