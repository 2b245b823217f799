"""The shipped manifests validate through the real CLI, and the shipped schema is current."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .service_fixture import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "configs").rglob("*.yaml"))


def supervisor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_manifest_validates(manifest: Path) -> None:
    result = supervisor("validate", "-f", str(manifest))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")


def test_demo_has_what_the_readme_promises() -> None:
    result = supervisor("validate", "-f", str(ROOT / "configs" / "demo.yaml"))
    assert result.stdout.strip() == "ok: 6 instances (7 replicas)"


def test_the_demo_runs_as_a_graph(service: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    """The demo itself, on a free port and in a private state dir: the graph comes up in order."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    text = (ROOT / "configs" / "demo.yaml").read_text()
    text = text.replace("8765", port).replace("../.supervisor/demo", str(tmp_path / "state"))
    text = text.replace("cwd: ..", f"cwd: {ROOT}")
    svc = service(text, socket=tmp_path / "state" / "control.sock")
    svc.wait_for(["workers", "heartbeat"], "running", timeout=60)
    status = svc.status()
    assert status["migrate"]["state"] == "exited" and status["migrate"]["exit_code"] == 0
    assert status["web"]["ready"] is True and status["heartbeat"]["ready"] is True
    assert (status["heartbeat"]["status_text"] or "").startswith("beat ")
    for worker in ("workers-0", "workers-1"):
        assert status[worker]["started_at"] >= status["web"]["started_at"]


def test_validate_reports_every_problem_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\n"
        "instances:\n"
        "  web:\n"
        "    command: run-web\n"
        "    resart: {policy: always}\n"  # line 5: misspelt key
        "    replicas: many\n"  # line 6: wrong type
        "    depends_on: [db, ghost]\n"  # line 7: unknown dependency (and the cycle)
        "    stop: {timeout: 10 parsecs}\n"  # line 8: bad duration
        "  db:\n"
        "    command: [postgres]\n"
        "    depends_on: [web]\n"
    )
    result = supervisor("validate", "-f", str(bad))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "5 problems in the manifest:"
    assert f"{bad}:5:5: instances.web.resart: unknown key 'resart' (did you mean 'restart'?)" in lines[1]
    assert f"{bad}:6:15: instances.web.replicas:" in lines[2]
    assert "dependency cycle: web -> db -> web" in result.stderr
    assert f"{bad}:7:22: instances.web.depends_on.1: unknown instance 'ghost'" in result.stderr
    assert f"{bad}:8:21: instances.web.stop.timeout: '10 parsecs' is not a duration" in result.stderr


def test_shipped_json_schema_is_current() -> None:
    result = supervisor("schema")
    assert result.returncode == 0
    shipped = (ROOT / "docs" / "manifest.schema.json").read_text()
    assert json.loads(shipped) == json.loads(result.stdout), (
        "docs/manifest.schema.json is stale: run supervisor schema > docs/manifest.schema.json"
    )
