"""The control API's wire models: what goes over the socket, as JSON.

These are the server's contract and the source of its OpenAPI document, built
on the first request for it. Neither the CLI nor the running service imports
them (pydantic costs 13 MiB and 100 ms of a start): the CLI reads the same JSON
as plain dicts, and the service checks requests with ``requests.py`` and builds
its status answers with ``answers.py``. So a field renamed here must be renamed
there and in ``supervisor/cli/`` (``status.py``, ``control.py``) too; the tests
check every side against these.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from ..config.annotated import Duration, Signal
from ..events import State
from .requests import MAX_LINES, MAX_SCALE, MAX_SCALED_ENTRIES, MAX_TIMEOUT, too_long

__all__ = [
    "ActionRequest",
    "ActionResponse",
    "ErrorBody",
    "EventBody",
    "Health",
    "InstanceResult",
    "InstancesQuery",
    "LogsQuery",
    "QueryParameters",
    "ReloadBody",
    "ReopenBody",
    "ScaleRequest",
    "ShutdownBody",
    "SignalRequest",
    "Status",
    "WaitRequest",
]


class _Wire(BaseModel):
    # Requests refuse unknown keys, as the manifest does: a misspelt `timout` must not be ignored.
    model_config = ConfigDict(extra="forbid")


_TIMEOUT = "Seconds (a number) or a duration such as '30s', '2m' or '500ms'; at most a week."


def _bounded(seconds: float) -> float:
    if not math.isfinite(seconds):
        raise ValueError("expected a finite duration")
    if seconds > MAX_TIMEOUT:
        raise ValueError(too_long(seconds))
    return seconds


Timeout = Annotated[
    Duration,
    AfterValidator(_bounded),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_TIMEOUT},
                {"type": "string", "pattern": r"^(\d{1,6}(\.\d{1,3})?(ms|s|m|h|d)?)+$"},
            ],
            "description": "A duration: 250ms, 30s, 2m, 1h, 1h30m, or a number of seconds (at most a week).",
        }
    ),
]


# -- responses ---------------------------------------------------------------------------------


class Status(BaseModel):
    """One instance, as ``supervisor status`` shows it."""

    name: str = Field(description="The replica's name: NAME, or NAME-i with replicas.")
    group: str = Field(description="The manifest's name for it (the same for every replica).")
    state: State
    pid: int | None = Field(description="null when no process runs.")
    started_at: float | None = Field(description="Unix time the current process started; null when none.")
    uptime_s: float | None = Field(description="Seconds since started_at; null when no process runs.")
    restarts: int = Field(description="Automatic restarts since the last start by hand.")
    exit_code: int | None = Field(description="The last exit's code; null if it was a signal or none yet.")
    exit_signal: str | None = Field(description="The last exit's signal name (SIGKILL…); null if none.")
    reason: str | None = Field(description="Why it is in this state (the last exit, an error, a request).")
    ready: bool | None = Field(
        description="Whether the current run passed its readiness check; null without a check."
    )
    last_check: str | None = Field(description="The last readiness or liveness probe's result.")
    status_text: str | None = Field(description="The last STATUS= text the program sent over sd_notify.")
    log_bytes_lost: int = Field(description="Captured bytes the log files could not take (a full disk).")
    log_error: str | None = Field(description="Why a log file takes no output now; null when it does.")
    stdin: str = Field(description="Where fd 0 comes from (null, inherit, file:PATH, fifo:PATH).")
    stdout: str = Field(description="Where fd 1 goes (log, null, inherit, file:PATH, fifo:PATH).")
    stderr: str = Field(description="Where fd 2 goes (as stdout, or 'stdout' when merged).")
    log_files: dict[str, str] = Field(description="The captured streams' log files, by stream name.")
    cpu_percent: float | None = Field(
        description=(
            "CPU use of the process group, in percent of one core, over the time since the previous "
            "reading (figures are read at most once a second, on demand); null when no process runs."
        ),
    )
    cpu_seconds: float | None = Field(description="CPU time (user + system) of the group's live processes.")
    rss_bytes: int | None = Field(description="Resident memory of the group's processes, summed.")
    open_fds: int | None = Field(description="Open file descriptors of the group's processes, summed.")
    threads: int | None = Field(description="Threads of the group's processes, summed.")
    processes: int | None = Field(description="Live processes in the group (the leader and its own).")
    paused: bool | None = Field(
        None,
        description="The program (the group's leader) is stopped by a signal: SIGSTOP, a terminal's "
        "SIGTSTP, SIGTTIN or SIGTTOU, or a debugger. It does nothing until SIGCONT (`supervisor signal "
        "NAME CONT`), while its state stays running. Read with the other figures; null when no process runs.",
    )


class Health(BaseModel):
    """The service answers: who it is and what it runs."""

    ok: bool = True
    pid: int = Field(description="The service's process id.")
    manifest: str | None = Field(description="The manifest file the service runs.")
    instances: int = Field(description="How many instances (replicas) the manifest has.")
    states: dict[str, int] = Field(description="How many instances are in each state (only non-zero).")
    handoffs: int = Field(0, description="How many times this service re-exec'd itself.")
    handoff_error: str | None = Field(None, description="Why the last re-exec failed, if it did.")
    starting: bool = Field(
        False,
        description="The service is still making and spawning the manifest's instances (the socket "
        "answers from the start; until they are known, every route but this one waits).",
    )
    streams: int = Field(
        0,
        description="Streams open now: event streams and followed logs, on any listener.",
    )
    streams_max: int = Field(
        0,
        description="The most streams open at once; beyond it a stream is refused with 503. Fewer than the "
        "connections the service serves, so that status and health always answer.",
    )
    waits: int = Field(
        0,
        description="Requests that wait, held now: wait, and start, stop or restart until their outcome "
        "(unless wait is false), on any listener.",
    )
    waits_max: int = Field(
        0,
        description="The most requests that wait held at once; beyond it one is refused with 503, and "
        "nothing is done. Apart from the streams' places: open streams never refuse a restart.",
    )


class InstanceResult(BaseModel):
    """The outcome of one request on one instance."""

    name: str
    ok: bool = Field(description="The instance reached the requested state (or took the request).")
    state: State = Field(description="Its state when the answer was made.")
    pid: int | None = None
    error: str | None = Field(None, description="Why not, when ok is false.")


class ActionResponse(BaseModel):
    """Per-instance results; the HTTP status is 200 when every one is ok, 409 otherwise."""

    ok: bool
    results: list[InstanceResult]


class ReloadBody(BaseModel):
    """What a reload (or a scale) did, by replica name."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]
    rescaled: list[str] = Field(
        [], description="Entries a `scale` had changed whose manifest count the reload set back."
    )


class ScaleRequest(_Wire):
    """Run this many replicas of each named manifest entry, until the next reload."""

    scale: dict[str, Annotated[int, Field(ge=0, le=MAX_SCALE, strict=True)]] = Field(
        min_length=1,
        max_length=MAX_SCALED_ENTRIES,
        description="Manifest entry name -> replica count (0 to 10,000).",
        examples=[{"worker": 5}],
    )


class ShutdownBody(BaseModel):
    ok: bool = True
    message: str = "shutting down: stopping every instance"


class ReexecRequest(BaseModel):
    check: bool = Field(
        False, description="Only ask the new code whether it would resume (in a subprocess); change nothing."
    )


class ReexecBody(BaseModel):
    """What the new code said about the state it would take over (``supervisor reexec --check``)."""

    ok: bool = True
    check: bool = Field(description="Only checked: nothing was handed over.")
    message: str
    report: dict[str, Any] = Field(description="The new code's report: version, instances, processes, gone.")
    handoffs: int = Field(description="Re-execs before this one; the new service's health says one more.")


class ReopenBody(BaseModel):
    reopened: int = Field(description="How many log files were reopened.")
    failed: list[str] = Field(
        description="Why each other log file was not (each names its file); its output is counted as lost."
    )


class ErrorBody(BaseModel):
    """Every error answer: one sentence, and the particulars (problems, fields) when there are some."""

    error: str
    details: list[Any] = []


class EventBody(BaseModel):
    """One transition, as each ``data:`` line of ``GET /v1/events`` carries it."""

    instance: str
    group: str
    from_state: State
    to_state: State
    at: float = Field(description="Unix time of the transition.")
    pid: int | None
    exit_code: int | None
    exit_signal: str | None
    reason: str | None
    seq: int = Field(
        description="The event's sequence number (also its SSE `id`): one counter per service, "
        "from 1, increasing, continued across a re-exec."
    )


# -- requests ----------------------------------------------------------------------------------


# "names or all" as JSON Schema can say it, so that the document (and a client generated from
# it, or a fuzzer) knows what the validator below refuses.
_NAMES_OR_ALL: dict[str, Any] = {
    "oneOf": [
        {"properties": {"names": {"minItems": 1}, "all": {"const": False}}, "required": ["names"]},
        {"properties": {"names": {"maxItems": 0}, "all": {"const": True}}, "required": ["all"]},
    ]
}


class _Selection(_Wire):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_NAMES_OR_ALL)

    names: list[str] = Field(
        [],
        description="Instance names, manifest names (every replica) or globs such as 'web-*'.",
    )
    all: bool = Field(False, description="Every instance; names must then be empty.")

    @model_validator(mode="after")
    def _names_or_all(self) -> _Selection:
        if self.all and self.names:
            raise ValueError("give names or all, not both")
        if not self.all and not self.names:
            raise ValueError("name some instances, or set all to true")
        return self

    @property
    def patterns(self) -> list[str]:
        """What ``Manager.select`` takes: no pattern selects every instance."""
        return [] if self.all else self.names


class ActionRequest(_Selection):
    """start, stop or restart some instances."""

    wait: bool = Field(
        True,
        description=(
            "Answer once each instance reached its new state (stop: stopped; start and restart: "
            "running, or exited with success for a one-shot job). false: answer once the request "
            "is under way."
        ),
    )
    timeout: Timeout | None = Field(
        None,
        description=_TIMEOUT + " Default: the instance's restart.min_uptime + 10s (stop: stop.timeout + 5s).",
    )

    def timeout_for(self, default: float) -> float:
        return default if self.timeout is None else self.timeout


class SignalRequest(_Selection):
    """Send a signal to some instances' processes (the whole group when stop.group is set)."""

    signal: Signal = Field(description="A name (HUP, SIGUSR1) or a number.", examples=["HUP", 15])


class WaitRequest(_Selection):
    """Wait until some instances are in one of the given states."""

    state: Annotated[
        list[State | Literal["ready"]], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)
    ] = Field(
        description="A state, or a list of states any of which will do. `ready`: running and ready "
        "(for an instance without a readiness check, the same as running).",
        min_length=1,
    )
    timeout: Timeout | None = Field(None, description=_TIMEOUT + " Default: 30s.")


# -- query parameters --------------------------------------------------------------------------


class QueryParameters(BaseModel):
    """A route's query parameters, validated as a body is (and documented from the same schema).

    Unknown parameters are ignored, as HTTP clients and proxies add their own. ``lists`` names
    the parameters that may repeat (``?names=a&names=b``); of any other, the last one counts.
    """

    lists: ClassVar[frozenset[str]] = frozenset()


class InstancesQuery(QueryParameters):
    lists = frozenset({"names"})

    names: list[str] | None = Field(None, description="Names, manifest names or globs; none: every instance.")


class LogsQuery(QueryParameters):
    stream: Literal["stdout", "stderr"] = "stdout"
    lines: int = Field(10, ge=0, le=MAX_LINES, description="How many of the last lines.")
    follow: bool = Field(False, description="Then stream what is written, until the client leaves.")
