"""Long-lived streams (the event stream, followed logs) cannot starve the short requests.

The server serves 512 connections at once (``http1.Limits.connections``) and a stream
holds its connection for as long as it lasts. Unbounded, 512 streams (dashboard tabs,
``logs -f`` loops, a hostile local user) took every connection, and ``supervisor
status`` and even ``/v1/health`` waited in the listen backlog until their timeout.
Streams now have 448 places (512 - 64, ``live.stream_cap``); one more is answered 503
at once and its connection closed, and the 64 connections left answer everything else.

Each test runs a real ``supervisor run`` and opens the cap's worth of real streams on
its socket (a few hundred unix-socket connections take a fraction of a second).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from supervisor.api.client import Client, connect_unix

from .service_fixture import ServiceProcess, with_tcp_listener

Start = Callable[..., ServiceProcess]

#: The default cap: the 512 connections less the 64 streams never take (docs/control.md).
CAP = 448
#: More than the connections the cap leaves free: unbounded, these would take every one of them.
BEYOND = 100
#: How long a short request may take while the streams are open: it used to get no answer at all.
QUICK = 5.0

MANIFEST = """
version: 1
instances:
  sleeper:
    command: ["sh", "-c", "echo hello; exec sleep 300"]
    restart: {min_uptime: 0}
"""

EVENTS = b"GET /v1/events HTTP/1.1\r\nHost: supervisor\r\n\r\n"
FOLLOW = b"GET /v1/instances/sleeper/logs?follow=true&lines=0 HTTP/1.1\r\nHost: supervisor\r\n\r\n"
#: Connections sent at once before their answers are read: under the listen backlog (128),
#: which a client connecting faster than the service accepts would fill (EAGAIN).
BATCH = 50


def _send(path: Path, request: bytes, timeout: float = 10) -> socket.socket:
    sock = connect_unix(path, timeout=timeout)
    sock.sendall(request)
    return sock


def _head(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """The answer's status, its head (lowercased) and what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before an answer's head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(None, 2)[1]), head.lower(), rest


def _until_closed(sock: socket.socket, data: bytes) -> bytes:
    """The rest of what the service sends, until it closes the connection."""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _open_streams(stack: ExitStack, path: Path, count: int) -> list[socket.socket]:
    """``count`` live streams, half of them event streams and half followed logs, each
    accepted (its head arrived: the service has counted it)."""
    opened: list[socket.socket] = []
    while len(opened) < count:
        batch = [
            stack.enter_context(_send(path, EVENTS if (len(opened) + i) % 2 else FOLLOW))
            for i in range(min(BATCH, count - len(opened)))
        ]
        for sock in batch:
            status, head, _ = _head(sock)
            assert status == 200, (len(opened), head)
            opened.append(sock)
    return opened


def _assert_refused(
    sock: socket.socket, said: tuple[str, ...] = (f"{CAP} are open", f"at most {CAP} at once", "close some")
) -> dict[str, object]:
    """A 503 in the API's error shape, which says what to do, on a connection the service closes."""
    status, head, rest = _head(sock)
    assert status == 503, head
    assert b"connection: close" in head and b"content-type: application/json" in head, head
    body = json.loads(_until_closed(sock, rest))  # the service closed it: the connection is free
    assert set(body) == {"error", "details"} and body["details"] == [], body
    message = str(body["error"])
    assert all(phrase in message for phrase in said), message
    return body


def _answers_quickly(client: Client) -> None:
    """Health and status answer, within ``QUICK`` seconds (the client's timeout too)."""
    began = time.monotonic()
    assert client.health()["ok"]
    statuses = client.status()
    assert [s["name"] for s in statuses] == ["sleeper"], statuses
    took = time.monotonic() - began
    assert took < QUICK, f"health and status took {took:.2f}s with {CAP} streams open"


@contextmanager
def _full(svc: ServiceProcess) -> Iterator[tuple[ExitStack, list[socket.socket]]]:
    """The service with every place for a stream taken."""
    with ExitStack() as stack:
        yield stack, _open_streams(stack, svc.socket, CAP)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_streams_over_the_cap_are_refused_at_once_and_short_requests_answer(
    service: Start, backend: str
) -> None:
    svc = service(MANIFEST, args=("--backend", backend))
    with _full(svc) as (stack, _streams):
        client = svc.client(timeout=QUICK)
        _answers_quickly(client)
        # Past the connection limit (448 + 100 > 512), as many dashboard tabs or `logs -f` loops
        # would go: each is refused at once and its connection closed, even while its client has
        # not read the refusal yet, so status and health still answer (they waited in the listen
        # backlog until their timeout).
        extra = [stack.enter_context(_send(svc.socket, EVENTS if i % 2 else FOLLOW)) for i in range(BEYOND)]
        _answers_quickly(client)
        for sock in extra:
            _assert_refused(sock)
        health = client.health()
        assert health["streams"] == CAP and health["streams_max"] == CAP, health
        # The CLI says why, in one line, and fails.
        follow = svc.cli("logs", "sleeper", "-f", timeout=30)
        assert follow.returncode == 1, follow
        assert follow.stderr.startswith("supervisor: too many streams:"), follow
        assert "close some" in follow.stderr and follow.stderr.count("\n") == 1, follow
        _answers_quickly(client)
    # Every stream closed by its client: every place is free again.
    svc.wait_until(lambda: svc.client().health()["streams"] == 0, 20, "every stream's place given back")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_closing_a_stream_frees_its_place(service: Start, backend: str) -> None:
    svc = service(MANIFEST, args=("--backend", backend))
    with _full(svc) as (stack, streams):
        _assert_refused(stack.enter_context(_send(svc.socket, EVENTS)))
        # The client of one followed log and of one event stream hang up.
        for sock in streams[:2]:
            sock.close()
        svc.wait_until(lambda: svc.client().health()["streams"] == CAP - 2, 20, "two places given back")
        # Their places are taken again, by one of each kind, which stream as they should.
        follow = stack.enter_context(_send(svc.socket, FOLLOW))
        status, head, _ = _head(follow)
        assert status == 200 and b"transfer-encoding: chunked" in head, head
        events = stack.enter_context(_send(svc.socket, EVENTS))
        status, head, rest = _head(events)
        assert status == 200 and b"text/event-stream" in head, head
        while b": subscribed" not in rest:
            rest += events.recv(65536)
        assert svc.client().health()["streams"] == CAP
        # And then the cap holds again.
        _assert_refused(stack.enter_context(_send(svc.socket, FOLLOW)))
        _answers_quickly(svc.client(timeout=QUICK))


def test_the_cap_counts_the_streams_of_every_listener(service: Start, tmp_path: Path) -> None:
    """The unix socket's streams fill the places a TCP client would take: one server, one count;
    a TCP client without the token is refused (401) before it is counted."""
    token = "stream-slots-token"
    manifest, port = with_tcp_listener(
        tmp_path,
        token,
        """
      sleeper: {command: ["sleep", "300"]}
        """,
    )
    svc = service(manifest)
    bearer = {"Authorization": f"Bearer {token}"}
    with _full(svc), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=QUICK) as tcp:
        assert tcp.get("/v1/events").status_code == 401
        with tcp.stream("GET", "/v1/events", headers=bearer) as refused:  # a stream would not end
            assert refused.status_code == 503 and refused.headers["connection"] == "close"
            assert f"{CAP} are open" in json.loads(refused.read())["error"]
        health = tcp.get("/v1/health", headers=bearer)
        assert health.status_code == 200 and health.json()["streams"] == CAP, health.text
        document = tcp.get("/openapi.json", headers=bearer).json()
        for path in ("/v1/events", "/v1/instances/{name}/logs"):
            assert "503" in document["paths"][path]["get"]["responses"], path


def test_the_cap_leaves_connections_to_short_requests() -> None:
    from supervisor.api.http1 import Limits
    from supervisor.api.live import (
        MAX_STREAMS,
        MAX_WAITING,
        STREAM_RESERVE,
        StreamSlots,
        stream_cap,
        wait_cap,
    )

    assert MAX_STREAMS == CAP == Limits.connections - STREAM_RESERVE
    assert stream_cap(1024) == 960 and stream_cap(100) == 50 and stream_cap(2) == 1 and stream_cap(1) == 1
    # The requests that wait: half of what streams leave; the other half answers everything else.
    assert MAX_WAITING == WAITS and Limits.connections > MAX_STREAMS + MAX_WAITING
    assert wait_cap(1024) == 32 and wait_cap(100) == 25 and wait_cap(2) == 1 and wait_cap(1) == 1
    slots = StreamSlots(2)
    assert slots.take() and slots.take() and not slots.take()
    assert slots.open == 2 and "2 are open" in slots.refusal() and "at most 2 at once" in slots.refusal()
    slots.give_back()
    assert slots.take() and slots.open == 2
    with pytest.raises(ValueError, match="at least 1"):
        StreamSlots(0)


def _post(path: Path, route: str, body: dict[str, object]) -> socket.socket:
    data = json.dumps(body).encode()
    head = (
        f"POST {route} HTTP/1.1\r\nHost: supervisor\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return _send(path, head.encode() + data)


#: A wait that lasts: the sleeper is never stopped here.
NEVER = {"names": ["sleeper"], "state": ["stopped"], "timeout": "1h"}


#: The places of the requests that wait: half of the 64 connections streams leave (docs/control.md).
WAITS = 32
WAITS_REFUSED = (f"too many requests that wait: {WAITS} are held", f"at most {WAITS} at once", "--no-wait")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_requests_that_wait_have_places_of_their_own_and_give_them_back_when_their_client_leaves(
    service: Start, backend: str
) -> None:
    """A ``wait``, or a start/stop/restart that waits for its outcome, holds its connection up to
    its timeout (a week at most): 64 of them beside the streams left status and health no
    connection. They have 32 places, apart from the streams' (every stream place taken refuses
    no restart). And a client that leaves ends its wait: the place (and the connection) were
    held until the timeout, with nobody to answer."""
    svc = service(MANIFEST, args=("--backend", backend))
    client = svc.client(timeout=QUICK)
    with _full(svc) as (stack, _streams):
        waits = [stack.enter_context(_post(svc.socket, "/v1/instances/wait", NEVER)) for _ in range(WAITS)]
        svc.wait_until(lambda: client.health()["waits"] == WAITS, 20, "the waits counted")
        health = client.health()
        assert (health["streams"], health["waits_max"]) == (CAP, WAITS), health
        _answers_quickly(client)
        # Every place is taken: a further wait, and a restart that would wait, are refused at once.
        _assert_refused(stack.enter_context(_post(svc.socket, "/v1/instances/wait", NEVER)), WAITS_REFUSED)
        restart = {"names": ["sleeper"]}
        refused = stack.enter_context(_post(svc.socket, "/v1/instances/restart", restart))
        _assert_refused(refused, WAITS_REFUSED)
        done = svc.cli("wait", "sleeper", "--state", "stopped", "--timeout", "1h", timeout=30)
        assert done.returncode == 1 and "too many requests that wait:" in done.stderr, done
        # One that does not wait holds no place: it is done at once.
        quick = stack.enter_context(
            _post(svc.socket, "/v1/instances/start", {"names": ["sleeper"], "wait": False})
        )
        status, head, _ = _head(quick)
        assert status != 503, head
        pid = svc.status()["sleeper"]["pid"]
        assert svc.status()["sleeper"]["state"] == "running"  # the refused restart did nothing
        # The waits' clients hang up: their places come back long before the hour is out.
        for sock in waits:
            sock.close()
        svc.wait_until(lambda: client.health()["waits"] == 0, 20, "the waits' places given back")
        # And with every stream's place still taken, a restart is asked, and waited for.
        restarted = client.restart(["sleeper"])
        assert restarted["ok"] and restarted["results"][0]["pid"] != pid, restarted
        assert client.health()["streams"] == CAP


def test_a_wait_whose_client_closes_its_side_ends_at_once(service: Start) -> None:
    """A half-close (``shutdown(SHUT_WR)``, as ``nc -N`` does) reads as the client gone, as for a
    stream (and as nginx and uvicorn take it): the wait ends, its place and connection are free,
    and no answer is sent (docs/control.md says to keep the connection open until the answer)."""
    svc = service(MANIFEST)
    with _post(svc.socket, "/v1/instances/wait", NEVER) as sock:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        assert sock.recv(65536) == b""  # closed by the service, long before the hour is out
    svc.wait_until(lambda: svc.client().health()["waits"] == 0, 10, "the wait's place given back")
