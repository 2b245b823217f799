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
The return value of the check is not used: the record stays the dict ``json`` made.
Built on first use, in the new service or the check only: a cold start never pays for it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic reads typing's only from Python 3.12

from ..states import MAX_SEQ, State

__all__ = ["shape_problems"]

#: A descriptor the kernel could have given (its own limit is below 2**31).
Fd = Annotated[int, Field(ge=0, le=2**31 - 1)]
#: A process id (the kernel's PID_MAX_LIMIT is 2**22 on 64-bit; this allows more).
Pid = Annotated[int, Field(ge=1, le=2**31 - 1)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
#: A reading of a clock (monotonic or wall): finite, and not before the epoch.
Clock = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Stream = Literal["stdin", "stdout", "stderr"]
StateName = Literal[tuple(state.value for state in State)]  # type: ignore[valid-type]


class SocketRecord(TypedDict):
    fd: Fd
    name: str


class ConnectionRecord(TypedDict):
    fd: Fd
    listener: Count


class ListenersRecord(TypedDict):
    path: str
    inode: Annotated[list[Count], Field(min_length=2, max_length=2)]
    token: str | None
    sockets: list[SocketRecord]
    connections: NotRequired[list[ConnectionRecord]]


class GuardianRecord(TypedDict):
    pid: Pid
    pidfd: Fd | None
    fd: Fd
    cgroup: str | None


class ServiceRecord(TypedDict):
    pid: Pid
    service_pid: Pid
    manifest: dict[str, Any]  # checked by the manifest's own models next
    source: str | None
    listeners: ListenersRecord
    guardian: GuardianRecord | None
    nofile: Annotated[list[Count], Field(min_length=2, max_length=2)] | None
    signals: NotRequired[Fd | None]
    handoffs: Count
    events_seq: Annotated[int, Field(ge=0, le=MAX_SEQ)]
    scaled: list[str]
    handover_began: NotRequired[Clock | None]
    handover_cpu: NotRequired[Clock | None]
    written_at: Clock


class CountersRecord(TypedDict):
    restarts: Count
    failures: Count


@with_config(ConfigDict(extra="forbid"))  # made into an ExitStatus by keyword: a stray key would fail
class ExitRecord(TypedDict):
    pid: Pid
    code: Annotated[int, Field(ge=0, le=255)] | None
    signal: Annotated[int, Field(ge=1, le=128)] | None
    at: Clock


class ChildRecord(TypedDict):
    pid: Pid
    pgid: Pid
    pidfd: Fd | None
    argv: Annotated[list[str], Field(min_length=1)]
    started_at: Clock
    kill_group_on_exit: bool
    start_ticks: Count | None


class SinkRecord(TypedDict):
    at_line_start: bool


class NotifyRecord(TypedDict):
    fd: Fd
    address: str


class HealthRecord(TypedDict):
    ready: bool | None
    last_check: str | None
    status_text: str | None
    main_pid: Pid | None
    notified: bool
    armed: bool
    notify: NotifyRecord | None


class InstanceRecord(TypedDict):
    name: str
    group: str
    state: StateName
    reason: str | None
    counters: CountersRecord
    last_exit: ExitRecord | None
    child: ChildRecord | None
    next_try: Clock | None
    kill_at: Clock | None
    trouble: str | None
    targets: dict[Stream, str]
    pipes: dict[Stream, Fd]
    sinks: dict[Stream, SinkRecord]
    health: HealthRecord
    cgroup: NotRequired[bool]


class Record(TypedDict):
    format: str
    version: int
    service: ServiceRecord
    instances: list[InstanceRecord]


_adapter: TypeAdapter[Record] | None = None


def shape_problems(record: dict[str, Any]) -> list[tuple[str, str, object]]:
    """What is wrong with the record's shape: (place, what, the value there), in record order."""
    global _adapter
    if _adapter is None:
        _adapter = TypeAdapter(Record)
    try:
        _adapter.validate_python(record, strict=True)
    except ValidationError as exc:
        return [
            (_place(error["loc"]), error["msg"], error.get("input"))
            for error in exc.errors(include_url=False, include_context=False)
        ]
    return []


def _place(loc: tuple[int | str, ...]) -> str:
    """``instances[3].child.pidfd``: the path as the record's JSON reads."""
    text = ""
    for part in loc:
        if part == "[key]":  # pydantic's mark of a bad key: the part before it is the key
            text += " (the key)"
        else:
            text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "the record"
