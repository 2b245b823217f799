"""The dependency graph: what an instance waits for, and in which order a set of instances stops.

Edges are written between manifest entries (``api`` depends on ``db``) and hold
between replicas: ``api`` waits for every replica of ``db``. The graph is looked
up by name at each question, never cached as objects, so an instance replaced by
a reload is seen as the new one.

Nothing here polls: a waiting instance sleeps until one of the instances it
waits for makes a transition (``DependencyGate.changed``). Every walk is
iterative, so a chain of thousands of links is no deeper than one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio

from .config import Dependency
from .events import State
from .instance import Instance

#: The instances of a manifest entry (its replicas), by the entry's name.
#: An entry's replicas; None while the entry has none loaded yet but is to have some.
Lookup = Callable[[str], Sequence[Instance] | None]


def unmet(dependency: Instance, condition: str) -> str | None:
    """Why ``dependency`` does not meet ``condition`` now (for the waiting reason), or None.

    ``blocked:`` says the dependency will not get there by itself (it failed, or
    a job ended badly): the dependent waits for a person to start it again.
    """
    name, state = dependency.name, dependency.state
    if state is State.FAILED:
        return f"blocked: {name} failed: {dependency.reason or 'gave up'}"
    if state is State.EXITED:
        if dependency.completed:
            return None  # it ran and ended well: it was started, up, ready and completed
        last = dependency.last_exit
        return f"blocked: {name} ended with {last.describe() if last else 'an error'}"
    if condition == "completed":
        return f"waiting for {name} to complete ({name} is {state})"
    if condition == "started" and state in (State.STARTING, State.RUNNING):
        return None
    if condition == "running" and state is State.RUNNING:
        return None
    if condition == "ready" and dependency.is_ready:
        return None
    hint = "; start it" if state is State.STOPPED else ""
    return f"waiting for {name} ({condition}): {name} is {state}{hint}"


class DependencyGate:
    """One instance's edges, as ``Instance`` asks about them before each start.

    ``events(group)`` is the manager's: an event set at the next transition of
    any replica of ``group`` (or a change of the set of instances). A gate waits
    on one event per entry it depends on, not one per replica, so a thousand
    waiting instances cost a thousand waits, whatever the width of the graph.
    """

    def __init__(
        self, edges: Mapping[str, Dependency], lookup: Lookup, events: Callable[[str], anyio.Event]
    ) -> None:
        self._edges = dict(edges)
        self._lookup = lookup
        self._events = events

    def blocker(self) -> str | None:
        for group, edge in self._edges.items():
            replicas = self._lookup(group)
            if replicas is None:
                return f"waiting for {group} ({edge.condition}): not loaded yet"
            # No replicas at all (replicas: 0, or scaled to 0): each of none meets the condition.
            for dependency in replicas:
                why = unmet(dependency, edge.condition)
                if why is not None:
                    return why
        return None

    async def changed(self) -> None:
        """Until a replica of an entry this one depends on makes a transition."""
        events = [self._events(group) for group in self._edges]
        if len(events) == 1:
            await events[0].wait()
        else:
            await first_of([event.wait for event in events])


async def first_of(waits: Sequence[Callable[[], Awaitable[object]]]) -> None:
    """Return as soon as one of ``waits`` returns; the others are cancelled."""
    async with anyio.create_task_group() as tg:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(one, wait)


def dependents_within(instances: Sequence[Instance]) -> dict[str, list[Instance]]:
    """For each of ``instances``, those among them that depend on it (directly)."""
    by_group: dict[str, list[Instance]] = {}
    for instance in instances:
        by_group.setdefault(instance.group, []).append(instance)
    dependents: dict[str, list[Instance]] = {instance.name: [] for instance in instances}
    for instance in instances:
        for group in instance.config.depends_on:
            for dependency in by_group.get(group, ()):
                dependents[dependency.name].append(instance)
    return dependents


async def in_reverse_order(
    instances: Sequence[Instance], stop: Callable[[Instance], Awaitable[None]]
) -> None:
    """Run ``stop`` on each instance once every instance (of these) that depends on it is done.

    Independent branches go concurrently; an instance whose ``stop`` fails
    still counts as done, so one failure cannot hold the rest for ever.
    """
    dependents = dependents_within(instances)
    done = {instance.name: anyio.Event() for instance in instances}

    async def one(instance: Instance) -> None:
        try:
            for dependent in dependents[instance.name]:
                await done[dependent.name].wait()
            await stop(instance)
        finally:
            done[instance.name].set()

    async with anyio.create_task_group() as tg:
        for instance in instances:
            tg.start_soon(one, instance)
