"""The TCP listener's token check (api/auth.py) against what an unauthenticated client may send.

The token file holds bytes; a browser percent-encodes a non-ASCII token as UTF-8 in
``/?token=``, a program sends the same bytes in its ``Authorization`` header. Whatever
else comes, a wrong token is a 401, never a 500 with a traceback in the service's log.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import anyio
import pytest

from supervisor.api.auth import BearerAuth
from supervisor.api.http1 import HTTPServer
from supervisor.api.listeners import bind_tcp

from .service_fixture import ServiceProcess, with_tcp_listener
from .test_http1 import Answer, Reader, respond

Start = Callable[..., ServiceProcess]

TOKEN = "tökén-✓".encode()


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await respond(send, 200, b'{"hello": true}')


@asynccontextmanager
async def guarded(token: bytes) -> AsyncIterator[int]:
    """The real server, on a loopback port, with the real token check before a small app."""
    listener = bind_tcp("127.0.0.1:0")
    server = HTTPServer()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, [(listener, BearerAuth(hello, token))])
            with anyio.fail_after(30):
                yield listener.getsockname()[1]
            server.stop()
    finally:
        listener.close()


async def ask(port: int, target: bytes, *headers: bytes) -> Answer:
    """One GET, written byte for byte: no client library re-encodes what a hostile client sends."""
    head = b"\r\n".join([b"GET " + target + b" HTTP/1.1", b"Host: t", *headers]) + b"\r\n\r\n"
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(head)
        return await Reader(stream).answer()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "query",
    [b"token=%ff%fe", b"token=%C3", b"token=%e9", b"%ff=%ff&token=%fe"],
)
async def test_an_undecodable_query_token_is_a_401(query: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """``%ff`` is a byte like any other: the token is compared as bytes, never decoded to text."""
    with caplog.at_level(logging.ERROR):
        async with guarded(TOKEN) as port:
            answer = await ask(port, b"/?" + query)
    assert answer.status == 401 and answer.json() == {"error": "unauthorized", "details": []}
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.anyio
async def test_a_non_ascii_token_lets_in_by_header_and_by_query() -> None:
    async with guarded(TOKEN) as port:
        assert (await ask(port, b"/v1/health", b"Authorization: Bearer " + TOKEN)).status == 200
        exchange = await ask(port, b"/?token=" + quote_from_bytes(TOKEN).encode())
        assert exchange.status == 303 and exchange.headers["location"] == "/"
        cookie = exchange.headers["set-cookie"].split(";")[0].encode()
        assert (await ask(port, b"/v1/health", b"Cookie: " + cookie)).status == 200
        # The same text in another encoding is another token; so is a byte more.
        latin1 = quote_from_bytes(TOKEN.decode().replace("✓", "").encode("latin-1")).encode()
        for target in (b"/?token=" + latin1, b"/?token=" + quote_from_bytes(TOKEN + b"x").encode()):
            assert (await ask(port, target)).status == 401
        assert (await ask(port, b"/v1/health", b"Authorization: Bearer " + TOKEN[:-1])).status == 401


def _raw(port: int, target: bytes, *headers: bytes) -> bytes:
    """One request to the service over TCP, its whole answer (it closes after it)."""
    head = b"\r\n".join([b"GET " + target + b" HTTP/1.1", b"Host: t", b"Connection: close", *headers])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_the_service_takes_a_non_ascii_token_file_and_refuses_undecodable_ones(
    service: Start, tmp_path: Path
) -> None:
    manifest, port = with_tcp_listener(tmp_path, "placeholder", 'sleeper: {command: ["sleep", "300"]}')
    (tmp_path / "token").write_bytes(TOKEN + b"\n")  # bytes: not whatever the test's locale encodes
    svc = service(manifest)
    assert _raw(port, b"/?token=%ff%fe").startswith(b"HTTP/1.1 401 ")
    assert _raw(port, b"/v1/health", b"Authorization: Bearer " + TOKEN).startswith(b"HTTP/1.1 200 ")
    assert _raw(port, b"/?token=" + quote_from_bytes(TOKEN).encode()).startswith(b"HTTP/1.1 303 ")
    # Every answer above is written before its connection closes, and so is any log line of its.
    assert "Traceback" not in svc.log() and "control API failed" not in svc.log()
