"""What a request may carry, checked by hand: the service's side of the wire models.

The pydantic models in ``models.py`` are the API's contract: the OpenAPI document is
built from them, and the tests check every answer against them. The service checks
what it is sent with the classes here instead, which take the same fields within the
same limits and name what is wrong in the same words (``timeout: ...``,
``query.lines: Input should be less than or equal to 1000000``). Importing pydantic
and building its validators was 13 MiB and 100 ms of the service's start, for seven
small requests (docs/performance.md). ``tests/test_api_requests.py`` feeds both sides
the same inputs and requires the same verdicts and the same values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from ..config.problems import shown_key
from ..config.units import parse_duration, parse_signal
from ..events import State

__all__ = [
    "MAX_TIMEOUT",
    "ActionRequest",
    "InstancesQuery",
    "InvalidInput",
    "LogsQuery",
    "ReexecRequest",
    "ScaleRequest",
    "SignalRequest",
    "WaitRequest",
    "too_long",
]

#: The longest timeout a request may ask for: longer is a typo, not a wish (and NaN or an
#: overflowing number must be a 400, never a timer that fires at once or never).
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_SCALE = 10_000
MAX_SCALED_ENTRIES = 1000
MAX_LINES = 1_000_000
#: The most problems a 400 lists; a count of the rest follows.
MAX_PROBLEMS = 20

T = TypeVar("T")
_MISSING: Any = object()
_WAIT_STATES = (*(str(state) for state in State), "ready")
# What pydantic's lax mode reads as a boolean in a query string, and as an integer.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_INTEGER = re.compile(r"([+-]?[0-9]+(?:_[0-9]+)*)(?:\.0+)?")  # 1_000 and 12.0 too
_MAX_DIGITS = 4300  # Python's own limit of an int from text


class InvalidInput(Exception):
    """The request's body or parameters are not what the route takes: a 400 with ``details``."""

    def __init__(self, details: Sequence[str]) -> None:
        super().__init__("; ".join(details))
        self.details = list(details)


class _Reader:
    """Reads the fields of one request, gathering every problem before any is raised."""

    def __init__(self, values: Mapping[str, Any], prefix: str = "") -> None:
        self.values = values
        self.prefix = prefix
        self.problems: list[str] = []

    def fail(self, where: str, message: str) -> None:
        place = ".".join(part for part in (self.prefix, where) if part)
        self.problems.append(f"{place}: {message}" if place else message)

    def field(self, name: str, check: Callable[[Any, str], T], default: Any = _MISSING) -> T:
        value = self.values.get(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                self.fail(name, "Field required")
            return default  # type: ignore[no-any-return]
        try:
            return check(value, name)
        except _Wrong as wrong:
            self.fail(wrong.where, wrong.message)
            return default if default is not _MISSING else None  # type: ignore[no-any-return]

    def no_others(self, known: tuple[str, ...]) -> None:
        for key in self.values:
            if key not in known:
                self.fail(shown_key(key), "Extra inputs are not permitted")

    def done(self) -> None:
        """Raise the problems found, the first ``MAX_PROBLEMS`` of them: a body of ten thousand
        unknown keys is refused in a few lines, not ten thousand."""
        if len(self.problems) > MAX_PROBLEMS:
            rest = len(self.problems) - MAX_PROBLEMS
            self.problems[MAX_PROBLEMS:] = [f"… and {rest} more problem{'s' if rest != 1 else ''}"]
        if self.problems:
            raise InvalidInput(self.problems)


class _Wrong(Exception):
    def __init__(self, where: str, message: str) -> None:
        self.where, self.message = where, message


# -- one value --------------------------------------------------------------------------------


def _bool(value: Any, where: str) -> bool:
    """A JSON boolean, or what pydantic's lax mode reads as one: 0, 1.0, "yes", "off"…"""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise _Wrong(where, "Input should be a valid boolean, unable to interpret input")
    raise _Wrong(where, "Input should be a valid boolean")


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise _Wrong(where, "Input should be a valid list")
    for index, name in enumerate(value):
        if not isinstance(name, str):
            raise _Wrong(f"{where}.{index}", "Input should be a valid string")
    return value


def _timeout(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise _Wrong(where, str(exc)) from None
    if not math.isfinite(seconds):
        raise _Wrong(where, "expected a finite duration")
    if seconds > MAX_TIMEOUT:
        raise _Wrong(where, too_long(seconds))
    return seconds


def too_long(seconds: float) -> str:
    """Why a timeout past a week is refused, in the words of both sides (``models.py`` too).

    The value as repr writes it: the shortest text that reads back as the same float, so that
    604800.0000001 is not shown as the 604800 it was refused beside.
    """
    return f"at most a week ({MAX_TIMEOUT:g}s), not {repr(float(seconds)).removesuffix('.0')}s"


def _signal(value: Any, where: str) -> int:
    try:
        return parse_signal(value)
    except ValueError as exc:
        raise _Wrong(where, str(exc)) from None


def _states(value: Any, where: str) -> list[str]:
    states = [value] if isinstance(value, str) else value
    if not isinstance(states, list):
        raise _Wrong(where, "Input should be a valid list")
    if not states:
        raise _Wrong(where, "List should have at least 1 item after validation, not 0")
    for index, state in enumerate(states):
        if state not in _WAIT_STATES:
            choices = ", ".join(f"'{s}'" for s in _WAIT_STATES[:-1])
            raise _Wrong(f"{where}.{index}", f"Input should be {choices} or '{_WAIT_STATES[-1]}'")
    return states


def _within(number: int, where: str, low: int, high: int) -> int:
    if number < low:
        raise _Wrong(where, f"Input should be greater than or equal to {low}")
    if number > high:
        raise _Wrong(where, f"Input should be less than or equal to {high}")
    return number


def _counts(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, dict):
        raise _Wrong(where, "Input should be a valid dictionary")
    if not value:
        raise _Wrong(where, "Dictionary should have at least 1 item after validation, not 0")
    if len(value) > MAX_SCALED_ENTRIES:
        raise _Wrong(
            where,
            f"Dictionary should have at most {MAX_SCALED_ENTRIES} items after validation, not {len(value)}",
        )
    for name, count in value.items():
        place = f"{where}.{shown_key(name)}"
        if not isinstance(count, int) or isinstance(count, bool):
            raise _Wrong(place, "Input should be a valid integer")
        _within(count, place, 0, MAX_SCALE)
    return value


def _query_int(low: int, high: int) -> Callable[[str, str], int]:
    def check(value: str, where: str) -> int:
        text = value.strip()
        if len(text) > _MAX_DIGITS:
            raise _Wrong(where, "Unable to parse input string as an integer, exceeded maximum size")
        match = _INTEGER.fullmatch(text)
        if match is None:
            raise _Wrong(where, "Input should be a valid integer, unable to parse string as an integer")
        return _within(int(match[1]), where, low, high)

    return check


def _stream(value: str, where: str) -> str:
    if value not in ("stdout", "stderr"):
        raise _Wrong(where, "Input should be 'stdout' or 'stderr'")
    return value


# -- the requests -----------------------------------------------------------------------------


class _Selection:
    """Names or all, what ``Manager.select`` takes, and the fields ``read`` adds: all checked."""

    __slots__ = ("all", "names")
    fields: ClassVar[tuple[str, ...]] = ("names", "all")

    def __init__(self, values: Mapping[str, Any]) -> None:
        reader = _Reader(values)
        self.names: list[str] = reader.field("names", _names, [])
        self.all: bool = reader.field("all", _bool, False)
        self.read(reader)
        reader.no_others(self.fields)
        if not reader.problems:  # as the model's own check, which runs once the fields passed
            if self.all and self.names:
                reader.fail("", "give names or all, not both")
            elif not self.all and not self.names:
                reader.fail("", "name some instances, or set all to true")
        reader.done()

    def read(self, reader: _Reader) -> None:
        """The request's own fields."""

    @property
    def patterns(self) -> list[str]:
        """What ``Manager.select`` takes: no pattern selects every instance."""
        return [] if self.all else self.names


class ActionRequest(_Selection):
    """start, stop or restart some instances."""

    __slots__ = ("timeout", "wait")
    fields = ("names", "all", "wait", "timeout")

    def read(self, reader: _Reader) -> None:
        self.wait: bool = reader.field("wait", _bool, True)
        self.timeout: float | None = reader.field("timeout", _timeout, None)

    def timeout_for(self, default: float) -> float:
        return default if self.timeout is None else self.timeout


class SignalRequest(_Selection):
    """Send a signal to some instances' processes."""

    __slots__ = ("signal",)
    fields = ("names", "all", "signal")

    def read(self, reader: _Reader) -> None:
        self.signal: int = reader.field("signal", _signal)


class WaitRequest(_Selection):
    """Wait until some instances are in one of the given states."""

    __slots__ = ("state", "timeout")
    fields = ("names", "all", "state", "timeout")

    def read(self, reader: _Reader) -> None:
        self.state: list[str] = reader.field("state", _states)
        self.timeout: float | None = reader.field("timeout", _timeout, None)


class ScaleRequest:
    """Run this many replicas of each named manifest entry, until the next reload."""

    __slots__ = ("scale",)
    fields: ClassVar[tuple[str, ...]] = ("scale",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        reader = _Reader(values)
        self.scale: dict[str, int] = reader.field("scale", _counts)
        reader.no_others(self.fields)
        reader.done()


class ReexecRequest:
    """Only check, or hand over. Other keys are ignored, as the model does."""

    __slots__ = ("check",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        reader = _Reader(values)
        self.check: bool = reader.field("check", _bool, False)
        reader.done()


class QueryParameters:
    """A route's query parameters. Unknown ones are ignored, as HTTP clients and proxies add their
    own; ``lists`` names those that may repeat, and of any other the last one counts."""

    __slots__ = ()
    lists: ClassVar[frozenset[str]] = frozenset()
    fields: ClassVar[tuple[str, ...]] = ()


class InstancesQuery(QueryParameters):
    __slots__ = ("names",)
    lists = frozenset({"names"})
    fields = ("names",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.names: list[str] | None = values.get("names")


class LogsQuery(QueryParameters):
    __slots__ = ("follow", "lines", "stream")
    fields = ("stream", "lines", "follow")

    def __init__(self, values: Mapping[str, Any]) -> None:
        reader = _Reader(values, prefix="query")
        self.stream: str = reader.field("stream", _stream, "stdout")
        self.lines: int = reader.field("lines", _query_int(0, MAX_LINES), 10)
        self.follow: bool = reader.field("follow", _bool, False)
        reader.done()
