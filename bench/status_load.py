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

The second part (``--part observe``) measures what the resource figures and the
metrics cost: with 500 idle instances, ``GET /metrics`` and the status (which
carries each instance's figures from /proc) back to back (mostly answered from
the sampler's one-second cache) and "cold" (each after the cache expired, so
each pays for a /proc scan), and the service's own CPU over a quiet window with
nobody asking, before any figure was asked for and again after, in the same run.

Targets: p99 of each <= 50 ms; the quiet windows' CPU the same before and after
(nothing keeps sampling once nobody asks).

Usage: python bench/status_load.py [--instances 100] [--requests 500] [--part load|observe|both]
       [--observe-instances 500] [--quiet 10] [--baseline DIR [--rounds N]]

``--baseline DIR`` runs the observe part first with the service imported from DIR (say
``git archive`` of the commit before a change, unpacked), then from this checkout, N
times alternating: before and after on the same machine in the same minutes.
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
from collections.abc import Callable
from pathlib import Path

from supervisor.api.client import Client, ClientError
from supervisor.resources import ResourceSampler

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


def start(path: Path, code: str | None = None) -> tuple[subprocess.Popen[bytes], Client]:
    """``supervisor run`` on ``path``; ``code``: a checkout whose ``supervisor`` package it imports."""
    env = {**os.environ, "PYTHONPATH": code} if code else None
    service = subprocess.Popen(
        [str(SUPERVISOR), "run", "-f", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
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


def _cpu_seconds(pid: int) -> float:
    """The process's CPU time (user + system, every thread) so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _quiet_cpu(pid: int, seconds: float) -> float:
    """The service's CPU, in percent of a core, over ``seconds`` with nobody asking it anything."""
    before = _cpu_seconds(pid)
    time.sleep(seconds)
    return (_cpu_seconds(pid) - before) / seconds * 100


def _timed(call: Callable[[], object], count: int, pause: float = 0.0) -> dict[str, float]:
    samples = []
    for _ in range(count):
        if pause:
            time.sleep(pause)
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)
    return percentiles(samples)


def observe(instances: int, requests: int, quiet: float, code: str | None = None) -> None:
    print(f"\n== the service from {code or 'this checkout'}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        service, client = start(manifest(Path(tmp), instances, ["sleep", "3600"]), code)
        try:
            time.sleep(2)  # the start's work done
            idle_before = _quiet_cpu(service.pid, quiet)
            metrics = client.metrics()
            assert metrics.count("procward_instance_up{") == instances, "not one up sample per instance"
            statuses = client.status()
            assert all(s["rss_bytes"] for s in statuses), "an instance without figures"
            cold = max(requests // 15, 10)
            rows = {
                "GET /metrics (warm)": _timed(client.metrics, requests),
                "GET /v1/instances (warm)": _timed(client.status, requests),
                "GET /metrics (each 1.1 s apart)": _timed(client.metrics, cold, 1.1),
                "GET /v1/instances (each 1.1 s apart)": _timed(client.status, cold, 1.1),
                "GET /metrics (each 11 s apart: waits for a scan)": _timed(client.metrics, 3, 11),
                "GET /v1/health (no figures)": _timed(client.health, requests),
            }
            idle_after = _quiet_cpu(service.pid, quiet)
            size = len(metrics.encode())
            # The scan alone, as the service does it, on the same processes.
            sampler = ResourceSampler(max_age=0)
            pgids = [s["pid"] for s in statuses]
            rows["a /proc scan of every group, alone"] = _timed(lambda: sampler.figures(pgids), 30)
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=120)
    print(f"\n{instances} idle instances; {requests} warm requests each; metrics answer {size / 1e3:.0f} kB")
    print(f"{'request':48} |  p50   |  p90   |  p99   |  max  (ms)")
    for label, figures in rows.items():
        print(
            f"{label:48} | {figures['p50']:6.1f} | {figures['p90']:6.1f} | {figures['p99']:6.1f} | "
            f"{figures['max']:6.1f}"
        )
    warm = [figures["p99"] for label, figures in rows.items() if label.endswith("(warm)")]
    worst = max(warm)
    verdict = "met" if worst <= 50 else "NOT met"
    print(f"worst p99 of metrics and status, back to back: {worst:.1f} ms; target <= 50 ms ({verdict})")
    print(
        f"service CPU with nobody asking ({quiet:g} s each): before any figure {idle_before:.2f}% of a core, "
        f"after {idle_after:.2f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--cli-runs", type=int, default=30)
    parser.add_argument("--part", choices=["load", "observe", "both"], default="both")
    parser.add_argument("--observe-instances", type=int, default=500)
    parser.add_argument("--quiet", type=float, default=10.0, help="seconds of each quiet window")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="observe also a service imported from DIR (a checkout of the code before a change): "
        "before and after in one run, alternating, --rounds times",
    )
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} cpus, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    if args.part != "observe":
        load(args)
    if args.part != "load":
        for _ in range(args.rounds):
            if args.baseline:
                observe(args.observe_instances, args.requests, args.quiet, args.baseline)
            observe(args.observe_instances, args.requests, args.quiet)


def load(args: argparse.Namespace) -> None:
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
