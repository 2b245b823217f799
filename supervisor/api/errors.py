"""Errors as JSON: every error the API gives is an ``ErrorBody``, one sentence and its particulars.

The exceptions a route lets through become their answers here (an unknown
instance: 404; a request the instance's state refuses: 409; a bad manifest:
422; input that does not fit: 400), and so do starlette's own 404 and 405,
which would otherwise answer in plain text.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from ..config import ManifestError
from ..instance import InvalidRequest
from ..manager import ApplyError, UnknownInstance
from ..selection import MAX_GLOBS, TooManyGlobs
from .inputs import InvalidInput
from .openapi import Answer

__all__ = ["ERRORS", "HANDLERS", "error"]


def error(status: int, message: str, details: Collection[Any] = ()) -> JSONResponse:
    return JSONResponse({"error": message, "details": list(details)}, status_code=status)


#: The errors most routes may answer with, for the OpenAPI document.
ERRORS: Mapping[int, Answer] = {
    400: Answer(
        f"A malformed request (a field, a signal, a duration, more than {MAX_GLOBS} globs).", "ErrorBody"
    ),
    404: Answer("No instance by that name (or no such log stream).", "ErrorBody"),
}


def _allowed(request: Request) -> list[str]:
    """Every method some route takes at this path.

    Starlette's 405 names the methods of the first route whose path matches; at
    ``/v1/instances/stop`` that is ``GET`` (the status of an instance named "stop"),
    though ``POST`` is taken there too.
    """
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": ""})
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


async def _unknown(_: Request, exc: Exception) -> Response:
    return error(404, str(exc))


async def _invalid(_: Request, exc: Exception) -> Response:
    return error(409, str(exc))


async def _bad_manifest(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ManifestError)
    count = len(exc.problems)
    return error(
        422,
        f"the manifest has {count} problem{'s' if count != 1 else ''}; nothing was changed",
        [str(p) for p in exc.problems],
    )


async def _cannot_apply(_: Request, exc: Exception) -> Response:
    return error(422, str(exc))


async def _too_many_globs(_: Request, exc: Exception) -> Response:
    return error(400, str(exc))


async def _bad_request(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidInput)
    return error(400, "invalid request", exc.details)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed(request))
    body = {"error": str(exc.detail), "details": []}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


#: For ``Starlette(exception_handlers=...)``.
HANDLERS: Mapping[Any, Any] = {
    UnknownInstance: _unknown,
    InvalidRequest: _invalid,
    ManifestError: _bad_manifest,
    ApplyError: _cannot_apply,
    InvalidInput: _bad_request,
    TooManyGlobs: _too_many_globs,
    HTTPException: _http_error,
}
