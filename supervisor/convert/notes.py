"""What a conversion says about itself: notes on what did not carry over, and errors with their place.

A converter never drops a setting silently: each key with no exact counterpart
becomes a :class:`Note` naming where it was written and what was done instead.
Input that cannot be converted at all is a :class:`ConvertError` with its place.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Action = Literal["dropped", "approximated"]


@dataclass(frozen=True, slots=True)
class Note:
    """One key that has no exact counterpart: where it was, and what became of it."""

    file: str
    line: int | None
    key: str
    action: Action
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.action}: {self.message}"


class ConvertError(Exception):
    """The input cannot be converted; the message names the file, the line and what was expected."""

    def __init__(self, file: str | Path, line: int | None, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.message = message
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: {message}")


@dataclass
class Converted:
    """An imported manifest's text and the notes on what did not map exactly."""

    text: str
    notes: list[Note] = field(default_factory=list)


@dataclass
class Exported:
    """Files by relative name (a unit, a Kubernetes object list) and the notes on what did not map."""

    files: dict[str, str]
    notes: list[Note] = field(default_factory=list)


MAX_SOURCE_BYTES = 4 * 1024**2


def check_text(data: bytes, file: str | Path, *, limit: int = MAX_SOURCE_BYTES) -> str:
    """Decode a foreign config as UTF-8, refusing NUL bytes, other encodings and huge files by line."""
    if len(data) > limit:
        raise ConvertError(file, None, f"the file is {len(data)} bytes; more than {limit} is not a config")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConvertError(file, data.count(b"\n", 0, nul) + 1, "a NUL byte: this is not a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConvertError(
            file, line, f"not UTF-8 text (byte {data[exc.start]:#04x}); convert it first"
        ) from None


def read_source(path: Path) -> str:
    """Read a foreign config from disk with :func:`check_text`'s checks; an OS error is a ConvertError."""
    try:
        # O_NONBLOCK: a fifo given by mistake must not hang the command until someone writes to it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConvertError(path, None, f"cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConvertError(path, None, "not a regular file")
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(MAX_SOURCE_BYTES + 1)
        except OSError as exc:
            raise ConvertError(path, None, f"cannot read: {exc.strerror}") from None
    return check_text(data, path)
