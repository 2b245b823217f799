"""Per-instance cgroups (v2): the OS edge for putting each instance in a cgroup of its own.

What a cgroup adds to a process group: membership a program cannot leave (a
grandchild that calls ``setsid`` leaves its process group, not its cgroup), a
kill of every member at once (``cgroup.kill``, Linux 5.14), a way to know that
every member is gone (``populated 0`` in ``cgroup.events``), and kernel-enforced
limits where the controllers are there (``memory.max``, ``cpu.max``).

Where the service's cgroups go. The service's own cgroup ``X`` (the ``0::`` line
of /proc/self/cgroup, under the cgroup2 mount found in /proc/self/mountinfo):

- *Delegated*: the service (and what it started) is alone in ``X``, and ``X`` is
  not the root. This is the usual case: the guardian (guardian.py) makes
  ``procward-PID`` and moves the service into it before any instance starts;
  or systemd's ``Delegate=yes``. The kernel forbids processes in a cgroup whose
  controllers are enabled for its children (the "no internal processes" rule),
  so the service first moves itself into the leaf ``X/service``; the instances
  get ``X/NAME.instance``. After a re-exec the service finds itself in
  ``X/service`` and uses ``X`` again.
- *Shared*: ``X`` holds other processes or is the root (a ``Manager`` embedded
  in a program that runs in a login session's cgroup, or with the guardian's
  cgroup turned off). Nothing of theirs is moved: the service makes
  ``X/procward.PID`` (``procward.PID.N`` for a second manager in the process)
  and the instance cgroups in it. (Not ``procward-PID``: a starting service's
  guardian removes the empty ``procward-*`` it finds, left by services killed
  before they could.) Enabling controllers may then be refused
  (``EBUSY``: the rule above, for ``X``): those controllers are missing.

Controllers are asked for one by one (``memory``, ``cpu``): each is used where
``X`` has it (``cgroup.controllers``) and it can be enabled down the tree
(``cgroup.subtree_control``); what is missing, and why, is in ``CgroupTree.missing``
for the caller to say once. Instance directories are named ``NAME.instance``
so that no instance name (``memory.max`` is a valid one) meets an interface file.

Nothing here imports the rest of the package (like ``process.py``), and nothing
blocks for long: each call is a few small reads or writes of kernfs files.
Waiting for a cgroup to empty is an inotify watch on ``cgroup.events``, not polling.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_codes
import math
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio

__all__ = [
    "CONTROLLERS",
    "CgroupError",
    "CgroupTree",
    "InstanceCgroup",
    "cpu_max",
    "find_v2_mount",
    "own_cgroup",
]

#: The controllers a manifest's limits need: memory.max, cpu.max.
CONTROLLERS = ("memory", "cpu")
#: cpu.max's period, as systemd writes CPUQuota= (100 ms).
CPU_PERIOD_US = 100_000
#: The leaf the service moves into, beside its instances' cgroups (the "no internal processes" rule).
SERVICE_LEAF = "service"
_SUFFIX = ".instance"
_SHARED_PREFIX = "procward."


#: Shared trees made by this process so far (a second one gets a name of its own).
_shared_trees = 0


class CgroupError(Exception):
    """A cgroup could not be made, joined or used; the message says which file and why."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def find_v2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup2 filesystem is mounted (/sys/fs/cgroup, or .../unified on a hybrid), or None."""
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        # "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER": the type
        # comes after the lone "-"; the mount point is escaped as \040 for a space.
        before, _, after = line.partition(b" - ")
        fields = before.split()
        if after.split()[:1] == [b"cgroup2"] and len(fields) >= 5 and fields[3] == b"/":
            return _unescape(fields[4].decode(errors="surrogateescape"))
    return None


def _unescape(path: str) -> str:
    for code in ("\\040", "\\011", "\\012", "\\134"):
        path = path.replace(code, chr(int(code[1:], 8)))
    return path


def own_cgroup(proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """The service's cgroup v2 path (``/`` for the root), from the ``0::`` line; None without one."""
    try:
        with open(proc_cgroup, "rb") as f:
            lines = f.read().decode(errors="surrogateescape").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            path = line[3:]
            return None if path.endswith(" (deleted)") else path
    return None


def _v1_holder(controller: str, proc_cgroup: str = "/proc/self/cgroup") -> bool:
    """True when a cgroup v1 hierarchy holds ``controller`` (a hybrid machine)."""
    with contextlib.suppress(OSError), open(proc_cgroup) as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) == 3 and parts[0] != "0" and controller in parts[1].split(","):
                return True
    return False


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    """One write(2) of ``text``: kernfs files take a value per write, and say no through errno."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def cpu_max(cpus: float | None) -> str:
    """cpu.max's text for ``cpus`` CPUs (0.5: half of one, 2: two): ``QUOTA PERIOD``, or ``max``."""
    if cpus is None:
        return f"max {CPU_PERIOD_US}"
    return f"{max(1000, math.ceil(cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"


@dataclass
class CgroupTree:
    """The cgroups of one service: ``root`` holds one directory per instance.

    ``controllers``: enabled for the instance cgroups. ``missing``: controller → why
    not. ``made``: the service made ``root`` (so it removes it at the end).
    """

    mount: str
    root: str
    controllers: frozenset[str]
    missing: dict[str, str] = field(default_factory=dict)
    made: bool = False
    kill_file: bool = True

    @classmethod
    def open(cls, wanted: Iterable[str] = CONTROLLERS) -> CgroupTree:
        """Find or make the service's tree; CgroupError when cgroup v2 is not there or not writable."""
        mount = find_v2_mount()
        if mount is None:
            raise CgroupError("no cgroup2 filesystem is mounted (cgroup v1 only)")
        own = own_cgroup()
        if own is None:
            raise CgroupError("the service is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")
        here = os.path.normpath(mount + own)
        if own != "/" and os.path.basename(here) == SERVICE_LEAF:
            return cls._build(mount, os.path.dirname(here), wanted)  # moved there before a re-exec
        if own != "/" and _alone(here):
            leaf = os.path.join(here, SERVICE_LEAF)
            try:
                os.makedirs(leaf, exist_ok=True)
                for pid in _members(here):
                    _write(os.path.join(leaf, "cgroup.procs"), str(pid))
            except OSError as exc:
                raise CgroupError(f"cannot move the service into {leaf}: {_reason(exc)}") from None
            return cls._build(mount, here, wanted)
        _sweep(here)
        global _shared_trees
        _shared_trees += 1
        name = f"{_SHARED_PREFIX}{os.getpid()}" + (f".{_shared_trees}" if _shared_trees > 1 else "")
        root = os.path.join(here, name)
        try:
            os.mkdir(root)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupError(f"cannot make a cgroup in {here}: {_reason(exc)}") from None
        tree = cls._build(mount, root, wanted)
        tree.made = True
        return tree

    @classmethod
    def _build(cls, mount: str, root: str, wanted: Iterable[str]) -> CgroupTree:
        """Enable what ``wanted`` names and ``root``'s parent offers, for the instance cgroups in ``root``."""
        parent = os.path.dirname(root)
        try:
            available = set(_read(os.path.join(parent, "cgroup.controllers")).split())
        except OSError as exc:
            raise CgroupError(f"cannot read {parent}/cgroup.controllers: {_reason(exc)}") from None
        enabled: set[str] = set()
        missing: dict[str, str] = {}
        for controller in wanted:
            if controller not in available:
                where = "held by a cgroup v1 hierarchy" if _v1_holder(controller) else "not delegated"
                missing[controller] = f"not available in {parent} ({where})"
                continue
            try:
                _enable(parent, controller)
                _enable(root, controller)
            except OSError as exc:
                why = "it holds processes" if exc.errno == errno_codes.EBUSY else _reason(exc)
                missing[controller] = f"cannot be enabled in {parent}: {why}"
                continue
            enabled.add(controller)
        kill_file = os.path.exists(os.path.join(root, "cgroup.kill"))
        return cls(mount, root, frozenset(enabled), missing, kill_file=kill_file)

    def instance(self, name: str) -> InstanceCgroup:
        """The instance's cgroup, made if it is not there yet (and its tree's root, if that is gone)."""
        path = os.path.join(self.root, name + _SUFFIX)
        for attempt in range(3):
            try:
                try:
                    os.mkdir(path)  # one system call where the root is there (makedirs: a stat first)
                except FileNotFoundError:
                    os.makedirs(path, exist_ok=True)
                except FileExistsError:
                    if not os.path.isdir(path):
                        raise
                break
            except FileNotFoundError:  # the root went while makedirs made it: once more
                if attempt == 2:
                    raise CgroupError(f"cannot make the cgroup {path}: its parent keeps going away") from None
            except OSError as exc:
                raise CgroupError(f"cannot make the cgroup {path}: {_reason(exc)}") from None
        return InstanceCgroup(path, self.controllers, self.kill_file)

    def existing(self, name: str) -> InstanceCgroup:
        """The cgroup of an instance adopted at a re-exec: there already (its program runs in it).

        No mkdir: 1,000 adopted instances cost 1,000 system calls less in the handover.
        """
        return InstanceCgroup(os.path.join(self.root, name + _SUFFIX), self.controllers, self.kill_file)

    def close(self) -> None:
        """Remove the tree's empty instance cgroups, and its root if the service made it."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if entry.is_dir(follow_symlinks=False) and entry.name.endswith(_SUFFIX):
                    with contextlib.suppress(OSError):
                        os.rmdir(entry.path)
        if self.made:
            with contextlib.suppress(OSError):
                os.rmdir(self.root)

    def describe(self) -> str:
        """One line for the service's log: where instances go, and what is missing."""
        kill = "group kill by cgroup.kill" if self.kill_file else "no cgroup.kill (Linux < 5.14): kill by pid"
        uses = ", ".join(sorted(self.controllers)) or "no controllers"
        line = f"cgroup v2: each instance in its own cgroup under {self.root} ({kill}; {uses})"
        if self.missing:
            line += "; missing: " + "; ".join(f"{c}: {why}" for c, why in sorted(self.missing.items()))
        return line


def _enable(cgroup: str, controller: str) -> None:
    control = os.path.join(cgroup, "cgroup.subtree_control")
    if controller not in _read(control).split():
        _write(control, f"+{controller}")


def _members(cgroup: str) -> list[int]:
    return [int(pid) for pid in _read(os.path.join(cgroup, "cgroup.procs")).split()]


def _alone(cgroup: str) -> bool:
    """True when every process in ``cgroup`` is the service or a child of it (its guardian)."""
    me = os.getpid()
    try:
        pids = _members(cgroup)
    except OSError:
        return False
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rpartition(b")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid != me:
            return False
    return True


def _sweep(top: str) -> None:
    """Remove the empty trees of services that are gone (killed before they could clean up)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(top):
            pid = entry.name.removeprefix(_SHARED_PREFIX).partition(".")[0]
            # A pid of 1 is a service that was PID 1 of a namespace (unshare --pid): from here /proc/1
            # is init, alive for ever. Only empty cgroups go, so a live one loses nothing it uses.
            if entry.name == pid or not pid.isdigit() or (pid != "1" and os.path.exists(f"/proc/{pid}")):
                continue
            with contextlib.suppress(OSError):
                for inner in os.scandir(entry.path):
                    if inner.is_dir(follow_symlinks=False):
                        with contextlib.suppress(OSError):
                            os.rmdir(inner.path)
                os.rmdir(entry.path)


class InstanceCgroup:
    """One instance's cgroup: join, limit, kill, wait until empty, remove."""

    def __init__(self, path: str, controllers: frozenset[str], kill_file: bool = True) -> None:
        self.path = path
        self.procs = os.path.join(path, "cgroup.procs")
        self.controllers = controllers
        self.kill_file = kill_file

    def __repr__(self) -> str:
        return f"<InstanceCgroup {self.path}>"

    def limit(self, memory_max: int | None, cpus: float | None) -> None:
        """Write memory.max and cpu.max (``max`` when unset) where those controllers are enabled."""
        try:
            if "memory" in self.controllers:
                _write(
                    os.path.join(self.path, "memory.max"), "max" if memory_max is None else str(memory_max)
                )
            if "cpu" in self.controllers:
                _write(os.path.join(self.path, "cpu.max"), cpu_max(cpus))
        except OSError as exc:
            raise CgroupError(f"cannot set the limits of {self.path}: {_reason(exc)}") from None

    def join(self, pid: int) -> None:
        """Move ``pid`` (all its threads) into this cgroup."""
        try:
            _write(self.procs, str(pid))
        except OSError as exc:
            raise CgroupError(f"cannot move pid {pid} into {self.path}: {_reason(exc)}") from None

    def pids(self) -> list[int]:
        try:
            return _members(self.path)
        except OSError:
            return []

    def populated(self) -> bool:
        """True while a process (a zombie not yet reaped included) is in the cgroup."""
        try:
            text = _read(os.path.join(self.path, "cgroup.events"))
        except FileNotFoundError:
            return False
        return "populated 1" in text

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, also those that left their process group."""
        if self.kill_file:
            with contextlib.suppress(FileNotFoundError):
                _write(os.path.join(self.path, "cgroup.kill"), "1")
            return
        for pid in self.pids():  # before 5.14: one by one (a fork in between escapes this round)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until no process is left (``populated 0``), up to ``timeout`` seconds; False if not.

        The kernel signals a change of cgroup.events as a modification of the file, which
        inotify reports: the wait costs nothing until then. Where no inotify instance is
        to be had (``fs.inotify.max_user_instances``, 128 by default, all taken), it
        looks again on a growing interval, 1 ms to 100 ms.
        """
        if not self.populated():
            return True
        with anyio.move_on_after(timeout):
            try:
                with _Watch(os.path.join(self.path, "cgroup.events")) as watch:
                    while self.populated():
                        await watch.changed()
            except FileNotFoundError:  # the cgroup went away meanwhile: nothing can be in it
                pass
            except OSError:
                delay = 0.001
                while self.populated():
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 0.1)
            return True
        return not self.populated()

    def remove(self) -> None:
        """rmdir the cgroup (it must be empty); gone already is fine."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CgroupError(f"cannot remove the cgroup {self.path}: {_reason(exc)}") from None

    async def close(self, timeout: float = 5.0) -> None:
        """Kill what is left, wait until it is gone, remove the cgroup: the instance is removed."""
        self.kill()
        if not await self.wait_empty(timeout):
            raise CgroupError(f"{self.path} still holds processes {timeout:g}s after cgroup.kill")
        self.remove()


_IN_MODIFY = 0x2
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


class _Watch:
    """An inotify watch on one file, waited on in the event loop (both anyio backends)."""

    _libc: ctypes.CDLL | None = None

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _Watch:
        libc = _Watch._libc or ctypes.CDLL(None, use_errno=True)
        _Watch._libc = libc
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"inotify_init1: {os.strerror(error)}")
        if libc.inotify_add_watch(fd, os.fsencode(self.path), _IN_MODIFY) < 0:
            error = ctypes.get_errno()
            os.close(fd)
            raise OSError(error, os.strerror(error), self.path)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def changed(self) -> None:
        await anyio.wait_readable(self.fd)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass
