"""The OpenAPI document: built from the routes' own declarations and the wire models' JSON Schemas.

Each route of the API is an ``Endpoint``: a starlette route that also carries its
``Operation`` (what it takes: a body model, a query model, the parameters of its path;
what it answers: a model per status). The document is put together from those, so
a route cannot be served without being documented, nor documented differently from
what it validates: the body and query models here are the ones ``inputs`` validates
with.

It is built on the first request for it, not at start-up, and only then imports
pydantic and the wire models (``models.py``): a route names its answers' models by
name, and its body and query by the class that checks them (``requests.py``), whose
model has the same name. Building them costs 13 MiB and 100 ms that a service
nobody asks for its document never spends (docs/performance.md).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .limits import MAX_BODY

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["Answer", "Endpoint", "Operation", "document", "serve_document"]

OPENAPI = "3.1.0"
_REF = "#/components/schemas/{model}"
_OK = "Successful Response"

Mode = Literal["validation", "serialization"]


@dataclass(frozen=True)
class Answer:
    """One status a route answers with: why, and the body's model (or only its media type)."""

    description: str = _OK
    model: str | None = None  # the name of a model in ``models.py``
    many: bool = False  # a JSON array of ``model``
    media_type: str = "application/json"


@dataclass(frozen=True)
class Operation:
    """What a route takes and answers, for the document (its docstring is the description)."""

    tag: str
    answers: Mapping[int, Answer]
    body: type | None = None  # a class of ``requests.py``: its model has its name
    body_required: bool = True
    query: type | None = None
    summary: str | None = None
    description: str | None = None


class Endpoint(Route):
    """A route of the API: one method and its ``Operation``.

    No implicit ``HEAD`` for a ``GET`` (starlette adds one): a streaming route would
    stream for a ``HEAD`` too, and the document does not offer it.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], method: str, operation: Operation) -> None:
        super().__init__(path, endpoint, methods=[method])
        self.methods = {method}
        self.method = method
        self.operation = operation


_TOO_LARGE = Answer(
    f"The request body is larger than the limit ({MAX_BODY // (1024 * 1024)} MiB).", "ErrorBody"
)


def document(routes: Iterable[BaseRoute], info: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAPI document of every ``Endpoint`` among ``routes`` (the others are not the API)."""
    from pydantic.json_schema import models_json_schema

    endpoints = [route for route in routes if isinstance(route, Endpoint)]
    wanted: dict[tuple[type[BaseModel], Mode], None] = {}
    for route in endpoints:
        operation = route.operation
        if operation.body is not None:
            wanted[(_model(operation.body), "validation")] = None
        for answer in _answers(operation).values():
            if answer.model is not None:
                wanted[(_model(answer.model), "serialization")] = None
    refs, schemas = models_json_schema(list(wanted), ref_template=_REF)
    components: dict[str, Any] = dict(schemas.get("$defs", {}))

    def ref(model: type[BaseModel], mode: Mode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    paths: dict[str, dict[str, Any]] = {}
    for route in endpoints:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, ref, components)
    return {
        "openapi": OPENAPI,
        "info": dict(info),
        "paths": paths,
        "components": {"schemas": dict(sorted(components.items()))},
    }


def _model(named: str | type) -> type[BaseModel]:
    """The wire model of that name, or of the name of that request class."""
    from . import models

    model: type[BaseModel] = getattr(models, named if isinstance(named, str) else named.__name__)
    return model


def _answers(operation: Operation) -> dict[int, Answer]:
    """The route's answers, and a 413 wherever there is a body (``limits.BodyLimit``)."""
    answers = dict(operation.answers)
    if operation.body is not None:
        answers[413] = _TOO_LARGE
    return answers


def _operation(
    route: Endpoint, ref: Callable[[type[BaseModel], Mode], dict[str, Any]], components: dict[str, Any]
) -> dict[str, Any]:
    operation = route.operation
    name = route.name
    out: dict[str, Any] = {
        "tags": [operation.tag],
        "summary": operation.summary or name.replace("_", " ").title(),
        "description": operation.description or inspect.cleandoc(route.endpoint.__doc__ or ""),
        # As FastAPI spelt them, so that a client generated from an older document keeps its names.
        "operationId": re.sub(r"\W", "_", f"{name}{route.path_format}") + f"_{route.method.lower()}",
    }
    parameters = [
        {"name": key, "in": "path", "required": True, "schema": {"title": key.title(), "type": "string"}}
        for key in route.param_convertors
    ]
    if operation.query is not None:
        parameters += _query_parameters(operation.query, components)
    if parameters:
        out["parameters"] = parameters
    if operation.body is not None:
        schema = ref(_model(operation.body), "validation")
        if not operation.body_required:  # left out, or null
            schema = {"anyOf": [schema, {"type": "null"}]}
        out["requestBody"] = {
            "content": {"application/json": {"schema": schema}},
            "required": operation.body_required,
        }
    out["responses"] = {
        str(status): _response(answer, ref) for status, answer in sorted(_answers(operation).items())
    }
    return out


def _query_parameters(query: type, components: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _model(query).model_json_schema(ref_template=_REF)
    components.update(schema.get("$defs", {}))
    required = set(schema.get("required", ()))
    parameters = []
    for key, prop in schema["properties"].items():
        parameter = {"name": key, "in": "query", "required": key in required, "schema": prop}
        if "description" in prop:
            parameter["description"] = prop["description"]
        parameters.append(parameter)
    return parameters


def _response(answer: Answer, ref: Callable[[type[BaseModel], Mode], dict[str, Any]]) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if answer.model is not None:
        schema = ref(_model(answer.model), "serialization")
        content["schema"] = {"type": "array", "items": schema} if answer.many else schema
    return {"description": answer.description, "content": {answer.media_type: content}}


def serve_document(
    routes: Iterable[BaseRoute], info: Mapping[str, Any]
) -> Callable[[Request], Awaitable[Response]]:
    """The ``GET /openapi.json`` endpoint: the document, built once, when first asked for."""
    built: list[bytes] = []

    async def openapi(_: Request) -> Response:
        if not built:
            built.append(json.dumps(document(routes, info), separators=(",", ":")).encode())
        return Response(built[0], media_type="application/json")

    return openapi
