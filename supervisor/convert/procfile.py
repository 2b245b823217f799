"""Import a Procfile (``name: command`` lines, as honcho and foreman read them) as a manifest.

Each line becomes an instance running its command through ``/bin/sh -c`` in the
Procfile's folder, as both tools do. A ``.env`` beside the Procfile becomes the
instance's ``env_file``. ``PORT`` is set as foreman sets it: the base port (the
``PORT`` of ``.env``, else 5000) plus 100 for each line before this one; honcho
does the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..config import read_env_file
from .notes import Converted, ConvertError, read_source
from .writer import Draft, instance_name, relative_path

_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")
MAX_ENTRIES = 1000
BASE_PORT = 5000


def _base_port(env_path: Path) -> int:
    try:
        env = read_env_file(env_path)
    except ValueError as exc:
        raise ConvertError(env_path, None, str(exc)) from None
    port = env.get("PORT", str(BASE_PORT))
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConvertError(env_path, None, f"PORT={port!r} is not a port number")
    return int(port)


def convert(text: str, source: Path, output: Path, read: Callable[[Path], str] = read_source) -> Converted:
    """A Procfile's ``text`` (from ``source``) as a manifest to be written at ``output``."""
    draft = Draft(source, "Procfile", "`name: command` line")
    folder = source.resolve().parent
    env_path = folder / ".env"
    has_env = env_path.is_file()
    base = _base_port(env_path) if has_env else BASE_PORT
    cwd = relative_path(folder, output) or "."
    seen: dict[str, tuple[int, str]] = {}  # instance name: the line and the spelling that made it
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        match = _LINE.match(raw)  # as honcho matches it: from the line's first character
        if not match:
            draft.note(
                (str(source), number),
                raw[:40],
                "dropped",
                "not a `name: command` line; honcho and foreman skip it",
            )
            continue
        name, command = match.group(1), match.group(2).strip()
        entry = instance_name(name)
        if entry in seen:
            # Keyed by the instance name, not the spelling: WEB and web are two process types to
            # honcho, but one instance here, and the first line is the one to point at.
            first, spelled = seen[entry]
            why = (
                f"the process type {name!r} is given twice (first on line {first})"
                if spelled == name
                else f"{name!r} and {spelled!r} (line {first}) both become the instance {entry!r}"
            )
            raise ConvertError(source, number, why)
        seen[entry] = (number, name)
        if len(draft.instances) >= MAX_ENTRIES:
            raise ConvertError(source, number, f"more than {MAX_ENTRIES} process types")
        spec: dict[str, object] = {"command": command, "shell": True, "cwd": cwd}
        if has_env:
            spec["env_file"] = relative_path(env_path, output)
        port = base + 100 * len(draft.instances)
        spec["env"] = {"PORT": str(port)}
        spec["restart"] = {"policy": "no"}
        draft.instances[entry] = spec
        draft.origin((entry,), (str(source), number))
        draft.comment((entry, "env", "PORT"), f"as foreman: {base} + 100 × {len(draft.instances) - 1}")
        draft.comment(
            (entry, "restart", "policy"), "foreman and honcho restart nothing: one exit stops them all"
        )
        if entry != name:
            draft.note((str(source), number), name, "approximated", f"named {entry!r}", at=(entry, "command"))
    return Converted(draft.text(output), draft.sorted_notes())
