"""Errors as JSON, and the OpenAPI document that says so.

Every error the API gives is an ``ErrorBody``: one sentence and its
particulars. FastAPI's own 422 for invalid input becomes our 400, and the
document is corrected to match.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from ..config import ManifestError
from ..instance import InvalidRequest
from ..manager import ApplyError, UnknownInstance
from .models import ErrorBody, EventBody

__all__ = ["ERRORS", "error", "install_error_handlers", "openapi_with_our_errors"]

def error(status: int, message: str, details: Collection[Any] = ()) -> JSONResponse:
    return JSONResponse({"error": message, "details": list(details)}, status_code=status)


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "A malformed request (a field, a signal, a duration)."},
    404: {"model": ErrorBody, "description": "No instance by that name (or no such log stream)."},
}


_TOO_LARGE = {
    "description": "The request body is larger than the limit (1 MiB).",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
}


def _allowed(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route takes at this path.

    Starlette's 405 names the methods of the first route whose path matches; at
    ``/v1/instances/stop`` that is ``GET`` (the status of an instance named "stop"),
    though ``POST`` is taken there too.
    """
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": ""})
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    async def unknown(_: Request, exc: Exception) -> JSONResponse:
        return error(404, str(exc))

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        return error(409, str(exc))

    async def bad_manifest(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ManifestError)
        count = len(exc.problems)
        return error(
            422,
            f"the manifest has {count} problem{'s' if count != 1 else ''}; nothing was changed",
            [str(p) for p in exc.problems],
        )

    async def cannot_apply(_: Request, exc: Exception) -> JSONResponse:
        return error(422, str(exc))

    async def bad_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = []
        for problem in exc.errors():
            if tuple(problem.get("loc", ())) == ("body",) and problem.get("type") == "model_attributes_type":
                details.append("the body must be a JSON object, sent with Content-Type: application/json")
                continue
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
            details.append(f"{where}: {message}" if where else message)
        return error(400, "invalid request", details)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed(app, request.scope))
        body = {"error": str(exc.detail), "details": []}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    app.add_exception_handler(UnknownInstance, unknown)
    app.add_exception_handler(InvalidRequest, invalid)
    app.add_exception_handler(ManifestError, bad_manifest)
    app.add_exception_handler(ApplyError, cannot_apply)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(StarletteHTTPException, http_error)


def openapi_with_our_errors(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's document, with our errors and the event stream's model.

    FastAPI documents its own 422 for invalid input; ours is a 400 with
    ``ErrorBody``; every body is limited (``limits.BodyLimit``): a 413. The events'
    model is no route's return type, so FastAPI leaves it out of the components: it
    is added here.
    """
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.get("422", {}).get("description") == "Validation Error":
                    del responses["422"]
                if "requestBody" in operation:
                    responses["413"] = _TOO_LARGE
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        event = EventBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(event.pop("$defs", {}))
        components["EventBody"] = event
        if not any("HTTPValidationError" in json.dumps(op) for op in schema.get("paths", {}).values()):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    return openapi

