"""Pick the format of a foreign config (from its name, else its content) and convert it."""

from __future__ import annotations

import re
from pathlib import Path

from . import process_compose, procfile, supervisord
from .notes import Converted, ConvertError, read_source
from .process_compose import DOCKER_COMPOSE

FORMATS = {
    "supervisord": supervisord.convert,
    "procfile": procfile.convert,
    "process-compose": process_compose.convert,
}


def detect_format(path: Path, text: str) -> str:
    """The format of ``text``: by the file's name where it says, else by what the content looks like."""
    name = path.name.lower()
    if name.startswith("procfile"):
        return "procfile"
    if name.startswith("process-compose"):
        return "process-compose"
    if name.startswith("supervisord") or name.endswith((".conf", ".ini")):
        return "supervisord"
    if re.search(r"^\s*\[(program|group|supervisord|include)[:\]]", text, re.MULTILINE):
        return "supervisord"
    if re.search(r"^processes[ \t]*:", text, re.MULTILINE):
        return "process-compose"
    # `services:` alone on its line opens docker compose's mapping; `services: cmd` is a Procfile's.
    if services := re.search(r"^services[ \t]*:[ \t]*(#.*)?$", text, re.MULTILINE):
        raise ConvertError(path, text.count("\n", 0, services.start()) + 1, DOCKER_COMPOSE)
    # [ \t], not \s: a YAML mapping key ends its line, and \s would take the line break and
    # find the command on the next line (`services:` of a docker compose file read as a Procfile).
    if re.search(r"^[A-Za-z0-9_-]+:[ \t]*\S", text, re.MULTILINE):
        return "procfile"
    raise ConvertError(
        path, None, "cannot tell the format: give --format supervisord, procfile or process-compose"
    )


def import_file(path: Path, output: Path, fmt: str | None = None) -> Converted:
    """Read ``path`` and convert it to a manifest meant to be written at ``output``."""
    text = read_source(path)
    chosen = fmt or detect_format(path, text)
    if chosen not in FORMATS:
        raise ConvertError(path, None, f"unknown format {chosen!r}: expected {', '.join(FORMATS)}")
    return FORMATS[chosen](text, path, output)
