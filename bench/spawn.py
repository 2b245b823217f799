"""Time to start N instances until all are `running`, against a plain Popen + pidfd loop.

Both run in this one process, one after the other, on the same machine:

- baseline: ``subprocess.Popen(["sleep", "300"], start_new_session=True)`` plus
  ``os.pidfd_open`` per child, N times in a loop;
- ours: a Manager with one instance of N replicas (``min_uptime: 0``, stdio to
  /dev/null as in the baseline), from ``run()`` until the N-th `running` event.

The target is measured against the plain loop through ``setpriv --pdeathsig=KILL``
(how the supervisor sets the parent-death signal, the same guarantee): within 1.5x.
The plain loop without it is printed too: what that signal costs by itself.

Then the same Manager with its spawns in one go (``manager.SPAWN_SLICE = None``: every
start queued at once, as before the start path yielded to the event loop): what the
batches cost in total spawn time (target: at most 10 % more).

Then the storm (issue 13): a real ``supervisor run`` with N instances, and a status
request of all of them (``GET /v1/instances``, what ``supervisor status`` asks) sent
every 10 ms from the socket's first answer until all run: p50/p99/max of the answers,
and the time from starting the service until all run.

Usage: python bench/spawn.py [N] [--backend asyncio|trio] [--logs] [--no-storm]
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

from supervisor import manager as manager_module
from supervisor.api.client import Client, ClientError
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


def one_go(n: int, folder: Path, logs: bool, backend: str) -> float:
    """``ours`` with every start of the level queued at once (no batches)."""
    saved = manager_module.SPAWN_SLICE
    manager_module.SPAWN_SLICE = None
    try:
        return anyio.run(ours, n, folder, logs, backend=backend)
    finally:
        manager_module.SPAWN_SLICE = saved


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def storm(n: int, folder: Path, logs: bool) -> tuple[float, list[float], list[float]]:
    """A real service starting ``n`` instances; status of all every 10 ms until all run.

    Each status request is followed by a ``GET /v1/health`` (a few bytes, no per-instance
    work): its latency is how long the loop takes to get to a request, apart from what
    building the answer for ``n`` instances costs.
    """
    streams = "" if logs else "\n    stdout: null\n    stderr: null"
    manifest = folder / "storm.yaml"
    manifest.write_text(
        "version: 1\ninstances:\n  storm:\n    command: [sleep, '300']\n"
        f"    replicas: {n}\n    restart: {{min_uptime: 0}}{streams}\n"
    )
    executable = Path(sys.executable).parent / "supervisor"
    started = time.perf_counter()
    service = subprocess.Popen(
        [str(executable), "run", "-f", str(manifest)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = Client(folder / ".supervisor" / "control.sock", timeout=120)
    latencies: list[float] = []
    health: list[float] = []
    try:
        while True:
            try:
                client.health()
                break
            except ClientError:
                if service.poll() is not None:
                    raise SystemExit(f"bench: the service exited with {service.returncode}") from None
                time.sleep(0.01)
        while True:
            sent = time.perf_counter()
            statuses = client.status()
            latencies.append(time.perf_counter() - sent)
            if sum(1 for status in statuses if status["state"] == "running") == n:
                return time.perf_counter() - started, latencies, health
            asked = time.perf_counter()
            client.health()
            health.append(time.perf_counter() - asked)
            time.sleep(max(0.0, 0.01 - (time.perf_counter() - sent)))
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=120)


def descriptor_cost(counts: tuple[int, ...] = (0, 5000, 10000), spawns: int = 200) -> list[tuple[int, float]]:
    """Milliseconds per plain spawn while this process holds ``count`` more descriptors.

    A spawn copies the parent's descriptor table into the child (and the child closes
    them all again before the exec): the part of a spawn's cost that grows with the
    number of instances, whatever the service does in Python.
    """
    held: list[int] = []
    costs = []
    try:
        for count in counts:
            while len(held) < count:
                held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            started = time.perf_counter()
            children = [
                subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                for _ in range(spawns)
            ]
            costs.append((count, (time.perf_counter() - started) / spawns * 1000))
            for child in children:
                child.wait()
    finally:
        for fd in held:
            os.close(fd)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int, nargs="?", default=1000)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--logs", action="store_true")
    parser.add_argument("--no-storm", action="store_true", help="skip the status latency during the storm")
    parser.add_argument("--descriptors", action="store_true", help="also: a spawn's cost by descriptors held")
    args = parser.parse_args()
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        plain = baseline(args.n)
        setpriv = shutil.which("setpriv")
        with_death_signal = baseline(args.n, (setpriv, "--pdeathsig=KILL", "--")) if setpriv else None
        (Path(tmp) / "batched").mkdir()
        (Path(tmp) / "one-go").mkdir()
        supervised = anyio.run(ours, args.n, Path(tmp) / "batched", args.logs, backend=args.backend)
        unbatched = one_go(args.n, Path(tmp) / "one-go", args.logs, args.backend)
        stormed = None
        if not args.no_storm:
            (Path(tmp) / "storm").mkdir()
            stormed = storm(args.n, Path(tmp) / "storm", args.logs)
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
    print(f"ratio supervisor/plain: {supervised / plain:.2f}x")
    if with_death_signal is not None:
        # What the parent-death signal costs by itself, and what is left for the rest of ours.
        print(
            f"plain loop through setpriv --pdeathsig: {with_death_signal:.3f}s "
            f"({with_death_signal / plain:.2f}x the plain loop; supervisor is "
            f"{supervised / with_death_signal:.2f}x this; target: <= 1.5x)"
        )
    print(
        f"supervisor, every start queued at once (no batches): {unbatched:.3f}s; "
        f"the batches cost {(supervised / unbatched - 1) * 100:+.1f} % (target: <= +10 %)"
    )
    if args.descriptors:
        costs = ", ".join(f"{count:,} held: {ms:.2f} ms" for count, ms in descriptor_cost())
        print(f"a plain spawn of `true` while the process holds more descriptors: {costs}")
    if stormed is not None:
        total, latencies, health = stormed
        ms = [value * 1000 for value in latencies]
        print(
            f"storm: a real service, {args.n} instances all running {total:.3f}s after it started; "
            f"{len(ms)} status requests of all (every 10 ms) meanwhile: p50 {percentile(ms, 0.5):.1f} ms, "
            f"p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms (target: p99 <= 100 ms)"
        )
        if health:
            ms = [value * 1000 for value in health]
            print(
                f"  and a GET /v1/health after each: p50 {percentile(ms, 0.5):.1f} ms, "
                f"p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms"
            )


if __name__ == "__main__":
    main()
