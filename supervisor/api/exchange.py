"""One request and its answer on an HTTP/1.1 connection: the ASGI ``receive`` and ``send`` of one app call.

Split from ``http1`` (the server: accepting, connections, stopping) because this
is the part that speaks ASGI: what ``receive`` returns while the body arrives and
after it, what ``send`` writes and when, and what happens when the app raises.

``receive`` reads the body as the app asks for it (the server buffers none of it).
Once the body is read, a further ``receive`` waits for the client to go away:
that is how a streaming answer (``api.live.LiveResponse``) learns that its client
left. Bytes of a next, pipelined request that arrive meanwhile are kept for it, up
to the head limit; beyond that they are dropped and the connection closes after
this answer.

``send`` writes the status line and headers at once when the answer streams (no
Content-Length: a stream must show its headers before its first event), and with
the body otherwise (one write for the usual small JSON answer). Each body message
is written before ``send`` returns: a stream is flushed message by message.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import anyio
import h11

if TYPE_CHECKING:
    from .http1 import _Connection

__all__ = ["DISCONNECT", "ClientGone", "Exchange", "reason"]

log = logging.getLogger("supervisor.control.http")

Message = MutableMapping[str, Any]

DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}


class ClientGone(ConnectionError):
    """What ``send`` raises once the client is gone (or was dropped for not reading).

    An ``OSError``, as ASGI 2.4 asks: apps that stream catch it and end (``LiveResponse`` does).
    """


class Exchange:
    """One app call for one request; ``run`` returns once the app did (or failed)."""

    def __init__(self, connection: _Connection, request: h11.Request) -> None:
        self.connection = connection
        self.request = request
        self.started = False  # http.response.start was sent by the app
        self.complete = False  # the whole answer went out
        self.body_read = False  # the request's body was read to its end
        self.gone = False  # the client went away: receive says http.disconnect
        self._head: h11.Response | None = None  # the answer's head, waiting to go out with its body
        self._ahead = 0  # bytes of later requests read while waiting for a disconnect
        self._watch: anyio.CancelScope | None = None

    async def run(self) -> None:
        connection = self.connection
        try:
            await connection.app(connection.scope(self.request), self.receive, self.send)
        except Exception as exc:
            if not _client_gone(exc):
                log.error("the control API failed on %s", self._what(), exc_info=exc)
            await self._failed()
            return
        finally:
            if self._watch is not None:
                self._watch.cancel()
        if not self.started:
            if not self.gone:  # an app that saw the client leave has nobody to answer
                log.error("the control API gave no answer to %s", self._what())
            await self._failed()
        elif not self.complete:
            connection.keep = False  # the body is cut short: only a close tells the client

    def _what(self) -> str:
        return f"{self.request.method.decode()} {self.request.target.decode('ascii', 'replace')}"

    async def _failed(self) -> None:
        """The app raised, or ended without an answer: a 500 if nothing went out yet, else a close."""
        self.connection.keep = False
        self._head = None
        if not self.gone:
            await self.connection.answer_error(500, "the control API failed: see the service's log")

    async def receive(self) -> Message:
        if self.gone or self.complete:
            return DISCONNECT
        if not self.body_read:
            return await self._body()
        return await self._until_disconnect()

    async def _body(self) -> Message:
        """The body's next piece: what has arrived, or, when nothing has, the next bytes to come.

        A client that sends nothing of its body for ``read_timeout`` seconds is taken as gone.
        """
        connection = self.connection
        conn = connection.h11
        if conn.they_are_waiting_for_100_continue:
            try:
                await connection.write(conn.send_with_data_passthrough(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
            except ClientGone:
                return self._disconnected()
        chunks: list[bytes] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:  # a malformed chunk, or the client closed mid-body
                return self._disconnected()
            if event is h11.NEED_DATA:
                if chunks:
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": True}
                data = None
                with anyio.move_on_after(connection.limits.read_timeout):
                    data = await connection.recv()
                if data is None:
                    return self._disconnected()
                conn.receive_data(data)
            elif type(event) is h11.Data:
                chunks.append(bytes(event.data))
            elif type(event) is h11.EndOfMessage:
                self.body_read = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            else:
                return self._disconnected()

    async def _until_disconnect(self) -> Message:
        """Wait for the client to go away (its EOF); ends as well when this exchange does."""
        connection = self.connection
        limit = connection.limits.head_bytes
        with anyio.CancelScope() as self._watch:
            while True:
                data = await connection.recv()
                if not data:
                    connection.h11.receive_data(b"")
                    self.gone = True
                    break
                self._ahead += len(data)
                if self._ahead <= limit:
                    connection.h11.receive_data(data)  # a pipelined request: kept for its turn
                else:
                    connection.keep = False
        self._watch = None
        return DISCONNECT

    def _disconnected(self) -> Message:
        self.gone = True
        self.connection.keep = False
        return DISCONNECT

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            await self._start(message)
        elif kind == "http.response.body":
            await self._write_body(message)
        else:
            raise ValueError(f"an HTTP/1.1 answer has no ASGI message {kind!r}")

    async def _start(self, message: Message) -> None:
        if self.started:
            raise RuntimeError("http.response.start was sent twice")
        connection = self.connection
        if self.gone or connection.broken:
            raise ClientGone("the client went away")
        headers = list(message.get("headers", ()))
        if not self._body_ends_here():
            connection.keep = False  # the client may still be sending it: no next request after it
        if connection.server.stopping or not connection.keep:
            headers = [(name, value) for name, value in headers if name.lower() != b"connection"]
            headers.append((b"connection", b"close"))
        status = int(message["status"])
        head = h11.Response(status_code=status, headers=headers, reason=reason(status))
        self.started = True
        if any(name.lower() == b"content-length" for name, _ in headers):
            self._head = head  # goes out with the body, in one write
        else:
            await connection.write(connection.h11.send_with_data_passthrough(head))

    def _body_ends_here(self) -> bool:
        """Has the rest of the request body (often none: ``Content-Length: 0``) arrived? Then it is
        read and dropped, and the connection may serve another request after this answer."""
        conn = self.connection.h11
        while not self.body_read and not self.gone:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return False
            if type(event) is h11.EndOfMessage:
                self.body_read = True
            elif type(event) is not h11.Data:  # NEED_DATA: the rest is still to come
                return False
        return self.body_read

    async def _write_body(self, message: Message) -> None:
        if not self.started:
            raise RuntimeError("http.response.body was sent before http.response.start")
        if self.complete:
            raise RuntimeError("http.response.body was sent after the answer's last body")
        connection = self.connection
        conn = connection.h11
        out: list[bytes] = []
        if self._head is not None:
            head, self._head = self._head, None
            out += conn.send_with_data_passthrough(head)
        body = message.get("body", b"")
        if body and self.request.method != b"HEAD":
            out += conn.send_with_data_passthrough(h11.Data(data=body))
        if not message.get("more_body", False):
            out += conn.send_with_data_passthrough(h11.EndOfMessage())
            self.complete = True
            if self._watch is not None:
                self._watch.cancel()
        if out:
            await connection.write(out)


def _client_gone(exc: BaseException) -> bool:
    """Is ``exc`` only the client's leaving (perhaps wrapped by the app's task groups)? Not logged."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_gone(inner) for inner in exc.exceptions)
    return isinstance(exc, ClientGone)


_REASONS: dict[int, bytes] = {}


def reason(status: int) -> bytes:
    """The status line's reason phrase ("Not Found"); empty for a status HTTP does not name."""
    known = _REASONS.get(status)
    if known is None:
        try:
            known = HTTPStatus(status).phrase.encode()
        except ValueError:
            known = b""
        _REASONS[status] = known
    return known
