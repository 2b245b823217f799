"""The dashboard's page and its two static files, from the ``supervisor.web`` package data.

Served by the same app as the API (so the page's requests are same-origin,
and the TCP listener's token applies to it as to the rest); left out of the
OpenAPI document, which describes the API, not the page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["dashboard_routes"]

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


def dashboard_routes() -> list[Route]:
    """The page and its files, as plain routes: not ``Endpoint``s, so the document leaves them out.

    ``GET`` only: starlette's implicit ``HEAD`` is dropped, as for the API's routes, so
    that every route answers the same methods as before (and 405 says which).
    """
    routes = [Route("/", _static("index.html", "text/html; charset=utf-8"), name="page")]
    routes += [Route(f"/web/{name}", _static(name, media_type)) for name, media_type in _FILES.items()]
    for route in routes:
        route.methods = {"GET"}
    return routes


def _static(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    async def static(_: Request) -> Response:
        return Response(_read(name), media_type=media_type, headers=_HEADERS)

    static.__name__ = f"static_{name.replace('.', '_')}"
    return static
