"""The status of thousands of instances, before and after a change, side by side in one run.

Two real `supervisor run` services (subprocesses, as a user runs them), one importing an older
tree of ours (``--baseline DIR``: a folder holding its ``supervisor`` package, e.g. ``git
archive main supervisor | tar -x -C DIR``, run with this venv's interpreter and packages), one
this checkout, each supervising N instances of ``sleep`` with nothing captured. Once both have
all N running, alternately (the order swapped every round, so that neither gets the quieter
moments): the status of all N over the API (``GET /v1/instances``, with each group's figures
from /proc, as `supervisor status` asks it) and the whole `supervisor status` command.

bench/scale.py measures the same figures for one service at a time, minutes apart: on a
shared machine the load moves more than the change between two such runs. Here both run
in the same minutes.

Usage: python bench/status_many.py --baseline DIR [--instances 3000] [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli import OURS, environment, machine, percentile

from supervisor.api.client import Client, ClientError


class Service:
    """One `supervisor run` of N sleeps, from ``tree`` (None: this checkout)."""

    def __init__(self, folder: Path, size: int, tree: Path | None) -> None:
        folder.mkdir()
        self.socket = folder / "control.sock"
        manifest = folder / "supervisor.yaml"
        manifest.write_text(
            textwrap.dedent(
                f"""
                version: 1
                supervisor:
                  control: {{socket: {self.socket}}}
                instances:
                  sleep:
                    command: ["sleep", "3600"]
                    replicas: {size}
                    restart: {{min_uptime: 0}}
                    stdout: null
                    stderr: null
                """
            )
        )
        self.env = environment()
        if tree is not None:
            self.env["PYTHONPATH"] = str(tree)
        self.log = (folder / "service.log").open("wb")
        self.process = subprocess.Popen(
            [str(OURS), "run", "-f", str(manifest)], stdout=self.log, stderr=self.log, env=self.env
        )
        self.client = Client(self.socket, timeout=600)
        self.size = size
        self.api: list[float] = []
        self.cli: list[float] = []

    def wait_running(self) -> None:
        while True:
            try:
                if self.client.wait(["sleep"], "running", timeout=600).get("ok"):
                    return
            except ClientError:
                if self.process.poll() is not None:
                    raise SystemExit(f"bench: the service exited with {self.process.returncode}") from None
                time.sleep(0.05)

    def round(self) -> None:
        started = time.perf_counter()
        statuses = self.client.status()
        self.api.append(time.perf_counter() - started)
        assert len(statuses) == self.size, len(statuses)
        started = time.perf_counter()
        subprocess.run(
            [str(OURS), "status", "-s", str(self.socket)], stdout=subprocess.DEVNULL, check=True, env=self.env
        )
        self.cli.append(time.perf_counter() - started)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=300)
        self.log.close()


def figures(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} / {percentile(values, 0.9) * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a folder holding an older supervisor")
    parser.add_argument("--instances", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-status-many-"))
    services = {"before": Service(folder / "before", args.instances, args.baseline)}
    try:
        services["before"].wait_running()
        services["after"] = Service(folder / "after", args.instances, None)
        services["after"].wait_running()
        for service in services.values():
            service.round()  # warm-up: bytecode, the first /proc reading
            service.api.clear()
            service.cli.clear()
        for run in range(args.runs):
            order = ["before", "after"] if run % 2 == 0 else ["after", "before"]
            for name in order:
                services[name].round()
    finally:
        for service in services.values():
            service.stop()
    print(machine())
    print(f"{args.instances:,} instances, {args.runs} rounds; load average {os.getloadavg()[0]:.1f}")
    print("| service | status API p50 / p90 | `supervisor status` p50 / p90 |")
    print("| --- | ---: | ---: |")
    for name, service in services.items():
        print(f"| {name} | {figures(service.api)} | {figures(service.cli)} |")
    before, after = services["before"], services["after"]
    api = statistics.median(after.api) / statistics.median(before.api)
    cli = statistics.median(after.cli) / statistics.median(before.cli)
    print(f"ratio after / before (p50): API {api:.2f}, CLI {cli:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
