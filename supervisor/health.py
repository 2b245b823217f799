"""One instance's health across its runs: readiness, liveness, the watchdog and sd_notify.

``Instance`` owns the state machine; this owns what the checks found out and
the watchers that find it, one run at a time (``watch_run``). It never changes
the instance's state itself: it calls back when the run is up (``on_running``)
and asks the instance to stop the program (``kill``) when a check says so, so
every transition still goes through the instance's one ``_transition``.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from .config import InstanceConfig
from .events import EventBus, Update
from .logs import LogSink
from .process import Child
from .resources import ResourceSampler

if TYPE_CHECKING:  # the probe machinery is imported by the instances that have checks only
    from .probes import ExecContext, NotifyMessage, NotifySocket

#: Stop the run's program (with this signal, or the stop signal when None), then SIGKILL.
Kill = Callable[[str, int | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Resumed:
    """A run adopted after a re-exec: whether it was ``running`` already, and for how long it is up."""

    running: bool
    uptime: float


class LogSubscription:
    """The followers a log check reads: left as soon as the check passed (unread, they cost copies).

    An async context manager, entered before the spawn so that no line is missed, left when
    the run ends. Without a log check (most instances) there is nothing to follow: no exit
    stack is made, and entering it costs no generator frame kept for the run's lifetime.
    """

    __slots__ = ("_sinks", "followers", "stack")

    def __init__(self, sinks: Sequence[LogSink] | None) -> None:
        self._sinks = sinks
        self.stack: AsyncExitStack | None = None
        self.followers: list[AsyncIterator[bytes]] = []

    async def __aenter__(self) -> LogSubscription:
        sinks, self._sinks = self._sinks, None
        if sinks:
            stack = self.stack = AsyncExitStack()
            try:
                for sink in sinks:
                    self.followers.append(await stack.enter_async_context(sink.follow()))
            except BaseException:
                await self.aclose()
                raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self.followers.clear()
        stack, self.stack = self.stack, None
        if stack is not None:
            await stack.aclose()


class Health:
    """What the checks say about one instance, and the watchers of its current run."""

    def __init__(self, name: str, group: str, config: InstanceConfig, bus: EventBus) -> None:
        self._name = name
        self._group = group
        self._config = config
        self._bus = bus
        check = config.ready
        #: None without a readiness check; else whether the current run passed it.
        self.ready: bool | None = None if check is None else False
        #: The last probe result (ready or alive), for status.
        self.last_check: str | None = None
        #: The last STATUS= text an sd_notify program sent.
        self.status_text: str | None = None
        self._outcomes: dict[str, object] = {}
        self._notify: NotifySocket | None = None
        if check is not None and check.kind == "notify":
            from .probes import NotifySocket

            self._notify = NotifySocket()
        # Only a notify program sets these; the others' runs make none (an Event costs ~0.8 KB).
        self._notified_ready: anyio.Event | None = None
        self._watchdog_ping: anyio.Event | None = None
        self._watchdog_armed: anyio.Event | None = None
        self._watchdog_trigger = False
        self._main_pid: int | None = None
        #: The kernel caps the instance's cgroup at limits.memory_max (else RSS restarts stand in).
        self.kernel_memory_max = False

    def close(self) -> None:
        if self._notify is not None:
            self._notify.close()

    # -- the handoff (re-exec) -------------------------------------------------------------

    def handoff_state(self) -> dict[str, Any]:
        """What a re-exec'd service needs to go on watching the current run (see handoff/state.py)."""
        notify = self._notify
        return {
            "ready": self.ready,
            "last_check": self.last_check,
            "status_text": self.status_text,
            "main_pid": self._main_pid,
            "notified": self._notified_ready is not None and self._notified_ready.is_set(),
            "armed": self._watchdog_armed is not None and self._watchdog_armed.is_set(),
            "notify": None if notify is None else {"fd": notify.fileno(), "address": notify.address},
        }

    def adopt(self, state: dict[str, Any]) -> None:
        """Take over what ``handoff_state`` wrote, the notify socket included (its fd inherited)."""
        self.ready = state["ready"]
        self.last_check = state["last_check"]
        self.status_text = state["status_text"]
        self._main_pid = state["main_pid"]
        notify = state["notify"]
        if notify is not None:
            from .probes import NotifySocket

            if self._notify is not None:
                self._notify.close()  # the fresh one made by __init__: the program knows the old one
            self._notify = NotifySocket.adopt(notify["fd"], notify["address"])
            self._fresh_notify_events()
            assert self._notified_ready is not None and self._watchdog_armed is not None
            if state["notified"]:
                self._notified_ready.set()
            if state["armed"]:
                self._watchdog_armed.set()

    def environment(self) -> dict[str, str]:
        """What a notify program needs in its environment, as systemd gives it."""
        env: dict[str, str] = {}
        if self._notify is not None:
            env["NOTIFY_SOCKET"] = self._notify.address
            if self._config.watchdog is not None:
                env["WATCHDOG_USEC"] = str(max(1, round(self._config.watchdog * 1_000_000)))
        return env

    def note(self, kind: str, ok: bool | None, message: str | None) -> None:
        """Publish an ``Update`` when the outcome of ``kind`` changes (the message alone, for texts)."""
        outcome = ok if ok is not None else message
        if self._outcomes.get(kind, ...) == outcome:
            return
        self._outcomes[kind] = outcome
        self._bus.publish(Update(self._name, self._group, kind, ok, message))

    def log_subscription(self, sinks: Sequence[LogSink]) -> LogSubscription:
        """Follow the sinks for a log check; enter it before the spawn, so that no line is missed."""
        check = self._config.ready
        return LogSubscription(sinks if check is not None and check.kind == "log" else None)

    # -- one run ---------------------------------------------------------------------------

    async def watch_run(
        self,
        child: Child,
        followers: LogSubscription,
        context: ExecContext,
        on_running: Callable[[], None],
        kill: Kill,
        resumed: Resumed | None = None,
    ) -> None:
        """Watch one run until it ends (the caller cancels this when the program exits).

        The run is up once ``restart.min_uptime`` passed and the readiness check
        (if any) passed; ``on_running`` is called then, and liveness takes over.
        ``resumed``: a run adopted after a re-exec, with what ``adopt`` restored; what
        it had passed already is not asked again (a notify program says READY=1 once).
        Call ``begin_run`` first.
        """
        config = self._config
        limits = config.limits
        memory = self._memory_limit()
        if memory is None and self._notify is None:
            # No watcher beside the run (most instances): no task group, and once up without a
            # liveness check, this task ends; what it held goes with it.
            await self._up_then_alive(followers, context, on_running, kill, resumed)
            return
        async with anyio.create_task_group() as tg:
            if memory is not None:
                tg.start_soon(self._watch_memory, child, memory, limits.memory_interval, kill)
            if self._notify is not None:
                tg.start_soon(self._serve_notify, child)
                if config.watchdog is not None:
                    tg.start_soon(self._watch_dog, config.watchdog, kill)
            await self._up_then_alive(followers, context, on_running, kill, resumed)

    def begin_run(self, resumed: Resumed | None) -> float | None:
        """A run begins (or goes on after a re-exec): the last run's outcomes are forgotten.

        Returns in how many seconds the run counts as up when only ``min_uptime`` is to
        wait for (no readiness check left, no liveness check, no memory limit, no
        notify socket): the instance waits for that in its own task, with no
        ``watch_run`` beside it. None when ``watch_run`` must watch the run.
        """
        config = self._config
        if resumed is None:
            if config.ready is not None:
                self.ready = False
            for kind in ("ready", "alive", "watchdog", "memory"):  # each run's first outcome is news
                self._outcomes.pop(kind, None)
            # The last run's probe and STATUS= text say nothing of this one: a `starting`
            # instance showed the `status 200` that made the last run ready, beside `ready:
            # false`, and its `serving 300 req/s` (systemd clears a unit's status text too).
            self.last_check = None
            self.status_text = None
            self._watchdog_trigger = False
            self._main_pid = None
            if self._notify is not None:
                self._fresh_notify_events()
        if self._notify is not None or config.alive is not None or self._memory_limit() is not None:
            return None
        if config.ready is not None and not self.ready:
            return None
        uptime = 0.0 if resumed is None else resumed.uptime
        return max(0.0, config.restart.min_uptime - uptime)

    def _memory_limit(self) -> int | None:
        limits = self._config.limits
        memory = limits.memory
        if memory is None and not self.kernel_memory_max:  # memory_max's fallback: a restart on RSS
            memory = limits.memory_max
        return memory

    def _fresh_notify_events(self) -> None:
        self._notified_ready = anyio.Event()
        self._watchdog_armed = anyio.Event()
        self._watchdog_ping = anyio.Event()

    async def _up_then_alive(
        self,
        followers: LogSubscription,
        context: ExecContext,
        on_running: Callable[[], None],
        kill: Kill,
        resumed: Resumed | None,
    ) -> None:
        """Up after ``min_uptime`` and the readiness check; then liveness, if configured.

        A run adopted after a re-exec waits only for what of that was left.
        """
        config = self._config
        if resumed is None or not resumed.running:
            uptime = 0.0 if resumed is None else resumed.uptime
            wait = max(0.0, config.restart.min_uptime - uptime)
            if config.ready is None or self.ready:
                await anyio.sleep(wait)
            else:
                async with anyio.create_task_group() as startup:
                    startup.start_soon(anyio.sleep, wait)
                    startup.start_soon(self._become_ready, followers, context, kill)
            on_running()
        if config.alive is not None:
            from .probe_loop import until_failed

            reason = await until_failed(config.alive, context, self._report("alive"))
            self.note("alive", False, f"restarting: {reason}")
            await kill(f"liveness: {reason}", None)
            await anyio.sleep_forever()  # the program is gone: the caller cancels us

    def run_ending(self) -> None:
        """The program is gone, or on its way out (``stopping``): whatever it was, not ready now."""
        if self._config.ready is not None:
            self.ready = False

    async def _become_ready(self, followers: LogSubscription, context: ExecContext, kill: Kill) -> None:
        from .probe_loop import until_ready
        from .probes import PatternTooSlow, ProbeFailed, until_log_line

        check = self._config.ready
        assert check is not None
        limit = math.inf if check.start_timeout is None else check.start_timeout
        with anyio.move_on_after(limit):
            if check.kind == "notify":
                assert self._notified_ready is not None
                await self._notified_ready.wait()
                result = "READY=1"
            elif check.kind == "log":
                assert check.log is not None
                try:
                    result = await until_log_line(list(followers.followers), check.log)
                except PatternTooSlow as exc:  # searched again, it would hold the loop again
                    await followers.aclose()
                    reason = f"not ready: {exc}"
                    self.note("ready", False, reason)
                    await kill(reason, None)
                    await anyio.sleep_forever()
                except ProbeFailed:
                    await anyio.sleep_forever()  # the sinks closed: the instance is going away
            else:
                await until_ready(check, context, self._report("ready"))
                result = self.last_check or "passed"
            await followers.aclose()
            self.ready = True
            self.last_check = result
            self.note("ready", True, result)
            return
        await followers.aclose()
        why = self.last_check if self._outcomes.get("ready") is False else None
        reason = f"not ready after {check.start_timeout:g}s" + (f": {why}" if why else "")
        self.note("ready", False, reason)
        await kill(reason, None)
        await anyio.sleep_forever()

    async def _watch_memory(self, child: Child, limit: int, interval: float, kill: Kill) -> None:
        """Restart the run once its group's RSS stayed above ``limit`` for ``interval`` seconds.

        Read five times per interval (at most once a second), so a short peak
        between two readings below the limit is let through, as pm2 does. The
        scan of /proc runs in a worker thread: with thousands of processes it
        takes milliseconds the event loop owes to every other instance.
        """
        sampler = ResourceSampler(max_age=0.0)
        period = min(interval / 5, 1.0)
        above_since: float | None = None
        # With a cgroup of its own: its members (also what left the group), and no scan of all /proc.
        cgroups = {child.pgid: child.cgroup.path} if child.cgroup is not None else None
        while True:
            figures = await anyio.to_thread.run_sync(sampler.figures, [child.pgid], cgroups)
            rss = figures[child.pgid].rss_bytes if child.pgid in figures else 0
            now = anyio.current_time()
            if rss <= limit:
                above_since = None
            elif above_since is None:
                above_since = now
            elif now - above_since >= interval:
                break
            await anyio.sleep(period)
        reason = f"memory: RSS {_mib(rss)} over the limit {_mib(limit)} for {interval:g}s"
        self.note("memory", False, reason)
        await kill(reason, None)
        await anyio.sleep_forever()

    def _report(self, kind: str) -> Callable[[bool, str], None]:
        def report(ok: bool, message: str) -> None:
            self.last_check = message
            self.note(kind, ok, message)

        return report

    # -- sd_notify -------------------------------------------------------------------------

    async def _serve_notify(self, child: Child) -> None:
        assert self._notify is not None
        while True:
            message = await self._notify.receive()
            if self._from_run(message.pid, child):
                self._take(message)

    def _from_run(self, pid: int, child: Child) -> bool:
        """A datagram counts only from the run's own process group (or its declared MAINPID)."""
        if pid in (child.pid, self._main_pid):
            return True
        try:
            return os.getpgid(pid) == child.pgid
        except OSError:  # gone already, or not visible: it cannot be told apart from a stranger
            return False

    def _take(self, message: NotifyMessage) -> None:
        fields = message.fields
        main = fields.get("MAINPID", "")
        if main.isdigit():
            self._main_pid = int(main)
        status = message.status
        if status is not None:
            self.status_text = status
            self.note("notify", None, status)
        if fields.get("RELOADING") == "1" and self.ready:
            self.ready = False
            self.note("ready", False, "RELOADING=1")
        if fields.get("STOPPING") == "1":
            self.note("notify", None, "STOPPING=1")
            if self.ready:  # it said it is shutting down: it serves nobody any more (systemd's deactivating)
                self.ready = False
                self.note("ready", False, "STOPPING=1")
        assert self._watchdog_armed is not None and self._notified_ready is not None
        if fields.get("READY") == "1":
            self._watchdog_armed.set()
            if not self._notified_ready.is_set():
                self._notified_ready.set()
            elif not self.ready:  # ready again after RELOADING=1
                self.ready = True
                self.last_check = "READY=1"
                self.note("ready", True, "READY=1")
        ping = fields.get("WATCHDOG")
        if ping in ("1", "trigger"):
            self._watchdog_trigger = ping == "trigger"
            self._watchdog_armed.set()
            if self._watchdog_ping is not None:
                self._watchdog_ping.set()

    async def _watch_dog(self, interval: float, kill: Kill) -> None:
        """Armed at READY=1 or the first ping: a slow start is ``ready.start_timeout``'s business."""
        assert self._watchdog_armed is not None
        await self._watchdog_armed.wait()
        while True:
            ping = self._watchdog_ping = anyio.Event()
            with anyio.move_on_after(interval) as scope:
                await ping.wait()
            if scope.cancelled_caught or self._watchdog_trigger:
                break
        if self._watchdog_trigger:
            reason = "watchdog: the program sent WATCHDOG=trigger"
        else:
            reason = f"watchdog: no WATCHDOG=1 within {interval:g}s"
        self.note("watchdog", False, reason)
        await kill(reason, self._config.watchdog_signal)
        await anyio.sleep_forever()



def _mib(size: int) -> str:
    return f"{size / 2**20:.0f}MiB" if size >= 2**20 else f"{size}B"
