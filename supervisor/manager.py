"""The set of instances: apply a manifest (a diff against what runs), status, shutdown.

The manager owns one task group for as long as the service runs; every
instance's ``run()`` lives in it. Applying a manifest compares each replica's
configuration with what runs: new ones start, removed ones stop, changed ones
are replaced, and unchanged ones are not touched (same process, same pid).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .config import InstanceConfig, Manifest, ServiceSettings
from .events import EventBus, State
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

    @property
    def instances(self) -> Mapping[str, Instance]:
        return self._instances

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host every instance until ``shutdown()``; started once the manifest is applied."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
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

            async with anyio.create_task_group() as tg:
                for name in [*leaving, *changed]:
                    tg.start_soon(self._instances.pop(name).close)

            to_start: list[Instance] = []
            for name in [*changed, *report.added]:
                instance = await self._open(name, plan[name], manifest.supervisor)
                if instance.config.autostart:
                    to_start.append(instance)
            await self._start_all(to_start)
            return report

    async def _open(self, name: str, plan: _Plan, settings: ServiceSettings) -> Instance:
        assert self._tg is not None, "apply() needs run() to be running"
        context = InstanceContext(settings=settings, bus=self.events, environ=self._environ)
        instance = Instance(name, plan.group, plan.config, context)
        await self._tg.start(instance.run)
        self._instances[name] = instance
        return instance

    @staticmethod
    async def _start_all(instances: Sequence[Instance]) -> None:
        async def start(instance: Instance) -> None:
            try:
                await instance.start()
            except InvalidRequest:
                pass  # started meanwhile by a request: that is what we wanted

        async with anyio.create_task_group() as tg:
            for instance in instances:
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
                async with anyio.create_task_group() as tg:
                    for instance in instances:
                        tg.start_soon(instance.close, "the service is shutting down")
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
