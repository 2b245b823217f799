"""``supervisor run --pidfile PATH``: the service's pid, for init systems that want a file.

Written by the service once it answers on its socket (so an init system that
reads it after ``run -d`` returns finds a service that is up), removed when it
ends. A pidfile that names a live service refuses a second start; one that
names nothing alive, or another program (the pid was reused), or holds
garbage is stale and replaced. The file is replaced by rename, never written
through: a pidfile path that is a symlink is replaced, not followed.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PidfileError", "live_service", "remove_pidfile", "write_pidfile"]

#: A pid is at most 7 digits on Linux (pid_max <= 4194304); anything longer is not ours.
_MAX_BYTES = 64


class PidfileError(Exception):
    """The pidfile cannot be used: it names a live service, or cannot be read or written."""


def live_service(path: Path) -> int | None:
    """The pid the file names if that is a live ``supervisor run`` other than this process."""
    try:
        with open(path, "rb") as file:
            text = file.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise PidfileError(f"pidfile {path}: is a folder, not a file") from None
    except OSError as exc:
        raise PidfileError(f"pidfile {path}: cannot read it: {exc.strerror or exc}") from None
    pid = _parse(text)
    if pid is None or pid == os.getpid() or not _is_service(pid):
        return None
    return pid


def write_pidfile(path: Path) -> None:
    """Write this process's pid to ``path`` (by rename: readers never see half a file)."""
    if live := live_service(path):
        raise PidfileError(f"pidfile {path} names a running service (pid {live}): stop it first")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise PidfileError(f"pidfile {path}: cannot write it: {exc.strerror or exc}") from None


def remove_pidfile(path: Path) -> None:
    """Remove ``path`` if it still names this process (another service may have replaced it)."""
    try:
        with open(path, "rb") as file:
            if _parse(file.read(_MAX_BYTES + 1)) != os.getpid():
                return
        os.unlink(path)
    except OSError:
        pass


def _parse(text: bytes) -> int | None:
    value = text.strip()
    if len(text) > _MAX_BYTES or not value.isdigit():
        return None
    pid = int(value)
    return pid if 0 < pid < 1 << 22 else None


def _is_service(pid: int) -> bool:
    """Alive (not a zombie) and running ``supervisor ... run``: a reused pid is somebody else."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            if stat.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
    except (OSError, IndexError):
        return False
    named = any(os.path.basename(arg) in (b"supervisor", b"procward") for arg in argv)
    return named and b"run" in argv
