"""The state record's shape: every field the new service reads, with its type and range.

``parse_state`` checks a record against it before anything is taken, so that a record
the new code cannot use is refused where the old service still runs (its ``--check``
runs the same code on a copy) and never fails halfway through the adoption, after the
exec, with instances that would die with the service. The record is our own old
service's, sealed; what the check guards against is a bug or a version skew, and
values JSON allows that the code would choke on: NaN and infinities, a number where a
descriptor goes, a negative or huge descriptor, ``true`` for a count.

Strict: no coercion (``"7"`` is not a descriptor, ``true`` is not a count, ``7.0`` is not
a pid); a key the code does not read is let through (a newer service's optional field).
The record stays the dict ``json`` made.

Plain Python, not pydantic (which the manifest's models use): the resuming service checks
the record it was handed in its own process, at once, where pydantic would cost it a child
interpreter on the handover's path, or 13 MiB for the rest of its life. The problems read
as pydantic words them, which is what this check said before. A valid record, the usual
case, is walked once by ``ok``; ``problems`` walks it again only to say what is wrong.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from ..states import MAX_SEQ, State

__all__ = [
    "RECORD",
    "Clock",
    "Int",
    "ListOf",
    "MapOf",
    "Nullable",
    "OneOf",
    "Shape",
    "Struct",
    "shape_problems",
]

#: A problem: where in the record (a path of keys and indices), what is wrong, the value there.
Problem = tuple[tuple[Any, ...], str, object]
#: A path's part after a mapping's key whose key, not its value, is wrong (pydantic's mark).
KEY = "[key]"


class Shape(ABC):
    """One field's kind. ``ok`` answers fast; ``problems`` says what is wrong, and where."""

    @abstractmethod
    def ok(self, value: object) -> bool:
        """Whether ``value`` is of this kind (the whole of it, for a container)."""

    @abstractmethod
    def problems(self, value: object, path: tuple[Any, ...], out: list[Problem]) -> None:
        """Append to ``out`` what is wrong with ``value``, at ``path`` and below."""


class Int(Shape):
    """A whole number in ``[lo, hi]``: not ``true``, not ``7.0``, not ``"7"``."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def ok(self, value: object) -> bool:
        return type(value) is int and self.lo <= value <= self.hi

    def problems(self, value: object, path: tuple[Any, ...], out: list[Problem]) -> None:
        if type(value) is not int:
            out.append((path, "Input should be a valid integer", value))
        elif value < self.lo:
            out.append((path, f"Input should be greater than or equal to {self.lo}", value))
        elif value > self.hi:
            out.append((path, f"Input should be less than or equal to {self.hi}", value))


class Clock(Shape):
    """A reading of a clock (monotonic or wall): finite, and not before the epoch."""

    def ok(self, value: object) -> bool:
        if type(value) is float:
            return 0.0 <= value < math.inf  # NaN compares false
        return type(value) is int and value >= 0

    def problems(self, value: object, path: tuple[Any, ...], out: list[Problem]) -> None:
        if type(value) is not int and type(value) is not float:  # not true either
            out.append((path, "Input should be a valid number", value))
        elif not math.isfinite(value):
            out.append((path, "Input should be a finite number", value))
        elif value < 0:
            out.append((path, "Input should be greater than or equal to 0", value))


class _Exactly(Shape):
    """A value of one JSON type: a string, a boolean, or any mapping (checked by its own code)."""

    def __init__(self, kind: type, what: str) -> None:
        self.kind, self.what = kind, what

    def ok(self, value: object) -> bool:
        return type(value) is self.kind

    def problems(self, value: object, path: tuple[Any, ...], out: list[Problem]) -> None:
        if type(value) is not self.kind:
            out.append((path, f"Input should be a valid {self.what}", value))


class OneOf(Shape):
    """One of a few strings."""

    def __init__(self, values: Iterable[str]) -> None:
        self.values = tuple(values)

    def ok(self, value: object) -> bool:
        return type(value) is str and value in self.values

    def problems(self, value: object, path: tuple[Any, ...], out: list[Problem]) -> None:
        if not self.ok(value):
            words = [repr(v) for v in self.values]
            listed = f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]
            out.append((path, f"Input should be {listed}", value))


class Nullable(Shape):
    """``null``, or what ``shape`` takes."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape

    def ok(self, value: object) -> bool:
        return value is None or self.shape.ok(value)

    def problems(self, value: object, path: tuple[Any, ...], out: list[Problem]) -> None:
        if value is not None:
            self.shape.problems(value, path, out)


class ListOf(Shape):
    """A list of ``item``, of ``lo`` to ``hi`` items."""

    def __init__(self, item: Shape, lo: int = 0, hi: int | None = None) -> None:
        self.item, self.lo, self.hi = item, lo, hi

    def ok(self, value: object) -> bool:
        if type(value) is not list or len(value) < self.lo or (self.hi is not None and len(value) > self.hi):
            return False
        ok = self.item.ok
        return all(ok(entry) for entry in value)

    def problems(self, value: object, path: tuple[Any, ...], out: list[Problem]) -> None:
        if type(value) is not list:
            out.append((path, "Input should be a valid list", value))
            return
        # As pydantic says it: a list too long is that alone; a list too short, only when its items are good.
        if self.hi is not None and len(value) > self.hi:
            out.append((path, f"List should have at most {_items(self.hi, len(value))}", value))
            return
        found = len(out)
        for index, entry in enumerate(value):
            self.item.problems(entry, (*path, index), out)
        if len(out) == found and len(value) < self.lo:
            out.append((path, f"List should have at least {_items(self.lo, len(value))}", value))


def _items(bound: int, count: int) -> str:
    return f"{bound} {'item' if bound == 1 else 'items'} after validation, not {count}"


class MapOf(Shape):
    """A mapping from ``key`` to ``value`` (JSON's keys are strings already)."""

    def __init__(self, key: Shape, value: Shape) -> None:
        self.key, self.value = key, value

    def ok(self, value: object) -> bool:
        if type(value) is not dict:
            return False
        key_ok, value_ok = self.key.ok, self.value.ok
        return all(key_ok(k) and value_ok(v) for k, v in value.items())

    def problems(self, value: object, path: tuple[Any, ...], out: list[Problem]) -> None:
        if type(value) is not dict:
            out.append((path, "Input should be a valid dictionary", value))
            return
        for key, entry in value.items():
            self.key.problems(key, (*path, key, KEY), out)
            self.value.problems(entry, (*path, key), out)


class Struct(Shape):
    """A mapping with these keys in this order; ``optional`` ones may be missing, and ``closed``:
    no other key either (a mapping the code makes into an object by keyword)."""

    def __init__(
        self, fields: dict[str, Shape], optional: Iterable[str] = (), *, closed: bool = False
    ) -> None:
        self.fields = fields
        skipped = set(optional)
        self.required = frozenset(name for name in fields if name not in skipped)
        self.closed = closed
        self._items = tuple(fields.items())

    def ok(self, value: object) -> bool:
        if type(value) is not dict:
            return False
        for name, shape in self._items:
            if name in value:
                if not shape.ok(value[name]):
                    return False
            elif name in self.required:
                return False
        return not self.closed or all(name in self.fields for name in value)

    def problems(self, value: object, path: tuple[Any, ...], out: list[Problem]) -> None:
        if type(value) is not dict:
            out.append((path, "Input should be a valid dictionary", value))
            return
        for name, shape in self._items:
            if name in value:
                shape.problems(value[name], (*path, name), out)
            elif name in self.required:
                out.append(((*path, name), "Field required", value))
        if self.closed:
            for name in value:
                if name not in self.fields:
                    out.append(((*path, name), "Extra inputs are not permitted", value[name]))


#: A descriptor the kernel could have given (its own limit is below 2**31).
FD = Int(0, 2**31 - 1)
#: A process id (the kernel's PID_MAX_LIMIT is 2**22 on 64-bit; this allows more).
PID = Int(1, 2**31 - 1)
COUNT = Int(0, 2**63 - 1)
#: The most replicas ``scale`` gives an entry (manager.MAX_SCALE; this module imports no manager).
MAX_SCALE = 10_000
CLOCK = Clock()
STR = _Exactly(str, "string")
BOOL = _Exactly(bool, "boolean")
#: Any mapping: the manifest, checked by its own models next.
MAPPING = _Exactly(dict, "dictionary")
STREAM = OneOf(("stdin", "stdout", "stderr"))
#: A pair: ``[soft, hard]``, ``[device, inode]``.
PAIR = ListOf(COUNT, 2, 2)

SERVICE = Struct(
    {
        "pid": PID,
        "service_pid": PID,
        "manifest": MAPPING,
        "source": Nullable(STR),
        "listeners": Struct(
            {
                "path": STR,
                "inode": PAIR,
                "token": Nullable(STR),
                "sockets": ListOf(Struct({"fd": FD, "name": STR})),
                "connections": ListOf(Struct({"fd": FD, "listener": COUNT})),
            },
            optional=["connections"],
        ),
        "guardian": Nullable(Struct({"pid": PID, "pidfd": Nullable(FD), "fd": FD, "cgroup": Nullable(STR)})),
        "nofile": Nullable(PAIR),
        "signals": Nullable(FD),
        # The state folder's lock (statedir.StateDirLock): a record of older code has none.
        "state_lock": Nullable(FD),
        # The abstract socket named after the state folder's path (statedir.py); optional too.
        "state_name": Nullable(FD),
        "handoffs": COUNT,
        "events_seq": Int(0, MAX_SEQ),
        "scaled": ListOf(STR),
        # Those entries' counts, which the new service applies: a record of older code has none.
        "scaled_replicas": MapOf(STR, Int(0, MAX_SCALE)),
        # What each entry's env_file said when it was applied (resumption.applied_env_files):
        # a record of older code has none.
        "env_files": MapOf(STR, MapOf(STR, STR)),
        "handover_began": Nullable(CLOCK),
        "handover_cpu": Nullable(CLOCK),
        "written_at": CLOCK,
        # The old service's check of this code, handed over (record_check.py).
        "checked": Nullable(Struct({"digest": STR, "answer": STR})),
    },
    optional=[
        "signals", "handover_began", "handover_cpu", "checked", "scaled_replicas", "state_lock", "state_name",
        "env_files",
    ],
)

INSTANCE = Struct(
    {
        "name": STR,
        "group": STR,
        "state": OneOf(state.value for state in State),
        "reason": Nullable(STR),
        "counters": Struct({"restarts": COUNT, "failures": COUNT}),
        # Made into an ExitStatus by keyword: a stray key would fail.
        "last_exit": Nullable(
            Struct(
                {"pid": PID, "code": Nullable(Int(0, 255)), "signal": Nullable(Int(1, 128)), "at": CLOCK},
                closed=True,
            )
        ),
        "child": Nullable(
            Struct(
                {
                    "pid": PID,
                    "pgid": PID,
                    "pidfd": Nullable(FD),
                    "argv": ListOf(STR, 1),
                    "started_at": CLOCK,
                    "kill_group_on_exit": BOOL,
                    "start_ticks": Nullable(COUNT),
                }
            )
        ),
        "next_try": Nullable(CLOCK),
        "kill_at": Nullable(CLOCK),
        "trouble": Nullable(STR),
        "trouble_failed_start": BOOL,
        "targets": MapOf(STREAM, STR),
        "pipes": MapOf(STREAM, FD),
        "sinks": MapOf(STREAM, Struct({"at_line_start": BOOL})),
        "health": Struct(
            {
                "ready": Nullable(BOOL),
                "last_check": Nullable(STR),
                "status_text": Nullable(STR),
                "main_pid": Nullable(PID),
                "notified": BOOL,
                "armed": BOOL,
                "notify": Nullable(Struct({"fd": FD, "address": STR})),
            }
        ),
        "cgroup": BOOL,
    },
    optional=["cgroup", "trouble_failed_start"],
)

#: The whole record.
RECORD = Struct(
    {"format": STR, "version": Int(0, 2**63 - 1), "service": SERVICE, "instances": ListOf(INSTANCE)}
)


def shape_problems(record: dict[str, Any]) -> list[tuple[str, str, object]]:
    """What is wrong with the record's shape: (place, what, the value there), in record order."""
    if RECORD.ok(record):
        return []
    found: list[Problem] = []
    RECORD.problems(record, (), found)
    return [(_place(path), what, value) for path, what, value in found]


def _place(loc: tuple[Any, ...]) -> str:
    """``instances[3].child.pidfd``: the path as the record's JSON reads."""
    text = ""
    for part in loc:
        if part == KEY:  # the part before it is the key
            text += " (the key)"
        else:
            text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "the record"
