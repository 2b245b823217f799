"""The manifest's models: what a person may write, with defaults and meaning.

Every model refuses unknown keys, so a misspelt key is an error at load time
rather than a setting silently ignored for months. Descriptions here are the
source of ``docs/manifest.md`` and of the JSON Schema editors use.
"""

# Without `from __future__ import annotations`: pydantic then takes each field's type as the
# object it is, instead of evaluating its text (a compile and an eval per field, 5 ms of every
# manifest check, which is on the path of every cold start: docs/performance.md).

import ipaddress
import os
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .annotated import Duration, Signal, Size, Umask
from .base import StrictModel
from .checks import AliveCheck, Dependencies, ReadyCheck
from .limits import Limits
from .regular_file import NotARegularFile, read_regular_file

INSTANCE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
#: A name becomes a file name, NAME-9999.out.log.1000 or NAME.err.log.dropped-PID-N; 200
#: characters leave room for every suffix within the 255-byte limit of a file name.
MAX_NAME_LENGTH = 200
#: The most replicas of one instance: the suffixes stay within -9999.
MAX_REPLICAS = 10_000
#: The most rotated files kept: every rotation renames each of them once.
MAX_BACKUPS = 1000


def _relative_to_manifest(value: str | None, info: ValidationInfo) -> str | None:
    """Make a path absolute against the manifest's folder (the loader passes it as context).

    Resolved at load time so that two manifests compare equal on reload exactly
    when they mean the same files, and so that no later module guesses a base.
    An empty path stays empty: for a stream it means "not set up".
    """
    base = (info.context or {}).get("base_dir")
    if not value or base is None:
        return value
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else Path(base) / path)


RelativePath = Annotated[str, AfterValidator(_relative_to_manifest)]


# -- stdio ------------------------------------------------------------------------------------


class LogStream(StrictModel):
    """A pipe the service captures into the instance's rotating log (see ``logs``)."""

    kind: Literal["log"] = Field("log", description="The long form's tag: {kind: log}.")


class NullStream(StrictModel):
    """``/dev/null``."""

    kind: Literal["null"] = Field("null", description="The long form's tag: {kind: null}.")


class InheritStream(StrictModel):
    """The service's own stream of the same number."""

    kind: Literal["inherit"] = Field("inherit", description="The long form's tag: {kind: inherit}.")


class FileStream(StrictModel):
    """A regular file: read for stdin; for output, created when missing, appended to or truncated."""

    kind: Literal["file"] = Field("file", description="The long form's tag: {kind: file, path: …}.")
    path: RelativePath = Field(
        description="The file; written `file: PATH` in the short form. Relative to the manifest's folder."
    )
    mode: Literal["append", "truncate"] = Field(
        "append", description="Output only: truncate empties the file at every start of the program."
    )


class FifoStream(StrictModel):
    """An existing fifo, opened read-write so that opening never blocks the service."""

    kind: Literal["fifo"] = Field("fifo", description="The long form's tag: {kind: fifo, path: …}.")
    path: RelativePath = Field(
        description="The fifo; written `fifo: PATH` in the short form. Relative to the manifest's folder."
    )


class StdoutStream(StrictModel):
    """stderr only: the same file descriptor as stdout, like ``2>&1``."""

    kind: Literal["stdout"] = Field("stdout", description="The long form's tag: {kind: stdout}.")


_KEYWORDS = {"log": LogStream, "null": NullStream, "inherit": InheritStream, "stdout": StdoutStream}


def _stream_from_yaml(value: Any) -> Any:
    """Turn the short forms (``log``, ``/var/log/x``, ``{file: ...}``) into tagged dicts."""
    if value is None:
        # YAML reads a bare `null` as None: that is the `null` form, /dev/null.
        return {"kind": "null"}
    if isinstance(value, str):
        if value in _KEYWORDS:
            return {"kind": value}
        return {"kind": "file", "path": value}
    if isinstance(value, dict) and "kind" not in value:
        if "file" in value:
            return {"kind": "file", "path": value["file"], **{k: v for k, v in value.items() if k != "file"}}
        if "fifo" in value:
            return {"kind": "fifo", "path": value["fifo"], **{k: v for k, v in value.items() if k != "fifo"}}
        raise ValueError("a stream mapping needs a 'file' or a 'fifo' key")
    return value


_STREAM_SCHEMA_SHORT = {
    "type": "string",
    "description": "log, null, inherit, or a path to a file",
}
_STREAM_SCHEMA_OBJECTS = [
    {
        "type": "object",
        "properties": {"file": {"type": "string"}, "mode": {"enum": ["append", "truncate"]}},
        "required": ["file"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"fifo": {"type": "string"}},
        "required": ["fifo"],
        "additionalProperties": False,
    },
]


def _stream_type(*kinds: type[StrictModel]) -> Any:
    members: Any = kinds[0]
    for kind in kinds[1:]:
        members = members | kind
    return Annotated[
        members,
        Field(discriminator="kind"),
        BeforeValidator(_stream_from_yaml),
        WithJsonSchema({"anyOf": [_STREAM_SCHEMA_SHORT, *_STREAM_SCHEMA_OBJECTS]}),
    ]


InputStream = _stream_type(NullStream, InheritStream, FileStream, FifoStream)
OutputStream = _stream_type(LogStream, NullStream, InheritStream, FileStream, FifoStream)
ErrorStream = _stream_type(LogStream, NullStream, InheritStream, FileStream, FifoStream, StdoutStream)
StreamSpec = LogStream | NullStream | InheritStream | FileStream | FifoStream | StdoutStream


# -- logs, restart, stop ----------------------------------------------------------------------


class LogSettings(StrictModel):
    """How captured output is kept on disk and in memory."""

    max_bytes: Size = Field(50 * 1024**2, description="Rotate the file when it would grow past this.")
    backups: StrictInt = Field(
        5, ge=0, le=MAX_BACKUPS, description="Rotated files kept: NAME.out.log.1 … .N."
    )
    timestamps: bool = Field(False, description="Prefix each line with an ISO-8601 UTC time.")


class InstanceLogs(StrictModel):
    """Per-instance log settings; unset keys take the service's ``supervisor.logs`` values."""

    max_bytes: Size | None = Field(
        None, description="Rotate past this size. Unset: supervisor.logs.max_bytes."
    )
    backups: StrictInt | None = Field(
        None, ge=0, le=MAX_BACKUPS, description="Rotated files kept. Unset: supervisor.logs.backups."
    )
    timestamps: bool | None = Field(
        None, description="Prefix lines with a UTC time. Unset: supervisor.logs.timestamps."
    )
    stdout_file: RelativePath | None = Field(
        None,
        description="The log of captured stdout. Unset: <state_dir>/logs/NAME.out.log. "
        "With replicas, each gets its own file: web.log becomes web-0.log, web-1.log … "
        "Each captured stream needs its own file: one that another stream logs to, the manifest, "
        "an env_file, or another log's backup (a.log.1 to a.log.N beside a.log that keeps N) is refused.",
    )
    stderr_file: RelativePath | None = Field(
        None,
        description="The log of captured stderr. Unset: <state_dir>/logs/NAME.err.log. "
        "With replicas, each gets its own file, as for stdout_file, and it cannot be another stream's.",
    )


class Backoff(StrictModel):
    """The pause before retrying a failed start: initial × factor^(n-1) for the n-th in a row.

    Capped at ``max``, with up to 10 % jitter so that many instances failing together do
    not retry in lockstep.
    """

    initial: Duration = Field(0.1, description="Pause after the first failed start.")
    factor: float = Field(
        2.0, ge=1.0, le=100.0, allow_inf_nan=False, description="Growth per failed start in a row (1 to 100)."
    )
    max: Duration = Field(30.0, description="The pause never grows past this.")


class RestartPolicy(StrictModel):
    """When an ended instance is started again, and when the service gives up.

    A *failed start* is a run that ended before it was ``running`` (up for ``min_uptime``
    and ready where a readiness check is set), or a spawn that failed. Failed starts in a
    row grow the back-off and count towards ``max_restarts``; a run that reached
    ``running`` ends the streak, and when it ends it is started again after ``delay``
    (none by default), however often that happens. This is what supervisord
    (``startretries``) and pm2 (``max_restarts`` of unstable restarts) do. However short
    its runs, an instance is started again at most 20 times a second (twenty at once, then
    evenly): a program that exits at once with ``min_uptime: 0`` and ``policy: always`` is
    paced, not restarted in a tight loop.
    """

    policy: Literal["no", "on-failure", "always"] = Field(
        "on-failure",
        description=(
            "When to restart a program that was up past min_uptime: no: never; on-failure: after"
            " an exit code outside success_codes, or a death by a signal; always: after any exit."
            " A failed start is retried under every policy."
        ),
    )
    success_codes: list[Annotated[StrictInt, Field(ge=0, le=255)]] = Field(
        [0], max_length=256, description="Exit codes that count as success (0 to 255)."
    )
    min_uptime: Duration = Field(1.0, description="An exit sooner than this is a failed start.")
    delay: Duration = Field(
        0.0, description="Pause before restarting a program that was up (reached running) and ended."
    )
    backoff: Backoff = Field(Backoff(), description="The pause before each retry of a failed start.")
    max_restarts: StrictInt = Field(
        10,
        ge=0,
        le=1_000_000,
        description="Failed starts in a row retried before giving up (failed); a run that came up resets it.",
    )


class StopPolicy(StrictModel):
    """How an instance is stopped."""

    signal: Signal = Field(15, description="Sent first (TERM, INT, QUIT, a number…).")
    timeout: Duration = Field(10.0, description="How long to wait after the signal before SIGKILL.")
    group: bool = Field(
        True, description="Signal the whole process group, and kill what is left of it on exit."
    )


def _user_or_group(value: Any) -> Any:
    """A name, or a number the kernel takes as an id (-1 and 2**32-1 mean "unchanged" to it)."""
    if value is None:
        return value
    if isinstance(value, str):
        if not value:  # `user: ""` read as no user at all, or as a lookup that fails at every start
            raise ValueError(f"the name is empty: expected a name or a number from 0 to {2**32 - 2}")
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 - 1:
        return value
    raise ValueError(f"expected a name or a number from 0 to {2**32 - 2} (got {value!r})")


def _env_name(key: str) -> str:
    """A key of ``env``: checked one by one, so that each bad key is reported at its own place."""
    if not key or "=" in key:
        raise ValueError(f"{key!r} cannot name an environment variable: it is empty or holds '='")
    return key


EnvName = Annotated[str, AfterValidator(_env_name)]


# -- instance ---------------------------------------------------------------------------------


class InstanceConfig(StrictModel):
    """One program, started ``replicas`` times."""

    command: str | list[str] = Field(
        description="A list of arguments, or a string split as a shell would split it."
    )
    shell: bool = Field(False, description="Run the command string through /bin/sh -c.")
    cwd: RelativePath | None = Field(
        None, description="The working folder, relative to the manifest's folder. Unset: the service's."
    )
    env: dict[EnvName, str] = Field({}, description="Merged over the service's environment.")
    inherit_env: bool = Field(True, description="false: start from an empty environment.")
    env_file: RelativePath | None = Field(
        None, description="A file of KEY=VALUE lines, read at load time, applied before env."
    )
    user: Annotated[str | int | None, BeforeValidator(_user_or_group)] = Field(
        None, description="Run as this user, a name or a uid (the service must be root)."
    )
    group: Annotated[str | int | None, BeforeValidator(_user_or_group)] = Field(
        None, description="Run with this group, a name or a gid."
    )
    umask: Umask | None = Field(
        None, description="The file mode creation mask, octal, e.g. '022'. Unset: the service's."
    )
    replicas: StrictInt = Field(
        1, ge=0, le=MAX_REPLICAS, description="How many copies; more than one are named NAME-0, NAME-1, …"
    )
    autostart: bool = Field(True, description="Start when the service starts.")
    stdin: InputStream = Field(NullStream(), description="Where fd 0 comes from.")  # type: ignore[valid-type]
    stdout: OutputStream = Field(LogStream(), description="Where fd 1 goes.")  # type: ignore[valid-type]
    stderr: ErrorStream = Field(LogStream(), description="Where fd 2 goes; 'stdout' merges it.")  # type: ignore[valid-type]
    logs: InstanceLogs = Field(InstanceLogs(), description="Where and how captured output is kept.")
    restart: RestartPolicy = Field(RestartPolicy(), description="When the program is started again.")
    stop: StopPolicy = Field(StopPolicy(), description="How the program is stopped.")
    depends_on: Dependencies = Field(
        {},
        description="Other instances (by manifest name) to wait for before starting: a list (each must be "
        "ready), or a mapping of name to a condition or to {condition, restart}.",
    )
    ready: ReadyCheck | None = Field(
        None, description="When a started instance is ready (one probe kind). Unset: ready when running."
    )
    alive: AliveCheck | None = Field(
        None, description="A liveness check (exec, http or tcp); failures in a row restart the instance."
    )
    watchdog: Duration | None = Field(
        None,
        description="ready: {notify: true} only: without WATCHDOG=1 this often, the instance gets "
        "watchdog_signal, then SIGKILL after stop.timeout, and is restarted.",
    )
    watchdog_signal: Signal = Field(6, description="Sent when the watchdog expires (ABRT, as systemd does).")
    limits: Limits = Field(
        Limits(),
        description="What the program may use: memory (restart past it), nice, oom_score_adj, rlimits.",
    )

    @model_validator(mode="after")
    def _log_check_needs_a_log(self) -> "InstanceConfig":
        captured = "log" in (self.stdout.kind, self.stderr.kind)
        if self.ready is not None and self.ready.kind == "log" and not captured:
            raise ValueError("ready: {log: …} reads captured output, but neither stdout nor stderr is `log`")
        return self

    @model_validator(mode="after")
    def _watchdog_needs_notify(self) -> "InstanceConfig":
        if self.watchdog is not None:
            if self.ready is None or self.ready.kind != "notify":
                raise ValueError("watchdog needs ready: {notify: true}: the program pings over sd_notify")
            if self.watchdog <= 0:
                raise ValueError("watchdog must be longer than 0s")
        return self

    @field_validator("env", mode="before")
    @classmethod
    def _env_scalars(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: ("true" if v is True else "false" if v is False else str(v))
                if isinstance(v, int | float | bool)
                else v
                for k, v in value.items()
            }
        return value

    @field_validator("command")
    @classmethod
    def _command_splits(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            try:
                words = shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split the command: {exc}") from None
        else:
            words = value
        if not words:
            raise ValueError("the command is empty")
        if not words[0]:
            raise ValueError("the command's first word is the program to run: it cannot be empty")
        return value

    _env_from_file: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _read_env_file(self) -> "InstanceConfig":
        """Read env_file at load time: a missing file is a load error, not a 3 a.m. restart error."""
        if self.env_file:
            self._env_from_file = read_env_file(Path(self.env_file))
        return self


# -- service ----------------------------------------------------------------------------------


class ControlSettings(StrictModel):
    """Where the control API listens."""

    socket: RelativePath | None = Field(None, description="Default: <state_dir>/control.sock (mode 0600).")
    tcp: str | None = Field(
        None, description="Also listen on HOST:PORT, a loopback address only; needs token_file."
    )
    token_file: RelativePath | None = Field(None, description="The bearer token TCP clients must send.")

    @field_validator("tcp")
    @classmethod
    def _loopback_only(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not HOST:PORT, e.g. 127.0.0.1:9001")
        host = host.strip("[]")
        if host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address") from None
            if not loopback:
                raise ValueError(f"{host} is not a loopback address: only 127.0.0.0/8 or ::1")
        return value

    @model_validator(mode="after")
    def _tcp_needs_token(self) -> "ControlSettings":
        if self.tcp and not self.token_file:
            raise ValueError("control.tcp needs control.token_file: TCP clients must authenticate")
        return self


class ServiceSettings(StrictModel):
    """Settings of the service itself."""

    state_dir: RelativePath = Field(
        ".supervisor",
        validate_default=True,
        description="The service's folder: control socket, logs. Relative to the manifest's folder.",
    )
    control: ControlSettings = Field(ControlSettings(), description="Where the control API listens.")
    shutdown_timeout: Duration = Field(
        30.0, description="How long a shutdown waits for all instances before SIGKILL."
    )
    logs: LogSettings = Field(LogSettings(), description="Log defaults for every instance.")
    cgroups: Literal["auto", "off", "required"] = Field(
        "auto",
        description="A cgroup v2 per instance (group kill through cgroup.kill, memory_max, cpu_quota): auto "
        "uses them where the service may, and says once in its log what is missing; required refuses "
        "to start without them (or without a controller a limit needs); off never makes any.",
    )


#: The largest env_file read: the manifest's own limit.
MAX_ENV_FILE_BYTES = 1024 * 1024


def _read_small_file(path: Path, key: str) -> str:
    """A regular file's UTF-8 text, refused past MAX_ENV_FILE_BYTES (never waited on: regular_file.py)."""
    try:
        data = read_regular_file(path, MAX_ENV_FILE_BYTES + 1)
    except NotARegularFile:
        raise ValueError(f"{key} {str(path)!r} is not a regular file") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ValueError(f"cannot read {key} {str(path)!r}: {reason}") from None
    if len(data) > MAX_ENV_FILE_BYTES:
        raise ValueError(f"{key} {str(path)!r} is larger than {MAX_ENV_FILE_BYTES // 1024} KiB")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{key} {str(path)!r} is not UTF-8 text (byte {exc.start})") from None


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (``export`` prefixes, comments, quotes) as docker and systemd do."""
    text = _read_small_file(path, "env_file")
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ValueError(f"env_file {str(path)!r} line {number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if "\0" in value:
            raise ValueError(f"env_file {str(path)!r} line {number}: a value cannot hold a NUL character")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


InstanceName = Annotated[str, Field(pattern=INSTANCE_NAME_PATTERN, max_length=MAX_NAME_LENGTH)]


def _integer_version(value: Any) -> Any:
    """``version: 1.0`` or ``true`` equal 1 in Python, but they are not the format's number."""
    if isinstance(value, bool | float):
        raise ValueError(f"write version: 1, the integer (got {value!r})")
    return value


class Manifest(StrictModel):
    """A whole manifest file."""

    version: Annotated[Literal[1], BeforeValidator(_integer_version)] = Field(
        description="The manifest format; 1 is the only one."
    )
    # Validated from {} when absent, so that state_dir is resolved against the manifest's folder.
    supervisor: ServiceSettings = Field(  # type: ignore[arg-type]
        default_factory=dict, validate_default=True, description="Settings of the service itself."
    )
    instances: dict[InstanceName, InstanceConfig] = Field({}, description="The programs to run, by name.")

    _source: Path | None = PrivateAttr(None)
