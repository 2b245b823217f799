"""Readiness and liveness probes: exec, http, tcp, a log line, and the sd_notify protocol.

A probe is one bounded attempt (``probe_once``); the loops around it
(``until_ready``, ``until_failed``) run in the instance's task group, one task
per check and no thread. tcp checks and status-only http checks do not come
here for their rounds: probe_loop.py runs those of all instances in one loop,
with the status parser and the messages of this module. Exec probes spawn through ``process.spawn`` (a pidfd,
as every child of the service); http and tcp connect a non-blocking socket in
the event loop (h11 reads an http answer; https goes through httpx). The log probe reads the instance's
own log sink (no second pipe), and ``NotifySocket`` is one datagram socket per
instance that speaks systemd's notify protocol.

Results go back through a callback, not an event: the instance decides what a
result means for its state, and publishes an event only when the outcome changes.
"""

from __future__ import annotations

import array
import contextlib
import errno
import functools
import ipaddress
import os
import re
import secrets
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import h11

from .config import AliveCheck, ReadyCheck
from .config.records import LOG_SEARCH_TIMEOUT
from .exec_probe_runs import EXEC_RUNS, ExecRun
from .process import SpawnError, spawn

__all__ = [
    "ANSWER_MAX",
    "ExecContext",
    "NotHttp",
    "NotifyMessage",
    "NotifySocket",
    "PatternTooSlow",
    "ProbeFailed",
    "failure_reason",
    "final_status",
    "judge_status",
    "probe_once",
    "request_bytes",
    "until_failed",
    "until_log_line",
    "until_ready",
]

Check = ReadyCheck | AliveCheck
#: Report one probe's outcome: (passed, what happened).
Report = Callable[[bool, str], None]

# An exec probe's output kept for the failure message: its last line is what a person wants.
_EXEC_OUTPUT = 4096
# systemd reads notify datagrams of up to this size; longer ones are cut off and ignored.
_NOTIFY_MAX = 4096
_STATUS_MAX = 200


def printable(text: str, limit: int = _STATUS_MAX) -> str:
    """A program's text as status, events and the service's log may show it: at most ``limit``
    characters, each control character (an escape sequence, a bell, a carriage return) a space.
    The program writes what it likes; a terminal that shows ``supervisor status`` must not obey it."""
    return "".join(c if c.isprintable() else " " for c in text[:limit])
# What an http probe reads at most: the head, and of the body enough to look for a phrase in.
HTTP_HEAD_MAX = 64 * 1024
HTTP_BODY_MAX = 1024 * 1024
#: What a probe reads of an answer at most: it does not read a whole download.
ANSWER_MAX = HTTP_HEAD_MAX + HTTP_BODY_MAX
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?:[ \t][^\r\n]*)?\r?\n")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*([0-9]{1,18})[ \t]*\r?(?:\n|$)")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CHUNKED = re.compile(rb"\ntransfer-encoding:[^\n]*chunked")
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotHttp(Exception):
    """What came back is not an HTTP answer (said in the probe's failure)."""


class ProbeFailed(Exception):
    """One attempt did not pass; the message says why, for the instance's status."""


class PatternTooSlow(ProbeFailed):
    """A log probe's pattern took over ``LOG_SEARCH_TIMEOUT`` on one line: the start fails with it."""


@dataclass(frozen=True, slots=True)
class ExecContext:
    """Where an exec probe runs: the instance's folder, environment and credentials."""

    cwd: str | None
    env: Mapping[str, str]
    user: str | int | None = None
    group: str | int | None = None
    umask: int | None = None


async def probe_once(check: Check, context: ExecContext) -> str:
    """One attempt, bounded by ``check.timeout``: what passed, or ``ProbeFailed`` saying why."""
    kind = check.kind
    if kind == "http" and check.http is not None and check.http.startswith("https:"):
        await _httpx_loaded()  # before the clock starts: our own import is not the server's slowness
    with anyio.move_on_after(check.timeout):
        if kind == "exec":
            return await _exec(check.argv, context)
        if kind == "http":
            assert check.http is not None
            return await _http(check.http, check.expect, check.body, check.timeout)
        if kind == "tcp":
            return await _tcp(*check.address)
        raise AssertionError(f"{kind} checks are not polled")
    raise ProbeFailed(f"{kind} probe timed out after {check.timeout:g}s")


async def until_ready(check: ReadyCheck, context: ExecContext, report: Report) -> None:
    """Probe every ``interval`` until ``success_threshold`` passes in a row."""
    await anyio.sleep(check.initial_delay)
    passes = 0
    while True:
        try:
            result = await probe_once(check, context)
        except ProbeFailed as exc:
            passes = 0
            report(False, str(exc))
        else:
            passes += 1
            report(True, result)
            if passes >= check.success_threshold:
                return
        await anyio.sleep(check.interval)


async def until_failed(check: AliveCheck, context: ExecContext, report: Report) -> str:
    """Probe every ``interval``; return the last error after ``failure_threshold`` failures in a row."""
    await anyio.sleep(check.initial_delay)
    failures = 0
    while True:
        try:
            result = await probe_once(check, context)
        except ProbeFailed as exc:
            failures += 1
            report(False, f"{exc} ({failures} of {check.failure_threshold})")
            if failures >= check.failure_threshold:
                return str(exc)
        else:
            failures = 0
            report(True, result)
        await anyio.sleep(check.interval)


# LOG_SEARCH_TIMEOUT (config/records.py) is the longest a log probe's pattern may search one line.
# Python's own ``re`` cannot be stopped: a pattern that backtracks without end on some line
# (``(a|aa)+b`` on a long run of a's) held the event loop, and with it the whole service, for as
# long as the search ran: minutes, deaf to its socket and to SIGTERM. The ``regex`` module (re's
# syntax) stops a search at a timeout, and runs many such patterns (``(a+)+b``) in linear time to
# begin with. A line reaches the probe at most a few hundred KiB long (logs.py), which a sane
# pattern searches in a millisecond or two.
#
# The limit is per line; a chunk of output (one read of the pipe) holds thousands of lines, and a
# pattern just under the limit (16 ms on a line of twenty a's) held the loop for a minute on the
# output of ``yes``. So the search lets the loop go round after each ``LOG_SEARCH_TURN`` of it: the
# service answers, stops and supervises the rest meanwhile; what the probe is too slow to read,
# its follower drops (logs.py), and ``start_timeout`` ends it.
LOG_SEARCH_TURN = 0.005
async def until_log_line(followers: Iterable[AsyncIterator[bytes]], pattern: str) -> str:
    """Wait for a line that ``pattern`` matches in what the followers (``LogSink.follow()``) bring.

    The caller subscribes before it spawns the program, so that no line falls
    between the spawn and the first look. Lines are matched one by one (a
    pattern never spans two), as text, with undecodable bytes replaced. A search
    that takes over ``LOG_SEARCH_TIMEOUT`` on one line ends the probe: ``PatternTooSlow``;
    the loop goes round after every ``LOG_SEARCH_TURN`` of searching.
    """
    import regex  # 20 ms to import, for a manifest with a log probe only

    compiled = regex.compile(pattern)
    matched: list[str] = []
    stopped_on: list[int] = []  # the length of a line whose search was stopped

    async def watch(chunks: AsyncIterator[bytes], tg: anyio.abc.TaskGroup) -> None:
        async for chunk in chunks:
            turn_began = time.monotonic()
            for raw in chunk.splitlines():
                line = raw.decode(errors="replace")
                try:
                    if compiled.search(line, timeout=LOG_SEARCH_TIMEOUT) is None:
                        if time.monotonic() - turn_began >= LOG_SEARCH_TURN:
                            await anyio.lowlevel.checkpoint()
                            turn_began = time.monotonic()
                        continue
                    matched.append(line)
                except TimeoutError:
                    stopped_on.append(len(line))
                tg.cancel_scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        for chunks in followers:
            tg.start_soon(watch, chunks, tg)
    if stopped_on:
        raise PatternTooSlow(
            f"the log pattern {pattern!r} took over {LOG_SEARCH_TIMEOUT * 1000:g} ms to search a line of "
            f"{stopped_on[0]} characters and was stopped: it backtracks without end on such lines (a "
            "repetition of alternatives that overlap, like (a|aa)+); rewrite it"
        )
    if not matched:  # every stream ended (the sinks closed): the instance is going away
        raise ProbeFailed("the log ended before a line matched")
    return f"log line matched: {printable(matched[0])}"


# -- exec, http, tcp ----------------------------------------------------------------------------


async def _exec(argv: list[str], context: ExecContext) -> str:
    while True:
        try:
            return await _exec_once(argv, context)
        except _EndedByReexec:
            continue  # the re-exec that ended it did not happen: the same attempt, again


class _EndedByReexec(Exception):
    """The probe's program was killed by ``end_exec_probes`` (not a failure of the check)."""


async def _exec_once(argv: list[str], context: ExecContext) -> str:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        try:
            child = spawn(
                argv,
                stdin=None,
                stdout=write_fd,
                stderr=write_fd,
                cwd=context.cwd,
                env=context.env,
                user=context.user,
                group=context.group,
                umask=context.umask,
            )
        except SpawnError as exc:
            raise ProbeFailed(str(exc)) from None
        finally:
            os.close(write_fd)
        output = bytearray()
        run = ExecRun(child)
        EXEC_RUNS[run] = None
        try:
            while True:
                await anyio.wait_readable(read_fd)
                try:
                    data = os.read(read_fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    break
                output += data
                del output[:-_EXEC_OUTPUT]
            status = await child.wait()
        finally:
            del EXEC_RUNS[run]
            if child.exit is None:  # timed out or cancelled: no probe outlives its attempt
                with anyio.CancelScope(shield=True):
                    child.send_signal(signal.SIGKILL, group=True)
                    await child.wait()
    finally:
        os.close(read_fd)
    if run.ended and not status.succeeded([0]):
        raise _EndedByReexec
    if status.succeeded([0]):
        return f"{argv[0]} exited 0"
    last = output.decode(errors="replace").strip().splitlines()
    detail = f": {printable(last[-1])}" if last else ""
    raise ProbeFailed(f"{argv[0]}: {status.describe()}{detail}")


async def _http(url: str, expect: list[int] | None, body: str | None, timeout: float) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https":
        status, text = await _https_get(url, timeout)
    else:
        try:
            status, text = await _http_get(parts, body is not None)
        except OSError as exc:
            raise ProbeFailed(f"GET {url}: {failure_reason(exc)}") from None
        except h11.LocalProtocolError as exc:  # ours: the URL makes no request (the loader refuses such)
            raise ProbeFailed(f"GET {url}: cannot be sent ({exc})") from None
        except (h11.ProtocolError, NotHttp) as exc:
            raise ProbeFailed(f"GET {url}: not an HTTP answer ({exc})") from None
    if body is not None and body not in text and _status_passes(status, expect):
        raise ProbeFailed(f"GET {url}: status {status}, but the body lacks {body!r}")
    return judge_status(url, status, expect)


def _status_passes(status: int, expect: list[int] | None) -> bool:
    return status in expect if expect else 200 <= status < 400


def judge_status(url: str, status: int, expect: list[int] | None) -> str:
    """What a status says (shared with the probe loop, which reads status-only answers itself)."""
    if not _status_passes(status, expect):
        wanted = ", ".join(map(str, expect)) if expect else "2xx or 3xx"
        raise ProbeFailed(f"GET {url}: status {status}, expected {wanted}")
    return f"GET {url}: status {status}"


async def _http_get(parts: SplitResult, want_body: bool) -> tuple[int, str]:
    """One GET over a plain socket, a new connection each time as the kubelet does.

    The hot path of a service that probes hundreds of instances every second: a
    client library costs several times the CPU (connection pools, TLS contexts, a
    resolver thread for an IP address), so plain http is done here and https goes
    to httpx. A status-only probe (the common case) reads the answer's head with a
    few byte searches; h11 reads the answer when the body is checked, since it may
    come chunked. The request goes out without waiting for the connection first:
    on loopback it is up by the time ``send`` runs, which saves a turn of the loop.
    """
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = request_bytes(parts.netloc, target)
    sock = await _open(parts.hostname or "", 80 if parts.port is None else parts.port)
    try:
        await _send_all(sock, request)
        if not want_body:
            return await _read_status(sock), ""
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=HTTP_HEAD_MAX)
        conn.send(h11.Request(method="GET", target=target, headers=_headers(parts.netloc)))
        conn.send(h11.EndOfMessage())
        return await _read_answer(sock, conn)
    finally:
        sock.close()


def _headers(netloc: str) -> list[tuple[str, str]]:
    return [("Host", netloc), ("User-Agent", "procward-probe"), ("Connection", "close")]


@functools.lru_cache(maxsize=1024)
def request_bytes(netloc: str, target: str) -> bytes:
    """The request's bytes, made (and checked) by h11 once per URL, not once per probe."""
    conn = h11.Connection(h11.CLIENT)
    request = conn.send(h11.Request(method="GET", target=target, headers=_headers(netloc)))
    return request + (conn.send(h11.EndOfMessage()) or b"")


async def _read_status(sock: socket.socket) -> int:
    """The final status of the answer, read to its end (closing early would reset the server's side)."""
    data = bytearray()
    while True:
        chunk = await _receive(sock)
        data += chunk
        too_long = len(data) > ANSWER_MAX
        status = final_status(data, eof=not chunk or too_long)
        if status is not None:
            return status


def final_status(data: bytearray, *, eof: bool) -> int | None:
    """The status of the complete answer in ``data``; None while more must be read."""
    at = 0
    while True:
        blank = _HEAD_END.search(data, at)
        line = _STATUS_LINE.match(data, at)
        if line is None and (blank is not None or eof or data.find(b"\n", at) >= 0):
            raise NotHttp("no HTTP status line")
        if blank is None:
            if len(data) - at > HTTP_HEAD_MAX:
                raise NotHttp(f"a head of over {HTTP_HEAD_MAX} bytes")
            if eof:
                raise NotHttp("the connection closed before the end of the head")
            return None
        assert line is not None
        status = int(line[1])
        if 100 <= status < 200 and status != 101:  # 100 Continue and the like: the answer follows
            at = blank.end()
            continue
        head = bytes(data[at : blank.start()]).lower()
        body = len(data) - blank.end()
        if eof or status in (204, 304):
            return status
        if (length := _CONTENT_LENGTH.search(head)) is not None:
            return status if body >= int(length[1]) else None
        if _CHUNKED.search(head) is not None:
            return status if data.endswith(b"0\r\n\r\n") else None
        return None  # delimited by the end of the connection


async def _read_answer(sock: socket.socket, conn: h11.Connection) -> tuple[int, str]:
    status, content, read = 0, bytearray(), 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await _receive(sock))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            # Read to the end (closing with unread data resets the server's connection, which
            # fills its log), keeping what a body check needs, up to a bound.
            if len(content) < HTTP_BODY_MAX:
                content += event.data[: HTTP_BODY_MAX - len(content)]
            read += len(event.data)
            if read >= HTTP_BODY_MAX:
                break  # a probe does not read a whole download
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    return status, content.decode(errors="replace")


_httpx_ready = False


async def _httpx_loaded() -> None:
    """Import httpx (and the httpcore its first client imports) once, in a worker thread.

    That is about 250 ms of the event loop on an idle machine and over a second on a busy one:
    inside the probe's timeout (1 s by default) it failed the first https probe of a loaded host,
    and on the loop it would stall every instance's pipes meanwhile.
    """
    global _httpx_ready
    if not _httpx_ready:
        await anyio.to_thread.run_sync(_import_httpx)
        _httpx_ready = True


def _import_httpx() -> None:
    import httpx

    httpx.AsyncClient(verify=False)  # its transport imports httpcore


async def _https_get(url: str, timeout: float) -> tuple[int, str]:
    import httpx  # only services with an https probe pay for it (loaded by _httpx_loaded)

    try:
        async with httpx.AsyncClient(timeout=timeout, verify=False, follow_redirects=False) as client:
            response = await client.get(url, headers={"User-Agent": "procward-probe"})
    except httpx.HTTPError as exc:
        raise ProbeFailed(f"GET {url}: {failure_reason(exc)}") from None
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:  # a host httpx cannot encode (idna)
        raise ProbeFailed(f"GET {url}: cannot be sent ({exc})") from None
    return response.status_code, response.text[:HTTP_BODY_MAX]


async def _open(host: str, port: int) -> socket.socket:
    """A non-blocking socket whose connect has begun; an IP address costs no resolver (and no thread).

    A refused or failed connect shows at the first ``send``, with the same error.
    """
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        version = None
    address: tuple[Any, ...] = (host, port)
    if version is not None:
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
    else:  # a name (outside the except: its errors are not "not an IP address")
        found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not found:
            raise OSError(errno.EHOSTUNREACH, f"{host} has no address")
        family, _, _, _, address = found[0]
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
    except BlockingIOError:
        pass
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket."""
    sock = await _open(host, port)
    try:
        await anyio.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error)) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)


async def _receive(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            await anyio.wait_readable(sock)


def failure_reason(exc: BaseException) -> str:
    """The root cause in a person's words: "connection refused", not "All connection attempts failed"."""
    cause: BaseException = exc
    while True:
        inner = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
        if inner is None:
            break
        cause = inner
    if isinstance(cause, socket.gaierror) and cause.strerror:  # the resolver's errno is not errno's
        return cause.strerror.lower()
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno).lower()  # asyncio's own text names the address again
    return str(cause) or str(exc) or type(exc).__name__


async def _tcp(host: str, port: int) -> str:
    try:
        sock = await _connect(host, port)
    except OSError as exc:
        raise ProbeFailed(f"connect {host}:{port}: {failure_reason(exc)}") from None
    sock.close()
    return f"connect {host}:{port}: accepted"


# -- sd_notify ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotifyMessage:
    """One datagram: who sent it (from the kernel's credentials) and its KEY=VALUE pairs."""

    pid: int
    fields: Mapping[str, str]

    @property
    def status(self) -> str | None:
        text = self.fields.get("STATUS")
        if text is None:
            return None
        return printable(text)


class NotifySocket:
    """An instance's ``NOTIFY_SOCKET``: a datagram socket in the abstract namespace.

    Abstract, so that no path length limit, folder permission or leftover file
    gets in the way (a program that runs as another user can still reach it); a
    random name, so that nothing guesses it. The kernel tells the sender's pid
    with each datagram (``SO_PASSCRED``): the instance accepts a message only
    from a process of its own group, so another program cannot make it ready.
    """

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            name = f"procward/{os.getpid()}/{secrets.token_hex(8)}"
            sock.bind(b"\0" + name.encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        #: The value of NOTIFY_SOCKET, as sd_notify(3) reads it ('@' for the abstract namespace).
        self.address = "@" + name

    @classmethod
    def adopt(cls, fd: int, address: str) -> NotifySocket:
        """The socket a re-exec'd service inherited (handoff): the program keeps its NOTIFY_SOCKET."""
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sock.setblocking(False)
        notify = cls.__new__(cls)
        notify._sock = sock
        notify.address = address
        return notify

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    async def receive(self) -> NotifyMessage:
        """The next well-formed datagram; cut-off ones and ones without credentials are skipped."""
        space = socket.CMSG_SPACE(_CREDENTIALS.size) + socket.CMSG_SPACE(16 * 4)
        while True:
            await anyio.wait_readable(self._sock)
            try:
                data, ancillary, flags, _ = self._sock.recvmsg(_NOTIFY_MAX, space)
            except (BlockingIOError, InterruptedError):
                continue
            pid = _sender(ancillary)
            if pid is not None and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                return NotifyMessage(pid, _fields(data))


def _sender(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The sender's pid; closes any descriptor passed along (we keep none)."""
    pid = None
    for level, kind, data in ancillary:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(data) >= _CREDENTIALS.size:
            pid = _CREDENTIALS.unpack_from(data)[0]
        elif kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    return pid


def _fields(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in data.decode(errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key and key.isupper():
            fields[key] = value
    return fields
