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

import fnmatch
import os
import resource
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .config import InstanceConfig, Manifest, ServiceSettings
from .config.dependencies import levels
from .events import EventBus, State, Transition
from .graph import DependencyGate, in_reverse_order
from .instance import Instance, InstanceContext, InstanceStatus, InvalidRequest


class ApplyError(RuntimeError):
    """A manifest that is valid but cannot be applied now (descriptors, say); nothing was changed."""


class UnknownInstance(LookupError):
    """A name or pattern that matches no instance."""

    def __init__(self, pattern: str, known: Iterable[str]) -> None:
        self.pattern = pattern
        names = sorted(known)
        listing = ", ".join(names[:10]) + (", …" if len(names) > 10 else "")
        super().__init__(f"no instance matches {pattern!r} (known: {listing or 'none'})")


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


class Manager:
    """Owns the instances of one manifest at a time."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        bus: EventBus | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.manifest = manifest
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
        #: Set once the first manifest's instances are in the set, before any of them starts: the
        #: control plane, served from the start, answers about instances from then on.
        self.roster_known = anyio.Event()
        #: Set once the first manifest is applied: its instances spawned (or waiting, or failed).
        self.started = anyio.Event()

    @property
    def instances(self) -> Mapping[str, Instance]:
        return self._instances

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host every instance until ``shutdown()``; started once the manifest is applied."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._restart_dependents)
            await self.apply(self.manifest)
            self.started.set()
            task_status.started()
            await self._done.wait()
            tg.cancel_scope.cancel()
        self._tg = None

    # -- applying a manifest -----------------------------------------------------------------

    async def apply(self, manifest: Manifest) -> ReloadReport:
        """Make the running set match ``manifest`` (a reload): counts set by ``scale`` go back."""
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
                entries[group] = entries[group].model_copy(update={"replicas": count})
            manifest = self.manifest.model_copy(update={"instances": entries})
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
        plan = _plan(manifest)
        settings_changed = _instance_settings(self.manifest.supervisor) != _instance_settings(
            manifest.supervisor
        )
        leaving = [n for n in self._instances if n not in plan]
        changed = [
            n
            for n, p in plan.items()
            if n in self._instances
            and (settings_changed or _comparable(self._instances[n].config) != _comparable(p.config))
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
        prepared = await self._prepare([(n, plan[n]) for n in [*changed, *added]], manifest.supervisor)

        self.manifest = manifest
        await self.stop_in_order([self._instances[n] for n in [*leaving, *changed]], "removed")
        old = self._instances
        self._instances = {name: prepared.get(name) or old[name] for name in plan}
        self._roster_changed()
        self.roster_known.set()
        to_start = [i for i in prepared.values() if i.config.autostart]
        await self._start_all(to_start)
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

    async def _open(self, name: str, plan: _Plan, settings: ServiceSettings) -> Instance:
        assert self._tg is not None, "apply() needs run() to be running"
        gate = None
        if plan.config.depends_on:
            gate = DependencyGate(plan.config.depends_on, self.replicas, self._group_event)
        context = InstanceContext(
            settings=settings,
            bus=self.events,
            environ=self._environ,
            dependencies=gate,
            on_transition=self._group_changed,
        )
        instance = Instance(name, plan.group, plan.config, context)
        await self._tg.start(instance.run)
        return instance

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
        events, self._group_events = self._group_events, {}
        for event in events.values():
            event.set()

    def replicas(self, group: str) -> list[Instance]:
        """The instances of one manifest entry."""
        return [instance for instance in self._instances.values() if instance.group == group]

    def dependents(self, instance: Instance) -> list[Instance]:
        """The instances that depend on ``instance`` directly (through its manifest entry)."""
        return [i for i in self._instances.values() if instance.group in i.config.depends_on]

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
                    edge = dependent.config.depends_on[source.group]
                    started = dependent.status().started_at
                    if edge.restart and started is not None and started < event.at:
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
        """Start level by level of the graph (each level concurrently).

        ``start`` returns once a program is spawned or waiting, so this costs no
        more than one concurrent start; it only makes sure a dependent finds its
        dependencies already asked to start, and so waits with the right reason.
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
        for level in sorted(by_level):
            async with anyio.create_task_group() as tg:
                for instance in by_level[level]:
                    tg.start_soon(start, instance)

    # -- queries -----------------------------------------------------------------------------

    def select(self, patterns: Sequence[str]) -> list[Instance]:
        """Instances by name, by manifest name (all its replicas), or by glob (``web-*``)."""
        if not patterns:
            return list(self._instances.values())
        chosen: dict[str, Instance] = {}
        for pattern in patterns:
            found = [
                inst
                for name, inst in self._instances.items()
                if name == pattern or inst.group == pattern or fnmatch.fnmatchcase(name, pattern)
            ]
            if not found:
                raise UnknownInstance(pattern, self._instances)
            chosen.update((inst.name, inst) for inst in found)
        return list(chosen.values())

    def status(self, patterns: Sequence[str] = ()) -> list[InstanceStatus]:
        return [instance.status() for instance in self.select(patterns)]

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


def _plan(manifest: Manifest) -> dict[str, _Plan]:
    """Replica name -> what it runs."""
    return {
        replica: _Plan(group=name, config=config)
        for name, config in manifest.instances.items()
        for replica in config.replica_names(name)
    }


def _comparable(config: InstanceConfig) -> InstanceConfig:
    """A replica's identity without the keys that do not concern one running replica."""
    return config.model_copy(update={"replicas": 1, "autostart": True})


def _instance_settings(settings: ServiceSettings) -> tuple[object, ...]:
    """The service settings an instance depends on (a change restarts every instance)."""
    return (settings.state_dir, settings.logs)


#: The most replicas ``scale`` gives one entry (the loader bounds the manifest's own counts).
MAX_SCALE = 10_000

#: Descriptors kept free for the control plane, probes and spawning, whatever the instances need.
_FD_RESERVE = 64


def descriptors_per_instance(config: InstanceConfig) -> int:
    """What one running instance holds: a pipe end and a log file per captured stream, its
    pidfd, and a notify socket."""
    streams = (config.stdout, config.stderr)
    captured = sum(1 for s in streams if s.kind in ("log", "fifo") or (s.kind == "file" and not s.path))
    notify = config.ready is not None and config.ready.kind == "notify"
    return 2 * captured + 1 + int(notify)


def _check_descriptors(adding: Sequence[InstanceConfig], removing: Sequence[InstanceConfig]) -> None:
    """Refuse, with the numbers, a change that would run out of descriptors half-way."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    need = sum(map(descriptors_per_instance, adding)) - sum(map(descriptors_per_instance, removing))
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        return
    free = soft - in_use - _FD_RESERVE
    if need > free:
        raise ApplyError(
            f"the change needs about {need} more file descriptors, but only {max(free, 0)} are free "
            f"(open-files limit {soft}, {in_use} in use, {_FD_RESERVE} kept for the service): "
            "raise the limit (ulimit -n, LimitNOFILE=) or run fewer instances; nothing was changed"
        )
