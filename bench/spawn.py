"""Time to start N instances until all are `running`, against a plain Popen + pidfd loop.

Both run in this one process, one after the other, on the same machine:

- baseline: ``subprocess.Popen(["sleep", "300"], start_new_session=True)`` plus
  ``os.pidfd_open`` per child, N times in a loop;
- ours: a Manager with one instance of N replicas (``min_uptime: 0``, stdio to
  /dev/null as in the baseline), from ``run()`` until the N-th `running` event.

Also, for the record, the plain loop through ``setpriv --pdeathsig=KILL`` (how the
supervisor sets the parent-death signal): what that signal costs by itself.

Usage: python bench/spawn.py [N] [--backend asyncio|trio] [--logs]
(--logs gives each instance its stdout/stderr log pipes and sinks, which the baseline lacks.)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio

from supervisor.config import parse_manifest
from supervisor.events import State, Transition
from supervisor.manager import Manager
from supervisor.process import raise_fd_limit


def baseline(n: int, prefix: tuple[str, ...] = ()) -> float:
    started = time.perf_counter()
    children = []
    for _ in range(n):
        child = subprocess.Popen(
            [*prefix, "sleep", "300"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        children.append((child, os.pidfd_open(child.pid)))
    elapsed = time.perf_counter() - started
    for child, pidfd in children:
        child.send_signal(signal.SIGKILL)
        child.wait()
        os.close(pidfd)
    return elapsed


async def ours(n: int, folder: Path, logs: bool) -> float:
    streams = "" if logs else "stdout: null\n    stderr: null"
    text = textwrap.dedent(
        f"""
        version: 1
        instances:
          bench:
            command: ["sleep", "300"]
            replicas: {n}
            restart: {{min_uptime: 0}}
            stop: {{timeout: 5s}}
        """
    ).replace("    stop:", f"    {streams}\n    stop:" if streams else "    stop:")
    path = folder / "bench.yaml"
    path.write_text(text)
    manager = Manager(parse_manifest(text, path))
    running = 0
    done = anyio.Event()

    async def count(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal running
        async with manager.events.subscribe(buffer=4 * n) as events:
            task_status.started()
            async for event in events:
                if isinstance(event, Transition) and event.to_state is State.RUNNING:
                    running += 1
                    if running == n:
                        done.set()

    async with anyio.create_task_group() as tg:
        await tg.start(count)
        started = time.perf_counter()
        await tg.start(manager.run)
        await done.wait()
        elapsed = time.perf_counter() - started
        await manager.shutdown()
        tg.cancel_scope.cancel()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int, nargs="?", default=1000)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--logs", action="store_true")
    args = parser.parse_args()
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        plain = baseline(args.n)
        setpriv = shutil.which("setpriv")
        with_death_signal = baseline(args.n, (setpriv, "--pdeathsig=KILL", "--")) if setpriv else None
        supervised = anyio.run(ours, args.n, Path(tmp), args.logs, backend=args.backend)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}, {args.backend}")
    print(f"plain Popen+pidfd loop: {args.n} children in {plain:.3f}s ({args.n / plain:.0f}/s)")
    print(f"supervisor, all running: {args.n} instances in {supervised:.3f}s ({args.n / supervised:.0f}/s)")
    print(f"ratio supervisor/plain: {supervised / plain:.2f}x (target: <= 1.5x)")
    if with_death_signal is not None:
        # What the parent-death signal costs by itself, and what is left for the rest of ours.
        print(
            f"plain loop through setpriv --pdeathsig: {with_death_signal:.3f}s "
            f"({with_death_signal / plain:.2f}x the plain loop; supervisor is "
            f"{supervised / with_death_signal:.2f}x this)"
        )


if __name__ == "__main__":
    main()
