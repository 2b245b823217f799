"""``GET /metrics`` from a real service, parsed with prometheus_client's own parser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from supervisor.events import State

from .service_fixture import ServiceProcess, with_tcp_listener
from .test_api import http

Start = Callable[..., ServiceProcess]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

MANIFEST = """
version: 1
instances:
  web:
    command: ["sh", "-c", "echo hello metrics; exec sleep 300"]
    replicas: 2
    restart: {min_uptime: 0}
  crash:
    command: ["sh", "-c", "exit 3"]
    restart: {policy: always, min_uptime: 5s, max_restarts: 2, backoff: {initial: 0, max: 0}}
  idle:
    command: ["sleep", "300"]
    autostart: false
"""


def scrape(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def test_metrics_match_the_status(service: Start) -> None:
    svc = service(MANIFEST)
    svc.wait_for(["web"], "running")
    svc.wait_for(["crash"], "failed")
    svc.wait_output("web-0", b"hello metrics")
    with http(svc) as api:
        answer = api.get("/metrics")
        statuses = {s["name"]: s for s in api.get("/v1/instances").json()}
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = scrape(answer.text)

    for name, status in statuses.items():
        labels = {"name": name, "group": status["group"]}
        one_hot = {
            state: value(samples, "procward_instance_state", state=state, **labels)
            for state in map(str, State)
        }
        assert one_hot[status["state"]] == 1 and sum(one_hot.values()) == 1, (name, one_hot)
        assert value(samples, "procward_instance_up", **labels) == (status["pid"] is not None)
        assert value(samples, "procward_instance_restarts_total", **labels) == status["restarts"]
    web = {"name": "web-0", "group": "web"}
    assert value(samples, "procward_instance_uptime_seconds", **web) > 0
    # Status and metrics read the same sampler within its second: the same figures.
    assert value(samples, "procward_instance_resident_memory_bytes", **web) == statuses["web-0"]["rss_bytes"]
    assert value(samples, "procward_instance_processes", **web) == statuses["web-0"]["processes"] == 1
    assert value(samples, "procward_instance_open_fds", **web) == statuses["web-0"]["open_fds"]
    assert value(samples, "procward_instance_threads", **web) == 1
    assert value(samples, "procward_instance_cpu_seconds_total", **web) >= 0
    assert 0 <= value(samples, "procward_instance_cpu_usage_ratio", **web) < 2
    written = value(samples, "procward_log_written_bytes_total", stream="stdout", **web)
    assert written >= len("hello metrics\n")
    assert value(samples, "procward_log_lost_bytes_total", stream="stdout", **web) == 0

    crash = {"name": "crash", "group": "crash"}
    assert value(samples, "procward_instance_last_exit_code", **crash) == 3
    assert value(samples, "procward_instance_restarts_total", **crash) == statuses["crash"]["restarts"] >= 2
    assert ("procward_instance_resident_memory_bytes", tuple(sorted(crash.items()))) not in samples
    assert value(samples, "procward_instance_uptime_seconds", name="idle", group="idle") == 0
    assert value(samples, "procward_instances") == 4
    # The service's own process.
    assert value(samples, "procward_process_resident_memory_bytes") > 10_000_000
    assert value(samples, "procward_process_open_fds") > 5
    assert value(samples, "procward_process_cpu_seconds_total") > 0


def test_metrics_follow_a_restart(service: Start) -> None:
    svc = service(MANIFEST)
    svc.wait_for(["web"], "running")
    with http(svc) as api:
        before = scrape(api.get("/metrics").text)
        assert api.post("/v1/instances/stop", json={"names": ["web-1"]}).json()["ok"]
        after = scrape(api.get("/metrics").text)
    web1 = {"name": "web-1", "group": "web"}
    assert value(before, "procward_instance_up", **web1) == 1
    assert value(after, "procward_instance_up", **web1) == 0
    assert value(after, "procward_instance_state", state="stopped", **web1) == 1
    assert ("procward_instance_processes", tuple(sorted(web1.items()))) not in after


def test_metrics_on_tcp_want_the_token(service: Start, tmp_path: Path) -> None:
    manifest, port = with_tcp_listener(
        tmp_path,
        "metrics-token",
        """
      one: {command: ["sleep", "300"]}
        """,
    )
    service(manifest)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as tcp:
        assert tcp.get("/metrics").status_code == 401
        answer = tcp.get("/metrics", headers={"Authorization": "Bearer metrics-token"})
    assert answer.status_code == 200
    assert value(scrape(answer.text), "procward_instances") == 1


def test_the_cli_does_not_import_prometheus_client() -> None:
    code = "import sys, supervisor.cli, supervisor.api.client; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_program_stopped_by_a_signal_is_shown_paused(service: Start) -> None:
    """SIGSTOP (or a terminal's SIGTSTP, a debugger) leaves the instance `running` while its program
    does nothing: status, the table and the metrics say it is paused, until SIGCONT."""
    svc = service("version: 1\ninstances:\n  web: {command: [sleep, '300'], restart: {min_uptime: 0}}\n")
    svc.wait_for(["web"], "running")
    pid = svc.status()["web"]["pid"]
    assert svc.status()["web"]["paused"] is False  # read at once: an empty cgroup is not "no figures"
    os.kill(pid, signal.SIGSTOP)
    try:
        # The figures are read at most once a second: the next reading says it.
        svc.wait_until(lambda: svc.status()["web"]["paused"] is True, 10, "status saying paused")
        found = svc.status()["web"]
        assert (found["state"], found["pid"]) == ("running", pid), found
        table = svc.cli("status", "web").stdout.splitlines()[1]
        assert table.endswith("paused by a stop signal: `supervisor signal web CONT` resumes it"), table
        with http(svc) as api:
            samples = scrape(api.get("/metrics").text)
        assert value(samples, "procward_instance_paused", name="web", group="web") == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    svc.wait_until(lambda: svc.status()["web"]["paused"] is False, 10, "status saying it runs again")
    with http(svc) as api:
        samples = scrape(api.get("/metrics").text)
    assert value(samples, "procward_instance_paused", name="web", group="web") == 0
