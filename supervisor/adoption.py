"""An instance's half of the re-exec handoff (supervisor/handoff/): described, then adopted.

``Adoption`` is mixed into ``Instance``: the old service reads ``handoff_state()`` of every
instance in one synchronous stretch right before it execs; the new one builds each
instance, calls ``adopt()`` before its ``run()``, and ``run()`` calls ``_resume()`` to go
on with what it was doing (watch the adopted child, end a backoff pause or a stop when
it was due, wait on for dependencies) without spawning anything. Kept apart from
instance.py so that the state machine reads on its own; it uses that machine
(``_transition``, ``_supervise``, ``_watch``, ``_kill_after``) and adds no state of its own
beyond the record it was adopted from.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import anyio

from .cgroups import CgroupError
from .events import State
from .health import Resumed
from .process import Child, ExitStatus

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anyio.abc import TaskStatus

    from .cgroups import InstanceCgroup
    from .config import InstanceConfig
    from .health import Health, LogSubscription
    from .instance import InstanceContext, Retry
    from .logs import LogSink
    from .rendezvous import RequestLock
    from .stdio import LogPipe

log = logging.getLogger("supervisor.instance")


class _UntilResumed:
    """An adopted instance's lock, with a gate in front: requests wait until every instance resumed."""

    def __init__(self, lock: RequestLock, resumed: anyio.Event) -> None:
        self.lock = lock
        self._resumed = resumed

    async def __aenter__(self) -> None:
        await self._resumed.wait()
        await self.lock.__aenter__()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.lock.__aexit__(None, None, None)


class Adoption:
    """The handoff methods of ``Instance`` (see the module's docstring)."""

    if TYPE_CHECKING:  # what Instance provides
        name: str
        group: str
        config: InstanceConfig
        _state: State
        _reason: str | None
        _child: Child | None
        _last_exit: ExitStatus | None
        _targets: dict[str, str]
        _pipes: dict[str, LogPipe]
        _sinks: dict[str, LogSink]
        _health: Health
        _lock: RequestLock
        _next_try: float | None
        _kill_at: float | None
        _trouble: Retry | None
        _adopted: dict[str, Any] | None
        _context: InstanceContext
        _cgroup: InstanceCgroup | None

        def _restart_record(self) -> dict[str, Any]: ...
        def _adopt_restart_record(self, record: Mapping[str, Any]) -> None: ...
        def _open_logs(self, adopted: Mapping[str, int] | None = None) -> None: ...
        def _count_restart(self) -> None: ...
        def _transition(
            self, to: State, *, reason: str | None = None, exit: ExitStatus | None = None
        ) -> None: ...
        async def _kill_after(self, child: Child, deadline: float) -> bool: ...
        async def _watch(
            self, child: Child, followers: LogSubscription, resumed: Resumed | None = None
        ) -> Retry | None: ...
        async def _supervise(
            self, *, task_status: TaskStatus[None], resume: dict[str, Any] | None = None
        ) -> None: ...

    def handoff_state(self) -> dict[str, Any]:
        """Everything a re-exec'd service needs to go on with this instance as if nothing happened.

        Read in one synchronous stretch with every other instance (no task runs in between),
        so whatever a task was doing is captured at a point where it waits.
        """
        child = self._child
        live = child is not None and child.exit is None
        last = self._last_exit
        trouble = self._trouble
        return {
            "name": self.name,
            "group": self.group,
            "state": self._state.value,
            "reason": self._reason,
            "counters": self._restart_record(),
            "last_exit": None if last is None else asdict(last),
            "child": None
            if child is None or not live
            else {
                "pid": child.pid,
                "pgid": child.pgid,
                "pidfd": child.pidfd,
                "argv": child.argv,
                "started_at": child.started_at,
                "kill_group_on_exit": child.kill_group_on_exit,
            },
            "next_try": self._next_try if self._state is State.BACKOFF else None,
            "kill_at": self._kill_at,
            "trouble": None if trouble is None else trouble.why,
            # Whether the run a check stops had not come up: a failed start (read back for a
            # `stopping` instance; a `starting` one, as an older service wrote, says so itself).
            "trouble_failed_start": trouble is not None and trouble.failed_start,
            "targets": dict(self._targets),
            "pipes": {stream: pipe.read_fd for stream, pipe in self._pipes.items()},
            "sinks": {stream: sink.handoff_state() for stream, sink in self._sinks.items()},
            "health": self._health.handoff_state(),
            "cgroup": self._cgroup is not None,
        }

    def adopt(self, record: dict[str, Any], child: Child | None, resumed: anyio.Event | None = None) -> None:
        """Before ``run()``: take over the instance a re-exec'd service described, spawning nothing.

        ``child``: its program, adopted by handoff (same pid, same pidfd), or None when it
        ended meanwhile (or nothing ran). ``run()`` then goes on where the old service was:
        the backoff pause ends when it would have, a stop sends its SIGKILL when due.

        ``resumed``: set by the manager once every adopted instance's ``run()`` has resumed.
        The instance answers queries from now on, but its requests (start, stop, restart)
        wait for it: none can find the instance before its ``run()`` has taken over.
        """
        if resumed is not None and not resumed.is_set():
            self._lock = _UntilResumed(self._lock, resumed)  # type: ignore[assignment]
        self._adopted = record
        self._state = State(record["state"])
        self._reason = record["reason"]
        self._adopt_restart_record(record["counters"])
        last = record["last_exit"]
        self._last_exit = None if last is None else ExitStatus(**last)
        self._child = child
        had = record.get("cgroup")
        self._adopt_cgroup(child, had if isinstance(had, bool) else None)
        self._targets = dict(record["targets"])
        self._open_logs(record["pipes"])
        for stream, sink in self._sinks.items():
            sink.adopt(record["sinks"][stream])
        self._health.adopt(record["health"])

    def resumed(self) -> None:
        """Every adopted instance has resumed: the gate ``adopt`` put before the lock goes."""
        lock = self._lock
        if isinstance(lock, _UntilResumed):
            self._lock = lock.lock

    def _adopt_cgroup(self, child: Child | None, had: bool | None) -> None:
        """The cgroup the program already runs in (a stop must still ``cgroup.kill`` it).

        ``had``: whether the old service had made the instance's cgroup (None: a version 1
        record does not say; then it is made if missing, as at a spawn). One it had is there:
        it is not made again (no mkdir per instance in the handover). One it had not is made
        at the next spawn, as it would have been.
        """
        tree = self._context.cgroups
        if tree is None or had is False:
            return
        try:
            self._cgroup = tree.existing(self.name) if had else tree.instance(self.name)
        except CgroupError as exc:
            log.warning("%s: %s", self.name, exc)
            return
        if child is not None:
            child.cgroup = self._cgroup

    async def _resume(self, record: dict[str, Any], task_status: TaskStatus[None]) -> None:
        """Go on with what the adopted instance was doing, in ``run()``'s own task.

        ``task_status.started()`` once it is under way (a stop holds the lock by then).
        """
        self._adopted = None
        state = self._state
        if state is State.STOPPING and not _stopped_by_a_check(record):
            await self._finish_stop(record, task_status=task_status)
        elif state in (State.STARTING, State.RUNNING, State.STOPPING, State.BACKOFF, State.WAITING):
            await self._supervise(task_status=task_status, resume=record)
        else:
            task_status.started()

    async def _resume_run(self, record: dict[str, Any]) -> Retry | None:
        """The adopted part of the supervise loop. Returns why to back off, None when done, or
        a ``Retry`` with no reason to go on with the loop as usual (wait for dependencies, start)."""
        from .instance import Retry

        state, child = self._state, self._child
        if state is State.BACKOFF:
            deadline = record["next_try"]
            if deadline is not None:
                self._next_try = deadline
                await anyio.sleep(max(0.0, deadline - time.monotonic()))
            self._count_restart()
            return Retry("", failed_start=False)
        if state is State.WAITING:
            return Retry("", failed_start=False)
        if state is State.STOPPING:  # a check was stopping it (see _resume): finish that, then back off
            failed_start = record.get("trouble_failed_start") is True
            trouble = Retry(record["trouble"], failed_start=failed_start)
            return await self._finish_check_stop(record, child, trouble)
        # STARTING or RUNNING
        early = state is State.STARTING
        if child is None:  # it ended while the old service handed over (and was reaped by it)
            last = self._last_exit
            ended = last.describe() if last else "ended"
            return Retry(f"{ended} during the service's re-exec", failed_start=early)
        if record["kill_at"] is not None:  # an older service's check stop, made without leaving the state
            trouble = Retry(record["trouble"] or "stopped by a check", failed_start=early)
            self._transition(State.STOPPING, reason=trouble.why)
            return await self._finish_check_stop(record, child, trouble)
        async with self._health.log_subscription(list(self._sinks.values())) as followers:
            resumed = Resumed(state is State.RUNNING, max(0.0, time.time() - child.started_at))
            return await self._watch(child, followers, resumed)

    async def _finish_check_stop(self, record: dict[str, Any], child: Child | None, trouble: Retry) -> Retry:
        """The stop a check began in the old service: SIGKILL when it was due; then why to back off."""
        self._trouble = trouble
        if child is not None:
            deadline = record["kill_at"]
            if deadline is None:  # signalled, and then no deadline recorded: give it stop.timeout
                deadline = time.monotonic() + self.config.stop.timeout
            await self._kill_after(child, deadline)
            self._last_exit = child.exit
        return trouble

    async def _finish_stop(self, record: dict[str, Any], *, task_status: TaskStatus[None]) -> None:
        """A stop the old service was in the middle of: SIGKILL when it was due, then ``stopped``.

        It was a request: it holds the lock, and later requests queue behind it, as before
        (the lock itself, not the gate around it that holds requests until every instance
        has resumed: this is part of resuming).
        """
        lock = self._lock
        async with lock.lock if isinstance(lock, _UntilResumed) else lock:
            task_status.started()
            await self._finish_stop_locked(record)

    async def _finish_stop_locked(self, record: dict[str, Any]) -> None:
        reason = self._reason or "stopped"
        child = self._child
        if child is not None and child.exit is None:
            deadline = record["kill_at"]
            if deadline is None:  # signalled, and then no deadline recorded: give it stop.timeout
                deadline = time.monotonic() + self.config.stop.timeout
            if await self._kill_after(child, deadline):
                reason = f"{reason}; killed after {self.config.stop.timeout:g}s"
            self._last_exit = child.exit
        self._transition(State.STOPPED, reason=reason, exit=self._last_exit)


def _stopped_by_a_check(record: Mapping[str, Any]) -> bool:
    """A ``stopping`` instance that a check was stopping to start it again, not a request.

    A check's stop goes ``stopping`` with its reason, kept as the trouble too; a request that
    takes over a check's stop clears the trouble (stopping.py). An older service stopped for
    a check without leaving ``starting`` or ``running``, and a request over such a stop left
    the check's trouble beside the request's own reason: the two differ there.
    """
    trouble = record["trouble"]
    return trouble is not None and record["reason"] == trouble
