"""One instance's life: its state machine, restart policy, backoff and stop.

An ``Instance`` lives as long as the manifest names it. Its log pipes and
sinks live that long too (decision 7); each *run* of its program is one
``Child``. Requests (start, stop, restart, signal) are serialised by one lock,
so twenty restarts fired at once run one after another and end with exactly
one process. The automatic part (waiting for exits, backing off, starting
again) is the *supervise loop*, which a stop cancels before it signals the
child (stopping.py). It runs in ``run()``'s task, the one task an instance
keeps (a task costs 3 to 4 KB; docs/performance.md); the manager's one
``PipeReactor`` reads every log pipe.

Every transition goes through ``_transition``, which asserts the state it
leaves against ARCHITECTURE.md's table and publishes the event.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus

from .adoption import Adoption
from .budget import Budget
from .cgroups import CgroupError, CgroupTree, InstanceCgroup
from .config import InstanceConfig, LogSettings, ServiceSettings
from .events import EventBus, State, Transition, Update
from .health import Health, LogSubscription, Resumed
from .instance_status import Reporting
from .logs import LogFileError, LogSink
from .pacer import Pacer, Turns
from .process import Child, ExitStatus, SpawnError
from .reactor import PipeReactor
from .rendezvous import Announcement, RequestLock
from .run_setup import RunSetup
from .stdio import LogPipe, StdioError
from .stopping import Stopping

log = logging.getLogger("supervisor.instance")

#: However short its runs, an instance is started again at most this often (a second's worth
#: at once, then evenly): a program that exits at once under ``restart: always`` and
#: ``min_uptime: 0`` (each run is up, none a failed start) was restarted 250 times a second,
#: for ever, with the service's CPU and log taken up by it. systemd's answer is the same idea
#: (StartLimitBurst, RestartSec=100ms); here it paces rather than gives up.
RESTARTS_PER_SECOND = 20

#: A waiting instance's reason once what it waited for is met, until its spawn (pacer.Turns): a
#: thousand dependents of one database that became ready spawn over seconds, and said all along
#: `waiting for db (ready): db is starting`.
IN_LINE_TO_SPAWN = "dependencies met; in line to spawn"

_ALLOWED: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.WAITING, State.STARTING}),
    # waiting -> failed: only for a fault in the supervision itself (see _give_up).
    State.WAITING: frozenset({State.STARTING, State.STOPPED, State.FAILED}),
    # A one-shot job that ends with a success code before min_uptime is done, not a failed
    # start: starting -> exited (an addition to ARCHITECTURE.md's table, see docs/guide.md).
    State.STARTING: frozenset({State.RUNNING, State.BACKOFF, State.STOPPING, State.EXITED}),
    State.RUNNING: frozenset({State.EXITED, State.BACKOFF, State.STOPPING}),
    # backoff -> waiting: a dependency went down meanwhile; the next try waits for it.
    State.BACKOFF: frozenset({State.WAITING, State.STARTING, State.STOPPED, State.FAILED}),
    # stopping -> backoff: a check (liveness, readiness's start_timeout, the memory limit, the
    # watchdog) stops the run to start it again; it is `stopping` while it stops, as for a stop
    # by hand (an addition to ARCHITECTURE.md's table, see docs/guide.md).
    State.STOPPING: frozenset({State.STOPPED, State.BACKOFF}),
    State.EXITED: frozenset({State.WAITING, State.STARTING}),
    State.FAILED: frozenset({State.WAITING, State.STARTING}),
}


class InvalidRequest(Exception):
    """A request that makes no sense in the instance's current state; nothing was changed."""

    def __init__(self, instance: str, message: str) -> None:
        self.instance = instance
        super().__init__(f"{instance}: {message}")


class Dependencies(Protocol):
    """What an instance waits for before each start (the manager knows the other instances)."""

    def blocker(self) -> str | None:
        """Why the instance may not start now (a dependency and its condition), or None."""
        ...

    async def changed(self) -> None:
        """Return once something ``blocker`` looks at may have changed."""
        ...


@dataclass(frozen=True, slots=True)
class InstanceContext:
    """What an instance needs from the service around it."""

    settings: ServiceSettings
    bus: EventBus
    environ: Mapping[str, str]
    #: Reads every instance's log pipes (reactor.py); the manager hosts its task.
    reactor: PipeReactor
    dependencies: Dependencies | None = None
    #: Told the instance's group name at each transition (the manager wakes what waits on it).
    on_transition: Callable[[str], None] | None = None
    #: Where the instance's own cgroup goes (None: no cgroups; cgroup_policy.py says why).
    cgroups: CgroupTree | None = None
    #: Does what a waiting instance makes ahead of its spawn, a slice at a time (None: at once).
    ahead: Pacer | None = None
    #: Every spawn of the manager's instances passes it: a slice of a turn of the loop each.
    spawn_turns: Turns | None = None


class Instance(RunSetup, Stopping, Adoption, Reporting):
    """One named instance: a state machine driving successive runs of one program.

    How one run is set up (log pipes, cgroup, stdio, the spawn) is ``RunSetup``, in
    run_setup.py; how a run is stopped (the loop cancelled, the signal, SIGKILL after
    the timeout) is ``Stopping``, in stopping.py; the re-exec handoff's half (describe,
    adopt, resume) is ``Adoption``, in adoption.py.
    """

    def __init__(self, name: str, group: str, config: InstanceConfig, context: InstanceContext) -> None:
        self.name = name
        self.group = group
        self.config = config
        self._context = context
        self._state = State.STOPPED
        self._child: Child | None = None
        self._last_exit: ExitStatus | None = None
        self._reason: str | None = None
        self._restarts = 0
        self._failures = 0  # failed starts in a row: the backoff exponent and the give-up count
        self._lock = RequestLock()
        # Made by the first waiter after a transition (most instances have none): see wait_until.
        self._changed: anyio.Event | None = None
        self._closing = False  # close() began: no start any more
        self._closed = False  # close() is done: run() returns
        self._hosting = False  # run() is there to run the supervise loop
        self._run_over = False  # run() has returned: what it held is let go
        self._run_returned: anyio.Event | None = None  # made by a change that waits for that
        self._wake: anyio.Event | None = None  # run() waits on it while no loop runs
        self._start_wanted: Announcement | None = None  # a start() handed to run()
        self._in_line_to_spawn = False  # at the manager's spawn gate (pacer.Turns), its turn to come
        self._loop_scope: anyio.CancelScope | None = None
        self._loop_exited: anyio.Event | None = None  # made by a stop that waits for the loop
        self._pipes: dict[str, LogPipe] = {}
        self._sinks: dict[str, LogSink] = {}
        self._targets = {"stdin": "", "stdout": "", "stderr": ""}
        self._described: tuple[str, str, str] | None = None  # the config's streams, for status
        self._health = Health(name, group, config, context.bus)
        self._trouble: Retry | None = None  # why a check stops the current run (to start it again)
        # For the handoff (re-exec): when the pause in backoff ends, when a SIGKILL is due
        # (both time.monotonic()), and the record this instance was adopted from.
        self._next_try: float | None = None
        self._kill_at: float | None = None
        self._restart_budget: Budget | None = None  # made at the first restart of a run that came up
        self._adopted: dict[str, Any] | None = None
        self._cgroup: InstanceCgroup | None = None  # made at the first spawn, removed by close()

    # -- facts -----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None and child.exit is None else None

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def ready(self) -> bool | None:
        """None without a readiness check; else whether the current run passed it."""
        return self._health.ready

    @property
    def completed(self) -> bool:
        """Ran and exited with one of its success codes (a one-shot job done)."""
        last = self._last_exit
        return (
            self._state is State.EXITED
            and last is not None
            and last.succeeded(self.config.restart.success_codes)
        )

    @property
    def last_exit(self) -> ExitStatus | None:
        return self._last_exit

    @property
    def cgroup(self) -> str | None:
        """The folder of the instance's own cgroup, once made (cgroups.py); None without one."""
        return self._cgroup.path if self._cgroup is not None else None

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def started_at(self) -> float | None:
        """When the running process started (None if none runs): what uptime counts from."""
        child = self._child
        return child.started_at if child is not None and child.exit is None else None

    @property
    def sinks(self) -> Mapping[str, LogSink]:
        """The log sinks by stream name ("stdout", "stderr"), for tail and follow."""
        return self._sinks

    @property
    def log_settings(self) -> LogSettings:
        return self.config.logs.resolved(self._context.settings.logs)

    # -- lifetime --------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the log pipes and sinks, and run the supervise loop when started, until ``close()``."""
        adopted = self._adopted
        if adopted is None:
            self._open_logs()
        for sink in self._sinks.values():
            sink.attach(self._context.reactor)
        self._hosting = True
        try:
            if adopted is not None:
                await self._resume(adopted, task_status)
            else:
                task_status.started()
            while not self._closed:
                wanted, self._start_wanted = self._start_wanted, None
                if wanted is not None:
                    await self._supervise(task_status=wanted)
                else:
                    self._wake = anyio.Event()
                    await self._wake.wait()
        finally:
            self._hosting = False
            if self._start_wanted is not None:  # the service is going away: that start is not coming
                self._start_wanted.started()
            with anyio.CancelScope(shield=True):
                await self._kill_now()
                await self._remove_cgroup()
            try:
                for sink in self._sinks.values():
                    sink.close()
                for pipe in self._pipes.values():
                    pipe.close()
                self._health.close()
            finally:
                self._run_over = True
                if self._run_returned is not None:
                    self._run_returned.set()

    async def returned(self) -> None:
        """Wait until ``run()`` has returned, after ``close()``: then nothing of the service's
        but its caller holds the instance, and a collection frees it (the manager's ``_apply``)."""
        if self._run_over or not self._closed:
            return  # returned already, or not on its way out (a run() that never began)
        if self._run_returned is None:
            self._run_returned = anyio.Event()
        await self._run_returned.wait()

    async def close(self, reason: str = "removed") -> None:
        """Stop the program if it runs, then end ``run()``: the instance is gone."""
        async with self._lock:
            self._closing = True  # requests queued behind this one must not start it again
            self.wake_waiters()  # a request that waits for it to start waits no more (if down)
            if self._state.alive:
                await self._stop_locked(reason)
            with anyio.CancelScope(shield=True):  # before a replacement of the same name makes it again
                await self._remove_cgroup()
            self._closed = True
            self._wake_run()

    def _wake_run(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()

    # -- the handoff (re-exec): the rest is in adoption.py ----------------------------------

    def _restart_record(self) -> dict[str, Any]:
        """The restart bookkeeping, for the handoff: the one place that names its fields."""
        return {"restarts": self._restarts, "failures": self._failures}

    def _adopt_restart_record(self, record: Mapping[str, Any]) -> None:
        self._restarts = int(record["restarts"])
        self._failures = int(record["failures"])

    # -- requests --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the program now; returns once it is spawned (or has failed to spawn)."""
        async with self._lock:
            if self._state.alive:
                raise InvalidRequest(self.name, f"already {self._state}")
            await self._start_locked()

    async def stop(self) -> None:
        """Stop the program (stop signal, then SIGKILL after stop.timeout); cancels a pending restart."""
        async with self._lock:
            if not self._state.alive:
                raise InvalidRequest(self.name, f"not running ({self._state})")
            await self._stop_locked("stopped on request")

    async def restart(self, because: str = "on request") -> None:
        """Stop if running, then start: one request, so concurrent restarts never overlap."""
        async with self._lock:
            if self._state.alive:
                await self._stop_locked(f"restarting {because}")
            await self._start_locked()

    def signal(self, sig: int) -> None:
        """Send a signal to the running program (its group when stop.group is set)."""
        child = self._child
        if child is None or child.exit is not None or self._state not in (
            State.STARTING,
            State.RUNNING,
            State.STOPPING,
        ):
            raise InvalidRequest(self.name, f"cannot signal: not running ({self._state})")
        if not child.send_signal(sig, group=self.config.stop.group):
            raise InvalidRequest(self.name, "cannot signal: the process has just ended")

    async def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """The current run's exit (or the last one if nothing runs); None when the timeout passes."""
        child = self._child
        if child is None or child.exit is not None:
            return self._last_exit
        with anyio.move_on_after(timeout):
            return await child.wait()
        return None

    async def wait_for(self, states: Collection[State], timeout: float | None = None) -> bool:
        """Wait until the instance is in one of ``states``; False when the timeout passes."""
        return await self.wait_until(lambda: self._state in states, timeout)

    async def wait_until(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait, transition by transition, until ``condition()`` holds; False when the timeout passes."""
        with anyio.move_on_after(timeout):
            while not condition():
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
            return True
        return False

    @property
    def removed(self) -> bool:
        """Taken away (a reload, a scale, the shutdown) and down: it will not run again."""
        return self._closing and not self._state.alive

    @property
    def in_line_to_spawn(self) -> bool:
        """Its spawn is decided and waits for its turn at the gate: a start that is under way
        before its first transition (the thousandth of a `start --all` waits seconds)."""
        return self._in_line_to_spawn

    @property
    def is_ready(self) -> bool:
        """Running, and ready where a readiness check is configured: what dependents wait for."""
        return self._state is State.RUNNING and self._health.ready is not False

    # -- the machine -----------------------------------------------------------------------

    def _transition(self, to: State, *, reason: str | None = None, exit: ExitStatus | None = None) -> None:
        """Leave the current state for ``to`` (asserted against the table) and publish the event.

        The status's reason becomes the transition's own, None included: it says why the
        instance is in the state it is in now, and the reason for the last one (`waiting for
        db (ready)`, `stopped on request`, the crash before a retry) is not why it starts.
        """
        leaving = self._state
        assert to in _ALLOWED[leaving], f"{self.name}: no transition {leaving} -> {to}"
        self._state = to
        self._reason = reason
        if to is State.STOPPING:  # a program on its way out serves nobody: `ready: false` from now
            self._health.run_ending()
        child = self._child
        pid = exit.pid if exit else (child.pid if child is not None else None)
        self._context.bus.publish(
            Transition(
                instance=self.name,
                group=self.group,
                from_state=leaving,
                to_state=to,
                pid=pid,
                exit_code=exit.code if exit else None,
                exit_signal=exit.signal if exit else None,
                reason=reason,
            )
        )
        self.wake_waiters()
        if self._context.on_transition is not None:
            self._context.on_transition(self.group)

    def wake_waiters(self) -> None:
        """Have each ``wait_until`` look at its condition again: a transition, or a request's end."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def _start_locked(self) -> None:
        if not self._hosting or self._closing:
            raise InvalidRequest(self.name, "the instance is closing (removed, or the service is stopping)")
        self._failures = 0
        wanted = self._start_wanted = Announcement()
        self._wake_run()
        try:
            await wanted.wait()
        finally:
            if self._start_wanted is wanted:  # cancelled before run() took it: no start at all
                self._start_wanted = None

    async def _supervise(
        self, *, task_status: TaskStatus[None], resume: dict[str, Any] | None = None
    ) -> None:
        """Wait for dependencies, start, watch, back off and start again, as the policy says.

        Runs in ``run()``'s task; a stop cancels it (``_cancel_loop``). ``task_status.started()``
        is called right after the first spawn attempt (or on entering ``waiting``), so that
        ``start()`` returns with the program spawned, failed to spawn, or waiting for its
        dependencies.
        """
        scope = self._loop_scope = anyio.CancelScope()
        announced = False

        def announce() -> None:
            nonlocal announced
            if not announced:
                announced = True
                task_status.started()

        try:
            with scope:
                if resume is not None:
                    announce()
                    resumed = await self._resume_run(resume)
                    if resumed is None or (resumed.why and not await self._back_off(resumed)):
                        return
                while True:
                    await self._wait_for_dependencies(announce)
                    retry = await self._run_once(announce)
                    if retry is None or not await self._back_off(retry):
                        return
        except Exception as exc:  # a fault of ours, not the program's: this instance fails, not the service
            log.exception("%s: unexpected error in its supervision", self.name)
            with anyio.CancelScope(shield=True):
                await self._give_up(f"unexpected error in its supervision: {_first_cause(exc)}")
        finally:
            self._loop_scope = None
            exited, self._loop_exited = self._loop_exited, None
            if exited is not None:
                exited.set()
            announce()

    async def _give_up(self, reason: str) -> None:
        """Kill what runs and end in ``failed``: nothing is retried after a fault of ours."""
        await self._kill_now()
        if self._state in (State.STARTING, State.RUNNING, State.STOPPING):  # stopping: for a check
            self._transition(State.BACKOFF, reason=reason, exit=self._last_exit)
        if self._state in (State.BACKOFF, State.WAITING):
            self._transition(State.FAILED, reason=reason)
        else:
            self._reason = reason

    async def _wait_for_dependencies(self, announce: Callable[[], None]) -> None:
        """Stay ``waiting`` until every dependency meets its condition; nothing polls."""
        dependencies = self._context.dependencies
        if dependencies is None or (blocker := dependencies.blocker()) is None:
            return
        if self._state is not State.WAITING:  # it is already, when adopted after a re-exec
            self._transition(State.WAITING, reason=blocker)
        announce()
        if self._context.ahead is not None:
            self._context.ahead.add(self._prepare_ahead)
        else:
            self._prepare_ahead()
        while True:
            await dependencies.changed()
            now = dependencies.blocker()
            met = now is None
            if met:  # still `waiting`, for its spawn's turn (pacer.Turns): seconds when a thousand are
                now = IN_LINE_TO_SPAWN
            if now != self._reason:
                self._reason = now
                self._context.bus.publish(Update(self.name, self.group, "waiting", None, now))
            if met:
                return

    def _prepare_ahead(self) -> None:
        """The cgroup and the log files, made while the instance waits (if it still does): not
        between its dependencies' readiness and its spawn, where they cost every level of a graph."""
        if self._state is State.WAITING and not self._closing:
            self._make_cgroup_ahead()
            self._create_log_files_ahead()

    async def _run_once(self, announce: Callable[[], None]) -> Retry | None:
        """One run: spawn, watch until it ends. Returns why to retry, or None when done."""
        if self._context.spawn_turns is not None:  # a thousand asked at once: not in one turn
            self._in_line_to_spawn = True
            self.wake_waiters()  # a `--no-wait` request answers now, not once its turn came
            try:
                await self._context.spawn_turns.wait()
            finally:
                self._in_line_to_spawn = False
        async with self._health.log_subscription(list(self._sinks.values())) as followers:
            # Spawn first, then announce: the STARTING event carries the new pid. Nothing
            # awaits in between, so no one can observe the state before the transition.
            try:
                child = self._spawn()
            except (SpawnError, StdioError, LogFileError, CgroupError) as exc:
                self._transition(State.STARTING)
                announce()
                return Retry(str(exc), failed_start=True)
            self._transition(State.STARTING)
            announce()
            return await self._watch(child, followers)

    async def _watch(
        self, child: Child, followers: LogSubscription, resumed: Resumed | None = None
    ) -> Retry | None:
        """Wait for this run to end. Returns why it must be retried, or None when it is done."""
        restart = self.config.restart
        self._trouble = None
        running = resumed is not None and resumed.running

        def on_running() -> None:
            nonlocal running
            if self._trouble is not None:  # a check stops this run (the memory limit, say): not up
                return
            running = True
            self._failures = 0  # it came up: the streak of failed starts is over
            self._transition(State.RUNNING)

        async def kill(reason: str, sig: int | None) -> None:
            """A check stops the run, to start it again: ``stopping`` until it is gone, as a stop
            by hand is, with the check's reason (not `running` while it takes its stop.timeout)."""
            if self._trouble is not None:  # another check stops it already: that stop goes on
                return
            self._trouble = Retry(reason, failed_start=not running)
            self._transition(State.STOPPING, reason=reason)
            await self._terminate(child, self.config.stop.signal if sig is None else sig)

        try:
            up_in = self._health.begin_run(resumed)
            if up_in is None:  # checks to run beside the program: a watcher task
                async with anyio.create_task_group() as tg:
                    # Not kept in this frame: the watcher drops it (the environment's copy) once done.
                    watch = self._health.watch_run
                    tg.start_soon(watch, child, followers, self._exec_context(), on_running, kill, resumed)
                    await child.wait()
                    tg.cancel_scope.cancel()
            else:  # min_uptime alone (most instances): waited for here, no task beside
                if not running:
                    if up_in > 0:
                        with anyio.move_on_after(up_in):
                            await child.wait()
                    if child.exit is None:
                        on_running()
                await child.wait()
        finally:  # ended, or a stop cancelled the watch: either way the run is not ready any more
            self._health.run_ending()
        status = child.exit
        assert status is not None
        self._last_exit = status
        uptime = status.at - child.started_at
        early = not running
        if self._trouble is not None:
            return self._trouble
        succeeded = status.succeeded(restart.success_codes)
        if (restart.policy == "no" and not early) or (restart.policy != "always" and succeeded):
            self._transition(State.EXITED, reason=status.describe(), exit=status)
            return None
        if early:
            return Retry(f"{status.describe()} after {uptime:.2f}s, before min_uptime", failed_start=True)
        return Retry(status.describe(), failed_start=False)

    async def _back_off(self, retry: Retry) -> bool:
        """BACKOFF, then FAILED at the restart limit (False), or a pause before the next start.

        Only failed starts (ended before ``running``) count, in a row, as supervisord's
        ``startretries`` and pm2's unstable restarts do: a program that was up and then
        died is started again after ``restart.delay`` (none by default), however often.
        """
        restart = self.config.restart
        self._transition(State.BACKOFF, reason=retry.why, exit=self._last_exit if self._child else None)
        if retry.failed_start:
            self._failures += 1
            if self._failures > restart.max_restarts:
                self._transition(
                    State.FAILED,
                    reason=f"gave up after {_failed_starts(self._failures)} in a row; last: {retry.why}",
                )
                return False
            backoff = restart.backoff
            delay = min(backoff.initial * backoff.factor ** (self._failures - 1), backoff.max)
            delay *= 1 + random.uniform(0, 0.1)
        else:
            delay = max(restart.delay, self._restart_pace())
        self._next_try = time.monotonic() + delay  # a re-exec meanwhile ends the pause on time
        await anyio.sleep(delay)
        self._count_restart()
        return True

    def _restart_pace(self) -> float:
        """Seconds to wait so that restarts keep to ``RESTARTS_PER_SECOND`` (0 almost always)."""
        if self._restart_budget is None:
            self._restart_budget = Budget(RESTARTS_PER_SECOND, RESTARTS_PER_SECOND)
        return self._restart_budget.wait_for(1)

    def _count_restart(self) -> None:
        self._restarts += 1

@dataclass(frozen=True, slots=True)
class Retry:
    """Why a run must be followed by another, and whether it counts as a failed start."""

    why: str
    failed_start: bool


def _first_cause(exc: BaseException) -> str:
    """``RuntimeError: …`` for a person, not the exception group a task group wrapped it in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _failed_starts(count: int) -> str:
    return "1 failed start" if count == 1 else f"{count} failed starts"
