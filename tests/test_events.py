"""The event bus's sequence numbers: one counter per service, in order for every subscriber.

Real instances (real processes) publish; the bus numbers; a subscriber that falls behind is
told exactly which numbers it missed. The numbering across a re-exec is in test_reexec.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from supervisor.events import MAX_SEQ, Dropped, EventBus, State, Transition, Update, sse_chunk

from .helpers import manifest_from, running

pytestmark = pytest.mark.anyio


async def test_every_event_gets_the_next_number_and_each_subscriber_sees_them_in_order(
    tmp_path: Path,
) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          quick:
            command: ["true"]
            restart: {policy: "no", min_uptime: 0}
            replicas: 3
          sleeper:
            command: ["sleep", "300"]
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, recorder):
        for name in ("quick-0", "quick-1", "quick-2"):
            await recorder.wait_for(lambda e, name=name: e.instance == name and e.to_state is State.EXITED)
        await recorder.wait_for(lambda e: e.instance == "sleeper" and e.to_state is State.RUNNING)
        numbers = [event.seq for event in recorder.events]
        assert numbers == list(range(1, len(numbers) + 1))  # from 1, none skipped, none twice
        assert manager.events.seq == numbers[-1]
        async with manager.events.subscribe() as later:
            await manager.instances["sleeper"].restart()
            with anyio.fail_after(10):
                first = await anext(later)
            assert first.seq == numbers[-1] + 1  # a later subscriber goes on from the same counter


async def test_a_slow_subscriber_is_told_which_numbers_it_missed() -> None:
    bus = EventBus()
    async with bus.subscribe(buffer=2) as events:
        for i in range(7):
            bus.publish(Update("a", "a", "notify", True, f"status {i}"))
        bus.publish(Transition("a", "a", State.RUNNING, State.STOPPING))
        got = []
        with anyio.fail_after(5):
            got.append(await anext(events))
            got.append(await anext(events))
        bus.publish(Transition("a", "a", State.STOPPING, State.STOPPED))
        with anyio.fail_after(5):
            got.append(await anext(events))
            got.append(await anext(events))
    assert [e.seq for e in got[:2]] == [1, 2]
    dropped = got[2]
    assert isinstance(dropped, Dropped) and (dropped.count, dropped.first_seq, dropped.seq) == (6, 3, 8)
    assert dropped.to_dict() == {"dropped": 6, "first_seq": 3, "seq": 8}
    assert isinstance(got[3], Transition) and got[3].seq == 9  # in order after the notice


async def test_a_bus_carries_on_after_a_number_and_refuses_a_bad_one() -> None:
    bus = EventBus()
    bus.carry_on(41)
    event = Update("a", "a", "ready", True, None)
    bus.publish(event)
    assert event.seq == 42 and bus.seq == 42
    bus.carry_on(7)  # never back
    bus.publish(event := Update("a", "a", "ready", False, None))
    assert event.seq == 43
    for bad in (-1, MAX_SEQ + 1, 10**30):
        with pytest.raises(ValueError, match="sequence number"):
            bus.carry_on(bad)
    assert bus.seq == 43


def test_server_sent_events_give_the_number_as_the_id() -> None:
    transition = Transition("web", "web", State.STARTING, State.RUNNING, at=1.5, pid=7)
    object.__setattr__(transition, "seq", 12)  # as EventBus.publish stamps it
    chunk = sse_chunk(transition)
    assert chunk.startswith(b"id: 12\ndata: {") and chunk.endswith(b"}\n\n")
    body = json.loads(chunk.split(b"data: ", 1)[1])
    assert body["seq"] == 12 and body["to_state"] == "running" and body["pid"] == 7
    update = sse_chunk(Update("web", "web", "ready", True, "line\nbreak", seq=13))
    assert update.startswith(b"id: 13\nevent: update\ndata: ")
    assert update.count(b"\n\n") == 1  # a newline in a message stays inside the JSON string
    assert sse_chunk(Dropped(4, 14, 17)).startswith(b"id: 17\nevent: dropped\ndata: {\"dropped\":4")
