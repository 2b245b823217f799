"""Reading a file the manifest names, or the manifest itself, without ever waiting on it.

Opened without blocking and checked before a byte is read: a fifo with no writer would
hold a load (and a reload, and its API request) for good, and ``/dev/zero`` would be
read up to the limit. Only a regular file (through symlinks) is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["NotARegularFile", "read_regular_file"]


class NotARegularFile(Exception):
    """The path is a fifo, a device, a folder or a socket (or a symlink to one)."""


def read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path``.

    OSError (it cannot be opened) and ValueError (a NUL in the path) as ``os.open`` raises
    them; NotARegularFile before anything is read from what is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(str(path))
        with open(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)
