"""Import supervisord's INI config (``[program:x]``, ``[group:x]``, ``[include]``) as a manifest.

The file is read with Python's configparser set up as supervisord sets it up
(``;`` and ``#`` start inline comments, a repeated section or key is merged, keys
are lower-cased), ``[include]`` is followed from the main file only, and
``%(here)s``, ``%(program_name)s``, ``%(process_num)02d`` … are expanded with
Python's ``%`` operator as supervisord expands them. ``%(ENV_X)s`` is not looked
up now: it becomes the loader's ``${X}``, read when the manifest is loaded, as
supervisord reads it when it starts.
"""

from __future__ import annotations

import configparser
import glob
import itertools
import os
import re
import shlex
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import parse_signal, signal_name
from .notes import Converted, ConvertError, read_source
from .writer import Draft, Interp, instance_name, literal

MAX_PROCS = 1000
MAX_INCLUDED = 1000
_SECTION = re.compile(r"\[(?P<header>.+)\]")
_OPTION = re.compile(r"(?P<option>[^=:\s][^=:]*?)\s*[=:]")
_NUMBER = re.compile(r"-?\d{1,9}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BOOLEANS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}
_RESTART = {"true": "always", "false": "no", "unexpected": "on-failure"}
_DROPPED_SECTIONS = {
    "supervisord": "settings of supervisord itself (but environment=, given to every instance)",
    "unix_http_server": "the control socket is <state_dir>/control.sock (supervisor.control)",
    "inet_http_server": "TCP control is supervisor.control.tcp, with a bearer token",
    "supervisorctl": "the `supervisor` command finds the socket from the manifest",
    "rpcinterface": "the control API is HTTP/JSON; no XML-RPC plugins",
    "eventlistener": "no event listener protocol: follow /v1/events (SSE) instead",
    "fcgi-program": "no FastCGI socket sharing: run the program with its own socket",
}
# Keys of [program:x] read by this converter; every other key is reported as dropped.
_MAPPED = {
    "command", "process_name", "numprocs", "numprocs_start", "priority", "autostart", "autorestart",
    "exitcodes", "startsecs", "startretries", "stopsignal", "stopwaitsecs", "stopasgroup", "killasgroup",
    "user", "umask", "directory", "environment", "redirect_stderr", "stdout_logfile",
    "stdout_logfile_maxbytes", "stdout_logfile_backups", "stderr_logfile", "stderr_logfile_maxbytes",
    "stderr_logfile_backups",
}  # fmt: skip
_WHY_DROPPED = {
    "stdout_capture_maxbytes": "no capture mode",
    "stderr_capture_maxbytes": "no capture mode",
    "stdout_events_enabled": "no log events: follow the log (`supervisor logs -f`)",
    "stderr_events_enabled": "no log events: follow the log (`supervisor logs -f`)",
    "stdout_syslog": "no syslog: point a log shipper at the log file",
    "stderr_syslog": "no syslog: point a log shipper at the log file",
    "serverurl": "no XML-RPC server to point children at",
    "strip_ansi": "logs keep what the program wrote",
}
Where = tuple[str, int | None]
# The supervisord keys a manifest key is made from (the first one given wins), so that a problem
# the loader finds in the converted manifest is reported on the line to change.
_SOURCE_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("command",): ("command",),
    ("cwd",): ("directory",),
    ("env",): ("environment",),
    ("user",): ("user",),
    ("umask",): ("umask",),
    ("stdout",): ("stdout_logfile",),
    ("stderr",): ("redirect_stderr", "stderr_logfile"),
    ("logs", "stdout_file"): ("stdout_logfile",),
    ("logs", "stderr_file"): ("stderr_logfile",),
    ("logs", "max_bytes"): ("stdout_logfile_maxbytes", "stderr_logfile_maxbytes"),
    ("logs", "backups"): ("stdout_logfile_backups", "stderr_logfile_backups"),
    ("restart", "policy"): ("autorestart",),
    ("restart", "success_codes"): ("exitcodes",),
    ("restart", "min_uptime"): ("startsecs",),
    ("restart", "max_restarts"): ("startretries",),
    ("stop", "signal"): ("stopsignal",),
    ("stop", "timeout"): ("stopwaitsecs",),
    ("stop", "group"): ("stopasgroup", "killasgroup"),
    ("depends_on",): ("priority",),
}


def _scan(text: str, file: str, where: dict[tuple[str, str], Where]) -> None:
    """Record the line of each section header and key, as configparser would find them."""
    section = ""
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw[0].isspace() or raw.lstrip()[0] in "#;":
            continue
        if match := _SECTION.match(raw):
            section = match.group("header")
            where.setdefault((section, ""), (file, number))
        elif match := _OPTION.match(raw):
            where[(section, match.group("option").strip().lower())] = (file, number)


def _read_into(parser: configparser.RawConfigParser, text: str, file: str) -> None:
    try:
        parser.read_string(text, source=file)
    except configparser.MissingSectionHeaderError as exc:
        raise ConvertError(file, exc.lineno, "a key before any [section] header") from None
    except configparser.ParsingError as exc:
        line, content = exc.errors[0]
        raise ConvertError(file, line, f"not a [section], a key = value or a comment: {content!r}") from None
    except configparser.Error as exc:
        raise ConvertError(file, getattr(exc, "lineno", None), exc.message) from None


def _parser() -> configparser.RawConfigParser:
    return configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=False)


@dataclass
class _Config:
    """Every file read, merged as supervisord merges them, with the place of each key."""

    main: Path
    parser: configparser.RawConfigParser = field(default_factory=_parser)
    where: dict[tuple[str, str], Where] = field(default_factory=dict)
    here: dict[str, Path] = field(default_factory=dict)

    def at(self, section: str, key: str = "") -> Where:
        return self.where.get((section, key)) or self.where.get(("DEFAULT", key)) or (str(self.main), None)

    def read(self, text: str, file: Path) -> None:
        before = set(self.parser.sections())
        _read_into(self.parser, text, str(file))
        _scan(text, str(file), self.where)
        for section in set(self.parser.sections()) - before:
            self.here[section] = file.resolve().parent


def _include(config: _Config, draft: Draft, read: Callable[[Path], str]) -> None:
    """Read the files the main file's ``[include] files`` names, as supervisord does: globbed, sorted."""
    if not config.parser.has_section("include"):
        return
    line = config.at("include", "files")
    if not config.parser.has_option("include", "files"):
        raise ConvertError(*config.at("include"), "[include] has no files setting")
    base = config.main.resolve().parent
    seen = {config.main.resolve()}
    value = config.parser.get("include", "files")
    patterns = _expand(value, {"here": str(base)}, line, environ=True).split()
    count = 0
    for pattern in patterns:
        matches = sorted(glob.glob(str(base / pattern)))
        if not matches:
            draft.note(line, "include.files", "dropped", f"no file matches {pattern!r}")
        for name in matches:
            path = Path(name).resolve()
            if path in seen:
                raise ConvertError(*line, f"include loop: {pattern!r} includes {name} again")
            seen.add(path)
            count += 1
            if count > MAX_INCLUDED:
                raise ConvertError(*line, f"more than {MAX_INCLUDED} included files")
            text = read(path)
            nested = _parser()
            _read_into(nested, text, str(path))
            if nested.has_section("include"):
                inner: dict[tuple[str, str], Where] = {}
                _scan(text, str(path), inner)
                inner_line = inner.get(("include", "files")) or inner[("include", "")]
                for inner_pattern in nested.get("include", "files", fallback="").split():
                    if config.main.resolve() in {
                        Path(p).resolve() for p in glob.glob(str(path.parent / inner_pattern))
                    }:
                        raise ConvertError(
                            *inner_line, f"include loop: {inner_pattern!r} includes {config.main}"
                        )
                draft.note(
                    inner_line, "[include]", "dropped", "supervisord reads [include] in the main file only"
                )
                text = _without_section(text, "include")
            config.read(text, path)


def _without_section(text: str, name: str) -> str:
    """``text`` with the section ``[name]`` blanked out, line numbers kept."""
    out, skipping = [], False
    for raw in text.splitlines():
        if match := _SECTION.match(raw):
            skipping = match.group("header") == name
        out.append("" if skipping else raw)
    return "\n".join(out)


class _Expansions(dict[str, Any]):
    """supervisord's expansion names; ``ENV_X`` becomes a placeholder that turns into ``${X}``."""

    def __init__(self, names: dict[str, Any], refs: list[str], environ: bool) -> None:
        super().__init__(names)
        self.refs = refs
        self.environ = environ

    def __missing__(self, key: str) -> Any:
        if key.startswith("ENV_") and _ENV_NAME.fullmatch(key[4:]):
            if self.environ:
                if key[4:] in os.environ:
                    return os.environ[key[4:]]
                raise KeyError(key)
            self.refs.append(key[4:])
            return f"\x00{len(self.refs) - 1}\x00"  # no NUL gets this far: convert() refuses them
        raise KeyError(key)


def _expand(value: str, names: dict[str, Any], where: Where, *, environ: bool = False) -> str:
    """``value % names`` as supervisord computes it; ``%(ENV_X)s`` left as ``${X}`` (an Interp)."""
    refs: list[str] = []
    try:
        out = value % _Expansions(names, refs, environ)
    except KeyError as exc:
        known = ", ".join(sorted({*names, "ENV_<NAME>"}))
        raise ConvertError(
            *where, f"%({exc.args[0]})s cannot be expanded; supervisord knows {known}"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ConvertError(
            *where, f"badly formatted %-expansion in {value!r}: {exc} (a literal % is %%)"
        ) from None
    if not refs:
        return out
    parts = out.split("\x00")
    return Interp(
        "".join(literal(p) if i % 2 == 0 else "${" + refs[int(p)] + "}" for i, p in enumerate(parts))
    )


def _boolean(value: str, where: Where, key: str) -> bool:
    try:
        return _BOOLEANS[value.strip().lower()]
    except KeyError:
        raise ConvertError(*where, f"{key}: expected true or false, got {value!r}") from None


def _integer(value: str, where: Where, key: str, low: int = 0, high: int = 10**9) -> int:
    text = value.strip()
    if not _NUMBER.fullmatch(text) or not low <= int(text) <= high:
        raise ConvertError(*where, f"{key}: expected a whole number from {low} to {high}, got {value!r}")
    return int(text)


def _size(value: str, where: Where, key: str) -> int:
    match = re.fullmatch(r"\s*(\d{1,15})\s*(kb|mb|gb)?\s*", value.lower())
    if not match:
        raise ConvertError(*where, f"{key}: expected a size such as 1024, 50MB or 1GB, got {value!r}")
    return int(match.group(1)) * {None: 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}[match.group(2)]


def parse_environment(value: str, where: Where) -> dict[str, str]:
    """supervisord's ``KEY="value",KEY2=value2``: shlex tokens in threes, commas between, quotes stripped."""
    lexer = shlex.shlex(value)
    lexer.wordchars += "/.+-():"
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise ConvertError(*where, f"environment: {exc} in {value!r}") from None
    env: dict[str, str] = {}
    for start in range(0, len(tokens), 4):
        key_eq_value = tokens[start : start + 3]
        if len(key_eq_value) != 3 or key_eq_value[1] != "=":
            raise ConvertError(
                *where, f"environment: expected KEY=value pairs separated by commas in {value!r}"
            )
        env[key_eq_value[0]] = key_eq_value[2].strip("'\"")
    return env


@dataclass
class _Program:
    """One ``[program:x]`` section being read: its keys, its place, its expansion names."""

    config: _Config
    section: str
    name: str
    group: str

    def has(self, key: str) -> bool:
        return self.config.parser.has_option(self.section, key)

    def raw(self, key: str) -> str:
        return self.config.parser.get(self.section, key)

    def at(self, key: str = "") -> Where:
        return self.config.at(self.section, key)

    def names(self, num: int, numprocs: int) -> dict[str, Any]:
        return {
            "here": str(self.config.here.get(self.section, self.config.main.resolve().parent)),
            "program_name": self.name,
            "group_name": self.group,
            "host_node_name": socket.gethostname(),
            "process_num": num,
            "numprocs": numprocs,
        }

    def get(self, key: str, num: int, numprocs: int) -> str:
        return _expand(self.raw(key), self.names(num, numprocs), self.at(key))


def _stream(program: _Program, draft: Draft, spec: dict[str, Any], which: str, num: int, n: int) -> None:
    """stdout_logfile / stderr_logfile: AUTO is the captured log, NONE /dev/null, a path the log file."""
    key = f"{which}_logfile"
    if not program.has(key):
        return
    value = program.get(key, num, n)
    lowered = value.strip().lower()
    if lowered in ("auto", ""):
        return
    if lowered in ("none", "off"):
        spec[which] = None
    elif lowered == "syslog":
        draft.note(program.at(key), key, "dropped", "no syslog: the output goes to the instance's log")
    else:
        spec.setdefault("logs", {})[f"{which}_file"] = value


def _logs(program: _Program, draft: Draft, spec: dict[str, Any], first: bool) -> None:
    """Rotation: one size and one count per instance, taken from stdout's keys (else stderr's)."""
    for setting, ours in (("maxbytes", "max_bytes"), ("backups", "backups")):
        values = {}
        for which in ("stdout", "stderr"):
            key = f"{which}_logfile_{setting}"
            if program.has(key):
                where = program.at(key)
                raw = program.raw(key)
                values[which] = _size(raw, where, key) if setting == "maxbytes" else _integer(raw, where, key)
        if not values:
            continue
        chosen = values.get("stdout", values.get("stderr"))
        spec.setdefault("logs", {})[ours] = chosen
        if len(set(values.values())) > 1 and first:
            key = f"stderr_logfile_{setting}"
            draft.note(program.at(key), key, "approximated", f"one {ours} for both logs: stdout's {chosen}")


def _instance(program: _Program, draft: Draft, num: int, numprocs: int, first: bool) -> dict[str, Any]:
    """The manifest entry for process number ``num`` of a program."""
    spec: dict[str, Any] = {}
    if not program.has("command"):
        raise ConvertError(*program.at(), f"[{program.section}] has no command")
    command = program.get("command", num, numprocs)
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ConvertError(*program.at("command"), f"cannot split the command: {exc}") from None
    if not words:
        raise ConvertError(*program.at("command"), "the command is empty")
    spec["command"] = command

    def text(key: str) -> str:
        return program.get(key, num, numprocs)

    if program.has("directory"):
        spec["cwd"] = text("directory")
    if program.has("environment"):
        names = program.names(num, numprocs)
        pairs = parse_environment(program.raw("environment"), program.at("environment"))
        spec["env"] = {
            str(_expand(k, names, program.at("environment"))): _expand(v, names, program.at("environment"))
            for k, v in pairs.items()
        }
    if program.has("user"):
        spec["user"] = text("user")
    if program.has("umask"):
        value = text("umask").strip()
        if not re.fullmatch(r"0?[0-7]{1,3}", value):
            raise ConvertError(*program.at("umask"), f"umask: expected octal such as 022, got {value!r}")
        spec["umask"] = f"{int(value, 8):03o}"
    if program.has("autostart") and not _boolean(text("autostart"), program.at("autostart"), "autostart"):
        spec["autostart"] = False
    if program.has("redirect_stderr") and _boolean(
        text("redirect_stderr"), program.at("redirect_stderr"), "redirect_stderr"
    ):
        spec["stderr"] = "stdout"
        if program.has("stderr_logfile") and first:
            draft.note(program.at("stderr_logfile"), "stderr_logfile", "dropped", "stderr goes to stdout")
    _stream(program, draft, spec, "stdout", num, numprocs)
    if spec.get("stderr") != "stdout":
        _stream(program, draft, spec, "stderr", num, numprocs)
    _logs(program, draft, spec, first)
    spec["restart"] = _restart(program)
    spec["stop"] = _stop(program, draft, first)
    return spec


def _restart(program: _Program) -> dict[str, Any]:
    restart: dict[str, Any] = {"policy": "on-failure"}
    if program.has("autorestart"):
        value = program.raw("autorestart").strip().lower()
        if value not in _RESTART:
            raise ConvertError(
                *program.at("autorestart"), f"autorestart: expected true, false or unexpected, got {value!r}"
            )
        restart["policy"] = _RESTART[value]
    if program.has("exitcodes"):
        where = program.at("exitcodes")
        codes = [
            _integer(c, where, "exitcodes", 0, 255) for c in program.raw("exitcodes").split(",") if c.strip()
        ]
        restart["success_codes"] = codes
    if program.has("startsecs"):
        restart["min_uptime"] = f"{_integer(program.raw('startsecs'), program.at('startsecs'), 'startsecs')}s"
    retries = 3
    if program.has("startretries"):  # the same meaning: failed starts in a row
        retries = _integer(program.raw("startretries"), program.at("startretries"), "startretries")
    restart["max_restarts"] = retries
    restart["backoff"] = {"initial": "1s", "factor": 2.0}
    return restart


def _stop(program: _Program, draft: Draft, first: bool) -> dict[str, Any]:
    stop: dict[str, Any] = {}
    if program.has("stopsignal"):
        raw = program.raw("stopsignal")
        try:
            stop["signal"] = signal_name(parse_signal(raw)).removeprefix("SIG")
        except ValueError as exc:
            raise ConvertError(*program.at("stopsignal"), f"stopsignal: {exc}") from None
    if program.has("stopwaitsecs"):
        stop["timeout"] = (
            f"{_integer(program.raw('stopwaitsecs'), program.at('stopwaitsecs'), 'stopwaitsecs')}s"
        )
    stop_group = program.has("stopasgroup") and _boolean(
        program.raw("stopasgroup"), program.at("stopasgroup"), "stopasgroup"
    )
    kill_group = stop_group
    if program.has("killasgroup"):
        kill_group = _boolean(program.raw("killasgroup"), program.at("killasgroup"), "killasgroup")
    stop["group"] = stop_group or kill_group
    if kill_group and not stop_group and first:
        draft.note(
            program.at("killasgroup"), "killasgroup", "approximated",
            "group: true sends the stop signal to the whole group too, not only SIGKILL",
        )  # fmt: skip
    return stop


def _groups(config: _Config, draft: Draft) -> dict[str, str]:
    """Program name → its ``[group:x]``; the groups themselves have no counterpart and are reported."""
    owner: dict[str, str] = {}
    for section in config.parser.sections():
        if not section.startswith("group:"):
            continue
        group = section.split(":", 1)[1]
        programs = [
            p.strip() for p in config.parser.get(section, "programs", fallback="").split(",") if p.strip()
        ]
        for name in programs:
            owner[name] = group
        draft.note(
            config.at(section), f"[{section}]", "dropped",
            f"no groups: {', '.join(programs) or 'no programs'} stay separate instances; "
            "select them together by name or glob",
        )  # fmt: skip
    return owner


def _numprocs(program: _Program) -> tuple[int, int]:
    numprocs = 1
    if program.has("numprocs"):
        numprocs = _integer(program.raw("numprocs"), program.at("numprocs"), "numprocs", 1, MAX_PROCS)
    start = 0
    if program.has("numprocs_start"):
        start = _integer(
            program.raw("numprocs_start"), program.at("numprocs_start"), "numprocs_start", 0, 10**6
        )
    if numprocs > 1:
        process_name = program.raw("process_name") if program.has("process_name") else "%(program_name)s"
        if "process_num" not in process_name:
            raise ConvertError(
                *program.at("process_name" if program.has("process_name") else "numprocs"),
                "numprocs > 1 needs %(process_num)s in process_name, as supervisord requires",
            )
    return numprocs, start


def _convert_program(program: _Program, draft: Draft) -> list[tuple[str, dict[str, Any]]]:
    """The entries of one program: one with replicas, or one per process where a key differs by number."""
    numprocs, start = _numprocs(program)
    nums = range(start, start + numprocs)
    specs = [_instance(program, draft, num, numprocs, first=(num == start)) for num in nums]
    process_names = [
        program.get("process_name", num, numprocs) if program.has("process_name") else program.name
        for num in nums
    ]
    for key in sorted(program.config.parser.options(program.section)):
        if key not in _MAPPED:
            why = _WHY_DROPPED.get(key, "not a key this converter knows")
            draft.note(program.at(key), key, "dropped", why)
    base = instance_name(program.name)
    if numprocs == 1:
        name = instance_name(process_names[0])
        if name != process_names[0]:
            draft.note(program.at("process_name"), "process_name", "approximated", f"named {name!r}")
        return [(name, specs[0])]
    if all(spec == specs[0] for spec in specs):
        spec = {**specs[0], "replicas": numprocs}
        draft.comment(
            (base, "replicas"),
            f"numprocs={numprocs}: named {base}-0 … {base}-{numprocs - 1} "
            f"(supervisord: {process_names[0]} … {process_names[-1]})",
        )
        return [(base, spec)]
    draft.note(
        program.at("numprocs"), "numprocs", "approximated",
        f"{numprocs} separate instances: %(process_num)s changes more than the process name",
    )  # fmt: skip
    return [(instance_name(name), spec) for name, spec in zip(process_names, specs, strict=True)]


def _order_by_priority(draft: Draft, priorities: dict[str, tuple[int, Where]]) -> None:
    """supervisord starts lower priorities first: each tier depends on the one before it (started)."""
    autostarted = {n: p for n, p in priorities.items() if draft.instances[n].get("autostart", True)}
    tiers = sorted({p for p, _ in autostarted.values()})
    for previous, current in itertools.pairwise(tiers):
        before = sorted(n for n, (p, _) in autostarted.items() if p == previous)
        for name, (priority, _) in autostarted.items():
            if priority == current:
                draft.instances[name]["depends_on"] = dict.fromkeys(before, "started")
                draft.comment((name, "depends_on"), f"priority={priority}: started after priority {previous}")


def _service_environment(config: _Config, draft: Draft) -> None:
    """[supervisord] environment= reaches every child: merged under each instance's own env."""
    if not config.parser.has_option("supervisord", "environment"):
        return
    where = config.at("supervisord", "environment")
    names = {"here": str(config.here.get("supervisord", config.main.resolve().parent))}
    pairs = parse_environment(config.parser.get("supervisord", "environment"), where)
    env = {str(_expand(k, names, where)): _expand(v, names, where) for k, v in pairs.items()}
    for name, spec in draft.instances.items():
        spec["env"] = {**env, **spec.get("env", {})}
        draft.comment(
            (name, "env"), "with [supervisord] environment=, as supervisord passes it to every program"
        )


def convert(text: str, source: Path, output: Path, read: Callable[[Path], str] = read_source) -> Converted:
    """supervisord's config ``text`` (from ``source``) as a manifest to be written at ``output``."""
    if "\0" in text:
        raise ConvertError(
            source, text.count("\n", 0, text.index("\0")) + 1, "a NUL byte: this is not a text file"
        )
    config = _Config(source)
    draft = Draft(source, "supervisord", "[program:x] section")
    config.read(text, source)
    _include(config, draft, read)
    owner = _groups(config, draft)
    priorities: dict[str, tuple[int, Where]] = {}
    for section in config.parser.sections():
        kind, _, name = section.partition(":")
        if kind == "program":
            if not name:
                raise ConvertError(*config.at(section), "[program:] needs a name")
            program = _Program(config, section, name, owner.get(name, name))
            priority = 999
            if program.has("priority"):
                priority = _integer(
                    program.raw("priority"), program.at("priority"), "priority", -(10**6), 10**6
                )
            for entry, spec in _convert_program(program, draft):
                if entry in draft.instances:
                    raise ConvertError(*program.at(), f"two programs become the instance {entry!r}")
                draft.instances[entry] = spec
                priorities[entry] = (priority, program.at("priority"))
                draft.origin((entry,), program.at())
                for key, theirs in _SOURCE_KEYS.items():
                    written = [t for t in theirs if program.has(t)]
                    if written:
                        draft.origin((entry, *key), program.at(written[0]))
        elif kind in _DROPPED_SECTIONS:
            draft.note(config.at(section), f"[{section}]", "dropped", _DROPPED_SECTIONS[kind])
        elif kind not in ("include", "group"):
            draft.note(config.at(section), f"[{section}]", "dropped", "not a section supervisord knows")
    if len(draft.instances) > MAX_PROCS:
        raise ConvertError(source, None, f"more than {MAX_PROCS} instances")
    _order_by_priority(draft, priorities)
    _service_environment(config, draft)
    return Converted(draft.text(output), draft.sorted_notes())
