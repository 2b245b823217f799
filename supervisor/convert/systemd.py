"""Export a manifest as systemd units: one ``.service`` per instance (a template for replicas), one target.

Restart steps (``RestartSteps=``, ``RestartMaxDelaySec=``) exist from systemd 254
on; for an older systemd (``version``) the backoff becomes a fixed delay and a
note says so. Every key that systemd cannot express is a note, never a silence.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

from ..config import InstanceConfig, format_duration, signal_name
from .exportbase import Source, check_name
from .notes import ConvertError, Exported

_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
STEPS_VERSION = 254
MIN_SPAN = 0.001  # format_duration writes whole milliseconds: 1ms is the shortest span that is not 0
MAX_UNITS = 10_000


def _streak_seconds(config: InstanceConfig) -> float:
    """How long ``max_restarts`` + 1 failed starts in a row take at least: min_uptime each, and the pauses."""
    restart = config.restart
    backoff = restart.backoff
    total = (restart.max_restarts + 1) * restart.min_uptime
    delay, grown = backoff.initial, 0
    while grown < restart.max_restarts and delay < backoff.max:  # at most max_restarts rounds
        total += delay
        delay *= backoff.factor
        grown += 1
    return float(math.ceil(total + (restart.max_restarts - grown) * backoff.max))


class _LineBreak(ValueError):
    """A value that a unit file cannot hold on one line (a path or a name with a line break)."""


def _escape(text: str) -> str:
    """A value for a unit file: specifiers (``%``) escaped, so systemd reads it back unchanged."""
    if "\n" in text or "\r" in text:
        raise _LineBreak(text)
    return text.replace("%", "%%")


def _quoted(text: str) -> str:
    """A double-quoted value with C escapes (Environment=), specifiers escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t").replace("%", "%%") + '"'


def _word(arg: str) -> str:
    """One ExecStart= word: quoted where needed; ``$`` doubled (ExecStart= expands variables)."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(text):
        return text
    quoted = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{quoted}"'


def _command(argv: list[str]) -> str:
    return " ".join(_word(arg) for arg in argv)


def _timeout(value: float | None) -> str:
    """A time span for a key where systemd reads 0 as no limit (TimeoutStopSec=, TimeoutStartSec=, …).

    Ours has no limit only where it is null; a 0 (or less than the millisecond written) is no
    wait at all: SIGKILL right after the stop signal, a start that must be ready at once. The
    nearest systemd can say is its shortest span, which keeps that meaning to within 1ms.
    """
    if value is None:
        return "infinity"
    return format_duration(max(value, MIN_SPAN))


def _shortened(value: float | None) -> bool:
    """Whether :func:`_timeout` wrote ``value`` longer than it is, which a note must say."""
    return value is not None and value < MIN_SPAN


class _Units:
    def __init__(self, source: Source, name: str, version: int) -> None:
        self.source = source
        self.name = name
        self.version = version
        self.completed = {
            dep
            for _, config in source.instances()
            for dep, edge in config.depends_on.items()
            if edge.condition == "completed"
        }

    def units(self, entry: str) -> list[str]:
        """The unit names of one manifest entry (its replicas' instances of the template)."""
        config = self.source.manifest.instances[entry]
        if config.replicas == 1:
            return [f"{self.name}-{entry}.service"]
        return [f"{self.name}-{entry}@{i}.service" for i in range(config.replicas)]

    def file_name(self, entry: str) -> str:
        config = self.source.manifest.instances[entry]
        return f"{self.name}-{entry}.service" if config.replicas == 1 else f"{self.name}-{entry}@.service"

    def service(self, entry: str, config: InstanceConfig) -> str:
        note = self.source.note
        unit = [f"Description={_escape(entry)} ({self.name}, from {_escape(self.source.file.name)})"]
        unit.append(f"PartOf={self.name}.target")
        service: list[str] = []
        oneshot = entry in self.completed
        if config.ready is not None and config.ready.kind == "notify":
            service += ["Type=notify", "NotifyAccess=all"]
        elif oneshot:
            service += ["Type=oneshot", "RemainAfterExit=yes"]
        else:
            service.append("Type=simple")
        argv = config.argv
        if "/" in argv[0] and not argv[0].startswith("/"):
            # systemd takes a bare name (searched in PATH) or an absolute path, never ./bin/app.
            base = config.cwd or str(self.source.file.resolve().parent)
            argv = [str(Path(base) / argv[0]), *argv[1:]]
            if not config.cwd:
                note(entry, ("command",), "approximated", f"{argv[0]}: relative to the manifest's folder")
        service.append(f"ExecStart={_command(argv)}")
        if config.cwd:
            service.append(f"WorkingDirectory={_escape(config.cwd)}")
        if config.env_file:
            service.append(f"EnvironmentFile={_escape(config.env_file)}")
        for key, value in config.env.items():
            service.append(f"Environment={_quoted(f'{key}={value}')}")
        if config.user in ("nobody", 65534):
            service.append("DynamicUser=yes")
            note(entry, ("user",), "approximated", "DynamicUser=yes: systemd warns against the user nobody")
        elif config.user is not None:
            service.append(f"User={config.user}")
        if config.group is not None:
            service.append(f"Group={config.group}")
        if config.umask is not None:
            service.append(f"UMask={config.umask:04o}")
        self._limits(entry, config, service)
        if not config.inherit_env and self.source.written(entry, "inherit_env"):
            note(
                entry, ("inherit_env",), "approximated", "a unit starts from systemd's own small environment"
            )
        self._restart(entry, config, unit, service, oneshot)
        self._stop(entry, config, service)
        self._stdio(entry, config, service)
        self._checks(entry, config, service, oneshot)
        self._depends(entry, config, unit)
        if not config.autostart:
            unit.append(f"# autostart: false: not wanted by {self.name}.target; start it by hand")
        if config.replicas > 1:
            unit.append(f"# replicas: {config.replicas}: instances {', '.join(self.units(entry))}")
        return "[Unit]\n" + "\n".join(unit) + "\n\n[Service]\n" + "\n".join(service) + "\n"

    def _limits(self, entry: str, config: InstanceConfig, service: list[str]) -> None:
        limits = config.limits
        if limits.nice is not None:
            service.append(f"Nice={limits.nice}")
        if limits.oom_score_adj is not None:
            service.append(f"OOMScoreAdjust={limits.oom_score_adj}")
        for name, value in limits.rlimits().items():
            service.append(f"Limit{name.upper()}={value.replace('unlimited', 'infinity')}")
        if limits.memory_max is not None:  # the same thing: the kernel's cap on the unit's cgroup
            service.append(f"MemoryMax={limits.memory_max}")
        if limits.memory is not None and limits.memory_max is not None:
            why = "systemd restarts on no RSS figure; MemoryMax= is memory_max"
            self.source.note(entry, ("limits", "memory"), "dropped", why)
        elif limits.memory is not None:
            service.append(f"MemoryMax={limits.memory}")
            self.source.note(
                entry,
                ("limits", "memory"),
                "approximated",
                "MemoryMax= is the kernel's cap (an OOM kill, then Restart=), not a restart after "
                "memory_interval above it",
            )
        if limits.cpu_quota is not None:
            service.append(f"CPUQuota={limits.cpu_quota * 100:g}%")

    def _restart(
        self, entry: str, config: InstanceConfig, unit: list[str], service: list[str], oneshot: bool
    ) -> None:
        note = self.source.note
        restart = config.restart
        service.append(f"Restart={restart.policy}")
        if restart.policy != "no":
            backoff = restart.backoff
            service.append(f"RestartSec={format_duration(backoff.initial)}")
            if backoff.factor > 1 and backoff.max > backoff.initial:
                if self.version >= STEPS_VERSION:
                    steps = max(
                        1,
                        math.ceil(
                            math.log(backoff.max / max(backoff.initial, 0.001)) / math.log(backoff.factor)
                        ),
                    )
                    service.append(f"RestartSteps={steps}")
                    service.append(f"RestartMaxDelaySec={format_duration(backoff.max)}")
                    if self.source.written(entry, "restart", "backoff"):
                        note(
                            entry,
                            ("restart", "backoff"),
                            "approximated",
                            f"{steps} steps from RestartSec to RestartMaxDelaySec",
                        )
                elif self.source.written(entry, "restart", "backoff"):
                    note(
                        entry,
                        ("restart", "backoff"),
                        "approximated",
                        f"systemd {self.version} has no RestartSteps: a fixed RestartSec",
                    )
            if self.source.written(entry, "restart", "delay"):
                note(
                    entry,
                    ("restart", "delay"),
                    "dropped",
                    "systemd waits RestartSec (the back-off) before every restart, also after a run"
                    " that was up",
                )
        # systemd counts every start within an interval; ours, failed starts in a row. The
        # interval is the time such a streak takes here, so that a streak trips both alike.
        unit.append(f"StartLimitIntervalSec={format_duration(_streak_seconds(config))}")
        unit.append(f"StartLimitBurst={restart.max_restarts + 1}")
        if self.source.written(entry, "restart", "max_restarts"):
            note(
                entry,
                ("restart", "max_restarts"),
                "approximated",
                "systemd counts every start within StartLimitIntervalSec (the time that many failed"
                " starts in a row take), also the starts of runs that were up",
            )
        codes = [str(c) for c in restart.success_codes if c != 0]
        if codes:
            service.append(f"SuccessExitStatus={' '.join(codes)}")
        if 0 not in restart.success_codes:
            note(
                entry,
                ("restart", "success_codes"),
                "approximated",
                "systemd always counts exit code 0 as success",
            )
        if self.source.written(entry, "restart", "min_uptime"):
            note(
                entry,
                ("restart", "min_uptime"),
                "dropped",
                "systemd has no minimum uptime for a start to count",
            )

    def _stop(self, entry: str, config: InstanceConfig, service: list[str]) -> None:
        stop = config.stop
        service.append(f"KillSignal={signal_name(stop.signal)}")
        service.append(f"TimeoutStopSec={_timeout(stop.timeout)}")
        if _shortened(stop.timeout):
            self.source.note(
                entry, ("stop", "timeout"), "approximated",
                "TimeoutStopSec=1ms, SIGKILL 1ms after the stop signal: systemd reads 0 as no timeout",
            )  # fmt: skip
        service.append(f"KillMode={'control-group' if stop.group else 'process'}")
        if not stop.group:
            self.source.note(
                entry, ("stop", "group"), "approximated",
                "KillMode=process: the main process alone is signalled; the rest stays in the cgroup",
            )  # fmt: skip

    def _stdio(self, entry: str, config: InstanceConfig, service: list[str]) -> None:
        note = self.source.note
        stdin = config.stdin
        if stdin.kind == "file":
            service.append(f"StandardInput=file:{_escape(stdin.path)}")
        elif stdin.kind in ("fifo", "inherit"):
            note(entry, ("stdin",), "dropped", f"no {stdin.kind} stdin under systemd: /dev/null")
        for which, stream in (("stdout", config.stdout), ("stderr", config.stderr)):
            key = "StandardOutput" if which == "stdout" else "StandardError"
            kind = stream.kind
            log_file = getattr(config.logs, f"{which}_file")
            if kind == "stdout":
                service.append(f"{key}=inherit")
            elif kind == "null":
                service.append(f"{key}=null")
            elif kind == "file":
                service.append(
                    f"{key}={'append' if stream.mode == 'append' else 'truncate'}:{_escape(stream.path)}"
                )
            elif kind == "log" and log_file:
                service.append(f"{key}=append:{_escape(log_file)}")
                note(
                    entry,
                    ("logs", f"{which}_file"),
                    "approximated",
                    "appended by systemd, not rotated: use logrotate",
                )
            else:
                service.append(f"{key}=journal")
                if kind in ("fifo", "inherit"):
                    note(entry, (which,), "dropped", f"no {kind} {which} under systemd: the journal")
        for key in ("max_bytes", "backups", "timestamps"):
            if self.source.written(entry, "logs", key):
                note(entry, ("logs", key), "dropped", "journald rotates and timestamps the journal")

    def _checks(self, entry: str, config: InstanceConfig, service: list[str], oneshot: bool) -> None:
        note = self.source.note
        ready = config.ready
        if ready is not None:
            if ready.kind == "notify":
                service.append(f"TimeoutStartSec={_timeout(ready.start_timeout)}")
                if config.watchdog is not None:
                    service.append(f"WatchdogSec={_timeout(config.watchdog)}")
                    if config.watchdog_signal != 6:
                        service.append(f"WatchdogSignal={signal_name(config.watchdog_signal)}")
            elif ready.kind == "exec":
                loop = f"until {shlex.join(ready.argv)}; do sleep {ready.interval:g}; done"
                service.append(f"ExecStartPost={_command(['/bin/sh', '-c', loop])}")
                service.append(f"TimeoutStartSec={_timeout(ready.start_timeout)}")
                note(
                    entry,
                    ("ready",),
                    "approximated",
                    "ExecStartPost= polls the command; the unit is active once it passes",
                )
            else:
                note(
                    entry,
                    ("ready",),
                    "dropped",
                    f"no {ready.kind} readiness check in systemd: ready once started",
                )
            if ready.kind in ("notify", "exec") and _shortened(ready.start_timeout):
                note(
                    entry, ("ready", "start_timeout"), "approximated",
                    "TimeoutStartSec=1ms: systemd reads 0 as no timeout",
                )  # fmt: skip
            if config.watchdog is not None and ready.kind == "notify" and _shortened(config.watchdog):
                note(entry, ("watchdog",), "approximated", "WatchdogSec=1ms: systemd reads 0 as no watchdog")
        elif oneshot:
            service.append("TimeoutStartSec=infinity")
        if config.alive is not None:
            note(entry, ("alive",), "dropped", "no liveness probe in systemd (only the sd_notify watchdog)")

    def _depends(self, entry: str, config: InstanceConfig, unit: list[str]) -> None:
        manifest = self.source.manifest
        for dep, edge in config.depends_on.items():
            names = " ".join(self.units(dep))
            unit.append(f"After={names}")
            unit.append(f"{'BindsTo' if edge.restart else 'Requires'}={names}")
            other = manifest.instances[dep]
            if edge.restart:
                self.source.note(
                    entry,
                    ("depends_on", dep, "restart"),
                    "approximated",
                    "BindsTo=: also stopped when it stops",
                )
            if edge.condition == "running":
                self.source.note(
                    entry, ("depends_on", dep), "approximated", "waits for the start, not for min_uptime"
                )
            elif (
                edge.condition == "ready"
                and other.ready is not None
                and other.ready.kind not in ("notify", "exec")
            ):
                self.source.note(
                    entry,
                    ("depends_on", dep),
                    "approximated",
                    f"{dep}'s {other.ready.kind} check is not in systemd: waits for its start",
                )

    def target(self) -> str:
        wanted = [
            unit
            for entry, config in self.source.instances()
            if config.autostart
            for unit in self.units(entry)
        ]
        lines = ["[Unit]", f"Description={self.name} (from {_escape(self.source.file.name)})"]
        if wanted:
            lines.append(f"Wants={' '.join(wanted)}")
        return "\n".join([*lines, "", "[Install]", "WantedBy=multi-user.target", ""])


def export(text: str, file: Path, *, name: str, version: int = STEPS_VERSION) -> Exported:
    """The units for the manifest ``text`` (read from ``file``): {file name: unit text}, and notes."""
    source = Source(text, file)
    total = sum(config.replicas for _, config in source.instances())
    if total > MAX_UNITS:
        big = max(source.instances(), key=lambda item: item[1].replicas)[0]
        line = source.lines.get(("instances", big, "replicas"))
        raise ConvertError(
            file, line, f"{total} units (replicas of {big}…): more than {MAX_UNITS} is not a deployment"
        )
    units = _Units(source, check_name(name), version)
    files = {}
    for entry, config in source.instances():
        try:
            files[units.file_name(entry)] = units.service(entry, config)
        except _LineBreak as exc:
            line = source.lines.get(("instances", entry))
            raise ConvertError(
                file, line, f"{entry}: {exc.args[0]!r} has a line break; a unit cannot hold it"
            ) from None
    files[f"{name}.target"] = units.target()
    return Exported(files, source.sorted_notes())
