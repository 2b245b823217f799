"""What both exports share: the manifest read with the line of every key, and notes placed on them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from ..config import InstanceConfig, Manifest, ManifestError, parse_manifest
from .notes import Action, ConvertError, Note
from .positions import KeyPath, load_yaml

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Source:
    """A manifest to export, the lines its keys were written on, and the notes collected so far."""

    def __init__(self, text: str, file: Path, environ: Mapping[str, str] | None = None) -> None:
        self.file = file
        _, self.lines = load_yaml(text, file)
        try:
            self.manifest: Manifest = parse_manifest(text, file, environ)
        except ManifestError as exc:
            raise ConvertError(file, exc.problems[0].line, str(exc)) from None
        self.notes: list[Note] = []

    def written(self, name: str, *keys: str) -> bool:
        return ("instances", name, *keys) in self.lines

    def note(self, name: str, keys: tuple[str, ...], action: Action, message: str) -> None:
        path: KeyPath = ("instances", name, *keys)
        line = None
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                line = self.lines[path[:end]]
                break
        self.notes.append(Note(str(self.file), line, ".".join((name, *keys)), action, message))

    def instances(self) -> list[tuple[str, InstanceConfig]]:
        return list(self.manifest.instances.items())

    def sorted_notes(self) -> list[Note]:
        return sorted(self.notes, key=lambda n: n.line or 0)


def check_name(name: str) -> str:
    """A deployment name (unit prefix, target, app label): letters, digits, '_', '.', '-'."""
    if not _NAME.fullmatch(name):
        raise ConvertError("--name", None, f"{name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    return name


def default_name(manifest: Path) -> str:
    """The manifest's folder name, cleaned up: the usual name of a deployment."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", manifest.resolve().parent.name).strip("-._")
    return cleaned[:64] or "supervisor"
