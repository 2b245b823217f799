"""The service's own cgroup: the instances' one made, the service moved into its leaf, undone.

Where the service's cgroup v2 folder is delegated to it (writable, with ``cgroup.kill``),
``supervisor run`` makes ``procward-PID`` below it for the instances and moves itself into
that folder's leaf, so that every process it starts is born inside; the guardian (guardian.py)
is spawned from there, steps out first thing, and at the service's death writes
``cgroup.kill``. This is made while the manifest is checked (service_process.py), in a thread
of its own (``PendingPlacement``): the move waits on the kernel.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

# The guardian's program imports nothing of ours: these two live there, and are shared.
from .guardian import _move, _own_cgroup

__all__ = ["CgroupPlacement", "PendingPlacement", "cgroup_before_the_exec", "delegated_cgroup"]


class CgroupPlacement:
    """The instances' cgroup made, and the service moved into its leaf, before the guardian starts.

    The move waits for the kernel's RCU grace period (10 to 25 ms): ``supervisor run`` makes
    the placement while its manifest is checked in a child (service_process.py), where the
    service has nothing else to do, and the guardian is spawned later from inside the leaf
    (it steps out first thing: ``_step_out``). A start that fails before a guardian takes the
    placement calls ``undo``: the service back where it came from, the folders gone.
    """

    def __init__(self, cgroup: Path | None, unavailable: str) -> None:
        self.cgroup = cgroup
        #: Why there is no cgroup, for the log once it is set up ("" where there is one).
        self.unavailable = unavailable
        self.taken = False

    @classmethod
    def make(cls) -> CgroupPlacement:
        try:
            cgroup, unavailable = delegated_cgroup()
        except OSError as exc:  # a folder that cannot be listed or removed: the guardian alone, as without
            return cls(None, f"cannot look at the service's cgroup: {exc.strerror or exc}")
        if cgroup is not None and not _move_into_leaf(os.getpid(), cgroup):
            with contextlib.suppress(OSError):
                cgroup.rmdir()
            return cls(None, f"cannot move the service into {cgroup}")
        return cls(cgroup, unavailable)

    @classmethod
    def start(cls) -> PendingPlacement:
        """``make`` in a thread of its own, for ``result`` later: the move waits on the kernel
        (its RCU grace period, 10 to 25 ms of a cold start), and ``supervisor run`` imports the
        service meanwhile; on the path to its first answer were both, one after the other."""
        return PendingPlacement()

    def undo(self) -> None:
        if self.cgroup is None or self.taken:
            return
        from .cgroups import SERVICE_LEAF

        _move(os.getpid(), self.cgroup.parent)
        for folder in (self.cgroup / SERVICE_LEAF, self.cgroup):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.cgroup = None


class PendingPlacement:
    """A ``CgroupPlacement`` being made in a thread (``CgroupPlacement.start``).

    The thread is started with every signal blocked (it inherits the mask), so that the kernel
    gives each to the main thread, where Python runs the handlers: one given to this thread
    would interrupt its writes to the cgroup's files for nothing.
    A process that moves between cgroups holds up every fork in the system until the move
    is done: start this after the forks of the same moment (the launch tools' probes).
    """

    def __init__(self) -> None:
        import threading

        self._made: CgroupPlacement | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._make, name="procward-placement", daemon=True)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._thread.start()
        finally:  # one that came meanwhile is delivered here, to the main thread
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _make(self) -> None:
        try:
            self._made = CgroupPlacement.make()
        except BaseException as exc:  # raised in the thread that asks for the result
            self._error = exc

    def result(self) -> CgroupPlacement:
        """The placement, once made; the thread is gone when this returns."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._made is not None
        return self._made


def _move_into_leaf(pid: int, cgroup: Path) -> bool:
    """Move the service straight into ``cgroup``'s leaf for it (cgroups.py), else into ``cgroup``.

    The instances' tree needs the service in a leaf of its own (the kernel's "no internal
    processes" rule); moved into ``cgroup`` first, it was moved a second time when the tree
    was opened. Each move waits for the kernel's RCU grace period: 10 to 25 ms of a cold start.
    """
    from .cgroups import SERVICE_LEAF

    leaf = cgroup / SERVICE_LEAF
    try:
        leaf.mkdir()
    except OSError:
        return _move(pid, cgroup)
    if _move(pid, leaf):
        return True
    with contextlib.suppress(OSError):
        leaf.rmdir()
    return _move(pid, cgroup)


def cgroup_before_the_exec() -> Path | None:
    """After a re-exec: ``procward-PID``, which the first start made and moved the service into
    the leaf of (``_move_into_leaf``); None where it did not (no delegated cgroup then)."""
    from .cgroups import SERVICE_LEAF

    own = _own_cgroup()
    if own is None or own.name != SERVICE_LEAF or own.parent.name != f"procward-{os.getpid()}":
        return None
    return own.parent


def delegated_cgroup() -> tuple[Path | None, str]:
    """A new cgroup v2 under the service's own, for the instances, where that is allowed.

    "Delegated" means here: the service's cgroup v2 folder is writable, a child can be
    made in it, and it has ``cgroup.kill`` (Linux 5.14). Empty ``procward-*`` folders
    left by earlier services are removed. Otherwise None, and the reason, for the log
    (``CgroupPlacement`` is made before the log is set up).
    """
    if os.environ.get("SUPERVISOR_CGROUP", "").lower() in ("0", "off", "no", "false"):
        return None, "SUPERVISOR_CGROUP is off"
    own = _own_cgroup()
    if own is None:
        return None, "no cgroup v2 hierarchy mounted"
    if not os.access(own, os.W_OK):
        return None, f"{own} is not writable"
    for stale in own.glob("procward-*"):
        if _service_lives(stale.name):
            # Another service's, running beside this one: its instances' cgroups are its own (an
            # empty one is a stopped instance's, not a leftover), and walking thousands of them
            # cost a cold start 180 ms.
            continue
        # From the bottom up: a service's own leaf and instance cgroups inside (cgroups.py). An
        # rmdir fails, as it should, where processes are left.
        for folder, _, _ in os.walk(stale, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    path = own / f"procward-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as exc:
        return None, f"cannot make {path}: {exc.strerror}"
    if not (path / "cgroup.kill").exists():
        path.rmdir()
        return None, "no cgroup.kill: Linux before 5.14"
    return path, ""


def _service_lives(name: str) -> bool:
    """Whether ``procward-PID`` names a process that is alive (a reused pid keeps a leftover: harmless)."""
    pid = name.removeprefix("procward-")
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")
