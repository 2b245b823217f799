"""Live answers: a streaming response (``logs -f``, the event stream) that ends cleanly, and
the count of them that keeps them from taking every connection.

A stream ends when the client goes away or the server stops, and leaves its
subscription however it ends.

A stream holds its connection for as long as it lasts, and the server has a fixed
number of connections (``http1.Limits.connections``: beyond them new clients wait in
the listening socket's backlog). Left unbounded, open dashboard tabs and ``logs -f``
loops (or a hostile local user) could take all of them, and ``supervisor status``,
even ``/v1/health``, would get no answer at all. So streams have places of their
own (``StreamSlots``), fewer than the connections: ``STREAM_RESERVE`` connections
are always left to the short requests. A stream asked for when every place is taken
is answered 503 at once, and its connection closed.

The requests that wait have places of their own too (``WaitSlots``): a ``wait``, or a
start, stop or restart that waits for its outcome, holds its connection up to its
timeout (a week at most), and 64 of them (``xargs -P``, a script's ``&``, starts of
instances whose dependency is down) left the short requests nothing either. Half of
the connections streams leave (32 of 64), apart from the streams' places: open
dashboards must not keep an operator's restart from being asked.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .errors import error
from .http1 import Limits

__all__ = [
    "MAX_STREAMS", "MAX_WAITING", "STREAM_RESERVE", "LiveResponse", "StreamSlots", "WaitSlots", "stream_cap",
    "wait_cap",
]

log = logging.getLogger("supervisor.control")

#: Connections streams never take: left to status, health, actions, whatever else.
STREAM_RESERVE = 64


def stream_cap(connections: int) -> int:
    """How many streams may be open at once on a server of ``connections`` connections.

    All but ``STREAM_RESERVE`` of them (448 of the service's 512); half of them on a
    server of fewer than 128 connections, and at least one.
    """
    return max(1, connections - min(STREAM_RESERVE, connections // 2))


#: The default: the streams a server with the default connection limit keeps open at once.
MAX_STREAMS = stream_cap(Limits.connections)


def wait_cap(connections: int) -> int:
    """How many requests that wait may be held at once: half the connections streams leave (32
    of the service's 512), at least one. The other half answers status, health and the rest."""
    return max(1, min(STREAM_RESERVE, connections // 2) // 2)


#: The default: the requests that wait a server with the default connection limit holds at once.
MAX_WAITING = wait_cap(Limits.connections)


class StreamSlots:
    """How many streams are open, over every listener, and how many may be: a counter.

    ``take`` as a stream begins (False: every place is taken), ``give_back`` as it ends.
    The first refusal is logged; the next one again only after the count fell to half
    the cap (a client that retries in a loop does not fill the service's log).
    """

    #: What is counted, in the log's warning.
    kind = "streams"

    def __init__(self, cap: int = MAX_STREAMS) -> None:
        if cap < 1:
            raise ValueError(f"the cap of {self.kind} must be at least 1")
        self.cap = cap
        self.open = 0
        self._warned = False

    def take(self) -> bool:
        if self.open >= self.cap:
            if not self._warned:
                self._warned = True
                log.warning("control API: %d %s are open, the most allowed; "
                            "further ones are refused (503) until some close", self.open, self.kind)
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1
        if self.open <= self.cap // 2:
            self._warned = False

    def refusal(self) -> str:
        """The 503's message: how many are open, the cap, and what to do."""
        return (
            f"too many streams: {self.open} are open (event streams and followed logs together), and "
            f"the service keeps at most {self.cap} at once so that its other requests always answer; "
            "close some (a dashboard tab, a `supervisor logs -f`) and try again"
        )

    def refused(self) -> Response:
        """The 503, on a connection closed after it: the service is at its limit, and frees it."""
        answer = error(503, self.refusal())
        answer.headers["Connection"] = "close"
        return answer

    @contextlib.contextmanager
    def place(self) -> Iterator[bool]:
        """One place for what is done inside, if one is free (False: answer ``refused()``)."""
        taken = self.take()
        try:
            yield taken
        finally:
            if taken:
                self.give_back()


class WaitSlots(StreamSlots):
    """The same count, for the requests that wait: ``wait``, and start, stop or restart until
    their outcome (``wait: false`` takes none)."""

    kind = "requests that wait"

    def __init__(self, cap: int = MAX_WAITING) -> None:
        super().__init__(cap)

    def refusal(self) -> str:
        return (
            f"too many requests that wait: {self.open} are held (wait, and start, stop or restart "
            f"until done), and the service holds at most {self.cap} at once so that its other "
            "requests always answer; try again once some are answered, or ask without waiting "
            "(--no-wait)"
        )


class LiveResponse(Response):
    """A streaming answer that ends when the client goes away or the server stops, and holds
    one of ``slots``' places meanwhile (503 when none is free).

    ``source`` is entered before the headers go out, so that a client that
    has the headers knows the subscription is in place; it is left (and so
    unsubscribed) however the stream ends.
    """

    def __init__(
        self,
        source: Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]],
        *,
        media_type: str,
        closing: anyio.Event,
        slots: StreamSlots,
    ) -> None:
        super().__init__(media_type=media_type, headers={"Cache-Control": "no-cache"})
        # No length: the body is chunked, and ends when the stream does.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._source = source
        self._closing = closing
        self._slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The place is taken here, where nothing can come between it and the try that gives it
        # back: a stream counts from before it subscribes until after its last byte went out.
        with self._slots.place() as taken:
            if taken:
                await self._stream(receive, send)
            else:
                await self._slots.refused()(scope, receive, send)

    async def _stream(self, receive: Receive, send: Send) -> None:
        async with self._source() as chunks:
            try:
                async with anyio.create_task_group() as tg:

                    async def until_disconnect() -> None:
                        while (await receive())["type"] != "http.disconnect":
                            pass
                        tg.cancel_scope.cancel()

                    async def until_closing() -> None:
                        await self._closing.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(until_disconnect)
                    tg.start_soon(until_closing)
                    status, headers = self.status_code, self.raw_headers
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    with contextlib.suppress(OSError):  # the client went away while we wrote
                        async for chunk in chunks:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tg.cancel_scope.cancel()
            finally:
                close = getattr(chunks, "aclose", None)
                if close is not None:
                    with anyio.CancelScope(shield=True):
                        await close()
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

