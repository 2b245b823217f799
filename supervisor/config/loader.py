"""Load a manifest from YAML, and report every problem in it at once.

PyYAML composes the document into nodes that carry their line and column;
we build the plain data from those nodes ourselves, keeping a map from each
key path to where it was written. Pydantic then validates the data, and each
of its errors is put back at the place in the file it came from. Checks that
span instances (dependencies, cycles, name clashes) run on the raw data too,
so that they are reported even when a field elsewhere is wrong.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .models import INSTANCE_NAME_PATTERN, Manifest

KeyPath = tuple[str | int, ...]

# $$ | ${NAME} | ${NAME:-default} (unset or empty) | ${NAME-default} (unset only) | ${anything else}
_INTERPOLATION = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)-([^}]*))?\}|\{([^}]*)\})")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a manifest, with where it is and what was expected."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestError(Exception):
    """The manifest cannot be used; ``problems`` lists every reason, each with its place."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = len(problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the manifest:"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


@dataclass
class _Source:
    """YAML turned into plain data, with the place of every key and value."""

    file: str
    values: dict[KeyPath, tuple[int, int]]
    keys: dict[KeyPath, tuple[int, int]]
    problems: list[Problem]
    environ: Mapping[str, str]

    def problem(self, path: KeyPath, message: str, *, at_key: bool = False) -> None:
        line, column = self.locate(path, at_key=at_key)
        self.problems.append(Problem(self.file, line, column, _dotted(path), message))

    def locate(self, path: KeyPath, *, at_key: bool = False) -> tuple[int | None, int | None]:
        table = self.keys if at_key else self.values
        for end in range(len(path), -1, -1):
            place = table.get(path[:end]) or self.values.get(path[:end])
            if place:
                return place
        return None, None

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            _CONSTRUCTOR.flatten_mapping(node)  # `<<: *anchor` pairs first, so written keys win
            data: dict[Any, Any] = {}
            written: set[Any] = set()  # keys written in this mapping, not merged into it
            for key_node, value_node in node.value:
                # A key is a name as written: `8080:` or `on:` must not become an int or a bool.
                if isinstance(key_node, yaml.ScalarNode):
                    key = self.interpolate(key_node.value, path)
                else:
                    key = self.scalar(key_node, path)
                if not isinstance(key, str | int) or isinstance(key, bool):
                    key = str(key)
                child = (*path, key)
                self.keys[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if node.start_mark.index <= key_node.start_mark.index < node.end_mark.index:
                    if key in written:
                        self.problem(child, f"the key {key!r} is given twice", at_key=True)
                    written.add(key)
                data[key] = self.build(value_node, child)
            return data
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalar(node, path)

    def scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return self.build(node, path)
        value = _CONSTRUCTOR.construct_object(node, deep=True)
        if isinstance(value, str):
            return self.interpolate(value, path)
        return value

    def interpolate(self, text: str, path: KeyPath) -> str:
        """``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` as a shell reads them; ``$$`` is ``$``."""
        if "$" not in text:
            return text

        def substitute(match: re.Match[str]) -> str:
            dollar, name, colon, default, bad = match.groups()
            if dollar:
                return "$"
            if bad is not None:
                self.problem(path, f"${{{bad}}} is not a variable reference: write ${{NAME}}")
                return match.group(0)
            value = self.environ.get(name)
            if default is not None and (value is None or (colon and not value)):
                return default
            if value is not None:
                return value
            self.problem(
                path,
                f"the environment variable {name} is not set "
                f"(give a default with ${{{name}:-default}}, or write $$ for a literal $)",
            )
            return ""

        return _INTERPOLATION.sub(substitute, text)


_CONSTRUCTOR = yaml.SafeLoader("")  # its construct_object turns scalar nodes into Python values


def _dotted(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)


def load_manifest(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Manifest:
    """Read, interpolate and validate a manifest; raise one ManifestError listing every problem."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ManifestError([Problem(str(file), None, None, "", f"cannot read: {exc.strerror}")]) from None
    return parse_manifest(text, file, environ)


def parse_manifest(
    text: str, file: Path, environ: Mapping[str, str] | None = None
) -> Manifest:
    source = _Source(str(file), {}, {}, [], os.environ if environ is None else environ)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        message = f"YAML syntax error: {exc.problem or exc}"
        if exc.context:
            message += f" ({exc.context})"
        raise ManifestError([Problem(str(file), line, column, "", message)]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([Problem(str(file), None, None, "", f"YAML error: {exc}")]) from None
    if node is None:
        raise ManifestError([Problem(str(file), 1, 1, "", "the manifest is empty: start with 'version: 1'")])
    data = source.build(node, ())
    if not isinstance(data, dict):
        source.problem((), "the manifest must be a mapping with 'version' and 'instances'")
        raise ManifestError(source.problems)

    _check_instances(data, source)
    manifest: Manifest | None = None
    try:
        manifest = Manifest.model_validate(data, context={"base_dir": file.resolve().parent})
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            _report(error, source)
    if source.problems or manifest is None:
        raise ManifestError(_in_file_order(source.problems))
    manifest._source = file.resolve()
    return manifest


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line or 0, p.column or 0))


# -- checks across instances --------------------------------------------------------------------


def _check_instances(data: dict[str, Any], source: _Source) -> None:
    instances = data.get("instances")
    if not isinstance(instances, dict):
        return
    graph: dict[str, list[str]] = {}
    for name, spec in instances.items():
        if not isinstance(spec, dict):
            continue
        deps = spec.get("depends_on") or {}
        names = deps if isinstance(deps, list) else list(deps) if isinstance(deps, dict) else []
        graph[str(name)] = []
        for index, written in enumerate(names):
            where: KeyPath = ("instances", name, "depends_on", index if isinstance(deps, list) else written)
            # An all-digit name reads as an int (`depends_on: [8080]`): it is still a name.
            dep = str(written) if isinstance(written, int) and not isinstance(written, bool) else written
            if dep == name:
                source.problem(where, f"{name} cannot depend on itself", at_key=True)
            elif dep not in instances:
                hint = _did_you_mean(str(dep), [str(n) for n in instances])
                source.problem(where, f"unknown instance {dep!r}{hint}", at_key=True)
            else:
                graph[str(name)].append(str(dep))
                if _condition(deps, written) == "completed" and _policy(instances[dep]) == "always":
                    source.problem(
                        where,
                        f"{name} waits for {dep} to complete, but {dep} has restart.policy always "
                        "and never completes (use on-failure or no for a one-shot job)",
                        at_key=True,
                    )
    for cycle in _cycles(graph):
        first = cycle[0]
        source.problem(
            ("instances", first, "depends_on"),
            "dependency cycle: " + " -> ".join([*cycle, first]),
            at_key=True,
        )
    _check_replica_names(instances, source)


def _condition(deps: Any, name: Any) -> Any:
    """The condition an edge names in the raw data (a list means the default, ready)."""
    if not isinstance(deps, dict):
        return "ready"
    edge = deps.get(name)
    return edge.get("condition", "ready") if isinstance(edge, dict) else edge if edge is not None else "ready"


def _policy(spec: Any) -> Any:
    restart = spec.get("restart") if isinstance(spec, dict) else None
    return restart.get("policy", "on-failure") if isinstance(restart, dict) else "on-failure"


def _check_replica_names(instances: dict[str, Any], source: _Source) -> None:
    """``web`` with 2 replicas is web-0 and web-1; another instance may not take those names."""
    owner: dict[str, str] = {}
    for name, spec in instances.items():
        replicas = spec.get("replicas", 1) if isinstance(spec, dict) else 1
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            continue
        names = [str(name)] if replicas == 1 else [f"{name}-{i}" for i in range(replicas)]
        for replica in names:
            if replica in owner and owner[replica] != name:
                source.problem(
                    ("instances", name),
                    f"the replica name {replica!r} clashes with instance {owner[replica]!r}",
                    at_key=True,
                )
            owner[replica] = str(name)


def _cycles(graph: dict[str, list[str]]) -> Iterator[list[str]]:
    """Each dependency cycle once, as the list of names along it."""
    state: dict[str, int] = {}
    stack: list[str] = []
    seen: set[frozenset[str]] = set()

    def visit(node: str) -> Iterator[list[str]]:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, []):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    yield cycle
            elif dep not in state:
                yield from visit(dep)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            yield from visit(node)


# -- pydantic errors, put back in the file ------------------------------------------------------


def _report(error: Mapping[str, Any], source: _Source) -> None:
    kind = error["type"]
    loc = _key_path(error["loc"], source, keep_last=kind in {"missing", "extra_forbidden"})
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        hint = _did_you_mean(str(loc[-1]), valid)
        listing = f"; valid keys here: {', '.join(valid)}" if valid and not hint else ""
        source.problem(loc, f"unknown key {loc[-1]!r}{hint}{listing}", at_key=True)
        return
    if kind == "missing":
        source.problem(loc[:-1], f"the key {loc[-1]!r} is required here", at_key=True)
        return
    message = error["msg"].removeprefix("Value error, ")
    if "[key]" in [str(p) for p in error["loc"]] and kind == "string_pattern_mismatch":
        message = f"{loc[-1]!r} is not a valid instance name: use {INSTANCE_NAME_PATTERN}"
        source.problem(loc, message, at_key=True)
        return
    given = error.get("input")
    if kind not in {"value_error", "assertion_error"} and not isinstance(given, dict | list):
        message += f" (got {given!r})"
    source.problem(loc, message)


def _key_path(loc: tuple[Any, ...], source: _Source, *, keep_last: bool) -> KeyPath:
    """Drop pydantic's own loc parts (union tags, validator names) to keep the YAML key path.

    A part is a YAML key exactly when the file has something at that path; the
    last part of a missing or unknown key is kept although the file has no value there.
    """
    path: KeyPath = ()
    for index, part in enumerate(loc):
        if _is_stream_kind(loc, index):
            continue
        candidate = (*path, part)
        if candidate in source.values or (keep_last and index == len(loc) - 1):
            path = candidate
    return path


def _is_stream_kind(loc: tuple[Any, ...], index: int) -> bool:
    """Whether ``loc[index]`` is the kind pydantic names a stream's member by, not a key of the file.

    For ``stdout: {file: out.log, mode: apend}`` pydantic says ``stdout.file.mode``: the kind,
    then the field. The short form has a ``file`` (or ``fifo``) key too, but it holds only the
    path; every other field of the stream is that key's sibling.
    """
    return (
        index == 3
        and len(loc) > 4
        and loc[0] == "instances"
        and loc[2] in ("stdin", "stdout", "stderr")
        and loc[4] != "path"
    )


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The model class that a key path lands in, to list the keys valid there."""
    current: Any = Manifest
    for part in path:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(models) == 1:
                return models[0]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
