"""The service's state folder: made private when the service makes it, checked when it exists.

The state folder holds the control socket and the instances' logs, and the service
(often root) creates and appends to files there. Whoever else can write in it can
plant a symlink where a log file will be opened and have the service append
instance output to any file it can reach. So a folder the service finds is used only
if it belongs to the service's user and nobody else may write in it; and the service
never changes the mode of a folder it did not make (``state_dir: .`` or ``~`` is the
user's folder, not ours to lock down to 0700). Inside it, log folders and files are
opened without following symlinks (``logfile.py``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["StateDirError", "prepare_state_dir"]

_MODE = 0o700


class StateDirError(Exception):
    """The state folder cannot be made, or is not safe to use; the message says what to do."""


def prepare_state_dir(path: Path) -> None:
    """Make ``path`` (mode 0700, its missing parents as ``mkdir -p`` does), or check the one that is there."""
    if "\0" in str(path):  # the OS would raise ValueError, which nobody above expects
        raise StateDirError(f"state_dir {str(path)!r} contains a NUL byte")
    try:
        _make(path)
    except FileExistsError:
        check_state_dir(path)
    except OSError as exc:
        raise StateDirError(f"state_dir {path}: cannot create it: {exc.strerror}") from None


def check_state_dir(path: Path) -> None:
    """Refuse a state folder that is not a folder, is someone else's, or others may write in."""
    try:
        found = os.stat(path)  # the path the manifest names may itself be a symlink: the user's choice
    except OSError as exc:
        raise StateDirError(f"state_dir {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(found.st_mode):
        raise StateDirError(f"state_dir {path} is not a folder")
    user = os.geteuid()
    if found.st_uid != user:
        raise StateDirError(
            f"state_dir {path} belongs to uid {found.st_uid}, not to this service's user (uid {user}): "
            "another user's folder could redirect the service's files; choose a folder of your own"
        )
    mode = stat.S_IMODE(found.st_mode)
    if mode & 0o022:
        who = "others" if mode & 0o002 else "its group"
        raise StateDirError(
            f"state_dir {path} is writable by {who} (mode {mode:04o}), who could redirect the "
            f"service's files: chmod go-w {path}, or choose a private folder"
        )


def _make(path: Path) -> None:
    try:
        os.mkdir(path, _MODE)
    except FileNotFoundError:
        os.makedirs(path.parent, exist_ok=True)
        os.mkdir(path, _MODE)
    # Ours, made just now: exactly 0700 whatever the umask took away. Through a descriptor
    # of the folder itself, never through a name something could have been swapped in at.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, _MODE)
    finally:
        os.close(fd)
