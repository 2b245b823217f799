"""The set of instances: apply a manifest (a diff against what runs), status, shutdown.

The manager owns one task group for as long as the service runs; every
instance's ``run()`` lives in it. Applying a manifest compares each replica's
configuration with what runs: new ones start, removed ones stop, changed ones
are replaced, and unchanged ones are not touched (same process, same pid).

Starts are ordered by the dependency graph without a scheduler: every instance
is asked to start at once and waits (``waiting``) for its dependencies through
a ``DependencyGate``, so independent branches come up concurrently and the whole
graph in the time of its longest path. Stops go in reverse order (dependents
first), and a dependency that restarts restarts the dependents whose edge says
``restart: true``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .cgroup_policy import CgroupPolicy, CgroupRefused
from .config import InstanceConfig, Manifest, ServiceSettings
from .config.capacity import LOG_FILES_OPEN, SERVICE_RESERVE, captured_streams, descriptors_per_instance
from .config.dependencies import levels
from .config.records import running_form
from .events import EventBus, State, Transition
from .graph import DependencyGate, in_reverse_order
from .instance import Instance, InstanceContext, InvalidRequest
from .instance_status import InstanceStatus
from .pacer import Pacer, Turns
from .process import Child
from .reactor import PipeReactor
from .resumption import Resumption
from .selection import UnknownInstance, select


class ApplyError(RuntimeError):
    """A manifest that is valid but cannot be applied now (descriptors, say); nothing was changed."""


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What applying a manifest did, by replica name."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    #: Entries whose replica count a ``scale`` had changed and this manifest sets back.
    rescaled: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Plan:
    group: str
    config: InstanceConfig


class Manager(Resumption):
    """Owns the instances of one manifest at a time."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        bus: EventBus | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.manifest = running_form(manifest)
        self.events = bus or EventBus()
        self._environ = dict(os.environ if environ is None else environ)
        self._instances: dict[str, Instance] = {}
        self._tg: TaskGroup | None = None
        self._done = anyio.Event()
        self._apply_lock = anyio.Lock()
        self._closing = False
        # Per manifest entry: set (and dropped) at the next transition of one of its replicas, or
        # when the set of instances changes. What waiting instances sleep on.
        self._group_events: dict[str, anyio.Event] = {}
        self._scaled: set[str] = set()  # entries whose replica count scale() set, until a reload
        # Set by resume(): the instances a re-exec'd service adopts instead of starting.
        self._adopting: tuple[dict[str, dict[str, Any]], Mapping[str, Child]] | None = None
        # Replicas by entry, and the entries that depend on each entry: built when first asked
        # for after the set of instances changed. A lookup per transition must not walk them all.
        self._by_group: dict[str, list[Instance]] | None = None
        self._dependent_groups: dict[str, list[str]] | None = None
        self._cgroups: CgroupPolicy | None = None  # made by run(): supervisor.cgroups
        self._reactor: PipeReactor | None = None  # made by run(): reads every instance's log pipes
        self._pacer: Pacer | None = None  # made by run(): what waiting instances make ahead
        self._spawn_turns: Turns | None = None  # made by run(): every spawn passes it
        #: Set once the first manifest's instances are in the set, before any of them starts: the
        #: control plane, served from the start, answers about instances from then on.
        self.roster_known = anyio.Event()
        #: Set once the first manifest is applied: its instances spawned (or waiting, or failed).
        self.started = anyio.Event()
        #: After a re-exec: when the adopted instances were known, as (time.monotonic(),
        #: time.process_time()): the log says how long the handover took, and how much CPU.
        self.roster_known_at: tuple[float, float] | None = None

    @property
    def instances(self) -> Mapping[str, Instance]:
        return self._instances

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host every instance until ``shutdown()``; started once the manifest is applied.

        CgroupRefused (before anything starts) where ``supervisor.cgroups: required`` cannot be met.
        """
        self._cgroups = CgroupPolicy.open(self.manifest)
        reactor = self._reactor = PipeReactor()
        pacer = self._pacer = Pacer()
        turns = self._spawn_turns = Turns(SPAWN_TURN if SPAWN_SLICE is not None else None)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(reactor.run)
                tg.start_soon(pacer.run)
                tg.start_soon(turns.run)
                await tg.start(self._restart_dependents)
                if self._adopting is None:
                    await self.apply(self.manifest)
                else:
                    await self._adopt(*self._adopting)
                    self._adopting = None
                self.started.set()
                task_status.started()
                await self._done.wait()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self._cgroups.close()
            reactor.close()

    # -- applying a manifest -----------------------------------------------------------------

    async def apply(self, manifest: Manifest) -> ReloadReport:
        """Make the running set match ``manifest`` (a reload): counts set by ``scale`` go back."""
        manifest = running_form(manifest)
        async with self._apply_lock:
            report = await self._apply(manifest)
            for group in self._scaled:
                if (entry := manifest.instances.get(group)) is not None:
                    report.rescaled.append(f"{group}: back to the manifest's {entry.replicas} replicas")
            self._scaled.clear()
            return report

    async def scale(self, counts: Mapping[str, int]) -> ReloadReport:
        """Run ``counts[NAME]`` replicas of each named entry until the next reload.

        New replicas start (when the entry autostarts); the highest-numbered ones
        go. Going from one replica to more renames ``web`` to ``web-0`` … (so
        ``web`` is replaced), as a reload does.
        """
        async with self._apply_lock:
            entries = dict(self.manifest.instances)
            for group, count in counts.items():
                if group not in entries:
                    raise UnknownInstance(group, entries)
                if not 0 <= count <= MAX_SCALE:
                    raise InvalidRequest(group, f"cannot scale to {count}: give 0 to {MAX_SCALE} replicas")
                entries[group] = entries[group].replace(replicas=count)
            _refuse_name_clashes(entries, counts)
            manifest = self.manifest.replace(instances=entries)
            report = await self._apply(manifest)
            self._scaled.update(counts)
            return report

    async def _apply(self, manifest: Manifest) -> ReloadReport:
        """Make the running set match ``manifest``; instances that did not change are left alone.

        Called with the apply lock held.

        Transactional: what the change needs (descriptors, log pipes, notify
        sockets) is checked and made before any running instance is touched. If
        that fails, what was made is closed again and ``ApplyError`` says why:
        nothing changed. Only then are the old instances stopped and the new
        ones started; a new instance that cannot spawn fails on its own.
        """
        if self._closing:
            raise InvalidRequest("service", "the service is shutting down")
        if self._tg is None:
            raise InvalidRequest("service", "the service is starting: try again once it runs")
        if self._cgroups is not None:
            try:
                self._cgroups.check(manifest)
            except CgroupRefused as exc:
                raise ApplyError(str(exc)) from None
        gc.unfreeze()  # what this change replaces may be collected again
        plan = _plan(manifest)
        settings_changed = _instance_settings(self.manifest.supervisor) != _instance_settings(
            manifest.supervisor
        )
        leaving = [n for n in self._instances if n not in plan]
        differs = _Differences()
        changed = [
            n
            for n, p in plan.items()
            if n in self._instances and (settings_changed or differs(self._instances[n].config, p.config))
        ]
        added = [n for n in plan if n not in self._instances]
        report = ReloadReport(
            added=added,
            removed=leaving,
            changed=changed,
            unchanged=[n for n in plan if n in self._instances and n not in changed],
        )
        _check_descriptors(
            [plan[n].config for n in [*changed, *added]],
            [self._instances[n].config for n in [*leaving, *changed]],
        )
        with _collector_held():
            prepared = await self._prepare([(n, plan[n]) for n in [*changed, *added]], manifest.supervisor)

        self.manifest = manifest
        replaced = [self._instances[n] for n in [*leaving, *changed]]
        await self.stop_in_order(replaced, "removed")
        old = self._instances
        self._instances = {name: prepared.get(name) or old[name] for name in plan}
        self._roster_changed()
        self.roster_known.set()
        to_start = [i for i in prepared.values() if i.config.autostart]
        with _collector_held():
            await self._start_all(to_start)
        # The instances live until the next change: the garbage collector need not walk them
        # again and again. With 10,000 instances, each full collection walked millions of
        # objects, and the spawns, status answers and shutdown all allocate enough to set
        # one off often: a third of the time of a shutdown went to it (docs/performance.md).
        # But first the garbage goes: an instance this change stopped is cycles (it and its log
        # sinks point at each other), which only a full collection frees. Frozen with the rest,
        # they stayed for good: 42 objects an instance replaced, 80 KiB a reload of ten, at
        # every reload. A change that stopped nothing (the start) has none: no walk (45 ms at 500).
        garbage = bool(replaced)
        await _until_returned(replaced)  # so that the collection finds them
        del replaced, old  # nor may this frame hold one
        if garbage:
            gc.collect()
        gc.freeze()
        return report

    async def _prepare(
        self, plans: list[tuple[str, _Plan]], settings: ServiceSettings
    ) -> dict[str, Instance]:
        """New instances, with their log pipes open, not yet in the set; all or none."""
        prepared: dict[str, Instance] = {}
        try:
            for name, plan in plans:
                prepared[name] = await self._open(name, plan, settings)
        except Exception as exc:
            with anyio.CancelScope(shield=True):
                for instance in prepared.values():
                    await instance.close("the change was undone")
            done = f"{len(prepared)} of {len(plans)} new instances were made, then closed again"
            raise ApplyError(f"cannot make instance {name}: {exc} ({done}); nothing was changed") from exc
        return prepared

    async def _open(
        self,
        name: str,
        plan: _Plan,
        settings: ServiceSettings,
    ) -> Instance:
        assert self._tg is not None, "apply() needs run() to be running"
        instance = self._make(name, plan, settings)
        await self._tg.start(instance.run)
        return instance

    def _make(self, name: str, plan: _Plan, settings: ServiceSettings) -> Instance:
        assert self._reactor is not None, "instances are made while run() runs"
        gate = None
        if plan.config.depends_on:
            gate = DependencyGate(plan.config.depends_on, self._dependency_replicas, self._group_event)
        context = InstanceContext(
            settings=settings,
            bus=self.events,
            environ=self._environ,
            reactor=self._reactor,
            dependencies=gate,
            on_transition=self._group_changed,
            cgroups=self._cgroups.tree if self._cgroups is not None else None,
            ahead=self._pacer,
            spawn_turns=self._spawn_turns,
        )
        return Instance(name, plan.group, plan.config, context)

    def _group_event(self, group: str) -> anyio.Event:
        event = self._group_events.get(group)
        if event is None:
            event = self._group_events[group] = anyio.Event()
        return event

    def _group_changed(self, group: str) -> None:
        event = self._group_events.pop(group, None)
        if event is not None:
            event.set()

    def _roster_changed(self) -> None:
        self._by_group = self._dependent_groups = None
        events, self._group_events = self._group_events, {}
        for event in events.values():
            event.set()

    def replicas(self, group: str) -> list[Instance]:
        """The instances of one manifest entry."""
        return list(self._groups().get(group, ()))

    def _dependency_replicas(self, group: str) -> list[Instance] | None:
        """What a dependent of ``group`` waits for: its replicas; none when the manifest gives it
        none (a dependency with no replica holds nobody up); None while they are still to come."""
        found = self._groups().get(group)
        if found:
            return found
        entry = self.manifest.instances.get(group)
        return [] if entry is not None and entry.replicas == 0 else None

    def dependents(self, instance: Instance) -> list[Instance]:
        """The instances that depend on ``instance`` directly (through its manifest entry)."""
        groups = self._groups()
        assert self._dependent_groups is not None
        return [i for group in self._dependent_groups.get(instance.group, ()) for i in groups.get(group, ())]

    def _groups(self) -> dict[str, list[Instance]]:
        """The replicas by entry (and the dependent entries), indexed once per set of instances."""
        if self._by_group is None or self._dependent_groups is None:
            by_group: dict[str, list[Instance]] = {}
            for instance in self._instances.values():
                by_group.setdefault(instance.group, []).append(instance)
            dependent_groups: dict[str, list[str]] = {}
            for group, members in by_group.items():
                for dependency in members[0].config.depends_on:
                    dependent_groups.setdefault(dependency, []).append(group)
            self._by_group, self._dependent_groups = by_group, dependent_groups
        return self._by_group

    async def stop_in_order(self, instances: Sequence[Instance], reason: str) -> None:
        """Close ``instances``: dependents first, independent branches concurrently."""

        async def close(instance: Instance) -> None:
            await instance.close(reason)

        await in_reverse_order(instances, close)

    async def _restart_dependents(self, *, task_status: TaskStatus[None]) -> None:
        """``restart: true`` edges: when a dependency starts again, restart what runs on top of it.

        A dependent whose current run began before the dependency's new start is
        restarted; its new start then waits until the dependency meets the
        condition again. A dependent that is waiting (the first start of all)
        is not touched.
        """
        async with self.events.subscribe(buffer=65536) as events:
            task_status.started()
            async for event in events:
                if not isinstance(event, Transition) or event.to_state is not State.STARTING:
                    continue
                source = self._instances.get(event.instance)
                if source is None:
                    continue
                for dependent in self.dependents(source):
                    if not dependent.config.depends_on[source.group].restart:
                        continue  # most edges: every start of a graph's level came through here
                    started = dependent.started_at
                    if started is not None and started < event.at:
                        assert self._tg is not None
                        self._tg.start_soon(self._restart_quietly, dependent, source.name)

    @staticmethod
    async def _restart_quietly(instance: Instance, because: str) -> None:
        if instance.state in (State.STARTING, State.RUNNING):
            try:
                await instance.restart(f"because {because} restarted")
            except InvalidRequest:
                pass  # closing, or stopped meanwhile by a request: nothing to restart

    async def _start_all(self, instances: Sequence[Instance]) -> None:
        """Start level by level of the graph, each level in batches that yield to the event loop.

        ``start`` returns once a program is spawned or waiting, so this costs no
        more than one concurrent start; it only makes sure a dependent finds its
        dependencies already asked to start, and so waits with the right reason.

        A spawn takes the event loop for a millisecond or more (the fork and exec
        happen in this thread: decision 6), and every task queued at once runs in one
        round of the loop before it looks at its sockets again. So a thousand starts
        queued together kept the control socket deaf for seconds (issue 13). Instead
        the starts go in batches (``_Batches``), each one round of the loop of about
        ``SPAWN_SLICE`` seconds, and the loop serves its sockets between them.
        """

        async def start(instance: Instance) -> None:
            try:
                await instance.start()
            except InvalidRequest:
                pass  # started meanwhile by a request: that is what we wanted

        depth = levels(self.manifest)
        by_level: dict[int, list[Instance]] = {}
        for instance in instances:
            by_level.setdefault(depth.get(instance.group, 0), []).append(instance)
        batches = _Batches()
        for level in sorted(by_level):
            async with anyio.create_task_group() as tg:
                for batch in batches.split(by_level[level]):
                    await _run_batch(tg, start, batch)
                    batches.took(len(batch))

    # -- queries -----------------------------------------------------------------------------

    def select(self, patterns: Sequence[str]) -> list[Instance]:
        """Instances by name, by manifest name (all its replicas), or by glob (``web-*``):
        selection.py (UnknownInstance, TooManyGlobs)."""
        return select(self._instances, self._groups(), patterns)

    def status(self, patterns: Sequence[str] = ()) -> list[InstanceStatus]:
        now = time.time()
        return [instance.status(now) for instance in self.select(patterns)]

    # -- shutdown ----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop every instance concurrently, within supervisor.shutdown_timeout, then end ``run()``.

        What is still alive when the timeout passes is killed with SIGKILL as the
        instances close.
        """
        async with self._apply_lock:  # a reload under way finishes first; later ones are refused
            self._closing = True
            instances = list(self._instances.values())
            with anyio.move_on_after(self.manifest.supervisor.shutdown_timeout):
                await self.stop_in_order(instances, "the service is shutting down")
            self._done.set()

    def count(self, state: State) -> int:
        return sum(1 for i in self._instances.values() if i.state is state)


#: Seconds of spawning in one round of the event loop, between two looks at its sockets;
#: None: no batches, every start of a level queued at once (bench/spawn.py compares the two).
#: 5 ms: a batch sized for 10 ms took 30 to 50 when a few of its spawns waited for a core
#: (the loop waits for each child's exec), and a status during a storm of 1,000 waited that
#: long at p99 (104 to 117 ms; 65 to 79 with 5 ms), for the same total spawn time.
SPAWN_SLICE: float | None = 0.005
#: What every spawn passes (pacer.Turns): beyond a burst of 16 (a level of a graph), about this
#: much of a turn of the event loop goes to spawns, whatever asked for them (``start --all``, a
#: dependency that unblocks a thousand dependents). An answer takes the loop several turns
#: (accept, read, the app, write): with 20 ms, a health check waited 110 to 260 ms meanwhile.
SPAWN_TURN = 0.005
#: How long the start path waits for one batch before it queues the next anyway: a start
#: held by a request (a stop with a long timeout) must not hold the rest of the storm.
_BATCH_WAIT = 0.5


class _Batches:
    """Splits a level into batches that take about ``SPAWN_SLICE`` each, learning the cost of a start.

    The first batch is small; each one after it is sized by what the last one took per
    instance, so the batch fits the machine (a spawn costs 0.3 ms on a quiet machine,
    several on a loaded one) without a setting.
    """

    def __init__(self) -> None:
        self._size = 4
        self._started = 0.0

    def split(self, instances: Sequence[Instance]) -> Iterator[Sequence[Instance]]:
        position = 0
        while position < len(instances):
            size = self._size if SPAWN_SLICE is not None else len(instances)
            batch = instances[position : position + size]
            position += len(batch)
            self._started = time.perf_counter()
            yield batch

    def took(self, count: int) -> None:
        if SPAWN_SLICE is not None:
            per_start = max(time.perf_counter() - self._started, 1e-6) / count
            self._size = max(1, min(256, int(SPAWN_SLICE / per_start)))


async def _run_batch(
    tg: TaskGroup, start: Callable[[Instance], Awaitable[None]], batch: Sequence[Instance]
) -> None:
    """Queue one batch of starts and wait until they are spawned (or ``_BATCH_WAIT`` passed).

    The wait ends in a later round of the loop than the spawns, so the loop has polled
    its sockets (and answered what was ready) before the next batch is queued.
    """
    left = len(batch)
    done = anyio.Event()

    async def one(instance: Instance) -> None:
        nonlocal left
        try:
            await start(instance)
        finally:
            left -= 1
            if not left:
                done.set()

    for instance in batch:
        tg.start_soon(one, instance)
    with anyio.move_on_after(_BATCH_WAIT):
        await done.wait()


@contextlib.contextmanager
def _collector_held() -> Iterator[None]:
    """The garbage collector off while a change makes its instances and spawns them.

    A thousand instances and their spawns allocate enough to set the collector off hundreds
    of times, each walking young objects that all live on: 3 % of a storm's CPU
    (bench/spawn.py). They are frozen at the end of the change (``_apply``); the garbage of
    these moments waits for the collector's next run. Not held while old instances stop: a
    stop may take as long as its timeout, and the service serves requests meanwhile.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


#: How long a change waits for the run() of an instance it stopped to return (it lets go of
#: its log pipes and sinks then), before the collection that frees it: only a stuck one waits.
_RUN_RETURN_WAIT = 5.0


async def _until_returned(instances: Sequence[Instance]) -> None:
    """Wait until the ``run()`` of each of ``instances`` (closed) has returned, within a bound."""
    with anyio.move_on_after(_RUN_RETURN_WAIT):
        for instance in instances:
            await instance.returned()


def _refuse_name_clashes(entries: Mapping[str, InstanceConfig], scaled: Iterable[str]) -> None:
    """A scaled entry's new replica names must be its own: ``web`` scaled to 3 names ``web-2``,
    which may be another entry of the manifest (the loader refuses such a manifest; a scale
    replaced nothing and reported that instance as the new replica, unchanged)."""
    for group in scaled:
        mine = set(entries[group].replica_names(group))
        for name, config in entries.items():
            if name != group and (taken := mine.intersection(config.replica_names(name))):
                why = f"the replica name {min(taken)!r} is the instance {name!r}'s"
                raise InvalidRequest(group, f"cannot scale to {entries[group].replicas}: {why}")


def _plan(manifest: Manifest) -> dict[str, _Plan]:
    """Replica name -> what it runs."""
    return {
        replica: _Plan(group=name, config=config)
        for name, config in manifest.instances.items()
        for replica in config.replica_names(name)
    }


def _comparable(config: InstanceConfig) -> InstanceConfig:
    """A replica's identity without the keys that do not concern one running replica."""
    return config.replace(replicas=1, autostart=True)


class _Differences:
    """Whether a replica's configuration changed, compared once per pair of entries.

    The replicas of one entry share its configuration object, before and after a
    reload: so 10,000 replicas of a few entries cost a few comparisons, not 10,000
    copies and comparisons of records.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], tuple[InstanceConfig, InstanceConfig, bool]] = {}

    def __call__(self, old: InstanceConfig, new: InstanceConfig) -> bool:
        key = (id(old), id(new))
        seen = self._seen.get(key)
        if seen is None:  # the configs are kept in the entry, so their ids stay theirs meanwhile
            seen = self._seen[key] = (old, new, _comparable(old) != _comparable(new))
        return seen[2]


def _instance_settings(settings: ServiceSettings) -> tuple[object, ...]:
    """The service settings an instance depends on (a change restarts every instance)."""
    return (settings.state_dir, settings.logs)


#: The most replicas ``scale`` gives one entry (the loader bounds the manifest's own counts).
MAX_SCALE = 10_000

#: Descriptors kept free for the control plane, probes and spawning, whatever the instances need.
_FD_RESERVE = SERVICE_RESERVE


def _check_descriptors(adding: Sequence[InstanceConfig], removing: Sequence[InstanceConfig]) -> None:
    """Refuse, with the numbers, a change that would run out of descriptors half-way.

    What the new instances hold (``descriptors_per_instance``), and the log files they
    may open, within the service's bound of ``LOG_FILES_OPEN`` open at once.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    need = sum(map(descriptors_per_instance, adding)) - sum(map(descriptors_per_instance, removing))
    need += min(LOG_FILES_OPEN, sum(map(captured_streams, adding)))
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        return
    free = soft - in_use - _FD_RESERVE
    if need > free:
        raise ApplyError(
            f"the change needs {need} more file descriptors, but only {max(free, 0)} are free "
            f"(open-files limit {soft}, {in_use} in use, {_FD_RESERVE} kept for the service): "
            "raise the limit (ulimit -n, LimitNOFILE=) or run fewer instances; nothing was changed"
        )
