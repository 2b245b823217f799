"""`supervisor reexec` with 1,000 instances running: how long, how long a polling client waits.

A real `supervisor run` (a subprocess, as a user runs it) supervises N instances of ``sleep``
(and a few chatty ones that write numbered lines all along). Once every one runs, a thread
asks for the status of every instance every 10 ms (one connection per request, as
`supervisor status` does) while this script sends ``POST /v1/reexec``. Measured:

- the check: from the request to its 202 answer (the new code runs in a subprocess on a copy
  of the state; the old service serves meanwhile);
- the handover: from the 202 answer until the new service answers status with all N
  instances (the old one stops taking requests, execs; the new one imports, adopts, listens),
  and in it, from the service's own log: from the state written to the new code's first
  line after its imports ("import"), and from there to answering ("adopt");
- the longest gap the polling client sees between two answers, and its longest single request;
- the client's errors (target 0), and the instances restarted (same pid and start time: target 0);
- every numbered line of the chatty instances present exactly once in their logs.

Target: the handover under 1 s, 0 restarted, 0 errors.

Usage: python bench/reexec.py [--instances 1000] [--chatty 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from supervisor.api.client import Client, ClientError

SUPERVISOR = Path(sys.executable).parent / "supervisor"
CHATTY = "i=0; while :; do i=$((i+1)); echo \"n $i\"; case $i in *00) sleep 0.01;; esac; done"


class Poller(threading.Thread):
    def __init__(self, socket: Path) -> None:
        super().__init__(daemon=True)
        self.client = Client(socket, timeout=60)
        self.errors: list[str] = []
        self.longest_request = 0.0
        self.longest_gap = 0.0
        self.answers = 0
        self.stop = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                self.client.status()
            except ClientError as exc:
                self.errors.append(str(exc))
            else:
                now = time.monotonic()
                self.answers += 1
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
            self.longest_request = max(self.longest_request, time.monotonic() - start)
            self.stop.wait(0.01)


def manifest(folder: Path, instances: int, chatty: int) -> Path:
    path = folder / "supervisor.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            version: 1
            supervisor: {{shutdown_timeout: 60s}}
            instances:
              idle:
                command: ["sleep", "100000"]
                replicas: {instances - chatty}
              chatty:
                command: ["sh", "-c", {CHATTY!r}]
                replicas: {chatty}
            """
        )
    )
    return path


def wait_answer(client: Client, service: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.health()
        except ClientError:
            if time.monotonic() > deadline or service.poll() is not None:
                raise SystemExit("the service did not answer") from None
            time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time: it goes on counting across execve (same process)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(
    client: Client, socket: Path, instances: int, handoffs: int, pid: int
) -> dict[str, float | int]:
    before = {s["name"]: (s["pid"], s["started_at"], s["restarts"]) for s in client.status()}
    poller = Poller(socket)
    poller.start()
    asked = time.monotonic()
    client.reexec()
    answered = time.monotonic()
    cpu = cpu_seconds(pid)
    while True:
        health = client.health()
        if health["handoffs"] > handoffs:
            statuses = client.status()
            if len(statuses) == instances:
                break
        if health.get("handoff_error"):
            raise SystemExit(f"reexec failed: {health['handoff_error']}")
    done = time.monotonic()
    cpu = cpu_seconds(pid) - cpu
    poller.stop.set()
    poller.join()
    after = {s["name"]: (s["pid"], s["started_at"], s["restarts"]) for s in statuses}
    restarted = sum(1 for name, facts in before.items() if after.get(name) != facts)
    return {
        "check_s": answered - asked,
        "handover_s": done - answered,
        "cpu_s": cpu,
        "gap_s": poller.longest_gap,
        "request_s": poller.longest_request,
        "errors": len(poller.errors),
        "answers": poller.answers,
        "restarted": restarted,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--chatty", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as folder:
        path = manifest(Path(folder), args.instances, args.chatty)
        socket = Path(folder) / ".supervisor" / "control.sock"
        service = subprocess.Popen(
            [str(SUPERVISOR), "run", "-f", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=open(Path(folder) / "service.log", "wb"),  # noqa: SIM115
        )
        try:
            client = Client(socket, timeout=60)
            wait_answer(client, service, 120)
            answer = client.wait([], "running", all=True, timeout=120)
            assert answer["ok"], answer
            print(f"{args.instances} instances running ({args.chatty} chatty)")
            rows = []
            for handoffs in range(args.rounds):
                rows.append(one_round(client, socket, args.instances, handoffs, service.pid))
            print(
                f"{'round':>5} {'check':>8} {'handover':>9} {'its CPU':>8} {'gap':>8} {'request':>8} "
                f"{'answers':>8} {'errors':>7} {'restarted':>10}   (load {os.getloadavg()[0]:.1f})"
            )
            for i, row in enumerate(rows, 1):
                print(
                    f"{i:>5} {row['check_s']:>7.2f}s {row['handover_s']:>8.2f}s {row['cpu_s']:>7.2f}s "
                    f"{row['gap_s']:>7.2f}s {row['request_s']:>7.2f}s {row['answers']:>8} {row['errors']:>7} "
                    f"{row['restarted']:>10}"
                )
            client.stop(["chatty"])
            lost = 0
            for i in range(args.chatty):
                log = Path(folder) / ".supervisor" / "logs" / f"chatty-{i}.out.log"
                numbers = [int(line.split()[1]) for line in log.read_text().splitlines()]
                lost += numbers != list(range(1, len(numbers) + 1))
            print(f"chatty logs with a line missing or twice: {lost} of {args.chatty}")
            text = (Path(folder) / "service.log").read_text()
            for match in re.finditer(r"answering ([\d.]+)s after .* \(([\d.]+)s to import\)", text):
                total, imported = float(match.group(1)), float(match.group(2))
                print(f"from the state written: import {imported:.2f}s, adopt {total - imported:.2f}s")
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
