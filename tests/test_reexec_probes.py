"""A re-exec ends the exec probes in flight; the new service runs them again.

An exec probe's program is a child of the service, with a pidfd and an output pipe that close at
the exec. The new code knew nothing of it: a probe running at the moment of a re-exec ran on,
unwatched and reparented, its timeout counted by nobody. Now its process group is killed and
its program reaped right before the ``execv``, and the new service probes again. Real services,
real processes, the real socket; a probe's processes are found in ``/proc`` by an argument
unique to the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from supervisor.handoff.record import identity

from .service_fixture import ServiceProcess, pid_gone, processes_with

#: The probes' programs: a shell (its $0 the marker) whose child is a sleep (its length the marker);
#: the trailing ``:`` keeps the shell from exec'ing the sleep in its place.
ALIVE_SH, ALIVE_SLEEP = "alive-probe-8e1f", "30.0611"
READY_SH, READY_SLEEP = "ready-probe-8e1f", "30.0622"

MANIFEST = f"""
version: 1
instances:
  watched:
    command: [sleep, '3000.0633']
    alive:
      exec: [sh, -c, 'sleep {ALIVE_SLEEP}; :', {ALIVE_SH}]
      interval: 1s
      timeout: 60s
      failure_threshold: 1
  starting:
    command: [sleep, '3000.0644']
    ready:
      exec: [sh, -c, 'sleep {READY_SLEEP}; :', {READY_SH}]
      interval: 1s
      timeout: 60s
      start_timeout: null
"""

MARKERS = (ALIVE_SH, ALIVE_SLEEP, READY_SH, READY_SLEEP)


def _probes() -> dict[str, list[int]]:
    """The live processes of each probe's program, by marker."""
    return {marker: processes_with(marker) for marker in MARKERS}


def _start(pid: int) -> int | None:
    found = identity(pid)
    return None if found is None else found.start


def test_a_reexec_ends_the_exec_probes_in_flight_and_the_new_service_probes_again(
    service: Callable[..., ServiceProcess],
) -> None:
    svc = service(MANIFEST)
    svc.wait_for(["watched"], "running")
    svc.wait_until(lambda: all(_probes().values()), 30, "both probes' programs running")
    before = _probes()
    assert all(len(pids) == 1 for pids in before.values()), before
    old = {pid: _start(pid) for pids in before.values() for pid in pids}
    status = svc.status()
    assert status["starting"]["state"] == "starting"  # its readiness probe is what runs

    done = svc.cli("reexec")
    assert done.returncode == 0, done.stderr + svc.log()
    assert svc.client().health()["handoffs"] == 1
    # Killed and reaped before the exec: none of them is left by the time the new service answers
    # (by pid and start time: a reused pid is not a survivor).
    left = [pid for pid, start in old.items() if not pid_gone(pid) and _start(pid) == start]
    assert left == [], (left, svc.log())
    assert "re-exec: ended 2 exec probes in flight" in svc.log(), svc.log()

    # The new service runs both probes again: new processes, children of the service (the shells).
    def probed_again() -> bool:
        now = _probes()
        return all(pid not in old for pids in now.values() for pid in pids) and all(now.values())

    svc.wait_until(probed_again, 30, "both probes run again")
    again = _probes()
    for marker in (ALIVE_SH, READY_SH):
        (shell,) = again[marker]
        found = identity(shell)
        assert found is not None and found.ppid == svc.pid, (marker, found)
    # The cut attempt was neither a failure (failure_threshold 1 would have restarted it) nor a pass.
    after = svc.status()
    for name in ("watched", "starting"):
        assert after[name]["pid"] == status[name]["pid"], (name, after[name])
        assert after[name]["restarts"] == status[name]["restarts"], (name, after[name])
    assert after["watched"]["state"] == "running"
    assert after["starting"]["state"] == "starting"

    # And nothing of any probe outlives the service.
    assert svc.stop() == 0
    assert _probes() == {marker: [] for marker in MARKERS}


FAILED_EXEC = """
import json, os, sys
import anyio
from supervisor.handoff.reexec import exec_service
from supervisor.probes import ExecContext, until_failed
from tests.helpers import handoff_record, manifest_from
from tests.service_fixture import pid_gone

# From the environment: an argument of this process would be found by processes_with too.
shell, pause, folder = os.environ["PROBE_SHELL"], os.environ["PROBE_PAUSE"], sys.argv[1]
# Each attempt of the probe writes its shell's pid and its sleep's to this fifo once both are there
# ($$ is the manifest's escape for a $).
said = os.path.join(folder, "attempts")
os.mkfifo(said)
manifest = manifest_from(
    "version: 1\\ninstances:\\n  a:\\n    command: [sleep, '1']\\n"
    f"    alive: {{exec: [sh, -c, 'sleep {pause} & echo $$$$ $$! >{said}; wait; :', {shell}], interval: 1s, "
    "timeout: 60s, failure_threshold: 1}\\n",
    __import__("pathlib").Path(folder),
)
check = manifest.instances["a"].alive
reports = []
answer = {}
attempts = os.open(said, os.O_RDWR | os.O_NONBLOCK)  # read and write: an attempt's open never waits
heard = bytearray()


async def next_attempt():  # the pids the next attempt wrote, or [] if none came within 20 s
    with anyio.move_on_after(20):
        while b"\\n" not in heard:
            await anyio.wait_readable(attempts)
            heard.extend(os.read(attempts, 4096))
        line, _, rest = bytes(heard).partition(b"\\n")
        heard[:] = rest
        return [int(pid) for pid in line.split()]
    return []


async def all_ended(pids):  # whether each ended within 20 s (a pidfd is readable once it has)
    with anyio.move_on_after(20):
        for pid in pids:
            try:
                watched = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                await anyio.wait_readable(watched)
            finally:
                os.close(watched)
        return True
    return False


async def main():
    async with anyio.create_task_group() as tg:
        async def probe():
            answer["failed"] = await until_failed(check, ExecContext(None, dict(os.environ)), report)

        def report(ok, message):
            reports.append([ok, message])

        tg.start_soon(probe)
        first = await next_attempt()  # [the shell, its sleep]
        assert len(first) == 2, first
        sys.executable = os.path.join(folder, "python-removed")  # the exec fails: the service goes on
        keep = os.pipe()[0]
        record = handoff_record()
        record["service"]["listeners"]["sockets"] = [{"fd": keep, "name": "x"}]
        record["instances"] = []
        del record["format"], record["version"]
        answer["reason"] = exec_service(record)
        answer["leader_reaped"] = pid_gone(first[0])  # the shell, reaped before exec_service returned
        answer["gone"] = await all_ended(first)  # its sleep: killed
        again = await next_attempt()
        answer["again"] = bool(again) and again[0] != first[0]
        tg.cancel_scope.cancel()
    answer["reports"] = reports


anyio.run(main)
print(json.dumps(answer))
"""


def test_a_failed_execv_lets_the_probes_it_ended_begin_again(tmp_path: Path) -> None:
    """When the ``execv`` fails after the probes were ended, the service goes on, and each probe
    begins its attempt again: the kill is not the check's failure (with ``failure_threshold: 1``
    it would have restarted the instance)."""
    shell, pause = "failed-exec-probe-8e1f", "30.0655"
    run = subprocess.run(
        [sys.executable, "-c", FAILED_EXEC, str(tmp_path)],
        env={**os.environ, "PROBE_SHELL": shell, "PROBE_PAUSE": pause},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["reason"].startswith("cannot exec "), answer
    assert answer["leader_reaped"] is True and answer["gone"] is True
    assert answer["again"] is True
    assert answer["reports"] == [] and "failed" not in answer
    assert processes_with(shell) == [] and processes_with(pause) == []
