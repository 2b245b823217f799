"""Chaos: kill -9 a random instance every 100 ms, with stuck log followers and a reload storm.

A real `supervisor run` (a subprocess, as a user runs it) supervises 50 ``workers``
(a shell with a background child each: the group is killed when the leader dies), a
``talker`` writing 100 KB/s to its log, and a ``flipper`` whose environment every
reload changes. For N minutes (default 5), at the same time:

- every 100 ms, one running worker chosen at random gets SIGKILL (its leader, by pid,
  checked to be the service's child first);
- ``--followers`` clients (default 4) open ``GET /v1/instances/talker/logs?follow=true``
  and never read a byte;
- every ``--reload-every`` seconds (default 1) the manifest is rewritten with the
  flipper's environment changed, and ``POST /v1/reload`` applied.

An event-stream reader measures, per worker, the time from leaving ``running`` to
being ``running`` again (the longest is "down"). Every 2 s the service's zombies
(children in state Z), fds, threads and RSS are sampled; the report gives them at
the start and the end, and the least-squares slope per minute. After a SIGTERM it
checks that no process of the run is left.

``--graph`` adds the service graph and its checks to the same storm: 8 small HTTP servers
(ready and alive by http, every 100 and 200 ms), each with a dependent on its port (ready and
alive by tcp; ``depends_on: {condition: ready, restart: true}``), 10 instances with exec
probes every 100 ms, 5 that speak sd_notify with a 2 s watchdog, 5 ready by a line of their
log, a one-shot ``job`` and 10 ``fleet`` replicas that wait for it to complete and for the
first server to be ready (their environment changes at every reload, so each reload replaces
all ten). Each round also kills one running instance of the graph at random. At the end, after
the storm stops, every instance must be running again (the states are printed).

Usage: python bench/chaos.py [--minutes 5] [--followers 4] [--reload-every 1] [--graph]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.api.client import Client, ClientError, connect_unix

SUPERVISOR = Path(sys.executable).parent / "supervisor"
WORKERS = 50
MARKER = "3600.125"  # the workers' sleep, to find leftovers at the end
TALKER = "import sys, time\nline = 'x' * 99 + '\\n'\nwhile True:\n    sys.stdout.write(line * 100)\n" + (
    "    sys.stdout.flush()\n    time.sleep(0.1)\n"
)


RESTART = (
    "{policy: always, min_uptime: 0, max_restarts: 1000000, backoff: {initial: 10ms, factor: 1, max: 10ms}}"
)
SERVER = (
    "import http.server, sys\n"
    "class Handler(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
    "    def log_message(self, *args): pass\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), Handler).serve_forever()\n"
)
NOTIFIER = (
    "import os, socket, time\n"
    "address = os.environ['NOTIFY_SOCKET'].replace('@', '\\0', 1)\n"
    "sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "while True:\n"
    "    sock.sendto(b'READY=1\\nWATCHDOG=1', address)\n"
    "    time.sleep(0.5)\n"
)


GRAPH_TARGETS = [
    *(f"srv{i}" for i in range(8)),
    *(f"tcp{i}" for i in range(8)),
    *(f"exec{i}" for i in range(10)),
    *(f"notify{i}" for i in range(5)),
    *(f"line{i}" for i in range(5)),
    *(f"fleet-{i}" for i in range(10)),
]


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the kernel's choice), for the graph's servers."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def graph_entries(ports: list[int], generation: int) -> list[str]:
    """The ``--graph`` part of the manifest, one entry a line (flow style)."""
    python = json.dumps(sys.executable)
    entries = []
    for i, port in enumerate(ports):
        url = f"http://127.0.0.1:{port}/"
        entries.append(
            f"srv{i}: {{command: [{python}, -c, {json.dumps(SERVER)}, '{port}'], restart: {RESTART},"
            f" ready: {{http: '{url}', interval: 100ms, start_timeout: 20s}},"
            f" alive: {{http: '{url}', interval: 200ms, failure_threshold: 2}}}}"
        )
        entries.append(
            f"tcp{i}: {{command: [sleep, '{MARKER}'], restart: {RESTART},"
            f" depends_on: {{srv{i}: {{condition: ready, restart: true}}}},"
            f" ready: {{tcp: '127.0.0.1:{port}', interval: 100ms}},"
            f" alive: {{tcp: '127.0.0.1:{port}', interval: 200ms}}}}"
        )
    for i in range(10):
        entries.append(
            f"exec{i}: {{command: [sleep, '{MARKER}'], restart: {RESTART},"
            " ready: {exec: [true], interval: 100ms}, alive: {exec: [true], interval: 100ms}}"
        )
    for i in range(5):
        entries.append(
            f"notify{i}: {{command: [{python}, -c, {json.dumps(NOTIFIER)}], restart: {RESTART},"
            " ready: {notify: true}, watchdog: 2s}"
        )
        entries.append(
            f"line{i}: {{command: [sh, -c, 'echo listening on port {i}; exec sleep {MARKER}'],"
            f" restart: {RESTART},"
            " ready: {log: 'listening on port \\d+'}}"
        )
    entries.append("job: {command: [sh, -c, 'exit 0'], restart: {policy: 'no', min_uptime: 0}}")
    entries.append(
        f"fleet: {{command: [sleep, '{MARKER}'], replicas: 10, restart: {RESTART},"
        f" env: {{GENERATION: '{generation}'}},"
        " depends_on: {job: {condition: completed}, srv0: {condition: ready, restart: true}}}"
    )
    return entries


def write_manifest(path: Path, generation: int, ports: list[int] | None = None) -> None:
    graph = "".join(f"\n  {entry}" for entry in graph_entries(ports, generation)) if ports else ""
    path.write_text(
        textwrap.dedent(
            f"""
            version: 1
            supervisor: {{shutdown_timeout: 30s}}
            instances:
              worker:
                command: ["sh", "-c", "sleep {MARKER} & wait"]
                replicas: {WORKERS}
                restart: {RESTART}
              talker:
                command: [{json.dumps(sys.executable)}, "-c", {json.dumps(TALKER)}]
                restart: {{min_uptime: 0}}
                logs: {{max_bytes: 10MB, backups: 1}}
              flipper:
                command: ["sleep", "{MARKER}"]
                env: {{GENERATION: "{generation}"}}
                restart: {{min_uptime: 0}}
            """
        )
        + graph
        + "\n"
    )


@dataclass
class Watch:
    """What the event stream tells: pids, who is down since when, the longest time down."""

    pids: dict[str, int] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    down_since: dict[str, float] = field(default_factory=dict)
    longest_down: float = 0.0
    longest_name: str = ""
    restarts: int = 0
    events: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, event: dict[str, object]) -> None:
        name, to = str(event.get("instance")), event.get("to_state")
        at = float(event.get("at") or time.time())  # type: ignore[arg-type]
        with self.lock:
            self.events += 1
            if isinstance(event.get("pid"), int):
                self.pids[name] = int(event["pid"])  # type: ignore[call-overload]
            if not name.startswith("worker"):
                return
            if to == "running":
                self.running.add(name)
                since = self.down_since.pop(name, None)
                if since is not None and at - since > self.longest_down:
                    self.longest_down, self.longest_name = at - since, name
            elif name in self.running:
                self.running.discard(name)
                self.down_since[name] = at
            if to == "starting" and event.get("from_state") != "stopped":
                self.restarts += 1


def read_events(address: Path, watch: Watch, stop: threading.Event) -> None:
    sock = connect_unix(address)
    sock.sendall(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
    sock.settimeout(0.5)
    pending = b""
    while not stop.is_set():
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data: {"):
                watch.feed(json.loads(line[6:]))
    sock.close()


def stuck_follower(address: Path) -> socket.socket:
    sock = connect_unix(address)
    sock.sendall(b"GET /v1/instances/talker/logs?follow=true&lines=10 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return sock  # never read


def sample(pid: int) -> dict[str, float]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    children: list[str] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children += Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
    zombies = 0
    for child in children:
        try:
            zombies += Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except OSError:
            continue
    return {
        "t": time.monotonic(),
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "zombies": zombies,
    }


def slope_per_minute(samples: list[dict[str, float]], key: str) -> float:
    ts = [s["t"] for s in samples]
    ys = [s[key] for s in samples]
    mean_t, mean_y = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mean_t) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / var


def is_child_of(pid: int, parent: int) -> bool:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1]) == parent
    except (OSError, ValueError, IndexError):
        return False


def leftovers() -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if MARKER.encode() in argv:
                found.append(int(entry.name))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--followers", type=int, default=4)
    parser.add_argument("--reload-every", type=float, default=1.0)
    parser.add_argument("--graph", action="store_true", help="add the service graph and its checks")
    args = parser.parse_args()
    ports = free_ports(8) if args.graph else None

    with tempfile.TemporaryDirectory(prefix="chaos-") as folder:
        manifest = Path(folder) / "supervisor.yaml"
        write_manifest(manifest, 0, ports)
        log = open(Path(folder) / "service.log", "wb")  # noqa: SIM115
        service = subprocess.Popen([str(SUPERVISOR), "run", "-f", str(manifest)], stdout=log, stderr=log)
        address = Path(folder) / ".supervisor" / "control.sock"
        try:
            client = Client(address, timeout=30)
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.health()
                    break
                except ClientError:
                    if time.monotonic() > deadline or service.poll() is not None:
                        log.close()
                        text = (Path(folder) / "service.log").read_text()
                        raise SystemExit(f"chaos: the service did not come up:\n{text}") from None
                    time.sleep(0.05)
            everyone = ["worker-*", "talker", "flipper", *(GRAPH_TARGETS if args.graph else [])]
            if not client.wait(everyone, "running", timeout=60)["ok"]:
                raise SystemExit("chaos: the instances did not all run")

            watch, stop = Watch(), threading.Event()
            reader = threading.Thread(target=read_events, args=(address, watch, stop), daemon=True)
            reader.start()
            for status in client.status():
                watch.feed({"instance": status["name"], "to_state": status["state"], "pid": status["pid"]})
            followers = [stuck_follower(address) for _ in range(args.followers)]
            samples = [sample(service.pid)]
            kills = graph_kills = reloads = reload_errors = 0
            began = time.monotonic()
            end = began + args.minutes * 60
            next_sample, next_reload = began + 2, began + args.reload_every
            while (now := time.monotonic()) < end:
                with watch.lock:
                    targets = sorted(name for name in watch.running if name.startswith("worker"))
                    pid = watch.pids.get(random.choice(targets)) if targets else None
                if pid is not None and is_child_of(pid, service.pid):
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                if args.graph:
                    with watch.lock:
                        pid = watch.pids.get(random.choice(GRAPH_TARGETS))
                    if pid is not None and is_child_of(pid, service.pid):
                        os.kill(pid, signal.SIGKILL)
                        graph_kills += 1
                if now >= next_reload:
                    next_reload += args.reload_every
                    reloads += 1
                    write_manifest(manifest, reloads, ports)
                    try:
                        client.request("POST", "/v1/reload")
                    except ClientError as exc:
                        reload_errors += 1
                        print(f"chaos: reload failed: {exc}", file=sys.stderr)
                if now >= next_sample:
                    next_sample += 2
                    samples.append(sample(service.pid))
                time.sleep(0.1)
            samples.append(sample(service.pid))
            elapsed = time.monotonic() - began
            came_back = client.wait(everyone, "running", timeout=25)["ok"]  # under the client's 30 s
            states: dict[str, int] = {}
            for status in client.status():
                states[status["state"]] = states.get(status["state"], 0) + 1
            stop.set()
            for sock in followers:
                sock.close()
            service.send_signal(signal.SIGTERM)
            code = service.wait(timeout=120)
            reader.join(timeout=5)
            log.close()
        finally:  # a failure above must not leave the service and its instances running
            if service.poll() is None:
                service.send_signal(signal.SIGTERM)
                service.wait(timeout=120)
        left = leftovers()

    first, last = samples[0], samples[-1]
    print(f"# chaos: {platform.python_version()}, {os.cpu_count()} cores, {elapsed / 60:.1f} min")
    print(f"kills {kills}, restarts {watch.restarts}, reloads {reloads} ({reload_errors} failed), "
          f"events {watch.events}, stuck followers {args.followers}")
    print(f"longest down {watch.longest_down * 1e3:.0f} ms ({watch.longest_name})")
    if args.graph:
        print(f"graph: {graph_kills} kills of its instances; all running again after the storm: {came_back}")
    print("states after the storm: " + ", ".join(f"{n} {state}" for state, n in sorted(states.items())))
    print("| figure | start | end | max | slope per minute |")
    print("| --- | --- | --- | --- | --- |")
    for key in ("zombies", "fds", "threads", "rss_mb"):
        peak, slope = max(s[key] for s in samples), slope_per_minute(samples, key)
        print(f"| {key} | {first[key]:.4g} | {last[key]:.4g} | {peak:.4g} | {slope:+.2f} |")
    print(f"service exit status {code}; processes left after it: {len(left)}")


if __name__ == "__main__":
    main()
