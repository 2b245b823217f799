"""The service's state folder: made private when the service makes it, checked when it exists.

The state folder holds the control socket and the instances' logs, and the service
(often root) creates and appends to files there. Whoever else can write in it can
plant a symlink where a log file will be opened and have the service append
instance output to any file it can reach. So a folder the service finds is used only
if it belongs to the service's user and nobody else may write in it; and the service
never changes the mode of a folder it did not make (``state_dir: .`` or ``~`` is the
user's folder, not ours to lock down to 0700). Inside it, log folders and files are
opened without following symlinks (``logfile.py``).

One service per state folder (``StateDirLock``): two services on one folder would
each start every instance (a web server twice, a job done twice), write into the
same log files and overwrite each other's crash record. The control socket alone
cannot tell: once its file is deleted (a cleaner of old files, an ``rm`` in the
wrong folder) a second service finds nothing there. A ``flock`` on the folder
itself does, whatever happens to the files in it: the kernel lets it go when the
service ends, however it ends, and a re-exec hands it over (its descriptor is in
the state record).
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

__all__ = ["StateDirError", "StateDirInUse", "StateDirLock", "prepare_state_dir"]

_MODE = 0o700


class StateDirError(Exception):
    """The state folder cannot be made, or is not safe to use; the message says what to do."""


class StateDirInUse(StateDirError):
    """Another service holds the state folder: this one must not start anything there."""

    def __init__(self, message: str, holder: int | None) -> None:
        super().__init__(message)
        #: The other service's pid, where /proc/locks tells it.
        self.holder = holder


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


class StateDirLock:
    """An exclusive ``flock`` on the state folder, held as long as the service runs there.

    Taken before the control socket is bound and before a crashed run's leftovers are
    looked for: a service that holds it knows that what the folder's record names is not
    another live service's. The descriptor is close-on-exec (no instance inherits it) except
    across a re-exec, which hands it over (``adopt``).
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> StateDirLock:
        """Lock ``path`` (a folder ``prepare_state_dir`` made or checked), or raise what holds it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StateDirError(f"state_dir {path}: cannot open it: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.fstat(fd))
            os.close(fd)
            who = "another service" if holder is None else f"another service (pid {holder})"
            raise StateDirInUse(
                f"state_dir {path} is in use by {who}: two services on one folder would each start "
                "every instance; stop the other first (supervisor shutdown, or SIGTERM), or give this "
                "manifest a state_dir of its own",
                holder,
            ) from None
        except OSError as exc:  # a file system without flock: said, not fatal
            os.close(fd)
            raise StateDirError(f"state_dir {path}: cannot lock it: {exc.strerror}") from None
        return cls(path, fd)

    @classmethod
    def adopt(cls, path: Path, fd: int) -> StateDirLock:
        """After a re-exec: the lock the old service held, handed over as ``fd`` (close-on-exec again)."""
        os.set_inheritable(fd, False)
        return cls(path, fd)

    def release(self) -> None:
        """Close the descriptor: the folder is free for the next service. Idempotent."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _holder(found: os.stat_result) -> int | None:
    """The pid /proc/locks gives for the flock on ``found`` (None where it cannot tell)."""
    wanted = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; "->" marks a waiter
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[2] != "->" and fields[5] == wanted:
                    pid = int(fields[4])
                    return pid or None  # 0: a process outside our PID namespace
    except (OSError, ValueError):
        pass
    return None
