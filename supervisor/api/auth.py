"""The TCP listener's token check: a bearer token for programs, a cookie for the dashboard.

A browser cannot add an ``Authorization`` header to a page it loads, nor to an
``EventSource``: it opens ``/?token=TOKEN`` once, is given the token back as a
cookie (HttpOnly, SameSite=Strict: another site's page cannot make the browser
send it), and is sent on to ``/`` without the token in its address bar or history.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote_to_bytes

from starlette.types import Receive, Scope, Send

__all__ = ["COOKIE", "BearerAuth", "token_from_cookie"]

COOKIE = "procward_token"


def token_from_cookie(scope: Scope, name: str = COOKIE) -> bytes:
    for header, value in scope.get("headers", []):
        if header == b"cookie":
            try:
                jar = SimpleCookie(value.decode("latin-1"))
            except CookieError:
                continue
            if name in jar:
                return jar[name].value.encode("latin-1")
    return b""


class BearerAuth:
    """Let a request through only with the token (header or cookie); otherwise 401, and nothing more."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], token: bytes) -> None:
        self.app = app
        self.token = token
        # The cookie holds a value derived from the token, not the token: any bytes a token file
        # holds are safe in it, and the cookie is no use as a bearer token elsewhere.
        self.cookie = hmac.new(token, b"procward dashboard cookie", hashlib.sha256).hexdigest().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"") if scope["type"] == "http" and scope["path"] == "/" else b""
        if query and self._matches(_query_token(query)):
            await _redirect_with_cookie(send, self.cookie)
            return
        if not self._allowed(scope):
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
        cookie = token_from_cookie(scope)
        # Compared in constant time, and always compared: no early exit on a missing token.
        by_header = self._matches(given)
        by_cookie = hmac.compare_digest(cookie, self.cookie) and bool(cookie)
        return by_header or by_cookie

    def _matches(self, given: bytes) -> bool:
        return hmac.compare_digest(given, self.token) and bool(given)


def _query_token(query: bytes) -> bytes:
    """The query's first non-empty ``token``, percent-decoded to bytes and compared as such.

    The token file holds bytes, and a browser percent-encodes a non-ASCII token as UTF-8: that is
    the file's bytes when it is UTF-8 text, as the ``Authorization`` header carries them. Never
    decoded to text: ``%ff`` is a byte like any other, and only a wrong token (a 401).
    """
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if value and unquote_to_bytes(name.replace(b"+", b" ")) == b"token":
            return unquote_to_bytes(value.replace(b"+", b" "))
    return b""


async def _redirect_with_cookie(send: Send, value: bytes, name: str = COOKIE) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", b"/"),
                (b"set-cookie", name.encode() + b"=" + value + b"; HttpOnly; SameSite=Strict; Path=/"),
                (b"content-length", b"0"),
                (b"cache-control", b"no-store"),
                (b"referrer-policy", b"no-referrer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})
