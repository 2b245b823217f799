"""Start-up: what the service imports (and leaves for later), and the socket serving before the spawns.

The memory and cold-start figures (docs/performance.md, bench/memory.py) rest on two
things that a harmless-looking import could undo without any test noticing: modules that
only some command or route needs are imported when asked, and the control socket is
served before the first instance is made. These tests pin both, on real processes.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.api.client import Client, ClientError

from .service_fixture import SUPERVISOR, ServiceProcess, answers, children_of, wait_until, write_manifest

Start = Callable[..., ServiceProcess]

# Needed by a command the service never runs, or by a route only when it is asked for.
LATER = (
    "supervisor.convert",  # import / export
    "supervisor.config.reference",  # the manifest reference's renderer (docs)
    "supervisor.config.reference_words",
    "supervisor.metrics",  # /metrics
    "prometheus_client",
    "httpx",  # https probes only
    "pydantic.v1",  # 1.9 MiB that nothing of ours needs (FastAPI imported it while it built routes)
    "supervisor.probes",  # readiness and liveness checks: only for an instance that has one
    "supervisor.probe_loop",
    "supervisor.handoff.shape",  # the re-exec record's check: a resume, its check, the exec
)
# The control plane: the service imports it when it runs, never at import.
CONTROL_PLANE = ("starlette", "supervisor.api.http1", "supervisor.api.server", "supervisor.api.app")
# Never, not even while serving: the API is starlette alone, served by our own HTTP/1.1 server
# (#13, docs/performance.md).
NEVER = ("fastapi", "hypercorn", "h2", "wsproto")
# In a child interpreter only (config/apart.py), or for /openapi.json: the service holds records
# (config/records.py) and checks requests by hand (api/requests.py). test_records.py runs a whole
# service and finds none of these loaded.
CHECKED_APART = (
    "pydantic",
    "pydantic_core",
    "supervisor.config.models",
    "supervisor.config.loader",
    "supervisor.config.annotated",
    "supervisor.api.models",
    "yaml",
)


def loaded_after(code: str, *, cwd: Path) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=60, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def heavy(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in names))


def test_importing_the_service_leaves_the_control_plane_and_the_rest_for_later(tmp_path: Path) -> None:
    loaded = loaded_after("import supervisor.service, supervisor.manager", cwd=tmp_path)
    assert "supervisor.service" in loaded
    assert heavy(loaded, LATER + CONTROL_PLANE + NEVER + CHECKED_APART) == []


def test_the_control_plane_checks_requests_without_pydantic(tmp_path: Path) -> None:
    """The API's modules as the service imports them: requests are checked by hand (api/requests.py)."""
    code = "import supervisor.service, supervisor.api.server, supervisor.api.app"
    loaded = loaded_after(code, cwd=tmp_path)
    assert "supervisor.api.requests" in loaded and "starlette" in loaded
    assert heavy(loaded, LATER + NEVER + CHECKED_APART) == []


def service_script(tmp_path: Path, *, before: str = "", serving: str = "") -> str:
    """A script that runs a ``Service`` of one instance in its own interpreter, then shuts it down.

    ``before``: lines run once the service is made, before it runs (``service`` is there);
    ``serving``: lines run once it serves (also ``manifest``). Both at the indent of ``main``'s body.
    """
    manifest = write_manifest(
        tmp_path,
        """
        version: 1
        instances:
          one: {command: ["sleep", "300"], restart: {min_uptime: 0}}
        """,
    )
    indent = " " * 4
    return f"""
import gc
import anyio
from supervisor.api.client import Client
from supervisor.config import load_manifest
from supervisor.service import Service

async def main() -> None:
    manifest = load_manifest({str(manifest)!r})
    service = Service(manifest)
{textwrap.indent(textwrap.dedent(before), indent)}
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
{textwrap.indent(textwrap.dedent(serving), indent * 2)}
        await service.shutdown()

anyio.run(main)
"""


def test_the_running_service_imports_what_serves_and_nothing_asked_for_later(tmp_path: Path) -> None:
    """A service in its own interpreter, answering on its socket: what did it load meanwhile?"""
    code = service_script(
        tmp_path,
        serving="""
            client = Client(manifest.control_socket, timeout=30)
            answer = await anyio.to_thread.run_sync(client.status)
            assert [s["name"] for s in answer] == ["one"], answer
            await anyio.to_thread.run_sync(client.health)
        """,
    )
    loaded = loaded_after(code, cwd=tmp_path)
    assert "supervisor.api.http1" in loaded and "supervisor.api.server" in loaded  # it did serve
    assert heavy(loaded, LATER + NEVER) == []


def test_what_is_made_before_the_instances_is_kept_out_of_the_collectors_walks(tmp_path: Path) -> None:
    """Modules, the manifest's models and the control plane live as long as the service: frozen
    (``gc.freeze``) before the first spawn, so that no full collection in a storm of spawns walks
    them again (the manager freezes the instances too, once they are all started)."""
    code = service_script(
        tmp_path,
        before="""
            before = gc.get_freeze_count()
            frozen_at_apply = []
            apply = service.manager.apply

            async def watched(manifest):
                frozen_at_apply.append(gc.get_freeze_count())
                return await apply(manifest)

            service.manager.apply = watched
        """,
        serving="""
            assert frozen_at_apply[0] > 20_000 > before, (before, frozen_at_apply)
        """,
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr


def run_until_it_answers(tmp_path: Path, *, before: str, at_answer: str, args: tuple[str, ...] = ()) -> Any:
    """``supervisor run`` (the CLI's own function) in its own interpreter, shut down once it answers.

    ``before``: lines run first (``sys`` and ``gc`` are imported); ``at_answer``: lines run in a
    thread once the service answers on its socket, which put what they saw into ``seen``. The
    result is ``seen``, with ``status``: what ``main`` returned.
    """
    manifest = write_manifest(
        tmp_path,
        """
        version: 1
        instances:
          one: {command: ["sleep", "300"], restart: {min_uptime: 0}}
        """,
    )
    socket = manifest.parent / ".supervisor" / "control.sock"
    code = f"""
import gc, json, os, sys, threading
from supervisor.api.client import Client
from supervisor.cli import main
{textwrap.dedent(before)}
read, write = os.pipe()
seen = {{}}

def watch():
    with open(read, "rb") as ready:
        ready.read()  # the pid, then EOF: the service answers on its socket
{textwrap.indent(textwrap.dedent(at_answer), "    ")}
    Client({str(socket)!r}, timeout=30).shutdown()

threading.Thread(target=watch).start()
status = main(["run", "-f", {str(manifest)!r}, "--ready-fd", str(write), *{list(args)!r}])
print(json.dumps(dict(seen, status=status)))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_supervisor_run_starts_with_the_collector_off_and_serves_with_it_on(tmp_path: Path) -> None:
    """The start makes tens of thousands of objects that live as long as the service and almost
    no garbage: the collector's passes over them while they grew were a tenth of a cold start.
    ``supervisor run`` (the CLI's own function, in its own interpreter) must run no collection
    before it has frozen them, and must serve with the collector on."""
    found = run_until_it_answers(
        tmp_path,
        before="""
            collections = []  # the freeze count at each collection once the service's import has begun

            def collecting(phase, info):
                if phase == "start" and "supervisor.service" in sys.modules:
                    collections.append(gc.get_freeze_count())

            gc.callbacks.append(collecting)
        """,
        at_answer="""
            seen.update(at_answer=list(collections), enabled=gc.isenabled(), frozen=gc.get_freeze_count())
        """,
    )
    assert found["status"] == 0 and found["enabled"] is True and found["frozen"] > 20_000, found
    # Collections there were (the spawns run with it on), but none before the start was frozen.
    assert all(frozen > 20_000 for frozen in found["at_answer"]), found


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_supervisor_run_imports_while_its_manifest_is_checked(tmp_path: Path, backend: str) -> None:
    """The service waits about 100 ms for its manifest's check (a child interpreter): what it
    imports then is free, what it imports after the answer is on the path to the first status.
    Only ``anyio.run`` itself imported its backend (10 to 15 ms); no module of the control plane
    or of the event loop may come after the check's answer, and the launch tools are looked up
    by then (else the first spawn waits 10 to 20 ms for it)."""
    found = run_until_it_answers(
        tmp_path,
        before="""
            from supervisor import launcher
            from supervisor.config import apart

            checked = {}
            result = apart.ManifestCheck.result

            def noted(self, **how):
                manifest = result(self, **how)
                checked.setdefault("modules", set(sys.modules))
                checked.setdefault("tools", launcher._tools is not None or launcher._lookup is not None)
                return manifest

            apart.ManifestCheck.result = noted
        """,
        at_answer="""
            seen["after"] = sorted(set(sys.modules) - checked["modules"])
            seen["tools"] = checked["tools"]
        """,
        args=("--backend", backend),
    )
    assert found["status"] == 0, found
    ours_and_the_loop = ("supervisor", "anyio", "asyncio", "trio", "sniffio", "starlette", "pickle")
    late = heavy(set(found["after"]), ours_and_the_loop)
    assert late == [], found["after"]
    # The launch tools' lookup (setpriv and the shell asked what they can do: two short
    # processes) was under way by the time the check answered, not left to the first spawn.
    assert found["tools"] is True, found


def test_supervisor_run_checks_its_manifest_in_a_fork_of_itself(service: Start) -> None:
    """A fork, not a new interpreter: it has the interpreter and the CLI's imports already (60 ms
    of a cold start, config/apart.py), and names itself for ps. 1,000 entries: the check takes long
    enough to be seen."""
    entries = "".join(f"  i{n}: {{command: [sleep, '300'], autostart: false}}\n" for n in range(1000))
    svc = service("version: 1\ninstances:\n" + entries, ready=False)

    def check() -> list[str]:
        names = []
        for pid in children_of(svc.pid):
            try:
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:  # reaped meanwhile
                continue
        return names

    svc.wait_until(lambda: "procward-check" in check(), 30, "the check's fork among the service's children")
    svc.wait_ready()
    # Answered, ended, and reaped by the service's orphan reaper (its answer is taken before
    # its end: ManifestCheck.result's reap_later), not left a zombie.
    svc.wait_until(lambda: "procward-check" not in check(), 30, "the check reaped")


@pytest.mark.parametrize("closed", [(0,), (0, 1, 2)], ids=["stdin", "stdin, stdout and stderr"])
def test_a_service_started_with_its_standard_streams_closed_checks_and_runs(
    tmp_path: Path, closed: tuple[int, ...]
) -> None:
    """With fd 0 (or all three) closed, the check's pipes get those numbers: its fork must still
    end up with its answer's pipes as its own stdout and stderr (config/apart.py)."""
    import os
    import signal

    manifest = write_manifest(tmp_path, "version: 1\ninstances:\n  one: {command: [sleep, '300']}\n")
    service = subprocess.Popen(
        [*SUPERVISOR, "run", "-f", str(manifest)],
        cwd=tmp_path,
        preexec_fn=lambda: [os.close(fd) for fd in closed],
    )
    try:
        client = Client(manifest.parent / ".supervisor" / "control.sock", timeout=5)
        wait_until(lambda: answers(client), service, 30, "an answer on the socket")
        [one] = client.status()
        assert one["name"] == "one" and one["state"] in ("starting", "running"), one
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0


def test_run_service_gives_the_collector_back_when_the_start_fails(tmp_path: Path) -> None:
    from supervisor.service_process import run_service

    (tmp_path / "bad.yaml").write_text("version: 1\ninstances: {a: {command: []}}\n")
    assert gc.isenabled()
    assert run_service(tmp_path / "bad.yaml") == 1
    assert gc.isenabled()


def test_metrics_import_prometheus_client_when_asked(service: Start) -> None:
    """The other side of the laziness above: /metrics still works once someone asks for it."""
    svc = service(
        """
        version: 1
        instances:
          one: {command: ["sleep", "300"], restart: {min_uptime: 0}}
        """
    )
    svc.wait_for(["one"], "running")
    text = svc.client().metrics()
    assert "supervisor_instance_state" in text or "# TYPE" in text


def first_answer(svc: ServiceProcess, timeout: float = 60) -> list[dict[str, Any]]:
    """The first status the service gives, asked for as soon as its socket exists."""
    client = Client(svc.socket, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.status()
        except ClientError:
            pass  # not bound yet
        left = deadline - time.monotonic()
        assert left > 0, f"no answer within {timeout}s:\n{svc.log()}"
        try:
            code = svc.proc.wait(timeout=min(0.002, left))
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"the service exited with {code}:\n{svc.log()}")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_socket_answers_status_while_instances_are_still_spawning(service: Start, backend: str) -> None:
    """Served first, spawned second: the first answer comes before the last of 300 spawns.

    Before, the control server started once every instance was spawned, so the first
    answer always listed all 300 with a pid. The service's own log says the order too. A
    request that comes before the manager knows its instances waits for that moment: the
    first answer lists all 300, not none.
    """
    count = 300
    svc = service(
        f"""
        version: 1
        instances:
          many:
            command: ["sleep", "300"]
            replicas: {count}
            restart: {{min_uptime: 0}}
        """,
        ready=False,
        args=("--backend", backend),
    )
    answer = first_answer(svc)
    assert len(answer) == count  # it waited until the manager knew them: never an empty service
    spawned = [s for s in answer if s["pid"] is not None]
    assert len(spawned) < count, f"all {count} were spawned before the first answer"
    svc.wait_log(f"supervising {count} instances")
    assert svc.client().health()["starting"] is False  # what the fixture's wait_ready waits for
    log = svc.log()
    served = log.index("control API on")
    assert served < log.index(f"supervising {count} instances")
    # Its log of transitions may drop some of a burst of 600 (it says so), but not the first.
    first_spawn = log.find(": stopped -> starting")
    assert served < first_spawn or ("missed" in log and first_spawn == -1), log
    # And once the spawns are done, the same socket has every instance running.
    svc.wait_for(["many"], "running", timeout=120)
    assert len(svc.status()) == count
