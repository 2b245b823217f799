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

from ..config import ManifestError, parse_manifest
from .notes import Action, ConvertError, Note

KeyPath = tuple[str, ...]
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


def validated(text: str, output: Path, source: str | Path) -> str:
    """``text`` if the loader accepts it as a manifest at ``output``; else a ConvertError naming why."""
    try:
        parse_manifest(text, output, environ=_AnyEnviron())
    except ManifestError as exc:
        problems = "; ".join(str(p).removeprefix(f"{output}:") for p in exc.problems[:5])
        raise ConvertError(source, None, f"the converted manifest does not validate: {problems}") from None
    return text


class Draft:
    """A manifest being built from a foreign config, with its comments and notes."""

    def __init__(self, source: str | Path, fmt: str) -> None:
        self.source = str(source)
        self.format = fmt
        self.instances: dict[str, dict[str, Any]] = {}
        self.comments: dict[KeyPath, str] = {}
        self.notes: list[Note] = []

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
        body = dump({"version": 1, "instances": self.instances}, self.comments, header)
        return validated(body, output, self.source)

    def sorted_notes(self) -> list[Note]:
        return sorted(self.notes, key=lambda n: (n.file, n.line or 0))
