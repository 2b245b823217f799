"""The service graph's three figures, each side by side with what it is measured against.

1. **Critical path.** 100 instances in a graph of depth 10 (ten levels of ten; each
   instance depends on every instance of the level above, condition ready), each ready
   by sd_notify 100 ms after its process started (a small C program, bench/notify_ready.c,
   so that a hundred interpreters starting on two cores are not what is measured). The
   instances are not autostarted: once the service answers and this script listens to
   its events, `start --all` asks for all 100 at once, and the time until the last is
   ready is set against the critical path (10 × 100 ms). Target: ≤ 1.3×.
2. **READY=1 → ready event.** Each instance writes the time it sends READY=1 to its
   log; the script reads the `ready` update events off the event stream and prints the
   latency, median and p99. Target: ≤ 5 ms median.
3. **HTTP probing cost.** 100 instances of `sleep`, each with a liveness check over
   http once a second against one local server (a thread in this script): the
   service's CPU over 30 s, in percent of one core, against the same 100 instances
   with no check (the idle floor) in the same run. Target: ≤ 2 % of one core.

`--only probes` runs the third part alone. `--baseline DIR` runs every part also for an older
tree of ours (DIR holds its `supervisor` package, e.g. `git archive main supervisor | tar -x -C
DIR`), with this venv's interpreter and packages, the two services taking turns (the graph
round by round; the probing `--rounds` each): before and after side by side, in the same run,
on the same machine load.

The graph is run `--graph-rounds` times (the median is the figure), and as many times again
autostarted, from spawning `supervisor run` (the issue's wording): that figure has the service's
start-up (imports, the manifest, the socket: bench/memory.py's cold start) before its first level.

Usage: python bench/graph.py [--levels 10] [--width 10] [--delay 0.1] [--probe-seconds 30]
                             [--only graph|probes] [--baseline DIR] [--rounds 2] [--probe tcp|http]
                             [--graph-rounds 3]
"""

from __future__ import annotations

import argparse
import http.server
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from supervisor.api.client import Client, ClientError

SUPERVISOR = Path(sys.executable).parent / "supervisor"
TICKS = os.sysconf("SC_CLK_TCK")

HERE = Path(__file__).resolve().parent


def build_program(folder: Path) -> Path:
    """notify_ready.c, compiled here: the instance's own start-up must not be what is measured."""
    binary = folder / "notify_ready"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(HERE / "notify_ready.c")], check=True)
    return binary


# An older tree's CLI, with this venv's packages (as bench/memory.py runs it).
BOOT = (
    "import sys; tree = sys.argv.pop(1); sys.path.insert(0, tree); "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(f).lower()]; "
    "from supervisor.cli import main; sys.exit(main())"
)


def command(baseline: Path | None) -> list[str]:
    return [str(SUPERVISOR)] if baseline is None else [sys.executable, "-c", BOOT, str(baseline)]


def start(path: Path, baseline: Path | None = None) -> tuple[subprocess.Popen[bytes], Client, float]:
    began = time.time()
    service = subprocess.Popen(
        [*command(baseline), "run", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = Client(path.parent / ".supervisor" / "control.sock", timeout=60)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.health()
            return service, client, began
        except ClientError:
            if time.monotonic() > deadline or service.poll() is not None:
                raise SystemExit("bench: the service did not come up") from None
            time.sleep(0.005)


def stop(service: subprocess.Popen[bytes]) -> None:
    service.send_signal(signal.SIGTERM)
    service.wait(timeout=120)


def graph_manifest(folder: Path, levels: int, width: int, delay: float, *, autostart: bool = False) -> Path:
    program = build_program(folder)
    lines = ["version: 1", "supervisor: {shutdown_timeout: 60s}", "instances:"]
    for level in range(levels):
        deps = f", depends_on: [l{level - 1}]" if level else ""
        auto = str(autostart).lower()
        lines.append(
            f"  l{level}: {{command: [{str(program)!r}, '{delay}'], replicas: {width},"
            f" ready: {{notify: true}}, restart: {{min_uptime: 0}}, autostart: {auto}{deps}}}"
        )
    path = folder / "supervisor.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def critical_path(levels: int, width: int, delay: float, baseline: Path | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        path = graph_manifest(Path(tmp), levels, width, delay)
        ready_at: dict[str, float] = {}
        service, client, _ = start(path, baseline)
        try:
            with client.events() as events:
                # Subscribed first, then started: no ready event can come before we listen.
                began = time.time()
                client.start(all=True, wait=False)
                for event in events:
                    if event.get("kind") == "ready" and event.get("ok"):
                        ready_at[event["instance"]] = event["at"]
                        if len(ready_at) == levels * width:
                            done = time.time()
                            break
            latencies = []
            for name, at in ready_at.items():
                text = client.logs(name, lines=5).decode()
                sent = next(float(line.split()[1]) for line in text.splitlines() if "ready-sent" in line)
                latencies.append(at - sent)
        finally:
            stop(service)
    latencies.sort()
    return {
        "total": done - began,
        "median_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
    }


def from_run(levels: int, width: int, delay: float, baseline: Path | None = None) -> dict[str, float]:
    """The same graph autostarted: from spawning ``supervisor run`` until the last level is ready.

    What the issue's wording measures: the service's own start-up (imports, the manifest, the
    socket; bench/memory.py's cold start) comes before the first level, on top of the graph.
    The service's own wait answers when the last level is ready (no polling); the first answer
    of its socket is the start-up's end.
    """
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        path = graph_manifest(Path(tmp), levels, width, delay, autostart=True)
        service, client, began = start(path, baseline)
        try:
            answered = time.time()
            result = client.wait([f"l{levels - 1}"], "ready", timeout=60)
            done = time.time()
            if not result.get("ok"):
                raise SystemExit(f"bench: the graph did not come up: {result}")
        finally:
            stop(service)
    return {"total": done - began, "startup": answered - began}


def probing_cpu(instances: int, seconds: float, check: str | None, baseline: Path | None = None) -> float:
    """The service's CPU in percent of one core over ``seconds``, ``instances`` each with ``check``."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        alive = f"alive: {{{check}, interval: 1s}}" if check else ""
        path = Path(tmp) / "supervisor.yaml"
        path.write_text(
            textwrap.dedent(
                f"""
                version: 1
                instances:
                  idle:
                    command: [sleep, "3600"]
                    replicas: {instances}
                    restart: {{min_uptime: 0}}
                    {alive}
                """
            )
        )
        service, client, _ = start(path, baseline)
        try:
            client.wait(["idle"], "running", timeout=60)
            time.sleep(2)  # the first probes, and the start's own work, settle
            before = cpu_ticks(service.pid)
            time.sleep(seconds)
            used = (cpu_ticks(service.pid) - before) / TICKS
        finally:
            stop(service)
    return 100 * used / seconds


def probes_side_by_side(args: argparse.Namespace, port: int) -> None:
    """Idle floor, then before (``--baseline``) and after taking turns: the same load for both."""
    check = f"http: 'http://127.0.0.1:{port}/'" if args.probe == "http" else f"tcp: '127.0.0.1:{port}'"
    n, seconds = args.probe_instances, args.probe_seconds
    idle = probing_cpu(n, seconds, None)
    trees: dict[str, Path | None] = {"after": None}
    if args.baseline is not None:
        trees = {"before": args.baseline.resolve(), **trees}
    figures: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            figures[name].append(probing_cpu(n, seconds, check, tree))
    print(f"{n} instances, {args.probe} liveness every 1 s, {seconds:g} s a round, {args.rounds} rounds:")
    print(f"  no checks: {idle:.2f} % of a core")
    for name, values in figures.items():
        mid = statistics.median(values)
        per_probe = mid / 100 / n * 1e6  # CPU seconds per second over probes per second, in µs
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {name}: {mid:.2f} % of a core (rounds: {rounds}), {per_probe:.0f} µs of CPU a probe")
    if "before" in figures:
        ratio = statistics.median(figures["after"]) / statistics.median(figures["before"])
        print(f"  after / before: {ratio:.2f}")
    print("  target <= 2 %")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class _Health(http.server.BaseHTTPRequestHandler):
    """What a health route answers: 200 and two bytes, nothing logged."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    """One server standing in for a hundred: a listen backlog for all of them.

    The default backlog, 5, drops connects when probes come together (a dropped SYN
    is retried after 1 s); a probe cut by the service's stop is not worth a traceback.
    """

    request_queue_size = 1024

    def handle_error(self, request: object, client_address: object) -> None:
        pass


Figures = list[dict[str, float]]


def _report_graph(label: str, path: float, runs: Figures, cold: Figures) -> None:
    ratios = sorted(run["total"] / path for run in runs)
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    print(
        f"  {label}from `start --all` to all ready: ratio to the critical path ({path:.2f} s) median "
        f"{statistics.median(ratios):.2f} (rounds: {rounds}; target <= 1.3)"
    )
    latencies = sorted(run["median_ms"] for run in runs)
    worst = max(run["p99_ms"] for run in runs)
    print(
        f"  {label}READY=1 -> ready event: median {statistics.median(latencies):.2f} ms,"
        f" p99 (worst round) {worst:.2f} ms (target: median <= 5 ms)"
    )
    totals = sorted(run["total"] / path for run in cold)
    startup = statistics.median(run["startup"] for run in cold)
    print(
        f"  {label}from spawning `supervisor run` (autostart) to all ready: ratio median "
        f"{statistics.median(totals):.2f} (rounds: {', '.join(f'{r:.2f}' for r in totals)}), of which "
        f"the service's start-up until its socket answered: median {startup * 1e3:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", type=int, default=10)
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--probe-instances", type=int, default=100)
    parser.add_argument("--probe-seconds", type=float, default=30)
    parser.add_argument("--probe", choices=["http", "tcp"], default="http")
    parser.add_argument("--only", choices=["graph", "probes"])
    parser.add_argument("--baseline", type=Path, help="an older tree of ours to compare with, side by side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--graph-rounds", type=int, default=3, help="runs of each graph figure (median)")
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} cpus, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}, "
        f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    if args.only != "probes":
        delay_ms = args.delay * 1e3
        print(f"graph: {args.levels} levels x {args.width}, ready by sd_notify {delay_ms:.0f} ms after start")
        trees: list[tuple[str, Path | None]] = [("", None)]
        if args.baseline is not None:  # both trees, round by round: the same load for both
            trees = [("before: ", args.baseline), ("after: ", None)]
        figures: dict[str, tuple[Figures, Figures]] = {label: ([], []) for label, _ in trees}
        for _ in range(args.graph_rounds):
            for label, tree in trees:
                figures[label][0].append(critical_path(args.levels, args.width, args.delay, tree))
        for _ in range(args.graph_rounds):
            for label, tree in trees:
                figures[label][1].append(from_run(args.levels, args.width, args.delay, tree))
        for label, (runs, cold) in figures.items():
            _report_graph(label, args.levels * args.delay, runs, cold)
    if args.only != "graph":
        server = _Server(("127.0.0.1", 0), _Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        probes_side_by_side(args, server.server_address[1])
        server.shutdown()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
