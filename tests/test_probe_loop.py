"""The shared probe loop (probe_loop.py) against real sockets and servers, under both backends.

Each outcome the loop reports is set against what probes.probe_once (one task per
probe, the path it replaces) says of the same server: the messages are part of
the contract (status, events, restart reasons).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

from supervisor.config import AliveCheck, ReadyCheck
from supervisor.probe_loop import on_the_loop, shared, until_failed, until_ready
from supervisor.probes import ExecContext, ProbeFailed, probe_once

from .helpers import manifest_from
from .service_fixture import free_port

pytestmark = pytest.mark.anyio

CONTEXT = ExecContext(cwd=None, env={})


def _check(tmp_path: Path, kind: str, check: dict[str, object]) -> ReadyCheck | AliveCheck:
    text = f"version: 1\ninstances:\n  x:\n    command: [x]\n    {kind}: " + json.dumps(check) + "\n"
    config = manifest_from(text, tmp_path).instances["x"]
    found = config.ready if kind == "ready" else config.alive
    assert found is not None
    return found


async def _once(check: ReadyCheck | AliveCheck) -> tuple[bool, str]:
    """One probe through the shared loop: its outcome, as the owner's callback hears it."""
    outcomes: list[tuple[bool, str]] = []

    def outcome(ok: bool, message: str) -> bool:
        outcomes.append((ok, message))
        return True

    with anyio.fail_after(10):
        await shared().watch(check, outcome)
    return outcomes[0]


async def _old(check: ReadyCheck | AliveCheck) -> tuple[bool, str]:
    """The same probe the way probes.py does it alone."""
    try:
        return True, await probe_once(check, CONTEXT)
    except ProbeFailed as exc:
        return False, str(exc)


def _http(status: str, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (status.encode(), len(body))
    return head + body


async def _serve(
    answer: Callable[[anyio.abc.SocketStream], object], host: str, *, task_status: anyio.abc.TaskStatus[int]
) -> None:
    async with await anyio.create_tcp_listener(local_host=host) as listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(answer)  # type: ignore[arg-type]


def _answering(data: bytes) -> Callable[[anyio.abc.SocketStream], object]:
    async def reply(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                await stream.receive()  # read first: closing with the request unread would reset
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return  # a tcp probe: connected, and gone without a word
            if data:
                await stream.send(data)

    return reply


async def _ten_megabytes(stream: anyio.abc.SocketStream) -> None:
    """A head that announces 10 MB, then the body until the prober hangs up."""
    async with stream:
        await stream.receive()
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\n")
        chunk = b"x" * 65536
        try:
            for _ in range(160):
                await stream.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


@pytest.mark.parametrize(
    ("answer", "settings", "passed", "ends"),
    [
        (_answering(_http("200 OK", b"ok")), {}, True, "status 200"),
        (_answering(_http("503 Busy", b"")), {}, False, "status 503, expected 2xx or 3xx"),
        (_answering(_http("200 OK", b"")), {"expect": [204, 500]}, False, "status 200, expected 204, 500"),
        (_answering(b""), {}, False, "not an HTTP answer (no HTTP status line)"),
        (_answering(b"SSH-2.0-OpenSSH_9.2\r\n"), {}, False, "not an HTTP answer (no HTTP status line)"),
        (_ten_megabytes, {}, True, "status 200"),
    ],
    ids=["200", "503", "expect", "closed-at-once", "not-http", "ten-megabytes"],
)
async def test_http_outcomes_match_the_probe_alone(
    tmp_path: Path,
    answer: Callable[[anyio.abc.SocketStream], object],
    settings: dict[str, object],
    passed: bool,
    ends: str,
) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, answer, "127.0.0.1")
        url = f"http://127.0.0.1:{port}/health?x=1"
        check = _check(tmp_path, "ready", {"http": url, **settings})
        assert on_the_loop(check)
        ok, message = await _once(check)
        assert (ok, message) == await _old(check)
        tg.cancel_scope.cancel()
    assert ok is passed and message == f"GET {url}: {ends}", message
    assert shared().watching == 0


async def test_refused_and_accepted_connections(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    for check in (
        _check(tmp_path, "ready", {"tcp": f"127.0.0.1:{port}"}),
        _check(tmp_path, "ready", {"http": f"http://127.0.0.1:{port}/"}),
    ):
        outcome = await _once(check)
        assert outcome == await _old(check)
        probed = f"GET http://127.0.0.1:{port}/" if check.kind == "http" else f"connect 127.0.0.1:{port}"
        assert outcome == (False, f"{probed}: connection refused"), outcome
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, _answering(b""), "127.0.0.1")
        check = _check(tmp_path, "ready", {"tcp": f"127.0.0.1:{port}"})
        assert await _once(check) == (True, f"connect 127.0.0.1:{port}: accepted")
        tg.cancel_scope.cancel()


async def test_ipv6(tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, _answering(_http("204 No Content", b"")), "::1")
        url = f"http://[::1]:{port}/"
        assert await _once(_check(tmp_path, "ready", {"http": url})) == (True, f"GET {url}: status 204")
        tcp = _check(tmp_path, "ready", {"tcp": f"[::1]:{port}"})
        assert await _once(tcp) == (True, f"connect ::1:{port}: accepted")
        tg.cancel_scope.cancel()


async def test_host_names_are_resolved_off_the_loop(tmp_path: Path) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, _answering(_http("200 OK", b"ok")), "127.0.0.1")
        url = f"http://localhost:{port}/"
        assert await _once(_check(tmp_path, "ready", {"http": url})) == (True, f"GET {url}: status 200")
        tg.cancel_scope.cancel()
    # A name that does not resolve (the .invalid domain never does): the resolver's own error, as the
    # probe alone says it; meanwhile a probe of an address goes on (the loop did not wait for the name).
    missing = _check(tmp_path, "ready", {"tcp": "no-such-host.invalid:80", "timeout": "10s"})
    outcome = await _once(missing)
    assert outcome[0] is False and outcome[1].startswith("connect no-such-host.invalid:80: "), outcome
    assert outcome == await _old(missing)


async def test_a_server_that_never_answers_times_out_without_holding_up_the_others(tmp_path: Path) -> None:
    # Listening, never accepting: the kernel completes the connect, and nobody ever answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent_port = silent.getsockname()[1]
        async with anyio.create_task_group() as tg:
            port = await tg.start(_serve, _answering(_http("200 OK", b"ok")), "127.0.0.1")
            passes: list[float] = []

            def healthy(ok: bool, message: str) -> bool:
                assert ok, message
                passes.append(anyio.current_time())
                return False

            good = _check(tmp_path, "alive", {"http": f"http://127.0.0.1:{port}/", "interval": "20ms"})
            tg.start_soon(shared().watch, good, healthy)
            silent_url = f"http://127.0.0.1:{silent_port}/"
            stuck = _check(tmp_path, "alive", {"http": silent_url, "timeout": "300ms"})
            began = anyio.current_time()
            wakeups = shared().wakeups
            ok, message = await _once(stuck)
            took = anyio.current_time() - began
            assert (ok, message) == (False, "http probe timed out after 0.3s")
            assert 0.29 <= took < 5
            # The healthy check was probed all along, every 20 ms or so, not only after the timeout.
            during = [at for at in passes if at < began + took]
            assert len(during) >= 3, passes
            # The probe in flight to the silent server does not make the loop poll: it wakes for
            # the healthy check's rounds (a timer, its answers), not every few milliseconds.
            assert shared().wakeups - wakeups < 100
            tg.cancel_scope.cancel()
    assert shared().watching == 0


async def test_thresholds_and_messages_of_the_owners(tmp_path: Path) -> None:
    port = free_port()
    settings = {"tcp": f"127.0.0.1:{port}", "interval": "10ms", "failure_threshold": 3}
    alive = _check(tmp_path, "alive", settings)
    reports: list[tuple[bool, str]] = []
    with anyio.fail_after(10):
        reason = await until_failed(alive, CONTEXT, lambda ok, message: reports.append((ok, message)))  # type: ignore[arg-type]
    failure = f"connect 127.0.0.1:{port}: connection refused"
    assert reason == failure
    assert reports == [(False, f"{failure} ({n} of 3)") for n in (1, 2, 3)]
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, _answering(_http("200 OK", b"ok")), "127.0.0.1")
        url = f"http://127.0.0.1:{port}/"
        ready = _check(tmp_path, "ready", {"http": url, "interval": "10ms", "success_threshold": 3})
        reports.clear()
        with anyio.fail_after(10):
            await until_ready(ready, CONTEXT, lambda ok, message: reports.append((ok, message)))  # type: ignore[arg-type]
        assert reports == [(True, f"GET {url}: status 200")] * 3
        tg.cancel_scope.cancel()


async def test_the_driver_leaves_and_another_owner_drives_on(tmp_path: Path) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, _answering(b""), "127.0.0.1")
        check = _check(tmp_path, "alive", {"tcp": f"127.0.0.1:{port}", "interval": "10ms"})
        loop = shared()
        first = anyio.Event()
        second: list[str] = []
        second_heard = anyio.Event()

        def count_first(ok: bool, message: str) -> bool:
            first.set()
            return False

        def count_second(ok: bool, message: str) -> bool:
            second.append(message)
            second_heard.set()
            return len(second) >= 5

        driver = anyio.CancelScope()
        with anyio.fail_after(10):
            tg.start_soon(_run_in, driver, loop.watch, check, count_first)
            await first.wait()  # the first owner drives now
            async with anyio.create_task_group() as owners:
                owners.start_soon(loop.watch, check, count_second)
                await second_heard.wait()  # probed by the first owner's task
                driver.cancel()  # its instance stopped: the second owner takes the loop over
        assert len(second) == 5 and loop.watching == 0
        tg.cancel_scope.cancel()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # no socket, epoll or eventfd left open


async def _run_in(scope: anyio.CancelScope, *call: object) -> None:
    with scope:
        await call[0](*call[1:])  # type: ignore[operator]


async def test_an_owner_whose_callback_raises_gets_it_back_and_the_others_go_on(tmp_path: Path) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, _answering(b""), "127.0.0.1")
        check = _check(tmp_path, "alive", {"tcp": f"127.0.0.1:{port}", "interval": "10ms"})
        loop = shared()
        others: list[bool] = []

        def broken(ok: bool, message: str) -> bool:
            raise ValueError("the owner's own bug")

        def fine(ok: bool, message: str) -> bool:
            others.append(ok)
            return len(others) >= 3

        async def broken_owner() -> None:
            with pytest.raises(ValueError, match="the owner's own bug"):
                await loop.watch(check, broken)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as owners:
                owners.start_soon(broken_owner)
                owners.start_soon(loop.watch, check, fine)
        assert others == [True, True, True]
        tg.cancel_scope.cancel()


async def test_checks_due_together_share_wake_ups(tmp_path: Path) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, _answering(_http("200 OK", b"ok")), "127.0.0.1")
        check = _check(tmp_path, "alive", {"http": f"http://127.0.0.1:{port}/", "interval": "20ms"})
        loop = shared()
        results: dict[int, int] = {}

        def owner(number: int) -> Callable[[bool, str], bool]:
            def outcome(ok: bool, message: str) -> bool:
                assert ok, message
                results[number] = results.get(number, 0) + 1
                return results[number] >= 5

            return outcome

        with anyio.fail_after(20):
            async with anyio.create_task_group() as owners:
                for number in range(40):
                    owners.start_soon(loop.watch, check, owner(number))
        assert results == {number: 5 for number in range(40)}
        # 200 probes, each of which would be a timer, a connect and an answer to wake up for on
        # its own: the rounds share their wake-ups (a timer, and one read of the answers).
        assert loop.wakeups < 150, loop.wakeups  # alone, each probe would be two or three
        tg.cancel_scope.cancel()


async def test_schedules_started_apart_merge(tmp_path: Path) -> None:
    """A check started a moment after another is probed in the same wake-ups from its second round."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, _answering(b""), "127.0.0.1")
        check = _check(tmp_path, "alive", {"tcp": f"127.0.0.1:{port}", "interval": "500ms"})
        loop = shared()
        seen: dict[str, list[int]] = {"a": [], "b": []}
        a_began = anyio.Event()

        def owner(name: str) -> Callable[[bool, str], bool]:
            def outcome(ok: bool, message: str) -> bool:
                assert ok, message
                seen[name].append(loop.wakeups)  # the wake-up that decided this probe
                a_began.set()
                return len(seen[name]) >= 3

            return outcome

        with anyio.fail_after(20):
            async with anyio.create_task_group() as owners:
                owners.start_soon(loop.watch, check, owner("a"))
                await a_began.wait()
                owners.start_soon(loop.watch, check, owner("b"))
        assert seen["a"][0] != seen["b"][0]  # the first round: apart
        assert seen["a"][1:] == seen["b"][1:], seen  # then: the same wake-ups
        tg.cancel_scope.cancel()


def test_what_moves_to_the_loop(tmp_path: Path) -> None:
    assert on_the_loop(_check(tmp_path, "ready", {"tcp": "127.0.0.1:1"}))
    assert on_the_loop(_check(tmp_path, "ready", {"http": "http://127.0.0.1/", "expect": [200]}))
    assert not on_the_loop(_check(tmp_path, "ready", {"http": "http://127.0.0.1/", "body": "ok"}))
    assert not on_the_loop(_check(tmp_path, "ready", {"http": "https://127.0.0.1/"}))
    assert not on_the_loop(_check(tmp_path, "ready", {"exec": ["true"]}))
