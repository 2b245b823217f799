"""A log file on disk: opened without following symlinks, rotated by size, losses counted.

The file and its folder are opened so that nothing planted in the folder can redirect
output: the folder with ``O_DIRECTORY | O_NOFOLLOW`` (a symlinked folder is refused),
then every open, rename and unlink relative to that folder's descriptor, and the file
with ``O_NOFOLLOW | O_NONBLOCK`` and checked to be a regular file (a symlink to a
root-owned file is refused; a planted fifo neither blocks the service nor takes the
output). The service checks the state folder itself (``statedir.py``), and where a log
folder inside it has to be made again while the service runs (the state folder deleted
under it: a cleaner of old files, an ``rm``), the state folder is made again with
``statedir.py``'s own function, 0700 as at start, not with the umask's mode as ``makedirs``
would make it (0755: others could list it, and with a looser umask, plant symlinks in it).

The file is written with ``os.write`` on an ``O_APPEND`` descriptor: no user-space
buffer, so there is nothing to lose on a crash of the service and nothing to flush.

Descriptors are what a service with ten thousand instances runs out of first, so a
log file holds as few as it can (issue 13): one descriptor per *folder*, shared by
every file in it (``_Folders``), and an open file only while it is being written to.
At most ``OPEN_FILES`` log files are open at once, the least recently written are
closed first (``_OpenFiles``), and a file is closed when its run ends (the sink sees
EOF). A closed file is opened again, by name, at its next write: that costs an open
when a quiet file speaks again, and makes a file moved away by hand start anew.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import queue
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .budget import Budget
from .statedir import StateDirError, prepare_state_dir

__all__ = ["OPEN_FILES", "LogFileError", "RotatingFile"]

logger = logging.getLogger("supervisor.logs")

# New files are not world-readable: captured output often holds secrets.
_FILE_MODE = 0o640
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
)
#: The most log files open at once, whatever the number of instances (see _OpenFiles).
OPEN_FILES = 256
# A line in progress may take a file this far past max_bytes (a fraction of it) to end
# in that file; a line that does not end within reach is cut at max_bytes.
_REACH_FRACTION = 8


class LogFileError(Exception):
    """A log file or its folder cannot be used; the message names the path and why."""


def open_folder(folder: Path, state_dir: Path | None = None) -> int:
    """A descriptor of ``folder`` (created if missing); never through a symlink at its last step.

    ``state_dir``: the service's state folder. A missing ``folder`` inside it may have gone with
    it; it is made again as the service's start makes it (``prepare_state_dir``: 0700, or checked
    if it is there), then ``folder`` in it as at start.
    """
    try:
        return os.open(folder, _FOLDER_FLAGS)
    except OSError as exc:
        first = exc
    try:
        found: os.stat_result | None = os.lstat(folder)
    except OSError:  # missing, or a step on the way is missing or not a folder
        found = None
    if found is not None:
        if stat.S_ISLNK(found.st_mode):
            raise LogFileError(
                f"the log folder {folder} is a symlink, and symlinks are not followed there: "
                "point the manifest at the real folder"
            )
        if not stat.S_ISDIR(found.st_mode):
            raise LogFileError(f"the log folder {folder} is not a folder")
        raise LogFileError(f"cannot open the log folder {folder}: {first.strerror}")
    try:
        if state_dir is not None and _inside(folder, state_dir):
            prepare_state_dir(state_dir)
        os.makedirs(folder, exist_ok=True)
        return os.open(folder, _FOLDER_FLAGS)
    except StateDirError as exc:
        raise LogFileError(f"cannot create the log folder {folder}: {exc}") from None
    except OSError as exc:
        raise LogFileError(f"cannot create the log folder {folder}: {exc.strerror}") from None


def _inside(folder: Path, state_dir: Path) -> bool:
    """``folder`` is ``state_dir`` or in it, as written (``..`` taken away, symlinks not followed)."""
    return Path(os.path.normpath(folder)).is_relative_to(os.path.normpath(state_dir))


def _exists(folder_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def open_file(folder_fd: int, path: Path) -> int:
    """An append descriptor of the regular file ``path.name`` in the folder open at ``folder_fd``."""
    try:
        fd = os.open(path.name, _FILE_FLAGS, _FILE_MODE, dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LogFileError(
                f"the log file {path} is a symlink, and symlinks are not followed there: "
                "point the manifest at the real file"
            ) from None
        if exc.errno == errno.ENXIO:  # a fifo nobody reads
            raise LogFileError(f"the log file {path} is not a regular file (a fifo)") from None
        raise LogFileError(f"cannot open the log file {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise LogFileError(f"the log file {path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


# -- shared folders and open files ----------------------------------------------------------

# ``web.out.log.3.dropped-PID-N`` was backup 3 of ``web.out.log`` (or the file ``web.out.log.3``
# itself, a name may end in digits): what is before ``.dropped-``, and that without a number.
_DROPPED = re.compile(r"^(?P<stem>(?P<file>.+?)(?:\.\d+)?)\.dropped-\d+-\d+$")


class _Folder:
    """One open log folder: its descriptor, its holders, and the leftovers found when it opened."""

    __slots__ = ("dropped", "fd", "holders", "key", "leftovers", "path")

    def __init__(self, key: str, path: Path, fd: int, leftovers: dict[str, list[str]]) -> None:
        self.key = key
        self.path = path
        self.fd = fd
        self.holders = 0
        #: Files dropped by a service that died before its reclaimer removed them, by the
        #: name of the file they belonged to: each file takes its own when it first opens.
        self.leftovers = leftovers
        self.dropped: set[str] = set()

    def same_as_path(self) -> bool:
        """The folder at ``path`` is still this one (not moved away and made anew)."""
        try:
            here, there = os.fstat(self.fd), os.lstat(self.path)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class _Folders:
    """The open log folders, one descriptor each, shared by the files in them.

    Before, every file opened its folder, and listed all of it for leftovers: with
    N instances in one folder, 2N folder descriptors and N listings of N files (at
    2,000 instances, half of the start-up). Now the folder is opened and listed once.
    """

    def __init__(self) -> None:
        self._open: dict[str, _Folder] = {}

    def acquire(self, path: Path, *, check: bool = False, state_dir: Path | None = None) -> _Folder:
        """The folder at ``path``, opened (and made) if no file holds it yet.

        ``check``: make sure the shared descriptor is still the folder at ``path``, and
        open the new one if it was moved away (a reopen after an external tool's move).
        ``state_dir``: as for ``open_folder``.
        """
        key = str(path)
        folder = self._open.get(key)
        if folder is None or (check and not folder.same_as_path()):
            fd = open_folder(path, state_dir)
            folder = _Folder(key, path, fd, _leftovers(fd))
            self._open[key] = folder  # one moved away stays open for its holders until they let go
        folder.holders += 1
        return folder

    def release(self, folder: _Folder) -> None:
        """Let go; the last holder closes it, once the files dropped there so far are gone."""
        folder.holders -= 1
        if folder.holders:
            return
        if self._open.get(folder.key) is folder:
            del self._open[folder.key]
        _RECLAIMER.wait_idle()  # it may still unlink in this folder: the descriptor must stay open
        os.close(folder.fd)


def _leftovers(folder_fd: int) -> dict[str, list[str]]:
    try:
        names = os.listdir(folder_fd)
    except OSError:
        return {}
    found: dict[str, list[str]] = {}
    for name in names:
        if ".dropped-" in name and (match := _DROPPED.match(name)):
            for owner in {match["stem"], match["file"]}:  # the first of them to open removes it
                found.setdefault(owner, []).append(name)
    return found


class _OpenFiles:
    """The log files open now, least recently written first; at most ``OPEN_FILES``.

    A file that is written to moves to the end (a dict operation per write, not per
    line); opening one more than the limit closes the one written to longest ago.
    So the service holds a bounded number of log file descriptors however many
    instances it runs, and the load-time check can count them exactly
    (``config/capacity.py``).
    """

    def __init__(self) -> None:
        self._files: OrderedDict[RotatingFile, None] = OrderedDict()

    def opened(self, file: RotatingFile) -> None:
        self._files[file] = None
        while len(self._files) > OPEN_FILES:
            oldest, _ = self._files.popitem(last=False)
            oldest._close_file()

    def written(self, file: RotatingFile) -> None:
        self._files.move_to_end(file)

    def closed(self, file: RotatingFile) -> None:
        self._files.pop(file, None)

    def __len__(self) -> int:
        return len(self._files)


# -- dropped files --------------------------------------------------------------------------


class _Reclaimer:
    """Unlinks dropped log files on one background thread, shared by every sink.

    Unlinking a file frees its page cache there and then: about 15 ms for a 20 MB file
    just written. Done on the event loop at each rotation, that stalls every other
    instance's logs and the control API; with many chatty children it adds up to most
    of the loop's time. So a rotation only renames the doomed file out of the way (a
    cheap rename: its target is a fresh name) and hands it over here. One thread for
    the whole service, started on the first drop, is all this costs.

    Files are handed over as a name in a folder descriptor; the file that owns the
    descriptor waits until the reclaimer is idle before it closes it. A file handed
    over just before the service dies stays behind under its ``.dropped-…`` name; a
    file removes such leftovers of its own when it opens.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, str, Path]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._names = itertools.count()

    def doomed_name(self, name: str) -> str:
        """A fresh name beside ``name`` to rename a file to before it is dropped."""
        return f"{name}.dropped-{os.getpid()}-{next(self._names)}"

    def drop(self, folder_fd: int, name: str, folder: Path) -> None:
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="log-reclaimer", daemon=True)
                self._thread.start()
        self._queue.put((folder_fd, name, folder))

    def wait_idle(self) -> None:
        """Block until every file handed over so far is gone (at close: nothing left behind)."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def _work(self) -> None:
        while True:
            folder_fd, name, folder = self._queue.get()
            try:
                os.unlink(name, dir_fd=folder_fd)
            except OSError as exc:
                logger.warning("cannot remove the dropped log file %s: %s", folder / name, exc.strerror)
            with self._idle:
                self._pending -= 1
                if not self._pending:
                    self._idle.notify_all()


# -- the loop's time for rotations ----------------------------------------------------------


#: A file's rotations, counted in renames (and a close and an open each): a rotation renames
#: every backup there is, one after another, in the event loop (10 to 30 µs each, 15 ms with a
#: thousand backups). Small files with many backups under a flood of output rotated hundreds of
#: times in one write (300 lines into 16-byte files with a thousand backups: the service deaf for
#: 6.7 s; 3,000 lines into one-byte files, seven minutes). 2,000 renames at once, 3,000 a second
#: (about a twentieth of the loop at 15 µs a rename): ordinary rotations (a few backups) never wait;
#: past that, the file is written beyond ``max_bytes`` until a rotation is due.
ROTATION_BURST, ROTATION_RENAMES_PER_SECOND = 2000, 3000


_RECLAIMER = _Reclaimer()
_FOLDERS = _Folders()
_OPEN_FILES = _OpenFiles()


# -- the file -------------------------------------------------------------------------------


class RotatingFile:
    """The file at ``path``, rotated by size, cut at line ends where it can be.

    When a write would take the file past ``max_bytes``, the bytes up to the last
    newline that still fits go into the current file, the file is shifted to
    ``path.1`` (``path.1`` to ``path.2`` … and the oldest beyond ``backups`` dropped;
    with ``backups == 0`` the file is dropped and started anew), and the rest goes
    into a fresh file. A line that does not fit starts in the fresh file. A line
    already started in a file, or longer than a whole file, ends in that file if its
    end is within reach (an eighth of ``max_bytes`` past the limit); otherwise it is
    cut at ``max_bytes`` and goes on in the next file. So output without newlines (a
    ``\\r`` progress bar) rotates like any other, and no file grows past
    ``max_bytes`` plus an eighth, unless its rotations have spent their share of the
    event loop (``ROTATION_RENAMES_PER_SECOND``: a flood into small files with many backups); then
    the file grows on until the next rotation is due. A ``max_bytes`` of 0 or less turns
    rotation off.

    ``state_dir``: the service's state folder, made again as at start where the file's
    folder is in it and has to be made again (``open_folder``).

    Disk errors (full disk, a removed folder, a refused path) must not take the
    instance down: they are logged once per streak, the bytes are counted in
    ``bytes_lost``, ``write_error`` says why while the streak lasts, ``on_change`` is
    called when a streak starts and when it ends, and the next write tries again.
    """

    # One per captured stream of every instance: no __dict__ each.
    __slots__ = (
        "_backups_present", "_check_folder", "_fd", "_folder", "_mid_line", "_on_change", "_rotation_failing",
        "_rotations", "_size", "_state_dir",
        "backups", "bytes_lost", "bytes_written", "leftovers_removed", "max_bytes", "path", "write_error",
    )

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        *,
        on_change: Callable[[], None] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = max(0, backups)
        self._state_dir = state_dir
        self.bytes_written = 0
        self.bytes_lost = 0
        #: Why output is being dropped now; None while writing works.
        self.write_error: str | None = None
        self._on_change = on_change
        self._folder: _Folder | None = None
        self._fd: int | None = None
        self._size = 0
        # The last byte written is not a newline: a line is in progress in this file.
        self._mid_line = False
        self._rotation_failing = False
        # How many backups (.1 to .k) there are, as far as the rotations since the folder was
        # acquired know; None: count them at the next rotation.
        self._backups_present: int | None = None
        self._rotations = Budget(ROTATION_BURST, ROTATION_RENAMES_PER_SECOND)
        #: Set after a re-exec: the service before it removed them already.
        self.leftovers_removed = False
        # Reopened by hand: the shared folder descriptor may name a folder moved away.
        self._check_folder = False

    # -- opening and closing ------------------------------------------------------------

    def open(self) -> None:
        """Open the folder (creating it) and the file if not open yet; ``LogFileError`` if they cannot be."""
        if self._fd is not None:
            return
        if "\0" in str(self.path):  # the OS would raise ValueError, which nobody above expects
            raise LogFileError(f"the log file path {str(self.path)!r} contains a NUL byte")
        if self._folder is None:
            self._folder = _FOLDERS.acquire(
                self.path.parent, check=self._check_folder, state_dir=self._state_dir
            )
            self._backups_present = None
            self._check_folder = False
            if not self.leftovers_removed:
                self._remove_leftovers()
        self._fd = open_file(self._folder.fd, self.path)
        self._size = os.fstat(self._fd).st_size
        _OPEN_FILES.opened(self)

    def open_quietly(self) -> None:
        """``open()``, with a failure counted as the start of a streak of losses instead of raised."""
        try:
            self.open()
        except LogFileError as exc:
            self._size = 0
            self._failed(str(exc))

    def reopen(self) -> None:
        """Let go of a file (and folder) an external tool moved away, and start anew at ``path``."""
        self.close()
        self._check_folder = True
        self.open_quietly()

    def idle(self) -> None:
        """Nothing writes now (a run ended): let go of the file's descriptor; the next write opens it."""
        self._close_file()

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Close the file and let go of its folder (closed by the last file in it)."""
        self._close_file()
        folder, self._folder = self._folder, None
        if folder is not None:
            _FOLDERS.release(folder)

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            _OPEN_FILES.closed(self)
            os.close(fd)

    def _remove_leftovers(self) -> None:
        """Files dropped by a service that died before its reclaimer removed them."""
        folder = self._folder
        assert folder is not None
        for name in folder.leftovers.pop(self.path.name, ()):
            if name not in folder.dropped:  # listed under two names: dropped once
                folder.dropped.add(name)
                _RECLAIMER.drop(folder.fd, name, folder.path)

    # -- writing ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._fd is None:
            self.open_quietly()  # first: the rotation below needs the size of the file as it is
        limit = self.max_bytes
        view = memoryview(data)
        if limit <= 0:
            self._emit(view)
            return
        reach = limit + limit // _REACH_FRACTION  # how far a file may grow to end a line
        pos, end = 0, len(data)
        rotated = False  # just rotated for the line at pos
        while pos < end:
            room = limit - self._size
            if end - pos <= room:
                self._emit(view[pos:])
                return
            cut = data.rfind(b"\n", pos, pos + room) if room > 0 else -1
            if cut >= 0:
                stop = cut + 1  # what fits; the next pass rotates
            elif self._size and not self._mid_line and not rotated:
                if self._rotations.left() <= 0:  # rotations have had their share: on in this file
                    self._emit(view[pos:])
                    return
                self._rotate()  # a line that does not fit starts in a fresh file
                rotated = True
                continue
            else:
                # A line started in this file, or one longer than a file: it ends here if
                # its end is within reach, else it is cut at the limit.
                allowance = reach - self._size
                newline = data.find(b"\n", pos, pos + allowance) if allowance > 0 else -1
                if newline >= 0:
                    stop = newline + 1
                elif room > 0:
                    stop = pos + room
                elif not rotated and self._rotations.left() > 0:
                    self._rotate()
                    rotated = True
                    continue
                else:  # the full file could not be moved away, or not now: write on rather than loop
                    newline = data.find(b"\n", pos)
                    stop = end if newline < 0 else newline + 1
            self._emit(view[pos:stop])
            pos = stop
            rotated = False

    def _rotate(self) -> None:
        """Shift the backups up by one and start a new file.

        The file that falls off the end is renamed away first and unlinked by the
        reclaimer's thread, so every rename here has a free target: replacing a file
        (by rename or truncation) would free the old one on the event loop. Renames
        replace names and never follow them: a symlink planted as ``path.1`` is just
        replaced.
        """
        self._close_file()
        folder = self._folder
        if folder is not None:
            try:
                self._shift(folder.fd)
            except OSError as exc:
                # The old file stays where it is and keeps growing; the next write tries again.
                if not self._rotation_failing:
                    self._rotation_failing = True
                    logger.error("log file %s: cannot rotate: %s", self.path, exc.strerror)
            else:
                self._rotation_failing = False
        self.open_quietly()

    def _shift(self, folder: int) -> None:
        """Rename the backups there are up by one, the oldest beyond ``backups`` away.

        Only the backups there are: ``.1`` to ``.k``, counted once (a stat each) while the
        folder is held and kept by the rotations since. Renaming every one of ``backups``
        names, there or not, cost a thousand renames per rotation from the first.
        """

        def rename(old: str, new: str) -> None:
            os.rename(old, new, src_dir_fd=folder, dst_dir_fd=folder)

        present = self._backups_present
        if present is None:
            present = 0
            while present < self.backups and _exists(folder, self._backup(present + 1)):
                present += 1
            self._rotations.spend(present)  # the stats
        self._rotations.spend(min(present, self.backups) + 3)  # the renames, the close and the open
        if present >= self.backups:
            oldest = self._backup(self.backups) if self.backups else self.path.name
            doomed = _RECLAIMER.doomed_name(oldest)
            try:
                rename(oldest, doomed)
            except FileNotFoundError:
                pass
            else:
                _RECLAIMER.drop(folder, doomed, self.path.parent)
            present = self.backups - 1 if self.backups else 0
        self._backups_present = None  # unknown until the renames below are done
        for index in range(present, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                rename(self._backup(index), self._backup(index + 1))
        if self.backups:
            with contextlib.suppress(FileNotFoundError):  # moved away by hand: counted anew next time
                rename(self.path.name, self._backup(1))
                self._backups_present = present + 1

    def _backup(self, index: int) -> str:
        return f"{self.path.name}.{index}"

    def _emit(self, view: memoryview) -> None:
        """Write all of ``view``: ``os.write`` may take only part of it."""
        self._mid_line = view[-1] != ord("\n")
        if self._fd is None:
            self.open_quietly()
            if self._fd is None:
                self.bytes_lost += len(view)
                return
        fd = self._fd
        _OPEN_FILES.written(self)
        while view:
            try:
                written = os.write(fd, view)
            except OSError as exc:
                self.bytes_lost += len(view)
                self._failed(f"log file {self.path}: {exc.strerror}")
                return
            view = view[written:]
            self._size += written
            self.bytes_written += written
        if self.write_error is not None:
            self.write_error = None
            logger.warning("log file %s: writing again (%d bytes lost so far)", self.path, self.bytes_lost)
            self._changed()

    def _failed(self, message: str) -> None:
        if self.write_error is None:
            self.write_error = message
            logger.error("%s; output is dropped until writing works again", message)
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:  # the owner's hook: its bug must not stop the log loop
                logger.exception("log file %s: the on_change hook failed", self.path)
