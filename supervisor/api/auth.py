"""The TCP listener's bearer-token check."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send

__all__ = ["BearerAuth"]


class BearerAuth:
    """Let a request through only with ``Authorization: Bearer <token>``; otherwise 401, and nothing more."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], token: bytes) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self._allowed(scope):
            body = b'{"error":"unauthorized","details":[]}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = credentials.strip()
        # Compared in constant time, and always compared: no early exit on a missing header.
        return hmac.compare_digest(given, self.token) and bool(given)
