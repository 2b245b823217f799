"""The manifest as the running service holds it: plain frozen records, without pydantic.

The models in ``models.py`` say what a person may write and check it; the service
needs only the checked values. Holding them as pydantic models cost the service
process pydantic itself and every model's validator and serializer: about 13 MiB
and 100 ms of its start (docs/performance.md). So the manifest is checked where
pydantic is loaded (``loader.py``; for the service, in a child interpreter: ``apart.py``)
and the service gets these records: one class per model, the same field names, the
same methods, equal exactly when the models were.

``tests/test_records.py`` keeps each record's fields those of its model.
"""

# ruff: noqa: RUF023 - slots in the models' order: repr and dumps read in it
from __future__ import annotations

import resource
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias, TypeVar

ProbeKind = Literal["exec", "http", "tcp", "log", "notify"]
_KINDS: tuple[ProbeKind, ...] = ("exec", "http", "tcp", "log", "notify")
#: The longest a log probe's pattern may search one line, in seconds (probes.py says why).
LOG_SEARCH_TIMEOUT = 0.025

R = TypeVar("R", bound="Record")


def _rebuild(cls: type[R], values: tuple[Any, ...]) -> R:
    record = cls.__new__(cls)
    for name, value in zip(cls.__slots__, values, strict=True):
        object.__setattr__(record, name, value)
    return record


class Record:
    """A frozen bag of a model's checked fields (``__slots__``; a name with ``_`` is private)."""

    __slots__: ClassVar[tuple[str, ...]] = ()
    #: Field name -> the key a person writes, where they differ (``as_`` is written ``as``).
    aliases: ClassVar[dict[str, str]] = {}
    #: What a field left out is: only where it has one meaning (a stream's kind), so that
    #: ``FileStream(path=...)`` builds one; the models give every other default.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **fields: Any) -> None:
        for name in self.__slots__:
            if name in fields:
                value = fields.pop(name)
            elif name in self.defaults:
                value = self.defaults[name]
            else:
                raise TypeError(f"{type(self).__name__} needs {name}")
            object.__setattr__(self, name, value)
        if fields:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(fields))}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: use replace()")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # holds dicts and lists, as the models did

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__ if not n.startswith("_"))
        return f"{type(self).__name__}({shown})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), tuple(getattr(self, n) for n in self.__slots__)))

    def replace(self: R, **changes: Any) -> R:
        """A copy with ``changes``; the private fields come along (an env_file's contents)."""
        values = {n: changes.pop(n) if n in changes else getattr(self, n) for n in self.__slots__}
        if changes:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(changes))}")
        return type(self)(**values)


def as_data(value: Any) -> Any:
    """A record as the data a person could have written for it (what the models take back).

    Durations stay seconds, signals numbers and umasks integers: each model reads those
    as it reads ``30s``, ``TERM`` and ``"022"``. Private fields are left out: the models
    make them again (an env_file is read again).
    """
    if isinstance(value, Record):
        return {
            value.aliases.get(n, n): as_data(getattr(value, n))
            for n in value.__slots__
            if not n.startswith("_")
        }
    if isinstance(value, dict):
        return {k: as_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_data(v) for v in value]
    return value


# -- stdio ------------------------------------------------------------------------------------


class LogStream(Record):
    __slots__ = ("kind",)
    defaults = {"kind": "log"}
    kind: Literal["log"]


class NullStream(Record):
    __slots__ = ("kind",)
    defaults = {"kind": "null"}
    kind: Literal["null"]


class InheritStream(Record):
    __slots__ = ("kind",)
    defaults = {"kind": "inherit"}
    kind: Literal["inherit"]


class FileStream(Record):
    __slots__ = ("kind", "path", "mode")
    defaults = {"kind": "file", "mode": "append"}
    kind: Literal["file"]
    path: str
    mode: Literal["append", "truncate"]


class FifoStream(Record):
    __slots__ = ("kind", "path")
    defaults = {"kind": "fifo"}
    kind: Literal["fifo"]
    path: str


class StdoutStream(Record):
    __slots__ = ("kind",)
    defaults = {"kind": "stdout"}
    kind: Literal["stdout"]


StreamSpec: TypeAlias = LogStream | NullStream | InheritStream | FileStream | FifoStream | StdoutStream


# -- logs, restart, stop ----------------------------------------------------------------------


class LogSettings(Record):
    __slots__ = ("max_bytes", "backups", "timestamps")
    max_bytes: int
    backups: int
    timestamps: bool


class InstanceLogs(Record):
    __slots__ = ("max_bytes", "backups", "timestamps", "stdout_file", "stderr_file")
    max_bytes: int | None
    backups: int | None
    timestamps: bool | None
    stdout_file: str | None
    stderr_file: str | None

    def resolved(self, defaults: LogSettings) -> LogSettings:
        return LogSettings(
            max_bytes=defaults.max_bytes if self.max_bytes is None else self.max_bytes,
            backups=defaults.backups if self.backups is None else self.backups,
            timestamps=defaults.timestamps if self.timestamps is None else self.timestamps,
        )


class Backoff(Record):
    __slots__ = ("initial", "factor", "max")
    initial: float
    factor: float
    max: float


class RestartPolicy(Record):
    __slots__ = ("policy", "success_codes", "min_uptime", "delay", "backoff", "max_restarts")
    policy: Literal["no", "on-failure", "always"]
    success_codes: list[int]
    min_uptime: float
    delay: float
    backoff: Backoff
    max_restarts: int


class StopPolicy(Record):
    __slots__ = ("signal", "timeout", "group")
    signal: int
    timeout: float
    group: bool


# -- checks, dependencies, limits -------------------------------------------------------------


def split_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:80`` for IPv6) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT, e.g. 127.0.0.1:5432")
    return host, int(port)


class _Probe:
    """What readiness and liveness checks share: which probe, its command, its address."""

    __slots__ = ()
    if TYPE_CHECKING:  # fields of the class it is mixed into (not annotations here: pydantic would take them)
        exec: str | list[str] | None
        http: str | None
        tcp: str | None
        expect: list[int] | None
        body: str | None
        interval: float
        timeout: float
        initial_delay: float

    @property
    def kind(self) -> ProbeKind:
        for kind in _KINDS:
            if getattr(self, kind, None) not in (None, False):
                return kind
        raise AssertionError("validated checks have a kind")

    @property
    def argv(self) -> list[str]:
        """The exec probe's argument vector."""
        command = self.exec
        assert command is not None
        return shlex.split(command) if isinstance(command, str) else list(command)

    @property
    def address(self) -> tuple[str, int]:
        assert self.tcp is not None
        return split_address(self.tcp)


_CHECK = ("exec", "http", "tcp", "expect", "body", "interval", "timeout", "initial_delay")


class ReadyCheck(_Probe, Record):
    __slots__ = (*_CHECK, "log", "notify", "success_threshold", "start_timeout")
    log: str | None
    notify: bool | None
    success_threshold: int
    start_timeout: float | None


class AliveCheck(_Probe, Record):
    __slots__ = (*_CHECK, "failure_threshold")
    failure_threshold: int


class Dependency(Record):
    __slots__ = ("condition", "restart")
    condition: Literal["started", "running", "ready", "completed"]
    restart: bool


#: The rlimits an instance may set, with prlimit's name, as ``Limits`` holds them.
RLIMIT_NAMES = ("as", "core", "cpu", "data", "fsize", "memlock", "nofile", "nproc", "stack")


def rlimit_pair(text: str) -> tuple[int, int]:
    """The canonical ``SOFT:HARD`` text as setrlimit's (soft, hard), RLIM_INFINITY for unlimited."""
    soft, _, hard = text.partition(":")
    return tuple(  # type: ignore[return-value]
        resource.RLIM_INFINITY if side == "unlimited" else int(side) for side in (soft, hard)
    )


class Limits(Record):
    __slots__ = (
        "memory",
        "memory_max",
        "cpu_quota",
        "memory_interval",
        "nice",
        "oom_score_adj",
        "nofile",
        "nproc",
        "core",
        "as_",
        "fsize",
        "stack",
        "cpu",
        "memlock",
        "data",
    )
    aliases = {"as_": "as"}
    memory: int | None
    memory_max: int | None
    cpu_quota: float | None
    memory_interval: float
    nice: int | None
    oom_score_adj: int | None

    def rlimits(self) -> dict[str, str]:
        """prlimit name → canonical ``SOFT:HARD``, for the rlimits set."""
        found = {name: getattr(self, "as_" if name == "as" else name) for name in RLIMIT_NAMES}
        return {name: value for name, value in found.items() if value is not None}


# -- an instance ------------------------------------------------------------------------------


class InstanceConfig(Record):
    __slots__ = (
        "command",
        "shell",
        "cwd",
        "env",
        "inherit_env",
        "env_file",
        "user",
        "group",
        "umask",
        "replicas",
        "autostart",
        "stdin",
        "stdout",
        "stderr",
        "logs",
        "restart",
        "stop",
        "depends_on",
        "ready",
        "alive",
        "watchdog",
        "watchdog_signal",
        "limits",
        "_env_from_file",
    )
    command: str | list[str]
    shell: bool
    cwd: str | None
    env: dict[str, str]
    inherit_env: bool
    env_file: str | None
    user: str | int | None
    group: str | int | None
    umask: int | None
    replicas: int
    autostart: bool
    stdin: StreamSpec
    stdout: StreamSpec
    stderr: StreamSpec
    logs: InstanceLogs
    restart: RestartPolicy
    stop: StopPolicy
    depends_on: dict[str, Dependency]
    ready: ReadyCheck | None
    alive: AliveCheck | None
    watchdog: float | None
    watchdog_signal: int
    limits: Limits
    _env_from_file: dict[str, str]

    @property
    def env_from_file(self) -> Mapping[str, str]:
        """What ``env_file`` said when the manifest was read (after a re-exec: when it was applied)."""
        return self._env_from_file

    def with_env_from_file(self, values: Mapping[str, str]) -> InstanceConfig:
        """A copy that runs with ``values`` for its ``env_file``'s contents (a re-exec's record)."""
        return self.replace(_env_from_file=dict(values))

    def environment(self, service_env: dict[str, str]) -> dict[str, str]:
        """The child's environment: the service's (unless inherit_env is false), env_file, env."""
        env = dict(service_env) if self.inherit_env else {}
        env.update(self._env_from_file)
        env.update(self.env)
        return env

    @property
    def argv(self) -> list[str]:
        """The argument vector to execute: the shell's when ``shell`` is set."""
        if self.shell:
            text = self.command if isinstance(self.command, str) else shlex.join(self.command)
            return ["/bin/sh", "-c", text]
        return shlex.split(self.command) if isinstance(self.command, str) else list(self.command)

    def replica_names(self, name: str) -> list[str]:
        if self.replicas == 1:
            return [name]
        return [f"{name}-{i}" for i in range(self.replicas)]


# -- the service ------------------------------------------------------------------------------


class ControlSettings(Record):
    __slots__ = ("socket", "tcp", "token_file")
    socket: str | None
    tcp: str | None
    token_file: str | None


class ServiceSettings(Record):
    __slots__ = ("state_dir", "control", "shutdown_timeout", "logs", "cgroups")
    state_dir: str
    control: ControlSettings
    shutdown_timeout: float
    logs: LogSettings
    cgroups: Literal["auto", "off", "required"]


class Manifest(Record):
    __slots__ = ("version", "supervisor", "instances", "_source")
    version: int
    supervisor: ServiceSettings
    instances: dict[str, InstanceConfig]
    _source: Path | None

    @property
    def source(self) -> Path | None:
        """The file this manifest was loaded from, for messages and reloads."""
        return self._source

    @property
    def state_dir(self) -> Path:
        return Path(self.supervisor.state_dir)

    @property
    def control_socket(self) -> Path:
        socket = self.supervisor.control.socket
        return Path(socket) if socket else self.state_dir / "control.sock"


def running_form(manifest: Manifest | Any) -> Manifest:
    """``manifest`` as the service runs it: a model a caller validated itself is made a record.

    ``load_manifest`` returns records already; an embedder may still build a
    ``models.Manifest`` with ``model_validate`` (docs/embedding.md).
    """
    if isinstance(manifest, Manifest):
        return manifest
    from .loader import settled

    converted: Manifest = settled(manifest)
    return converted
