"""Types and defaults in words, for the manifest reference (``reference.py``).

The reference says ``duration`` where the model has a float with a parser, and
``100ms`` where the default is 0.1: these functions read the models' annotations
and validators and say what a person writes. Kept apart from the page's sections,
which compute their examples with the loader itself.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

from annotated_types import Ge
from pydantic import AfterValidator, BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from . import checks, limits, models, units

# -- types and defaults in words --------------------------------------------------------------

#: Validators that make a plain type a unit a person writes in words.
_UNITS: dict[Callable[..., Any], str] = {
    units.parse_duration: "duration",
    units.parse_size: "size",
    units.parse_signal: "signal",
    units.parse_umask: "umask (octal)",
    limits.parse_rlimit: "rlimit: a number, `unlimited`, or `SOFT:HARD`",
    models._relative_to_manifest: "path",
}
_PLURALS = {"integer": "integers", "string": "strings", "name": "names", "number": "numbers"}

#: What an instance waits for under each ``depends_on`` condition.
_CONDITIONS = {
    "started": "the other instance has been spawned (it is `starting` or `running`, or ran and ended)",
    "running": "the other instance is up past its `restart.min_uptime` (and ready, if it has a check)",
    "ready": "its readiness check passed; without a check, the same as `running` (the default, and "
    "what the list form means)",
    "completed": "the other instance ran and exited with one of its `success_codes` (a one-shot job)",
}


def _annotation(field: FieldInfo) -> Any:
    """The field's type with its constraints, as one ``Annotated`` (pydantic splits them)."""
    if field.metadata:
        return Annotated[(field.annotation, *field.metadata)]  # type: ignore[valid-type]
    return field.annotation


def _validator(tp: Any) -> Callable[..., Any] | None:
    """The first before- or after-validator found through ``Annotated`` and ``| None``."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        for item in meta:
            if isinstance(item, BeforeValidator | AfterValidator):
                return item.func
        return _validator(base)
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _validator(args[0])
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _stream_kinds(tp: Any) -> list[str]:
    """The kinds a stream field accepts, from the members of its tagged union."""
    base = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
    return [member.model_fields["kind"].default for member in typing.get_args(base)]


def _nested(tp: Any) -> tuple[type[BaseModel], str] | None:
    """The model a field holds, and the key-path suffix to reach it (``.NAME`` in a mapping)."""
    while typing.get_origin(tp) is Annotated or _is_union(tp):
        if _is_union(tp):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return None
            tp = args[0]
        else:
            tp = typing.get_args(tp)[0]
    if _is_model(tp):
        return tp, ""
    if typing.get_origin(tp) is dict and _is_model(value := typing.get_args(tp)[1]):
        return value, ".NAME"
    return None


def _type_text(tp: Any, path: str) -> str:
    func = _validator(tp)
    if func is models._stream_from_yaml:
        return "stream: " + ", ".join(f"`{kind}`" for kind in _stream_kinds(tp))
    if func is checks._dependencies_from_yaml:
        return "list of names, or mapping of name to condition or to a mapping (see `.NAME`)"
    if func in _UNITS:
        return _UNITS[func]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        text = _type_text(args[0], path)
        for item in args[1:]:
            if isinstance(item, Ge):
                text += f" ≥ {item.ge}"
        return text
    if _is_union(tp):
        return " or ".join(_type_text(a, path) for a in args if a is not type(None))
    if origin is Literal:
        values = [f"`{v}`" for v in args]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin is list:
        item = _type_text(args[0], path)
        return f"list of {_PLURALS.get(item, item)}"
    if origin is dict:
        if _is_model(args[1]):
            return f"mapping of names to mappings (see `{path}.NAME`)"
        value = _type_text(args[1], path)
        return f"mapping of names to {_PLURALS.get(value, value)}"
    if _is_model(tp):
        return f"mapping (see `{path}`)"
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in names:
        return names[tp]
    raise TypeError(f"{path}: no words for the type {tp!r}: teach supervisor.config.reference")


def _format_size(size: int) -> str:
    """``52428800`` as ``50MB``: the largest unit that divides it, as a person would write it."""
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _yaml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict | BaseModel):
        return "{}"
    return str(value)


def _default_text(field: FieldInfo, tp: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    func = _validator(tp)
    if func is models._stream_from_yaml:
        return f"`{value.kind}`"
    formats: dict[Any, Callable[[Any], str]] = {
        units.parse_duration: units.format_duration,
        units.parse_size: _format_size,
        units.parse_signal: lambda number: units.signal_name(number).removeprefix("SIG"),
        units.parse_umask: lambda mask: f"{mask:03o}",
    }
    return f"`{formats.get(func, _yaml_text)(value)}`"


def _cell(text: str) -> str:
    """Table-safe Markdown: ``|`` would end the cell, ``<x>`` could pass for HTML."""
    return text.replace("``", "`").replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def _meaning(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    if not field.description:
        raise ValueError(
            f"{model.__name__}.{name} has no description: add one in supervisor/config/models.py"
        )
    return field.description


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split()).replace("``", "`")
