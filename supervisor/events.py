"""Instance states, transition events, and their fan-out to subscribers.

Facts flow back from instances only as events (and status snapshots), so the
bus never blocks a publisher: a subscriber that does not keep up loses events
and is told how many, instead of slowing an instance's state machine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import signal_name


class State(StrEnum):
    """The states of ARCHITECTURE.md's table."""

    STOPPED = "stopped"
    WAITING = "waiting"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"

    @property
    def alive(self) -> bool:
        """A process exists, or one is about to be started again without anyone asking."""
        return self in (State.WAITING, State.STARTING, State.RUNNING, State.BACKOFF, State.STOPPING)


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change of one instance: the event every subscriber sees."""

    instance: str
    group: str
    from_state: State
    to_state: State
    at: float = field(default_factory=time.time)
    pid: int | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["from_state"] = str(self.from_state)
        data["to_state"] = str(self.to_state)
        data["exit_signal"] = signal_name(self.exit_signal) if self.exit_signal else None
        return data

    def describe(self) -> str:
        """The service's log line for this transition."""
        text = f"{self.instance}: {self.from_state} -> {self.to_state}"
        if self.pid is not None:
            text += f" pid={self.pid}"
        if self.exit_code is not None:
            text += f" exit={self.exit_code}"
        if self.exit_signal is not None:
            text += f" signal={signal_name(self.exit_signal)}"
        if self.reason:
            text += f" ({self.reason})"
        return text


@dataclass(frozen=True, slots=True)
class Update:
    """A fact about an instance that changed without a transition.

    ``kind`` says which: ``ready`` (a readiness probe's outcome), ``alive`` (a
    liveness probe's), ``watchdog``, ``notify`` (an sd_notify STATUS= text or
    state), ``waiting`` (what a waiting instance waits for now), ``memory`` (the
    group's RSS stayed over ``limits.memory``: restarting). Published only
    when the outcome changes, so a probe that fails the same way every second
    is one event, not a flood.
    """

    instance: str
    group: str
    kind: str
    ok: bool | None
    message: str | None
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        outcome = "" if self.ok is None else (" ok" if self.ok else " failing")
        return f"{self.instance}: {self.kind}{outcome}" + (f" ({self.message})" if self.message else "")


@dataclass(frozen=True, slots=True)
class Dropped:
    """Told to a slow subscriber in place of the events it missed."""

    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"dropped": self.count}


Event = Transition | Update | Dropped


class _Subscriber:
    def __init__(self, buffer: int) -> None:
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        self.send: MemoryObjectSendStream[Event] = send
        self.receive: MemoryObjectReceiveStream[Event] = receive
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self.dropped:
            try:
                self.send.send_nowait(Dropped(self.dropped))
            except anyio.WouldBlock:
                self.dropped += 1
                return
            self.dropped = 0
        try:
            self.send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


class EventBus:
    """Fan-out of events to any number of subscribers, each with a bounded buffer."""

    def __init__(self, buffer: int = 1024) -> None:
        self._buffer = buffer
        self._subscribers: set[_Subscriber] = set()

    def publish(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            subscriber.offer(event)

    @asynccontextmanager
    async def subscribe(self, buffer: int | None = None) -> AsyncIterator[AsyncIterator[Event]]:
        """Events published from now on, until the block ends."""
        subscriber = _Subscriber(self._buffer if buffer is None else max(1, buffer))
        self._subscribers.add(subscriber)
        try:
            yield subscriber.receive
        finally:
            self._subscribers.discard(subscriber)
            subscriber.send.close()
            subscriber.receive.close()

