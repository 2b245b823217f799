"""``supervisor run`` as a process: from its arguments to its exit status, around one ``Service``.

What the process does before and after its service runs: it starts the manifest's
check (config/apart.py) or takes the re-exec's record (handoff/record_check.py),
turns its own stdio to the log file, raises its descriptor limit, becomes the
subreaper, keeps the pidfile, and runs the service on the chosen backend. The
service itself, long-lived, is ``service.py``.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from . import launcher
from .check_signals import CheckSignals, StopDuringCheck
from .config import Manifest, ManifestError
from .config.apart import ManifestCheck
from .orphans import become_subreaper
from .placement import CgroupPlacement, PendingPlacement
from .process import raise_fd_limit, remember_fd_limit
from .service import Service
from .service_log import service_handler
from .statedir import StateDirError
from .stdio import Stdio, StdioStream, open_path

if TYPE_CHECKING:
    from .handoff.record_check import PendingResume
    from .handoff.reexec import Takeover

log = logging.getLogger("supervisor")


def run_service(
    manifest_path: Path,
    *,
    log_file: Path | None = None,
    backend: str = "asyncio",
    pidfile: Path | None = None,
    ready_fd: int | None = None,
    on_ready: Callable[[], None] | None = None,
    resume_fd: int | None = None,
    resume_check: bool = False,
    manifest_check: ManifestCheck | None = None,
    resume: PendingResume | None = None,
) -> int:
    """The whole of ``supervisor run``: returns the exit status.

    ``on_ready`` is called once the service answers on its socket (``run --pid-namespace``
    tells the process outside the namespace, pidns.py).

    ``ready_fd`` is set by ``run -d`` (supervisor.detach): the service reads
    stdin from /dev/null and writes its pid to that fd once it answers on its
    socket, then closes it; the waiting CLI takes EOF without a pid as failure.

    ``resume_fd``: the state record of the service that re-exec'd into this one (handoff/);
    with ``resume_check``, only say on stdout what would be resumed, touching nothing.

    ``manifest_check``: the check of the manifest the caller started already (a child
    interpreter, config/apart.py); one is started here otherwise. ``resume``: likewise, the
    record at ``resume_fd`` read and its check started (handoff/record_check.py).
    """
    stopped_by: int | None = None
    try:
        return _run_service(
            manifest_path,
            log_file=log_file,
            backend=backend,
            pidfile=pidfile,
            ready_fd=ready_fd,
            on_ready=on_ready,
            resume_fd=resume_fd,
            resume_check=resume_check,
            manifest_check=manifest_check,
            resume=resume,
        )
    except StopDuringCheck as stop:
        stopped_by = stop.signum
        return 128 + stop.signum
    finally:
        for started in (manifest_check, resume):
            if started is not None:
                started.abandon()  # a start that failed before it asked: no child left
        if stopped_by is not None:  # undone: now the signal ends the process, as it would have
            os.kill(os.getpid(), stopped_by)


def _run_service(
    manifest_path: Path,
    *,
    log_file: Path | None,
    backend: str,
    pidfile: Path | None,
    ready_fd: int | None,
    on_ready: Callable[[], None] | None,
    resume_fd: int | None,
    resume_check: bool,
    manifest_check: ManifestCheck | None,
    resume: PendingResume | None,
) -> int:
    # The collector is off until the service has frozen what its start made (Service.run turns
    # it on then); on again here when it ends or the start failed (tests call this in-process).
    enabled = gc.isenabled()
    gc.disable()
    placement: CgroupPlacement | None = None
    own_check: ManifestCheck | None = None
    try:
        takeover = None
        if resume_fd is not None:
            from .handoff.reexec import check_report, prepare_resume
            from .handoff.state import HandoffError

            if resume_check:
                with open(resume_fd, "rb", closefd=False) as state:
                    report = check_report(state.read(), log_file, pidfile)
                print(json.dumps(report), flush=True)
                return 0 if report["ok"] else 1
            if resume is None:
                from .handoff.record_check import PendingResume

                resume = PendingResume(resume_fd)
            try:
                _import_ahead(backend)  # while the child checks the record
                takeover = prepare_resume(resume.record, resume.manifest())
                takeover.size = resume.size
                takeover.handed = resume.handed is not None
            except HandoffError as exc:
                print(f"supervisor: cannot resume: {exc}", file=sys.stderr)
                return 1
        if ready_fd is not None:
            try:
                os.set_inheritable(ready_fd, False)  # for us alone: an instance holding it would hide our end
            except OSError as exc:
                print(f"supervisor: --ready-fd {ready_fd}: {exc.strerror or exc}", file=sys.stderr)
                return 2
        try:
            if takeover is not None:
                manifest = takeover.manifest
            else:
                check = own_check = manifest_check or ManifestCheck(manifest_path)
                # Read after the check: else at the first spawn. Its forks come before the move
                # below, which holds up any fork until it is done.
                launcher.start_tool_lookup()
                with CheckSignals() as signals:
                    # While the child checks: the instances' cgroup, and the service moved into its
                    # leaf, in a thread (the kernel's RCU wait, 10 to 25 ms, placement.py) while
                    # this one imports the service; undone if the start fails. A stop signal ends
                    # the start between these steps, or the wait on the check, never inside one:
                    # the placement is joined first (check_signals.py).
                    pending: PendingPlacement | None = None
                    try:
                        pending = CgroupPlacement.start()
                        signals.stop_if_signalled()
                        _import_ahead(backend)
                        signals.stop_if_signalled()
                        manifest = check.result(
                            reap_later=True,  # by the service's orphan reaper
                            wakeup_fd=signals.wakeup_fd,
                            on_signal=signals.stop_if_signalled,
                        )
                    finally:
                        if pending is not None:
                            placement = pending.result()
                launcher.look_up_tools()  # its probes have ended meanwhile
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
            if takeover is not None:  # the limit the first start found: children get it, not ours
                remember_fd_limit(takeover.service["nofile"])
            raise_fd_limit()
            if not become_subreaper():
                log.warning("cannot become a child subreaper: orphaned grandchildren go to init")
            from .api.server import ControlError
            from .cgroup_policy import CgroupRefused
            from .pidfile import PidfileError, live_service, remove_pidfile, write_pidfile

            status = 0
            try:
                if pidfile is not None and (other := live_service(pidfile)) and other != os.getpid():
                    raise PidfileError(
                        f"pidfile {pidfile} names a running service (pid {other}): stop it first"
                    )

                def ready() -> None:
                    if pidfile is not None:
                        write_pidfile(pidfile)
                    if ready_fd is not None:
                        with open(ready_fd, "wb", closefd=True) as notify:
                            notify.write(f"{os.getpid()}\n".encode())
                    if on_ready is not None:
                        on_ready()

                anyio.run(_serve, manifest, ready, takeover, placement, backend=backend)
            except* (ControlError, StateDirError, PidfileError, CgroupRefused) as group:
                for error in _leaves(group):  # a refusal from inside a task group comes nested
                    log.error("cannot start: %s", error)
                status = 1
            finally:
                if pidfile is not None:
                    remove_pidfile(pidfile)
        own.close()
        return status
    finally:
        if own_check is not None:
            own_check.abandon()  # a no-op once it has answered
        if placement is not None:
            placement.undo()  # a start that failed before the guardian took it: nothing left in the cgroups
        if enabled:
            gc.enable()


def _import_ahead(backend: str) -> None:
    """What the start imports after the check, imported while the child checks instead.

    The control plane; pickle, which reads the child's answer; what ``Service.run`` imports
    (the re-exec, the signals); and the event loop's backend, which ``anyio.run`` imports only
    when it is called: 10 to 15 ms of every cold start came after the check, where the service
    waits 100 ms for its child with nothing to do (tests/test_startup.py keeps it so).
    """
    import importlib
    import pickle  # noqa: F401

    from . import pidfile  # noqa: F401
    from .api import server  # noqa: F401
    from .handoff import reexec  # noqa: F401

    _ = anyio.open_signal_receiver  # anyio imports it when first asked for
    try:  # anyio's own module for it: a name anyio may change, so only a head start
        importlib.import_module(f"anyio._backends._{backend}")
    except ImportError:
        pass


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found


def _redirect_own_stdio(own: Stdio, log_file: Path | None, *, detached: bool) -> None:
    """Output to ``log_file`` (kept when None); when detached, input from /dev/null."""
    stdin = StdioStream(0, os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)) if detached else own.stdin.clone()
    if log_file is None:
        out, err = own.stdout.clone(), own.stderr.clone()
    else:
        try:
            fd = _open_log_file(log_file)
        except OSError:
            stdin.close()
            raise
        out, err = StdioStream(1, fd), StdioStream(2, os.dup(fd))
    redirected = Stdio(stdin, out, err)
    redirected.redirect()
    redirected.close()


def _open_log_file(log_file: Path) -> int:
    """``--log-file`` opened for appending, without waiting for anyone; a blocking fd comes back.

    A fifo with no reader would hold a blocking open forever, before the service even answers:
    O_NONBLOCK makes it fail at once instead (ENXIO, said plainly). The flag is cleared after
    the open: the fd becomes the service's stdout and stderr, which instances with ``inherit``
    share, and they expect blocking writes (the service's own log does not block either way,
    service_log.py).
    """
    try:
        return open_path(str(log_file), os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # stdio.py's, for `file:`
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            why = "a fifo with no reader (start its reader first)"
            raise OSError(errno.ENXIO, why, str(log_file)) from None
        raise


async def _serve(
    manifest: Manifest,
    ready: Callable[[], None],
    takeover: Takeover | None,
    placement: CgroupPlacement | None,
) -> None:
    # Built inside the event loop: anyio's events and locks belong to a running loop.
    service = Service(manifest, takeover=takeover, collector_held=True, placement=placement)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        ready()


def _configure_logging() -> None:
    """The service's own log on its stderr (the log file with ``--log-file``), INFO and up.

    Written by ``service_log.NonBlockingHandler``: a stderr nobody reads must not stop the
    event loop; what it cannot take is dropped, counted, and reported once it takes output again.
    """
    handler = service_handler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("supervisor")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
