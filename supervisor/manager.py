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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .config import InstanceConfig, Manifest, ServiceSettings
from .config.dependencies import levels
from .events import EventBus, State, Transition
from .graph import DependencyGate, in_reverse_order
from .instance import Instance, InstanceContext, InstanceStatus, InvalidRequest


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
        self._roster = anyio.Event()  # set (and replaced) whenever an instance is added or removed

    @property
    def instances(self) -> Mapping[str, Instance]:
        return self._instances

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host every instance until ``shutdown()``; started once the manifest is applied."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._restart_dependents)
            await self.apply(self.manifest)
            task_status.started()
            await self._done.wait()
            tg.cancel_scope.cancel()
        self._tg = None

    # -- applying a manifest -----------------------------------------------------------------

    async def apply(self, manifest: Manifest) -> ReloadReport:
        """Make the running set match ``manifest``; instances that did not change are left alone."""
        async with self._apply_lock:
            if self._closing:
                raise InvalidRequest("service", "the service is shutting down")
            old_settings = self.manifest.supervisor
            self.manifest = manifest
            plan = _plan(manifest)
            report = ReloadReport()
            settings_changed = _instance_settings(old_settings) != _instance_settings(manifest.supervisor)

            leaving = [n for n in self._instances if n not in plan]
            changed = [
                n
                for n, p in plan.items()
                if n in self._instances
                and (settings_changed or _comparable(self._instances[n].config) != _comparable(p.config))
            ]
            report.removed.extend(leaving)
            report.changed.extend(changed)
            report.unchanged.extend(n for n in plan if n in self._instances and n not in changed)
            report.added.extend(n for n in plan if n not in self._instances)

            await self.stop_in_order([self._instances[n] for n in [*leaving, *changed]], "removed")
            for name in [*leaving, *changed]:
                del self._instances[name]
            self._roster_changed()

            to_start: list[Instance] = []
            for name in [*changed, *report.added]:
                instance = await self._open(name, plan[name], manifest.supervisor)
                if instance.config.autostart:
                    to_start.append(instance)
            await self._start_all(to_start)
            return report

    async def _open(self, name: str, plan: _Plan, settings: ServiceSettings) -> Instance:
        assert self._tg is not None, "apply() needs run() to be running"
        gate = None
        if plan.config.depends_on:
            gate = DependencyGate(plan.config.depends_on, self.replicas, lambda: self._roster)
        context = InstanceContext(
            settings=settings, bus=self.events, environ=self._environ, dependencies=gate
        )
        instance = Instance(name, plan.group, plan.config, context)
        await self._tg.start(instance.run)
        self._instances[name] = instance
        self._roster_changed()
        return instance

    def _roster_changed(self) -> None:
        roster, self._roster = self._roster, anyio.Event()
        roster.set()

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
