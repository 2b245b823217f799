"""Durations, sizes and signals as a person writes them in a manifest.

The parsers and their words, without pydantic: the running service reads
signal names and formats durations too. ``annotated.py`` makes them the
pydantic types the models use.
"""

from __future__ import annotations

import math
import re
import signal as _signal
from typing import Any

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

#: The longest duration a manifest may give: longer waits are a mistake (or a unit slip), and an
#: unbounded one (a 400-digit number, .inf, .nan) broke timers and float arithmetic at run time.
MAX_DURATION = 365 * 86400.0
#: The largest size a manifest may give: 1 TiB. Anything larger is a mistake, not a log limit.
MAX_SIZE = 1024**4


def _shown(value: Any) -> str:
    """The value as written, cut short: a 400-digit number makes a poor error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:30] + "…" + text[-5:]


def _bounded_duration(seconds: float, written: Any) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be a finite number of seconds, not {_shown(written)}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"{_shown(written)} is longer than the longest duration allowed, 365d (one year)")
    return seconds


def parse_duration(value: Any) -> float:
    """Seconds from ``250ms``, ``30s``, ``2m``, ``1h30m`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 30s, 2m or 1h")
    if isinstance(value, int) and abs(value) > MAX_DURATION:  # before float(): a huge int overflows it
        raise ValueError(f"{_shown(value)} is longer than the longest duration allowed, 365d (one year)")
    if isinstance(value, int | float):
        return _bounded_duration(float(value), value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 250ms, 30s, 2m or 1h")
    text = value.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return _bounded_duration(float(text), value)  # float() of a long digit string is inf, not an error
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{_shown(value)} is not a duration: write it like 250ms, 30s, 2m, 1h or 1h30m")
    return _bounded_duration(sum(float(n) * _DURATION_UNITS[u] for n, u in parts), value)


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
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e6 is a size; 1.5, .inf and .nan are not
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return _bounded_size(value, value)
    if not isinstance(value, str) or not (match := _SIZE.match(value.strip())):
        raise ValueError(f"{_shown(value)} is not a size: write it like 4096, 512KB, 50MB or 1GB")
    number, unit = match.groups()
    size = float(number) * _SIZE_UNITS[(unit or "b")[0].lower()]
    return _bounded_size(int(size) if size <= MAX_SIZE else MAX_SIZE + 1, value)


def _bounded_size(size: int, written: Any) -> int:
    if size > MAX_SIZE:
        raise ValueError(f"{_shown(written)} is larger than the largest size allowed, 1TB")
    return size


def parse_signal(value: Any) -> int:
    """A signal number from ``TERM``, ``SIGTERM``, ``sigterm`` or ``15``."""
    if isinstance(value, bool):
        raise ValueError("expected a signal name such as TERM or a number")
    if isinstance(value, int):
        try:
            return int(_signal.Signals(value))
        except ValueError:
            raise ValueError(f"{_shown(value)} is not a signal number on this system") from None
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit() and len(name) <= 3:
            return parse_signal(int(name))
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(_signal.Signals[name])
        except KeyError:
            raise ValueError(f"{_shown(value)} is not a signal: write it like TERM, SIGINT or 9") from None
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
            raise ValueError(f"{_shown(value)} is not an octal umask such as '022'") from None
    if not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError("expected an octal umask between '000' and '777'")
    return value
