"""Live answers: a streaming response (``logs -f``, the event stream) that ends cleanly.

It ends when the client goes away or the server stops, and leaves its
subscription however it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["LiveResponse"]



class LiveResponse(Response):
    """A streaming answer that ends when the client goes away or the server stops.

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
    ) -> None:
        super().__init__(media_type=media_type, headers={"Cache-Control": "no-cache"})
        # No length: the body is chunked, and ends when the stream does.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._source = source
        self._closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

