"""A service started with its standard streams closed: nothing of its own may take their place."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from supervisor.api.client import Client

from .service_fixture import SUPERVISOR, answers, wait_until, write_manifest


def test_a_service_started_without_0_1_2_gives_them_dev_null_not_its_event_loop(tmp_path: Path) -> None:
    """``run <&- >&- 2>&-``: its first descriptors (the event loop's epoll, its signal pipe) filled
    0 to 2, an instance with ``stderr: inherit`` was handed the signal pipe, and the byte 0x0f it
    wrote there was read as SIGTERM: every instance stopped and the service ended."""
    marker = tmp_path / "written"
    manifest = write_manifest(
        tmp_path,
        f"""
        version: 1
        instances:
          k:
            command: [sh, -c, "printf '\\\\017' >&2; printf '\\\\001' >&2; touch {marker}; exec sleep 300"]
            stderr: inherit
            restart: {{min_uptime: 0}}
          t: {{command: [sleep, "300"], restart: {{min_uptime: 0}}}}
        """,
    )
    closed = ["sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh"]
    proc = subprocess.Popen([*closed, *SUPERVISOR, "run", "-f", str(manifest)])
    try:
        client = Client(tmp_path / ".supervisor" / "control.sock", timeout=10)
        wait_until(lambda: answers(client), proc, 30, "the service answers")
        for number in (0, 1, 2):
            assert os.readlink(f"/proc/{proc.pid}/fd/{number}") == os.devnull
        wait_until(marker.exists, proc, 30, "k wrote its bytes")
        states = {s["name"]: s["state"] for s in client.status([])}
        assert states == {"k": "running", "t": "running"}, states
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
