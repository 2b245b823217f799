"""The dashboard's page and its two static files, from the ``supervisor.web`` package data.

Served by the same app as the API (so the page's requests are same-origin,
and the TCP listener's token applies to it as to the rest); left out of the
OpenAPI document, which describes the API, not the page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

__all__ = ["add_dashboard"]

_FILES = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
# The page loads nothing from elsewhere and runs no inline script: say so, so that a browser
# refuses anything else (an injected script, a frame around the page).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("supervisor.web").joinpath(name).read_bytes()


def add_dashboard(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)

    for name, media_type in _FILES.items():
        app.get(f"/web/{name}", include_in_schema=False)(_static(name, media_type))


def _static(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
    # A closure, not default arguments: FastAPI would take those for query parameters.
    async def static() -> Response:
        return Response(_read(name), media_type=media_type, headers=_HEADERS)

    static.__name__ = f"static_{name.replace('.', '_')}"
    return static
