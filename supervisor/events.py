"""Instance states, transition events, and their fan-out to subscribers.

Facts flow back from instances only as events (and status snapshots), so the
bus never blocks a publisher: a subscriber that does not keep up loses events
and is told how many, instead of slowing an instance's state machine.

Every event the bus publishes gets the next sequence number (``seq``, from 1), one
counter for the whole service; a re-exec carries it over (handoff/), so the numbering
goes on and never goes back while the service's pid lives. A subscriber sees its
events in increasing ``seq``: a gap means it lost some (and ``Dropped`` says which).
The event stream gives ``seq`` as each event's Server-Sent Events ``id``
(``sse_chunk``). Missed events are not replayed (no buffer of past events is kept):
a client that reconnects compares the first ``seq`` it gets with the last it saw,
and reads the status again if they are not consecutive.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import signal_name
from .states import MAX_SEQ, State

__all__ = ["MAX_SEQ", "Dropped", "Event", "EventBus", "State", "Transition", "Update"]


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
    #: Stamped by ``EventBus.publish`` (0 until published).
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        # Field by field: ``dataclasses.asdict`` deep-copies each value, ten times the cost,
        # and a start of a hundred instances sends a thousand of these down the event stream.
        return {
            "instance": self.instance,
            "group": self.group,
            "from_state": str(self.from_state),
            "to_state": str(self.to_state),
            "at": self.at,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "exit_signal": signal_name(self.exit_signal) if self.exit_signal else None,
            "reason": self.reason,
            "seq": self.seq,
        }

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
    #: Stamped by ``EventBus.publish`` (0 until published).
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "group": self.group,
            "kind": self.kind,
            "ok": self.ok,
            "message": self.message,
            "at": self.at,
            "seq": self.seq,
        }

    def describe(self) -> str:
        outcome = "" if self.ok is None else (" ok" if self.ok else " failing")
        return f"{self.instance}: {self.kind}{outcome}" + (f" ({self.message})" if self.message else "")


@dataclass(frozen=True, slots=True)
class Dropped:
    """Told to a slow subscriber in place of the events it missed: ``first_seq`` to ``seq``.

    Its ``seq`` is the last missed event's, so the subscriber's stream stays in increasing
    ``seq`` order and the next event it gets follows on from this one.
    """

    count: int
    first_seq: int = 0
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"dropped": self.count, "first_seq": self.first_seq, "seq": self.seq}


Event = Transition | Update | Dropped



def sse_chunk(event: Event) -> bytes:
    """One event as Server-Sent Events lines: ``id`` (its seq), the event type, its JSON ``data``.

    Transitions have no ``event:`` line (a browser's ``onmessage`` gets them); updates are
    ``event: update``, a slow reader's notice ``event: dropped``.
    """
    from .wire import json_bytes  # the event stream's: the CLI never sends one

    data = json_bytes(event.to_dict())
    kind = (
        b""
        if isinstance(event, Transition)
        else b"event: update\n"
        if isinstance(event, Update)
        else b"event: dropped\n"
    )
    return b"id: %d\n%sdata: %s\n\n" % (event.seq, kind, data)


class _Subscriber:
    def __init__(self, buffer: int) -> None:
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        self.send: MemoryObjectSendStream[Event] = send
        self.receive: MemoryObjectReceiveStream[Event] = receive
        self.dropped = 0
        self._first_missed = 0  # the seq of the first event lost since the last one delivered
        self._last_missed = 0

    def offer(self, event: Event) -> None:
        if self.dropped:
            try:
                self.send.send_nowait(Dropped(self.dropped, self._first_missed, self._last_missed))
            except anyio.WouldBlock:
                self._missed(event)
                return
            self.dropped = 0
        try:
            self.send.send_nowait(event)
        except anyio.WouldBlock:
            self._missed(event)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def _missed(self, event: Event) -> None:
        if not self.dropped:
            self._first_missed = event.seq
        self.dropped += 1
        self._last_missed = event.seq


class EventBus:
    """Fan-out of events to any number of subscribers, each with a bounded buffer.

    ``seq``: the sequence number of the last event published (0: none yet); a re-exec'd
    service's bus starts from its predecessor's (``carry_on``).
    """

    def __init__(self, buffer: int = 1024) -> None:
        self._buffer = buffer
        self._subscribers: set[_Subscriber] = set()
        self._seq = 0

    @property
    def seq(self) -> int:
        return self._seq

    def carry_on(self, seq: int) -> None:
        """Go on numbering after ``seq`` (the old service's last, read from its state record)."""
        if not 0 <= seq <= MAX_SEQ:
            raise ValueError(f"an event sequence number is 0 to {MAX_SEQ}, not {seq}")
        self._seq = max(self._seq, seq)

    def publish(self, event: Transition | Update) -> None:
        """Stamp ``event`` with the next sequence number, then offer it to every subscriber.

        The event is the publisher's new object, not yet seen by anyone: stamping it in place
        (it is frozen for the subscribers that share it) costs nothing per event, where a copy
        with the number would cost a few microseconds each in a start of 10,000 instances.
        """
        self._seq += 1
        object.__setattr__(event, "seq", self._seq)
        for subscriber in list(self._subscribers):
            subscriber.offer(event)

    @asynccontextmanager
    async def subscribe(self, buffer: int | None = None) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        """Events published from now on, until the block ends."""
        subscriber = _Subscriber(self._buffer if buffer is None else max(1, buffer))
        self._subscribers.add(subscriber)
        try:
            yield subscriber.receive
        finally:
            self._subscribers.discard(subscriber)
            subscriber.send.close()
            subscriber.receive.close()

