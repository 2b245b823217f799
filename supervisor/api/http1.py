"""A small HTTP/1.1 server for the control API: h11 speaks the protocol, anyio moves the bytes.

The control plane needs little of a server: HTTP/1.1 on sockets the service
bound itself (a unix socket, a loopback port), under asyncio and trio; keep-alive;
request bodies; streaming answers (``logs -f``, the event stream) that end when
the client goes away; and a stop that knows exactly which connections it
accepted, so that a re-exec answers each request that has begun to arrive, hands
every connection between two requests to the next service (``handed``), and
leaves every other one waiting in the listening socket's backlog for it. hypercorn did
all that and brought HTTP/2, WebSockets and TLS with it, none of which a unix
socket uses: 6 to 9 MiB and a tenth of the cold start (docs/performance.md).

It serves any ASGI 3 app, ``http`` scopes only: no lifespan (``serve_control``
builds the app and tears it down itself), no WebSockets, no HTTP/2.

One task per connection. It reads one request at a time and runs the app for
it in that task, so pipelined requests are answered in order, and a client
that stalls, trickles or never reads holds its own task and nothing else. What
one client may hold, and for how long, is bounded (``Limits``): the request's
head in bytes and in time, each wait for its body, each wait for it to read
what we send; and the number of connections, beyond which new ones wait in
the listening socket's backlog.

The sockets are plain non-blocking sockets, read with ``recv`` once anyio says
they are readable: no stream layer buffers on our behalf, so the server reads
exactly what it asked for and a stop never loses a connection between the
kernel's ``accept`` and our task.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
import anyio.lowlevel
import h11
from anyio.abc import TaskGroup, TaskStatus

from .exchange import ClientGone, Exchange, reason
from .limits import MAX_BODY

__all__ = ["ASGIApp", "ClientGone", "HTTPServer", "Limits"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("supervisor.control.http")

# accept() found no free descriptor (or memory): try again after this long, not in a hot loop.
_ACCEPT_RETRY = 0.1
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_READ_SIZE = 65536
#: A chunk's header line as h11 reads it (h11/_abnf.py's chunk_header): where both agree on where a
#: chunk begins, a size read here is the size h11 takes.
_CHUNK_HEADER = re.compile(rb"(?P<size>[0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the service, and for how long (docs/control.md lists them).

    ``connections``: open connections at most, on each listener; further clients wait in
    the listening socket's backlog until one closes. ``head_bytes``: the request line and
    headers (431 beyond). ``head_timeout``: seconds for a whole request head to arrive,
    counted from the accept or from the end of the previous answer; an idle keep-alive
    connection is closed then too. ``read_timeout``: seconds any one wait for the request
    body may last. ``send_timeout``: seconds a client may leave what we send unread before
    it is dropped. ``grace``: seconds the requests in flight get when the server stops.
    ``linger``: seconds we read (and drop) what a client still sends after we answered it
    early and closed our side, so that our answer is not lost to a reset. ``body_bytes``: the
    largest chunk a chunked body may declare (413 at its header, before any of it is read); the
    body as a whole is the app's to bound (``limits.BodyLimit``, with the same 1 MiB).
    ``body_chunks``: the most chunks a chunked body may come in (413 at the next header): each
    is an event of h11's and a piece of the app's, and a megabyte in chunks of one byte took
    ten seconds of the loop; 8192 chunks take about 80 ms, and a client that sends a body in
    pieces of 128 bytes or more is never refused (the body may not pass 1 MiB).
    """

    connections: int = 512
    head_bytes: int = 16 * 1024
    head_timeout: float = 10.0
    read_timeout: float = 10.0
    send_timeout: float = 60.0
    grace: float = 2.0
    linger: float = 1.0
    body_bytes: int = MAX_BODY
    body_chunks: int = 8192


class HTTPServer:
    """Serves ASGI apps on listening sockets until ``stop``; never closes the listening sockets.

    ``accepted`` counts the connections taken from the backlogs, ``connections`` those still
    open. A stop (``stop``) takes no connection from the backlogs any more; then idle
    keep-alive connections close, and those with a request under way finish it (within
    ``Limits.grace``, then they are cut). A handover (``stop(handover=True)``) closes
    none: a connection between two requests (accepted a moment ago and silent, or idle
    after an answer, with nothing of a next request read by us) goes to ``handed``, open,
    with its endpoint's index, for the next owner of the sockets to serve (``serve``'s
    ``adopted``); what its client sends meanwhile waits in the kernel for it. A client
    that connected during the handover, or kept its connection, sees no close and no error,
    and a browser's silent preconnect holds nothing up. Whatever waits in the backlog stays
    there, for the next owner too.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        if self.limits.connections < 1:
            raise ValueError("Limits.connections must be at least 1")
        self.accepted = 0
        self.stopping = False
        self.handover = False
        self._open: set[_Connection] = set()
        #: At a handover: the connections between two requests, open, each with the index of
        #: its endpoint in ``serve``'s list (see the class).
        self.handed: list[tuple[socket.socket, int]] = []
        self._stopped = anyio.Event()
        self._changed: anyio.Event | None = None
        # While ``serve`` accepts: what ``replace_listener`` starts a new accept loop with.
        self._accepting: TaskGroup | None = None
        self._accept_scopes: dict[int, anyio.CancelScope] = {}
        self._endpoints: list[tuple[socket.socket, ASGIApp]] = []
        self._slots: list[anyio.Semaphore] = []
        self._connection_tasks: TaskGroup | None = None

    @property
    def connections(self) -> int:
        return len(self._open)

    async def serve(
        self,
        endpoints: Sequence[tuple[socket.socket, ASGIApp]],
        *,
        adopted: Sequence[tuple[socket.socket, int]] = (),
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every ``(listening socket, app)`` until ``stop``, then finish as it says.

        ``adopted``: connections an earlier server handed over (``handed``), each with the
        index of its endpoint here; served from their next request, with their endpoint's app.
        Cancelling this cuts every connection at once; a caller that wants the graceful
        stop calls ``stop`` and shields the wait (``serve_control`` does).
        """
        # Each listener its own: a flood of silent TCP clients (no token needed to connect)
        # must not take the unix socket's connections, the operator's way in.
        slots = [anyio.Semaphore(self.limits.connections) for _ in endpoints]
        async with anyio.create_task_group() as connections:
            for sock, index in adopted:
                if not 0 <= index < len(endpoints):
                    sock.close()
                    continue
                try:
                    slots[index].acquire_nowait()
                except anyio.WouldBlock:  # more than our limit: the client connects again
                    sock.close()
                    continue
                listener, app = endpoints[index]
                local = _endpoint(listener.family, listener.getsockname())
                self._start(sock, local, index, app, slots[index], connections)
            async with anyio.create_task_group() as accepting:
                self._endpoints = list(endpoints)
                self._slots, self._connection_tasks = slots, connections
                self._accepting = accepting
                for index in range(len(endpoints)):
                    self._listen(index)
                task_status.started()
                try:
                    await self._stopped.wait()
                finally:
                    self._accepting = None
                accepting.cancel_scope.cancel()
            connections.cancel_scope.deadline = anyio.current_time() + self.limits.grace
            for connection in list(self._open):
                connection.stop()

    @property
    def listening(self) -> bool:
        """Whether ``serve`` accepts now (``replace_listener`` may be called)."""
        return self._accepting is not None and not self.stopping

    def replace_listener(self, index: int, sock: socket.socket) -> None:
        """Accept on ``sock`` instead of the listening socket at ``index``, which is closed.

        For a unix socket whose file was deleted under the running service: nobody can
        connect to the old one any more, and the service binds the path again
        (``ControlListeners.remake_socket``). The old socket is closed once its accept loop
        has ended, never under a task that waits on it. Connections accepted from it go on.
        """
        if not self.listening:
            raise RuntimeError("the server does not accept now")
        _, app = self._endpoints[index]
        self._endpoints[index] = (sock, app)
        self._accept_scopes[index].cancel()
        self._listen(index)

    def _listen(self, index: int) -> None:
        """The accept loop of the endpoint at ``index``, in a scope of its own (``replace_listener``)."""
        assert self._accepting is not None
        self._accept_scopes[index] = scope = anyio.CancelScope()
        self._accepting.start_soon(self._accept_until, scope, index)

    async def _accept_until(self, scope: anyio.CancelScope, index: int) -> None:
        assert self._connection_tasks is not None
        listener, app = self._endpoints[index]
        listener.setblocking(False)
        with scope:
            await self._accept(listener, index, app, self._slots[index], self._connection_tasks)
        if scope.cancel_called and self._endpoints[index][0] is not listener:
            listener.close()  # replaced (the stop's cancel is the outer scope's: the caller closes those)

    def stop(self, *, handover: bool = False) -> None:
        """Stop accepting; let what was accepted finish (see the class). Idempotent."""
        if self.stopping:
            return
        self.stopping = True
        self.handover = handover
        self._stopped.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is asked again whenever a connection opens or closes."""
        while not predicate():
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _accept(
        self,
        listener: socket.socket,
        index: int,
        app: ASGIApp,
        slots: anyio.Semaphore,
        connections: TaskGroup,
    ) -> None:
        """Take connections from one listening socket, one free slot at a time.

        Nothing is awaited between the kernel's ``accept`` and handing the connection to its
        task: a stop (a cancellation of this loop) never loses one that was accepted.
        """
        local = _endpoint(listener.family, listener.getsockname())
        out_of_resources = False
        while True:
            await slots.acquire()
            try:
                while True:
                    if self.stopping:  # stop() may come while this task is woken, not yet resumed
                        slots.release()
                        return
                    try:
                        sock, peer = listener.accept()
                        break
                    except BlockingIOError:
                        await anyio.wait_readable(listener)
                    except OSError as exc:
                        if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                            continue
                        if exc.errno not in _OUT_OF_RESOURCES:
                            raise
                        if not out_of_resources:  # once a run of failures, not once a try
                            log.warning("control socket: cannot accept a connection (%s); trying again",
                                        exc.strerror)
                            out_of_resources = True
                        await anyio.sleep(_ACCEPT_RETRY)
            except BaseException:
                slots.release()
                raise
            out_of_resources = False
            self.accepted += 1
            self._start(sock, local, index, app, slots, connections, peer)

    def _start(
        self,
        sock: socket.socket,
        local: tuple[str, int | None] | None,
        index: int,
        app: ASGIApp,
        slots: anyio.Semaphore,
        connections: TaskGroup,
        peer: Any = None,
    ) -> None:
        """The task of one connection (its slot taken); ``peer`` unknown for an adopted one."""
        sock.setblocking(False)
        remote = None
        if sock.family != socket.AF_UNIX:
            try:
                remote = _endpoint(sock.family, peer if peer is not None else sock.getpeername())
            except OSError:  # gone already: its first read says so
                pass
        base = {"server": local, "client": remote}
        connection = _Connection(self, sock, app, base, index)
        self._open.add(connection)
        self._notify()
        connections.start_soon(self._run, connection, slots)

    async def _run(self, connection: _Connection, slots: anyio.Semaphore) -> None:
        try:
            await connection.run()
        except Exception:  # ours, not the app's (Exchange logs those): this connection only
            log.exception("control connection failed")
            connection.handed = False
        finally:
            self._open.discard(connection)
            if connection.handed:
                self.handed.append((connection.sock, connection.endpoint))
            else:
                connection.sock.close()
            slots.release()
            self._notify()


def _endpoint(family: int, address: Any) -> tuple[str, int | None] | None:
    """ASGI's ``server``/``client``: (host, port) over TCP, (path, None) for a unix socket."""
    if family == socket.AF_UNIX:
        return (address if isinstance(address, str) else address.decode(errors="replace"), None)
    return (address[0], address[1])


class _Connection:
    """One client: its requests in turn, each answered by the app (``Exchange``), then the close."""

    def __init__(
        self, server: HTTPServer, sock: socket.socket, app: ASGIApp, base: dict[str, Any], endpoint: int
    ) -> None:
        self.server = server
        self.endpoint = endpoint
        self.limits = server.limits
        self.sock = sock
        self.app = app
        self.base = base
        self.h11 = _Parser(server.limits)
        self.keep = True  # may serve another request after this one
        self.broken = False  # a write failed or was cut halfway: nothing more may be written
        self.refused = False  # answered with an error of ours: what the client still sends is unread
        self.handed = False  # left open at a handover, for the next server
        self._waiting: anyio.CancelScope | None = None

    def stop(self) -> None:
        """The server stops: end the wait for a next request, unless one is owed an answer."""
        if self._waiting is not None and (self._between_requests() or not self._owed()):
            self._waiting.cancel()

    async def run(self) -> None:
        while True:
            request = await self._next_request()
            if request is None:
                break
            await Exchange(self, request).run()
            if self.h11.error is not None:
                # The body's framing was bad. The exchange could only tell the app that the client
                # left; unless the app answered anyway, the client learns why here.
                await self.refuse(self.h11.error)
                break
            if not self._next_cycle():
                break
        if (self.refused or self.h11.their_state in (h11.SEND_BODY, h11.ERROR)) and not self.broken:
            await self._linger()

    async def _next_request(self) -> h11.Request | None:
        """The next request's head; None when the connection should close instead."""
        deadline = anyio.current_time() + self.limits.head_timeout
        # The bytes h11 holds, to measure the head by what it takes: its own bound applies only to
        # a head still incomplete, and a whole one of up to a read (64 KiB) would pass it.
        buffered = len(self.h11.trailing_data[0])
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                await self.refuse(exc)
                return None
            if event is h11.NEED_DATA:
                if self.server.stopping and (self._between_requests() or not self._owed()):
                    self.handed = self._between_requests()
                    return None
                data = await self._read_head(deadline)
                if data is None:
                    self.handed = self.server.stopping and self._between_requests()
                    return None
                self.h11.receive_data(data)
                buffered += len(data)
            elif type(event) is h11.Request:
                if buffered - len(self.h11.trailing_data[0]) > self.limits.head_bytes:
                    too_large = h11.RemoteProtocolError("request head too large", error_status_hint=431)
                    await self.refuse(too_large)
                    return None
                return event
            else:  # ConnectionClosed
                return None

    def _between_requests(self) -> bool:
        """At a handover: may this connection go to the next server as it is? When we have read
        nothing of a next request (what the client sent since waits in the kernel for it)."""
        return (
            self.server.handover
            and self.h11.our_state is h11.IDLE
            and self.h11.their_state is h11.IDLE
            and not self.h11.trailing_data[0]
        )

    def _owed(self) -> bool:
        """Must this connection be read on at a stop? When a request has (partly) arrived."""
        if self.h11.trailing_data[0]:
            return True
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False

    async def _read_head(self, deadline: float) -> bytes | None:
        """Bytes of a request head before ``deadline``; None at the deadline, or at a stop while
        nothing is owed (``stop``)."""
        with anyio.CancelScope(deadline=deadline) as self._waiting:
            try:
                return await self.recv()
            finally:
                self._waiting = None
        return None

    async def recv(self) -> bytes:
        """What has arrived (at most ``_READ_SIZE`` bytes); ``b""`` when the client is gone.

        No cancellation point lies between the ``recv`` and the return: bytes taken from the
        kernel are never dropped by a cancellation.
        """
        while True:
            try:
                data = self.sock.recv(_READ_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            except OSError:
                return b""
            await anyio.lowlevel.cancel_shielded_checkpoint()  # a client that floods lets others run
            return data

    async def write(self, parts: Sequence[bytes]) -> None:
        """Send ``parts`` (one ``sendmsg`` when the socket takes them); ``ClientGone`` when the client
        left, or read nothing for ``send_timeout`` seconds (then the connection is dropped).

        Cut by a cancellation halfway through, the connection is broken: the answer on it
        cannot be completed, and it closes.
        """
        if self.broken:
            raise ClientGone("the connection is closed")
        pending = [part for part in parts if part]
        started = False
        try:
            waited = False
            while pending:
                try:
                    sent = self.sock.sendmsg(pending, (), socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    with anyio.move_on_after(self.limits.send_timeout) as wait:
                        await anyio.wait_writable(self.sock)
                    if wait.cancelled_caught:
                        idle = self.limits.send_timeout
                        raise ClientGone(f"the client read nothing for {idle:g} s") from None
                    waited = True
                    continue
                started = True
                pending = _advance(pending, sent)
            if not waited:
                await anyio.lowlevel.checkpoint()  # every send lets the others run
        except OSError as exc:
            self.broken = True
            if isinstance(exc, ClientGone):
                raise
            raise ClientGone(f"the client went away ({exc.strerror or exc})") from None
        except BaseException:
            self.broken = self.broken or (started and bool(pending))
            raise

    async def refuse(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a request h11 could not parse (400, 431 for a head too large, 413 for a chunk too
        large), then close."""
        self.refused = True
        status = exc.error_status_hint
        if status == 431:
            message = f"the request's line and headers may hold at most {self.limits.head_bytes} bytes"
        elif status == 413:
            message = str(exc)
        else:
            message = f"malformed HTTP/1.1 request: {exc}"
        await self.answer_error(status, message)

    async def answer_error(self, status: int, message: str) -> None:
        """An error answer of our own (the API's JSON error shape) with ``Connection: close``."""
        self.keep = False
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or self.broken:
            return
        body = json.dumps({"error": message, "details": []}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        out = self.h11.send_with_data_passthrough(h11.Response(status_code=status, headers=headers,
                                                               reason=reason(status)))
        out += self.h11.send_with_data_passthrough(h11.Data(data=body))
        out += self.h11.send_with_data_passthrough(h11.EndOfMessage())
        try:
            await self.write(out)
        except ClientGone:
            pass

    def scope(self, request: h11.Request) -> Scope:
        target = request.target
        if not target.startswith(b"/") and b"://" in target:  # absolute-form: http://host/path?query
            target = b"/" + target.split(b"://", 1)[1].partition(b"/")[2]
        path, _, query = target.partition(b"?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": unquote_to_bytes(path).decode("utf-8", "replace"),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
            "server": self.base["server"],
            "client": self.base["client"],
        }

    def _next_cycle(self) -> bool:
        """Ready for the next request on this connection? (Both sides done, nothing broken.)"""
        if not self.keep or self.broken:
            return False
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        return True

    async def _linger(self) -> None:
        """We answered before reading the whole request (a 413, a 400): close our side and read
        what is still coming for a moment, so that closing with it unread does not reset the
        connection before the client has read our answer."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        with anyio.move_on_after(self.limits.linger):
            while await self.recv():
                pass


class _Parser(h11.Connection):
    """h11's server side, which keeps the protocol error it raised, and refuses a chunk declared
    larger than a body may be.

    A body's framing error is raised where the body is read (``Exchange``), which can only tell
    the app that the client left; kept here, the connection answers it once the app is done. A
    chunk's size is read off its header line before h11 takes the line: h11 tells nobody the size,
    and would wait, silent, for the first bytes of a chunk of a terabyte.
    """

    def __init__(self, limits: Limits) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.head_bytes)
        self.body_bytes = limits.body_bytes
        self.body_chunks = limits.body_chunks
        self.error: h11.RemoteProtocolError | None = None
        self._chunks = 0  # of the body under way
        self._chunked = False  # a chunked body is under way, its last chunk header not yet taken
        self._in_chunk = False  # h11 took a chunk's header and not yet all of its data
        self._after_chunk = False  # a chunk ended: its CRLF may still be ahead of the next header

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            if self._chunked and not self._in_chunk:
                self._check_chunk()
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            if self.error is None:  # the first: h11 raises again on each later call
                self.error = exc
            raise
        if isinstance(event, h11.Request):
            # h11 takes a body with any Transfer-Encoding as chunked (it refuses every other coding).
            self._chunked = any(name == b"transfer-encoding" for name, _ in event.headers)
            self._in_chunk = self._after_chunk = False
            self._chunks = 0
        elif isinstance(event, h11.Data) and self._chunked:
            self._in_chunk = not event.chunk_end
            self._after_chunk = event.chunk_end
        elif isinstance(event, h11.EndOfMessage):
            self._chunked = False
        return event

    def _check_chunk(self) -> None:
        """The next chunk's header, once its line is whole: 413 when it declares too much."""
        data = self.trailing_data[0]
        start = 0
        if self._after_chunk:  # h11 may have taken none, or the CR, of the last chunk's CRLF
            start = 2 if data.startswith(b"\r\n") else 1 if data.startswith(b"\n") else 0
        end = data.find(b"\r\n", start)
        if end < 0:
            return
        match = _CHUNK_HEADER.fullmatch(data, start, end + 2)
        if match is None:  # h11 refuses the line itself (a 400)
            return
        size = int(match["size"], 16)
        if size > self.body_bytes:
            raise h11.RemoteProtocolError(
                f"the request body may hold at most {self.body_bytes} bytes, not a chunk of {size} bytes",
                error_status_hint=413,
            )
        self._chunks += 1
        if self._chunks > self.body_chunks and size > 0:  # the last one (size 0) ends it: always taken
            raise h11.RemoteProtocolError(
                f"the request body may come in at most {self.body_chunks} chunks: send it in fewer, "
                "larger ones (or with a Content-Length)",
                error_status_hint=413,
            )
        self._in_chunk, self._after_chunk = size > 0, False
        self._chunked = size > 0  # after the last chunk (size 0): its trailer, no more sizes


def _advance(parts: list[bytes], sent: int) -> list[bytes]:
    """What is left of ``parts`` once ``sent`` bytes of them went out."""
    while sent:
        first = parts[0]
        if sent >= len(first):
            sent -= len(first)
            parts = parts[1:]
        else:
            parts = [memoryview(first)[sent:], *parts[1:]]  # type: ignore[list-item]
            sent = 0
    return parts
