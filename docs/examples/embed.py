"""Run and steer instances from your own program, without the service or its socket.

    python docs/examples/embed.py            # under asyncio
    python docs/examples/embed.py trio       # the same code under trio

docs/embedding.md walks through it. Every instance, and the manager itself,
lives in a task group this program owns: when ``main()`` returns, nothing it
started is still running.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

import anyio

from supervisor import Manager, State, Transition, parse_manifest

MANIFEST = """
version: 1
supervisor:
  state_dir: state            # relative to the manifest's folder: logs go to state/logs/
instances:
  greeter:
    command: ["sh", "-c", "trap 'echo got USR1' USR1; echo hello; while :; do sleep 0.1; done"]
    restart: {min_uptime: 0}
  job:
    command: ["sh", "-c", "echo job done"]
    autostart: false
"""


async def wait_for_line(manager: Manager, name: str, line: bytes) -> None:
    """Until the instance's captured stdout has ``line``: follow its log sink (no polling)."""
    sink = manager.instances[name].sinks["stdout"]
    async with sink.follow() as chunks:  # subscribed first, then look at what is there already
        if any(line in seen for seen in sink.tail(100)):
            return
        async for chunk in chunks:
            if line in chunk:
                return


async def main(folder: Path) -> None:
    # parse_manifest checks the text as `supervisor validate` does; paths are relative to `folder`.
    manifest = parse_manifest(MANIFEST, folder / "embedded.yaml")
    manager = Manager(manifest)
    transitions: list[Transition] = []

    async def record(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with manager.events.subscribe() as events:
            task_status.started()  # subscribed: no transition from here on is missed
            async for event in events:
                if isinstance(event, Transition):  # else Dropped: we were too slow
                    transitions.append(event)

    async with anyio.create_task_group() as tg:
        await tg.start(record)
        await tg.start(manager.run)  # applied: autostart instances are starting

        [greeter] = manager.select(["greeter"])
        with anyio.fail_after(10):
            await greeter.wait_for({State.RUNNING})
            await wait_for_line(manager, "greeter", b"hello")
        first = greeter.status().pid
        print(f"greeter is {greeter.status().state}")

        greeter.signal(signal.SIGUSR1)
        with anyio.fail_after(10):
            await wait_for_line(manager, "greeter", b"got USR1")
        print("greeter got USR1")

        await greeter.restart()
        with anyio.fail_after(10):
            await greeter.wait_for({State.RUNNING})
        print(f"restarted with a new pid: {greeter.status().pid != first}")

        [job] = manager.select(["job"])
        await job.start()
        with anyio.fail_after(10):
            await job.wait_for({State.EXITED, State.FAILED})
        print(f"job {job.status().state} with code {job.status().exit_code}")

        await greeter.stop()
        print(f"greeter is {greeter.status().state}")
        print("status:", ", ".join(f"{s.name}={s.state}" for s in manager.status()))

        await manager.shutdown()  # stops what still runs; manager.run() returns
        tg.cancel_scope.cancel()  # ends record()

    steps = [f"{t.from_state}->{t.to_state}" for t in transitions if t.instance == "job"]
    print("job went", " ".join(steps))


if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    with tempfile.TemporaryDirectory() as folder:
        anyio.run(main, Path(folder), backend=backend)
    print(f"done under {backend}")
