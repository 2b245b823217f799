"""What ``status`` and the event stream say is what is true at that moment, through a real service.

Found by an audit: an instance that had waited for its dependencies showed its old `waiting
for db (ready): …` reason all through its start; a liveness check that failed restarted the
program while ``status`` said `running` for as long as the program took to stop; a thousand
dependents of a database that became ready said they waited for it while they waited for
their turn to spawn. Real processes, the real socket; the tests wait on the event stream or
on the service (a server-side wait, the captured output), and hold a stop open with a program
that stops only once the test has looked (its TERM trap waits for a file).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .service_fixture import ServiceProcess

Start = Callable[..., ServiceProcess]

#: A program that says "armed" once its TERM trap is set, and stops on TERM only once ``go`` exists.
SLOW_STOP = (
    '[sh, -c, \'trap "until [ -e {go} ]; do sleep 0.05; done; exit 0" TERM; echo armed; '
    "while :; do sleep 0.05; done']"
)

LIVENESS = f"""
version: 1
instances:
  api:
    command: {SLOW_STOP}
    alive: {{{{exec: [test, "!", -e, "{{fail}}"], interval: 100ms, failure_threshold: 1}}}}
    restart: {{{{min_uptime: 0}}}}
    stop: {{{{timeout: 60s}}}}
    {{ready}}
"""
LIVENESS_REASON = "liveness: test: exit code 1"
#: A waiting instance's reason once its dependencies are met, until its spawn (instance.py).
IN_LINE_TO_SPAWN = "dependencies met; in line to spawn"


@pytest.fixture
def go(service: Start, tmp_path: Path) -> Iterator[Path]:
    """The file that lets a ``SLOW_STOP`` program stop: made at the latest before the service
    is stopped (this fixture comes after ``service``, so it ends first), also when a test failed."""
    path = tmp_path / "go"
    yield path
    path.touch()


def _next(events: Iterator[dict[str, Any]], name: str, **fields: object) -> dict[str, Any]:
    """The next item of the stream about ``name`` with these field values (the client's timeout
    ends a wait for one that does not come)."""
    for event in events:
        assert "dropped" not in event, event
        if event.get("instance") == name and all(event.get(k) == v for k, v in fields.items()):
            return event
    raise AssertionError(f"the event stream ended before {name} {fields}")


def _status(svc: ServiceProcess, name: str) -> tuple[object, object, object]:
    found = svc.status(name)[name]
    return found["state"], found["reason"], found["pid"]


def _until_state(svc: ServiceProcess, state: str, since: str) -> None:
    """Until ``status`` says ``state`` for api; bounded, and what it said instead is in the failure."""
    seen: list[tuple[object, object, object]] = []

    def says() -> bool:
        seen.append(_status(svc, "api"))
        return seen[-1][0] == state

    try:
        svc.wait_until(says, 10, f"status saying {state} once {since}")
    except AssertionError as exc:
        raise AssertionError(f"status said {seen[-1]} (state, reason, pid)\n{exc}") from None


def _liveness_stop(
    service: Start, go: Path, tmp_path: Path, *args: str
) -> tuple[ServiceProcess, dict[str, Any]]:
    """A service whose ``api`` a failing liveness check is stopping (the program waits for ``go``)."""
    svc = service(LIVENESS.format(go=go, fail=tmp_path / "fail", ready=""), args=args)
    svc.wait_output("api", b"armed")
    before = svc.status("api")["api"]
    assert before["state"] == "running", before
    with svc.client(timeout=10).events() as events:
        (tmp_path / "fail").touch()
        _next(events, "api", kind="alive", ok=False)
        _until_stopping(svc, events, "the liveness check failed", ("running", LIVENESS_REASON, before["pid"]))
    return svc, before


def _until_stopping(
    svc: ServiceProcess, events: Iterator[dict[str, Any]], since: str, came: tuple[object, object, object]
) -> None:
    """Until status says api is ``stopping``, and its event came as ``came`` (from_state, reason, pid)."""
    _until_state(svc, "stopping", since)
    stopping = _next(events, "api", to_state="stopping")
    assert (stopping["from_state"], stopping["reason"], stopping["pid"]) == came, stopping


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_liveness_restart_is_stopping_while_the_program_stops(
    service: Start, go: Path, tmp_path: Path, backend: str
) -> None:
    """``stopping`` with the check's reason while the program takes its time, then the restart
    (it said `running`, no reason, for the whole stop: up to stop.timeout)."""
    svc, before = _liveness_stop(service, go, tmp_path, "--backend", backend)
    assert _status(svc, "api") == ("stopping", LIVENESS_REASON, before["pid"])
    table = svc.cli("status", "api").stdout.splitlines()[1]
    assert table.split()[1] == "stopping" and table.endswith(LIVENESS_REASON), table
    with svc.client(timeout=10).events() as events:
        (tmp_path / "fail").unlink()
        go.touch()
        backoff = _next(events, "api", to_state="backoff")
        assert (backoff["from_state"], backoff["reason"], backoff["pid"], backoff["exit_code"]) == (
            "stopping",
            LIVENESS_REASON,
            before["pid"],
            0,
        ), backoff
        starting = _next(events, "api", to_state="starting")
        assert starting["from_state"] == "backoff" and starting["pid"] != before["pid"], starting
        _next(events, "api", to_state="running")
    after = svc.status("api")["api"]
    assert (after["state"], after["reason"], after["pid"]) == ("running", None, starting["pid"])
    assert after["restarts"] == before["restarts"] + 1


def test_a_stop_by_hand_takes_over_a_liveness_stop_and_ends_stopped(
    service: Start, go: Path, tmp_path: Path
) -> None:
    """The request's reason from then on, ``stopped`` at the end, no restart; ``--no-wait``
    answers at once (the stop makes no transition of its own until ``stopped``)."""
    svc, before = _liveness_stop(service, go, tmp_path)
    asked = svc.client(timeout=10).stop(["api"], wait=False)
    assert asked["ok"] and asked["results"][0]["state"] == "stopping", asked
    svc.wait_until(
        lambda: _status(svc, "api") == ("stopping", "stopped on request", before["pid"]),
        10,
        "the stop's own reason",
    )
    with svc.client(timeout=10).events() as events:
        go.touch()
        stopped = _next(events, "api", to_state="stopped")
    assert (stopped["from_state"], stopped["reason"], stopped["exit_code"]) == (
        "stopping",
        "stopped on request",
        0,
    ), stopped
    assert _status(svc, "api") == ("stopped", "stopped on request", None)


def test_a_reexec_during_a_liveness_stop_finishes_it_and_restarts(
    service: Start, go: Path, tmp_path: Path
) -> None:
    """The new service goes on with the check's stop (``stopping``, same pid, same reason), then
    backs off and starts the program again, as the old one would have."""
    svc, before = _liveness_stop(service, go, tmp_path)
    done = svc.cli("reexec")
    assert done.returncode == 0, done.stderr + svc.log()
    assert svc.client().health()["handoffs"] == 1
    assert _status(svc, "api") == ("stopping", LIVENESS_REASON, before["pid"])
    with svc.client(timeout=10).events() as events:
        (tmp_path / "fail").unlink()
        go.touch()
        backoff = _next(events, "api", to_state="backoff")
        assert (backoff["from_state"], backoff["reason"], backoff["pid"]) == (
            "stopping",
            LIVENESS_REASON,
            before["pid"],
        ), backoff
        starting = _next(events, "api", to_state="starting")
        assert starting["pid"] != before["pid"]
    svc.wait_for(["api"], "running")


def test_a_readiness_timeout_is_stopping_then_a_failed_start(
    service: Start, go: Path, tmp_path: Path
) -> None:
    """Not ready by ``start_timeout``: ``stopping`` (it said `starting`) with the reason, and the
    run still counts as a failed start (max_restarts 0: ``failed`` after it)."""
    never = tmp_path / "never"
    svc = service(
        f"""
        version: 1
        instances:
          api:
            command: {SLOW_STOP.format(go=go)}
            ready: {{exec: [test, -e, "{never}"], interval: 100ms, start_timeout: 1s}}
            restart: {{min_uptime: 0, max_restarts: 0}}
            stop: {{timeout: 60s}}
            autostart: false
        """
    )
    reason = "not ready after 1s: test: exit code 1"
    client = svc.client(timeout=10)
    with client.events() as events:
        assert client.start(["api"], wait=False)["ok"]
        starting = _next(events, "api", to_state="starting")
        _until_stopping(svc, events, "start_timeout passed", ("starting", reason, starting["pid"]))
        assert _status(svc, "api") == ("stopping", reason, starting["pid"])
        assert svc.status("api")["api"]["ready"] is False
        go.touch()
        backoff = _next(events, "api", to_state="backoff")
        assert (backoff["from_state"], backoff["reason"]) == ("stopping", reason), backoff
        failed = _next(events, "api", to_state="failed")
        assert failed["reason"] == f"gave up after 1 failed start in a row; last: {reason}", failed


WAITING = """
version: 1
instances:
  db:
    command: [sleep, "300"]
    ready: {{exec: [test, -e, "{flag}"], interval: 50ms}}
    restart: {{min_uptime: 0}}
  api:
    command: [sleep, "300"]
    restart: {{min_uptime: 60s}}
    depends_on: [db]
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_start_after_waiting_drops_the_waiting_reason(service: Start, tmp_path: Path, backend: str) -> None:
    """``starting`` says no reason, as its event does: not the dependency it waited for (nor,
    after a stop and a start by hand, `stopped on request`)."""
    flag = tmp_path / "db-ready"
    svc = service(WAITING.format(flag=flag), args=("--backend", backend))
    svc.wait_for(["api"], "waiting")
    assert _status(svc, "api") == ("waiting", "waiting for db (ready): db is starting", None)
    with svc.client(timeout=10).events() as events:
        flag.touch()
        starting = _next(events, "api", to_state="starting")
    assert starting["from_state"] == "waiting" and starting["reason"] is None, starting
    # min_uptime 60s: it is `starting` for a minute, whatever the test takes.
    assert _status(svc, "api") == ("starting", None, starting["pid"])
    row = svc.cli("status", "api").stdout.splitlines()[1].split()
    assert row[1] == "starting" and len(row) == 8, row  # nothing in the INFO column
    client = svc.client()
    assert client.stop(["api"])["ok"]
    assert _status(svc, "api") == ("stopped", "stopped on request", None)
    assert client.start(["api"], wait=False)["ok"]
    svc.wait_for(["api"], "starting")
    state, reason, _ = _status(svc, "api")
    assert (state, reason) == ("starting", None)


def test_dependents_in_line_to_spawn_do_not_say_they_wait_for_a_ready_dependency(
    service: Start, tmp_path: Path
) -> None:
    """Once db is ready, its dependents spawn a slice of a turn at a time (pacer.Turns): those
    still in line are `waiting`, and their reason says so (it said `waiting for db (ready): db
    is starting` for as long as the storm took: seconds for a thousand)."""
    flag = tmp_path / "db-ready"
    replicas = 60
    svc = service(
        f"""
        version: 1
        instances:
          db:
            command: [sleep, "300"]
            ready: {{exec: [test, -e, "{flag}"], interval: 50ms}}
            restart: {{min_uptime: 0}}
          w:
            command: [sleep, "300"]
            replicas: {replicas}
            restart: {{min_uptime: 0}}
            depends_on: [db]
        """
    )
    svc.wait_for(["w"], "waiting")
    names = {f"w-{i}" for i in range(replicas)}
    last_reason: dict[str, str | None] = {}
    started: set[str] = set()
    client = svc.client(timeout=10)
    with client.events() as events:
        flag.touch()
        _next(events, "db", to_state="running")
        # Every snapshot from the second on (the first may be served in the turn db became
        # ready, before its dependents woke): a dependent still waiting says what it waits for.
        client.status(["w"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snapshot = client.status(["w"])
            waiting = {s["name"]: s["reason"] for s in snapshot if s["state"] == "waiting"}
            assert set(waiting.values()) <= {IN_LINE_TO_SPAWN}, waiting
            if not waiting:
                break
        else:
            raise AssertionError(f"still waiting after 30s: {waiting}")
        for event in events:
            assert "dropped" not in event, event
            name = event.get("instance")
            if name not in names:
                continue
            if event.get("kind") == "waiting":
                last_reason[name] = event["message"]
            elif event.get("to_state") == "starting":
                assert event["from_state"] == "waiting", event
                assert last_reason.get(name) == IN_LINE_TO_SPAWN, (name, last_reason.get(name))
                started.add(name)
                if started == names:
                    break


def test_an_instance_a_check_is_stopping_is_not_ready(service: Start, go: Path, tmp_path: Path) -> None:
    """A program on its way out serves nobody: ``ready`` is false from ``stopping`` on. A failed
    liveness check's stop said `ready: true` for the whole stop, up to stop.timeout, to whoever
    routes traffic by it (a stop by hand ends the run's checks at once, and said false)."""
    fail = tmp_path / "fail"
    svc = service(LIVENESS.format(go=go, fail=fail, ready='ready: {exec: ["true"], interval: 100ms}'))
    svc.wait_output("api", b"armed")
    svc.wait_until(lambda: svc.status("api")["api"]["ready"] is True, 10, "api ready")
    fail.touch()
    _until_state(svc, "stopping", "the liveness check failed")
    found = svc.status("api")["api"]
    assert (found["state"], found["reason"], found["ready"]) == ("stopping", LIVENESS_REASON, False), found
    fail.unlink()
    go.touch()
    svc.wait_until(lambda: svc.status("api")["api"]["ready"] is True, 20, "ready again after the restart")
