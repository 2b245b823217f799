"""The control API against a real ``supervisor run``, over its real socket.

httpx (over the unix socket) plays an independent client here, so that the
server is not only ever checked by our own client; the CLI's tests use ours.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
from openapi_spec_validator import validate
from pydantic import TypeAdapter

from supervisor.api.client import MAX_UNIX_PATH, Client, connect_unix
from supervisor.api.models import Status
from supervisor.api.server import serve_control
from supervisor.config import Manifest
from supervisor.manager import Manager, ReloadReport

from .helpers import manifest_from, running
from .service_fixture import (
    SUPERVISOR,
    ServiceProcess,
    pid_gone,
    processes_with,
    with_tcp_listener,
    write_manifest,
)

Start = Callable[..., ServiceProcess]

BASIC = """
version: 1
instances:
  sleeper:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
  hi:
    command: ["sh", "-c", "echo hi; echo oops >&2; exec sleep 300"]
    replicas: 2
    restart: {min_uptime: 0}
  idle:
    command: ["sleep", "300"]
    autostart: false
"""


@contextmanager
def http(service: ServiceProcess) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=os.fspath(service.socket))
    with httpx.Client(transport=transport, base_url="http://supervisor", timeout=30) as client:
        yield client


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "details"}, body
    for fragment in fragments:
        assert fragment in json.dumps(body), body
    return body


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_status_actions_events_and_logs_under_each_backend(service: Start, backend: str) -> None:
    svc = service(BASIC, args=("--backend", backend))
    svc.wait_for(["sleeper", "hi"], "running")
    with http(svc) as api:
        health = api.get("/v1/health").json()
        assert health["ok"] and health["pid"] == svc.pid and health["instances"] == 4
        assert health["states"] == {"running": 3, "stopped": 1}

        listing = api.get("/v1/instances").json()
        statuses = TypeAdapter(list[Status]).validate_python(listing)
        assert [s.name for s in statuses] == ["sleeper", "hi-0", "hi-1", "idle"]
        hi0 = next(s for s in statuses if s.name == "hi-0")
        assert hi0.group == "hi" and hi0.state == "running" and hi0.pid and not pid_gone(hi0.pid)
        assert hi0.uptime_s is not None and hi0.started_at is not None
        assert (hi0.stdin, hi0.stdout, hi0.stderr) == ("null", "log", "log")
        assert Path(hi0.log_files["stdout"]).name == "hi-0.out.log"
        idle = next(s for s in statuses if s.name == "idle")
        assert idle.state == "stopped" and idle.pid is None and idle.uptime_s is None

        group = api.get("/v1/instances", params={"names": "hi"}).json()
        assert [s["name"] for s in group] == ["hi-0", "hi-1"]
        picked = api.get("/v1/instances", params=[("names", "h*-1"), ("names", "idle")]).json()
        assert [s["name"] for s in picked] == ["hi-1", "idle"]
        hi1 = next(s.pid for s in statuses if s.name == "hi-1")
        assert api.get("/v1/instances/hi-1").json()["pid"] == hi1

        # Events: subscribed once the headers are in; a restart shows every step.
        with api.stream("GET", "/v1/events") as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            restarted = api.post("/v1/instances/restart", json={"names": ["sleeper"]})
            assert restarted.status_code == 200, restarted.text
            [result] = restarted.json()["results"]
            assert result["ok"] and result["state"] == "running" and result["pid"] != statuses[0].pid
            steps = []
            for line in events.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event["instance"] == "sleeper":
                        steps.append((event["from_state"], event["to_state"]))
                if steps and steps[-1][1] == "running":
                    break
        assert steps == [
            ("running", "stopping"),
            ("stopping", "stopped"),
            ("stopped", "starting"),
            ("starting", "running"),
        ]
        assert pid_gone(statuses[0].pid or 0)

        svc.wait_output("hi-0", b"hi")
        svc.wait_output("hi-0", b"oops", stream="stderr")
        assert api.get("/v1/instances/hi-0/logs").text == "hi\n"
        assert api.get("/v1/instances/hi-0/logs", params={"stream": "stderr"}).text == "oops\n"

        shutdown = api.post("/v1/shutdown")
        assert shutdown.status_code == 202 and shutdown.json()["ok"]
    assert svc.proc.wait(timeout=30) == 0
    assert not svc.socket.exists()
    assert "supervising 4 instances" in svc.log()


def test_errors_are_json_with_the_right_status(service: Start) -> None:
    svc = service(BASIC)
    svc.wait_for(["sleeper"], "running")
    with http(svc) as api:
        assert_error(api.get("/v1/instances/nope"), 404, "no instance matches 'nope'", "sleeper")
        assert_error(api.get("/v1/instances", params={"names": "web-*"}), 404, "web-*")
        assert_error(api.post("/v1/instances/stop", json={"names": ["nope"]}), 404)
        assert_error(api.get("/v1/nothing-here"), 404)

        assert_error(api.post("/v1/instances/stop", json={"names": ["idle"], "timout": 1}), 400, "timout")
        assert_error(api.post("/v1/instances/stop", json={"names": ["idle"], "timeout": "soon"}), 400, "soon")
        assert_error(api.post("/v1/instances/stop", json={}), 400, "name some instances")
        assert_error(api.post("/v1/instances/stop", json={"names": ["idle"], "all": True}), 400, "not both")
        assert_error(api.post("/v1/instances/signal", json={"names": ["hi"], "signal": "NOPE"}), 400, "NOPE")
        assert_error(api.post("/v1/instances/wait", json={"names": ["hi"], "state": "asleep"}), 400, "state")
        assert_error(api.get("/v1/instances/hi-0/logs", params={"lines": -1}), 400, "lines")
        assert_error(api.get("/v1/instances/hi-0/logs", params={"stream": "stdin"}), 400, "stream")
        garbage = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        assert_error(api.post("/v1/instances/stop", **garbage), 400)  # type: ignore[arg-type]

        # Invalid for the state: 409, per instance, and nothing changes.
        stop = api.post("/v1/instances/stop", json={"names": ["idle", "sleeper"]})
        assert stop.status_code == 409, stop.text
        by_name = {r["name"]: r for r in stop.json()["results"]}
        assert by_name["idle"] == {"name": "idle", "ok": False, "state": "stopped", "pid": None,
                                   "error": "not running (stopped)"}
        assert by_name["sleeper"]["ok"] and by_name["sleeper"]["state"] == "stopped"
        start = api.post("/v1/instances/start", json={"names": ["hi-0"]})
        assert start.status_code == 409 and "already running" in start.json()["results"][0]["error"]
        signal = api.post("/v1/instances/signal", json={"names": ["idle"], "signal": 1})
        assert signal.status_code == 409 and "not running" in signal.json()["results"][0]["error"]


def test_start_reports_how_each_instance_ended_up(service: Start) -> None:
    svc = service(
        """
        version: 1
        instances:
          job:
            command: ["sh", "-c", "exit 0"]
            autostart: false
          broken:
            command: ["sh", "-c", "exit 3"]
            autostart: false
            restart: {max_restarts: 0, min_uptime: 5s}
          ghost:
            command: ["/nonexistent/program"]
            autostart: false
            restart: {max_restarts: 1, backoff: {initial: 10ms}}
          slow:
            command: ["sleep", "300"]
            autostart: false
            restart: {min_uptime: 60s}
        """
    )
    with http(svc) as api:
        answer = api.post("/v1/instances/start", json={"all": True, "timeout": "300ms"})
        assert answer.status_code == 409
        results = {r["name"]: r for r in answer.json()["results"]}
        assert results["job"]["ok"] and results["job"]["state"] == "exited"  # a one-shot job: success
        assert not results["broken"]["ok"] and results["broken"]["state"] == "failed"
        assert "exit code 3" in results["broken"]["error"]
        assert not results["ghost"]["ok"] and results["ghost"]["state"] == "failed"
        assert "No such file or directory" in results["ghost"]["error"]
        assert not results["slow"]["ok"] and results["slow"]["error"] == "timed out after 0.3s (starting)"

        # --no-wait answers once the request is under way.
        stop = api.post("/v1/instances/stop", json={"names": ["slow"], "wait": False})
        assert stop.status_code == 200 and stop.json()["results"][0]["state"] in ("stopping", "stopped")
        svc.wait_for(["slow"], "stopped")
        # Refused at once, with no transition to come: the answer has the reason, not a timeout.
        again = api.post("/v1/instances/stop", json={"names": ["slow"], "wait": False, "timeout": 60})
        assert again.status_code == 409
        assert again.json()["results"][0]["error"] == "not running (stopped)"

        request = {"names": ["slow"], "state": ["running"], "timeout": 0.2}
        waited = api.post("/v1/instances/wait", json=request)
        assert waited.status_code == 409
        assert waited.json()["results"][0]["error"] == "not running after 0.2s"
        both = api.post("/v1/instances/wait", json={"all": True, "state": ["stopped", "exited", "failed"]})
        assert both.status_code == 200 and both.json()["ok"]


def test_a_start_waiting_for_an_instance_a_reload_removes_answers_at_once(service: Start) -> None:
    """``start slow`` waits for slow to run; a reload that takes slow away left the request waiting
    out its timeout, then said "timed out (stopped)". It answers when the instance goes, and why."""
    db = 'version: 1\ninstances:\n  db: {command: [sleep, "300"], autostart: false}\n'
    svc = service(db + '  slow: {command: [sleep, "300"], autostart: false, depends_on: [db]}\n')
    answers: list[httpx.Response] = []
    asked = {"names": ["slow"], "timeout": 120}
    with http(svc) as api:
        asking = threading.Thread(target=lambda: answers.append(api.post("/v1/instances/start", json=asked)))
        asking.start()
        svc.wait_until(lambda: svc.status("slow")["slow"]["state"] == "waiting", 20, "slow waits for db")
        write_manifest(svc.manifest.parent, db)
        assert svc.client().reload()["removed"] == ["slow"]
        asking.join(timeout=20)
        assert not asking.is_alive(), "the start still waits for an instance that is gone"
    (answer,) = answers
    assert answer.status_code == 409
    (slow,) = answer.json()["results"]
    assert slow["error"] == "removed while the request waited (a reload or a scale took it away)", slow


def test_openapi_document_is_valid_and_complete(service: Start) -> None:
    svc = service(BASIC)
    with http(svc) as api:
        document = api.get("/openapi.json").json()
    validate(document)
    paths = document["paths"]
    for path, method in [
        ("/v1/health", "get"),
        ("/v1/instances", "get"),
        ("/v1/instances/{name}", "get"),
        ("/v1/instances/start", "post"),
        ("/v1/instances/stop", "post"),
        ("/v1/instances/restart", "post"),
        ("/v1/instances/signal", "post"),
        ("/v1/instances/wait", "post"),
        ("/v1/instances/{name}/logs", "get"),
        ("/v1/events", "get"),
        ("/v1/reload", "post"),
        ("/v1/shutdown", "post"),
        ("/v1/logs/reopen", "post"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], path
    # Every body is limited: a 413 where there is one. "names or all" is in the schema.
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert ("413" in operation["responses"]) == ("requestBody" in operation), (method, path)
    selection = document["components"]["schemas"]["ActionRequest"]
    assert len(selection["oneOf"]) == 2 and selection["oneOf"][1]["properties"]["all"] == {"const": True}
    assert "/" not in paths  # the dashboard's page is not part of the API
    # Invalid input is documented as what it is: 400 with an ErrorBody, not FastAPI's 422.
    stop = paths["/v1/instances/stop"]["post"]["responses"]
    assert "400" in stop and "422" not in stop
    assert "422" in paths["/v1/reload"]["post"]["responses"]
    assert "text/event-stream" in paths["/v1/events"]["get"]["responses"]["200"]["content"]


def test_socket_is_private(service: Start) -> None:
    svc = service(BASIC)
    mode = svc.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(svc.socket.parent.stat().st_mode) == 0o700


ROUTES = [("GET", "/v1/instances"), ("POST", "/v1/shutdown"), ("GET", "/openapi.json")]


def test_tcp_listener_wants_the_bearer_token(service: Start, tmp_path: Path) -> None:
    token = "s3cret-token-for-tests"
    manifest, port = with_tcp_listener(
        tmp_path,
        token,
        """
      sleeper: {command: ["sleep", "300"]}
        """,
    )
    svc = service(manifest)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=10) as tcp:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {token}"},
            {"Authorization": "Bearer"},
            {"Authorization": f"Bearer {token}x"},
        ):
            for method, path in ROUTES:
                refused = tcp.request(method, path, headers=headers)
                assert refused.status_code == 401, (headers, path)
                assert refused.json() == {"error": "unauthorized", "details": []}
        allowed = tcp.get("/v1/instances", headers={"Authorization": f"Bearer {token}"})
        assert allowed.status_code == 200 and allowed.json()[0]["name"] == "sleeper"
    # Our client speaks TCP too, with the token; the unix socket needs none.
    assert Client(base, token=token).health()["ok"]
    assert Client(svc.socket).health()["ok"]
    env = {**os.environ, "SUPERVISOR_TOKEN": token}
    cli = subprocess.run(
        [*SUPERVISOR, "status", "--json", "-s", base], capture_output=True, text=True, env=env, check=False
    )
    assert cli.returncode == 0 and json.loads(cli.stdout)[0]["name"] == "sleeper"
    env["SUPERVISOR_TOKEN"] = "wrong"
    cli = subprocess.run(
        [*SUPERVISOR, "status", "-s", base], capture_output=True, text=True, env=env, check=False
    )
    assert cli.returncode == 1 and cli.stderr == "supervisor: unauthorized\n"


def test_long_socket_path_goes_through_proc_self_fd(service: Start, tmp_path: Path) -> None:
    deep = tmp_path
    while len(os.fsencode(deep / "control.sock")) <= MAX_UNIX_PATH + 20:
        deep = deep / "a-rather-long-folder-name"
    deep.mkdir(parents=True)
    sock = deep / "control.sock"
    svc = service(
        f"""
        version: 1
        supervisor:
          control: {{socket: "{sock}"}}
        instances:
          sleeper: {{command: ["sleep", "300"]}}
        """,
        socket=sock,
    )
    assert len(os.fsencode(svc.socket)) > MAX_UNIX_PATH
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert Client(sock).status()[0]["name"] == "sleeper"
    shown = svc.cli("status", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)[0]["name"] == "sleeper"
    assert svc.stop() == 0
    assert not sock.exists()


def test_twenty_concurrent_restarts_leave_exactly_one_process(service: Start) -> None:
    marker = "271.828"  # sleep's argument: no other process has it
    svc = service(
        f"""
        version: 1
        instances:
          target:
            command: ["sleep", "{marker}"]
            restart: {{min_uptime: 0}}
        """
    )
    svc.wait_for(["target"], "running")
    first = svc.status("target")["target"]["pid"]
    pids: set[int] = {first}
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(20)

    def restart() -> None:
        try:
            gate.wait(timeout=10)
            answers.append(Client(svc.socket, timeout=60).restart(["target"]))
        except BaseException as exc:
            errors.append(exc)

    with svc.client().events() as events:
        threads = [threading.Thread(target=restart) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert not errors, errors
        assert len(answers) == 20 and all(a["ok"] for a in answers), answers
        # Each run ends with a `stopped` event carrying its pid; the 21st run is left running.
        stops = 0
        for event in events:
            if event.get("to_state") == "stopped":
                stops += 1
                pids.add(event["pid"])
            if event.get("to_state") == "running" and stops == 20:
                pids.add(event["pid"])
                break
    final = svc.status("target")["target"]
    assert final["state"] == "running"
    assert len(pids) == 21 and final["pid"] in pids
    # (running can come before the last child's exec of sleep: then its command line lacks the marker)
    svc.wait_until(lambda: processes_with(marker) == [final["pid"]], 20, "the last sleep's exec alone")
    for pid in pids - {final["pid"]}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_logs_of_a_stream_the_service_does_not_capture(service: Start, tmp_path: Path) -> None:
    svc = service(
        f"""
        version: 1
        instances:
          filed:
            command: ["sh", "-c", "echo to-the-file; exec sleep 300"]
            stdout: {tmp_path / "filed.txt"}
            stderr: stdout
        """
    )
    with http(svc) as api:
        body = assert_error(api.get("/v1/instances/filed/logs"), 404, "not captured")
        assert str(tmp_path / "filed.txt") in body["error"]
        assert_error(api.get("/v1/instances/filed/logs", params={"stream": "stderr"}), 404, "not captured")
        assert api.get("/v1/instances/filed").json()["log_files"] == {}


def test_reopen_logs_starts_new_files(service: Start) -> None:
    svc = service(BASIC)
    svc.wait_output("hi-0", b"hi")
    log = Path(svc.status("hi-0")["hi-0"]["log_files"]["stdout"])
    moved = log.with_name("moved.log")
    log.rename(moved)
    files = sum(len(s["log_files"]) for s in svc.status().values())
    with http(svc) as api:
        answer = api.post("/v1/logs/reopen")
        assert answer.status_code == 200 and answer.json() == {"reopened": 8, "failed": []} and files == 8
    assert log.exists() and moved.read_text() == "hi\n"
    # A file that cannot be opened again (a folder where it was) is not counted, and says why; the
    # CLI prints why and exits 1 (it said "reopened 8" and 0).
    err = Path(svc.status("hi-0")["hi-0"]["log_files"]["stderr"])
    err.rename(err.with_name("moved.err.log"))
    err.mkdir()
    cli = svc.cli("logs", "--reopen")
    assert cli.returncode == 1, cli
    assert cli.stdout == "reopened 7 log files\n"
    assert str(err) in cli.stderr and cli.stderr.startswith("supervisor: "), cli.stderr


class _InProcessHooks:
    """What a Service gives the control server, for a manager run inside the test itself."""

    def __init__(self, manifest: Manifest, manager: Manager) -> None:
        self.manifest = manifest
        self.manager = manager

    async def reload(self) -> ReloadReport:
        return await self.manager.apply(self.manifest)

    async def shutdown(self) -> None:
        await self.manager.shutdown()

    def reopen_logs(self) -> int:
        return 0


@pytest.mark.anyio
async def test_serve_control_in_process_keeps_a_quiet_event_stream_alive(tmp_path: Path) -> None:
    """serve_control inside the caller's task group, under each backend: listens, streams, cleans up."""
    manifest = manifest_from(
        """
        version: 1
        instances:
          one: {command: ["sleep", "300"], autostart: false}
        """,
        tmp_path,
    )

    def read_events() -> bytes:
        return _read_event_stream(manifest.control_socket, lambda seen: seen.count(b": keep-alive") >= 2)

    async with running(manifest) as (manager, _events), anyio.create_task_group() as tg:
        hooks = _InProcessHooks(manifest, manager)
        await tg.start(functools.partial(serve_control, manager, hooks, keepalive=0.05))
        assert stat.S_IMODE(manifest.control_socket.stat().st_mode) == 0o600
        seen = await anyio.to_thread.run_sync(read_events)
        tg.cancel_scope.cancel()
    assert seen.startswith(b"HTTP/1.1 200")
    assert b"text/event-stream" in seen and b": subscribed\n\n" in seen
    assert not manifest.control_socket.exists()


def _read_event_stream(path: Path, until: Callable[[bytes], bool]) -> bytes:
    """The raw answer to GET /v1/events, read until ``until(all read so far)``."""
    sock = connect_unix(path, timeout=10)
    with sock:
        sock.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        seen = b""
        while not until(seen):
            chunk = sock.recv(65536)  # bounded by the socket's timeout
            assert chunk, seen
            seen += chunk
        return seen


def _chunks(raw: bytes) -> list[bytes]:
    """The chunks of a chunked HTTP body (``raw`` from the end of its headers): the writes it took."""
    chunks = []
    while raw:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(raw[:size])
        raw = raw[size + 2 :]
    return chunks


@pytest.mark.anyio
async def test_a_burst_of_events_goes_out_in_few_writes_and_loses_none(tmp_path: Path) -> None:
    """What is published in one turn of the loop (the waiting reasons of a level's dependents) is
    sent in one write, not one write each; every event is there, in order, the odd one included."""
    from supervisor.events import Update

    manifest = manifest_from(
        """
        version: 1
        instances:
          one: {command: ["sleep", "300"], autostart: false}
        """,
        tmp_path,
    )
    subscribed = threading.Event()
    burst = 300

    def read_events() -> bytes:
        def until(seen: bytes) -> bool:
            if b": subscribed" in seen:
                subscribed.set()
            return f"id: {burst}\n".encode() in seen and seen.endswith(b"\n\n\r\n")

        return _read_event_stream(manifest.control_socket, until)

    async with running(manifest) as (manager, _events), anyio.create_task_group() as tg:
        hooks = _InProcessHooks(manifest, manager)
        await tg.start(functools.partial(serve_control, manager, hooks))
        reader = threading.Thread(target=lambda: found.append(read_events()), daemon=True)
        found: list[bytes] = []
        reader.start()
        assert await anyio.to_thread.run_sync(subscribed.wait, 10)
        first = manager.events.seq + 1
        for n in range(burst):  # one turn of the loop: the stream's task sees them all at once
            message = "not UTF-8: \udcff" if n == 7 else f"waiting for db-{n}"
            manager.events.publish(Update("one", "one", "waiting", None, message))
        await anyio.to_thread.run_sync(reader.join, 10)
        tg.cancel_scope.cancel()
    assert found, "the reader got no answer"
    body = found[0].partition(b"\r\n\r\n")[2]
    chunks = [chunk for chunk in _chunks(body) if not chunk.startswith(b":")]
    events = [block for chunk in chunks for block in chunk.split(b"\n\n") if block]
    ids = [int(block.split(b"\n")[0].removeprefix(b"id: ")) for block in events]
    assert ids == list(range(first, first + burst))  # none lost, none twice, in order
    assert len(chunks) <= 4, len(chunks)  # 256 a write at most: two writes, not 300
    data = [json.loads(block.rpartition(b"data: ")[2]) for block in events]
    assert data[7]["message"] == "not UTF-8: \udcff"  # orjson refuses it; the standard encoder escapes it
    assert data[8]["message"] == "waiting for db-8" and data[8]["kind"] == "waiting"


def test_the_status_body_is_the_wire_statuses_and_survives_a_name_that_is_not_utf8() -> None:
    """The list's body is encoded by orjson; a lone surrogate (a non-UTF-8 file name, decoded
    with surrogateescape) makes orjson refuse, and the standard encoder escapes it instead."""
    from supervisor.api.answers import wire_status, wire_statuses
    from supervisor.events import State
    from supervisor.instance_status import InstanceStatus
    from supervisor.resources import GroupFigures

    def snapshot(name: str, pid: int | None, reason: str | None) -> InstanceStatus:
        return InstanceStatus(
            name, "g", State.RUNNING if pid else State.EXITED, pid, 1.5 if pid else None,
            2.25 if pid else None, 3, None if pid else 1, None if pid else 9, reason, None, None,
            None, 0, None, "null", "log", "log", {"stdout": "/tmp/x.out.log"},
        )

    figures = {41: GroupFigures(1.5, 2.0, 4096, 3, 1, 1, False)}
    plain = [snapshot("a", 41, None), snapshot("b", None, "exited with code 1")]
    body = wire_statuses(plain, figures)
    assert json.loads(body) == [wire_status(plain[0], figures[41]), wire_status(plain[1])]
    assert TypeAdapter(list[Status]).validate_json(body)[0].rss_bytes == 4096
    assert json.loads(body)[1]["exit_signal"] == "SIGKILL"

    odd = [snapshot("c", None, "cannot open /tmp/\udcff.log")]
    decoded = json.loads(wire_statuses(odd))
    assert decoded[0]["reason"] == "cannot open /tmp/\udcff.log"


@pytest.mark.anyio
async def test_an_action_on_hundreds_of_instances_lets_the_loop_go_round_as_it_queues_them() -> None:
    """``run_all`` queues a task per instance (anyio's, about 0.1 ms each with what it does):
    a thousand queued in one turn held the loop 100 ms before the first ran. A task that only
    yields gets turns while 300 are queued, and every one of them runs."""
    from supervisor.api import actions

    ran: list[int] = []
    ticks: list[int] = []  # how many had run at each of the ticker's turns
    done = anyio.Event()

    async def one(instance: Any) -> None:
        ran.append(instance)

    async def ticker() -> None:
        while not done.is_set():
            ticks.append(len(ran))
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        await actions.run_all(one, list(range(300)))  # type: ignore[arg-type]
        done.set()
    assert sorted(ran) == list(range(300))
    assert len({count for count in ticks if 0 < count < 300}) >= 3, ticks  # turns while they were queued
