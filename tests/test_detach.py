"""``supervisor run -d``: a real service started in the background, its pidfile, and its failures."""

from __future__ import annotations

import os
import select
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.pidfile import PidfileError, live_service

from .service_fixture import SUPERVISOR, write_manifest
from .test_cli import ok, run

MANIFEST = """
version: 1
instances:
  web:
    command: ["sleep", "300"]
    replicas: 2
    restart: {min_uptime: 0}
  job:
    command: ["sh", "-c", "echo job done"]
  later:
    command: ["sleep", "300"]
    autostart: false
"""


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    """True once ``pid`` (not our child) has ended; through a pidfd, bounded by ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _service_pid(folder: Path) -> int | None:
    """The pid a detached service in ``folder`` reports on its socket, if one answers."""
    from supervisor.api.client import Client, ClientError

    try:
        return int(Client(folder / ".supervisor" / "control.sock", timeout=5).health()["pid"])
    except ClientError:
        return None


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """``supervisor run -d ARGS`` in tmp_path; whatever it left running is stopped at the end."""
    pids: set[int] = set()

    def start(*args: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess[str]:
        result = run("run", "-d", *args, cwd=cwd)
        if (pid := _service_pid(cwd)) is not None:
            pids.add(pid)
        return result

    yield start
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        if not _wait_gone(pid):
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the detached service {pid} ignored SIGTERM")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def test_detach_returns_once_up_and_leaves_the_callers_session(
    detached: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    write_manifest(tmp_path, MANIFEST)
    pidfile = tmp_path / "run" / "svc.pid"
    pidfile.parent.mkdir()
    # capture_output: pipes. Had the service kept the caller's stdout, this would never return.
    result = ok(detached("--pidfile", str(pidfile)))
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert result.stdout.startswith("NAME")
    assert rows["web-0"][1] == rows["web-1"][1] == "running" and rows["web-0"][3].isdigit()
    assert rows["job"][1] == "exited" and rows["later"][1] == "stopped"
    pid = int(pidfile.read_text())
    assert result.stderr == f"the service runs (pid {pid}, log {tmp_path / '.supervisor' / 'service.log'})\n"

    fields = _stat(pid)  # state, ppid, pgrp, session, tty_nr, ...
    assert int(fields[3]) != pid, "a session leader could acquire a controlling terminal"
    assert int(fields[3]) != os.getsid(0), "still in the caller's session"
    assert int(fields[4]) == 0, "the service has a controlling terminal"
    log = tmp_path / ".supervisor" / "service.log"
    assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
    assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == str(log)
    assert "supervising 4 instances" in log.read_text()

    statuses = ok(run("status", cwd=tmp_path)).stdout
    assert "web-0" in statuses and "running" in statuses
    ok(run("shutdown", cwd=tmp_path))
    assert _wait_gone(pid)
    assert not pidfile.exists() and not (tmp_path / ".supervisor" / "control.sock").exists()
    assert "stopped" in log.read_text()


def test_a_live_pidfile_refuses_a_stale_one_is_replaced(
    detached: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    write_manifest(tmp_path, MANIFEST)
    pidfile = tmp_path / "svc.pid"
    # Stale: garbage with a NUL, a pid alive but not a service (this test's own), a huge one, nothing.
    for stale in (b"12\x0034\n", f"{os.getpid()}\n".encode(), b"9" * 5000, b"-1\n", b""):
        pidfile.write_bytes(stale)
        assert live_service(pidfile) is None
    pidfile.unlink()
    pidfile.mkdir()
    with pytest.raises(PidfileError, match="is a folder"):
        live_service(pidfile)
    pidfile.rmdir()
    target = tmp_path / "elsewhere"
    target.write_text("keep me\n")
    pidfile.symlink_to(target)
    started = ok(detached("--pidfile", str(pidfile)))
    pid = int(pidfile.read_text())
    assert not pidfile.is_symlink() and target.read_text() == "keep me\n", started.stderr

    assert live_service(pidfile) == pid
    again = detached("--pidfile", str(pidfile))
    assert again.returncode == 1 and again.stdout == "", again.stderr
    refusal = f"supervisor: pidfile {pidfile} names a running service (pid {pid}): stop it first\n"
    assert again.stderr == refusal, again.stderr
    other = tmp_path / "other"
    other.mkdir()
    write_manifest(other, MANIFEST)
    foreground = run("run", "--pidfile", str(pidfile), cwd=other)
    assert foreground.returncode == 1, foreground.stderr
    refused = f"cannot start: pidfile {pidfile} names a running service (pid {pid})"
    assert refused in foreground.stderr, foreground.stderr
    assert int(pidfile.read_text()) == pid  # the refused service did not remove the live one's file


def test_a_service_that_cannot_start_says_why(
    detached: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    ok(detached())
    second = detached()
    assert second.returncode == 1 and second.stdout == ""
    log = tmp_path / ".supervisor" / "service.log"
    assert second.stderr.startswith(f"supervisor: the service could not start; from {log}:\n")
    assert "is in use by another service" in second.stderr  # the state folder's lock
    ok(run("shutdown", cwd=tmp_path))

    bad = write_manifest(tmp_path, "version: 1\ninstances:\n  x: {command: []}\n", name="bad.yaml")
    refused = detached("-f", str(bad))
    assert refused.returncode == 1 and f"{bad}:3:16: instances.x.command" in refused.stderr
    nowhere = detached("--log-file", str(tmp_path / "missing" / "service.log"), "-f", str(manifest))
    assert nowhere.returncode == 1
    assert nowhere.stderr.startswith(f"supervisor: cannot open the log file {tmp_path / 'missing'}")


def test_instances_that_do_not_come_up_exit_3(
    detached: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    write_manifest(
        tmp_path,
        """
        version: 1
        instances:
          good: {command: ["sleep", "300"], restart: {min_uptime: 0}}
          broken:
            command: ["sh", "-c", "exit 7"]
            restart: {policy: always, min_uptime: 5s, max_restarts: 1, backoff: {initial: 0.01s}}
        """,
    )
    result = detached()
    assert result.returncode == 3
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert rows == {"good": "running", "broken": "failed"}
    assert "not up: broken (gave up" in result.stderr and "the service runs (pid" in result.stderr
    ok(run("shutdown", cwd=tmp_path))


def test_detach_is_in_the_help() -> None:
    usage = ok(subprocess.run([*SUPERVISOR, "run", "--help"], capture_output=True, text=True, check=False))
    assert "--detach" in usage.stdout and "--pidfile" in usage.stdout and "--ready-fd" not in usage.stdout


def _controlling_terminal() -> None:
    """In the child before exec: a session of its own, with the pty on stdin as its terminal."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_closing_the_terminal_does_not_reach_the_service(
    detached: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    write_manifest(tmp_path, MANIFEST)
    master, slave = os.openpty()
    try:
        cli = subprocess.Popen(
            [*SUPERVISOR, "run", "-d"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=tmp_path,
            preexec_fn=_controlling_terminal,
        )
        os.close(slave)
        seen = b""
        while b"the service runs" not in seen:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, f"no answer from run -d on its terminal: {seen!r}"
            seen += os.read(master, 4096)
        assert cli.wait(timeout=30) == 0, seen
        pid = _service_pid(tmp_path)
        assert pid is not None
    finally:
        os.close(master)  # hang up: the terminal is gone
    second = detached()  # (registers the running service with the fixture, should this test fail)
    assert second.returncode == 1 and "is in use by another service" in second.stderr
    assert _service_pid(tmp_path) == pid and ok(run("status", cwd=tmp_path)).stdout.count("running") == 2
    ok(run("shutdown", cwd=tmp_path))
    assert _wait_gone(pid)
    log = (tmp_path / ".supervisor" / "service.log").read_text()
    # In the terminal's session it would have had a SIGHUP, which the service takes as "reload".
    assert "got SIGHUP" not in log and "reloaded" not in log and "supervising 4 instances" in log, log
