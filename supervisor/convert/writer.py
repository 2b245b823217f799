"""Write a manifest as YAML text with a comment wherever the converter made a choice, and check it.

The manifest is plain nested dicts in the order a person would read them. Every
string is written so that the loader reads it back unchanged: a ``$`` becomes
``$$``, except in an :class:`Interp`, a string whose ``${NAME}`` references are
meant for the loader (what supervisord's ``%(ENV_NAME)s`` becomes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..config import ManifestError, Problem, parse_manifest
from ..config.problems import shown_key
from .notes import Action, ConvertError, Note

KeyPath = tuple[str, ...]
Where = tuple[str, int | None]
_NAME_BAD = re.compile(r"[^a-z0-9_.-]+")


class Interp(str):
    """A string whose ``${NAME}`` parts are interpolated by the loader; other ``$`` are escaped already."""

    __slots__ = ()


def literal(text: str) -> str:
    """``text`` as the loader must read it back: every ``$`` written as ``$$``."""
    return text.replace("$", "$$")


def relative_path(path: Path, output: Path) -> str:
    """``path`` relative to the manifest's folder where it lies inside it, else absolute."""
    folder = output.resolve().parent
    target = path.resolve()
    return str(target.relative_to(folder)) if target.is_relative_to(folder) else str(target)


def instance_name(name: str) -> str:
    """A foreign name as a manifest instance name (lower case; other characters become '-')."""
    cleaned = _NAME_BAD.sub("-", name.lower()).strip("-_.")
    return cleaned or "unnamed"


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        text = str.__str__(value) if isinstance(value, Interp) else literal(value)
        # A line break would fold the scalar over several lines: quote it on one, with escapes.
        style = '"' if any(c in text for c in "\n\r") else None
        dumped = yaml.safe_dump(text, width=1 << 30, allow_unicode=True, default_style=style)
        return dumped.strip().removesuffix("...").rstrip()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(item) for item in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    raise TypeError(f"cannot write {type(value).__name__} as a scalar")


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", key) and not key.isdigit() else _scalar(key)


def dump(data: Mapping[str, Any], comments: Mapping[KeyPath, str], header: list[str]) -> str:
    """YAML text for ``data``; ``comments[path]`` goes after a scalar, or above a mapping."""
    lines = [f"# {line}" if line else "#" for line in header]

    def walk(mapping: Mapping[str, Any], path: KeyPath, indent: str) -> None:
        for key, value in mapping.items():
            here = (*path, key)
            note = comments.get(here)
            if isinstance(value, dict) and value:
                if note:
                    lines.extend(f"{indent}# {part}" for part in note.splitlines())
                lines.append(f"{indent}{_key(key)}:")
                walk(value, here, indent + "  ")
            else:
                suffix = f"  # {note}" if note and "\n" not in note else ""
                if note and "\n" in note:
                    lines.extend(f"{indent}# {part}" for part in note.splitlines())
                lines.append(f"{indent}{_key(key)}: {_scalar(value)}{suffix}")

    walk(data, (), "")
    return "\n".join(lines) + "\n"


class _AnyEnviron(dict[str, str]):
    """Every variable is set: the converted manifest is checked for shape, not for today's environment."""

    def get(self, key: str, default: Any = None) -> str:  # type: ignore[override]
        return "x"


def _placed(problem: Problem, origins: Mapping[KeyPath, Where]) -> tuple[Where, str] | None:
    """The source place of the entry (or key) a problem is under, and the problem as ``name.key: why``.

    The loader's own line would be one of the converted text, which the user never saw: a
    problem is named by the instance and the source line it came from instead.
    """
    best: KeyPath | None = None
    longest = 0  # by the dotted text: an instance named a.b is under a's prefix too, but nearer
    for path in origins:
        dotted = ".".join(shown_key(p) for p in ("instances", *path))
        if (problem.path == dotted or problem.path.startswith(f"{dotted}.")) and len(dotted) > longest:
            best, longest = path, len(dotted)
    if best is None:
        return None
    return origins[best], f"{problem.path.removeprefix('instances.')}: {problem.message}"


def _unplaced(problem: Problem) -> str:
    """A problem with no source place: its line is said to be the converted manifest's, not the source's."""
    if not problem.path and problem.line is None:
        return problem.message
    line = f", line {problem.line}" if problem.line is not None else ""
    return f"{problem.path or 'the manifest'}: {problem.message} (in the converted manifest{line})"


def validated(
    text: str, output: Path, source: str | Path, origins: Mapping[KeyPath, Where] | None = None
) -> str:
    """``text`` if the loader accepts it as a manifest at ``output``; else a ConvertError naming why.

    ``origins`` gives the source place of each instance (and of keys read from their own line),
    so that a problem found only now is reported at the place the user has to change.
    """
    try:
        parse_manifest(text, output, environ=_AnyEnviron())
    except ManifestError as exc:
        placed = [_placed(p, origins or {}) for p in exc.problems[:5]]
        head = next((where for where, _ in filter(None, placed)), None)
        parts = []
        for problem, place in zip(exc.problems[:5], placed, strict=True):
            if place is None:
                parts.append(_unplaced(problem))
            elif place[0] == head:
                parts.append(place[1])
            else:
                (file, number), why = place
                parts.append(f"{file}:{number}: {why}" if number is not None else f"{file}: {why}")
        if head is not None:
            raise ConvertError(head[0], head[1], "; ".join(parts)) from None
        why = "; ".join(parts)
        raise ConvertError(source, None, f"the converted manifest does not validate: {why}") from None
    return text


class Draft:
    """A manifest being built from a foreign config, with its comments and notes."""

    def __init__(self, source: str | Path, fmt: str, wanted: str) -> None:
        self.source = str(source)
        self.format = fmt
        self.wanted = wanted
        self.instances: dict[str, dict[str, Any]] = {}
        self.comments: dict[KeyPath, str] = {}
        self.notes: list[Note] = []
        self.origins: dict[KeyPath, Where] = {}

    def origin(self, path: KeyPath, where: Where) -> None:
        """Where the instance (or the key) at ``path`` came from: a problem found there is reported there."""
        self.origins[path] = where

    def comment(self, path: KeyPath, text: str) -> None:
        full = ("instances", *path)
        self.comments[full] = f"{self.comments[full]}; {text}" if full in self.comments else text

    def note(
        self,
        line: tuple[str, int | None],
        key: str,
        action: Action,
        message: str,
        at: KeyPath | None = None,
    ) -> None:
        """Record a key that did not map exactly; ``at`` also puts the message beside that manifest key."""
        self.notes.append(Note(line[0], line[1], key, action, message))
        if at is not None:
            self.comment(at, f"{line[0].rsplit('/', 1)[-1]}:{line[1]} {key}: {message}")

    def text(self, output: Path) -> str:
        header = [
            f"Converted from {self.format} ({self.source}) by `supervisor import`.",
            "Comments mark where a setting had no exact counterpart; see docs/migrate.md.",
        ]
        if not self.instances:
            # A manifest that runs nothing is what a wrong file or a wrong --format gives: say so,
            # rather than write it and succeed. The notes are not printed with an error, so the
            # first (why a line did not count, as a rule) goes into it.
            notes = self.sorted_notes()
            why = f"; {len(notes)} notes, the first: {notes[0]}" if notes else ""
            raise ConvertError(self.source, None, f"nothing to convert: no {self.wanted}{why}")
        body = dump({"version": 1, "instances": self.instances}, self.comments, header)
        return validated(body, output, self.source, self.origins)

    def sorted_notes(self) -> list[Note]:
        return sorted(self.notes, key=lambda n: (n.file, n.line or 0))
