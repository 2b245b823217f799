"""Reload through the CLI, the API and SIGHUP: the running set follows the edited manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from .service_fixture import SUPERVISOR, ServiceProcess, pid_gone, write_manifest

Start = Callable[..., ServiceProcess]

BEFORE = """
version: 1
instances:
  keep:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
  change:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
  gone:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
  web:
    command: ["sleep", "300"]
    replicas: 2
    restart: {min_uptime: 0}
"""

AFTER = """
version: 1
instances:
  keep:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
  change:
    command: ["sleep", "301"]
    restart: {min_uptime: 0}
  new:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
  web:
    command: ["sleep", "300"]
    replicas: 3
    restart: {min_uptime: 0}
"""


def pids(svc: ServiceProcess) -> dict[str, int | None]:
    return {name: status["pid"] for name, status in svc.status().items()}


def reload_json(svc: ServiceProcess) -> dict[str, list[str]]:
    result = svc.cli("reload", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_reload_adds_removes_replaces_and_keeps(service: Start, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, BEFORE)
    svc = service(manifest)
    svc.wait_for(["keep", "change", "gone", "web"], "running")
    before = pids(svc)

    write_manifest(tmp_path, AFTER)
    report = reload_json(svc)
    assert report == {
        "added": ["new", "web-2"],
        "removed": ["gone"],
        "changed": ["change"],
        "unchanged": ["keep", "web-0", "web-1"],
        "rescaled": [],
    }
    svc.wait_for(["new", "web-2", "change"], "running")
    after = pids(svc)
    assert set(after) == {"keep", "change", "new", "web-0", "web-1", "web-2"}
    for name in ("keep", "web-0", "web-1"):
        assert after[name] == before[name], name  # untouched: same process
    assert after["change"] != before["change"]
    assert pid_gone(before["change"] or 0) and pid_gone(before["gone"] or 0)

    # Scale down: the last replica goes, the others stay.
    write_manifest(tmp_path, AFTER.replace("replicas: 3", "replicas: 2"))
    text = svc.cli("reload")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        "added: none",
        "removed: web-2",
        "changed: none",
        "unchanged: keep, change, new, web-0, web-1",
    ]
    assert pid_gone(after["web-2"] or 0)
    assert pids(svc)["web-0"] == before["web-0"]

    # One replica to two renames `web` to web-0 and web-1; two to one, back.
    write_manifest(tmp_path, AFTER.replace("replicas: 3", "replicas: 1"))
    assert reload_json(svc)["removed"] == ["web-0", "web-1"]
    assert svc.status("web")["web"]["state"] in ("starting", "running")
    nothing = reload_json(svc)
    assert nothing["added"] == nothing["removed"] == nothing["changed"] == []


def test_a_bad_manifest_changes_nothing(service: Start, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, BEFORE)
    svc = service(manifest)
    svc.wait_for(["keep", "web"], "running")
    before = pids(svc)
    manifest.write_text(
        AFTER.replace("restart: {min_uptime: 0}\n  new:", "restart: {min_uptim: 0}\n  new:").replace(
            "replicas: 3", "replicas: lots"
        )
    )
    refused = svc.cli("reload")
    assert refused.returncode == 1 and refused.stdout == ""
    lines = refused.stderr.splitlines()
    assert lines[0] == "supervisor: the manifest has 2 problems; nothing was changed"
    assert f"{manifest}:" in lines[1] and "min_uptim" in lines[1]
    assert f"{manifest}:" in lines[2] and "replicas" in lines[2]
    assert pids(svc) == before  # same instances, same processes


def test_a_manifest_that_became_a_fifo_is_refused_at_once(service: Start, tmp_path: Path) -> None:
    """A fifo no one writes is refused, not waited on: the reload answers, nothing changes."""
    manifest = write_manifest(tmp_path, BEFORE)
    svc = service(manifest)
    svc.wait_for(["keep", "web"], "running")
    before = pids(svc)
    manifest.unlink()
    os.mkfifo(manifest)
    refused = svc.cli("reload", timeout=20)  # the check's own limit is 120 s
    assert refused.returncode == 1
    assert f"{manifest}: cannot read: not a regular file" in refused.stderr, refused.stderr
    assert pids(svc) == before


def test_sighup_reloads(service: Start, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, BEFORE)
    svc = service(manifest)
    svc.wait_for(["keep"], "running")
    keep = pids(svc)["keep"]

    manifest.write_text("version: 1\ninstances: {oops")
    svc.proc.send_signal(signal.SIGHUP)
    svc.wait_log("reload refused, nothing changed")
    assert pids(svc)["keep"] == keep and "gone" in pids(svc)

    with svc.client(timeout=30).events() as events:
        write_manifest(tmp_path, AFTER)
        svc.proc.send_signal(signal.SIGHUP)
        for event in events:
            if event.get("instance") == "new" and event.get("to_state") == "running":
                break
    after = pids(svc)
    assert "gone" not in after and after["keep"] == keep and after["web-2"]


def test_reload_with_no_service_is_exit_2(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, BEFORE)
    result = subprocess.run(
        [*SUPERVISOR, "reload", "-f", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def test_a_changed_control_socket_is_reported_and_the_old_one_kept(service: Start, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, BEFORE)
    svc = service(manifest)
    svc.wait_for(["keep"], "running")
    moved = tmp_path / "elsewhere.sock"
    manifest.write_text(f"supervisor: {{control: {{socket: {moved}}}}}\n" + BEFORE)
    assert reload_json(svc)["changed"] == []  # the instances do not depend on it
    svc.wait_log("the control settings changed; they apply when the service starts again")
    assert svc.client().health()["ok"] and not moved.exists()
