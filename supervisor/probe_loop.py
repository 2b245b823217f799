"""One loop for the status-only http and the tcp probes of every instance of the service.

Probing a hundred instances once a second the obvious way (a task per check, a
sleep, a timeout scope and a wait for the socket per probe) spends most of its
CPU in the event loop's turns, not in the probe: measured, ~490 µs a probe, of
which the sockets are under half. Here the probes of all instances share one
timer heap and one epoll descriptor; a wake-up starts every probe that is due
(and those due within a small tolerance: ``_tolerance``), reads every socket that
is ready, cuts every probe past its timeout, and tells each owner its outcome
synchronously through a callback. An owner's task sleeps on one event until its
check is decided (ready, or failed ``failure_threshold`` times): no loop turn of
its own per probe.

No task of its own: the loop runs in the task of one of the owners waiting on
it (the *driver*); when that owner leaves (its check decided, its run ended,
cancelled), it hands the loop to another waiting owner. So the loop lives
exactly as long as someone waits on it, in a task group that someone owns
(ARCHITECTURE.md, decision 10), with no new hook in the manager. One loop per
event loop run (an anyio ``RunVar``), on both backends: the epoll descriptor is
awaited with ``anyio.wait_readable``.

What moves here: tcp checks, and http checks without a ``body`` (status only).
https (httpx), body checks (h11), exec, log and notify stay in probes.py, one
task per check. A host name is resolved by a small thread pool (the resolver
blocks), its answer handed back through an eventfd in the epoll set; an IP
address, the common case, needs none.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import heapq
import ipaddress
import itertools
import math
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.lowlevel import RunVar

from . import probes
from .config import AliveCheck, ReadyCheck
from .probes import Check, ExecContext, NotHttp, ProbeFailed, Report, failure_reason, final_status

__all__ = ["ProbeLoop", "on_the_loop", "until_failed", "until_ready"]

#: The owner's verdict on one outcome: True when its check is decided (the watch ends).
Outcome = Callable[[bool, str], bool]

_READ_MAX = 65536
_RESOLVERS = 4  # threads for host names; an IP address needs none
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT

_SHARED: RunVar[ProbeLoop] = RunVar("procward_probe_loop")


def on_the_loop(check: Check) -> bool:
    """Whether the shared loop runs this check: tcp, and plain http that looks at the status only."""
    if check.kind == "tcp":
        return True
    return check.kind == "http" and check.body is None and (check.http or "").startswith("http://")


async def until_ready(check: ReadyCheck, context: ExecContext, report: Report) -> None:
    """``probes.until_ready``, with the shared loop doing the probing where it can."""
    if not on_the_loop(check):
        return await probes.until_ready(check, context, report)
    passes = 0

    def outcome(ok: bool, message: str) -> bool:
        nonlocal passes
        passes = passes + 1 if ok else 0
        report(ok, message)
        return passes >= check.success_threshold

    await shared().watch(check, outcome)


async def until_failed(check: AliveCheck, context: ExecContext, report: Report) -> str:
    """``probes.until_failed``, with the shared loop doing the probing where it can."""
    if not on_the_loop(check):
        return await probes.until_failed(check, context, report)
    failures = 0
    last = ""

    def outcome(ok: bool, message: str) -> bool:
        nonlocal failures, last
        if ok:
            failures = 0
            report(True, message)
            return False
        failures += 1
        last = message
        report(False, f"{message} ({failures} of {check.failure_threshold})")
        return failures >= check.failure_threshold

    await shared().watch(check, outcome)
    return last


def shared() -> ProbeLoop:
    """This event loop run's probe loop (made at the first use)."""
    try:
        return _SHARED.get()
    except LookupError:
        loop = ProbeLoop()
        _SHARED.set(loop)
        return loop


#: How early, as a share of its interval, a probe may run to join a wake-up that happens anyway.
EARLY = 0.1
#: After a wake-up that sent requests, answers are gathered for this long before the next look:
#: local servers answer within it, and one wake-up then reads them all.
GATHER = 0.002


def _tolerance(interval: float) -> float:
    """How early a due probe may run: a tenth of its interval (at most a second).

    Wake-ups, not probes, are what the loop costs (each is a sleep and a wake of the
    service's thread, a timeout scope, an epoll registration). Pulling a probe that
    is due soon into a wake-up that happens anyway merges schedules: after one round,
    checks started ~10 ms apart share a wake-up, and 100 checks probed every second
    need about ten wake-ups a second instead of two hundred.
    """
    return min(interval * EARLY, 1.0)


class _Watch:
    """One owner's check: where to probe, its timing, and its probe in flight (at most one)."""

    __slots__ = (
        "address",
        "data",
        "error",
        "expect",
        "family",
        "finished",
        "host",
        "interval",
        "kind",
        "outcome",
        "pending",
        "port",
        "request",
        "sock",
        "timeout",
        "token",
        "tolerance",
        "url",
        "wake",
    )

    def __init__(self, check: Check, outcome: Outcome) -> None:
        self.kind = check.kind
        self.url = check.http or ""
        self.expect = check.expect if self.kind == "http" else None
        self.request = b""
        if self.kind == "http":
            parts = urlsplit(self.url)
            self.host, self.port = parts.hostname or "", 80 if parts.port is None else parts.port
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            self.request = probes.request_bytes(parts.netloc, target)
        else:
            self.host, self.port = check.address
        self.family: int | None = None  # None: a host name, resolved at each probe
        self.address: tuple[Any, ...] = (self.host, self.port)
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            pass
        else:
            self.family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self.interval = check.interval
        self.timeout = check.timeout
        self.tolerance = _tolerance(check.interval)
        self.outcome = outcome
        self.token = 0  # bumped whenever the watch's heap entry or probe in flight is superseded
        self.finished = False
        self.error: BaseException | None = None  # what the outcome callback raised, for its owner
        self.wake: anyio.Event | None = None
        self.sock: socket.socket | None = None
        self.data = bytearray()
        self.pending = memoryview(b"")  # http: the part of the request not sent yet

    def failure(self, exc: BaseException) -> str:
        if self.kind == "tcp":
            return f"connect {self.host}:{self.port}: {failure_reason(exc)}"
        return f"GET {self.url}: {failure_reason(exc)}"


class ProbeLoop:
    """The timer heap, the epoll set and the sockets in flight of every watch of one event loop run."""

    def __init__(self) -> None:
        # (when, sequence, watch, token, is_deadline): a due probe, or a probe in flight's deadline.
        self._heap: list[tuple[float, int, _Watch, int, bool]] = []
        self._sequence = itertools.count()
        self._watches: dict[_Watch, None] = {}  # insertion-ordered: the driver's successor is the oldest
        self._by_fd: dict[int, _Watch] = {}
        self._epoll: select.epoll | None = None
        self._kick = -1  # an eventfd in the epoll set: a new watch, or a name resolved, wakes the driver
        self._lock = threading.Lock()  # the resolver threads write the eventfd; close() must not race them
        self._resolver: concurrent.futures.ThreadPoolExecutor | None = None
        self._resolved: collections.deque[tuple[_Watch, int, concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._driver: _Watch | None = None
        # When the driver's timer ends: an entry due earlier must kick it (-inf: no driver waits).
        self._wake_at = -math.inf
        #: Wake-ups of the driver so far: what the loop costs, against the probes it ran (tests, bench).
        self.wakeups = 0
        self._sent = 0  # probes that began to wait for their socket in the current wake-up

    @property
    def watching(self) -> int:
        """How many checks wait on the loop (for tests and the docs' figures)."""
        return len(self._watches)

    async def watch(self, check: Check, outcome: Outcome) -> None:
        """Probe ``check`` every ``interval`` until ``outcome`` says it is decided.

        The first probe is due after ``initial_delay``; each next one ``interval``
        after the last ended, as in probes.py. ``outcome`` runs in whichever task
        drives the loop: it must not block; what it raises comes out here.
        """
        me = _Watch(check, outcome)
        if self._epoll is None:
            self._open()
        self._watches[me] = None
        self._schedule(me, anyio.current_time() + check.initial_delay)
        try:
            while not me.finished:
                if self._driver is None:
                    self._driver = me
                    try:
                        await self._drive(me)
                    finally:
                        self._driver = None
                else:
                    me.wake = anyio.Event()
                    await me.wake.wait()
        finally:
            self._leave(me)
        if me.error is not None:
            raise me.error

    # -- the owners' side ------------------------------------------------------------------

    def _open(self) -> None:
        self._epoll = select.epoll()
        self._kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._kick, _IN)

    def _close(self) -> None:
        """The last watch left: nothing stays open between uses."""
        assert self._epoll is not None
        self._epoll.close()
        self._epoll = None
        with self._lock:
            os.close(self._kick)
            self._kick = -1
        self._heap.clear()
        self._resolved.clear()
        if self._resolver is not None:
            self._resolver.shutdown(wait=False, cancel_futures=True)
            self._resolver = None

    def _leave(self, me: _Watch) -> None:
        me.finished = True
        me.token += 1
        self._drop_socket(me)
        self._watches.pop(me, None)
        if not self._watches:
            self._close()
        elif self._driver is None:
            # Hand the loop over: the oldest waiting owner drives from now on.
            successor = next(iter(self._watches))
            if successor.wake is not None:
                successor.wake.set()

    def _schedule(self, watch: _Watch, when: float, deadline: bool = False) -> None:
        watch.token += 1
        heapq.heappush(self._heap, (when, next(self._sequence), watch, watch.token, deadline))
        if when < self._wake_at and self._driver is not watch:
            self._kick_driver()

    def _kick_driver(self) -> None:
        with self._lock:
            if self._kick >= 0:
                os.eventfd_write(self._kick, 1)

    # -- the driver's side -----------------------------------------------------------------

    async def _drive(self, me: _Watch) -> None:
        """Wake up for sockets and timers until ``me`` is decided; one timeout scope per wake-up."""
        assert self._epoll is not None
        epoll = self._epoll
        while True:
            self.wakeups += 1
            now = anyio.current_time()
            answered = False
            for fd, _ in epoll.poll(0):
                watch = self._by_fd.get(fd)
                if watch is not None:
                    self._progress(watch, now)
                    answered = True
                elif fd == self._kick:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
            while self._resolved:
                self._connect_resolved(*self._resolved.popleft(), now)
            sent = self._run_timers(now)
            if me.finished:
                return
            delay = self._next_timer() - now
            self._wake_at = now + delay
            try:
                if (sent or (answered and self._by_fd)) and delay > GATHER:
                    # Requests just went out, or answers are coming in: the rest come within a
                    # moment, and one wake-up after it reads them all (not one wake-up per answer).
                    # A pause that brought nothing ends it: a silent server is not polled.
                    self._wake_at = now + GATHER
                    await anyio.sleep(GATHER)
                elif delay == math.inf:
                    await anyio.wait_readable(epoll.fileno())
                else:
                    with anyio.move_on_after(max(delay, 0.0)):
                        await anyio.wait_readable(epoll.fileno())
            finally:
                self._wake_at = -math.inf  # while the driver works, nobody needs to kick it

    def _next_timer(self) -> float:
        heap = self._heap
        while heap:
            when, _, watch, token, _ = heap[0]
            if token == watch.token:
                # A due probe's own time, not its early one: the wake-up then pulls in those due
                # within their tolerance, and the next wake-up comes after that window, not inside it.
                return when
            heapq.heappop(heap)
        return math.inf

    def _run_timers(self, now: float) -> bool:
        """Start the due probes and cut the late ones; whether one of them now waits for an answer."""
        self._sent = 0
        heap = self._heap
        while heap:
            when, _, watch, token, deadline = heap[0]
            if token != watch.token:
                heapq.heappop(heap)
                continue
            if when - (0 if deadline else watch.tolerance) > now:
                break
            heapq.heappop(heap)
            if deadline:
                self._drop_socket(watch)
                self._decide(watch, now, False, f"{watch.kind} probe timed out after {watch.timeout:g}s")
            else:
                self._start(watch, now)
        # Only fresh requests are worth a pause: a probe stuck on a silent server must not turn
        # the gathering into polling.
        return self._sent > 0

    def _start(self, watch: _Watch, now: float) -> None:
        """Begin one probe: a non-blocking connect (after a resolution, for a host name)."""
        self._schedule(watch, now + watch.timeout, deadline=True)
        if watch.family is not None:
            self._connect(watch, watch.family, watch.address, now)
            return
        if self._resolver is None:
            self._resolver = concurrent.futures.ThreadPoolExecutor(_RESOLVERS, "procward-resolve")
        token = watch.token
        future = self._resolver.submit(socket.getaddrinfo, watch.host, watch.port, type=socket.SOCK_STREAM)

        def resolved(done: concurrent.futures.Future[Any]) -> None:  # in a resolver thread
            self._resolved.append((watch, token, done))
            self._kick_driver()

        future.add_done_callback(resolved)

    def _connect_resolved(
        self, watch: _Watch, token: int, future: concurrent.futures.Future[Any], now: float
    ) -> None:
        if token != watch.token or future.cancelled():
            return  # timed out meanwhile, or its owner left
        try:
            found = future.result()
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            self._decide(watch, now, False, watch.failure(exc))
            return
        if not found:
            unreachable = OSError(errno.EHOSTUNREACH, f"{watch.host} has no address")
            self._decide(watch, now, False, watch.failure(unreachable))
            return
        family, _, _, _, address = found[0]
        self._connect(watch, family, address, now)

    def _connect(self, watch: _Watch, family: int, address: tuple[Any, ...], now: float) -> None:
        """Connect, and for http send the request at once (on loopback the connection is up by then)."""
        assert self._epoll is not None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:  # out of descriptors, say: this probe fails, not the loop
            self._decide(watch, now, False, watch.failure(exc))
            return
        watch.sock = sock
        watch.data = bytearray()
        try:
            try:
                sock.connect(address)
            except BlockingIOError:
                pass
            if watch.kind == "tcp":
                # On loopback the handshake is done by now: asking again tells, with no wake-up.
                code = sock.connect_ex(address)
                if code in (0, errno.EISCONN):
                    sock.close()
                    watch.sock = None
                    self._decide(watch, now, True, f"connect {watch.host}:{watch.port}: accepted")
                    return
                if code not in (errno.EALREADY, errno.EINPROGRESS):
                    raise OSError(code, os.strerror(code))
                self._epoll.register(sock, _OUT)
            else:
                watch.pending = memoryview(watch.request)
                self._send(watch)
                self._epoll.register(sock, _OUT if watch.pending else _IN)
        except OSError as exc:
            self._drop_socket(watch)
            self._decide(watch, now, False, watch.failure(exc))
            return
        self._by_fd[sock.fileno()] = watch
        self._sent += 1

    def _send(self, watch: _Watch) -> None:
        assert watch.sock is not None
        try:
            while watch.pending:
                watch.pending = watch.pending[watch.sock.send(watch.pending) :]
        except BlockingIOError:
            pass

    def _progress(self, watch: _Watch, now: float) -> None:
        """The socket is ready: finish the connect (tcp), the request, or read what came."""
        sock = watch.sock
        assert sock is not None and self._epoll is not None
        try:
            if watch.kind == "tcp":
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
                self._drop_socket(watch)
                self._decide(watch, now, True, f"connect {watch.host}:{watch.port}: accepted")
                return
            if watch.pending:
                self._send(watch)
                if not watch.pending:
                    self._epoll.modify(sock, _IN)
                return
            status = self._read(watch, sock)
        except OSError as exc:
            self._drop_socket(watch)
            self._decide(watch, now, False, watch.failure(exc))
            return
        except NotHttp as exc:
            self._drop_socket(watch)
            self._decide(watch, now, False, f"GET {watch.url}: not an HTTP answer ({exc})")
            return
        if status is None:
            return
        self._drop_socket(watch)
        try:
            message = probes.judge_status(watch.url, status, watch.expect)
        except ProbeFailed as exc:
            self._decide(watch, now, False, str(exc))
        else:
            self._decide(watch, now, True, message)

    def _read(self, watch: _Watch, sock: socket.socket) -> int | None:
        """Read what is there; the answer's final status once it is complete (see probes.final_status)."""
        while True:
            try:
                chunk = sock.recv(_READ_MAX)
            except BlockingIOError:
                return None
            watch.data += chunk
            status = final_status(watch.data, eof=not chunk or len(watch.data) > probes.ANSWER_MAX)
            if status is not None:
                return status

    def _drop_socket(self, watch: _Watch) -> None:
        sock = watch.sock
        if sock is None:
            return
        watch.sock = None
        self._by_fd.pop(sock.fileno(), None)
        sock.close()  # also leaves the epoll set: the descriptor is not shared

    def _decide(self, watch: _Watch, now: float, ok: bool, message: str) -> None:
        """Tell the owner; schedule the next probe, or wake the owner once its check is decided."""
        watch.data = bytearray()
        try:
            decided = watch.outcome(ok, message)
        except Exception as exc:  # the owner's trouble is its own: it gets it back, the loop goes on
            watch.error = exc
            decided = True
        if decided:
            watch.finished = True
            watch.token += 1
            if watch.wake is not None:
                watch.wake.set()
        else:
            self._schedule(watch, now + watch.interval)
