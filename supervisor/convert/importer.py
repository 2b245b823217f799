"""Pick the format of a foreign config (from its name, else its content) and convert it."""

from __future__ import annotations

import re
from pathlib import Path

from . import process_compose, procfile, supervisord
from .notes import Converted, ConvertError, read_source

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
    if re.search(r"^processes\s*:", text, re.MULTILINE):
        return "process-compose"
    if re.search(r"^[A-Za-z0-9_-]+:\s*\S", text, re.MULTILINE):
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
