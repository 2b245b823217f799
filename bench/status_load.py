"""`supervisor status` latency while 100 chatty children write to their logs as fast as they can.

A real `supervisor run` (a subprocess, as a user runs it) supervises N instances of
``yes`` with a 99-character line: each writes 100-byte lines as fast as the pipe takes
them, so the service's log sinks are busy all the time and every child waits on a
full pipe. Meanwhile this script asks for the status of every instance over the
control socket R times (the stdlib client that `supervisor status` uses) and prints
the latency percentiles, and the same figures with the children idle (``sleep``)
in the same run, for the ratio. Also the wall time of the whole `supervisor status`
command under load, which adds Python's start-up (on a machine whose cores the
children keep busy).

Target: p99 of the request under load within 100 ms.

Usage: python bench/status_load.py [--instances 100] [--requests 500]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from supervisor.api.client import Client, ClientError

SUPERVISOR = Path(sys.executable).parent / "supervisor"
LINE = "x" * 99  # `yes` adds the newline: 100-byte lines


def manifest(folder: Path, instances: int, command: list[str]) -> Path:
    path = folder / "supervisor.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            version: 1
            supervisor: {{shutdown_timeout: 30s}}
            instances:
              chatty:
                command: {command!r}
                replicas: {instances}
                restart: {{min_uptime: 0}}
                logs: {{max_bytes: 20MB, backups: 1}}
            """
        )
    )
    return path


def start(path: Path) -> tuple[subprocess.Popen[bytes], Client]:
    service = subprocess.Popen(
        [str(SUPERVISOR), "run", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = Client(path.parent / ".supervisor" / "control.sock", timeout=30)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.health()
            break
        except ClientError:
            if time.monotonic() > deadline or service.poll() is not None:
                raise SystemExit("bench: the service did not come up") from None
            time.sleep(0.05)
    answer = client.wait(["chatty"], "running", timeout=60)
    if not answer["ok"]:
        raise SystemExit(f"bench: the instances did not all run: {answer}")
    return service, client


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5) * 1e3, "p90": pick(0.9) * 1e3, "p99": pick(0.99) * 1e3, "max": ordered[-1] * 1e3}


def measure(path: Path, requests: int, cli_runs: int) -> tuple[dict[str, float], dict[str, float], int]:
    service, client = start(path)
    try:
        for _ in range(20):  # warm-up
            client.status()
        written, began_all = _bytes_written(service.pid), time.perf_counter()
        samples = []
        for _ in range(requests):
            began = time.perf_counter()
            statuses = client.status()
            samples.append(time.perf_counter() - began)
        assert len(statuses) == len({s["name"] for s in statuses})
        rate = (_bytes_written(service.pid) - written) / (time.perf_counter() - began_all) / 1e6
        cli = []
        for _ in range(cli_runs):
            began = time.perf_counter()
            subprocess.run(
                [str(SUPERVISOR), "status", "-f", str(path)], check=True, stdout=subprocess.DEVNULL
            )
            cli.append(time.perf_counter() - began)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=120)
    return percentiles(samples), percentiles(cli), rate


def _bytes_written(pid: int) -> int:
    """What the service has written with write(2) so far: its log files, mostly."""
    with open(f"/proc/{pid}/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--cli-runs", type=int, default=30)
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} cpus, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    rows = []
    for label, command in (("idle (sleep)", ["sleep", "3600"]), ("chatty (yes)", ["yes", LINE])):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
            api, cli, rate = measure(
                manifest(Path(tmp), args.instances, command), args.requests, args.cli_runs
            )
        rows.append((label, api, cli, rate))
    print(f"{args.instances} instances; {args.requests} status requests; {args.cli_runs} CLI runs")
    print("children       | request p50 / p90 / p99 / max (ms) | CLI p50 / p99 (ms) | service writes MB/s")
    for label, api, cli, rate in rows:
        print(
            f"{label:14} | {api['p50']:6.1f} / {api['p90']:6.1f} / {api['p99']:6.1f} / {api['max']:6.1f}"
            f"      | {cli['p50']:6.1f} / {cli['p99']:6.1f}                  | {rate:7.1f}"
        )
    idle, busy = rows[0][1], rows[1][1]
    print(
        f"p99 ratio chatty/idle: {busy['p99'] / idle['p99']:.2f}; target: chatty p99 <= 100 ms "
        f"({'met' if busy['p99'] <= 100 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
