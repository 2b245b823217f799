"""Hostile requests against a real service: huge bodies, NaN and absurd timeouts.

Each is answered with a 4xx and an ErrorBody, never a 500, and changes nothing.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from supervisor.api.client import connect_unix

from .service_fixture import ServiceProcess, with_tcp_listener
from .test_api import assert_error, http

Start = Callable[..., ServiceProcess]

MANIFEST = """
version: 1
instances:
  sleeper:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
  idle:
    command: ["sleep", "300"]
    autostart: false
"""
MiB = 1024 * 1024
JSON = {"content-type": "application/json"}


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def _read_answer(sock: socket.socket) -> bytes:
    """Until the server closes the connection (the 413 says ``Connection: close``)."""
    data = b""
    while len(data) < MiB:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed with our unread flood in its buffer: what came, came
            break
        if not chunk:
            break
        data += chunk
    return data


def test_a_declared_huge_body_is_refused_before_it_is_sent(service: Start) -> None:
    svc = service(MANIFEST)
    sock = connect_unix(svc.socket, timeout=10)
    with sock:
        sock.sendall(
            b"POST /v1/instances/start HTTP/1.1\r\nHost: supervisor\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n"
        )
        answer = _read_answer(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert b"at most 1048576 bytes, not 1073741824 bytes" in body


def test_a_chunked_flood_is_cut_at_the_limit_and_costs_no_memory(service: Start) -> None:
    svc = service(MANIFEST)
    before = _peak_rss(svc.pid)
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"[" * 64 * 1024)
    sent = 0
    sock = connect_unix(svc.socket, timeout=10)
    with sock:
        sock.sendall(
            b"POST /v1/instances/start HTTP/1.1\r\nHost: supervisor\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        # Send up to 256 MiB; the answer must come long before (and sending may then fail).
        while sent < 256 * MiB:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 64 * 1024
        answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer)
    assert sent < 64 * MiB, f"the service read {sent} bytes before it answered"
    assert _peak_rss(svc.pid) - before < 32 * MiB
    # The service is fine, and nothing started.
    assert svc.status("idle")["idle"]["state"] == "stopped"


def test_a_body_within_the_limit_is_read(service: Start) -> None:
    svc = service(MANIFEST)
    with http(svc) as api:
        names = ["x" * 1000] * 1000  # about 1 MB of JSON, under 1 MiB
        body = json.dumps({"names": names}).encode()
        assert len(body) < MiB
        assert_error(api.post("/v1/instances/start", content=body, headers=JSON), 404, "no instance matches")
        over = json.dumps({"names": ["x" * 1000] * 1100}).encode()
        assert_error(api.post("/v1/instances/start", content=over, headers=JSON), 413, "at most 1048576")


def _head_and_body(head_lines: list[bytes], body: bytes = b"") -> bytes:
    return b"\r\n".join([b"POST /v1/instances/start HTTP/1.1", b"Host: supervisor", *head_lines]) + (
        b"\r\n\r\n" + body
    )


CHUNKED = [b"Content-Type: application/json", b"Transfer-Encoding: chunked"]


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (_head_and_body([b"X-Big: " + b"a" * 50_000]), 431, "at most 16384 bytes"),
        (_head_and_body([b"X: b"] * 8000), 431, "at most 16384 bytes"),
        (_head_and_body(CHUNKED, b"zz\r\n"), 400, "illegal chunk header"),
        (_head_and_body(CHUNKED, b"1" * 24 + b"\r\n"), 400, "illegal chunk header"),
        (_head_and_body(CHUNKED, b"FFFFFFFFFFFF\r\n"), 413, "not a chunk of 281474976710655 bytes"),
    ],
    ids=["50-kb-head", "8000-headers", "not-hex-chunk", "24-digit-chunk", "huge-chunk"],
)
def test_a_head_or_chunk_out_of_bounds_is_answered_in_one_write(
    service: Start, request_bytes: bytes, status: int, says: str
) -> None:
    """Sent at once, as a client's one write: a whole head of up to 64 KiB passed h11's own bound,
    and a chunk header that h11 refuses (or that waits for a terabyte) closed without an answer."""
    svc = service(MANIFEST)
    sock = connect_unix(svc.socket, timeout=5)  # the huge chunk: at once, not after the read timeout
    with sock:
        sock.sendall(request_bytes)
        answer = _read_answer(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"connection: close" in head.lower(), answer
    assert says in json.loads(body)["error"]
    assert "Traceback" not in svc.log()
    assert svc.status("idle")["idle"]["state"] == "stopped"


@pytest.mark.parametrize(
    ("route", "timeout"),
    [
        ("start", "NaN"),
        ("start", "Infinity"),
        ("start", "-Infinity"),
        ("start", "1e999"),
        ("start", '"99999999999d"'),
        ("start", "604801"),
        ("restart", "NaN"),
        ("stop", "1e308"),
        ("wait", "NaN"),
        ("wait", '"1000000h"'),
    ],
)
def test_nan_and_absurd_timeouts_are_a_400(service: Start, route: str, timeout: str) -> None:
    svc = service(MANIFEST)
    extra = ', "state": "running"' if route == "wait" else ""
    raw = f'{{"names": ["idle"], "timeout": {timeout}{extra}}}'.encode()
    # NaN and the infinities are not JSON: refused as the body is read, by their column; a number
    # or a duration past a week is refused by the field's name.
    not_json = timeout in ("NaN", "Infinity", "-Infinity", "1e999")
    with http(svc) as api:
        answer = api.post(f"/v1/instances/{route}", content=raw, headers=JSON)
        assert_error(answer, 400, "line 1 column 3" if not_json else "timeout")
    assert svc.status("idle")["idle"]["state"] == "stopped"


def test_the_tcp_listener_has_the_same_limit(service: Start, tmp_path: Path) -> None:
    token = "limits-token"
    manifest, port = with_tcp_listener(
        tmp_path,
        token,
        """
      sleeper: {command: ["sleep", "300"]}
        """,
    )
    service(manifest)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as tcp:
        headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
        big = b'{"names": [' + b'"a",' * (MiB // 4) + b'"a"]}'
        assert_error(tcp.post("/v1/instances/stop", content=big, headers=headers), 413, "at most")
        # Without the token, the body is not even looked at.
        assert tcp.post("/v1/instances/stop", content=big).status_code == 401
