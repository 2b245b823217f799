"""Connections across a re-exec: one between two requests is handed to the new service, open.

A client that keeps its connection (a dashboard, a script's HTTP session) and a client that
connected and has sent nothing yet (a browser's preconnect) go on, on the same connection,
with the new service: no close, no error, and the silent one holds nothing up.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import pytest

from supervisor.handoff.state import HandoffError, parse_state

from .helpers import handoff_record
from .service_fixture import ServiceProcess

HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: supervisor\r\n\r\n"


def ask_health(sock: socket.socket) -> dict[str, Any]:
    """``GET /v1/health`` on an open connection; the answer, which must keep the connection."""
    sock.sendall(HEALTH)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers.get("connection") != "close", headers
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-answer"
        body += chunk
    return json.loads(body)


def test_a_kept_and_a_silent_connection_go_on_with_the_new_service(
    service: Callable[..., ServiceProcess],
) -> None:
    svc = service("version: 1\ninstances:\n  a:\n    command: [sleep, '271.5']\n")
    connections = []
    try:
        kept, silent, marker = (socket.socket(socket.AF_UNIX) for _ in range(3))
        connections += [kept, silent, marker]
        for sock in connections:
            sock.settimeout(60)
        kept.connect(str(svc.socket))
        assert ask_health(kept)["handoffs"] == 0  # answered by the first service, kept open
        silent.connect(str(svc.socket))
        marker.connect(str(svc.socket))
        # Accepted in the backlog's order: once the marker is answered, the silent one was
        # accepted too, and waits in the old service for a request that has not come.
        assert ask_health(marker)["handoffs"] == 0
        done = svc.cli("reexec")
        assert done.returncode == 0, done.stderr + svc.log()
        assert ask_health(kept)["handoffs"] == 1
        assert ask_health(silent)["handoffs"] == 1
        assert ask_health(marker)["handoffs"] == 1
        assert svc.status("a")["a"]["restarts"] == 0
    finally:
        for sock in connections:
            sock.close()


@pytest.mark.parametrize(
    "connections",
    [
        {"fd": 5, "listener": 0},  # not a list
        [{"fd": -1, "listener": 0}],
        [{"fd": 5, "listener": 1e30}],
        [{"fd": "5", "listener": 0}],
        [{"fd": 5}],
        [[5, 0]],
        [{"fd": True, "listener": 0}],
    ],
)
def test_a_record_with_bad_handed_connections_is_refused(connections: object) -> None:
    record = handoff_record()
    record["service"]["listeners"]["connections"] = connections
    with pytest.raises(HandoffError, match=r"service\.listeners\.connections must be a list") as refused:
        parse_state(json.dumps(record).encode())
    assert "the running service goes on as it is" in str(refused.value)
    record["service"]["listeners"]["connections"] = [{"fd": 5, "listener": 0}]
    assert parse_state(json.dumps(record).encode())["service"]["listeners"]["connections"][0]["fd"] == 5
