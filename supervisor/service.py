"""``supervisor run``: the manager, the control server, signals, and the service's own stdio.

The service is the one long-lived process. It owns a task group holding the
manager (and through it every instance), the control server and the orphan
reaper, and it turns signals into requests: TERM and INT shut down
gracefully (a second INT kills at once), HUP reloads the manifest, USR2
reopens every log file for an external logrotate.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio

from .config import Manifest, ManifestError, load_manifest
from .events import Transition, Update
from .guardian import Guardian
from .manager import ApplyError, Manager, ReloadReport
from .process import become_subreaper, living_children, raise_fd_limit, run_orphan_reaper
from .statedir import StateDirError, prepare_state_dir
from .stdio import Stdio, StdioStream

log = logging.getLogger("supervisor")


class Service:
    """One running manifest: what ``supervisor run`` keeps alive until it is told to stop."""

    def __init__(self, manifest: Manifest, *, environ: Mapping[str, str] | None = None) -> None:
        self.manifest = manifest
        self.manager = Manager(manifest, environ=environ)
        self._stopping = False
        self._cancel: anyio.CancelScope | None = None
        self._manager_done = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until shutdown; the manager's instances are all stopped when this returns."""
        # The control plane is imported only by the service, never by `supervisor status`.
        from .api.server import ControlError, ControlListeners, serve_control

        _one_line_for_accept_errors()

        # Made 0700 if missing; an existing one must be ours and private, and is not chmod-ed.
        prepare_state_dir(self.manifest.state_dir)
        # Bound before any instance starts: a second service on this manifest stops here.
        try:
            listeners = ControlListeners(self.manifest)
        except OSError as exc:  # its folder cannot be made, a name too long…: one line, not a traceback
            raise ControlError(_socket_problem(self.manifest.control_socket, exc)) from None
        except ValueError:  # a NUL byte in the path
            path = str(self.manifest.control_socket)
            raise ControlError(f"control socket {path!r}: a NUL byte is not allowed in a path") from None
        guardian = _start_guardian()
        if any(config.limits.memory for config in self.manifest.instances.values()):
            log.info(
                "limits.memory is enforced by restarting an instance whose group stays over it; "
                "no per-instance cgroup memory.max is set (not implemented yet, see the guide's Limits)"
            )
        with anyio.CancelScope() as self._cancel:
            async with anyio.create_task_group() as tg:
                if guardian is not None:
                    tg.start_soon(guardian.watch)
                tg.start_soon(self._log_transitions)
                tg.start_soon(run_orphan_reaper)
                tg.start_soon(self._handle_signals)
                # Served before the first instance is made: status answers while they spawn (the
                # manager yields between spawns), and a cold start answers as soon as it can.
                try:
                    serve = functools.partial(serve_control, self.manager, self, listeners=listeners)
                    await tg.start(serve)
                    await tg.start(self._run_manager)
                except BaseException:
                    listeners.close()
                    if guardian is not None:
                        with anyio.CancelScope(shield=True):
                            await guardian.stop()
                    raise
                log.info(
                    "supervising %d instances from %s (pid %d)",
                    len(self.manager.instances),
                    self.manifest.source,
                    os.getpid(),
                )
                task_status.started()
                await self._manager_done.wait()
                tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            if guardian is not None:  # before the leftovers: it is one of our children
                await guardian.stop()
            await _reap_leftovers()
        log.info("stopped")

    async def _run_manager(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        await self.manager.run(task_status=task_status)
        self._manager_done.set()

    # -- requests (from signals and from the control API) ------------------------------------

    async def reload(self) -> ReloadReport:
        """Re-read the manifest file; a manifest with errors changes nothing (ManifestError)."""
        source = self.manifest.source
        assert source is not None
        # In a worker thread: reading even a bounded manifest takes a moment the loop must not lose.
        manifest = await anyio.to_thread.run_sync(load_manifest, source)
        if manifest.state_dir != self.manifest.state_dir:
            try:  # the new folder gets the checks the first one got at start-up
                prepare_state_dir(manifest.state_dir)
            except StateDirError as exc:
                raise ApplyError(f"{exc}; nothing was changed") from None
        report = await self.manager.apply(manifest)
        old, self.manifest = self.manifest, manifest
        control = (manifest.control_socket, manifest.supervisor.control)
        if (old.control_socket, old.supervisor.control) != control:
            log.warning(
                "the control settings changed; they apply when the service starts again "
                "(the control API stays on %s)",
                old.control_socket,
            )
        log.info(
            "reloaded %s: added %s, removed %s, changed %s, unchanged %d",
            source,
            report.added or "none",
            report.removed or "none",
            report.changed or "none",
            len(report.unchanged),
        )
        for line in report.rescaled:
            log.info("rescaled %s", line)
        return report

    async def shutdown(self) -> None:
        """Stop every instance gracefully, then end ``run()``."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down: stopping %d instances", len(self.manager.instances))
        await self.manager.shutdown()

    def kill(self) -> None:
        """No grace: cancel everything; instances SIGKILL their groups as they close."""
        log.warning("killing every instance now")
        if self._cancel is not None:
            self._cancel.cancel()

    def reopen_logs(self) -> int:
        count = 0
        for instance in self.manager.instances.values():
            for sink in instance.sinks.values():
                sink.reopen()
                count += 1
        log.info("reopened %d log files", count)
        return count

    # -- the service's own background tasks --------------------------------------------------

    async def _handle_signals(self) -> None:
        interrupts = 0
        with anyio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2
        ) as signals:
            async with anyio.create_task_group() as tg:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        tg.start_soon(self._reload_logged)
                    elif signum == signal.SIGUSR2:
                        self.reopen_logs()
                    elif signum == signal.SIGINT and interrupts:
                        self.kill()
                    else:
                        interrupts += signum == signal.SIGINT
                        log.info("got %s", signal.Signals(signum).name)
                        tg.start_soon(self.shutdown)

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except (ManifestError, ApplyError) as exc:
            log.error("reload refused, nothing changed:\n%s", exc)

    async def _log_transitions(self) -> None:
        async with self.manager.events.subscribe() as events:
            async for event in events:
                if isinstance(event, Transition | Update):
                    log.info("%s", event.describe())
                else:
                    log.warning("the service log missed %d events", event.count)


def _socket_problem(path: Path, exc: OSError) -> str:
    folder = path.parent
    try:
        found = os.stat(folder)
    except OSError:
        pass
    else:
        if not stat.S_ISDIR(found.st_mode):  # mkdir -p says "File exists", which helps nobody
            return f"control socket {path}: {folder} is not a folder"
    return f"control socket {path}: {exc.strerror or exc}"


def _start_guardian() -> Guardian | None:
    """The second line of defence of decision 6 (guardian.py); the service runs on without it."""
    try:
        return Guardian.start()
    except OSError as exc:
        log.warning("cannot start the guardian (%s): instances' children may outlive the service", exc)
        return None


_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _one_line_for_accept_errors() -> None:
    """asyncio logs a traceback for every accept() that finds no free descriptor (then waits a
    second and accepts again): under a flood of connections that is a traceback a connection.
    One warning line says it; every other error of the loop is reported as before."""
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # trio: it retries accept() after EMFILE by itself, without a traceback

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
            log.warning("control socket: cannot accept a connection (%s); trying again", exc.strerror)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def _reap_leftovers() -> None:
    """Kill what is still our child (daemons that escaped their group and were reparented to us)."""
    leftovers = living_children()
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in leftovers:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    if leftovers:
        log.warning("killed %d processes left behind by instances", len(leftovers))


def run_service(
    manifest_path: Path,
    *,
    log_file: Path | None = None,
    backend: str = "asyncio",
    pidfile: Path | None = None,
    ready_fd: int | None = None,
) -> int:
    """The whole of ``supervisor run``: returns the exit status.

    ``ready_fd`` is set by ``run -d`` (supervisor.detach): the service reads
    stdin from /dev/null and writes its pid to that fd once it answers on its
    socket, then closes it; the waiting CLI takes EOF without a pid as failure.
    """
    if ready_fd is not None:
        try:
            os.set_inheritable(ready_fd, False)  # for us alone: an instance holding it would hide our end
        except OSError as exc:
            print(f"supervisor: --ready-fd {ready_fd}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    own = Stdio.service()
    with own.guard():
        if log_file is not None or ready_fd is not None:
            try:
                _redirect_own_stdio(own, log_file, detached=ready_fd is not None)
            except OSError as exc:
                reason = exc.strerror or exc
                print(f"supervisor: cannot open the log file {log_file}: {reason}", file=sys.stderr)
                own.close()
                return 1
        _configure_logging()
        raise_fd_limit()
        if not become_subreaper():
            log.warning("cannot become a child subreaper: orphaned grandchildren go to init")
        from .api.server import ControlError
        from .pidfile import PidfileError, live_service, remove_pidfile, write_pidfile

        status = 0
        try:
            if pidfile is not None and (other := live_service(pidfile)):
                raise PidfileError(f"pidfile {pidfile} names a running service (pid {other}): stop it first")

            def ready() -> None:
                if pidfile is not None:
                    write_pidfile(pidfile)
                if ready_fd is not None:
                    with open(ready_fd, "wb", closefd=True) as notify:
                        notify.write(f"{os.getpid()}\n".encode())

            anyio.run(_serve, manifest, ready, backend=backend)
        except* (ControlError, StateDirError, PidfileError) as group:
            for error in group.exceptions:
                log.error("cannot start: %s", error)
            status = 1
        finally:
            if pidfile is not None:
                remove_pidfile(pidfile)
    own.close()
    return status


def _redirect_own_stdio(own: Stdio, log_file: Path | None, *, detached: bool) -> None:
    """Output to ``log_file`` (kept when None); when detached, input from /dev/null."""
    stdin = StdioStream(0, os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)) if detached else own.stdin.clone()
    if log_file is None:
        out, err = own.stdout.clone(), own.stderr.clone()
    else:
        try:
            fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError:
            stdin.close()
            raise
        out, err = StdioStream(1, fd), StdioStream(2, os.dup(fd))
    redirected = Stdio(stdin, out, err)
    redirected.redirect()
    redirected.close()


async def _serve(manifest: Manifest, ready: Callable[[], None]) -> None:
    # Built inside the event loop: anyio's events and locks belong to a running loop.
    async with anyio.create_task_group() as tg:
        await tg.start(Service(manifest).run)
        ready()


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("supervisor")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
