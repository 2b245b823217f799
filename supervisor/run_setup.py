"""How one run of an instance is set up: its log pipes and sinks, its cgroup, its stdio, the spawn.

``RunSetup`` is mixed into ``Instance`` (as ``Adoption`` is): the state machine in
instance.py decides when a run starts and what its end means; this is what it
takes from the OS for one, and gives back. The log pipes are made once and outlive
every run (decision 7); the cgroup is made at the first run and removed with the
instance; the child-side fds are let go of right after the spawn (decision 1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cgroups import CgroupError, InstanceCgroup
from .config import rlimit_pair
from .events import Update
from .logs import LogSink
from .process import Child, ChildLimits, spawn
from .stdio import LogPipe, Stdio

if TYPE_CHECKING:
    from .config import InstanceConfig, LogSettings
    from .health import Health
    from .instance import InstanceContext
    from .probes import ExecContext

log = logging.getLogger("supervisor.instance")


class RunSetup:
    """The run-setup methods of ``Instance`` (see the module's docstring)."""

    if TYPE_CHECKING:  # what Instance provides
        name: str
        group: str
        config: InstanceConfig
        log_settings: LogSettings
        _context: InstanceContext
        _child: Child | None
        _cgroup: InstanceCgroup | None
        _targets: dict[str, str]
        _pipes: dict[str, LogPipe]
        _sinks: dict[str, LogSink]
        _health: Health

    async def _remove_cgroup(self) -> None:
        """Kill what is left in the instance's cgroup, wait until it is empty, remove it."""
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            try:
                await cgroup.close()
            except CgroupError as exc:
                log.warning("%s: %s", self.name, exc)

    def _open_logs(self, adopted: Mapping[str, int] | None = None) -> None:
        """Create the instance's log pipes once: they outlive every run of the program.

        ``adopted``: the read ends a re-exec'd service inherited, by stream; no new pipe.
        """
        settings = self.log_settings
        state_dir = Path(self._context.settings.state_dir)
        logs_dir = state_dir / "logs"
        wanted = {"stdout": self.config.stdout, "stderr": self.config.stderr}
        custom = {"stdout": self.config.logs.stdout_file, "stderr": self.config.logs.stderr_file}
        suffix = {"stdout": "out", "stderr": "err"}
        for stream, spec in wanted.items():
            if not _may_need_log(spec):
                continue
            path = Path(custom[stream]) if custom[stream] else logs_dir / f"{self.name}.{suffix[stream]}.log"
            if custom[stream] and self.name != self.group:
                # Replicas must not share a file: two sinks rotating one file lose lines.
                replica = self.name.removeprefix(self.group)  # "-0", "-1", …
                path = path.with_name(f"{path.stem}{replica}{path.suffix}")
            if adopted is not None and stream not in adopted:
                continue
            pipe = LogPipe() if adopted is None else LogPipe.adopt(adopted[stream])
            self._pipes[stream] = pipe
            self._sinks[stream] = LogSink(
                pipe.read_fd,
                path,
                max_bytes=settings.max_bytes,
                backups=settings.backups,
                timestamps=settings.timestamps,
                on_loss_change=self._log_loss_changed,
                state_dir=state_dir,
            )

    def _log_loss_changed(self, sink: LogSink) -> None:
        """A log file stopped taking output (a full disk), or takes it again: say so, once each."""
        error = sink.write_error
        message = error or f"{sink.path}: writing again ({sink.bytes_lost} bytes were lost)"
        self._context.bus.publish(Update(self.name, self.group, "logs", error is None, message))

    def _exec_context(self) -> ExecContext:
        """For a run with checks beside it: the probe machinery is imported only by these."""
        from .probes import ExecContext

        config = self.config
        return ExecContext(
            cwd=config.cwd,
            env=config.environment(dict(self._context.environ)),
            user=config.user,
            group=config.group,
            umask=config.umask,
        )

    def _spawn(self) -> Child:
        """Open this run's stdio, spawn, and let go of every child-side fd at once (decision 1)."""
        config = self.config
        self._child = None
        stdio = Stdio.from_config(
            self.name, config.stdin, config.stdout, config.stderr, log_pipes=self._pipes
        )
        try:
            self._targets = stdio.describe()
            for sink in self._sinks.values():
                sink.open()  # its folder is made here: LogFileError fails this start, not the service
                sink.writer_attached()
            with stdio.take() as fds:
                self._child = spawn(
                    config.argv,
                    stdin=fds.stdin,
                    stdout=fds.stdout,
                    stderr=fds.stderr,
                    cwd=config.cwd,
                    env={**config.environment(dict(self._context.environ)), **self._health.environment()},
                    user=config.user,
                    group=config.group,
                    umask=config.umask,
                    kill_group_on_exit=config.stop.group,
                    limits=ChildLimits(
                        {name: rlimit_pair(value) for name, value in config.limits.rlimits().items()},
                        config.limits.nice,
                        config.limits.oom_score_adj,
                    ),
                    cgroup=self._cgroup_for_run(),
                )
        finally:
            stdio.close()
        return self._child

    def _make_cgroup_ahead(self) -> None:
        """Make the cgroup now, while the instance waits for its dependencies.

        A mkdir in cgroupfs is kernel work (up to a millisecond under load): made at the spawn, the ten
        instances of a level that wait on the level above would each add one between their
        dependencies becoming ready and their start (bench/graph.py). ``_cgroup_for_run`` finds
        it there; when it cannot be made now, the spawn tries again and says why.
        """
        tree = self._context.cgroups
        if tree is None or self._cgroup is not None:
            return
        try:
            self._cgroup = tree.instance(self.name)
        except CgroupError:
            pass

    def _create_log_files_ahead(self) -> None:
        """Create the log files now, while the instance waits for its dependencies: the spawn
        then opens files that are there (``LogSink.create_ahead``), as it finds the cgroup."""
        for sink in self._sinks.values():
            sink.create_ahead()

    def _cgroup_for_run(self) -> InstanceCgroup | None:
        """The instance's cgroup, made at the first run, with this config's memory.max and cpu.max."""
        tree = self._context.cgroups
        if tree is None:
            return None
        limits = self.config.limits
        # Made again at each start (a mkdir that finds it there): a stopped instance's empty cgroup
        # may have been removed meanwhile (a starting service's guardian sweeps empty procward-*).
        self._cgroup = tree.instance(self.name)
        self._health.kernel_memory_max = "memory" in tree.controllers
        self._cgroup.limit(limits.memory_max, limits.cpu_quota)
        return self._cgroup


def _may_need_log(spec: Any) -> bool:
    """A log pipe is needed for `log`, and for forms that fall back to the log when not set up."""
    kind = spec.kind
    return kind == "log" or kind == "fifo" or (kind == "file" and not spec.path)
