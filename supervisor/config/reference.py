"""The manifest reference, ``docs/manifest.md``, rendered from the models.

    python -m supervisor.config.reference > docs/manifest.md

Every table row is a model field: its key path, a type in words, the default as a person
writes it (``100ms``, ``50MB``, ``TERM``) and the field's description. A field without a
description is an error here, not a blank cell. The examples of units, interpolation, streams
and names are computed by the code that parses them, so the page cannot promise what the
loader does not do; tests/test_config.py checks that the shipped page is what this renders.
"""

from __future__ import annotations

import textwrap
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from . import checks, models, records, units
from .loader import ManifestError, parse_manifest, settled
from .records import as_data
from .reference_words import (
    _CONDITIONS,
    _annotation,
    _default_text,
    _doc,
    _join,
    _meaning,
    _nested,
    _stream_kinds,
    _table,
    _type_text,
    _validator,
)

__all__ = ["render"]

# -- the walk over the models -------------------------------------------------------------------


def _sections(
    model: type[BaseModel] = models.Manifest, path: str = ""
) -> Iterator[tuple[str, type[BaseModel]]]:
    """Each model with the key path it sits at, depth first, in the order of its fields."""
    yield path, model
    for name, field in model.model_fields.items():
        nested = _nested(_annotation(field))
        if nested is not None:
            yield from _sections(nested[0], _join(path, name) + nested[1])


def _keys_section(path: str, model: type[BaseModel]) -> list[str]:
    title = f"`{path}`" if path else "Top level"
    rows = []
    for name, field in model.model_fields.items():
        tp = _annotation(field)
        key = _join(path, field.alias or name)
        rows.append([f"`{key}`", _type_text(tp, key), _default_text(field, tp), _meaning(model, name, field)])
    return [f"### {title}", "", _doc(model), "", *_table(["key", "type", "default", "meaning"], rows)]


# -- examples, computed by the loader itself ------------------------------------------------------

_EXAMPLE_FILE = Path("/srv/app/supervisor.yaml")


def _load(text: str, environ: dict[str, str] | None = None) -> records.Manifest | ManifestError:
    try:
        return parse_manifest(text, _EXAMPLE_FILE, environ or {})
    except ManifestError as exc:
        return exc


def _with_instance(lines: str, environ: dict[str, str] | None = None) -> records.Manifest | ManifestError:
    body = textwrap.indent(lines, "    ")
    return _load(f"version: 1\ninstances:\n  web:\n    command: run-web\n{body}\n", environ)


def _shown_path(path: str) -> str:
    """A resolved path as it would read with the manifest in /srv/app, wherever the docs are built."""
    base = str(_EXAMPLE_FILE.resolve().parent)
    return "/srv/app" + path[len(base) :] if path.startswith(base) else path


def _refusal(result: records.Manifest | ManifestError, what: str) -> str:
    if not isinstance(result, ManifestError):
        raise AssertionError(f"the reference says {what} is refused, but it loads")
    return "refused: " + result.problems[0].message


def _accepts(result: records.Manifest | ManifestError, what: str) -> records.Manifest:
    if isinstance(result, ManifestError):
        raise AssertionError(f"the reference shows {what}, but it does not load:\n{result}")
    return result


def _parsed(parse: Callable[[Any], Any], show: Callable[[Any], str], value: Any) -> str:
    try:
        return show(parse(value))
    except ValueError as exc:
        return f"refused: {exc}"


def _written(value: Any) -> str:
    """A sample as it is written in YAML: quoted where YAML would otherwise read a number."""
    if not isinstance(value, str):
        return f"`{value}` (a YAML number)"
    return f"`{value}`" if isinstance(yaml.safe_load(value), str) else f"`'{value}'` (a string)"


def _units_section() -> list[str]:
    out = ["## Values", ""]
    out += [
        "### Durations",
        "",
        "A number with a unit: `ms`, `s`, `m` (minutes), `h` or `d`; parts add up (`1h30m`),",
        "decimals are fine (`1.5s`), case and spaces are not significant. A bare number, or a",
        "string of digits, is seconds. Negative durations are refused. Where the service writes",
        "a duration back (a dumped manifest, the defaults here), it uses seconds, or milliseconds",
        "below one second.",
        "",
    ]
    samples: list[Any] = ["250ms", "30s", "2m", "1h", "1h30m", "1.5s", "2d", 90, "90", "1 h"]
    samples += [-5, "10 parsecs"]

    def duration(seconds: float) -> str:
        return f"{seconds:g} (`{units.format_duration(seconds)}`)"

    out += _table(
        ["you write", "seconds (written back)"],
        [[_written(v), _parsed(units.parse_duration, duration, v)] for v in samples],
    )
    out += [
        "### Sizes",
        "",
        "A whole number of bytes, or a number with a unit: `B`; `K`, `KB`, `KiB`; `M`, `MB`,",
        "`MiB`; `G`, `GB`, `GiB` (any case, a space allowed). K, M and G are powers of 1024",
        "whichever spelling is used; a fraction of a byte is dropped.",
        "",
    ]
    samples = [4096, "512KB", "512k", "50MB", "50 MiB", "1GB", "1.5MB", "12XB", 1.5]
    out += _table(
        ["you write", "bytes"],
        [[_written(v), _parsed(units.parse_size, str, v)] for v in samples],
    )
    out += [
        "### Signals",
        "",
        "A name with or without `SIG`, in any case, or a number; it must exist on the system that",
        "loads the manifest. The defaults on this page are shown without `SIG`.",
        "",
    ]
    samples = ["TERM", "SIGTERM", "sigint", "HUP", 9, "15", "SIGBOGUS", 0]
    out += _table(
        ["you write", "signal"],
        [
            [_written(v), _parsed(units.parse_signal, lambda n: f"{n} (`{units.signal_name(n)}`)", v)]
            for v in samples
        ],
    )

    def umask(text: str) -> str:
        mask = _accepts(_with_instance(f"umask: {text}"), f"umask: {text}").instances["web"].umask
        return f"`{mask:03o}`"

    quoted = "'027'"

    out += [
        "### Umask",
        "",
        "Octal digits, as a shell's `umask` reads them, quoted or not: the loader takes the digits as",
        f"written (`umask: 022` is {umask('022')}, `umask: 27` is {umask('27')}, `umask: {quoted}` is",
        f"{umask(quoted)}, `umask: 0o7` is {umask('0o7')}); 8 and 9 are refused.",
        "",
    ]
    return out


def _interpolation_section() -> list[str]:
    environ = {"PORT": "8080", "EMPTY": ""}
    samples = [
        "${PORT}",
        "${HOST:-127.0.0.1}",
        "${PORT:-80}",
        "${EMPTY}",
        "${EMPTY:-fallback}",
        "${EMPTY-fallback}",
        "${HOST-127.0.0.1}",
        "$${PORT}",
        "cost: $$5",
        "$HOME",
        "${MISSING}",
        "${1NAME}",
    ]
    rows = []
    for text in samples:
        result = _with_instance(f"env: {{X: '{text}'}}", environ)
        if isinstance(result, ManifestError):
            shown = _refusal(result, text)
        else:
            value = result.instances["web"].env["X"]
            shown = f"`{value}`" if value else "(empty)"
        rows.append([f"`{text}`", shown])
    replicas = _accepts(_with_instance("replicas: ${N}", {"N": "3"}), "replicas: ${N}").instances["web"]
    return [
        "## Interpolation",
        "",
        "Every string in the file, keys included, is interpolated from the environment of the",
        "process that reads the manifest (`supervisor run` and its reloads, `supervisor",
        "validate`) before it is validated: `replicas: ${N}` with `N=3` gives"
        f" `{replicas.replicas}` replicas.",
        "",
        "- `${NAME}`: the variable's value. Unset is an error (set but empty is an empty string).",
        "- `${NAME:-default}`: the default when the variable is unset *or empty*; the default",
        "  cannot contain `}`.",
        "- `${NAME-default}`: the default only when the variable is unset, as in a shell.",
        "- `$$`: a literal `$`. A `$` followed by anything but `{` or `$` is kept as it is, so",
        "  `$HOME` reaches the program (or its shell) unchanged.",
        "- NAME is letters, digits and `_`, not starting with a digit. The result is not",
        "  interpolated again.",
        "",
        "With `PORT=8080` and `EMPTY=` (set, empty) in the environment, `env: {X: '...'}` gives:",
        "",
        *_table(["you write", "X is"], rows),
    ]


def _streams_section() -> list[str]:
    fields = models.InstanceConfig.model_fields
    names = ["stdin", "stdout", "stderr"]
    accepted = {name: _stream_kinds(_annotation(fields[name])) for name in names}
    defaults = {name: fields[name].get_default().kind for name in names}
    members = {m.model_fields["kind"].default: m for m in typing.get_args(models.StreamSpec)}
    forms = {
        "log": "`log`",
        "null": "`null`, `~`, or nothing after the colon",
        "inherit": "`inherit`",
        "file": "a path, or `{file: PATH, mode: truncate}`",
        "fifo": "`{fifo: PATH}`",
        "stdout": "`stdout`",
    }
    if set(forms) != set(members):
        raise AssertionError(f"stream kinds changed: {sorted(members)}; update the forms in reference.py")
    kinds_rows = []
    for kind, member in members.items():
        where = ["default" if defaults[n] == kind else "yes" if kind in accepted[n] else "no" for n in names]
        kinds_rows.append([f"`{kind}`", forms[kind], *where, _doc(member)])

    examples = [
        "stdout: log",
        "stdin: null",
        "stdin:",
        "stdout: inherit",
        "stdout: logs/web.out",
        "stdout: /var/log/web.out",
        "stdout: {file: logs/web.out, mode: truncate}",
        "stdin: {fifo: run/web.in}",
        "stderr: stdout",
        "stdout: {kind: file, path: web.out}",
    ]
    example_rows = []
    for line in examples:
        key = line.split(":", 1)[0]
        config = _accepts(_with_instance(line), line).instances["web"]
        dumped = as_data(getattr(config, key))
        if "path" in dumped:
            dumped["path"] = _shown_path(dumped["path"])
        example_rows.append([f"`{line}`", "`{" + ", ".join(f"{k}: {v}" for k, v in dumped.items()) + "}`"])
    for line in ["stdout: stdout", "stdin: log", "stdout: {mode: truncate}"]:
        example_rows.append([f"`{line}`", _refusal(_with_instance(line), line)])

    key_rows = []
    for kind, member in members.items():
        for name, field in member.model_fields.items():
            tp = _annotation(field)
            key = f"instances.NAME.STREAM.{name}"
            default = "required" if name == "kind" else _default_text(field, tp)
            key_rows.append(
                [f"`{key}`", f"`{kind}`", _type_text(tp, key), default, _meaning(member, name, field)]
            )
    return [
        "### Streams: `stdin`, `stdout`, `stderr`",
        "",
        "Each of an instance's standard streams is one of these kinds. The short forms are what",
        "a person writes; the long form `{kind: KIND, ...}` is accepted too, and is how a stream",
        "is written back. A string that is not a kind's name is a path to a file.",
        "",
        *_table(["kind", "short forms", "stdin", "stdout", "stderr", "meaning"], kinds_rows),
        "The keys of the mapping forms (STREAM is `stdin`, `stdout` or `stderr`):",
        "",
        *_table(["key", "kind", "type", "default", "meaning"], key_rows),
        "What the loader makes of each form (the manifest in /srv/app):",
        "",
        *_table(["you write", "it is"], example_rows),
        "`stderr: stdout` makes fd 2 the same file description as fd 1, like `2>&1`; only stderr",
        "can be merged. An empty path, or a stdin file or fifo that does not exist when the",
        "program starts, is *not set up*: stdin then reads /dev/null, output goes to the",
        "instance's log (and a warning is logged). An output file is created when missing; its",
        "folder must exist.",
        "",
    ]


def _dependencies_section() -> list[str]:
    values = list(typing.get_args(checks.DependencyConditionName))
    if set(values) != set(_CONDITIONS):
        raise AssertionError(f"conditions changed: {values}; update _CONDITIONS in reference.py")
    listed = _load(
        "version: 1\ninstances:\n  db: {command: run-db}\n  web: {command: run-web, depends_on: [db]}\n"
    )
    as_list = _accepts(listed, "depends_on: [db]").instances["web"].depends_on
    shown = "{" + ", ".join(f"{k}: {v.condition}" for k, v in as_list.items()) + "}"
    cycle = _load(
        "version: 1\ninstances:\n"
        "  a: {command: x, depends_on: [b]}\n  b: {command: x, depends_on: {a: completed}}\n"
    )
    unknown = _load("version: 1\ninstances:\n  web: {command: x, depends_on: [dbb]}\n  db: {command: x}\n")
    return [
        "### Dependency conditions",
        "",
        "`depends_on` names other instances by their manifest name (not a replica's name), as a",
        f"list (`depends_on: [db]` is `{shown}`) or as a mapping of name to condition",
        "(`depends_on: {db: ready}`), or of name to `{condition, restart}`. The loader refuses",
        "an unknown name, an instance that depends on itself, a `completed` condition on an",
        "instance that always restarts, and a cycle, which it names:",
        "",
        f"- `{_refusal(cycle, 'a cycle')}`",
        f"- `{_refusal(unknown, 'an unknown dependency')}`",
        "",
        "How an instance waits (the `waiting` state), what `blocked` means and how stops are",
        "ordered:",
        "[guide.md](guide.md#dependencies-readiness-and-health).",
        "",
        *_table(["condition", "waits until"], [[f"`{v}`", _CONDITIONS[v]] for v in values]),
    ]


def _paths_section() -> list[str]:
    keys = []
    for path, model in _sections():
        for name, field in model.model_fields.items():
            if _validator(_annotation(field)) is models._relative_to_manifest:
                keys.append(f"`{_join(path, name)}`")
    keys.append("the `file` and `fifo` paths of streams")
    config = _accepts(_with_instance("cwd: app"), "cwd: app").instances["web"]
    cwd = _shown_path(config.cwd or "")
    return [
        "## Paths",
        "",
        "A relative path is resolved at load time against the folder that holds the manifest",
        "(after resolving symlinks in the manifest's own path), never against the folder the",
        f"service was started in: with the manifest in /srv/app, `cwd: app` is `{cwd}`. A leading",
        "`~` is expanded; an absolute path is kept; an empty path stays empty (for a stream: not",
        "set up). This holds for:",
        "",
        *(f"- {key}" for key in keys),
        "",
    ]


def _names_section() -> list[str]:
    samples = ["web", "worker_2", "api.v1", "8080", "db-primary", "Web", "-web", "my app", "a/b", "_x"]
    rows = []
    for name in samples:  # written unquoted, as keys usually are
        loaded = _load(f"version: 1\ninstances:\n  {name}: {{command: x}}\n")
        rows.append([f"`{name}`", "no" if isinstance(loaded, ManifestError) else "yes"])
    three = settled(models.InstanceConfig(command="run", replicas=3)).replica_names("worker")
    one = settled(models.InstanceConfig(command="run")).replica_names("worker")
    clash = _load("version: 1\ninstances:\n  web: {command: x, replicas: 2}\n  web-1: {command: y}\n")
    bad = _load("version: 1\ninstances:\n  Web: {command: x}\n")
    return [
        "## Instance names and replicas",
        "",
        f"An instance's name (its key under `instances`) matches `{models.INSTANCE_NAME_PATTERN}`:",
        "lower-case letters and digits, then also `_`, `.` and `-`. A key is read as the text",
        "written, so `8080:` is the name `8080`, not a number.",
        "",
        *_table(["name", "accepted"], rows),
        f"`{_refusal(bad, 'Web')}`",
        "",
        f"With `replicas: 1` the one process is named after the instance ({', '.join(one)}); with more",
        f"they are numbered from 0 (`replicas: 3` gives {', '.join(three)}); `replicas: 0` runs",
        "none. A replica name may not be another instance's name:",
        f"`{_refusal(clash, 'a replica name clash')}`.",
        "",
    ]


def _errors_section() -> list[str]:
    text = (
        "version: 1\n"
        "instances:\n"
        "  web:\n"
        "    command: run-web\n"
        "    resart: {policy: always}\n"
        "    stop: {timeout: 10 parsecs}\n"
        "  db:\n"
        "    command: [postgres]\n"
        "    replicas: many\n"
    )
    try:
        parse_manifest(text, Path("supervisor.yaml"), {})
    except ManifestError as exc:
        shown = str(exc)
    else:
        raise AssertionError("the example of errors loads")
    return [
        "## Errors",
        "",
        "Every mapping refuses keys it does not know (with a suggestion when one is close), and a",
        "key given twice. The loader reports every problem at once, in file order, each with",
        "file:line:column and key path; `supervisor validate` prints them and exits 1, and a",
        "reload with errors changes nothing. For this manifest:",
        "",
        "```yaml",
        *text.splitlines(),
        "```",
        "",
        "```",
        *shown.splitlines(),
        "```",
        "",
    ]


_EXAMPLE = """\
version: 1
supervisor:
  logs: {max_bytes: 10MB, backups: 3}
instances:
  web:
    command: python3 -m http.server ${PORT:-8765} --bind 127.0.0.1
    restart: {policy: always, min_uptime: 2s}
    stop: {signal: INT, timeout: 5s}
  worker:
    command: ["python3", "worker.py"]
    replicas: 2
    stderr: stdout
    depends_on: [web]
"""


def render() -> str:
    """The whole reference page, as Markdown."""
    _accepts(_load(_EXAMPLE), "the example manifest")
    out = [
        "# Manifest reference",
        "",
        "<!-- Generated from supervisor/config/models.py by"
        " `python -m supervisor.config.reference > docs/manifest.md`: do not edit by hand. -->",
        "",
        "A manifest is a YAML file that declares the instances one `supervisor run` keeps alive.",
        "This page lists every key it may hold, with its type, its default and its meaning, then",
        "the rules that hold everywhere: how durations, sizes and signals are written,",
        "`${VAR}` interpolation, how paths are resolved, and what an instance may be named.",
        "Every key is optional except `version` and each instance's `command`; a key the models",
        "do not know is an error, found at load time with its line and column.",
        "",
        "```yaml",
        *_EXAMPLE.splitlines(),
        "```",
        "",
        "## Keys",
        "",
    ]
    for path, model in _sections():
        out += _keys_section(path, model)
    out += _streams_section()
    out += _dependencies_section()
    out += _units_section()
    out += _interpolation_section()
    out += _paths_section()
    out += _names_section()
    out += _errors_section()
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
