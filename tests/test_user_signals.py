"""Signals the service has no use for do not end it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from .service_fixture import ServiceProcess, pid_gone

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
