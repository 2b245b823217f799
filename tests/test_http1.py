"""The control API's HTTP/1.1 server (supervisor/api/http1.py) over real unix sockets, under both backends.

Each test runs a server in-process on a socket bound in tmp_path, with a small ASGI
app whose routes do what the test needs (echo a body, stream until told, block, raise),
and talks to it with raw bytes: the client side is written by hand here, not h11, so
that a misreading of HTTP shared by both sides cannot hide.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from supervisor.api.client import unix_address
from supervisor.api.http1 import HTTPServer, Limits
from supervisor.api.limits import BodyLimit
from supervisor.api.listeners import bind_unix

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


@dataclass
class App:
    """An ASGI app with a route per behaviour under test; it records what it saw."""

    disconnected: anyio.Event = field(default_factory=anyio.Event)
    in_flight: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    dropped: anyio.Event = field(default_factory=anyio.Event)
    send_errors: list[BaseException] = field(default_factory=list)
    chunks_sent: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        route = getattr(self, "route_" + scope["path"].strip("/").replace("-", "_"), self.route_echo)
        await route(scope, receive, send)

    async def route_echo(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message["body"]
            if not message["more_body"]:
                break
        answer = {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode(),
            "body": body.decode(),
            "http_version": scope["http_version"],
        }
        await respond(send, 200, json.dumps(answer).encode())

    async def route_stream(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A chunk, then (once released) another and the end; or the client's disconnect first."""
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                if (await receive())["type"] == "http.disconnect":
                    self.disconnected.set()
                    tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"second", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            tg.cancel_scope.cancel()

    async def route_big(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """64 MiB, a MiB a send: far more than any socket buffer holds."""
        self.in_flight.set()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            for _ in range(64):
                await send({"type": "http.response.body", "body": b"x" * MiB, "more_body": True})
                self.chunks_sent += 1
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError as exc:
            self.send_errors.append(exc)
            self.dropped.set()

    async def route_slow(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.in_flight.set()
        await self.release.wait()
        await respond(send, 200, b"done")

    async def route_raise(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("the app broke")

    async def route_raise_mid(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("the app broke mid-stream")

    async def route_silent(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        return


async def respond(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def serving(
    tmp_path: Path, app: Any, limits: Limits | None = None
) -> AsyncIterator[tuple[HTTPServer, Path]]:
    """A server on a fresh unix socket; stopped (gracefully) at the end of the block."""
    path = tmp_path / "http.sock"
    listener = bind_unix(path)
    server = HTTPServer(limits or Limits())
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, [(listener, app)])
            with anyio.fail_after(30):
                yield server, path
            server.stop()
    finally:
        listener.close()


def raw_connect(path: Path, *, rcvbuf: int | None = None) -> socket.socket:
    """A plain connected socket: nothing reads it unless the test does (under asyncio, a stream
    of anyio's reads its socket into memory in the background, and so would not stall)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    with unix_address(path) as address:
        sock.connect(address)
    return sock


async def connect(path: Path) -> SocketStream:
    return await SocketStream.from_socket(raw_connect(path))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Reader:
    """Answers read off a stream by hand: Content-Length, chunked, or until the close."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def more(self) -> bytes:
        try:
            data = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            return b""
        self.buffer += data
        return data

    async def until(self, separator: bytes) -> bytes:
        while separator not in self.buffer:
            assert await self.more(), f"closed before {separator!r}: {self.buffer!r}"
        line, _, self.buffer = self.buffer.partition(separator)
        return line

    async def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            assert await self.more(), f"closed after {len(self.buffer)} of {size} bytes"
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def head(self) -> tuple[int, dict[str, str]]:
        lines = (await self.until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice"
            headers[name.lower()] = value.strip()
        return int(status), headers

    async def chunk(self) -> bytes:
        size = int((await self.until(b"\r\n")).split(b";")[0], 16)
        data = await self.exactly(size)
        assert await self.exactly(2) == b"\r\n"
        return data

    async def answer(self, *, head_request: bool = False) -> Answer:
        status, headers = await self.head()
        if head_request:
            return Answer(status, headers, b"")
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while chunk := await self.chunk():  # the last, empty one ends with the blank line
                body += chunk
        elif "content-length" in headers:
            body = await self.exactly(int(headers["content-length"]))
        else:
            while await self.more():
                pass
            body, self.buffer = self.buffer, b""
        return Answer(status, headers, body)

    async def closed(self) -> bool:
        """True once the server closed the connection (after what it sent is read)."""
        while await self.more():
            pass
        return True


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: t", *extra]) + "\r\n\r\n").encode("latin-1")


def post_head(length: int, *extra: str) -> bytes:
    """A POST /echo's head declaring ``length`` bytes of body (which the test sends, or not)."""
    lines = ["POST /echo HTTP/1.1", "Host: t", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_keep_alive_serves_requests_in_turn_on_one_connection(tmp_path: Path) -> None:
    async with serving(tmp_path, App()) as (server, path), await connect(path) as stream:
        reader = Reader(stream)
        for n in range(3):
            await stream.send(get(f"/echo?n={n}"))
            answer = await reader.answer()
            assert answer.status == 200 and answer.json()["query"] == f"n={n}"
            assert "server" not in answer.headers and "connection" not in answer.headers
        assert server.accepted == 1


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with serving(tmp_path, App()) as (_server, path), await connect(path) as stream:
        post = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody"
        await stream.send(get("/echo?n=1") + post + get("/echo?n=3"))
        reader = Reader(stream)
        answers = [(await reader.answer()).json() for _ in range(3)]
        assert [(a["method"], a["query"], a["body"]) for a in answers] == [
            ("GET", "n=1", ""),
            ("POST", "", "body"),
            ("GET", "n=3", ""),
        ]


async def test_a_chunked_body_and_a_content_length_body_reach_the_app(tmp_path: Path) -> None:
    async with serving(tmp_path, App()) as (_server, path), await connect(path) as stream:
        reader = Reader(stream)
        await stream.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        await stream.send(b"5\r\nhello\r\n")
        await stream.send(b"1;ext=1\r\n \r\n5\r\nworld\r\n")
        await stream.send(b"0\r\n\r\n")
        assert (await reader.answer()).json()["body"] == "hello world"
        await stream.send(b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nab")
        await stream.send(b"cde")
        assert (await reader.answer()).json()["body"] == "abcde"


async def test_expect_100_continue_is_answered_before_the_body_is_sent(tmp_path: Path) -> None:
    async with serving(tmp_path, App()) as (_server, path), await connect(path) as stream:
        reader = Reader(stream)
        await stream.send(post_head(2, "Expect: 100-continue"))
        status, _ = await reader.head()
        assert status == 100
        await stream.send(b"ok")
        assert (await reader.answer()).json()["body"] == "ok"


async def test_head_has_the_get_headers_and_no_body(tmp_path: Path) -> None:
    async with serving(tmp_path, App()) as (_server, path), await connect(path) as stream:
        reader = Reader(stream)
        await stream.send(b"HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\n" + get("/echo?after-head"))
        head = await reader.answer(head_request=True)
        assert head.status == 200 and int(head.headers["content-length"]) > 0
        # No body bytes came between: the next answer starts right where the head ended.
        assert (await reader.answer()).json()["query"] == "after-head"


async def test_connection_close_from_the_client_is_honoured(tmp_path: Path) -> None:
    async with serving(tmp_path, App()) as (_server, path), await connect(path) as stream:
        reader = Reader(stream)
        await stream.send(get("/echo", "Connection: close"))
        answer = await reader.answer()
        assert answer.status == 200 and answer.headers["connection"] == "close"
        assert await reader.closed()


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (get("/echo", "X-Big: " + "a" * 100_000), 431, "at most 16384 bytes"),
        (b"GET /echo HTTP/1.1 extra\r\nHost: t\r\n\r\n", 400, "malformed"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "malformed"),  # TLS hello
        (get("/echo", "X-Nul: a\x00b"), 400, "malformed"),
        (b"GET /echo HTTP/1.1\r\n\r\n", 400, "Host"),
        (post_head(1, "Content-Length: 2"), 400, "malformed"),
        (post_head(-1), 400, "malformed"),
    ],
    ids=["oversize-head", "bad-request-line", "tls", "nul-in-header", "no-host", "two-lengths", "negative"],
)
async def test_a_malformed_request_is_a_400_and_a_close(
    tmp_path: Path, request_bytes: bytes, status: int, says: str
) -> None:
    async with serving(tmp_path, App()) as (server, path):
        async with await connect(path) as stream:
            await stream.send(request_bytes)
            reader = Reader(stream)
            answer = await reader.answer()
            assert answer.status == status, answer
            assert answer.headers["connection"] == "close"
            assert says in answer.json()["error"] and answer.json()["details"] == []
            assert await reader.closed()
        async with await connect(path) as stream:  # and the server serves the next client
            await stream.send(get("/echo"))
            assert (await Reader(stream).answer()).status == 200
        await server.until(lambda: server.connections == 0)


def head_of(size: int) -> bytes:
    """A GET whose request line and headers are ``size`` bytes in all, blank line included."""
    bare = get("/echo", "X-Pad: ")
    return get("/echo", "X-Pad: " + "p" * (size - len(bare)))


@pytest.mark.parametrize(
    "request_bytes",
    [
        head_of(16 * 1024 + 1),
        get("/echo", "X-Big: " + "a" * 50_000),
        get("/echo", *["X: b"] * 8000),
        get("/echo", "X-Pad:" + " " * 40_000 + "v"),  # what h11 strips from a value counts as well
        get("/echo") + get("/echo", "X-Big: " + "a" * 20_000),  # the second of two
    ],
    ids=["one-byte-over", "50-kb", "8000-headers", "spaces", "pipelined"],
)
async def test_a_head_over_the_limit_is_a_431_when_it_arrives_in_one_write(
    tmp_path: Path, request_bytes: bytes
) -> None:
    """h11 bounds only a head still incomplete: a whole one in one read (up to 64 KiB) passed."""
    assert len(request_bytes) < 65536  # one read of the server's takes it all
    async with serving(tmp_path, App()) as (server, path):
        async with await connect(path) as stream:
            await stream.send(head_of(16 * 1024))  # at the limit: served, and the connection kept
            reader = Reader(stream)
            assert (await reader.answer()).status == 200
            await stream.send(request_bytes)
            answers = [await reader.answer()]
            if answers[0].status == 200:  # the pipelined case: its first request is fine
                answers.append(await reader.answer())
            assert answers[-1].status == 431 and answers[-1].headers["connection"] == "close"
            assert "at most 16384 bytes" in answers[-1].json()["error"]
            assert await reader.closed()
        await server.until(lambda: server.connections == 0)


CHUNKED_POST = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "body",
    [b"zz\r\n", b"1" * 24 + b"\r\n", b"5\r\nhello\r\nx\r\n", b"5\r\nhelloXX", b"5;a\nb\r\nhello\r\n"],
    ids=["not-hex", "24-digits", "second-not-hex", "bad-chunk-end", "lf-in-extension"],
)
async def test_a_malformed_chunk_is_a_400_and_a_close(tmp_path: Path, body: bytes) -> None:
    """Found while the app reads the body, which can only be told that the client left: the
    server answers it once the app has returned (before, the connection closed unanswered)."""
    async with serving(tmp_path, App()) as (server, path):
        async with await connect(path) as stream:
            await stream.send(CHUNKED_POST + body)
            reader = Reader(stream)
            answer = await reader.answer()
            assert answer.status == 400 and answer.headers["connection"] == "close"
            assert "malformed HTTP/1.1 request" in answer.json()["error"]
            assert "chunk" in answer.json()["error"]
            assert await reader.closed()
        await server.until(lambda: server.connections == 0)


@pytest.mark.parametrize(
    "parts",
    [
        [b"FFFFFFFFFFFF\r\n"],
        [b"FFFFFFFFFFFF;ext=1 \r\n" + b"x" * 1000],
        [b"5\r\nhello\r\nFFFFFFFFFFFF\r\n"],
        [b"5\r\nhello\r", b"\nFFFFFFFFFFFF\r\n"],
        [b"5\r\nhello", b"\r\n", b"FFFFFF", b"FFFFFF\r\n"],
    ],
    ids=["header-only", "with-data", "second-chunk", "split-crlf", "split-header"],
)
async def test_a_chunk_declared_past_the_body_limit_is_a_413_at_its_header(
    tmp_path: Path, parts: list[bytes]
) -> None:
    """The answer comes at once, not after the read timeout (an hour here) with nothing."""
    async with serving(tmp_path, App(), Limits(read_timeout=3600)) as (server, path):
        async with await connect(path) as stream:
            await stream.send(CHUNKED_POST)
            for part in parts:
                await anyio.wait_all_tasks_blocked()  # the server has taken what came before
                await stream.send(part)
            reader = Reader(stream)
            with anyio.fail_after(10):
                answer = await reader.answer()
            assert answer.status == 413 and answer.headers["connection"] == "close"
            assert answer.json()["error"] == (
                "the request body may hold at most 1048576 bytes, not a chunk of 281474976710655 bytes"
            )
            assert await reader.closed()
        await server.until(lambda: server.connections == 0)


async def test_only_a_chunk_header_is_read_as_a_chunk_size(tmp_path: Path) -> None:
    """Data that looks like a huge chunk header, a chunk end split between writes, and a chunk of
    exactly the limit: all taken; one byte more in a header is the 413."""
    limits = Limits(body_bytes=16)
    async with serving(tmp_path, App(), limits) as (_server, path), await connect(path) as stream:
        reader = Reader(stream)
        for parts, body in (
            ([b"c\r\n", b"FFFFFFFFFF\r\n", b"\r\n0\r\n\r\n"], "FFFFFFFFFF\r\n"),
            ([b"2\r\nab\r", b"\n2\r\ncd", b"\r", b"\n0\r\nX-Trailer: FFFFFFFF\r\n\r\n"], "abcd"),
            ([b"10\r\n" + b"s" * 16 + b"\r\n0\r\n\r\n"], "s" * 16),
        ):
            await stream.send(CHUNKED_POST)
            for part in parts:
                await anyio.wait_all_tasks_blocked()  # the server has taken what came before
                await stream.send(part)
            answer = await reader.answer()
            assert answer.status == 200 and answer.json()["body"] == body, answer
        await stream.send(CHUNKED_POST + b"11\r\n")
        answer = await reader.answer()
        assert answer.status == 413 and "not a chunk of 17 bytes" in answer.json()["error"]


async def test_a_body_in_more_chunks_than_the_limit_is_a_413(tmp_path: Path) -> None:
    """A megabyte in one-byte chunks held the loop for ten seconds (an event of h11's, and a piece
    of the app's, per byte). Up to the limit a body is taken whole; one chunk more is the 413,
    at that chunk's header, and the connection is closed."""
    limits = Limits(body_chunks=100)
    async with serving(tmp_path, App(), limits) as (server, path):
        async with await connect(path) as stream:
            reader = Reader(stream)
            await stream.send(CHUNKED_POST + b"1\r\nx\r\n" * 100 + b"0\r\n\r\n")
            answer = await reader.answer()
            assert answer.status == 200 and answer.json()["body"] == "x" * 100, answer
            await stream.send(CHUNKED_POST + b"1\r\nx\r\n" * 101 + b"0\r\n\r\n")
            with anyio.fail_after(10):
                answer = await reader.answer()
            assert answer.status == 413 and answer.headers["connection"] == "close"
            assert answer.json()["error"] == (
                "the request body may come in at most 100 chunks: send it in fewer, larger ones "
                "(or with a Content-Length)"
            )
            assert await reader.closed()
        await server.until(lambda: server.connections == 0)


def test_the_default_chunk_limit_leaves_a_full_body_in_128_byte_chunks() -> None:
    assert Limits().body_chunks * 128 >= Limits().body_bytes


@pytest.mark.parametrize(("length", "status"), [(2**40, 413), (10**30, 400)], ids=["tebibyte", "absurd"])
async def test_a_huge_content_length_is_refused_unread_and_the_answer_arrives(
    tmp_path: Path, length: int, status: int
) -> None:
    """BodyLimit answers 413 before reading (h11 itself refuses a length of more than 20 digits);
    the server closes without a reset eating that answer, and serves others meanwhile."""
    app = BodyLimit(App(), limit=1024)
    async with serving(tmp_path, app) as (server, path):
        async with await connect(path) as stream:
            await stream.send(post_head(length))
            await stream.send(b"x" * 65536)  # the body starts coming meanwhile
            reader = Reader(stream)
            answer = await reader.answer()
            assert answer.status == status and answer.headers["connection"] == "close"
            assert await reader.closed()
        await server.until(lambda: server.connections == 0)


async def test_the_app_sees_the_disconnect_of_a_client_that_leaves_mid_stream(tmp_path: Path) -> None:
    app = App()
    async with serving(tmp_path, app) as (server, path):
        stream = await connect(path)
        reader = Reader(stream)
        await stream.send(get("/stream"))
        status, headers = await reader.head()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert await reader.chunk() == b"first"  # flushed by its own send, before the stream ends
        await stream.aclose()
        await app.disconnected.wait()
        await server.until(lambda: server.connections == 0)


async def test_a_stream_is_flushed_at_each_send_and_ends_with_its_last_chunk(tmp_path: Path) -> None:
    app = App()
    async with serving(tmp_path, app) as (_server, path), await connect(path) as stream:
        reader = Reader(stream)
        await stream.send(get("/stream"))
        await reader.head()
        assert await reader.chunk() == b"first"
        app.release.set()
        assert await reader.chunk() == b"second"
        assert await reader.chunk() == b""
        await stream.send(get("/echo"))  # the connection is still good
        assert (await reader.answer()).status == 200


async def test_an_app_that_raises_gets_a_500_or_a_close_mid_stream(tmp_path: Path) -> None:
    async with serving(tmp_path, App()) as (_server, path):
        for route in ("/raise", "/silent"):
            async with await connect(path) as stream:
                await stream.send(get(route))
                reader = Reader(stream)
                answer = await reader.answer()
                assert answer.status == 500 and answer.headers["connection"] == "close"
                assert "see the service's log" in answer.json()["error"]
                assert await reader.closed()
        async with await connect(path) as stream:
            await stream.send(get("/raise-mid"))
            reader = Reader(stream)
            await reader.head()
            assert await reader.chunk() == b"part"
            await reader.closed()
            assert reader.buffer == b"", "the cut stream must not look complete"


async def test_a_client_that_never_reads_holds_only_its_own_connection(tmp_path: Path) -> None:
    app = App()
    async with serving(tmp_path, app) as (server, path):
        with raw_connect(path, rcvbuf=4096) as stuck:
            stuck.sendall(get("/big"))
            await app.in_flight.wait()
            for n in range(20):
                async with await connect(path) as stream:
                    await stream.send(get(f"/echo?n={n}"))
                    assert (await Reader(stream).answer()).json()["query"] == f"n={n}"
            assert app.chunks_sent < 64, "the stuck client cannot have taken 64 MiB"
            await server.until(lambda: server.connections == 1)
        await app.dropped.wait()  # once it closes, the send fails, and the app hears of it


async def test_a_client_that_never_reads_is_dropped_after_the_send_timeout(tmp_path: Path) -> None:
    app = App()
    async with serving(tmp_path, app, Limits(send_timeout=0.3)) as (server, path):
        with raw_connect(path, rcvbuf=4096) as stuck:
            stuck.sendall(get("/big"))
            await app.dropped.wait()
            assert "read nothing for 0.3 s" in str(app.send_errors[0])
            await server.until(lambda: server.connections == 0)
            assert app.chunks_sent < 64


async def test_a_slowloris_head_is_cut_at_the_head_timeout_and_holds_nobody_else(tmp_path: Path) -> None:
    async with serving(tmp_path, App(), Limits(head_timeout=0.5)) as (server, path):
        slow = await connect(path)
        await slow.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
        async with await connect(path) as stream:
            await stream.send(get("/echo"))
            assert (await Reader(stream).answer()).status == 200
        before = anyio.current_time()
        assert await Reader(slow).closed()
        assert anyio.current_time() - before < 5
        await slow.aclose()
        await server.until(lambda: server.connections == 0)


async def test_a_body_that_stops_coming_is_a_disconnect_after_the_read_timeout(tmp_path: Path) -> None:
    limits = Limits(read_timeout=0.3)
    async with serving(tmp_path, App(), limits) as (server, path):
        async with await connect(path) as slow:
            await slow.send(post_head(10) + b"abc")
            assert await Reader(slow).closed()
        await server.until(lambda: server.connections == 0)


async def test_past_the_connection_cap_clients_wait_in_the_backlog(tmp_path: Path) -> None:
    async with serving(tmp_path, App(), Limits(connections=2)) as (server, path):
        first, second = await connect(path), await connect(path)
        await server.until(lambda: server.connections == 2)
        third = raw_connect(path)  # into the backlog
        third.sendall(get("/echo?third"))
        await anyio.wait_all_tasks_blocked()
        assert server.accepted == 2
        with pytest.raises(BlockingIOError):
            third.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        await first.aclose()
        async with await SocketStream.from_socket(third) as stream:
            assert (await Reader(stream).answer()).json()["query"] == "third"
        assert server.accepted == 3
        await second.aclose()


async def test_each_listener_has_its_own_connections(tmp_path: Path) -> None:
    """Silent clients that fill one listener (the TCP one: connecting needs no token) leave the
    other's connections alone: the unix socket, the operator's way in, still answers at once."""
    flooded_path, other_path = tmp_path / "flooded.sock", tmp_path / "other.sock"
    flooded, other = bind_unix(flooded_path), bind_unix(other_path)
    server = HTTPServer(Limits(connections=2))
    try:
        with anyio.fail_after(20):  # a shared pool kept the other client in the backlog: no hang
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve, [(flooded, App()), (other, App())])
                silent = [raw_connect(flooded_path) for _ in range(3)]  # two taken, one in the backlog
                try:
                    await server.until(lambda: server.connections == 2)
                    with anyio.fail_after(5):
                        async with await connect(other_path) as stream:
                            await stream.send(get("/echo?other"))
                            assert (await Reader(stream).answer()).json()["query"] == "other"
                    assert server.accepted == 3
                finally:
                    for sock in silent:
                        sock.close()
                    server.stop()
    finally:
        flooded.close()
        other.close()


async def test_a_stop_finishes_the_request_in_flight_and_closes_idle_connections(tmp_path: Path) -> None:
    app = App()
    path = tmp_path / "http.sock"
    listener = bind_unix(path)
    server = HTTPServer()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, [(listener, app)])
            idle = await connect(path)
            await idle.send(get("/echo"))
            assert (await Reader(idle).answer()).status == 200
            busy = await connect(path)
            await busy.send(get("/slow"))
            await app.in_flight.wait()
            server.stop()
            assert await Reader(idle).closed()  # at once, while /slow is still under way
            app.release.set()
            answer = await Reader(busy).answer()
            assert answer.body == b"done" and answer.headers["connection"] == "close"
        assert server.connections == 0
        # The listening socket is left as it was: open, its backlog kept for its next owner.
        later = await connect(path)
        await later.aclose()
    finally:
        listener.close()


async def test_a_stop_cuts_what_outlasts_the_grace(tmp_path: Path) -> None:
    app = App()
    async with serving(tmp_path, app, Limits(grace=0.3)) as (server, path):
        busy = await connect(path)
        await busy.send(get("/slow"))
        await app.in_flight.wait()
        server.stop()
        assert await Reader(busy).closed()


async def test_a_handover_hands_connections_between_requests_to_the_next_server(tmp_path: Path) -> None:
    """A client accepted before the handover that has sent nothing yet (a browser's preconnect),
    and one idle after an answer: neither holds the handover up (its grace is 30 s here) nor is
    closed. Both go to ``handed``, open, and the next server answers their next requests, sent
    while no server ran. A client that connects meanwhile waits in the backlog for it."""
    path = tmp_path / "http.sock"
    listener = bind_unix(path)
    try:
        old = HTTPServer(Limits(grace=30))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(old.serve, [(listener, App())])
                silent = await connect(path)
                idle = await connect(path)
                await idle.send(get("/echo?first"))
                first = await Reader(idle).answer()
                assert first.json()["query"] == "first" and first.headers.get("connection") != "close"
                await old.until(lambda: old.accepted == 2)
                await anyio.wait_all_tasks_blocked()  # both wait for a request
                old.stop(handover=True)
        assert [index for _, index in old.handed] == [0, 0] and old.connections == 0
        waiting = await connect(path)
        await waiting.send(get("/echo?waiting"))
        await silent.send(get("/echo?silent"))
        await idle.send(get("/echo?second"))
        new = HTTPServer()
        async with anyio.create_task_group() as tg:
            await tg.start(partial(new.serve, [(listener, App())], adopted=old.handed))
            for client, query in [(silent, "silent"), (idle, "second"), (waiting, "waiting")]:
                answer = await Reader(client).answer()
                assert answer.json()["query"] == query and answer.headers.get("connection") != "close"
            assert new.accepted == 1  # the two others were adopted, not accepted again
            new.stop()
        for client in (silent, idle, waiting):
            await client.aclose()
    finally:
        listener.close()


async def test_a_handover_answers_a_request_that_had_begun_to_arrive(tmp_path: Path) -> None:
    """Half a request head read by the old server: that server reads the rest and answers (and
    closes); only a connection with nothing of a request read by us is handed over."""
    path = tmp_path / "http.sock"
    listener = bind_unix(path)
    try:
        old = HTTPServer()
        async with anyio.create_task_group() as tg:
            await tg.start(old.serve, [(listener, App())])
            begun = await connect(path)
            await begun.send(b"GET /echo?begun HTTP/1.1\r\nHost: x\r\n")
            await old.until(lambda: old.accepted == 1)
            await anyio.wait_all_tasks_blocked()  # its task has read the half head, waits for more
            old.stop(handover=True)
            await anyio.wait_all_tasks_blocked()
            await begun.send(b"\r\n")
            answer = await Reader(begun).answer()
            assert answer.json()["query"] == "begun" and answer.headers["connection"] == "close"
        assert old.handed == []
        await begun.aclose()
    finally:
        listener.close()


async def test_an_adopted_connection_of_an_unknown_endpoint_is_closed(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    listener = bind_unix(path)
    ours, theirs = socket.socketpair()
    try:
        server = HTTPServer()
        async with anyio.create_task_group() as tg:
            await tg.start(partial(server.serve, [(listener, App())], adopted=[(ours, 3)]))
            assert ours.fileno() == -1  # closed, not served
            server.stop()
        assert theirs.recv(1) == b""
    finally:
        theirs.close()
        listener.close()


async def test_a_plain_stop_does_not_wait_for_a_connection_that_sent_nothing(tmp_path: Path) -> None:
    async with serving(tmp_path, App(), Limits(grace=30)) as (server, path):
        quiet = await connect(path)
        await server.until(lambda: server.accepted == 1)
        server.stop()
        with anyio.fail_after(5):
            assert await Reader(quiet).closed()
        await quiet.aclose()
