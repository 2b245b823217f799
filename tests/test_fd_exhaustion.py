"""Running out of descriptors at accept() fails those connections only: the service keeps answering.

A real `supervisor run` under a small hard RLIMIT_NOFILE (util-linux `prlimit`, so the service
cannot raise it), and more idle clients on its control socket than it has descriptors for.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from supervisor.api.client import Client

from .service_fixture import SUPERVISOR, answers, wait_until, write_manifest

LIMIT = 160


def test_a_flood_of_connections_past_the_fd_limit_leaves_the_service_answering(tmp_path: Path) -> None:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("util-linux prlimit is not installed: the service would raise its own limit")
    manifest = write_manifest(
        tmp_path, "version: 1\ninstances:\n  a: {command: [sleep, '300'], restart: {min_uptime: 0}}\n"
    )
    log = (tmp_path / "service.log").open("wb")
    service = subprocess.Popen(
        [prlimit, f"--nofile={LIMIT}:{LIMIT}", "--", *SUPERVISOR, "run", "-f", str(manifest)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    path = tmp_path / ".supervisor" / "control.sock"
    clients: list[socket.socket] = []
    try:
        wait_until(lambda: answers(Client(path, timeout=5)), service, 30, "the service answering")
        said = "control socket: cannot accept a connection (Too many open files)"
        log_file = tmp_path / "service.log"
        # Each connection the service accepts costs it a descriptor. Connect until it says it
        # ran out: a connect that times out only means the backlog is full for now (a slow,
        # loaded machine accepts more slowly than this loop connects), so go on.
        deadline = time.monotonic() + 60
        while said not in log_file.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the service never ran out of descriptors"
            assert len(clients) < 4 * LIMIT, "more connections than descriptors, and no EMFILE"
            assert service.poll() is None, "the service died at EMFILE"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2)
            try:
                sock.connect(str(path))
            except OSError:
                sock.close()
                continue
            clients.append(sock)
        assert service.poll() is None, "the service died at EMFILE"
        for sock in clients:
            sock.close()
        clients.clear()
        # Once descriptors are free again, the service answers (asyncio waits a second before it
        # accepts again after EMFILE; trio a little less).
        wait_until(lambda: answers(Client(path, timeout=5)), service, 30, "an answer after the flood")
        status = Client(path, timeout=5).status()
        assert [s["state"] for s in status] == ["running"]
    finally:
        for sock in clients:
            sock.close()
        service.terminate()
        code = service.wait(timeout=60)
        log.close()
    output = (tmp_path / "service.log").read_text(errors="replace")
    assert code == 0, output
    assert "Traceback" not in output, output
    assert "control socket: cannot accept a connection (Too many open files)" in output, output
