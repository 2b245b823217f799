"""Import a process-compose file (``processes:`` …) as a manifest.

process-compose runs each command through a shell (``bash -c`` unless the file
says otherwise); the manifest runs it through ``/bin/sh -c``. Its ``${VAR}``
references are expanded when the file is loaded; so are ours, so they are kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import read_env_file, signal_name
from .notes import Converted, ConvertError, read_source
from .positions import KeyPath, load_yaml
from .writer import Draft, Interp, instance_name, relative_path

DOCKER_COMPOSE = (
    "a docker compose file (top-level services:), which this command does not read: it reads "
    "process-compose (processes:), a Procfile (name: command lines) and supervisord.conf ([program:x])"
)
MAX_ENTRIES = 1000
MAX_REPLICAS = 1000
_CONDITIONS = {
    "process_started": "started",
    "process_healthy": "ready",
    "process_log_ready": "ready",
    "process_completed_successfully": "completed",
    "process_completed": "completed",
}
_RESTART = {"always": "always", "on_failure": "on-failure", "exit_on_failure": "on-failure", "no": "no"}
_TOP_KEYS = {"version", "processes", "environment", "log_location", "log_level", "shell", "is_strict"}
_PROCESS_KEYS = {
    "command", "working_dir", "environment", "availability", "depends_on", "readiness_probe",
    "liveness_probe", "shutdown", "replicas", "disabled", "is_daemon", "log_location", "description",
    "ready_log_line", "namespace",
}  # fmt: skip
# The process-compose keys a manifest key is made from (the first one written wins), so that a
# problem the loader finds in the converted manifest is reported on the line to change.
_SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "command": ("command",),
    "cwd": ("working_dir",),
    "env": ("environment",),
    "replicas": ("replicas",),
    "logs": ("log_location",),
    "restart": ("availability",),
    "stop": ("shutdown",),
    "ready": ("readiness_probe", "ready_log_line"),
    "alive": ("liveness_probe",),
    "depends_on": ("depends_on",),
}
_ENV_REF = re.compile(r"\$(\$|\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)")


class _Reader:
    """The parsed file with the line of every key, for notes and errors."""

    def __init__(self, source: Path, lines: dict[KeyPath, int], draft: Draft) -> None:
        self.source = source
        self.lines = lines
        self.draft = draft
        self.dotenv: dict[str, str] = {}
        self.env_file: str | None = None

    def at(self, *path: str | int) -> tuple[str, int | None]:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return str(self.source), self.lines[path[:end]]
        return str(self.source), None

    def fail(self, path: tuple[str | int, ...], message: str) -> ConvertError:
        return ConvertError(*self.at(*path), f"{'.'.join(map(str, path))}: {message}")

    def number(self, value: Any, path: tuple[str | int, ...], low: float = 0, high: float = 10**7) -> float:
        if isinstance(value, str) and re.fullmatch(r"\d{1,9}", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise self.fail(path, f"expected a number from {low:g} to {high:g}, got {value!r}")
        return value

    def text(self, value: Any, path: tuple[str | int, ...]) -> str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise self.fail(path, f"expected text, got {value!r}")
        return str(value)


def _interp(text: str, dotenv: dict[str, str] | None = None) -> str:
    """process-compose's load-time ``$VAR`` / ``${VAR}`` (unset: empty; ``$$``: a ``$``) for the loader.

    A name the ``.env`` beside the file defines takes that value now, as process-compose
    would; any other name is left to the loader as ``${VAR-}``, read when the manifest loads.
    """
    if "$" not in text:
        return text
    out, last = [], 0
    for match in _ENV_REF.finditer(text):
        out.append(text[last : match.start()].replace("$", "$$"))
        name = match.group(1).strip("{}")
        if name == "$":
            out.append("$$")
        elif dotenv and name in dotenv:
            out.append(dotenv[name].replace("$", "$$"))
        else:
            out.append("${" + name + "-}")
        last = match.end()
    out.append(text[last:].replace("$", "$$"))
    return Interp("".join(out))


def _environment(reader: _Reader, value: Any, path: tuple[str | int, ...]) -> dict[str, str]:
    """``["KEY=value", …]`` (or a mapping) as a dict."""
    if isinstance(value, dict):
        return {str(k): _interp(reader.text(v, (*path, str(k))), reader.dotenv) for k, v in value.items()}
    if not isinstance(value, list):
        raise reader.fail(path, "expected a list of KEY=value strings")
    env: dict[str, str] = {}
    for index, item in enumerate(value):
        key, sep, text = reader.text(item, (*path, index)).partition("=")
        if not sep or not key:
            raise reader.fail((*path, index), f"expected KEY=value, got {item!r}")
        env[key] = _interp(text, reader.dotenv)
    return env


def _probe(reader: _Reader, value: Any, path: tuple[str | int, ...], ready: bool) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        raise reader.fail(path, "expected a mapping with exec or http_get")
    check: dict[str, Any] = {}
    if isinstance(value.get("exec"), dict) and "command" in value["exec"]:
        command = reader.text(value["exec"]["command"], (*path, "exec", "command"))
        check["exec"] = ["/bin/sh", "-c", _interp(command, reader.dotenv)]
        reader.draft.note(
            reader.at(*path, "exec"),
            "exec",
            "approximated",
            "run through /bin/sh -c (process-compose: bash -c)",
        )
    elif isinstance(value.get("http_get"), dict):
        http = value["http_get"]
        scheme = reader.text(http.get("scheme", "http"), (*path, "http_get", "scheme"))
        host = reader.text(http.get("host", "127.0.0.1"), (*path, "http_get", "host"))
        port = int(reader.number(http.get("port", 80), (*path, "http_get", "port"), 1, 65535))
        route = reader.text(http.get("path", "/"), (*path, "http_get", "path"))
        if ":" in host and not host.startswith("["):  # an IPv6 literal: bracketed in a URL (RFC 3986)
            host = f"[{host}]"
        check["http"] = f"{scheme}://{host}:{port}/{route.lstrip('/')}"
    else:
        raise reader.fail(path, "expected exec: {command: …} or http_get: {host, port, path}")
    timing = {
        "period_seconds": "interval",
        "timeout_seconds": "timeout",
        "initial_delay_seconds": "initial_delay",
    }
    for theirs, ours in timing.items():
        if theirs in value:
            check[ours] = f"{reader.number(value[theirs], (*path, theirs)):g}s"
    if ready:
        if "success_threshold" in value:
            check["success_threshold"] = int(
                reader.number(value["success_threshold"], (*path, "success_threshold"), 1, 1000)
            )
        check["start_timeout"] = None
        if "failure_threshold" in value:
            reader.draft.note(
                reader.at(*path, "failure_threshold"), "failure_threshold", "dropped",
                "a readiness check retries until it passes (start_timeout: null)",
            )  # fmt: skip
    else:
        if "failure_threshold" in value:
            check["failure_threshold"] = int(
                reader.number(value["failure_threshold"], (*path, "failure_threshold"), 1, 1000)
            )
        if "success_threshold" in value:
            reader.draft.note(
                reader.at(*path, "success_threshold"), "success_threshold", "dropped",
                "a liveness check passes at the first success",
            )  # fmt: skip
    return check


def _availability(reader: _Reader, value: Any, name: str, entry: str) -> dict[str, Any]:
    path = ("processes", name, "availability")
    if not isinstance(value, dict):
        raise reader.fail(path, "expected a mapping (restart, backoff_seconds, max_restarts)")
    restart: dict[str, Any] = {"policy": "no"}
    if "restart" in value:
        policy = reader.text(value["restart"], (*path, "restart"))
        if policy not in _RESTART:
            raise reader.fail((*path, "restart"), f"expected one of {', '.join(_RESTART)}, got {policy!r}")
        restart["policy"] = _RESTART[policy]
        if policy == "exit_on_failure":
            reader.draft.note(
                reader.at(*path, "restart"), "restart", "approximated",
                "on-failure: the service does not exit when one instance fails",
                at=(entry, "restart", "policy"),
            )  # fmt: skip
    if "backoff_seconds" in value:
        seconds = reader.number(value["backoff_seconds"], (*path, "backoff_seconds"))
        restart["delay"] = f"{seconds:g}s"
        restart["backoff"] = {"initial": f"{seconds:g}s", "factor": 1.0, "max": f"{seconds:g}s"}
    if "max_restarts" in value:
        count = int(reader.number(value["max_restarts"], (*path, "max_restarts"), 0, 10**6))
        if count == 0:
            count = 1_000_000
            reader.draft.note(
                reader.at(*path, "max_restarts"), "max_restarts", "approximated",
                "0 (no limit): 1000000 failed starts in a row", at=(entry, "restart", "max_restarts"),
            )  # fmt: skip
        else:
            reader.draft.note(
                reader.at(*path, "max_restarts"), "max_restarts", "approximated",
                "ours counts failed starts in a row; process-compose, every restart over the whole run",
                at=(entry, "restart", "max_restarts"),
            )  # fmt: skip
        restart["max_restarts"] = count
    for key in value:
        if key not in ("restart", "backoff_seconds", "max_restarts"):
            reader.draft.note(reader.at(*path, key), str(key), "dropped", "no counterpart in restart")
    return restart


def _shutdown(reader: _Reader, value: Any, name: str, entry: str) -> dict[str, Any]:
    path = ("processes", name, "shutdown")
    if not isinstance(value, dict):
        raise reader.fail(path, "expected a mapping (signal, timeout_seconds, command)")
    stop: dict[str, Any] = {}
    if "signal" in value:
        number = int(reader.number(value["signal"], (*path, "signal"), 1, 64))
        try:
            stop["signal"] = signal_name(number).removeprefix("SIG")
        except ValueError:
            raise reader.fail((*path, "signal"), f"{number} is not a signal here") from None
    if "timeout_seconds" in value:
        stop["timeout"] = f"{reader.number(value['timeout_seconds'], (*path, 'timeout_seconds')):g}s"
    if "parent_only" in value:
        stop["group"] = not bool(value["parent_only"])
    if "command" in value:
        reader.draft.note(
            reader.at(*path, "command"), "shutdown.command", "dropped",
            "no stop command: the instance gets stop.signal; make the program stop on it",
            at=(entry, "command"),
        )  # fmt: skip
    return stop


def _process(
    reader: _Reader, name: str, spec: Any, entry: str, names: dict[str, list[str]], glob_env: dict[str, str]
) -> dict[str, Any]:
    path = ("processes", name)
    if not isinstance(spec, dict) or "command" not in spec:
        raise reader.fail(path, "expected a mapping with a command")
    out: dict[str, Any] = {
        "command": _interp(reader.text(spec["command"], (*path, "command")), reader.dotenv),
        "shell": True,
    }
    if not out["command"].strip():
        raise reader.fail((*path, "command"), "the command is empty")
    if reader.env_file:
        out["env_file"] = reader.env_file
        reader.draft.comment(
            (entry, "env_file"), "process-compose gives every process the .env beside its file"
        )
    if "PC_REPLICA_NUM" in str(spec) or "PC_PROC_NAME" in str(spec):
        reader.draft.note(
            reader.at(*path),
            "PC_REPLICA_NUM",
            "dropped",
            "not set by the service: each replica gets the same env",
        )
    if "working_dir" in spec:
        out["cwd"] = _interp(reader.text(spec["working_dir"], (*path, "working_dir")), reader.dotenv)
    env = {
        **glob_env,
        **(
            _environment(reader, spec["environment"], (*path, "environment")) if "environment" in spec else {}
        ),
    }
    if env:
        out["env"] = env
    if spec.get("disabled"):
        out["autostart"] = False
    if "replicas" in spec:
        out["replicas"] = int(reader.number(spec["replicas"], (*path, "replicas"), 0, MAX_REPLICAS))
    if "log_location" in spec:
        out["stderr"] = "stdout"
        out["logs"] = {
            "stdout_file": _interp(reader.text(spec["log_location"], (*path, "log_location")), reader.dotenv)
        }
        reader.draft.comment((entry, "stderr"), "process-compose writes both streams to log_location")
    out["restart"] = (
        _availability(reader, spec["availability"], name, entry)
        if "availability" in spec
        else {"policy": "no"}
    )
    if "shutdown" in spec:
        out["stop"] = _shutdown(reader, spec["shutdown"], name, entry)
    if "ready_log_line" in spec:
        out["ready"] = {
            "log": re.escape(reader.text(spec["ready_log_line"], (*path, "ready_log_line"))),
            "start_timeout": None,
        }
    if "readiness_probe" in spec:
        out["ready"] = _probe(reader, spec["readiness_probe"], (*path, "readiness_probe"), ready=True)
    if "liveness_probe" in spec:
        out["alive"] = _probe(reader, spec["liveness_probe"], (*path, "liveness_probe"), ready=False)
    if "depends_on" in spec:
        out["depends_on"] = _depends_on(reader, spec["depends_on"], name, entry, names)
    if spec.get("is_daemon"):
        out["restart"] = {**out["restart"], "policy": "no"}
        reader.draft.note(
            reader.at(*path, "is_daemon"), "is_daemon", "approximated",
            "the command's exit ends the instance (exited) and the daemon it leaves is not supervised: "
            "run the program in the foreground instead",
            at=(entry, "command"),
        )  # fmt: skip
    if "description" in spec:
        reader.draft.comment((entry,), reader.text(spec["description"], (*path, "description")))
    for key in spec:
        if key not in _PROCESS_KEYS:
            reader.draft.note(reader.at(*path, key), str(key), "dropped", "not a key this converter knows")
        elif key == "namespace":
            reader.draft.note(
                reader.at(*path, key), "namespace", "dropped", "no namespaces: select by name or glob"
            )
    return out


def _depends_on(
    reader: _Reader, value: Any, name: str, entry: str, names: dict[str, list[str]]
) -> dict[str, Any]:
    path = ("processes", name, "depends_on")
    if not isinstance(value, dict):
        raise reader.fail(path, "expected a mapping of process name to {condition: …}")
    deps: dict[str, Any] = {}
    for other, edge in value.items():
        if other not in names:
            raise reader.fail((*path, str(other)), f"no process named {other!r}")
        condition = edge.get("condition", "process_started") if isinstance(edge, dict) else None
        if condition not in _CONDITIONS:
            raise reader.fail(
                (*path, str(other)), f"condition: expected one of {', '.join(_CONDITIONS)}, got {condition!r}"
            )
        for target in names[other]:
            deps[target] = _CONDITIONS[condition]
        if condition == "process_completed":
            reader.draft.note(
                reader.at(*path, str(other), "condition"), "process_completed", "approximated",
                "completed means exited with a success code; process-compose accepts any exit",
                at=(entry, "depends_on", names[other][0]),
            )  # fmt: skip
    return deps


_REPLICA_REF = re.compile(
    r"\{\{\s*\.(PC_REPLICA_NUM|PC_PROC_NAME)\s*\}\}|\$\{?(PC_REPLICA_NUM|PC_PROC_NAME)\}?(?!\w)"
)


def _uses_replica(spec: Any) -> bool:
    return "PC_REPLICA_NUM" in repr(spec) or "PC_PROC_NAME" in repr(spec)


def _with_replica(value: Any, name: str, number: int) -> Any:
    """``{{.PC_REPLICA_NUM}}``, ``$PC_REPLICA_NUM`` (and PC_PROC_NAME) filled in, as process-compose does."""
    if isinstance(value, str):
        return _REPLICA_REF.sub(lambda m: str(number) if "REPLICA" in m.group(0) else name, value)
    if isinstance(value, dict):
        return {k: _with_replica(v, name, number) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_replica(v, name, number) for v in value]
    return value


def _as_list(environment: Any) -> list[Any]:
    if isinstance(environment, dict):
        return [f"{k}={v}" for k, v in environment.items()]
    return list(environment) if isinstance(environment, list) else []


def _entries(reader: _Reader, processes: dict[Any, Any]) -> dict[str, list[str]]:
    """The manifest entries of each process: one, or one per replica where the replica number is used."""
    names: dict[str, list[str]] = {}
    taken: set[str] = set()
    for name, spec in processes.items():
        entry = instance_name(str(name))
        if entry != str(name):
            reader.draft.note(
                reader.at("processes", str(name)), str(name), "approximated", f"named {entry!r}"
            )
        replicas = spec.get("replicas", 1) if isinstance(spec, dict) else 1
        path = ("processes", str(name), "replicas")
        count = int(reader.number(replicas, path, 0, MAX_REPLICAS))
        entries = [entry]
        if count > 1 and _uses_replica(spec):
            entries = [f"{entry}-{i}" for i in range(count)]
            reader.draft.note(
                reader.at(*path), "replicas", "approximated",
                f"{count} instances {entries[0]} … {entries[-1]}: PC_REPLICA_NUM differs per replica",
            )  # fmt: skip
        for one in entries:
            if one in taken:
                raise reader.fail(
                    ("processes", str(name)), f"{name!r} and another process both become {one!r}"
                )
            taken.add(one)
        names[str(name)] = entries
    return names


def convert(text: str, source: Path, output: Path, read: Callable[[Path], str] = read_source) -> Converted:
    """A process-compose file's ``text`` (from ``source``) as a manifest to be written at ``output``."""
    draft = Draft(source, "process-compose", "process under processes:")
    data, lines = load_yaml(text, source)
    reader = _Reader(source, lines, draft)
    dotenv = source.resolve().parent / ".env"
    if dotenv.is_file():
        try:
            reader.dotenv = read_env_file(dotenv)
        except ValueError as exc:
            raise ConvertError(dotenv, None, str(exc)) from None
        reader.env_file = relative_path(dotenv, output)
    if not isinstance(data, dict) or not isinstance(data.get("processes"), dict):
        if isinstance(data, dict) and "services" in data and "processes" not in data:
            raise ConvertError(source, lines.get(("services",)), DOCKER_COMPOSE)
        raise ConvertError(source, 1, "expected a mapping with processes: {name: {command: …}}")
    processes: dict[Any, Any] = data["processes"]
    if len(processes) > MAX_ENTRIES:
        raise ConvertError(source, lines.get(("processes",)), f"more than {MAX_ENTRIES} processes")
    names = _entries(reader, processes)
    glob_env = _environment(reader, data["environment"], ("environment",)) if "environment" in data else {}
    for key in data:
        if key not in _TOP_KEYS:
            draft.note(reader.at(str(key)), str(key), "dropped", "not a key this converter knows")
        elif key in ("log_location", "log_level", "is_strict"):
            draft.note(reader.at(str(key)), str(key), "dropped", "process-compose's own setting")
        elif key == "shell":
            draft.note(reader.at("shell"), "shell", "approximated", "commands run through /bin/sh -c")
    for name, spec in processes.items():
        entries = names[str(name)]
        for number, entry in enumerate(entries):
            one = _with_replica(spec, str(name), number) if _uses_replica(spec) else spec
            if len(entries) > 1:
                one = {k: v for k, v in one.items() if k != "replicas"}
                one["environment"] = [*_as_list(one.get("environment")), f"PC_REPLICA_NUM={number}"]
            draft.instances[entry] = _process(reader, str(name), one, entry, names, glob_env)
            draft.origin((entry,), reader.at("processes", str(name)))
            for key, theirs in _SOURCE_KEYS.items():
                written = [t for t in theirs if ("processes", str(name), t) in lines]
                if written:
                    draft.origin((entry, key), reader.at("processes", str(name), written[0]))
    return Converted(draft.text(output), draft.sorted_notes())
