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

A ``flock`` holds the folder's inode, not its name: a folder deleted under the service
(``rm -rf``, a cleaner of ``/tmp``) and made again by a second ``supervisor run`` is a new
inode, free to lock, and the second service would start every instance beside the first.
So the service also listens on an abstract unix socket named after the folder's path (its
uid and a digest of the real path: abstract names live in no file system, and nothing can
delete them). A service that takes the folder's lock and then finds the name held by a
live service of its own user refuses, and names its pid (``SO_PEERCRED``). A name held by
another user, or by something that does not listen, is not taken for a service: the
``flock`` alone guards then (a name anyone can compute must not let another user keep our
service from starting). Abstract names are per network namespace: two containers sharing
the folder through a volume are told apart by the ``flock`` only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import stat
import struct
from pathlib import Path

__all__ = ["StateDirError", "StateDirInUse", "StateDirLock", "prepare_state_dir", "state_name"]

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
    """An exclusive ``flock`` on the state folder, and the abstract name of its path, held as
    long as the service runs there.

    Taken before the control socket is bound and before a crashed run's leftovers are
    looked for: a service that holds it knows that what the folder's record names is not
    another live service's. Both descriptors are close-on-exec (no instance inherits them)
    except across a re-exec, which hands them over (``adopt``).
    """

    def __init__(self, path: Path, fd: int, name: socket.socket | None) -> None:
        self.path = path
        self.fd: int | None = fd
        #: The listening abstract socket of the path (None where another user's process holds it).
        self.name = name

    @property
    def name_fd(self) -> int | None:
        return None if self.name is None else self.name.fileno()

    @classmethod
    def acquire(cls, path: Path) -> StateDirLock:
        """Lock ``path`` (a folder ``prepare_state_dir`` made or checked), or raise what holds it."""
        fd = _lock(path)
        try:
            name = _claim_name(path)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, name)

    @classmethod
    def adopt(cls, path: Path, fd: int, name_fd: int | None) -> StateDirLock:
        """After a re-exec: what the old service held, handed over (close-on-exec again).

        A record of older code hands no name: it is claimed now, the folder's lock being ours.
        """
        os.set_inheritable(fd, False)
        if name_fd is None:
            try:
                name = _claim_name(path)
            except StateDirError:
                name = None  # the lock is ours: whoever holds the name is not this folder's service
        else:
            name = socket.socket(fileno=name_fd)
            name.set_inheritable(False)
        return cls(path, fd, name)

    def follow(self) -> bool:
        """Lock the folder at ``path`` again if it is not the one locked (deleted, made again).

        The service calls this before it makes its control socket again (SIGHUP): the folder
        it makes or finds there is the one a service started on ``path`` would lock, and that
        one must find it locked. The name is the path's, and stays. True if the lock moved;
        ``StateDirError`` (``StateDirInUse``) if the folder there cannot be used, or is held.
        """
        assert self.fd is not None, "the lock was released"
        prepare_state_dir(self.path)
        try:
            now = os.stat(self.path)
        except OSError as exc:
            raise StateDirError(f"state_dir {self.path}: {exc.strerror}") from None
        held = os.fstat(self.fd)
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return False
        fd = _lock(self.path)
        os.close(self.fd)
        self.fd = fd
        return True

    def release(self) -> None:
        """Close the descriptors: the folder is free for the next service. Idempotent."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
        name, self.name = self.name, None
        if name is not None:
            name.close()


def _lock(path: Path) -> int:
    """A close-on-exec descriptor of the folder at ``path``, flocked; else what holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StateDirError(f"state_dir {path}: cannot open it: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(os.fstat(fd))
        os.close(fd)
        raise _in_use(path, holder) from None
    except OSError as exc:  # a file system without flock: said, not fatal
        os.close(fd)
        raise StateDirError(f"state_dir {path}: cannot lock it: {exc.strerror}") from None
    return fd


def _in_use(path: Path, holder: int | None, *, replaced: bool = False) -> StateDirInUse:
    who = "another service" if holder is None else f"another service (pid {holder})"
    how = ", whose folder was deleted or replaced while it runs" if replaced else ""
    return StateDirInUse(
        f"state_dir {path} is in use by {who}{how}: two services on one folder would each start "
        "every instance; stop the other first (supervisor shutdown, or SIGTERM), or give this "
        "manifest a state_dir of its own",
        holder,
    )


def state_name(path: Path) -> bytes:
    """The abstract socket address that stands for the folder at ``path`` (which exists)."""
    real = os.fsencode(os.path.realpath(path))
    digest = hashlib.sha256(real).hexdigest()[:40]
    return b"\0procward/state/%d/%s" % (os.geteuid(), digest.encode())


def _claim_name(path: Path) -> socket.socket | None:
    """Listen on the folder's abstract name; ``StateDirInUse`` if a live service of this user
    holds it; None if another user's process (or one that does not listen) does."""
    address = state_name(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        # Nobody accepts: a connection only asks who listens (SO_PEERCRED) and goes. The
        # backlog bounds how many refused starts learn the pid before they learn nothing.
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            return None  # no abstract names here: the flock alone guards
        holder = _name_holder(address)
        if holder is None or holder[1] != os.geteuid():
            return None
        raise _in_use(path, holder[0] or None, replaced=True) from None
    return sock


def _name_holder(address: bytes) -> tuple[int, int] | None:
    """(pid, uid) of the process that listens on ``address``; None if it does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(address)
        except OSError:  # ECONNREFUSED (bound, not listening), EAGAIN (its backlog is full)
            return None
        pid, uid, _ = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


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
