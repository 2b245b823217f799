"""Durations, sizes, signals and umasks as the models' types.

Each is an ``Annotated`` type: pydantic runs the parser from ``units.py``, the
JSON Schema says what a person may write, and a model dumps the value back in
the same words.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from .units import (
    MAX_DURATION,
    MAX_SIZE,
    format_duration,
    parse_duration,
    parse_signal,
    parse_size,
    parse_umask,
    signal_name,
)

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_DURATION},
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d)?)+$"},
            ],
            "description": "A duration: 250ms, 30s, 2m, 1h, 1h30m, or a number of seconds; at most 365d.",
        }
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_SIZE},
                {"type": "string", "pattern": r"^\d+(\.\d+)?\s*([kKmMgG]([iI]?[bB])?|[bB])?$"},
            ],
            "description": "A size in bytes: 4096, 512KB, 50MB, 1GB (K, M, G: powers of 1024); at most 1TB.",
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
