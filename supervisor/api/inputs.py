"""What a request carries, validated by the wire models: its JSON body and its query parameters.

A route reads its input through ``body`` and ``query`` before it touches an instance.
Input that does not fit raises ``InvalidInput``, answered 400 with one line per
problem, each naming the field or parameter and what was expected
(``timeout: a duration cannot be negative``, ``query.lines: Input should be less
than or equal to 1000000``): a client can act on it without reading the source.

The body is parsed and validated in one step (``model_validate_json``: no
intermediate dict of the whole body). ``limits.BodyLimit`` has read it ahead,
so it is at most ``MAX_BODY`` bytes here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .models import QueryParameters

__all__ = ["NOT_AN_OBJECT", "InvalidInput", "body", "optional_body", "query"]

Model = TypeVar("Model", bound=BaseModel)
QueryModel = TypeVar("QueryModel", bound=QueryParameters)

NOT_AN_OBJECT = "the body must be a JSON object, sent with Content-Type: application/json"


class InvalidInput(Exception):
    """The request's body or parameters are not what the route takes: a 400 with ``details``."""

    def __init__(self, details: Sequence[str]) -> None:
        super().__init__("; ".join(details))
        self.details = list(details)


def _is_json(content_type: str | None) -> bool:
    """``application/json``, or a ``+json`` type such as ``application/merge-patch+json``."""
    if content_type is None:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    main, _, sub = kind.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def body(request: Request, model: type[Model]) -> Model:
    """The body as ``model``. It needs a JSON content type: a form or text sent by mistake is
    refused by name rather than guessed at."""
    raw = await request.body()
    if not raw.strip():
        raise InvalidInput([f"this route needs a JSON body ({model.__name__})"])
    return _parsed(request, raw, model)


async def optional_body(request: Request, model: type[Model]) -> Model | None:
    """The body as ``model``, or ``None`` when it was left out (empty, or JSON ``null``)."""
    raw = await request.body()
    if not raw.strip() or raw.strip() == b"null":
        return None
    return _parsed(request, raw, model)


def _parsed(request: Request, raw: bytes, model: type[Model]) -> Model:
    if not _is_json(request.headers.get("content-type")):
        raise InvalidInput([NOT_AN_OBJECT])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidInput(list(_described(exc.errors(include_url=False)))) from None


def query(request: Request, model: type[QueryModel]) -> QueryModel:
    """The query parameters ``model`` knows, validated; the others are ignored."""
    params = request.query_params
    values: dict[str, Any] = {}
    for name in model.model_fields:
        if name in params:
            values[name] = params.getlist(name) if name in model.lists else params.getlist(name)[-1]
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise InvalidInput(list(_described(exc.errors(include_url=False), prefix="query"))) from None


def _described(problems: Iterable[Any], prefix: str = "") -> Iterable[str]:
    """One line per problem: where (``scale.web``, ``query.lines``), then what was expected."""
    for problem in problems:
        loc = tuple(problem.get("loc", ()))
        kind = problem.get("type")
        if not loc and kind == "model_type":
            yield NOT_AN_OBJECT
            continue
        message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
        if kind == "json_invalid":
            # pydantic says where ("at line 1 column 12"); also say what it was reading.
            message = f"the body is not valid UTF-8 JSON: {message.removeprefix('Invalid JSON: ')}"
        where = ".".join(str(part) for part in (prefix, *loc) if part != "")
        yield f"{where}: {message}" if where else message
