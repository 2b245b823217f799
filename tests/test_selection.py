"""What a request's names select (selection.py): names, manifest names, globs; and what a
request of a mebibyte of them costs a real service."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from supervisor.selection import MAX_GLOBS, TooManyGlobs, UnknownInstance, select

from .service_fixture import SUPERVISOR, ServiceProcess
from .test_api import assert_error, http

Start = Callable[..., ServiceProcess]


@dataclass(frozen=True)
class Named:
    name: str


def _roster() -> tuple[dict[str, Named], dict[str, list[Named]]]:
    """web (3 replicas), db (one), web.admin (one): in that order."""
    instances = {name: Named(name) for name in ["web-0", "web-1", "web-2", "db", "web.admin"]}
    groups = {
        "web": [instances["web-0"], instances["web-1"], instances["web-2"]],
        "db": [instances["db"]],
        "web.admin": [instances["web.admin"]],
    }
    return instances, groups


def _names(patterns: list[str]) -> list[str]:
    return [instance.name for instance in select(*_roster(), patterns)]


def test_names_manifest_names_and_globs_each_once_in_the_order_asked() -> None:
    assert _names([]) == ["web-0", "web-1", "web-2", "db", "web.admin"]
    assert _names(["db", "web"]) == ["db", "web-0", "web-1", "web-2"]
    assert _names(["web-1", "web", "web-1", "db", "db"]) == ["web-1", "web-0", "web-2", "db"]
    assert _names(["web-*"]) == ["web-0", "web-1", "web-2"]
    assert _names(["*.admin", "?b"]) == ["web.admin", "db"]
    assert _names(["web-[02]"]) == ["web-0", "web-2"]
    # A glob matches the whole name, and a dot or a dash is no special character in it.
    assert _names(["web*"]) == ["web-0", "web-1", "web-2", "web.admin"]
    # A manifest name is looked up among the manifest names, not taken as a prefix.
    with pytest.raises(UnknownInstance, match=r"no instance matches 'web' \(known: db, web-0\)"):
        select({"db": Named("db"), "web-0": Named("web-0")}, {"db": [Named("db")]}, ["db", "web"])


def test_a_pattern_that_selects_nothing_names_itself() -> None:
    for pattern in ["webx", "web-3", "web-*x", "[", "web-[", ""]:
        with pytest.raises(UnknownInstance) as raised:
            select(*_roster(), ["db", pattern])
        assert raised.value.pattern == pattern
        assert f"no instance matches {pattern!r}" in str(raised.value)


def test_globs_are_bounded_names_are_not() -> None:
    instances, groups = _roster()
    allowed = [f"web-{n}*" for n in range(3)] + [f"*{'*' * n}" for n in range(MAX_GLOBS - 3)]
    assert len(select(instances, groups, allowed)) == 5
    # The same glob twice counts once; the limit is counted before anything is matched.
    assert len(select(instances, groups, allowed + allowed)) == 5
    with pytest.raises(TooManyGlobs) as raised:
        select(instances, groups, [*allowed, "nothing-matches-*"])
    assert raised.value.count == MAX_GLOBS + 1
    refusal = f"at most {MAX_GLOBS} patterns with * ? or [ in one request, not {MAX_GLOBS + 1}"
    assert refusal in str(raised.value)
    # Names: as many as asked, each looked up.
    assert len(select(instances, groups, ["web-0", "db", "web"] * 100_000)) == 4


MANY = 1000

HOSTS = f"""
version: 1
instances:
  many:
    command: [sleep, "300"]
    replicas: {MANY}
    autostart: false
"""


def test_a_mebibyte_of_names_does_not_hold_the_service(service: Start) -> None:
    """80,000 names (a request just under the body limit) over 1,000 instances: each was
    compared with every instance's name, 80 million comparisons with the loop held for
    about a minute; each is now looked up. The socket answers meanwhile, the request too."""
    svc = service(HOSTS)
    names = [f"many-{i % MANY}" for i in range(80_000)]
    body = json.dumps({"names": names, "state": ["stopped"], "timeout": 1})
    assert len(body) > 900_000
    answered: list[object] = []
    with http(svc) as api:
        health = threading.Thread(target=lambda: answered.append(api.get("/v1/health").status_code))
        with http(svc) as asker:

            def ask() -> None:
                headers = {"content-type": "application/json"}
                answer = asker.post("/v1/instances/wait", content=body, headers=headers)
                answered.append(answer.json()["ok"])

            sent = threading.Thread(target=ask)
            sent.start()
            health.start()
            health.join(timeout=10)
            sent.join(timeout=10)
    assert not health.is_alive() and not sent.is_alive(), "the service held by one request's names"
    assert sorted(answered, key=str) == [200, True]


def test_too_many_globs_are_a_400_and_the_cli_says_why(service: Start) -> None:
    svc = service(HOSTS)
    globs = [f"many-{n}*" for n in range(MAX_GLOBS + 1)]
    with http(svc) as api:
        assert_error(
            api.post("/v1/instances/stop", json={"names": globs}),
            400,
            f"at most {MAX_GLOBS} patterns with * ? or [ in one request, not {MAX_GLOBS + 1}",
        )
        assert api.get("/v1/instances", params={"names": globs}).status_code == 400
        assert api.get("/v1/instances", params={"names": globs[:MAX_GLOBS]}).status_code == 200
        assert svc.wait_for(["many-0"], "stopped")  # the refused stop changed nothing
    shown = subprocess.run(
        [*SUPERVISOR, "status", *globs, "-s", str(svc.socket)], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 1
    assert f"at most {MAX_GLOBS} patterns" in shown.stderr and "Traceback" not in shown.stderr
