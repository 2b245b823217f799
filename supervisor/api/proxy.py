"""``supervisor dashboard``: the service's page on a loopback port, proxied to its control socket.

The unix socket is private to its owner; a browser cannot reach it. This small
HTTP server (stdlib only: the CLI must not pay for the server's stack) listens
on 127.0.0.1, lets in only a browser that opened the printed URL (its one-time
token is exchanged for a session cookie, HttpOnly and SameSite=Strict, and is
then spent), and passes each request on, on a connection of its own, relaying
the answer as it comes (so the event stream and a followed log stay live).
"""

from __future__ import annotations

import hmac
import secrets
import select
import socket
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["DashboardProxy"]

_COOKIE = "procward_session"
_MAX_BODY = 1024 * 1024
_CHUNK = 65536


class DashboardProxy:
    """Serve until ``shutdown()``; ``connect`` opens a connection to the service (``Client.connect``)."""

    def __init__(
        self,
        connect: Callable[[], socket.socket],
        *,
        authorization: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.connect = connect
        self.authorization = authorization
        self._token: str | None = secrets.token_urlsafe(24)
        self.session = secrets.token_hex(32)
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        """The address to open, once: its token is spent by the first browser that uses it."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/?token={self._token}"

    def spend(self, token: str) -> bool:
        expected = self._token
        if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
            return False
        self._token = None
        return True

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.5)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: DashboardProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet: the terminal shows the URL
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _handle(self) -> None:
        self.close_connection = True
        url = urlsplit(self.path)
        if url.path == "/" and "token" in parse_qs(url.query):
            if self.owner.spend(parse_qs(url.query)["token"][0]):
                cookie = f"{_COOKIE}={self.owner.session}; HttpOnly; SameSite=Strict; Path=/"
                headers = [("Location", "/"), ("Set-Cookie", cookie), ("Cache-Control", "no-store")]
                self._answer(303, b"", headers)
            else:
                self._answer(401, b"This link was used already: run `supervisor dashboard` again.\n")
            return
        if not self._has_session():
            self._answer(401, b"Open the address `supervisor dashboard` printed.\n")
            return
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self._answer(411, b"Send a Content-Length.\n")
            return
        try:
            size = int(length or 0)
        except ValueError:
            self._answer(400, b"Content-Length is not a number.\n")
            return
        if not 0 <= size <= _MAX_BODY:
            self._answer(413, b"The request body may hold at most 1 MiB.\n")
            return
        body = self.rfile.read(size) if size else b""
        self._relay(body)

    def _has_session(self) -> bool:
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == _COOKIE and hmac.compare_digest(value.encode(), self.owner.session.encode()):
                return True
        return False

    def _relay(self, body: bytes) -> None:
        head = [f"{self.command} {self.path} HTTP/1.1", "Host: localhost", "Connection: close"]
        for name in ("Content-Type", "Accept", "Last-Event-ID"):
            if self.headers.get(name):
                head.append(f"{name}: {self.headers[name]}")
        if body or self.command == "POST":
            head.append(f"Content-Length: {len(body)}")
        if self.owner.authorization:
            head.append(f"Authorization: {self.owner.authorization}")
        try:
            upstream = self.owner.connect()
        except Exception as exc:
            self._answer(502, f"The service does not answer: {exc}\n".encode())
            return
        with upstream:
            upstream.settimeout(None)
            upstream.sendall("\r\n".join([*head, "", ""]).encode() + body)
            browser = self.connection
            watched = [upstream, browser]
            # Both ways at once: the answer to the browser, and the browser's leaving (a closed
            # tab ends a followed log here and upstream, instead of parking a thread on it).
            while True:
                readable, _, _ = select.select(watched, [], [])
                if browser in readable:
                    try:
                        if not browser.recv(1, socket.MSG_PEEK):
                            return
                    except OSError:
                        return
                    watched = [upstream]  # it sent more: nothing to do with it but answer
                if upstream in readable:
                    chunk = upstream.recv(_CHUNK)
                    if not chunk:
                        return
                    try:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    except OSError:
                        return

    def _answer(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
