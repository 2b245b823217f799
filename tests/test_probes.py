"""Readiness, liveness, sd_notify and the watchdog, with real processes, sockets and servers."""

from __future__ import annotations

import array
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import anyio.streams.tls
import pytest

from supervisor.config import Manifest, ManifestError
from supervisor.events import State
from supervisor.probes import ExecContext, NotHttp, ProbeFailed, final_status, probe_once

from .helpers import manifest_from, running
from .service_fixture import free_port

pytestmark = pytest.mark.anyio

NOTIFY_PROGRAM = """
import os, signal, socket, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
signal.signal(signal.SIGABRT, lambda *_: os._exit(42))
address = os.environ["NOTIFY_SOCKET"].replace("@", "\\0", 1)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for message in sys.argv[1:]:
    if message == "wait":
        signal.sigwait({signal.SIGUSR1})
    else:
        sock.sendto(message.replace("|", "\\n").encode(), address)
while True:
    signal.pause()  # a handler (ABRT's) can run here, unlike in sigwait
"""


def _to(state: State, name: str):  # type: ignore[no-untyped-def]
    return lambda e: e.to_state is state and e.instance == name


def _notify_program(tmp_path: Path) -> Path:
    path = tmp_path / "notify.py"
    path.write_text(textwrap.dedent(NOTIFY_PROGRAM))
    return path


def _notify_manifest(tmp_path: Path, *messages: str, settings: str = "restart: {min_uptime: 0}") -> Manifest:
    """An instance ``svc`` that runs ``NOTIFY_PROGRAM`` with ``messages`` and is ready by notify."""
    program = _notify_program(tmp_path)
    command = json.dumps(["python3", str(program), *messages])
    return manifest_from(
        f"version: 1\ninstances:\n  svc:\n    command: {command}\n    ready: {{notify: true}}\n"
        f"    {settings}\n",
        tmp_path,
    )


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _send(address: str, payload: bytes, fds: list[int] | None = None) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        target = address.replace("@", "\0", 1)
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sock.sendmsg([payload], ancillary, 0, target)
        else:
            sock.sendto(payload, target)


# -- sd_notify ----------------------------------------------------------------------------------


async def test_notify_ready_status_and_a_foreign_ready_is_ignored(tmp_path: Path) -> None:
    manifest = _notify_manifest(
        tmp_path, "STATUS=waiting for a go", "wait", "STATUS=got the go", "wait", "READY=1|STATUS=serving"
    )
    async with running(manifest) as (manager, events):
        svc = manager.instances["svc"]

        def status_is(text: str):  # type: ignore[no-untyped-def]
            return lambda: svc.status().status_text == text

        await events.until(status_is("waiting for a go"))
        assert svc.state is State.STARTING and svc.status().ready is False
        address = _environ(svc.pid or 0)["NOTIFY_SOCKET"]
        assert address.startswith("@procward/")
        # A stranger (this test process) says READY=1, and passes a descriptor along for good
        # measure: both are ignored, and the descriptor is not kept by the service.
        spare_r, spare_w = os.pipe()
        _send(address, b"READY=1\nSTATUS=forged", [spare_r])
        os.close(spare_r)
        svc.signal(signal.SIGUSR1)
        await events.until(status_is("got the go"))  # sent after the forged one: that was seen
        assert svc.state is State.STARTING and svc.status().ready is False
        os.close(spare_w)
        svc.signal(signal.SIGUSR1)
        await events.wait_for(_to(State.RUNNING, "svc"))
        status = svc.status()
        assert (status.ready, status.status_text, status.last_check) == (True, "serving", "READY=1")
        texts = [u.message for u in events.updates if u.instance == "svc" and u.kind == "notify"]
        assert texts == ["waiting for a go", "got the go", "serving"]


async def test_stopping_1_makes_a_notify_instance_not_ready(tmp_path: Path) -> None:
    """``STOPPING=1``: the program began its shutdown (systemd's deactivating), and serves nobody."""
    manifest = _notify_manifest(tmp_path, "READY=1", "wait", "STOPPING=1")
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "svc"))
        svc = manager.instances["svc"]
        assert svc.status().ready is True
        svc.signal(signal.SIGUSR1)
        await events.until(lambda: any(u.kind == "ready" and u.ok is False for u in events.updates))
        status = svc.status()
        assert (status.state, status.ready) == (State.RUNNING, False)
        update = next(u for u in events.updates if u.kind == "ready" and u.ok is False)
        assert update.message == "STOPPING=1"


FIRST_RUN_ONLY = """
import os, signal, socket, sys
if not os.path.exists(sys.argv[1]):  # the first run says it is ready and how it is; the next, nothing
    open(sys.argv[1], "w").close()
    address = os.environ["NOTIFY_SOCKET"].replace("@", "\\0", 1)
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"STATUS=serving 300 req/s\\nREADY=1", address)
while True:
    signal.pause()
"""


async def test_a_new_run_shows_neither_the_last_run_s_check_nor_its_status_text(tmp_path: Path) -> None:
    program = tmp_path / "first_run_only.py"
    program.write_text(FIRST_RUN_ONLY)
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          svc:
            command: [python3, "{program}", "{tmp_path / "ran"}"]
            ready: {{notify: true}}
            restart: {{min_uptime: 0}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "svc"))
        svc = manager.instances["svc"]
        status = svc.status()
        assert (status.ready, status.last_check, status.status_text) == (True, "READY=1", "serving 300 req/s")
        async with anyio.create_task_group() as tg:
            tg.start_soon(svc.restart)
            await events.until(lambda: [e.to_state for e in events.of("svc")].count(State.STARTING) == 2)
            status = svc.status()
            assert (status.state, status.ready, status.last_check, status.status_text) == (
                State.STARTING, False, None, None
            )
            tg.cancel_scope.cancel()


async def test_a_missing_watchdog_ping_sends_the_watchdog_signal_and_restarts(tmp_path: Path) -> None:
    settings = "watchdog: 300ms\n    restart: {min_uptime: 0, backoff: {initial: 10ms}}"
    manifest = _notify_manifest(tmp_path, "READY=1|WATCHDOG=1", settings=settings)
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "svc"))
        assert _environ(manager.instances["svc"].pid or 0)["WATCHDOG_USEC"] == "300000"
        backoff = await events.wait_for(_to(State.BACKOFF, "svc"), timeout=10)
        assert backoff.reason == "watchdog: no WATCHDOG=1 within 0.3s"
        assert backoff.exit_code == 42  # the program's SIGABRT handler: ABRT was the signal sent
        await events.until(lambda: len([e for e in events.of("svc") if e.to_state is State.RUNNING]) == 2)
        running_events = [e for e in events.of("svc") if e.to_state is State.RUNNING]
        watchdog = next(u for u in events.updates if u.kind == "watchdog")
        assert watchdog.ok is False and running_events[1].at > watchdog.at


async def test_notify_messages_from_the_group_are_bounded_and_cleaned(tmp_path: Path) -> None:
    long_status = "x" * 5000  # one datagram over the 4 KiB systemd takes: ignored whole
    messages = [f"STATUS={long_status}", "STATUS=tab\tand\x01control", "READY=1"]
    manifest = _notify_manifest(tmp_path, *messages)
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "svc"))
        assert manager.instances["svc"].status().status_text == "tab and control"


# -- log lines, polled probes, start_timeout ---------------------------------------------------------


async def test_a_log_line_makes_it_ready(tmp_path: Path) -> None:
    manifest = manifest_from(
        r"""
        version: 1
        instances:
          tail:
            command: [sh, -c, 'echo booting; echo "listening on port 8080" >&2; exec sleep 60']
            ready: {log: 'listening on port \d+'}
            restart: {min_uptime: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "tail"))
        status = manager.instances["tail"].status()
        assert status.ready is True
        assert status.last_check == "log line matched: listening on port 8080"
        await manager.instances["tail"].stop()
        assert manager.instances["tail"].status().ready is False  # a program that is gone is not ready


async def test_a_probe_that_never_passes_backs_off_with_its_error(tmp_path: Path) -> None:
    port = free_port()
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          db:
            command: [sleep, "60"]
            ready: {{tcp: "127.0.0.1:{port}", interval: 50ms, start_timeout: 300ms}}
            restart: {{min_uptime: 0, max_restarts: 0}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        backoff = await events.wait_for(_to(State.BACKOFF, "db"))
        assert backoff.reason == f"not ready after 0.3s: connect 127.0.0.1:{port}: connection refused"
        failed = await events.wait_for(_to(State.FAILED, "db"))
        assert "not ready after 0.3s" in (failed.reason or "")
        # The program that never got ready was stopped, not left behind.
        assert backoff.pid is not None and not Path(f"/proc/{backoff.pid}").exists()
        assert manager.instances["db"].status().ready is False


async def test_a_failing_liveness_probe_restarts_after_the_threshold(tmp_path: Path) -> None:
    flag = tmp_path / "alive"
    flag.touch()
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          api:
            command: [sleep, "60"]
            alive: {{exec: [sh, -c, 'test -e "{flag}" || {{ echo gone >&2; exit 1; }}'], interval: 50ms,
                     failure_threshold: 3}}
            restart: {{min_uptime: 0, backoff: {{initial: 10ms}}}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "api"))
        await events.until(lambda: any(u.kind == "alive" and u.ok for u in events.updates))
        first_pid = manager.instances["api"].pid
        flag.unlink()
        backoff = await events.wait_for(_to(State.BACKOFF, "api"))
        assert backoff.reason == "liveness: sh: exit code 1: gone"
        assert backoff.exit_signal == signal.SIGTERM
        failing = [u.message for u in events.updates if u.kind == "alive" and u.ok is False]
        assert failing[0] == "sh: exit code 1: gone (1 of 3)"
        flag.touch()
        await events.until(lambda: len([e for e in events.of("api") if e.to_state is State.RUNNING]) == 2)
        assert manager.instances["api"].pid != first_pid


# -- one probe at a time, against real servers -----------------------------------------------------


async def _serve(answer: bytes, *, task_status: anyio.abc.TaskStatus[int]) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

        async def reply(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.receive()
                await stream.send(answer)

        await listener.serve(reply)


def _http(status: str, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (status.encode(), len(body))
    return head + body


async def _check(check: dict[str, object], tmp_path: Path) -> object:
    text = "version: 1\ninstances:\n  x:\n    command: [x]\n    ready: " + json.dumps(check)
    manifest = manifest_from(text + "\n", tmp_path)
    return manifest.instances["x"].ready


@pytest.mark.parametrize(
    ("answer", "settings", "outcome"),
    [
        (_http("200 OK", b"all good"), {}, "status 200"),
        (_http("302 Found", b""), {}, "status 302"),
        (_http("503 Busy", b""), {}, "status 503, expected 2xx or 3xx"),
        (_http("200 OK", b""), {"expect": [204]}, "status 200, expected 204"),
        (_http("200 OK", b"starting"), {"body": "all good"}, "status 200, but the body lacks 'all good'"),
        (_http("200 OK", b"...all good..."), {"body": "all good"}, "status 200"),
    ],
)
async def test_http_probe_outcomes(
    tmp_path: Path, answer: bytes, settings: dict[str, object], outcome: str
) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, answer)
        url = f"http://127.0.0.1:{port}/health"
        check = await _check({"http": url, **settings}, tmp_path)
        try:
            result = await probe_once(check, ExecContext(cwd=None, env={}))  # type: ignore[arg-type]
        except ProbeFailed as exc:
            result = str(exc)
        tg.cancel_scope.cancel()
    assert result.startswith(f"GET {url}: ") and result.endswith(outcome), result


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nall g\r\n3\r\nood\r\n0\r\n\r\n"
INFORMATIONAL = b"HTTP/1.1 100 Continue\r\n\r\n" + _http("204 No Content", b"")


@pytest.mark.parametrize(
    ("answer", "settings", "outcome"),
    [
        (CHUNKED, {"body": "all good"}, "status 200"),
        (INFORMATIONAL, {}, "status 204"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", {}, "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n", {}, "not an HTTP answer"),
        (b"", {}, "not an HTTP answer"),
    ],
    ids=["chunked", "1xx-then-204", "not-http", "huge-header", "closed-at-once"],
)
async def test_http_probe_reads_hostile_answers(
    tmp_path: Path, answer: bytes, settings: dict[str, object], outcome: str
) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, answer)
        url = f"http://localhost:{port}/"  # a name: the resolver path
        check = await _check({"http": url, **settings}, tmp_path)
        try:
            result = await probe_once(check, ExecContext(cwd=None, env={}))  # type: ignore[arg-type]
        except ProbeFailed as exc:
            result = str(exc)
        tg.cancel_scope.cancel()
    assert result.startswith(f"GET {url}: ") and outcome in result, result


@pytest.mark.parametrize(
    ("data", "eof", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", False, None),  # the body is still to come
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False, 200),
        (b"HTTP/1.1 200 OK\r\ncontent-length:2\r\n\r\n", True, 200),  # closed early: what came is it
        (b"HTTP/1.0 503 Busy\r\nServer: x\r\n\r\nwhatever", False, None),  # ends with the connection
        (b"HTTP/1.0 503 Busy\r\nServer: x\r\n\r\nwhatever", True, 503),
        (b"HTTP/1.1 204 No Content\r\n\r\n", False, 204),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", False, 201),
        (b"HTTP/1.1 100 Continue\r\n\r\n", False, None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n", False, None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False, 200),
        (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", True, 200),  # bare LFs, to the end
        (b"HTTP/1.1 30", False, None),
    ],
)
def test_the_status_of_an_answer_read_in_pieces(data: bytes, eof: bool, status: int | None) -> None:
    assert final_status(bytearray(data), eof=eof) == status


@pytest.mark.parametrize(
    ("data", "eof", "problem"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", False, "no HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nX: y", True, "closed before the end of the head"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000, False, "a head of over 65536 bytes"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", False, "no HTTP status line"),
        (b"", True, "no HTTP status line"),
    ],
)
def test_what_is_not_an_http_answer_says_why(data: bytes, eof: bool, problem: str) -> None:
    with pytest.raises(NotHttp, match=problem):
        final_status(bytearray(data), eof=eof)


async def test_an_http_server_that_never_answers_is_cut_at_the_timeout(tmp_path: Path) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        check = await _check({"http": f"http://127.0.0.1:{port}/", "timeout": "200ms"}, tmp_path)
        with anyio.fail_after(5), pytest.raises(ProbeFailed, match=r"http probe timed out after 0\.2s"):
            await probe_once(check, ExecContext(cwd=None, env={}))  # type: ignore[arg-type]


async def test_an_https_probe_goes_through_httpx_and_skips_verification(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the https server")
    context = _tls_context(tmp_path)
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve_tls, context)
        url = f"https://127.0.0.1:{port}/"
        check = await _check({"http": url, "body": "secure", "timeout": "10s"}, tmp_path)
        result = await probe_once(check, ExecContext(cwd=None, env={}))  # type: ignore[arg-type]
        tg.cancel_scope.cancel()
    assert result == f"GET https://127.0.0.1:{port}/: status 200"


WATCHED_HTTPX_PROBE = """
import importlib.abc, sys, threading
from pathlib import Path
import anyio
from supervisor.config import parse_manifest
from supervisor.probes import ExecContext, probe_once

seen = []

class WatchHttpx(importlib.abc.MetaPathFinder):  # where httpx is imported, and under what deadline
    def find_spec(self, name, path, target=None):
        if name == "httpx":
            on_the_loop = threading.current_thread() is threading.main_thread()
            seen.append([on_the_loop, anyio.current_effective_deadline() if on_the_loop else None])
        return None

sys.meta_path.insert(0, WatchHttpx())
manifest = Path(sys.argv[1])
check = parse_manifest(manifest.read_text(), manifest).instances["x"].ready
print(anyio.run(probe_once, check, ExecContext(cwd=None, env={}), backend=sys.argv[2]))
print(seen)
"""


async def test_loading_httpx_is_not_counted_in_the_first_https_probe_s_timeout(
    tmp_path: Path, anyio_backend: str
) -> None:
    """The first https probe imports httpx: a quarter of a second idle, over a second on a busy
    machine, which failed a healthy server's probe at the default 1 s timeout, and held the event
    loop (every instance's pipes) meanwhile. It is imported in a worker thread, before the probe's
    clock starts: no deadline of the probe's is over it, however long it takes."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the https server")
    context = _tls_context(tmp_path)
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve_tls, context)
        await _check({"http": f"https://127.0.0.1:{port}/", "timeout": "1s"}, tmp_path)  # writes the manifest
        with anyio.fail_after(30):
            done = await anyio.run_process(
                [sys.executable, "-c", WATCHED_HTTPX_PROBE, str(tmp_path / "supervisor.yaml"), anyio_backend],
                check=False,
            )
        tg.cancel_scope.cancel()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result, seen = done.stdout.decode().splitlines()
    assert result == f"GET https://127.0.0.1:{port}/: status 200"
    assert seen == "[[False, None]]", "httpx imported on the event loop, [on the loop, its deadline]: " + seen


def _tls_context(tmp_path: Path) -> ssl.SSLContext:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def _serve_tls(context: ssl.SSLContext, *, task_status: anyio.abc.TaskStatus[int]) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    tls = anyio.streams.tls.TLSListener(listener, context, standard_compatible=False)
    task_status.started(port)

    async def reply(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(_http("200 OK", b"a secure answer"))

    async with tls:
        await tls.serve(reply)


async def test_a_probe_that_hangs_is_cut_at_its_timeout(tmp_path: Path) -> None:
    check = await _check({"exec": ["sleep", "60"], "timeout": "200ms"}, tmp_path)
    with anyio.fail_after(5), pytest.raises(ProbeFailed, match=r"exec probe timed out after 0\.2s"):
        await probe_once(check, ExecContext(cwd=None, env={}))  # type: ignore[arg-type]
    # Its process group was killed and reaped: no sleep of ours is left.
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_our_sleep(p)]
    assert leftovers == []


async def test_what_a_probe_quotes_of_a_program_cannot_steer_a_terminal(tmp_path: Path) -> None:
    """An exec probe's last line of output becomes the reason that ``supervisor status`` prints:
    a colour, a window title and a bell reached the terminal as they were written."""
    hostile = r"x\033[31mRED\033]0;pwned\007 done"
    check = await _check({"exec": ["sh", "-c", f"printf '{hostile}'; exit 1"]}, tmp_path)
    with pytest.raises(ProbeFailed) as failed:
        await probe_once(check, ExecContext(cwd=None, env={}))  # type: ignore[arg-type]
    reason = str(failed.value)
    assert reason == "sh: exit code 1: x [31mRED ]0;pwned  done", reason
    assert all(c.isprintable() for c in reason)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:1/a b", "http://127.0.0.1:1/\x01", "https://xn--a.example/"],
)
async def test_a_url_that_makes_no_request_fails_the_probe_and_says_so(url: str) -> None:
    """The loader refuses these; one that got through anyway (an older record, a reload race)
    must fail its probe with the reason, not end the instance's supervision with a traceback
    (h11's LocalProtocolError, idna's InvalidCodepoint) or blame the server ("not an HTTP answer")."""
    from supervisor import probes

    with anyio.fail_after(10), pytest.raises(ProbeFailed, match=r"^GET .*: cannot be sent \("):
        await probes._http(url, None, None, 1.0)
    with anyio.fail_after(10), pytest.raises(ProbeFailed, match=r"^GET .*: cannot be sent \("):
        await probes._http(url, None, "a body", 1.0)


def _is_our_sleep(proc: Path) -> bool:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]) == os.getpid() and "(sleep)" in stat


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ({}, "a check takes exactly one probe kind"),
        ({"tcp": "127.0.0.1:1", "http": "http://x/"}, "found http and tcp"),
        ({"tcp": "127.0.0.1:99999"}, "is not HOST:PORT"),
        ({"tcp": "127.0.0.1:1", "expect": [200]}, "'expect' belongs to an http check"),
        ({"http": "ftp://example/"}, "is not an http:// or https:// URL"),
        ({"http": "http://[::1/"}, "is not a URL"),
        ({"exec": []}, "the command is empty"),
        ({"exec": "echo 'unclosed"}, "cannot split the command"),
        ({"log": "("}, "not a regular expression"),
        ({"log": "(" * 5000 + ")" * 5000}, "its groups are nested too deeply"),
        ({"log": "a{99999999999}"}, "repeat count too big"),
        ({"log": ""}, "the pattern is empty"),
        ({"notify": False}, "write notify: true"),
        ({"http": "http://x/", "expect": [99]}, "greater than or equal to 100"),
        ({"tcp": "127.0.0.1:1", "success_threshold": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_checks_are_refused_at_load(tmp_path: Path, check: dict[str, object], message: str) -> None:
    text = "version: 1\ninstances:\n  x:\n    command: [x]\n    ready: " + json.dumps(check)
    with pytest.raises(ManifestError) as caught:
        manifest_from(text + "\n", tmp_path)
    problem = caught.value.problems[0]
    assert problem.line == 5 and problem.path.startswith("instances.x.ready"), problem
    assert message in problem.message, problem.message


def test_a_log_check_needs_a_captured_stream(tmp_path: Path) -> None:
    text = "version: 1\ninstances:\n  x:\n    command: [x]\n    stdout: null\n    stderr: null\n"
    text += "    ready: {log: up}\n"
    with pytest.raises(ManifestError, match="neither stdout nor stderr is `log`"):
        manifest_from(text, tmp_path)


def test_a_watchdog_needs_notify(tmp_path: Path) -> None:
    text = "version: 1\ninstances:\n  x:\n    command: [x]\n    watchdog: 10s\n"
    with pytest.raises(ManifestError, match=r"watchdog needs ready: \{notify: true\}"):
        manifest_from(text, tmp_path)
