"""The manager's half of the re-exec handoff (supervisor/handoff/): describe every instance, adopt them all.

``Resumption`` is mixed into ``Manager``, as adoption.py's ``Adoption`` is into ``Instance``:
the old service reads ``handoff_state()`` with ``quiet()`` held, right before it execs; the
new one calls ``resume()`` before ``run()``, and ``run()`` adopts (``_adopt``) instead of
applying the manifest. Kept apart so that manager.py reads as the manager of one running
manifest, and the handover's speed (bench/reexec.py) has one place.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from .instance import InvalidRequest

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .config import Manifest, ServiceSettings
    from .events import EventBus
    from .instance import Instance
    from .manager import _Plan
    from .process import Child

__all__ = ["Resumption"]


class Resumption:
    """The handoff methods of ``Manager`` (see the module's docstring)."""

    if TYPE_CHECKING:  # what Manager provides
        manifest: Manifest
        events: EventBus
        roster_known: anyio.Event
        roster_known_at: tuple[float, float] | None
        _instances: dict[str, Instance]
        _tg: TaskGroup | None
        _apply_lock: anyio.Lock
        _closing: bool
        _scaled: set[str]
        _adopting: tuple[dict[str, dict[str, Any]], Mapping[str, Child]] | None

        def _make(self, name: str, plan: _Plan, settings: ServiceSettings) -> Instance: ...
        def _roster_changed(self) -> None: ...

    def resume(self, state: Mapping[str, Any], children: Mapping[str, Child]) -> None:
        """Before ``run()``: adopt the instances ``state`` (``handoff_state()``) describes, not start.

        ``children``: the adopted programs by instance name (those still the same process).
        ``state["scaled"]``: the entries ``scale`` changed, with their counts (a mapping), or
        their names only (a list: a record of a service before counts were handed over, or a
        caller that hands the record's ``service.scaled``); then each count is that of the
        entry's instances in the record, which is what ran. The counts are applied to the
        manifest the instances are built from, as ``scale`` applied them: else the entry's
        manifest count was rebuilt, and the replicas beyond it ran on unsupervised (and those
        below it came back ``stopped`` after a scale down, holding their dependents up).
        """
        instances = state["instances"]
        self._adopting = ({record["name"]: record for record in instances}, children)
        counts = scaled_counts(state["scaled"], instances)
        entries = dict(self.manifest.instances)
        counts = {group: count for group, count in counts.items() if group in entries}
        if counts:
            for group, count in counts.items():
                entries[group] = entries[group].replace(replicas=count)
            self.manifest = self.manifest.replace(instances=entries)
        self._scaled = set(counts)  # still until the next reload, which sets them back
        self.events.carry_on(state["events_seq"])  # the numbering goes on, never back

    def handoff_state(self) -> dict[str, Any]:
        """The instances and what ``scale`` changed, for a re-exec (call it with ``quiet()`` held).

        ``scaled``: the entries' names, as older code reads them; ``scaled_replicas``: their
        counts (this manager's manifest is the scaled one), which the new service applies.
        """
        scaled = sorted(self._scaled)
        return {
            "events_seq": self.events.seq,
            "scaled": scaled,
            "scaled_replicas": {group: self.manifest.instances[group].replicas for group in scaled},
            "env_files": applied_env_files(self.manifest),
            "instances": [instance.handoff_state() for instance in self._instances.values()],
        }

    @contextlib.asynccontextmanager
    async def quiet(self, timeout: float) -> AsyncIterator[None]:
        """Hold off reloads and scales (waiting up to ``timeout`` for one under way): a re-exec
        must see every instance the manifest names, and only those."""
        with anyio.move_on_after(timeout):
            await self._apply_lock.acquire()
        if not self._apply_lock.locked() or self._closing:
            if self._apply_lock.locked():
                self._apply_lock.release()
            raise InvalidRequest("service", "a reload, scale or shutdown is under way: try again later")
        try:
            yield
        finally:
            self._apply_lock.release()

    async def _adopt(self, records: dict[str, dict[str, Any]], children: Mapping[str, Child]) -> None:
        """Take over every instance the old service ran: status answers once they are built.

        The handover's gap is the time until status answers (bench/reexec.py). So the
        instances are built first, from the record, in one synchronous stretch (no task and
        no await per instance: the configs are the manifest's, validated once), and the
        roster is known from then: status and the other queries answer. Then every
        ``run()`` is queued, in batches that leave the event loop to its sockets in between
        (``_Batches``), and each resumes what it was doing (watch its program, finish a
        backoff pause or a stop). Until every one has, a request that changes an instance
        waits (``Adoption.adopt``'s gate), and so does a reload, scale or shutdown (the apply
        lock is held): none can find an instance whose ``run()`` has not begun.
        """
        from .manager import _Batches, _plan  # imported here: manager.py imports this module

        assert self._tg is not None, "adopting needs run() to be running"
        async with self._apply_lock:
            resumed = anyio.Event()
            settings = self.manifest.supervisor
            opened: dict[str, Instance] = {}
            for name, plan in _plan(self.manifest).items():
                instance = self._make(name, plan, settings)
                record = records.get(name)
                if record is not None:
                    instance.adopt(record, children.get(name), resumed)
                opened[name] = instance
            self._instances = opened
            self._roster_changed()
            self.roster_known.set()
            self.roster_known_at = (time.monotonic(), time.process_time())
            batches = _Batches()
            for batch in batches.split(list(opened.values())):
                countdown = _Countdown(len(batch))
                for instance in batch:
                    self._tg.start_soon(functools.partial(instance.run, task_status=countdown))
                await countdown.wait()
                batches.took(len(batch))
            resumed.set()
            for instance in opened.values():
                instance.resumed()


class _Countdown(TaskStatus[None]):
    """A ``task_status`` shared by many tasks started with ``start_soon``: done once each said so."""

    def __init__(self, count: int) -> None:
        self._left = count
        self._done = anyio.Event()
        if not count:
            self._done.set()

    def started(self, value: None = None) -> None:
        self._left -= 1
        if not self._left:
            self._done.set()

    async def wait(self) -> None:
        await self._done.wait()


def applied_env_files(manifest: Manifest) -> dict[str, dict[str, str]]:
    """What each entry with an ``env_file`` read from it when it was applied (a start or a reload),
    by entry: what its instances were started with, and what the next reload compares against.

    Handed over at a re-exec (``service.env_files``), since the manifest crosses as data and the
    file's contents do not: read again by the new code, an edit made since the last reload
    was taken as applied, and that reload saw no change (the instance ran on with the old
    environment for good). The manager's manifest, not its instances: every replica of an entry
    runs with the entry's config (a reload replaces those whose config changed).
    """
    return {
        name: dict(config.env_from_file)
        for name, config in manifest.instances.items()
        if config.env_file
    }


def with_applied_env_files(
    manifest: Manifest, applied: Mapping[str, Mapping[str, str]] | None
) -> tuple[Manifest, list[str], list[str]]:
    """``manifest`` (the record's, its ``env_file``s just read again by the new code) with each
    entry's ``env_file`` contents as the old service applied them (``applied_env_files``).

    Returns the manifest, the entries whose file says something else now (the next reload
    replaces their instances, as it would have without the re-exec), and the entries whose
    applied contents the record does not give (``applied`` None: a record of older code),
    which keep what was read now: what they run with cannot be known.
    """
    entries = dict(manifest.instances)
    edited: list[str] = []
    unknown: list[str] = []
    for name, config in manifest.instances.items():
        if not config.env_file:
            continue
        found = None if applied is None else applied.get(name)
        if found is None:
            unknown.append(name)
        elif found != config.env_from_file:
            entries[name] = config.with_env_from_file(found)
            edited.append(name)
    if edited:
        manifest = manifest.replace(instances=entries)
    return manifest, edited, unknown


def scaled_counts(
    scaled: Mapping[str, int] | Iterable[str], instances: Iterable[Mapping[str, Any]]
) -> dict[str, int]:
    """The replica count of each scaled entry: ``scaled``'s own when it gives counts, else (names
    only) the number of the record's instances of that entry, which is what the old service ran."""
    if isinstance(scaled, Mapping):
        return dict(scaled)
    counts = dict.fromkeys(scaled, 0)
    for record in instances:
        if record["group"] in counts:
            counts[record["group"]] += 1
    return counts
