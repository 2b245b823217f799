"""Durations, sizes and signals as a person writes them in a manifest.

Each is an ``Annotated`` type: pydantic runs the parser, the JSON Schema says
what a person may write, and a model dumps the value back in the same words,
so that a reload can compare two manifests by their dumped form.
"""

from __future__ import annotations

import re
import signal as _signal
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: Any) -> float:
    """Seconds from ``250ms``, ``30s``, ``2m``, ``1h30m`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 30s, 2m or 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 250ms, 30s, 2m or 1h")
    text = value.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration: write it like 250ms, 30s, 2m, 1h or 1h30m")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


def parse_size(value: Any) -> int:
    """Bytes from ``512KB``, ``50MB``, ``1GiB`` or a bare number; K, M and G are powers of 1024."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512KB or 50MB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str) or not (match := _SIZE.match(value.strip())):
        raise ValueError(f"{value!r} is not a size: write it like 4096, 512KB, 50MB or 1GB")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b")[0].lower()])


def parse_signal(value: Any) -> int:
    """A signal number from ``TERM``, ``SIGTERM``, ``sigterm`` or ``15``."""
    if isinstance(value, bool):
        raise ValueError("expected a signal name such as TERM or a number")
    if isinstance(value, int):
        try:
            return int(_signal.Signals(value))
        except ValueError:
            raise ValueError(f"{value} is not a signal number on this system") from None
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return parse_signal(int(name))
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(_signal.Signals[name])
        except KeyError:
            raise ValueError(f"{value!r} is not a signal: write it like TERM, SIGINT or 9") from None
    raise ValueError("expected a signal name such as TERM or a number")


def signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return str(number)


def parse_umask(value: Any) -> int:
    """An umask from ``"022"`` (octal text, as in a shell) or an integer."""
    if isinstance(value, bool):
        raise ValueError("expected an octal umask such as '022'")
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal umask such as '022'") from None
    if not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError("expected an octal umask between '000' and '777'")
    return value


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d)?)+$"},
            ],
            "description": "A duration: 250ms, 30s, 2m, 1h, 1h30m, or a number of seconds.",
        }
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d+)?\s*([kKmMgG]([iI]?[bB])?|[bB])?$"},
            ],
            "description": "A size in bytes: 4096, 512KB, 50MB, 1GB (K, M, G are powers of 1024).",
        }
    ),
]
Signal = Annotated[
    int,
    BeforeValidator(parse_signal),
    PlainSerializer(signal_name, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string"}, {"type": "integer", "minimum": 1}],
            "description": "A signal: TERM, SIGTERM or a number.",
        }
    ),
]
Umask = Annotated[
    int,
    BeforeValidator(parse_umask),
    PlainSerializer(lambda v: f"{v:03o}", return_type=str),
    WithJsonSchema({"type": "string", "pattern": "^[0-7]{3,4}$", "description": "Octal, e.g. '022'."}),
]
