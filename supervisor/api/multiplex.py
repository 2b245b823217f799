"""Several live answers read at once, in arrival order: ``supervisor logs 'worker-*' -f``.

One selector over the sockets, in the caller's thread: no thread per stream
(a glob may pick hundreds of instances), and ^C interrupts the one blocking
call there is. Each answer is an ordinary HTTP/1.1 response from the
client; once its head is read, its socket turns non-blocking and its body is
decoded here as it comes (chunked, by length, or until the connection ends).

Standard library only, like the client: the CLI imports this.
"""

from __future__ import annotations

import selectors
from collections.abc import Iterator, Sequence
from typing import Protocol

__all__ = ["ChunkedDecoder", "LiveBody", "interleave_lines"]

#: A line longer than this is handed on in pieces rather than held without bound.
MAX_LINE = 1 << 20


class _Readable(Protocol):
    """What `_Response` offers: its socket, its buffered file, its headers."""

    headers: dict[str, str]

    def fileno(self) -> int: ...

    def read1_nonblocking(self) -> bytes | None: ...

    def close(self) -> None: ...


class ChunkedDecoder:
    """``Transfer-Encoding: chunked``, fed any slices of the wire and giving back the data.

    ``done`` turns true at the last (zero-size) chunk. Malformed framing raises
    ``ValueError``: the service is ours, so that is a broken connection, not
    something to recover from.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._left = 0  # data bytes still to come in the current chunk
        self._crlf = False  # the CRLF after a chunk's data is still to come
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        out = bytearray()
        while not self.done:
            if self._left:
                take = self._pending[: self._left]
                out += take
                self._left -= len(take)
                self._pending = self._pending[len(take) :]
                if self._left:
                    break
                self._crlf = True
            if self._crlf:
                if len(self._pending) < 2:
                    break
                self._pending = self._pending[2:]
                self._crlf = False
            line, sep, rest = self._pending.partition(b"\n")
            if not sep:
                if len(self._pending) > 1024:
                    raise ValueError("a chunk size line longer than 1 KiB")
                break
            self._pending = rest
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size < 0:
                raise ValueError("a negative chunk size")
            if size == 0:
                self.done = True
            self._left = size
        return bytes(out)


class LiveBody:
    """The body of one answer, decoded from whatever the socket has, without blocking."""

    def __init__(self, response: _Readable) -> None:
        self.response = response
        headers = response.headers
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._chunked = ChunkedDecoder() if chunked else None
        length = headers.get("content-length")
        self._left = int(length) if self._chunked is None and length is not None else None
        self.ended = False

    def read(self) -> bytes:
        """What has arrived (maybe nothing); ``ended`` turns true at the end of the body."""
        raw = self.response.read1_nonblocking()
        if raw is None:
            return b""
        if not raw:
            self.ended = True
            return b""
        if self._chunked is not None:
            data = self._chunked.feed(raw)
            self.ended = self._chunked.done
            return data
        if self._left is not None:
            data = raw[: self._left]
            self._left -= len(data)
            self.ended = self._left <= 0
            return data
        return raw


def interleave_lines(bodies: Sequence[tuple[str, _Readable]]) -> Iterator[tuple[str, bytes]]:
    """``(label, line)`` for every whole line of every body, in the order they arrive.

    A body's last line without a newline comes out (with one added) when its
    body ends; a line past ``MAX_LINE`` bytes comes out in pieces. Ends when
    every body has ended. The responses are the caller's to close.
    """
    selector = selectors.DefaultSelector()
    live: dict[int, tuple[str, LiveBody]] = {}
    partial: dict[str, bytes] = {}
    try:
        for label, response in bodies:
            body = LiveBody(response)
            live[response.fileno()] = (label, body)
            selector.register(response.fileno(), selectors.EVENT_READ)
            partial[label] = b""
            # The head's reader may hold body bytes already: no readiness would announce them.
            yield from _lines(label, body.read(), partial)
            if body.ended:
                yield from _rest(label, partial)
                selector.unregister(response.fileno())
                del live[response.fileno()]
        while live:
            for key, _ in selector.select():
                label, body = live[key.fd]
                yield from _lines(label, body.read(), partial)
                if body.ended:
                    yield from _rest(label, partial)
                    selector.unregister(key.fd)
                    del live[key.fd]
    finally:
        selector.close()


def _lines(label: str, data: bytes, partial: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    if not data:
        return
    text = partial[label] + data
    *whole, rest = text.split(b"\n")
    for line in whole:
        yield label, line + b"\n"
    while len(rest) > MAX_LINE:
        yield label, rest[:MAX_LINE] + b"\n"
        rest = rest[MAX_LINE:]
    partial[label] = rest


def _rest(label: str, partial: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    rest = partial.pop(label, b"")
    if rest:
        yield label, rest + b"\n"
