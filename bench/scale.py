"""Ours against supervisord 4.3 at 1,000 to 10,000 instances of `sleep`, every figure in one run.

For each size N, each service in turn (never both at once), from a cold start:

- **all running**: from starting the service until every instance is running (ours: the
  server-side ``POST /v1/instances/wait``; supervisord: ``getAllProcessInfo`` polled);
- **RSS** of the service once all run, and the **slope** per instance between sizes;
- **threads** of the service (``/proc/PID/task``);
- **idle CPU**: clock ticks the service used over ``--idle`` seconds with nobody asking;
- **status latency**: the status of all N over the API (ours: ``GET /v1/instances``;
  supervisord: the XML-RPC ``getAllProcessInfo``), and the whole CLI command
  (``supervisor status`` / ``supervisorctl status``), medians of ``--runs``;
- **reload of one changed instance**: an extra entry ``one`` gets a new command; ours:
  ``POST /v1/reload``; supervisord: ``supervisorctl update`` (reread + restart of what
  changed), until the answer;
- **shutdown**: SIGTERM until the service exits, and what is left behind (processes
  whose command line carries this run's marker).

Ours captures nothing (``stdout: null``, ``stderr: null``: one descriptor per instance,
its pidfd); ``--streams merged`` or ``log`` capture (2 or 3 per instance; see
docs/performance.md). supervisord is pip-installed into a venv of its own by
``bench/cli.py``'s code, with ``stdout_logfile=NONE`` and ``stderr_logfile=NONE``;
it still keeps its stdio pipes per process, so it runs out of descriptors sooner
(``minfds`` is set to the hard limit): a size it cannot start is reported as such.

``--baseline DIR`` also runs ours from an older tree (DIR holds its ``supervisor`` package,
e.g. ``git archive main supervisor | tar -x -C DIR``) with this venv's interpreter and packages,
right before ours at each size: before and after side by side, in one run.

Usage: python bench/scale.py [--sizes 1000,5000,10000] [--idle 30] [--runs 10]
       [--streams null|merged|log] [--only ours|supervisord] [--supervisord-venv DIR]
       [--baseline DIR]
"""

from __future__ import annotations

import argparse
import http.client
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli import OURS, environment, install_supervisord, machine, percentile, supervisord_conf

from supervisor.api.client import Client, ClientError

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    """One service at one size."""

    size: int
    error: str | None = None
    all_running: float | None = None
    rss_kib: int | None = None
    threads: int | None = None
    idle_ticks: int | None = None
    status_api: list[float] = field(default_factory=list)
    status_cli: list[float] = field(default_factory=list)
    reload: float | None = None
    shutdown: float | None = None
    left_behind: int | None = None
    fds: int | None = None


# -- /proc ---------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"bench: no VmRSS for {pid}")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def with_marker(marker: str) -> list[int]:
    """Pids whose command line carries ``marker`` (what a service leaves behind)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    found.append(int(name))
            except OSError:
                continue
    return found


def idle_ticks(pid: int, seconds: float) -> int:
    before = cpu_ticks(pid)
    time.sleep(seconds)
    return cpu_ticks(pid) - before


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def stop(proc: subprocess.Popen[bytes], timeout: float = 120) -> float:
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=timeout)
    return time.perf_counter() - started


def run_cli(argv: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(argv, capture_output=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {result.returncode}: {result.stderr.decode()[-500:]}")


# -- ours ----------------------------------------------------------------------------------------


def our_manifest(folder: Path, size: int, marker: str, streams: str, one: str) -> Path:
    captured = {"null": "stdout: null\n    stderr: null", "merged": "stderr: stdout", "log": ""}[streams]
    text = textwrap.dedent(
        f"""
        version: 1
        instances:
          sleep:
            command: ["sleep", "{marker}"]
            replicas: {size - 1}
            restart: {{min_uptime: 0}}
            STREAMS
          one:
            command: ["sleep", "{one}"]
            restart: {{min_uptime: 0}}
            STREAMS
        """
    ).replace("STREAMS", captured)
    path = folder / "supervisor.yaml"
    path.write_text(text)
    return path


def ours(size: int, args: argparse.Namespace, folder: Path, marker: str, tree: Path | None = None) -> Row:
    """``tree``: a folder holding an older ``supervisor`` package to run instead (``--baseline``)."""
    row = Row(size)
    folder.mkdir()
    manifest = our_manifest(folder, size, marker, args.streams, f"{marker}1")
    sock = folder / ".supervisor" / "control.sock"
    env = environment()
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    log = (folder / "service.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen([str(OURS), "run", "-f", str(manifest)], stdout=log, stderr=log, env=env)
    try:
        client = Client(sock, timeout=600)
        while True:  # until the socket answers (bound once the instances exist)
            try:
                client.health()
                break
            except ClientError:
                if proc.poll() is not None:
                    row.error = f"exited {proc.returncode}: {(folder / 'service.log').read_text()[-300:]}"
                    return row
                time.sleep(0.01)
        answer = client.wait(["sleep", "one"], "running", timeout=600)  # every instance, server-side
        row.all_running = time.perf_counter() - started
        if not answer.get("ok"):
            row.error = f"not all running: {str(answer)[:300]}"
        row.rss_kib, row.threads, row.fds = rss_kib(proc.pid), threads(proc.pid), fds(proc.pid)
        row.idle_ticks = idle_ticks(proc.pid, args.idle)
        statuses = client.status()
        assert len(statuses) == size, len(statuses)
        cli = [str(OURS), "status", "-s", str(sock)]
        run_cli(cli, env)  # warm-up: bytecode
        for _ in range(args.runs):
            row.status_api.append(timed(client.status))
            row.status_cli.append(timed(lambda: run_cli(cli, env)))
        manifest.write_text(manifest.read_text().replace(f'"{marker}1"', f'"{marker}2"'))
        row.reload = timed(client.reload)
        client.wait(["one"], "running", timeout=60)
    except Exception as exc:  # a size it cannot do is a row, not the end of the run
        row.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if proc.poll() is None:
            row.shutdown = stop(proc)
        log.close()
        row.left_behind = len(with_marker(marker))
    return row


# -- supervisord ---------------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=600)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(600)
        self.sock.connect(self._path)


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over supervisord's unix socket, as supervisorctl speaks it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def make_connection(self, host: object) -> http.client.HTTPConnection:
        return _UnixConnection(self._path)


def supervisord(size: int, args: argparse.Namespace, folder: Path, marker: str, venv: Path) -> Row:
    row = Row(size)
    folder.mkdir()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    one = textwrap.dedent(
        f"""
        [program:one]
        command=sleep {marker}1
        startsecs=0
        autorestart=false
        stdout_logfile=NONE
        stderr_logfile=NONE
        """
    )
    conf = supervisord_conf(folder, size - 1, command=f"sleep {marker}", minfds=hard, extra=one)
    conf.write_text(
        conf.read_text().replace(
            "autorestart=false\n", "autorestart=false\nstdout_logfile=NONE\nstderr_logfile=NONE\n", 1
        )
    )
    env = environment()
    sock = str(folder / "supervisord.sock")
    rpc = xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(sock))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(venv / "bin" / "supervisord"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    ctl = [str(venv / "bin" / "supervisorctl"), "-c", str(conf)]
    try:
        while True:
            if proc.poll() is not None:
                tail = (folder / "supervisord.log").read_text(errors="replace")[-300:]
                row.error = f"exited {proc.returncode}: {tail}"
                return row
            asked = time.perf_counter()
            try:
                infos = rpc.supervisor.getAllProcessInfo()
            except (OSError, xmlrpc.client.Error):
                time.sleep(0.05)
                continue
            # The call takes supervisord seconds with thousands of processes, and its one loop
            # spawns nothing meanwhile: ask again only after four times that (0.2 s at least).
            pause = max(0.2, 4 * (time.perf_counter() - asked))
            states = [info["statename"] for info in infos]
            if len(states) == size and all(state == "RUNNING" for state in states):
                break
            if any(state in ("FATAL", "BACKOFF") for state in states):
                bad = sum(state in ("FATAL", "BACKOFF") for state in states)
                row.error = f"{bad} of {size} processes FATAL or BACKOFF (out of descriptors?)"
                return row
            time.sleep(pause)
        row.all_running = time.perf_counter() - started
        row.rss_kib, row.threads, row.fds = rss_kib(proc.pid), threads(proc.pid), fds(proc.pid)
        row.idle_ticks = idle_ticks(proc.pid, args.idle)
        run_cli([*ctl, "status"], env)
        for _ in range(args.runs):
            row.status_api.append(timed(rpc.supervisor.getAllProcessInfo))
            row.status_cli.append(timed(lambda: run_cli([*ctl, "status"], env)))
        conf.write_text(conf.read_text().replace(f"command=sleep {marker}1", f"command=sleep {marker}2"))
        row.reload = timed(lambda: run_cli([*ctl, "update"], env))
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if proc.poll() is None:
            row.shutdown = stop(proc, timeout=600)
        row.left_behind = len(with_marker(marker))
        for pid in with_marker(marker):  # supervisord's leftovers must not spoil the next size
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return row


# -- report --------------------------------------------------------------------------------------


def ms(values: list[float], fraction: float | None = None) -> str:
    if not values:
        return "—"
    value = statistics.median(values) if fraction is None else percentile(values, fraction)
    return f"{value * 1000:.0f} ms"


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def report(name: str, rows: list[Row], idle: float) -> None:
    print(f"\n{name}")
    header = (
        "| instances | all running | RSS | per instance | threads | fds | idle CPU ticks "
        f"({idle:g} s) | status API p50 / p90 | CLI p50 / p90 | reload one | shutdown | left behind |"
    )
    print(header)
    print("|" + "|".join([" ---: "] * 12) + "|")
    previous: Row | None = None
    for row in rows:
        slope = "—"
        if previous is not None and previous.rss_kib and row.rss_kib and row.size != previous.size:
            slope = f"{(row.rss_kib - previous.rss_kib) / (row.size - previous.size):.1f} KiB"
        if row.error and row.all_running is None:
            print(f"| {row.size:,} | failed: {row.error} |" + " |" * 10)
            continue
        print(
            f"| {row.size:,} | {seconds(row.all_running)} | {row.rss_kib / 1024:.1f} MiB | {slope} | "
            f"{row.threads} | {row.fds:,} | {row.idle_ticks} | {ms(row.status_api)} / "
            f"{ms(row.status_api, 0.9)} | {ms(row.status_cli)} / {ms(row.status_cli, 0.9)} | "
            f"{seconds(row.reload)} | {seconds(row.shutdown)} | {row.left_behind} |"
        )
        if row.error:
            print(f"  ({row.error})")
        previous = row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measured")
    parser.add_argument("--runs", type=int, default=10, help="status requests and commands timed")
    parser.add_argument("--streams", choices=["null", "merged", "log"], default="null")
    parser.add_argument("--only", choices=["ours", "supervisord"])
    parser.add_argument("--supervisord-venv", type=Path, help="reuse a venv that has supervisord installed")
    parser.add_argument("--baseline", type=Path, help="an older tree of ours, run before ours at each size")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    ours_rows: list[Row] = []
    before_rows: list[Row] = []
    theirs_rows: list[Row] = []
    venv = None
    if args.only != "ours":
        venv = args.supervisord_venv or install_supervisord(folder)
        version = subprocess.run(
            [str(venv / "bin" / "supervisord"), "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        print(f"supervisord {version}")
    try:
        for size in sizes:
            marker = f"{31_000_000 + size}.{os.getpid()}"
            if args.only != "supervisord" and args.baseline is not None:
                row = ours(size, args, folder / f"before-{size}", marker + "9", args.baseline)
                before_rows.append(row)
                print(f"before {size}: {row}", file=sys.stderr)
            if args.only != "supervisord":
                row = ours(size, args, folder / f"ours-{size}", marker)
                ours_rows.append(row)
                print(f"ours {size}: {row}", file=sys.stderr)
            if venv is not None:
                row = supervisord(size, args, folder / f"supervisord-{size}", marker + "0", venv)
                theirs_rows.append(row)
                print(f"supervisord {size}: {row}", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a venv passed with --supervisord-venv is elsewhere
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(machine())
    print(f"RLIMIT_NOFILE {soft}:{hard}; load average {os.getloadavg()[0]:.1f}; streams: {args.streams}")
    if before_rows:
        report(f"supervisor (procward), before: {args.baseline}", before_rows, args.idle)
    if ours_rows:
        report("supervisor (procward)", ours_rows, args.idle)
    if theirs_rows:
        report("supervisord", theirs_rows, args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
