"""`supervisor reexec` with 1,000 instances running: how long, how long a polling client waits.

A real `supervisor run` (a subprocess, as a user runs it) supervises N instances of ``sleep``
(and a few chatty ones that write numbered lines all along). Once every one runs, a thread
asks for the status of every instance every 10 ms (one connection per request, as
`supervisor status` does) while this script sends ``POST /v1/reexec``. Measured:

- the check: from the request to its 202 answer (the new code runs in a subprocess on a copy
  of the state; the old service serves meanwhile);
- the handover: from the 202 answer until the new service answers status with all N
  instances (the old one stops taking requests, execs; the new one imports, listens, adopts),
  and the CPU time (user + system) the service process spent in it, read from /proc (it counts
  on across execve): on a shared, loaded machine the steadier figure;
- in it, from the service's own log: from the handover's start until the old service wrote its
  state ("old side", where the log says it), from then until the new code had read the state
  after its first imports ("import"), and from there to answering (where the log says so, split
  into "serve the socket": the control plane's imports and app, and "adopt": building the
  instances from the state, after which status answers with all of them; and how much later
  every instance had resumed its watch), with the state's size and the service's own CPU time
  from the handover's start until it answered and until every watch had resumed;
- the longest gap the polling client sees between two answers, and its longest single request;
- the client's errors (target 0), and the instances restarted (same pid and start time: target 0);
- every numbered line of the chatty instances present exactly once in their logs.

Each service runs with bytecode caching on (``PYTHONDONTWRITEBYTECODE`` dropped from its
environment), as an installed package has its ``.pyc`` files: else each re-exec would compile
our modules again and the figures would measure the compiler.

``--baseline DIR`` runs an older tree of ours too (DIR holds its ``supervisor`` package, e.g.
``git archive main supervisor | tar -x -C DIR``), with this venv's interpreter and packages
(``PYTHONPATH=DIR``, which the re-exec keeps): both services run side by side, and their
rounds alternate, so that both see the same load.

Target: the handover under 1 s, 0 restarted, 0 errors.

Usage: python bench/reexec.py [--instances 1000] [--chatty 5] [--rounds 3] [--baseline DIR]
                              [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.api.client import Client, ClientError

CHATTY = "i=0; while :; do i=$((i+1)); echo \"n $i\"; case $i in *00) sleep 0.01;; esac; done"
#: What the new service logs once it answers (the baseline's too), and, where it says so, how long
#: it took to serve its socket and then to adopt, and the old service from the handover's start
#: to writing its state.
ANSWERING = re.compile(r"answering ([\d.]+)s after .* \(([\d.]+)s to import[;)]")
SPLIT = re.compile(
    r"then ([\d.]+)s until the socket was served, ([\d.]+)s adopting\); "
    r"every instance resumed ([\d.]+)s later"
)
SIZE = re.compile(r"the state took (\d+) bytes")
CPU = re.compile(r"CPU since the handover began: ([\d.]+)s until answering, ([\d.]+)s until every")
OLD_SIDE = re.compile(r"re-exec: the old service wrote its state ([\d.]+)s after the handover began")


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


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time: it goes on counting across execve (same process)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Tree:
    """One service under test: this checkout's code, or a baseline tree's."""

    label: str
    baseline: Path | None
    folder: Path
    service: subprocess.Popen[bytes] | None = None
    rows: list[dict[str, float | int]] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.folder / ".supervisor" / "control.sock"

    @property
    def log(self) -> Path:
        return self.folder / "service.log"

    def start(self, instances: int, chatty: int) -> Client:
        env = dict(os.environ)
        # Bytecode cached as an installed package has it (pip compiles at install time): else every
        # re-exec compiles our modules again, and the figures measure the compiler.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if self.baseline is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.baseline), env.get("PYTHONPATH")]))
        path = manifest(self.folder, instances, chatty)
        with open(self.log, "wb") as log:
            self.service = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "run", "-f", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                cwd=self.folder,  # not this checkout: `-m` puts the working folder first in sys.path
            )
        client = Client(self.socket, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.health()
                break
            except ClientError:
                if time.monotonic() > deadline or self.service.poll() is not None:
                    raise SystemExit(f"{self.label}: the service did not answer") from None
                time.sleep(0.05)
        answer = client.wait([], "running", all=True, timeout=120)
        assert answer["ok"], answer
        return client

    def one_round(self, client: Client, instances: int) -> None:
        assert self.service is not None
        handoffs = client.health()["handoffs"]
        before = {s["name"]: (s["pid"], s["started_at"], s["restarts"]) for s in client.status()}
        poller = Poller(self.socket)
        poller.start()
        asked = time.monotonic()
        client.reexec()
        answered = time.monotonic()
        cpu = cpu_seconds(self.service.pid)
        while True:
            health = client.health()
            if health["handoffs"] > handoffs:
                statuses = client.status()
                if len(statuses) == instances:
                    break
            if health.get("handoff_error"):
                raise SystemExit(f"{self.label}: reexec failed: {health['handoff_error']}")
        done = time.monotonic()
        cpu = cpu_seconds(self.service.pid) - cpu
        poller.stop.set()
        poller.join()
        after = {s["name"]: (s["pid"], s["started_at"], s["restarts"]) for s in statuses}
        self.rows.append(
            {
                "check_s": answered - asked,
                "handover_s": done - answered,
                "cpu_s": cpu,
                "gap_s": poller.longest_gap,
                "request_s": poller.longest_request,
                "errors": len(poller.errors),
                "answers": poller.answers,
                "restarted": sum(1 for name, facts in before.items() if after.get(name) != facts),
            }
        )

    def lost_lines(self, client: Client, chatty: int) -> int:
        client.stop(["chatty"])
        lost = 0
        for i in range(chatty):
            log = self.folder / ".supervisor" / "logs" / f"chatty-{i}.out.log"
            numbers = [int(line.split()[1]) for line in log.read_text().splitlines()]
            lost += numbers != list(range(1, len(numbers) + 1))
        return lost

    def phases(self) -> list[str]:
        text = self.log.read_text()
        old = [float(m.group(1)) for m in OLD_SIDE.finditer(text)]
        lines = []
        split = [(float(m.group(1)), float(m.group(2)), float(m.group(3))) for m in SPLIT.finditer(text)]
        cpu = [(float(m.group(1)), float(m.group(2))) for m in CPU.finditer(text)]
        for i, match in enumerate(ANSWERING.finditer(text)):
            total, imported = float(match.group(1)), float(match.group(2))
            side = f"old side {old[i]:.2f}s, " if i < len(old) else ""
            rest = f"adopt {total - imported:.2f}s"
            if i < len(split):
                served, built, resumed = split[i]
                rest = f"serve the socket {served:.2f}s, adopt {built:.2f}s"
                rest += f" (every watch resumed {resumed:.2f}s later)"
            size = SIZE.search(text, match.end())
            if size is not None and size.start() - match.end() < 200:  # on the same line
                rest += f"; state {int(size.group(1)) / 1024:.0f} KiB"
            if i < len(cpu):
                rest += f"; CPU {cpu[i][0]:.2f}s until answering, {cpu[i][1]:.2f}s until every watch resumed"
            lines.append(f"{side}import {imported:.2f}s, {rest}")
        return lines

    def stop(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            self.service.wait(timeout=120)


def report(trees: list[Tree]) -> None:
    print(
        f"{'tree':>8} {'round':>5} {'check':>8} {'handover':>9} {'its CPU':>8} {'gap':>8} {'request':>8} "
        f"{'answers':>8} {'errors':>7} {'restarted':>10}   (load {os.getloadavg()[0]:.1f})"
    )
    for tree in trees:
        for i, row in enumerate(tree.rows, 1):
            print(
                f"{tree.label:>8} {i:>5} {row['check_s']:>7.2f}s {row['handover_s']:>8.2f}s "
                f"{row['cpu_s']:>7.2f}s {row['gap_s']:>7.2f}s {row['request_s']:>7.2f}s {row['answers']:>8} "
                f"{row['errors']:>7} {row['restarted']:>10}"
            )
    if len(trees) == 2 and trees[0].rows:
        (before, after) = trees
        for key, what in (("handover_s", "handover"), ("cpu_s", "its CPU")):
            old = statistics.median(float(r[key]) for r in before.rows)
            new = statistics.median(float(r[key]) for r in after.rows)
            print(f"median {what}: {before.label} {old:.2f}s, {after.label} {new:.2f}s ({old / new:.1f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--chatty", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="an older tree of ours, run side by side")
    parser.add_argument("--keep-logs", type=Path, help="copy each service's own log into this folder")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as folder:
        trees = [Tree("after", None, Path(folder) / "after")]
        if args.baseline is not None:
            trees.insert(0, Tree("before", args.baseline.resolve(), Path(folder) / "before"))
        try:
            clients = []
            for tree in trees:
                tree.folder.mkdir()
                clients.append(tree.start(args.instances, args.chatty))
                print(f"{tree.label}: {args.instances} instances running ({args.chatty} chatty)")
            for _ in range(args.rounds):  # alternating: both trees see the same load
                for tree, client in zip(trees, clients, strict=True):
                    tree.one_round(client, args.instances)
            report(trees)
            for tree, client in zip(trees, clients, strict=True):
                lost = tree.lost_lines(client, args.chatty)
                print(f"{tree.label}: chatty logs with a line missing or twice: {lost} of {args.chatty}")
                for i, line in enumerate(tree.phases(), 1):
                    print(f"{tree.label}: round {i}, from the 202: {line}")
        finally:
            for tree in trees:
                tree.stop()
                if args.keep_logs is not None:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    if tree.log.exists():
                        shutil.copy(tree.log, args.keep_logs / f"{tree.label}.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
