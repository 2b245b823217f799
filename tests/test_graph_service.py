"""The service graph through a real ``supervisor run``: status, wait, graph, stop --all, events."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .service_fixture import SUPERVISOR, ServiceProcess, health_times, write_manifest

Start = Callable[..., ServiceProcess]

MANIFEST = r"""
version: 1
instances:
  db:
    command: [sh, -c, 'echo "database system is ready"; exec sleep 300']
    ready: {log: 'system is ready'}
    restart: {min_uptime: 0}
  migrate:
    command: [sh, -c, 'echo migrated']
    restart: {policy: "no", min_uptime: 0}
  api:
    command: [sleep, "300"]
    restart: {min_uptime: 0}
    depends_on:
      db: {condition: ready}
      migrate: {condition: completed}
  worker:
    command: [sleep, "300"]
    replicas: 2
    restart: {min_uptime: 0}
    depends_on: [api]
  seeder:
    command: [sleep, "300"]
    autostart: false
  report:
    command: [sleep, "300"]
    depends_on: {seeder: started}
"""


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\nstderr: {result.stderr}"
    return result


def test_status_wait_and_the_waiting_reason(service: Start) -> None:
    svc = service(MANIFEST)
    ok(svc.cli("wait", "worker", "--state", "ready", "--timeout", "30"))
    statuses = json.loads(ok(svc.cli("status", "--json")).stdout)
    by_name: dict[str, dict[str, Any]] = {s["name"]: s for s in statuses}
    assert by_name["db"]["ready"] is True
    assert by_name["db"]["last_check"] == "log line matched: database system is ready"
    assert by_name["api"]["ready"] is None and by_name["api"]["state"] == "running"
    assert by_name["migrate"]["state"] == "exited" and by_name["migrate"]["exit_code"] == 0
    assert by_name["report"]["state"] == "waiting"
    assert by_name["report"]["reason"] == "waiting for seeder (started): seeder is stopped; start it"
    table = {line.split()[0]: line for line in ok(svc.cli("status")).stdout.splitlines()[1:]}
    assert table["db"].split()[1:3] == ["running", "yes"]
    assert table["report"].split()[1] == "waiting"
    assert table["report"].endswith("waiting for seeder (started): seeder is stopped; start it")
    # A wait for readiness that cannot happen says so, with the state.
    late = svc.cli("wait", "report", "--state", "ready", "--timeout", "0.3")
    assert late.returncode == 1 and "not ready after 0.3s" in late.stderr
    ok(svc.cli("start", "seeder"))
    ok(svc.cli("wait", "report", "--state", "running", "--timeout", "30"))


def test_stop_all_stops_dependents_first_and_events_carry_updates(service: Start) -> None:
    svc = service(MANIFEST)
    svc.wait_for(["worker"], "running", timeout=30)
    client = svc.client(timeout=10)  # an event that never comes fails the read, not the whole run
    with client.events() as events:
        ok(svc.cli("restart", "db"))
        update = next(e for e in events if e.get("kind") == "ready" and e["instance"] == "db")
        assert update["ok"] is True and update["message"].startswith("log line matched")
    with client.events() as events:
        ok(svc.cli("stop", "--all"))
        stopped: list[str] = []
        order: list[tuple[str, str]] = []
        for event in events:
            if "to_state" in event and event["to_state"] in ("stopping", "stopped"):
                order.append((event["instance"], event["to_state"]))
                if event["to_state"] == "stopped":
                    stopped.append(event["instance"])
            if {"db", "api", "worker-0", "worker-1"} <= set(stopped):
                break
    position = {item: index for index, item in enumerate(order)}
    assert position[("api", "stopping")] > position[("worker-0", "stopped")]
    assert position[("api", "stopping")] > position[("worker-1", "stopped")]
    assert position[("db", "stopping")] > position[("api", "stopped")]


def test_graph_prints_start_order_and_dot(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    text = subprocess.run(
        [*SUPERVISOR, "graph", "-f", str(manifest)], capture_output=True, text=True, check=True
    ).stdout
    lines = [line.split() for line in text.splitlines()]
    assert [line[:2] for line in lines] == [
        ["0", "db"],
        ["0", "migrate"],
        ["0", "seeder"],
        ["1", "api"],
        ["1", "report"],
        ["2", "worker"],
    ]
    api = next(line for line in text.splitlines() if line.split()[1] == "api")
    assert api.endswith("<- db (ready), migrate (completed)")
    assert "worker ×2" in text and "[ready: log]" in text
    dot = subprocess.run(
        [*SUPERVISOR, "graph", "--dot", "-f", str(manifest)], capture_output=True, text=True, check=True
    ).stdout
    assert dot.startswith("digraph supervisor {") and dot.rstrip().endswith("}")
    assert '"api" -> "migrate" [label="completed"];' in dot
    assert '"worker" -> "api" [label="ready"];' in dot
    text = "version: 1\ninstances: {a: {command: x, depends_on: [a]}}\n"
    cyclic = write_manifest(tmp_path, text, "bad.yaml")
    bad = subprocess.run([*SUPERVISOR, "graph", "-f", str(cyclic)], capture_output=True, text=True)
    assert bad.returncode == 1 and "a cannot depend on itself" in bad.stderr


SCALED = """
version: 1
instances:
  web: {command: [sleep, "300"], replicas: 2, restart: {min_uptime: 0}}
"""


def test_scale_until_the_next_reload(service: Start) -> None:
    svc = service(SCALED)
    svc.wait_for(["web"], "running")
    pids = {name: s["pid"] for name, s in svc.status().items()}
    out = ok(svc.cli("scale", "web=4")).stdout.splitlines()
    assert out[:2] == ["added: web-2, web-3", "removed: none"]
    svc.wait_for(["web"], "running")
    status = svc.status()
    assert sorted(status) == ["web-0", "web-1", "web-2", "web-3"]
    assert {name: status[name]["pid"] for name in pids} == pids  # the ones that stay are not touched
    # Hostile counts are a 400 and change nothing; an unknown entry is a 404.
    client = svc.client()
    for bad in ({"web": -1}, {"web": 10**9}, {"web": 2.5}, {"web": True}, {"web": "3"}, {}):
        answer = client.request("POST", "/v1/scale", {"scale": bad}, accept=[400])
        assert answer["error"] == "invalid request", (bad, answer)
    unknown = svc.cli("scale", "nope=2")
    assert unknown.returncode == 1 and "no instance matches 'nope'" in unknown.stderr
    assert svc.cli("scale", "web=many").returncode == 2
    assert sorted(svc.status()) == ["web-0", "web-1", "web-2", "web-3"]
    # A reload sets the manifest's count back, and says so.
    out = ok(svc.cli("reload")).stdout.splitlines()
    assert "removed: web-2, web-3" in out and "rescaled: web: back to the manifest's 2 replicas" in out
    assert sorted(svc.status()) == ["web-0", "web-1"]


def test_the_service_log_has_each_transition_and_a_blocked_reason_not_every_waiting_reason(
    service: Start,
) -> None:
    """A waiting instance's reason changes at each transition of what it waits for: status and the
    event stream have each; the service's log has the first (on the transition line) and a
    ``blocked:`` one, so that a graph coming up does not write ten lines for each instance."""
    svc = service(
        r"""
        version: 1
        instances:
          web: {command: [sleep, "300"], replicas: 2, autostart: false, restart: {min_uptime: 0}}
          proxy: {command: [sleep, "300"], depends_on: [web], restart: {min_uptime: 0}}
          job: {command: [sh, -c, "exit 3"], restart: {policy: "no", min_uptime: 0}}
          after: {command: [sleep, "300"], depends_on: {job: {condition: completed}}}
        """
    )
    svc.wait_log("(blocked: job ended with exit code 3)")
    svc.wait_log("proxy: stopped -> waiting (waiting for web-0 (ready): web-0 is stopped; start it)")
    ok(svc.cli("start", "web-0"))
    second = "waiting for web-1 (ready): web-1 is stopped; start it"
    svc.wait_until(lambda: svc.status("proxy")["proxy"]["reason"] == second, 20, "proxy's new reason")
    ok(svc.cli("start", "web-1"))
    svc.wait_log("proxy: waiting -> starting")  # the log is written in the order of the events
    log = svc.log()
    assert "web-1 is stopped" not in log  # the new reason was an event and a status, not a line
    assert log.count("blocked: job ended") == 1


def test_a_log_pattern_that_backtracks_without_end_is_stopped_and_the_service_answers(service: Start) -> None:
    """``(a|aa)+b`` on a line of 60 a's: Python's ``re`` would search for hours, holding the event
    loop (no status, no SIGTERM). The search is stopped after LOG_SEARCH_TIMEOUT, the start fails
    with a reason that says so, the rest runs, and the service answers and stops as it should."""
    svc = service(
        """
version: 1
instances:
  slow:
    command: [sh, -c, 'echo aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; exec sleep 300']
    ready: {log: '(a|aa)+b'}
    restart: {min_uptime: 0, max_restarts: 0}
  other:
    command: [sleep, "300"]
"""
    )
    client = svc.client(timeout=5)  # a service held by the search would not answer in time
    svc.wait_until(lambda: client.status(["slow"])[0]["state"] == "failed", 20, "slow failed")
    by_name = {s["name"]: s for s in client.status([])}
    reason = (
        "not ready: the log pattern '(a|aa)+b' took over 25 ms to search a line of 60 characters and was"
        " stopped: it backtracks without end on such lines (a repetition of alternatives that overlap,"
        " like (a|aa)+); rewrite it"
    )
    slow = by_name["slow"]
    assert slow["reason"] == f"gave up after 1 failed start in a row; last: {reason}", slow
    assert slow["ready"] is False
    svc.wait_for(["other"], "running")


def test_a_log_pattern_just_under_the_limit_lets_the_service_answer_between_lines(service: Start) -> None:
    """``(a|aa)+b`` takes about a millisecond on a line of fifteen a's, within the line's limit;
    four thousand such lines, in one write, held the loop for five seconds (no status, no
    SIGTERM; twenty thousand, 25 s). The search now lets the loop go round every few
    milliseconds: the service answers, stops on SIGTERM, and the probe goes on searching."""
    program = 'import os; os.write(1, b"aaaaaaaaaaaaaaa\\n" * 4000); os.execvp("sleep", ["sleep", "300"])'
    svc = service(
        f"""
version: 1
instances:
  slow:
    command: [{json.dumps(sys.executable)}, -c, {json.dumps(program)}]
    ready: {{log: '(a|aa)+b', start_timeout: 300s}}
    restart: {{min_uptime: 0}}
  other:
    command: [sleep, "300"]
"""
    )
    client = svc.client(timeout=10)
    # Answers over two seconds from the moment the output is in the log file: the probe has it
    # then (64,000 bytes in one write to an empty pipe: one read, one chunk; the sink writes the
    # file and hands the followers the chunk in the same step). Each within a second. The file,
    # not the service, says when: asked over the socket, the service said so after the hold.
    # Two seconds, not the whole search (4,000 lines at about a millisecond: 4 s idle, more
    # loaded): a hold begins as the chunk arrives, so the first answer would wait it out; the
    # window only has to see a few turns of a search that lets the loop go round (5 ms each).
    out = svc.manifest.parent / ".supervisor" / "logs" / "slow.out.log"
    svc.wait_until(lambda: out.exists() and out.stat().st_size > 0, 20, "slow's output in its log")
    took = health_times(client, 2)
    assert max(took) < 1.0, sorted(took)[-3:]
    svc.wait_for(["other"], "running")
    assert client.status(["slow"])[0]["state"] == "starting"  # still searching, not given up
    # Most likely still searching now (the window is shorter than the search): SIGTERM, mid-search.
    began = time.monotonic()
    assert svc.stop() == 0
    assert time.monotonic() - began < 10, "SIGTERM waited for the search"
