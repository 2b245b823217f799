"""``supervisor run``'s service: the manager, the control server, and signals.

The process around it (the manifest's check, its own stdio, the pidfile, the
backend) is ``service_process.py``.

The service is the one long-lived process. It owns a task group holding the
manager (and through it every instance), the control server and the orphan
reaper, and it turns signals into requests: TERM and INT shut down
gracefully (a second INT kills at once), HUP reloads the manifest, USR2
reopens every log file for an external logrotate.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .config import Manifest, ManifestError
from .config.records import running_form
from .early_signals import reload_asked
from .events import Transition, Update
from .guardian import Guardian
from .handoff.leftovers import stop_leftovers
from .handoff.record import RecordKeeper
from .handoff.signals import HANDOFF_SIGNALS, HeldSignals
from .manager import ApplyError, Manager, ReloadReport
from .manifest_check import check_apart
from .orphans import kill_leftover_children, run_orphan_reaper
from .placement import CgroupPlacement
from .signal_wakeup import signal_receiver
from .statedir import StateDirError, StateDirInUse, StateDirLock, prepare_state_dir

if TYPE_CHECKING:
    from .api.listeners import ControlListeners
    from .handoff.reexec import Takeover

log = logging.getLogger("supervisor")


class Service:
    """One running manifest: what ``supervisor run`` keeps alive until it is told to stop."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        environ: Mapping[str, str] | None = None,
        takeover: Takeover | None = None,
        collector_held: bool = False,
        placement: CgroupPlacement | None = None,
    ) -> None:
        self.manifest = running_form(manifest)
        # The instances' cgroup, made (and the service moved into its leaf) by the caller while
        # the manifest was checked: run_service. Made when the guardian starts otherwise.
        self._placement = placement
        # The caller (run_service) turned the garbage collector off for the start: what the
        # start makes lives as long as the service, and the collector's passes over it while it
        # grows were a tenth of a cold start. ``run`` freezes it all, then turns the collector on.
        self._collector_held = collector_held
        self.manager = Manager(manifest, environ=environ)
        self._stopping = False
        self._cancel: anyio.CancelScope | None = None
        self._manager_done = anyio.Event()
        # The re-exec handoff (supervisor/handoff/): what this service took over, if it was exec'd.
        self._takeover = takeover
        #: Re-execs so far (the health route says it: a client tells the new service by it).
        self.handoffs = 0 if takeover is None else int(takeover.service["handoffs"])
        #: Why the last re-exec failed, for the health route.
        self.handoff_error: str | None = None
        self._handing_over = False
        # Reloads under way (their manifest's check runs in a child before the apply lock is
        # taken): a re-exec waits for them (``_reloads_ended``), else the check's child was
        # orphaned by the exec and the reload lost.
        self._reloading = 0
        self._no_reload: anyio.Event | None = None
        #: When the handover began: (time.monotonic(), time.process_time()), for the new service's log.
        self._handover_began: tuple[float, float] | None = None
        # While handing over: the handoff's signals, held for the service that acts on them.
        self._held: HeldSignals | None = None
        #: The manifest the new code's check read; the handover goes ahead only with it.
        self._checked_manifest: Manifest | None = None
        #: The new code's answer for that manifest, carried over the exec (handoff/record_check.py).
        self._checked_answer: dict[str, str] | None = None
        # Those the old service held during the handover that made this one: acted on at once.
        self._resumed_signals: list[int] = [] if takeover is None else takeover.signals
        # Set once a re-exec'd service has taken over (its instances adopted): it acts on the
        # handover's signals from then, so that a TERM stops what it took over, and says so.
        self._took_over = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._listeners: ControlListeners | None = None
        self._state_lock: StateDirLock | None = None
        self._guardian: Guardian | None = None
        self._keeper: RecordKeeper | None = None
        self._hand_over_control = anyio.Event()
        self._control_answered = anyio.Event()
        self._control_done = anyio.Event()
        if takeover is not None:
            service = takeover.service
            self.manager.resume(
                {
                    "instances": takeover.record["instances"],
                    "scaled": service["scaled"],
                    "events_seq": service["events_seq"],
                },
                takeover.children,
            )

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until shutdown; the manager's instances are all stopped when this returns."""
        # Made 0700 if missing; an existing one must be ours and private, and is not chmod-ed.
        prepare_state_dir(self.manifest.state_dir)
        takeover = self._takeover.service if self._takeover is not None else None
        # One service per state folder, whatever became of its socket file: taken before the
        # socket and before a crashed run's leftovers are looked for (statedir.py).
        if takeover is not None and takeover.get("state_lock") is not None:
            name = takeover.get("state_name")  # a record of older code hands no name
            self._state_lock = StateDirLock.adopt(
                self.manifest.state_dir, int(takeover["state_lock"]), None if name is None else int(name)
            )
        else:  # a new service, or the record of an older one, which held no lock (closed at the exec)
            try:
                self._state_lock = StateDirLock.acquire(self.manifest.state_dir)
            except StateDirInUse as exc:
                path = self.manifest.control_socket
                if exc.holder is None or os.path.lexists(path):
                    raise
                raise StateDirInUse(  # what the operator most likely came for
                    f"{exc}. Its control socket {path} is gone: `kill -HUP {exc.holder}` makes it again "
                    "(a reload: it also applies what changed in its manifest)",
                    exc.holder,
                ) from None
        try:
            await self._supervise(task_status=task_status)
        finally:
            self._state_lock.release()  # the one of the folder a reload moved to, if it did

    async def _supervise(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """``run``'s body, the state folder locked: the sockets, the guardian, the manager."""
        # The control plane is imported only by the service, never by `supervisor status`.
        from .api.server import ControlError, ControlListeners

        # Imported now, not at the request: a re-exec must work even when the installed code under
        # it is broken (then the new code's check says so, and this service goes on).
        from .handoff import reexec as handoff

        takeover = self._takeover.service if self._takeover is not None else None
        # Bound before any instance starts: a second service on this manifest stops here.
        try:
            if takeover is not None:  # the old service's, with whatever waits in their backlogs
                listeners = ControlListeners.adopt(takeover["listeners"])
            else:
                listeners = ControlListeners(self.manifest)
        except OSError as exc:  # its folder cannot be made, a name too long…: one line, not a traceback
            raise ControlError(_socket_problem(self.manifest.control_socket, exc)) from None
        except ValueError:  # a NUL byte in the path
            path = str(self.manifest.control_socket)
            raise ControlError(f"control socket {path!r}: a NUL byte is not allowed in a path") from None
        self._listeners = listeners
        self._keeper = keeper = RecordKeeper(self.manager)
        if takeover is not None:
            # The record names our own (adopted) groups: they are no crashed run's leftovers.
            keeper.adopt(self._takeover.identities if self._takeover is not None else ())
            if takeover["guardian"] is not None:
                guardian: Guardian | None = Guardian.adopt(takeover["guardian"])
            else:  # the old one had none alive to hand over
                guardian = _start_guardian(resumed=True)
        else:
            # What a crashed run on this state folder left is stopped before anything new starts.
            await stop_leftovers(self.manifest.state_dir)
            guardian = _start_guardian(placement=self._placement)
        self._guardian = guardian
        if any(config.limits.memory for config in self.manifest.instances.values()):
            log.info(
                "limits.memory is enforced by restarting an instance whose group stays over it; "
                "limits.memory_max is the kernel's cap (memory.max of the instance's cgroup)"
            )
        with anyio.CancelScope() as self._cancel:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if guardian is not None:
                    tg.start_soon(guardian.watch)
                tg.start_soon(self._log_transitions)
                tg.start_soon(run_orphan_reaper)
                tg.start_soon(self._handle_signals)
                await tg.start(keeper.run)  # subscribed before the first spawn
                # Served before the first instance is made: status answers while they spawn (the
                # manager yields between batches of spawns), and a cold start answers as soon as it
                # can; until the instances exist, every route but /v1/health waits (api/app.py).
                try:
                    await tg.start(self._serve_control)
                    served = time.monotonic()
                    if self._takeover is None:
                        # What is made so far (modules, the manifest's models, the control plane)
                        # lives as long as the service: the collector need not walk it again at
                        # each full collection, 20 to 40 ms of a spawn storm's status answers.
                        gc.freeze()
                        if self._collector_held:
                            gc.enable()
                    await tg.start(self._run_manager)
                except BaseException:
                    listeners.close()
                    if guardian is not None:
                        with anyio.CancelScope(shield=True):
                            await guardian.stop()
                    raise
                log.info(
                    "%s %d instances from %s (pid %d)",
                    "supervising" if self._takeover is None else "re-exec'd: took over",
                    len(self.manager.instances),
                    self.manifest.source,
                    os.getpid(),
                )
                if self._takeover is not None:
                    # What the adoption made lives as long as the instances: the collector, held
                    # off since the exec (run_service), need not walk it again and again.
                    gc.freeze()
                    if self._collector_held:
                        gc.enable()
                    handoff.log_handover(self._takeover, served, self.manager.roster_known_at)
                    await keeper.write_now()  # no transition tells the record of the adopted groups
                self._takeover = None
                self._took_over.set()
                task_status.started()
                await self._manager_done.wait()
                tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            if guardian is not None:  # before the leftovers: it is one of our children
                await guardian.stop()
            kill_leftover_children()
        keeper.remove()  # nothing of ours runs any more
        log.info("stopped")

    async def _run_manager(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        await self.manager.run(task_status=task_status)
        self._manager_done.set()

    async def _serve_control(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The control plane, in a scope of its own: a re-exec stops it and keeps the sockets."""
        from .api.server import serve_control

        self._control_done = done = anyio.Event()
        self._hand_over_control = hand_over = anyio.Event()
        self._control_answered = answered = anyio.Event()
        try:
            await serve_control(
                self.manager,
                self,
                listeners=self._listeners,
                hand_over=hand_over,
                answered=answered,
                task_status=task_status,
            )
        finally:
            done.set()

    # -- the re-exec handoff (supervisor/handoff/) -------------------------------------------

    async def reexec(self, check: bool = False) -> dict[str, Any]:
        """Check the new code on our state in a subprocess; unless ``check``, then hand over to it.

        Raises ``HandoffError`` (the new code would not resume: nothing changed) or
        ``InvalidRequest`` (shutting down, or a re-exec under way). The handover runs in the
        service's task group, after this returns, so the answer reaches the client first.
        """
        from .handoff.reexec import check_new_code
        from .instance import InvalidRequest

        if self._stopping:
            raise InvalidRequest("service", "the service is shutting down")
        if self._handing_over or self._tg is None:
            raise InvalidRequest("service", "a re-exec is already under way")
        self._handing_over = True
        checked = self.manifest  # what the check reads: a reload while it runs is not checked
        try:
            report = await check_new_code(self._handoff_record())
        except BaseException:
            self._handing_over = False
            raise
        # The new code's answer for the manifest goes over the exec, not to the client.
        answer = report.pop("checked", None)
        if check:
            self._handing_over = False
            return report
        self._checked_manifest = checked
        self._checked_answer = answer
        log.info("re-exec: the new code would resume %d instances; handing over", report["instances"])
        # Held from now (before the answer goes out) until the new service listens for them, or
        # the handover is abandoned: a TERM sent meanwhile reaches the service that acts on it.
        self._held = HeldSignals()
        self._tg.start_soon(self._hand_over)
        return report

    def _handoff_record(self, checked: dict[str, str] | None = None) -> dict[str, Any]:
        from .handoff.reexec import service_record
        from .handoff.state import process_start_ticks

        assert self._listeners is not None
        guardian = self._guardian
        return service_record(
            self.manifest,
            self.manager.handoff_state(),
            self._listeners.handoff_state(),
            None if guardian is None else guardian.handoff_state(),
            self.handoffs,
            self._handover_began,
            self._keeper.start_ticks if self._keeper is not None else process_start_ticks,
            None if self._held is None else self._held.fd,
            checked,
            state_lock=None if self._state_lock is None else self._state_lock.fd,
            state_name=None if self._state_lock is None else self._state_lock.name_fd,
        )

    async def _hand_over(self) -> None:
        """Stop taking requests (the sockets stay open), let those in flight end, then exec.

        Runs with the handoff's signals held (``reexec`` held them): let go here only when the
        exec did not happen; otherwise the new service takes them (handoff/signals.py).
        """
        from .handoff.reexec import exec_service
        from .instance import InvalidRequest

        listeners = self._listeners
        assert listeners is not None and self._tg is not None
        self._handover_began = (time.monotonic(), time.process_time())
        stopped = False
        try:
            await self._reloads_ended(_HANDOFF_QUIET)
            async with self.manager.quiet(timeout=_HANDOFF_QUIET):
                if self.manifest is not self._checked_manifest:  # reloaded while the check ran
                    raise InvalidRequest(
                        "service",
                        "the manifest was reloaded after the new code's check (which read the one "
                        "before): nothing changed; run reexec again",
                    )
                listeners.keep()
                stopped = True
                self._hand_over_control.set()
                with anyio.move_on_after(_HANDOFF_QUIET):
                    await self._control_answered.wait()
                if self._stopping:  # a TERM that came before the block, seen while we waited
                    raise InvalidRequest("service", "a shutdown was asked for meanwhile: it goes first")
                if self._reloading:  # a reload request that came meanwhile waits for the lock we hold
                    raise InvalidRequest("service", "a reload was asked for meanwhile: it goes first")
                # No await from here: nothing changes between the record and the exec.
                error = exec_service(self._handoff_record(self._checked_answer))
            self.handoff_error = error
            log.error("re-exec failed, the service goes on: %s", error)
        except InvalidRequest as exc:
            self.handoff_error = str(exc)
            log.error("re-exec abandoned: %s", exc)
        finally:
            self._handover_began = None
            held, self._held = self._held, None
            came = [] if held is None else held.release()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOFF_SIGNALS)  # what is pending comes now
            for signum in came:  # those the handover held back, acted on after all
                signal.raise_signal(signum)
            self._handing_over = False
            if stopped:
                await self._control_done.wait()  # its requests' work too: then the sockets are ours
                listeners.keep(False)
                if self._stopping:
                    listeners.close()  # as the control plane would have on its way out
                else:
                    await self._tg.start(self._serve_control)

    # -- requests (from signals and from the control API) ------------------------------------

    def _remake_socket(self) -> None:
        """The state folder locked again and the control socket bound again if they were deleted
        (statedir.py, api/listeners.py): a service started on the folder now must find it held."""
        from .api.listeners import ControlError

        if self._listeners is None:
            return
        if not self._lock_state_folder_again():
            log.error("the control socket is not made again")
            return
        try:
            self._listeners.remake_socket()
        except (ControlError, OSError) as exc:
            log.error("the control socket %s is gone and cannot be made again: %s", self._listeners.path, exc)

    def _lock_state_folder_again(self) -> bool:
        """Lock the folder now at the state folder's path if it is not the one locked (it was
        deleted and made again: by a log's reopen, or by this); False if it cannot be used."""
        lock = self._state_lock
        if lock is None:
            return True
        try:
            if lock.follow():
                log.warning("the state folder %s was gone or replaced: locked again", lock.path)
        except StateDirError as exc:
            log.error("%s", exc)
            return False
        return True

    async def _reloads_ended(self, timeout: float) -> None:
        """Until no reload is under way (``InvalidRequest`` after ``timeout``): a re-exec's first step."""
        from .instance import InvalidRequest

        if not self._reloading:
            return
        log.info("re-exec: waiting for the reload under way")
        with anyio.move_on_after(timeout):
            while self._reloading:
                if self._no_reload is None:
                    self._no_reload = anyio.Event()
                await self._no_reload.wait()
        if self._reloading:
            raise InvalidRequest("service", "a reload is still under way: nothing changed; run reexec again")

    async def reload(self) -> ReloadReport:
        """Re-read the manifest file; a manifest with errors changes nothing (ManifestError)."""
        self._reloading += 1
        try:
            return await self._reload()
        finally:
            self._reloading -= 1
            if not self._reloading and self._no_reload is not None:
                self._no_reload.set()
                self._no_reload = None

    async def _reload(self) -> ReloadReport:
        source = self.manifest.source
        assert source is not None
        self._remake_socket()  # whatever the manifest says: `kill -HUP` is the way back in
        # In a child interpreter (config/apart.py): the loop goes on serving, and pydantic stays
        # out of the service.
        manifest = await check_apart(source)
        new_lock = None
        if manifest.state_dir != self.manifest.state_dir:
            try:  # the new folder gets the checks (and the lock) the first one got at start-up
                prepare_state_dir(manifest.state_dir)
                new_lock = StateDirLock.acquire(manifest.state_dir)
            except StateDirError as exc:
                raise ApplyError(f"{exc}; nothing was changed") from None
        try:
            report = await self.manager.apply(manifest)
        except BaseException:
            if new_lock is not None:
                new_lock.release()
            raise
        if new_lock is not None:
            assert self._state_lock is not None
            self._state_lock.release()  # the old folder is free for another service from now
            self._state_lock = new_lock
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

    def reopen_logs(self) -> tuple[int, list[str]]:
        """Reopen every log file: how many were, and why each other one was not (it names its file)."""
        count = 0
        failed: list[str] = []
        for instance in self.manager.instances.values():
            for sink in instance.sinks.values():
                sink.reopen()
                if sink.write_error is None:
                    count += 1
                else:
                    failed.append(sink.write_error)
        if self._state_lock is not None and self._state_lock.path.is_dir():
            self._lock_state_folder_again()  # a log's folder made the deleted state folder again
        log.info("reopened %d log files%s", count, f"; {len(failed)} could not be" if failed else "")
        return count, failed

    # -- the service's own background tasks --------------------------------------------------

    async def _handle_signals(self) -> None:
        interrupts = 0
        with signal_receiver(*HANDOFF_SIGNALS) as signals:
            # A re-exec holds these until the new service has taken over (bounded: a takeover
            # that hangs must not make the service deaf to a TERM), then those that came during
            # the handover come: the ones a thread of the old service took (raised here, pending
            # while blocked), then the ones no thread took (pending across the exec).
            if self._takeover is not None:
                with anyio.move_on_after(_HANDOFF_QUIET):
                    await self._took_over.wait()
            for signum in self._resumed_signals:
                log.info("got %s during the re-exec", signal.Signals(signum).name)
                signal.raise_signal(signum)
            self._resumed_signals = []
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signal.valid_signals() & HANDOFF_SIGNALS)
            async with anyio.create_task_group() as tg:
                if reload_asked():  # a SIGHUP before we listened (early_signals.py): the manifest again
                    tg.start_soon(self._reload_when_started)
                async for signum in signals:
                    if self._held is not None:  # the loop took it before the hold: for the new service
                        self._held.add(signum)
                    elif signum == signal.SIGHUP:
                        tg.start_soon(self._reload_logged)
                    elif signum == signal.SIGUSR2:
                        self.reopen_logs()
                    elif signum == signal.SIGINT and interrupts:
                        self.kill()
                    else:
                        interrupts += signum == signal.SIGINT
                        log.info("got %s", signal.Signals(signum).name)
                        tg.start_soon(self.shutdown)

    async def _reload_when_started(self) -> None:
        await self.manager.started.wait()
        log.info("got SIGHUP while starting: reloading the manifest")
        await self._reload_logged()

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except (ManifestError, ApplyError) as exc:
            log.error("reload refused, nothing changed:\n%s", exc)

    async def _log_transitions(self) -> None:
        """Every transition and probe outcome, one line each; not what a waiting instance waits on now.

        A waiting instance's reason changes at each transition of what it waits for: a
        graph of a hundred instances coming up would log a thousand such lines (and spend a
        quarter of the service's time on them). Its first reason is on the ``waiting``
        transition's line, a ``blocked:`` one gets a line, and the rest are in its status
        and on the event stream.
        """
        async with self.manager.events.subscribe() as events:
            async for event in events:
                if isinstance(event, Update) and event.kind == "waiting":
                    if (event.message or "").startswith("blocked:"):
                        log.info("%s", event.describe())
                elif isinstance(event, Transition | Update):
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


def _start_guardian(*, resumed: bool = False, placement: CgroupPlacement | None = None) -> Guardian | None:
    """The second line of defence of decision 6 (guardian.py); the service runs on without it."""
    try:
        return Guardian.start(resumed=resumed, placement=placement)
    except OSError as exc:
        log.warning("cannot start the guardian (%s): instances' children may outlive the service", exc)
        return None


#: How long a re-exec waits for a reload under way, then for requests in flight, each.
_HANDOFF_QUIET = 10.0
