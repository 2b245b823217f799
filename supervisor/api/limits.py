"""The request-body limit: no request holds more than ``MAX_BODY`` bytes of the service's memory.

Every body the API takes is a small JSON object; one larger than a mebibyte
is a mistake or an attack. A declared length over the limit is answered 413
before a byte of the body is read; a chunked body is read up to the limit and
answered 413 as soon as it passes it. Reading stops there, so the server's
flow control pushes back on the sender instead of buffering what it sends.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from starlette.types import Message, Receive, Scope, Send

__all__ = ["MAX_BODY", "BodyLimit"]

MAX_BODY = 1024 * 1024

App = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: read the whole body (at most ``limit`` bytes), then hand it to ``app``."""

    def __init__(self, app: App, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _answer(send, 400, "the Content-Length header is not a number")
                    return
        if declared is not None and declared > self.limit:
            await self._too_large(send, declared)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before it finished sending
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._too_large(send, None)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, send: Send, declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else "more than that"
        await _answer(send, 413, f"the request body may hold at most {self.limit} bytes, not {size}")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read ahead, as one message; then the client's own messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "details": []}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
