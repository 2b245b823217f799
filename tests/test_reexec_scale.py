"""A re-exec keeps what ``scale`` set: the same instances after it as before, until the next reload.

The state record carried only the names of the scaled entries, and the new service rebuilt each
from the manifest's ``replicas``: after ``scale web=4`` the new service took over web-0 and web-1,
and web-2 and web-3 ran on as its children, unsupervised (not listed, not stoppable, started a
second time by the next scale); after ``scale web=0``, web-0 and web-1 came back ``stopped``, and
a dependent of web waited for them for ever. Real services, real processes, the real socket.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.handoff import shape
from supervisor.handoff.state import HandoffError, parse_state
from supervisor.manager import MAX_SCALE

from .helpers import handoff_record
from .service_fixture import ServiceProcess, pid_gone
from .test_reexec import _swap

PACKAGE = Path(__file__).resolve().parent.parent / "supervisor"

# min_uptime 0: ``running`` at the spawn. The tests wait for it six times or more (api only
# after web), a second each at the default; what they check is which processes each service
# supervises, never how long one has been up.
MANIFEST = """
version: 1
instances:
  web:
    command: [sleep, '3000.0625']
    replicas: 2
    restart: {min_uptime: 0}
  api:
    command: [sleep, '3000.125']
    depends_on: [web]
    restart: {min_uptime: 0}
"""

#: What a status keeps across a re-exec for one instance.
KEPT = ("pid", "state", "restarts", "started_at")


def _ok(done: subprocess.CompletedProcess[str], svc: ServiceProcess) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stderr + done.stdout + svc.log()
    return done


def _kept(status: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    return {name: tuple(s[key] for key in KEPT) for name, s in status.items()}


def _reexec(svc: ServiceProcess, handoffs: int) -> str:
    """``supervisor reexec``, then until the new service has resumed every instance; its output."""
    done = _ok(svc.cli("reexec"), svc)
    assert svc.client().health()["handoffs"] == handoffs
    svc.wait_until(lambda: svc.log().count("re-exec'd: took over") == handoffs, 30, "every instance resumed")
    return done.stdout


def _scaled_up_and_reexecd(svc: ServiceProcess, handoffs: int = 2) -> dict[str, tuple[Any, ...]]:
    """Scale web to 4, then re-exec ``handoffs`` times: each new service has the same instances."""
    svc.wait_for(["web-0", "web-1", "api"], "running")
    _ok(svc.cli("scale", "web=4"), svc)
    webs = [f"web-{i}" for i in range(4)]
    svc.wait_for(webs, "running")
    before = _kept(svc.status())
    assert sorted(before) == ["api", *webs]
    for handoff in range(1, handoffs + 1):
        out = _reexec(svc, handoff)
        assert "runs the new code with 5 instances" in out, out
        assert _kept(svc.status()) == before, svc.log()
        last = svc.log().rsplit("re-exec'd: took over", 1)[1]
        assert last.startswith(" 5 instances"), last[:200]
        assert "-> starting" not in last  # nothing started: every process was adopted
    return before


def _the_scale_holds_then_a_reload_sets_it_back(
    svc: ServiceProcess, before: dict[str, tuple[Any, ...]]
) -> None:
    """Each adopted replica is supervised (a stop ends its process), and the reload that follows
    runs the manifest's count again, with the rescaled note, as it does without a re-exec."""
    pids = {name: kept[0] for name, kept in before.items()}
    stopped = svc.client().stop(["web-3"])
    assert stopped["ok"], stopped
    assert svc.status("web-3")["web-3"]["state"] == "stopped"
    svc.wait_until(lambda: pid_gone(pids["web-3"]), 20, "web-3's process gone")
    out = _ok(svc.cli("reload"), svc).stdout.splitlines()
    assert "removed: web-2, web-3" in out, out
    assert "rescaled: web: back to the manifest's 2 replicas" in out, out
    after = svc.status()
    assert sorted(after) == ["api", "web-0", "web-1"]
    assert {name: after[name]["pid"] for name in after} == {name: pids[name] for name in after}
    svc.wait_until(lambda: pid_gone(pids["web-2"]), 20, "web-2's process gone")
    # No second reload note: the scale was undone once.
    assert "rescaled" not in _ok(svc.cli("reload"), svc).stdout


def test_a_scale_up_survives_two_reexecs_with_the_same_processes_all_supervised(
    service: Callable[..., ServiceProcess],
) -> None:
    svc = service(MANIFEST)
    before = _scaled_up_and_reexecd(svc)
    _the_scale_holds_then_a_reload_sets_it_back(svc, before)


def test_a_scale_to_zero_survives_a_reexec_and_holds_no_dependent_up(
    service: Callable[..., ServiceProcess],
) -> None:
    svc = service(MANIFEST)
    svc.wait_for(["web-0", "web-1", "api"], "running")
    pids = {name: s["pid"] for name, s in svc.status().items()}
    _ok(svc.cli("scale", "web=0"), svc)
    assert sorted(svc.status()) == ["api"]
    out = _reexec(svc, 1)
    assert "runs the new code with 1 instances" in out, out
    assert sorted(svc.status()) == ["api"], svc.log()
    # A dependency scaled to none holds nobody up, after the re-exec as before it.
    restarted = svc.client().restart(["api"], wait=False)
    assert restarted["ok"], restarted
    svc.wait_for(["api"], "running")
    assert svc.status("api")["api"]["pid"] != pids["api"]
    out = _ok(svc.cli("reload"), svc).stdout.splitlines()
    assert "added: web-0, web-1" in out, out
    assert "rescaled: web: back to the manifest's 2 replicas" in out, out
    svc.wait_for(["web-0", "web-1"], "running")
    assert sorted(svc.status()) == ["api", "web-0", "web-1"]


def test_a_record_of_older_code_with_the_names_only_is_resumed_with_the_counts_it_ran(
    service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """The service runs a copy of the package that writes the scaled entries' names and no counts
    (as the code before did); the re-exec into this code takes the counts from the record's
    instances: the same four processes, supervised, until the reload."""
    older = tmp_path / "older" / "supervisor"
    shutil.copytree(PACKAGE, older, ignore=shutil.ignore_patterns("__pycache__"))
    writer = older / "handoff" / "reexec.py"
    counts = '            "scaled_replicas": manager_state["scaled_replicas"],\n'
    text = writer.read_text().replace(counts, "")
    assert 'manager_state["scaled_replicas"]' not in text  # the older code's record: names only
    writer.write_text(text)
    path = tmp_path / "path"
    path.mkdir()
    link = path / "supervisor"
    link.symlink_to(older)
    # PYTHONSAFEPATH: `python -m` must not find the package in the working folder (the checkout).
    svc = service(MANIFEST, env={"PYTHONPATH": str(path), "PYTHONSAFEPATH": "1"})
    _swap(link, PACKAGE)
    before = _scaled_up_and_reexecd(svc, handoffs=1)
    _the_scale_holds_then_a_reload_sets_it_back(svc, before)


# -- the record -----------------------------------------------------------------------------------


def test_the_record_carries_counts_that_a_scale_could_give_and_refuses_others() -> None:
    """``service.scaled_replicas`` is checked before anything is taken: a count ``scale`` could
    not give (a huge one would build that many instances) refuses the record, and the old
    service goes on."""
    good = handoff_record(scaled=["a"], scaled_replicas={"a": 1})
    assert parse_state(json.dumps(good).encode())["service"]["scaled_replicas"] == {"a": 1}
    for bad, says in (
        (-1, "greater than or equal to 0"),
        (MAX_SCALE + 1, f"less than or equal to {MAX_SCALE}"),
        (True, "a valid integer"),
        ("4", "a valid integer"),
        (4.0, "a valid integer"),
    ):
        record = handoff_record(scaled=["a"], scaled_replicas={"a": bad})
        with pytest.raises(HandoffError) as refused:
            parse_state(json.dumps(record).encode())
        assert f"\n  service.scaled_replicas.a: Input should be {says}" in str(refused.value), refused.value
        assert "the running service goes on as it is" in str(refused.value)
    assert shape.MAX_SCALE == MAX_SCALE  # the record's bound is scale's


def test_the_counts_of_a_record_with_names_only_are_those_of_its_instances() -> None:
    from supervisor.resumption import scaled_counts

    instances = [{"group": "web", "name": f"web-{i}"} for i in range(3)] + [{"group": "one", "name": "one"}]
    assert scaled_counts(["web", "one", "off"], instances) == {"web": 3, "one": 1, "off": 0}
    assert scaled_counts({"web": 3}, instances) == {"web": 3}
    assert scaled_counts([], instances) == {}
