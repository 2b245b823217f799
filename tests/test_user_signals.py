"""Signals the service has no use for do not end it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from .service_fixture import ServiceProcess, children_of, pid_gone

Start = Callable[..., ServiceProcess]


def test_sigusr1_leaves_the_service_and_its_instances_running(service: Start, tmp_path: Path) -> None:
    """USR1 ended the service (its default action), and the guardian SIGKILLed every instance:
    a logrotate recipe written for nginx sends it. The service takes USR2 to reopen its logs;
    USR1 does nothing, and the instances keep theirs (a handler, not an ignored signal, is what
    the service holds: what it starts gets the default back)."""
    svc = service(
        """
        version: 1
        instances:
          sleeper: {command: [sleep, "300"], restart: {min_uptime: 0}}
        """
    )
    svc.wait_for(["sleeper"], "running")
    pid = svc.status("sleeper")["sleeper"]["pid"]
    for _ in range(3):
        os.kill(svc.pid, signal.SIGUSR1)
    svc.wait_for(["sleeper"], "running")  # an answer after the signals: the service is there
    assert svc.proc.poll() is None and not pid_gone(pid)
    assert svc.status("sleeper")["sleeper"]["pid"] == pid
    # What the service starts has USR1's and USR2's defaults, not ignored ones.
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
    assert not ignored & (1 << (signal.SIGUSR1 - 1)) and not ignored & (1 << (signal.SIGUSR2 - 1))


def _checking(pid: int) -> bool:
    """Whether ``pid`` is the manifest's check: a fork of the service, which names itself so."""
    try:
        return Path(f"/proc/{pid}/comm").read_bytes().strip() == b"procward-check"
    except OSError:
        return False


def _state(pid: int) -> bytes:
    return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]


def test_a_sighup_while_the_service_starts_is_a_reload_once_it_listens(
    service: Start, tmp_path: Path
) -> None:
    """SIGHUP means "reload", never "stop": sent while the manifest is checked (a `systemctl
    reload` or a config tool right after a start), it ended the service. It is remembered, and
    the service reloads once it listens: a manifest edited while the start read the old one
    is applied. The check is held (SIGSTOP) so that the signal surely comes in that window."""
    # 1,000 entries: the check takes long enough (most of a second) to be caught and stopped.
    entries = "".join(f"  i{n}: {{command: [sleep, '300'], autostart: false}}\n" for n in range(1000))
    first = "version: 1\ninstances:\n  a: {command: [sleep, '300'], restart: {min_uptime: 0}}\n" + entries
    svc = service(first, ready=False, default_signals=(signal.SIGHUP,))
    check = None
    try:
        svc.wait_until(
            lambda: any(_checking(pid) for pid in children_of(svc.pid)), 30, "the manifest's check"
        )
        check = next(pid for pid in children_of(svc.pid) if _checking(pid))
        os.kill(check, signal.SIGSTOP)
        svc.wait_until(lambda: _state(check) in (b"T", b"Z"), 30, "the check stopped")
        assert _state(check) == b"T", "the check ended before it could be stopped: make the manifest longer"
        status = Path(f"/proc/{svc.pid}/status").read_text().splitlines()
        caught = int(next(line for line in status if line.startswith("SigCgt:")).split()[1], 16)
        assert caught & (1 << (signal.SIGHUP - 1))  # past the interpreter's own start-up
        (tmp_path / "supervisor.yaml").write_text(
            first + "  b: {command: [sleep, '301'], restart: {min_uptime: 0}}\n"
        )
        for _ in range(2):  # two are one reload
            os.kill(svc.pid, signal.SIGHUP)
    finally:
        if check is not None:
            os.kill(check, signal.SIGCONT)
    svc.wait_ready()
    svc.wait_log("got SIGHUP while starting: reloading the manifest")
    svc.wait_log("reloaded")
    svc.wait_for(["a", "b"], "running")
    assert svc.log().count("got SIGHUP while starting") == 1
