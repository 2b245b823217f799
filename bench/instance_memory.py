"""What one more instance costs inside the service's process: traced bytes, tasks, RSS.

A manager (no control plane) runs N instances of `sleep 300` (one entry, `replicas: N`,
`min_uptime: 0`, stdout and stderr captured as by default) under tracemalloc, in a fresh
interpreter per size; once all N run and the loop is idle: the bytes Python has traced,
the tasks alive (anyio's `get_running_tasks`), VmRSS. The slope between two sizes is the
cost of one more instance, free of everything that does not grow with N.

`--baseline DIR` measures an older tree of ours (DIR holds its `supervisor` package, e.g.
`git archive main supervisor | tar -x -C DIR`) the same way, in the same run, alternating.

Usage: python bench/instance_memory.py [--instances 50,250] [--backend asyncio] [--rounds 2]
                                       [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import gc, json, sys, textwrap, tracemalloc
from pathlib import Path
import anyio
from supervisor.config import parse_manifest
from supervisor.events import State
from supervisor.manager import Manager
from supervisor.process import raise_fd_limit

count, folder, backend = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

async def main() -> dict:
    raise_fd_limit()
    path = folder / "supervisor.yaml"
    path.write_text(textwrap.dedent(f'''
        version: 1
        instances:
          sleep:
            command: ["sleep", "300"]
            replicas: {count}
            restart: {{min_uptime: 0}}
        '''))
    manifest = parse_manifest(path.read_text(), path)
    manager = Manager(manifest)
    gc.collect()
    tracemalloc.start()
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        with anyio.fail_after(120):
            while manager.count(State.RUNNING) < count:
                await anyio.sleep(0.05)
        await anyio.wait_all_tasks_blocked()
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
        tasks = len(anyio.get_running_tasks())
        resident = rss()
        tracemalloc.stop()
        await manager.shutdown()
    return {"traced": traced, "tasks": tasks, "rss": resident}

print(json.dumps(anyio.run(main, backend=backend)))
"""


def measure(tree: Path | None, count: int, backend: str) -> dict[str, int]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    with tempfile.TemporaryDirectory(prefix="procward-instmem-") as folder:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(count), folder, backend],
            capture_output=True,
            text=True,
            env=env,
            cwd=folder,
            check=False,
            timeout=600,
        )
    if done.returncode != 0:
        raise SystemExit(f"measuring {count} instances ({tree or 'this tree'}) failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", default="50,250", help="two sizes: small,large")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="an older tree of ours to compare")
    args = parser.parse_args()
    small, large = (int(n) for n in args.instances.split(","))
    trees: dict[str, Path | None] = {"after": None}
    if args.baseline is not None:
        trees = {"before": args.baseline.resolve(), **trees}
    slopes: dict[str, dict[str, list[float]]] = {
        name: {"traced": [], "tasks": [], "rss": []} for name in trees
    }
    for _ in range(args.rounds):
        for name, tree in trees.items():
            a, b = measure(tree, small, args.backend), measure(tree, large, args.backend)
            for key in ("traced", "tasks", "rss"):
                slopes[name][key].append((b[key] - a[key]) / (large - small))
    print(f"per further instance, {small} against {large} instances, {args.backend}, {args.rounds} rounds")
    print(f"{'':8} {'traced (median)':>16} {'tasks':>6} {'RSS (median)':>14}")
    for name, figures in slopes.items():
        traced = statistics.median(figures["traced"]) / 1024
        rss = statistics.median(figures["rss"]) / 1024
        print(f"{name:8} {traced:13.1f} KiB {statistics.median(figures['tasks']):6.2f} {rss:10.1f} KiB")
    if "before" in slopes:
        ratio = statistics.median(slopes["after"]["traced"]) / statistics.median(slopes["before"]["traced"])
        print(f"after / before, traced: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
