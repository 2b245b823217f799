"""The service graph with real processes: ordered start and stop, blocking, restart edges.

Every order is checked from the events' own timestamps: an instance's STARTING
must come after what it waits for reached the condition, and its STOPPING after
its dependents are STOPPED.
"""

from __future__ import annotations

import resource
from pathlib import Path

import anyio
import pytest

from supervisor.events import State, Transition

from .helpers import Recorder, manifest_from, running

pytestmark = pytest.mark.anyio


def _to(state: State, name: str):  # type: ignore[no-untyped-def]
    return lambda e: e.to_state is state and e.instance == name


def _first(events: Recorder, state: State, name: str) -> Transition:
    return next(e for e in events.events if e.to_state is state and e.instance == name)


async def test_a_three_level_graph_starts_in_order_and_branches_overlap(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          db: {command: [sleep, "60"], restart: {min_uptime: 300ms}}
          api: {command: [sleep, "60"], restart: {min_uptime: 300ms}, depends_on: [db]}
          worker: {command: [sleep, "60"], restart: {min_uptime: 300ms}, depends_on: {api: running}}
          cache: {command: [sleep, "60"], restart: {min_uptime: 300ms}}
          mailer: {command: [sleep, "60"], restart: {min_uptime: 300ms}, depends_on: {cache: started}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "worker"), timeout=15)
        await events.wait_for(_to(State.RUNNING, "mailer"), timeout=15)
        # Waiting first, with a reason that names the dependency and the condition.
        waiting = _first(events, State.WAITING, "worker")
        assert waiting.reason == "waiting for api (running): api is waiting"
        for dependent, dependency, reached in [
            ("api", "db", State.RUNNING),
            ("worker", "api", State.RUNNING),
            ("mailer", "cache", State.STARTING),
        ]:
            assert _first(events, State.STARTING, dependent).at >= _first(events, reached, dependency).at
        # Independent branches overlap: cache and mailer start while db is still starting.
        db_up = _first(events, State.RUNNING, "db").at
        assert _first(events, State.STARTING, "cache").at < db_up
        assert _first(events, State.STARTING, "mailer").at < db_up
        # The whole graph took about its longest path (3 x 300ms), not the sum of all five.
        start = min(e.at for e in events.events)
        assert _first(events, State.RUNNING, "worker").at - start < 3 * 0.3 + 1.0
        assert {s.name: s.state for s in manager.status()} == dict.fromkeys(
            ["db", "api", "worker", "cache", "mailer"], State.RUNNING
        )


async def test_a_dependent_waits_for_every_replica(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          web: {command: [sleep, "60"], replicas: 2, autostart: false, restart: {min_uptime: 0}}
          proxy: {command: [sleep, "60"], depends_on: [web]}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        proxy = manager.instances["proxy"]
        assert proxy.state is State.WAITING
        assert proxy.reason == "waiting for web-0 (ready): web-0 is stopped; start it"
        await manager.instances["web-0"].start()
        await events.until(lambda: proxy.reason == "waiting for web-1 (ready): web-1 is stopped; start it")
        assert proxy.state is State.WAITING
        # Each new reason of a waiting instance is an event (a reason that repeats is not).
        await events.until(
            lambda: [u.message for u in events.updates if u.instance == "proxy"][-1:] == [proxy.reason]
        )
        messages = [u.message for u in events.updates if u.instance == "proxy" and u.kind == "waiting"]
        assert len(messages) == len(set(messages))
        await manager.instances["web-1"].start()
        await events.wait_for(_to(State.STARTING, "proxy"))
        assert _first(events, State.STARTING, "proxy").at >= _first(events, State.RUNNING, "web-1").at


async def test_a_dependency_with_no_replicas_holds_nobody_up(tmp_path: Path) -> None:
    """``replicas: 0`` (a dependency switched off, say for a remote database), or one scaled to
    0: every one of its none meets the condition. The dependent waited forever, "not loaded
    yet"; scaled up again, the dependency is waited for as before by what starts next."""
    manifest = manifest_from(
        """
        version: 1
        instances:
          db: {command: [sleep, "60"], replicas: 0, restart: {min_uptime: 0}}
          job: {command: [sh, -c, "exit 0"], replicas: 0, restart: {policy: "no"}}
          api:
            command: [sleep, "60"]
            restart: {min_uptime: 0}
            depends_on: {db: {condition: ready}, job: {condition: completed}}
          web: {command: [sleep, "60"], replicas: 2, restart: {min_uptime: 0}}
          proxy: {command: [sleep, "60"], restart: {min_uptime: 0}, autostart: false, depends_on: [web]}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "api"))
        await manager.scale({"web": 0})
        await manager.instances["proxy"].start()
        await events.wait_for(_to(State.RUNNING, "proxy"))
        await manager.instances["proxy"].stop()
        await manager.scale({"db": 1})  # there again: a new start of api waits for it
        await manager.instances["db"].stop()
        await manager.instances["api"].restart()
        assert manager.instances["api"].state is State.WAITING
        assert manager.instances["api"].reason == "waiting for db (ready): db is stopped; start it"


async def test_an_http_ready_dependency_gates_its_dependent_until_the_port_answers(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          server:
            command: [sh, -c, 'sleep 0.4; exec python3 -m http.server {port} --bind 127.0.0.1']
            ready: {{http: "http://127.0.0.1:{port}/", interval: 50ms, start_timeout: 20s}}
            restart: {{min_uptime: 0}}
          client:
            # Connects once: it fails (and backs off) if it is started before the port answers.
            command: [python3, -c, "import socket; socket.create_connection(('127.0.0.1', {port})).close()"]
            restart: {{policy: "no", min_uptime: 0}}
            depends_on: [server]
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        done = await events.wait_for(_to(State.EXITED, "client"), timeout=20)
        assert done.exit_code == 0
        assert not [e for e in events.of("client") if e.to_state is State.BACKOFF]
        assert manager.instances["server"].status().ready is True
        ready = next(u for u in events.updates if u.instance == "server" and u.kind == "ready" and u.ok)
        assert ready.message == f"GET http://127.0.0.1:{port}/: status 200"
        assert _first(events, State.STARTING, "client").at >= ready.at


async def test_a_failed_dependency_blocks_without_spinning_and_its_recovery_unblocks(tmp_path: Path) -> None:
    flag = tmp_path / "migrated"
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          migrate:
            command: [test, -e, "{flag}"]
            restart: {{min_uptime: 1s, max_restarts: 0}}
          api:
            command: [sleep, "60"]
            restart: {{min_uptime: 0}}
            depends_on: {{migrate: completed}}
          clock:
            command: [sleep, "1"]
            restart: {{policy: "no", min_uptime: 0}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.FAILED, "migrate"))
        api = manager.instances["api"]
        await events.until(lambda: (api.reason or "").startswith("blocked: migrate failed"))
        assert api.state is State.WAITING
        # While blocked, nothing spins: over a second of waiting (a real child's lifetime,
        # not a sleep), this process spends almost no CPU and api makes no transition.
        before = resource.getrusage(resource.RUSAGE_SELF)
        seen = len(events.events)
        await events.wait_for(_to(State.EXITED, "clock"), timeout=10)
        after = resource.getrusage(resource.RUSAGE_SELF)
        assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 0.2
        assert {e.instance for e in events.events[seen:]} == {"clock"}
        # A person fixes the cause and starts the job again: api follows by itself.
        flag.touch()
        await manager.instances["migrate"].start()
        await events.wait_for(_to(State.RUNNING, "api"))
        assert _first(events, State.STARTING, "api").at >= _first(events, State.EXITED, "migrate").at


async def test_a_job_that_ends_badly_blocks_a_completed_condition(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          job: {command: [sh, -c, "sleep 0.2; exit 4"], restart: {policy: "no", min_uptime: 100ms}}
          after: {command: [sleep, "60"], depends_on: {job: completed}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.EXITED, "job"))
        after = manager.instances["after"]
        await events.until(lambda: after.reason == "blocked: job ended with exit code 4")
        assert after.state is State.WAITING


async def test_shutdown_stops_dependents_first_and_branches_concurrently(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          db: {command: [sleep, "60"], restart: {min_uptime: 0}}
          api: {command: [sleep, "60"], restart: {min_uptime: 0}, depends_on: {db: running}}
          worker:
            command: [sh, -c, "trap 'sleep 0.3; exit 0' TERM; sleep 60 & wait"]
            restart: {min_uptime: 0}
            depends_on: {api: running}
          other: {command: [sleep, "60"], restart: {min_uptime: 0}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        for name in ("db", "api", "worker", "other"):
            await events.wait_for(_to(State.RUNNING, name))
        await manager.shutdown()
        names = ("db", "api", "worker", "other")
        await events.until(lambda: all(any(e.to_state is State.STOPPED for e in events.of(n)) for n in names))
        stopped = {name: _first(events, State.STOPPED, name).at for name in names}
        stopping = {name: _first(events, State.STOPPING, name).at for name in names}
        assert stopping["api"] >= stopped["worker"]
        assert stopping["db"] >= stopped["api"]
        # `other` depends on nothing: it began stopping with the first, not after the chain.
        assert stopping["other"] < stopped["worker"]


async def test_a_restart_edge_restarts_the_dependent_after_the_dependency_is_back(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          db: {command: [sleep, "60"], restart: {min_uptime: 300ms}}
          api:
            command: [sleep, "60"]
            restart: {min_uptime: 0}
            depends_on: {db: {condition: running, restart: true}}
          plain: {command: [sleep, "60"], restart: {min_uptime: 0}, depends_on: {db: running}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "api"))
        await events.wait_for(_to(State.RUNNING, "plain"))
        api_pid, plain_pid = manager.instances["api"].pid, manager.instances["plain"].pid
        seen = len(events.events)
        await manager.instances["db"].restart()
        await events.until(
            lambda: any(e.instance == "api" and e.to_state is State.RUNNING for e in events.events[seen:])
        )
        later = events.events[seen:]
        db_up = next(e for e in later if e.instance == "db" and e.to_state is State.RUNNING)
        api_start = next(e for e in later if e.instance == "api" and e.to_state is State.STARTING)
        assert api_start.at >= db_up.at
        stopping = next(e for e in later if e.instance == "api" and e.to_state is State.STOPPING)
        assert stopping.reason == "restarting because db restarted"
        assert manager.instances["api"].pid != api_pid
        # Without the edge, a dependent is left alone.
        assert manager.instances["plain"].pid == plain_pid


async def test_a_manual_stop_of_a_dependency_stops_only_it(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          db: {command: [sleep, "60"], restart: {min_uptime: 0}}
          api: {command: [sleep, "60"], restart: {min_uptime: 0}, depends_on: [db]}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "api"))
        pid = manager.instances["api"].pid
        await manager.instances["db"].stop()
        assert manager.instances["api"].state is State.RUNNING and manager.instances["api"].pid == pid
        # Restarted by hand now, api waits for db: it is stopped, and the reason says so.
        seen = len(events.events)
        await manager.instances["api"].restart()
        assert manager.instances["api"].state is State.WAITING
        assert manager.instances["api"].reason == "waiting for db (ready): db is stopped; start it"
        await manager.instances["db"].start()
        await events.until(
            lambda: any(e.instance == "api" and e.to_state is State.RUNNING for e in events.events[seen:])
        )


async def test_a_reload_that_removes_a_chain_stops_it_dependents_first(tmp_path: Path) -> None:
    text = """
        version: 1
        instances:
          db: {command: [sleep, "60"], restart: {min_uptime: 0}}
          api: {command: [sleep, "60"], restart: {min_uptime: 0}, depends_on: {db: running}}
          keep: {command: [sleep, "60"], restart: {min_uptime: 0}}
        """
    async with running(manifest_from(text, tmp_path)) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "api"))
        smaller = manifest_from(
            """
            version: 1
            instances:
              keep: {command: [sleep, "60"], restart: {min_uptime: 0}}
            """,
            tmp_path,
        )
        report = await manager.apply(smaller)
        assert sorted(report.removed) == ["api", "db"] and report.unchanged == ["keep"]
        await events.wait_for(_to(State.STOPPED, "db"))
        assert _first(events, State.STOPPING, "db").at >= _first(events, State.STOPPED, "api").at


async def test_a_long_chain_starts_and_stops(tmp_path: Path) -> None:
    links = 60
    lines = ["version: 1", "instances:", "  n0: {command: [sleep, '60'], restart: {min_uptime: 0}}"]
    lines += [
        f"  n{i}: {{command: [sleep, '60'], restart: {{min_uptime: 0}}, depends_on: {{n{i - 1}: started}}}}"
        for i in range(1, links)
    ]
    async with running(manifest_from("\n".join(lines) + "\n", tmp_path)) as (manager, events):
        await events.wait_for(_to(State.RUNNING, f"n{links - 1}"), timeout=30)
        with anyio.fail_after(30):
            await manager.shutdown()
        await events.wait_for(_to(State.STOPPED, "n0"))
        order = [e.instance for e in events.events if e.to_state is State.STOPPING]
        assert order == [f"n{i}" for i in reversed(range(links))]
