"""The OS edge: start a child with given fds in its own session, wait for it, signal it, reap it.

Why not ``anyio.open_process``: on Python 3.11 asyncio waits for each child with a
thread of its own (1,000 children, 1,001 threads). Here one child costs one pidfd:
``os.pidfd_open`` gives an fd that becomes readable when the process exits, and the
event loop waits on it like on a socket, under asyncio and trio alike.

Where pidfd is missing (kernels before 5.3, or a seccomp profile that refuses the
call) waiting falls back to the slower path: peeking with ``waitid(WNOHANG|WNOWAIT)``
on a growing interval, 5 ms up to 250 ms. So an exit is seen up to 250 ms late, and
each waiting child costs a wake-up four times a second. ``USE_PIDFD`` turns pidfd off
(tests use it to exercise the fallback).

Races handled here, and where:

- **pid reuse.** A pid is ours until we reap it, so nothing signals a pid after it
  was reaped (``Child.send_signal``), and the leftovers of a process group are killed
  while the leader is still a zombie, which keeps the pgid from being reused
  (``Child._reap``).
- **Stolen exit statuses.** The service is a child subreaper, so orphaned
  grandchildren become its children and must be reaped too. The orphan reaper peeks
  with ``WNOWAIT`` first and only reaps pids that are not registered direct children,
  whose statuses belong to their ``Child.wait`` (orphans.py). For the same
  reason ``subprocess.Popen`` is never allowed to reap a child behind our back.
- **The parent dies while the child starts.** ``PR_SET_PDEATHSIG`` only covers a
  death after it is set, so the parent pid is checked after setting it (launcher.py's
  ``child_setup``, or its gate after ``setpriv``), and then the child tells the group watch (the
  guardian, guardian.py) its pid, all before the program runs: a service killed at
  any moment of a spawn leaves a child that never runs the program, or a known group.

Everything here runs in the event-loop thread: ``spawn`` because the parent-death
signal fires when the *thread* that forked exits, the registry and the reaper
because they are not locked.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import grp
import os
import pwd
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio

from . import launcher
from .child_limits import ChildLimits

__all__ = [
    "USE_PIDFD",
    "Cgroup",
    "Child",
    "ChildLimits",
    "ExitStatus",
    "GroupWatch",
    "SpawnError",
    "exit_status",
    "inherited_fd_limit",
    "raise_fd_limit",
    "registered",
    "remember_fd_limit",
    "running_groups",
    "spawn",
    "watch_groups",
]

#: Wait for exits with a pidfd; False forces the polling fallback (set automatically on ENOSYS).
USE_PIDFD: bool = hasattr(os, "pidfd_open")
_POLL_FIRST = 0.005
_POLL_MAX = 0.25

#: Registered direct children, pid -> Child, from spawn until reaped.
_children: dict[int, Child] = {}
#: The RLIMIT_NOFILE the service started with; children get it back (see raise_fd_limit).
_inherited_nofile: tuple[int, int] | None = None


class Cgroup(Protocol):
    """An instance's cgroup (cgroups.py's ``InstanceCgroup``), as spawn and reap use it.

    ``path``: its folder; ``procs``: the path of its ``cgroup.procs``. ``join`` moves a
    pid in (raising on failure); ``kill`` kills every member, also those that left the
    process group.
    """

    path: str
    procs: str

    def join(self, pid: int) -> None: ...
    def kill(self) -> None: ...


class GroupWatch(Protocol):
    """Told of every process group from its spawn until its leader is reaped (the guardian).

    ``fd``: the service's write end of a pipe the starting child writes ``+PID\\n`` to
    itself before the program runs (the gate opens it as /proc/SERVICE/fd/FD: a POSIX
    shell names no fd above 9, and none is passed that could leak), or None.
    """

    fd: int | None

    def started(self, pgid: int) -> None: ...
    def ended(self, pgid: int) -> None: ...


_watch: GroupWatch | None = None


def watch_groups(watch: GroupWatch | None) -> None:
    """Tell ``watch`` of every group spawned from now on, and of its end (None: stop telling)."""
    global _watch
    _watch = watch


def running_groups() -> list[int]:
    """The process groups of the direct children not reaped yet (for a watch that starts late)."""
    return [child.pgid for child in _children.values()]


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a process ended. ``code`` and ``signal`` are both None if someone else reaped it."""

    pid: int
    code: int | None
    signal: int | None
    at: float

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        if self.code is not None:
            return f"exit code {self.code}"
        return "exit status lost (reaped elsewhere)"

    def succeeded(self, success_codes: Collection[int]) -> bool:
        return self.signal is None and self.code is not None and self.code in success_codes


def registered() -> Mapping[int, Child]:
    """The registered direct children by pid: their exit statuses belong to ``Child.wait``."""
    return _children


def exit_status(pid: int, status: int) -> ExitStatus:
    if os.WIFSIGNALED(status):
        return ExitStatus(pid, None, os.WTERMSIG(status), time.time())
    return ExitStatus(pid, os.WEXITSTATUS(status), None, time.time())


class SpawnError(Exception):
    """The command could not start (no such file, not executable, bad cwd, unknown user...)."""

    def __init__(self, argv: Sequence[str], cwd: str | None, errno: int | None, reason: str) -> None:
        super().__init__(list(argv), cwd, errno, reason)
        self.argv = list(argv)
        self.cwd = cwd
        self.errno = errno
        self.reason = reason

    def __str__(self) -> str:
        command = " ".join(self.argv) if self.argv else "an empty command"
        where = f" in {self.cwd}" if self.cwd else ""
        return f"cannot start {command}{where}: {self.reason}"


class Child:
    """A direct child, from spawn until reaped.

    One pidfd per child, and one task at a time parked on it: both backends refuse a
    second waiter on the same fd (BusyResourceError), so the first caller of ``wait``
    watches and the others wait for it to finish or be cancelled, then look again.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        argv: list[str],
        kill_group_on_exit: bool,
        cgroup: Cgroup | None = None,
    ) -> None:
        self.pid: int = popen.pid
        self.cgroup = cgroup
        self.pgid: int = popen.pid  # a new session: setsid() ran before exec, and Popen returns after exec
        self.argv = argv
        self.started_at: float = time.time()
        self.exit: ExitStatus | None = None
        self.kill_group_on_exit = kill_group_on_exit
        # Kept only so that Popen never reaps: its __del__ and subprocess._cleanup() poll
        # children whose returncode is None. _reap sets returncode.
        self._popen: subprocess.Popen[bytes] | None = popen
        self._pidfd = _open_pidfd(self.pid)
        self._watcher: anyio.Event | None = None  # set while a task is parked on the pidfd
        _children[self.pid] = self

    @classmethod
    def adopt(
        cls,
        pid: int,
        pgid: int,
        pidfd: int | None,
        argv: list[str],
        started_at: float,
        kill_group_on_exit: bool,
    ) -> Child:
        """A child the service spawned before it re-exec'd itself (handoff): same pid, same pidfd.

        It is our child still (exec keeps the pid), so it is waited for and reaped as
        any other; registered at once, so the orphan reaper leaves its exit status alone.
        """
        child = cls.__new__(cls)
        child.pid, child.pgid, child.argv = pid, pgid, argv
        child.started_at = started_at
        child.exit = None
        child.kill_group_on_exit = kill_group_on_exit
        child.cgroup = None  # the instance gives it back its cgroup once adopted (adoption.py)
        child._popen = None
        child._pidfd = pidfd if pidfd is not None else _open_pidfd(pid)
        child._watcher = None
        _children[pid] = child
        return child

    @property
    def pidfd(self) -> int | None:
        """The pidfd waited on (None: the polling fallback); for the handoff, which keeps it."""
        return self._pidfd

    def __repr__(self) -> str:
        state = self.exit.describe() if self.exit else "running"
        return f"<Child pid={self.pid} {self.argv[0]!r} {state}>"

    def send_signal(self, sig: int, *, group: bool = True) -> bool:
        """Signal the process group (or the leader alone); False if nothing was there.

        Never after reaping: the pid may belong to someone else by then.
        """
        if self.exit is not None:
            return False
        try:
            if group:
                os.killpg(self.pgid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    async def wait(self) -> ExitStatus:
        """Wait for the leader to exit, reap it, and return how it ended.

        Reaping happens with no checkpoint after the wake-up, so a cancelled waiter
        either reaped (and ``exit`` is set for everyone) or did not touch anything.
        """
        while self.exit is None:
            if self._watcher is not None:
                await self._watcher.wait()
                continue
            self._watcher = done = anyio.Event()
            try:
                if self._pidfd is not None:
                    await anyio.wait_readable(self._pidfd)
                    self._reap(block=True)
                else:
                    await self._poll_until_exited()
            finally:
                self._watcher = None
                done.set()
                if self.exit is not None:
                    self._close_pidfd()  # poll() may have reaped while we were parked on it
        return self.exit

    def poll(self) -> ExitStatus | None:
        """Reap the child if it has exited, without blocking."""
        self._reap(block=False)
        return self.exit

    async def _poll_until_exited(self) -> None:
        """The fallback without pidfd: peek on a growing interval."""
        delay = _POLL_FIRST
        while not self._reap(block=False):
            await anyio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)

    def _reap(self, *, block: bool) -> bool:
        """Reap the leader if it has exited (``block``: we know it has); True once reaped.

        Peek first (WNOWAIT): while the leader is an unreaped zombie its pid, and so its
        pgid, cannot be reused, which makes killing the rest of its group safe.
        """
        if self.exit is not None:
            return True
        flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
        try:
            if os.waitid(os.P_PID, self.pid, flags) is None:
                return False
        except ChildProcessError:  # reaped by someone else: the pid is not ours any more
            self._finish(ExitStatus(self.pid, None, None, time.time()))
            return True
        if self.kill_group_on_exit:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
            if self.cgroup is not None:  # and what left the group (setsid) but not the cgroup
                self.cgroup.kill()
        _, status = os.waitpid(self.pid, 0)  # a zombie: returns at once
        self._finish(exit_status(self.pid, status))
        return True

    def _finish(self, status: ExitStatus) -> None:
        self.exit = status
        if self._popen is not None:
            self._popen.returncode = status.code if status.code is not None else -(status.signal or 0)
        _children.pop(self.pid, None)
        if _watch is not None:
            _watch.ended(self.pgid)
        if self._watcher is None:  # else the watcher closes it: never close an fd a loop is polling
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def _open_pidfd(pid: int) -> int | None:
    global USE_PIDFD
    if not USE_PIDFD:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError as exc:  # ENOSYS, or EPERM from seccomp, or out of fds: poll this one
        if exc.errno in (errno_codes.ENOSYS, errno_codes.EPERM):
            USE_PIDFD = False
        return None


def spawn(
    argv: Sequence[str],
    *,
    stdin: int | None,
    stdout: int | None,
    stderr: int | None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    user: str | int | None = None,
    group: str | int | None = None,
    umask: int | None = None,
    parent_death_signal: int | None = signal.SIGKILL,
    kill_group_on_exit: bool = True,
    limits: ChildLimits | None = None,
    cgroup: Cgroup | None = None,
) -> Child:
    """Start ``argv`` in a new session with the given fds as its 0/1/2 (None: /dev/null).

    Call it from the event-loop thread: the parent-death signal is sent when the
    thread that forked exits, not the process, so a worker thread would kill the
    child as soon as the thread pool retires it. The fds passed in stay open (the
    caller closes its copies); every other fd of the service is closed in the child.
    A failing chdir or exec in the child comes back from Popen as an OSError, and
    becomes a SpawnError like every other reason the command cannot start.

    ``user`` alone also sets the user's primary group and, when the service runs as
    root, its supplementary groups: a child dropped to a user must not keep root's.
    ``limits`` are set after that switch, as the user (child_limits.py).

    ``cgroup``: the child moves itself into it before its program runs where it keeps
    the service's user (the gate writes its own pid, or exits 125, then execs the
    program); else the service moves it right after the spawn (a move costs the loop
    0.1 ms, and now and then 10 ms: the kernel waits for an RCU grace period). So a
    child dropped to another ``user`` (who may not move itself) is moved while it still runs the launchers
    (prlimit, setpriv, the gate: none of them forks), unless the service loses the
    CPU for longer than those three execs take: then the program may run, and fork,
    a moment before the move, and what it forked then stays outside (docs/guide.md).
    A child that cannot be moved is killed: it never runs outside the cgroup it was given.
    """
    argv = list(argv)
    if not argv:
        raise SpawnError(argv, cwd, None, "empty command")
    nofile = _inherited_nofile
    watch = _watch
    register = watch.fd if watch is not None and parent_death_signal is not None else None
    limits = limits or ChildLimits()
    own_user = user is None
    death = parent_death_signal
    before = launcher.argv_before(death, nofile, register, env, limits, cgroup, own_user=own_user)
    setup = None if before else launcher.child_setup(
        os.getpid(), parent_death_signal, nofile, register, limits, cgroup, own_user=own_user
    )
    if signal.pthread_sigmask(signal.SIG_BLOCK, ()):  # what this thread blocks now (one syscall)
        setup = _with_no_blocked_signals(setup)
    try:
        uid, gid, groups = _credentials(user, group)
        if before:
            launcher.check_program(argv[0], cwd, env)
        popen = subprocess.Popen(
            [*before, *argv] if before else argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.DEVNULL if stdout is None else stdout,
            stderr=subprocess.DEVNULL if stderr is None else stderr,
            cwd=cwd,
            env=launcher.launch_env(before, env) if before else env,
            user=uid,
            group=gid,
            extra_groups=groups,
            umask=-1 if umask is None else umask,
            start_new_session=True,
            close_fds=True,
            preexec_fn=setup,
        )
    except OSError as exc:
        raise SpawnError(argv, cwd, exc.errno, str(exc)) from exc
    except KeyError as exc:
        raise SpawnError(argv, cwd, None, str(exc.args[0] if exc.args else exc)) from exc
    except (ValueError, subprocess.SubprocessError) as exc:
        raise SpawnError(argv, cwd, None, str(exc)) from exc
    if cgroup is not None and user is not None:  # else the child moved itself (or did not run)
        try:
            cgroup.join(popen.pid)
        except Exception as exc:  # the cgroup's own error type: process.py imports nothing of ours
            popen.kill()
            popen.wait()
            raise SpawnError(argv, cwd, None, str(exc)) from exc
    if watch is not None and (register is None or user is not None):
        # The child registered its group itself, before its program ran (the gate, or
        # child_setup), unless it was dropped to another user (who cannot open the service's
        # /proc). Telling the guardian again would wake it a second time for each spawn: a
        # context switch on the event loop's time, a tenth of a spawn's cost.
        watch.started(popen.pid)
    return Child(popen, argv, kill_group_on_exit, cgroup)


def _with_no_blocked_signals(setup: Callable[[], None] | None) -> Callable[[], None]:
    """``setup``, then every signal unblocked: the child's mask as the service's is normally.

    A child inherits its parent's signal mask through fork and exec, and the service blocks
    its stop signals for a while at times (a re-exec holds them from the request until the
    new service listens: handoff/signals.py). An instance spawned then (a restart, a reload's
    new entry) ran for good with SIGTERM, SIGINT and SIGHUP blocked: its stop waited for the
    SIGKILL. A forked child has no pending signals, so unblocking them here delivers nothing.
    The ``preexec_fn`` makes Popen fork instead of vfork: slower, only while signals are held.
    """

    def unblocked() -> None:
        if setup is not None:
            setup()
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

    return unblocked


def _credentials(
    user: str | int | None, group: str | int | None
) -> tuple[int | None, int | None, list[int] | None]:
    """(uid, gid, supplementary groups) for Popen; a KeyError names what is unknown.

    Only root may (and must) set the supplementary groups: a child dropped to a user
    must not keep root's.
    """
    gid = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid if isinstance(group, str) else group
        except KeyError:
            raise KeyError(f"unknown group {group!r}") from None
    if user is None:
        return None, gid, None
    root = os.geteuid() == 0
    try:
        entry = pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
    except KeyError:
        if isinstance(user, str):
            raise KeyError(f"unknown user {user!r}") from None
        return user, gid, [] if root else None  # a bare uid without a passwd entry
    gid = entry.pw_gid if gid is None else gid
    return entry.pw_uid, gid, os.getgrouplist(entry.pw_name, gid) if root else None


def inherited_fd_limit() -> tuple[int, int] | None:
    """The RLIMIT_NOFILE the service started with, if it raised it (children get it back)."""
    return _inherited_nofile


def remember_fd_limit(limit: tuple[int, int] | None) -> None:
    """After a re-exec: the limit the *first* start found, which the exec kept raised."""
    global _inherited_nofile
    _inherited_nofile = limit


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE as far as it goes; return the new soft limit.

    To the hard limit; and where the process may (root with CAP_SYS_RESOURCE), the hard
    limit first to the kernel's ceiling ``fs.nr_open``: 10,000 instances with captured
    output need about 30,000 descriptors (config/capacity.py counts them). A refused
    raise of the hard limit (root in a container without the capability) is no error:
    the soft limit still goes up to the hard one, and the load-time check has said
    whether that is enough. Children get the limit the service started with back, as
    systemd does: programs that size tables or close-loops by the soft limit, or use
    select(), expect the usual 1,024.
    """
    global _inherited_nofile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = 1 << 20
    if hard != resource.RLIM_INFINITY and hard < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, ceiling))
        except (OSError, ValueError):  # EPERM: not ours to raise
            pass
        else:
            if _inherited_nofile is None:
                _inherited_nofile = (soft, hard)
            hard = ceiling
    target = ceiling if hard == resource.RLIM_INFINITY else hard  # the soft limit cannot exceed nr_open
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft
        if _inherited_nofile is None:
            _inherited_nofile = (soft, hard)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
