"""``supervisor run --pid-namespace``: the service as init of a PID namespace of its own (root only).

When the init of a PID namespace dies, the kernel SIGKILLs every other process in
it. So a service that is that init takes everything it started with it, however it
dies (``kill -9``, the OOM killer) and whatever its instances did: grandchildren,
daemons that double-forked into sessions of their own, a stopped guardian. No
guardian, record or cgroup is needed for that; they still run (and the record and
the guardian still act at a clean stop and the next start, as without a namespace).

Two processes make it:

- the *outer* one, the ``supervisor run`` that was started (its pid is the one the
  world sees: the pidfile, ``run -d``'s answer). It first stops what a crashed run
  outside a namespace left (the record, as ``/proc`` here shows it), then unshares a
  new PID and mount namespace and forks; it forwards TERM, INT, HUP, USR2 and QUIT to
  the inner one, writes the pidfile once the inner one answers on its socket, and
  exits with the inner one's status. It holds no instance and no socket.
- the *inner* one, pid 1 of the new namespace, with a ``/proc`` of its own (mounted
  in its private mount namespace, so ``/proc`` readers such as the guardian and the
  record see its pids). It dies with the outer one (a parent-death SIGKILL), and
  then the kernel kills the namespace.

The control socket is a file: ``supervisor status`` from outside works as usual. The
pids it shows are the namespace's own (``nsenter -t OUTER_PID -p -m`` to look at them
with other tools); ``supervisor signal`` reaches them from outside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

__all__ = ["PidNamespaceError", "remember_service_pid", "run_in_pid_namespace", "service_pid"]

_CLONE_NEWNS = 0x00020000
_CLONE_NEWPID = 0x20000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_REC, _MS_PRIVATE = 1 << 14, 1 << 18
_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGQUIT)


#: In the inner service: the outer process's pid (what the world knows the service by).
_outer_pid: int | None = None


def service_pid() -> int:
    """This service's pid as seen from outside: the outer process's when it runs in a namespace.

    What the control API reports, so that ``kill $(pid)`` from outside never aims at pid 1.
    """
    return _outer_pid or os.getpid()


def remember_service_pid(pid: int) -> None:
    """After a re-exec inside the namespace: the outer pid the first start was told (handoff/)."""
    global _outer_pid
    _outer_pid = pid if pid != os.getpid() else None


class PidNamespaceError(Exception):
    """The namespace cannot be made (not root, no kernel support); the message says what to do."""


def run_in_pid_namespace(
    state_dir: Path,
    run: Callable[[Callable[[], None]], int],
    *,
    pidfile: Path | None = None,
    ready_fd: int | None = None,
) -> int:
    """Run ``run(on_ready)`` as pid 1 of a new PID namespace; its exit status.

    ``on_ready`` is for the inner service to call once it answers on its socket: the
    outer process then writes ``pidfile`` and its own pid to ``ready_fd``.
    """
    if os.geteuid() != 0:
        raise PidNamespaceError("--pid-namespace needs root (CAP_SYS_ADMIN, to make the namespace)")
    if pidfile is not None:
        from .pidfile import live_service

        if other := live_service(pidfile):
            raise PidNamespaceError(f"pidfile {pidfile} names a running service (pid {other}): stop it first")
    _stop_outer_leftovers(state_dir)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWPID) != 0:  # for our next child; the mount namespace is the child's alone
        error = ctypes.get_errno()
        raise PidNamespaceError(f"cannot make a PID namespace: {os.strerror(error)}")
    outer = os.getpid()
    ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
    alive_read, alive_write = os.pipe2(os.O_CLOEXEC)  # EOF for the inner one: the outer one is gone
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # never returns: the outer process's caller is not ours to run twice
        global _outer_pid
        _outer_pid = outer
        status = 1
        try:
            os.setpgid(0, 0)  # a group of its own: a terminal's ^C reaches it once, not twice
            for fd in (ready_read, alive_write, ready_fd):
                if fd is not None:
                    os.close(fd)
            status = _inner(libc, alive_read, ready_write, run)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    os.close(ready_write)
    os.close(alive_read)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here: whichever runs first, the group exists for tcsetpgrp
    terminal = _hand_terminal(pid)
    for sig in _FORWARDED:
        signal.signal(sig, lambda signum, _frame: _forward(pid, signum))
    try:
        if _wait_ready(ready_read):
            _announce(outer, pidfile, ready_fd)
        os.close(ready_read)
        _, status = os.waitpid(pid, 0)
    finally:
        if terminal:
            _take_terminal_back()
        if pidfile is not None:
            from .pidfile import remove_pidfile

            remove_pidfile(pidfile)
        os.close(alive_write)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _stop_outer_leftovers(state_dir: Path) -> None:
    """A crashed run outside a namespace left processes the inner one cannot see: stop them here."""
    import anyio

    from .handoff.leftovers import stop_leftovers

    anyio.run(stop_leftovers, state_dir)


def _inner(libc: ctypes.CDLL, alive: int, ready: int, run: Callable[[Callable[[], None]], int]) -> int:
    """pid 1 of the new namespace: die with the outer process, get a /proc of our own, run."""
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return 1
    # Set now; a parent that died before it left the pipe at EOF (getppid() says 0 in here).
    poller = select.poll()
    poller.register(alive, select.POLLIN)
    if poller.poll(0):
        return 1
    if libc.unshare(_CLONE_NEWNS) != 0:
        return _failed("make a mount namespace")
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return _failed("make the mounts private")  # else our /proc would show outside too
    if libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None) != 0:
        return _failed("mount /proc")

    def on_ready() -> None:
        with contextlib.suppress(OSError):
            os.write(ready, b"1\n")
            os.close(ready)

    return run(on_ready)


def _failed(what: str) -> int:
    print(f"supervisor: --pid-namespace: cannot {what}: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    return 1


def _wait_ready(fd: int) -> bool:
    """Until the inner service says it answers (True) or ends first (False)."""
    while True:
        try:
            chunk = os.read(fd, 16)
        except InterruptedError:
            continue
        return bool(chunk)


def _announce(outer: int, pidfile: Path | None, ready_fd: int | None) -> None:
    if pidfile is not None:
        from .pidfile import PidfileError, write_pidfile

        try:
            write_pidfile(pidfile)
        except PidfileError as exc:
            print(f"supervisor: {exc}", file=sys.stderr)
    if ready_fd is not None:
        with contextlib.suppress(OSError), open(ready_fd, "wb", closefd=True) as notify:
            notify.write(f"{outer}\n".encode())


def _hand_terminal(pgid: int) -> bool:
    """Make the inner service's group the terminal's foreground one, if ours was; True if done.

    The terminal's ^C, ^\\ and hang-up then reach the service directly, once (a second
    INT would kill without grace), and the outer process forwards only what is sent to it.
    """
    try:
        if not os.isatty(0) or os.tcgetpgrp(0) != os.getpgrp():
            return False
        os.tcsetpgrp(0, pgid)
    except OSError:
        return False
    return True


def _take_terminal_back() -> None:
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # we are in the background now
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(0, os.getpgrp())
    finally:
        signal.signal(signal.SIGTTOU, previous)


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
