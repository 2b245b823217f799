"""``supervisor run`` as a whole: refusing a bad manifest, signals, its own log, its socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.api.client import Client

from .service_fixture import (
    SUPERVISOR,
    ServiceProcess,
    answers,
    children_of,
    pid_gone,
    processes_with,
    wait_until,
    write_manifest,
)

Start = Callable[..., ServiceProcess]


def test_a_bad_manifest_is_refused_before_anything_starts(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    manifest = write_manifest(
        tmp_path,
        f"""
        version: 1
        instances:
          fine:
            command: ["touch", "{marker}"]
          web:
            command: run-web
            restart: {{min_uptime: soon}}
            stoop: {{}}
        """,
    )
    result = subprocess.run(
        [*SUPERVISOR, "run", "-f", str(manifest)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "2 problems in the manifest:"
    assert f"{manifest}:7:" in result.stderr and "min_uptime" in result.stderr
    assert f"{manifest}:8:" in result.stderr and "stoop" in result.stderr
    assert not marker.exists() and not (tmp_path / ".supervisor").exists()


@pytest.mark.slow
def test_sigterm_stops_two_hundred_instances_and_leaves_nothing(service: Start) -> None:
    marker = "314.15"
    svc = service(
        f"""
        version: 1
        instances:
          many:
            command: ["sleep", "{marker}"]
            replicas: 200
            restart: {{min_uptime: 0}}
            stdout: null
            stderr: null
        """
    )
    svc.wait_for(["many"], "running", timeout=60)
    pids = [s["pid"] for s in svc.status().values()]
    assert len(pids) == 200 and all(pids)
    # running (min_uptime 0) can come before a child's exec of sleep, past the launcher's: then
    # its command line does not have the marker yet.
    svc.wait_until(lambda: sorted(processes_with(marker)) == sorted(pids), 20, "every sleep's exec")
    started = time.monotonic()
    assert svc.stop(timeout=60) == 0
    assert time.monotonic() - started < 30
    assert [pid for pid in pids if not pid_gone(pid)] == []
    assert processes_with(marker) == []
    assert "got SIGTERM" in svc.log() and svc.log().rstrip().endswith("stopped")


def test_a_second_sigint_kills_at_once(service: Start, tmp_path: Path) -> None:
    svc = service(
        """
        version: 1
        instances:
          stubborn:
            command: ["sh", "-c", "trap '' TERM; echo ready; exec sleep 300"]
            restart: {min_uptime: 0}
            stop: {timeout: 60s}
        """
    )
    svc.wait_for(["stubborn"], "running")
    svc.wait_output("stubborn", b"ready")  # the trap is set once it says so
    pid = svc.status()["stubborn"]["pid"]
    svc.proc.send_signal(signal.SIGINT)
    svc.wait_for(["stubborn"], "stopping")  # the graceful stop waits for up to 60s …
    started = time.monotonic()
    svc.proc.send_signal(signal.SIGINT)  # … unless told again
    assert svc.proc.wait(timeout=20) == 0
    assert time.monotonic() - started < 10
    assert pid_gone(pid)
    assert "killing every instance now" in svc.log()


def test_log_file_takes_the_services_own_log(service: Start, tmp_path: Path) -> None:
    log_file = tmp_path / "service-own.log"
    svc = service(
        """
        version: 1
        instances:
          one: {command: ["sleep", "300"], restart: {min_uptime: 0}}
        """,
        args=("--log-file", str(log_file)),
    )
    svc.wait_for(["one"], "running")
    assert svc.stop() == 0
    text = log_file.read_text()
    assert "supervising 1 instances" in text and "one: starting -> running" in text
    assert text.rstrip().endswith("stopped")
    assert "supervising" not in svc.log()  # nothing went to the service's stderr


def test_a_second_service_on_the_same_socket_is_refused(service: Start, tmp_path: Path) -> None:
    marker = "161.8"
    svc = service(
        f"""
        version: 1
        instances:
          one: {{command: ["sleep", "{marker}"], restart: {{min_uptime: 0}}}}
        """
    )
    svc.wait_for(["one"], "running")
    # A manifest of its own, with a state folder of its own (the same one is refused before the
    # socket is looked at: test_state_dir.py), and the first one's socket.
    other = tmp_path / "other"
    other.mkdir()
    manifest = write_manifest(
        other,
        f"""
        version: 1
        supervisor: {{control: {{socket: '{svc.socket}'}}}}
        instances:
          one: {{command: ["sleep", "{marker}"], restart: {{min_uptime: 0}}}}
        """,
    )
    second = subprocess.run(
        [*SUPERVISOR, "run", "-f", str(manifest)], capture_output=True, text=True, timeout=60, check=False
    )
    assert second.returncode == 1
    assert f"another service answers at {svc.socket}" in second.stderr
    assert "Traceback" not in second.stderr
    assert len(processes_with(marker)) == 1  # the second one started nothing
    assert svc.client().health()["pid"] == svc.pid


def test_a_stale_socket_file_is_replaced_and_other_files_are_not(service: Start, tmp_path: Path) -> None:
    state = tmp_path / ".supervisor"
    state.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(state / "control.sock"))
    stale.close()  # the file stays; nobody listens: what a killed service leaves
    svc = service("version: 1\ninstances: {one: {command: [sleep, '300']}}\n")
    assert svc.client().health()["ok"]
    assert svc.stop() == 0

    (state / "control.sock").write_text("not a socket")
    refused = subprocess.run(
        [*SUPERVISOR, "run", "-f", str(svc.manifest)], capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 1 and "is not a socket" in refused.stderr
    assert (state / "control.sock").read_text() == "not a socket"
    (state / "control.sock").unlink()


def test_the_service_runs_with_a_umask_that_would_expose_the_socket(service: Start) -> None:
    old = os.umask(0)
    try:
        svc = service("version: 1\ninstances: {one: {command: [sleep, '300']}}\n")
    finally:
        os.umask(old)
    assert oct(svc.socket.stat().st_mode & 0o777) == oct(0o600)


def test_an_orphaned_grandchild_is_adopted_and_reaped(service: Start, tmp_path: Path) -> None:
    """A double fork: the grandchild's parent exits, the service adopts it and reaps it when it ends."""
    pidfile = tmp_path / "orphan.pid"
    svc = service(
        f"""
        version: 1
        instances:
          forker:
            command: ["sh", "-c", "(sleep 271.8 & echo $$! > {pidfile}); echo ready; exec sleep 300"]
            restart: {{min_uptime: 0}}
        """
    )
    svc.wait_output("forker", b"ready")
    orphan = int(pidfile.read_text())
    assert _parent_of(orphan) == svc.pid  # the subshell is gone: the subreaper adopted the sleep
    os.kill(orphan, signal.SIGTERM)
    # A zombie still has its /proc entry: only a reap ends it.
    svc.wait_until(lambda: not os.path.exists(f"/proc/{orphan}"), 20, f"the reaping of orphan {orphan}")
    assert svc.status("forker")["forker"]["state"] == "running"  # its exit was not mistaken for the leader's


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def test_sigusr2_reopens_the_log_files_after_logrotate_moved_them(service: Start, tmp_path: Path) -> None:
    fifo = tmp_path / "poke"
    os.mkfifo(fifo)
    svc = service(
        f"""
        version: 1
        instances:
          talker:
            command: ["sh", "-c", "echo before; read line < {fifo}; echo after; exec sleep 300"]
            restart: {{min_uptime: 0}}
        """
    )
    svc.wait_output("talker", b"before")
    log = Path(svc.status("talker")["talker"]["log_files"]["stdout"])
    moved = log.with_name("talker.out.log.moved")
    log.rename(moved)  # what logrotate does, before it signals the service
    svc.proc.send_signal(signal.SIGUSR2)
    svc.wait_log("reopened 2 log files")
    assert log.read_bytes() == b""  # a new, empty file at the configured path
    with open(fifo, "w") as poke:
        poke.write("go\n")
    svc.wait_output("talker", b"after")
    assert moved.read_bytes() == b"before\n"
    assert log.read_bytes() == b"after\n"


def _unshare_works() -> bool:
    try:
        command = ["unshare", "--pid", "--fork", "--mount-proc", "true"]
        probe = subprocess.run(command, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare(1) and the right to make a PID namespace")
def test_as_pid_1_it_reaps_orphans_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`supervisor run` as the init of a PID namespace, as in a container."""
    marker = f"271.{os.getpid()}"  # this run's: an orphan of a killed earlier run may still be about
    manifest = write_manifest(
        tmp_path,
        f"""
        version: 1
        instances:
          forker:
            command: ["sh", "-c", "(sleep {marker} &); echo ready; exec sleep 300"]
            restart: {{min_uptime: 0}}
        """,
    )
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", *SUPERVISOR, "run", "-f", str(manifest)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        client = Client(tmp_path / ".supervisor" / "control.sock", timeout=30)
        wait_until(lambda: answers(client), unshare, 30, "an answer on the socket")
        assert client.health()["pid"] == 1  # the init of its namespace
        with client.follow("forker", lines=100) as chunks:
            assert any(b"ready" in chunk for chunk in chunks)
        (init,) = children_of(unshare.pid)  # the service's pid outside the namespace
        # "ready" may come before the backgrounded sleep has exec'd (it is the subshell until then).
        wait_until(lambda: processes_with(marker), unshare, 20, "the orphan's exec")
        (orphan,) = processes_with(marker)
        assert orphan in children_of(init)  # its parent exited: PID 1 adopted it
        os.kill(orphan, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{orphan}"), unshare, 20, "the reaping of the orphan")
        os.kill(init, signal.SIGTERM)  # from outside: PID 1 gets only the signals it handles
        assert unshare.wait(timeout=60) == 0
        stderr = unshare.stderr.read().decode() if unshare.stderr else ""
        assert "got SIGTERM" in stderr and stderr.rstrip().endswith("stopped")
    finally:
        if unshare.poll() is None:
            for init in children_of(unshare.pid):  # a SIGKILL of unshare alone leaves the namespace
                os.kill(init, signal.SIGKILL)  # its init's death kills everything in it
            unshare.kill()
            unshare.wait()
