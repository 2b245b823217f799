"""What a request carries, checked by ``requests``: its JSON body and its query parameters.

A route reads its input through ``body`` and ``query`` before it touches an instance.
Input that does not fit raises ``InvalidInput``, answered 400 with one line per
problem, each naming the field or parameter and what was expected
(``timeout: a duration cannot be negative``, ``query.lines: Input should be less
than or equal to 1000000``): a client can act on it without reading the source.

The body is parsed by orjson, which says where it gave up (``line 1 column 12``),
refuses NaN and infinities (they are not JSON) and nests at most 1,024 deep.
``limits.BodyLimit`` has read it ahead, so it is at most ``MAX_BODY`` bytes here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import orjson
from starlette.requests import Request

from .requests import InvalidInput, QueryParameters

__all__ = ["NOT_AN_OBJECT", "InvalidInput", "body", "optional_body", "query"]

Model = TypeVar("Model")
QueryModel = TypeVar("QueryModel", bound=QueryParameters)

NOT_AN_OBJECT = "the body must be a JSON object, sent with Content-Type: application/json"


def _is_json(content_type: str | None) -> bool:
    """``application/json``, or a ``+json`` type such as ``application/merge-patch+json``."""
    if content_type is None:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    main, _, sub = kind.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def body(request: Request, model: Callable[[Mapping[str, Any]], Model]) -> Model:
    """The body as ``model``. It needs a JSON content type: a form or text sent by mistake is
    refused by name rather than guessed at."""
    raw = await request.body()
    if not raw.strip():
        raise InvalidInput([f"this route needs a JSON body ({getattr(model, '__name__', model)})"])
    return _parsed(request, raw, model)


async def optional_body(request: Request, model: Callable[[Mapping[str, Any]], Model]) -> Model | None:
    """The body as ``model``, or ``None`` when it was left out (empty, or JSON ``null``)."""
    raw = await request.body()
    if not raw.strip() or raw.strip() == b"null":
        return None
    return _parsed(request, raw, model)


def _parsed(request: Request, raw: bytes, model: Callable[[Mapping[str, Any]], Model]) -> Model:
    if not _is_json(request.headers.get("content-type")):
        raise InvalidInput([NOT_AN_OBJECT])
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput([f"the body is not valid UTF-8 JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise InvalidInput([NOT_AN_OBJECT])
    return model(data)


def query(request: Request, model: type[QueryModel]) -> QueryModel:
    """The query parameters ``model`` knows, checked; the others are ignored."""
    params = request.query_params
    values: dict[str, Any] = {}
    for name in model.fields:
        if name in params:
            values[name] = params.getlist(name) if name in model.lists else params.getlist(name)[-1]
    return model(values)  # type: ignore[call-arg]
