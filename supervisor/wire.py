"""JSON as bytes for the control plane's answers and event stream: orjson, else the standard encoder.

orjson is 5 to 10 times faster on what the service sends most (a status of thousands of
instances, a burst of events), and gives bytes. It refuses a lone surrogate (a file name or
program output that is not UTF-8, kept as ``surrogateescape``): then the standard encoder
escapes it, as it always did. Imported by the service's answers only; the CLI never needs it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["json_bytes"]


def json_bytes(value: Any) -> bytes:
    """``value`` as compact JSON (no spaces), in bytes."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()
