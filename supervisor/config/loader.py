"""Load a manifest from YAML, and report every problem in it at once.

PyYAML composes the document into nodes that carry their line and column;
we build the plain data from those nodes ourselves, keeping a map from each
key path to where it was written. Pydantic then validates the data, and each
of its errors is put back at the place in the file it came from. Checks that
span instances (dependencies, cycles, name clashes) run on the raw data too,
so that they are reported even when a field elsewhere is wrong.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from . import records
from .capacity import MAX_INSTANCES, capacity_problems
from .log_files import log_file_problems
from .models import INSTANCE_NAME_PATTERN, MAX_NAME_LENGTH, MAX_REPLICAS, Backoff, Manifest, RestartPolicy
from .problems import ManifestError, Problem, shown_key
from .regular_file import NotARegularFile, read_regular_file
from .yaml_source import (
    MAX_DEPTH,
    MAX_MANIFEST_BYTES,
    MAX_VALUES,
    MERGE,
    NULL,
    STR,
    AliasNode,
    SourceError,
    compose,
    construct,
    decode,
    is_plain,
    resolve_plain,
)

__all__ = ["ManifestError", "Problem", "load_manifest", "parse_manifest", "settled"]

KeyPath = tuple[str | int, ...]

# $$ | ${NAME} | ${NAME:-default} (unset or empty) | ${NAME-default} (unset only) | ${anything else}
_INTERPOLATION = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)-([^}]*))?\}|\{([^}]*)\})")


@dataclass
class _Source:
    """YAML turned into plain data, with the place of every key and value."""

    file: str
    values: dict[KeyPath, tuple[int, int]]
    keys: dict[KeyPath, tuple[int, int]]
    problems: list[Problem]
    environ: Mapping[str, str]
    #: Values still to build before MAX_VALUES is reached.
    budget: int = MAX_VALUES
    #: The outermost alias being expanded: where an error inside an anchor's content is reported.
    alias: AliasNode | None = None
    #: Paths already reported as unreadable: pydantic's own complaint about them is left out.
    refused: set[KeyPath] = field(default_factory=set)

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

    def build(self, node: Any, path: KeyPath) -> Any:
        """The plain value of ``node``, recording where each part of it was written.

        An alias is built from its anchor every time it is used, so its cost is
        counted every time: a file of a few lines cannot expand past MAX_VALUES
        or nest deeper than MAX_DEPTH, and the error points at the alias.
        """
        if isinstance(node, AliasNode):
            outer, self.alias = self.alias, self.alias or node
            try:
                value = self.build(node.target, path)
            finally:
                self.alias = outer
            self.values[path] = _place(node)  # the value is written there, as far as a reader knows
            return value
        self.budget -= 1
        if self.budget < 0:
            self.stop(node, f"the manifest holds more than {MAX_VALUES:,} values once aliases are expanded")
        if len(path) > MAX_DEPTH:
            self.stop(node, f"the manifest is nested more than {MAX_DEPTH} levels deep with aliases expanded")
        self.values[path] = _place(node)
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalar(node, path)

    def refuse(self, node: Any, path: KeyPath, message: str) -> None:
        """A problem at the node itself (an alias's own place, say), and none from pydantic under it."""
        line, column = _place(node)
        self.problems.append(Problem(self.file, line, column, _dotted(path), message))
        self.refused.add(path)

    def stop(self, node: Any, message: str) -> typing.NoReturn:
        """Give up building: past a limit, going on is the harm the limit prevents."""
        where = self.alias or node
        if self.alias is not None:
            message += f" (expanding *{self.alias.anchor} here)"
        line, column = _place(where)
        raise SourceError(line, column, message)

    def mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        data: dict[str, Any] = {}
        pairs = []
        for key_node, value_node in node.value:
            key_target = key_node.target if isinstance(key_node, AliasNode) else key_node
            if isinstance(key_target, yaml.ScalarNode) and key_target.tag == MERGE:
                self.merge(value_node, path, data)  # merged keys first, so that written keys win
            else:
                pairs.append((key_node, value_node))
        self.values[path] = _place(node)
        written: set[str] = set()
        for key_node, value_node in pairs:
            key = self.key(key_node, path)
            if key is None:
                continue
            child = (*path, key)
            self.keys[child] = _place(key_node)
            if key in written:
                self.problem(child, f"the key {key!r} is given twice", at_key=True)
            written.add(key)
            data[key] = self.build(value_node, child)
        return data

    def merge(self, value_node: Any, path: KeyPath, data: dict[str, Any]) -> None:
        """``<<: *base`` or ``<<: [*a, *b]`` (the first listed wins), as YAML's merge key means."""
        target = value_node.target if isinstance(value_node, AliasNode) else value_node
        sources = target.value if isinstance(target, yaml.SequenceNode) else [value_node]
        merged = []
        for item in sources:
            item_target = item.target if isinstance(item, AliasNode) else item
            if not isinstance(item_target, yaml.MappingNode):
                self.refuse(item, path, "<< merges a mapping or a list of mappings, such as <<: *base")
                continue
            merged.append(self.build(item, path))
        for values in reversed(merged):
            data.update(values)

    def key(self, node: Any, path: KeyPath) -> str | None:
        """A key is a name as written: `8080:` or `on:` must not become an int or a bool."""
        target = node.target if isinstance(node, AliasNode) else node
        if not isinstance(target, yaml.ScalarNode):
            self.refuse(node, path, "a key must be a name, not a list or a mapping")
            return None
        key = self.interpolate(target.value, path)
        if "\0" in key:
            self.refuse(node, (*path, key), _NUL)
        return key

    def scalar(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        text = node.value
        if node.tag != MERGE and "$" in text:
            text = self.interpolate(text, path)
        if is_plain(node):
            # A plain value is read after interpolation: `replicas: ${N}` is a number when N is one.
            tag = resolve_plain(text)
            if tag != NULL and _is_text_field(path):
                tag = STR  # an argument, an environment value, an umask: as written (`umask: 022`)
        else:
            tag = node.tag
        try:
            value = construct(tag, text)
        except ValueError as exc:
            self.problem(path, str(exc))
            self.refused.add(path)
            return text
        if isinstance(value, str) and "\0" in value:
            self.problem(path, _NUL)
            self.refused.add(path)
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


#: Keys that existed once: a manifest that still has one is told what became of it.
_REMOVED_KEYS: dict[tuple[type[BaseModel], str], str] = {
    (RestartPolicy, "window"): (
        "restart.window was removed: max_restarts now counts failed starts in a row,"
        " and a run that came up ends the streak; delete the key"
    ),
    (Backoff, "reset_after"): (
        "restart.backoff.reset_after was removed: the back-off now starts over as soon as a run"
        " comes up (reaches running); delete the key"
    ),
}

_NUL = "a NUL character (\\0) cannot be part of a path, a name, an argument or an environment variable"


def _place(node: Any) -> tuple[int, int]:
    mark = node.start_mark
    return mark.line + 1, mark.column + 1


def _is_text_field(path: KeyPath) -> bool:
    """Where an unquoted value is taken as written: nothing there is a number or a boolean."""
    if len(path) < 3 or path[0] != "instances":
        return False
    rest = path[2:]
    return (
        (rest[0] == "env" and len(rest) == 2)
        or (rest[0] in ("command", "umask") and len(rest) <= 2)
        or (rest[0] in ("ready", "alive") and len(rest) in (2, 3) and rest[1] == "exec")
    )


def _dotted(path: KeyPath) -> str:
    return ".".join(shown_key(p) for p in path)


def settled(model: Any) -> Any:
    """A checked model as its record (``records.py``), what the service runs; other values as they are.

    For a caller that built a ``models.Manifest`` itself (``Manifest.model_validate``):
    ``Manager`` and ``Service`` take what this returns.
    """
    if isinstance(model, BaseModel):
        record: type[records.Record] = getattr(records, type(model).__name__)
        fields = {name: settled(getattr(model, name)) for name in type(model).model_fields}
        fields.update(model.__pydantic_private__ or {})
        return record(**fields)
    if isinstance(model, dict):
        return {key: settled(value) for key, value in model.items()}
    if isinstance(model, list):
        return [settled(value) for value in model]
    return model


def load_manifest(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> records.Manifest:
    """Read, interpolate and validate a manifest to run here; one ManifestError lists every problem."""
    file = Path(path)

    def unreadable(why: str) -> ManifestError:
        shown = str(file).replace("\0", "\\0")  # a NUL (from code: argv cannot hold one) is shown, not sent
        return ManifestError([Problem(shown, None, None, "", f"cannot read: {why}")])

    # A manifest is read again at every reload, so it has to be a file that is still there: a
    # pipe (`-f <(...)`) would be empty then, and a fifo with no writer would hold the reload.
    try:
        data = read_regular_file(file, MAX_MANIFEST_BYTES + 1)  # a larger file is refused, never read whole
    except NotARegularFile:
        raise unreadable("not a regular file (the manifest is read again at each reload)") from None
    except OSError as exc:
        raise unreadable(str(exc.strerror)) from None
    except ValueError:  # a NUL in the path
        raise unreadable("a NUL byte is not allowed in a path") from None
    return parse_manifest(data, file, environ, this_machine=True)


def parse_manifest(
    text: str | bytes, file: Path, environ: Mapping[str, str] | None = None, *, this_machine: bool = False
) -> records.Manifest:
    """Validate a manifest's text (bytes must be UTF-8); ManifestError is the only error it raises.

    ``this_machine``: also check that it fits this machine's open-files limit, as
    ``load_manifest`` does for ``validate``, ``run`` and ``reload``; an export for another
    machine, or a converter checking what it wrote, leaves it out.
    """
    source = _Source(str(file), {}, {}, [], os.environ if environ is None else environ)
    try:
        node = compose(decode(text) if isinstance(text, bytes) else text)
        if node is None:
            raise SourceError(1, 1, "the manifest is empty: start with 'version: 1'")
        data = source.build(node, ())
    except SourceError as exc:
        stop = Problem(str(file), exc.line, exc.column, "", exc.message)
        raise ManifestError(_in_file_order([*source.problems, stop])) from None
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
    result: records.Manifest | None = None
    if manifest is not None and not source.problems:
        manifest._source = file.resolve()
        result = settled(manifest)
        for message in capacity_problems(result, this_machine=this_machine):
            source.problem(("instances",), message, at_key=True)
        for where, message in log_file_problems(result):
            source.problem(where, message, at_key=True)
    if source.problems or result is None:
        raise ManifestError(_in_file_order(source.problems))
    return result


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
            if not isinstance(dep, str):
                continue  # not a name at all: the models say what is expected
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
            "dependency cycle: " + _along(cycle),
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
    counts = {}
    for name, spec in instances.items():
        replicas = spec.get("replicas", 1) if isinstance(spec, dict) else 1
        if isinstance(replicas, int) and not isinstance(replicas, bool) and 0 <= replicas <= MAX_REPLICAS:
            counts[name] = replicas
    if sum(counts.values()) > MAX_INSTANCES:
        return  # too many to name: the models say so without spelling them all out
    owner: dict[str, str] = {}
    for name, replicas in counts.items():
        names = [str(name)] if replicas == 1 else [f"{name}-{i}" for i in range(replicas)]
        for replica in names:
            if replica in owner and owner[replica] != name:
                source.problem(
                    ("instances", name),
                    f"the replica name {replica!r} clashes with instance {owner[replica]!r}",
                    at_key=True,
                )
            owner[replica] = str(name)


def _along(cycle: list[str]) -> str:
    names = [*cycle, cycle[0]]
    if len(names) > 12:  # a cycle through a thousand instances is named by its ends
        names = [*names[:5], f"… ({len(cycle) - 9} more) …", *names[-5:]]
    return " -> ".join(names)


def _cycles(graph: dict[str, list[str]]) -> Iterator[list[str]]:
    """Each dependency cycle once, as the list of names along it.

    A depth-first search with its own stack, not Python's: a chain of a
    thousand ``depends_on`` links must not reach the recursion limit.
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    seen: set[frozenset[str]] = set()
    for root in graph:
        if root in state:
            continue
        path: list[str] = [root]
        edges = [iter(graph.get(root, []))]
        state[root] = 1
        while edges:
            dep = next(edges[-1], None)
            if dep is None:
                state[path.pop()] = 2
                edges.pop()
            elif state.get(dep) == 1:
                cycle = path[path.index(dep) :]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    yield cycle
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                edges.append(iter(graph.get(dep, [])))


# -- pydantic errors, put back in the file ------------------------------------------------------


def _report(error: Mapping[str, Any], source: _Source) -> None:
    kind = error["type"]
    loc = _key_path(error["loc"], source, keep_last=kind in {"missing", "extra_forbidden"})
    if any(loc[: len(path)] == path for path in source.refused):
        return  # already said why the value could not be read
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        if parent is not None and (removed := _REMOVED_KEYS.get((parent, str(loc[-1])))):
            source.problem(loc, removed, at_key=True)
            return
        valid = sorted(parent.model_fields) if parent else []
        hint = _did_you_mean(str(loc[-1]), valid)
        listing = f"; valid keys here: {', '.join(valid)}" if valid and not hint else ""
        source.problem(loc, f"unknown key {loc[-1]!r}{hint}{listing}", at_key=True)
        return
    if kind == "missing":
        source.problem(loc[:-1], f"the key {loc[-1]!r} is required here", at_key=True)
        return
    message = error["msg"].removeprefix("Value error, ")
    at_key = "[key]" in [str(p) for p in error["loc"]]  # a mapping's key is wrong, not its value (env)
    if at_key and kind in ("string_pattern_mismatch", "string_too_long"):
        if kind == "string_too_long":
            message = (
                f"an instance name has at most {MAX_NAME_LENGTH} characters, not {len(str(loc[-1]))}: "
                "it becomes the name of its log files"
            )
        else:
            message = f"{shown_key(loc[-1])!r} is not a valid instance name: use {INSTANCE_NAME_PATTERN}"
        source.problem(loc, message, at_key=True)
        return
    given = error.get("input")
    if kind == "int_type" and isinstance(given, str) and given.strip().lstrip("+-").isdigit():
        source.problem(loc, f"expected a number, not the text {given!r}: write it without quotes")
        return
    if kind not in {"value_error", "assertion_error"} and not isinstance(given, dict | list):
        message += f" (got {given!r})"
    source.problem(loc, message, at_key=at_key)


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
    if len(choices) > 1000:
        return ""  # a hint is not worth a quadratic search through a huge manifest
    import difflib  # for a manifest with a mistake only: not on every check's path

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
