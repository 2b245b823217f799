"""Memory and cold start of `supervisor run`, side by side with supervisord 4.3, in one run.

Three parts, each ours against theirs on the same machine, one after the other:

1. RSS: `supervisor run` with N instances of `sleep 300` (one entry, `replicas: N`,
   `min_uptime: 0`), against supervisord with one program of `numprocs=N`, once all N
   are running (and one status of all has been answered). The service's own RSS (VmRSS),
   its private anonymous memory, and, for ours, the guardian process beside it (a
   second, small Python process: see supervisor/guardian.py). With more than one size
   (`--instances 1000,5000`) also the slope per further instance.
2. Imports: the RSS of a fresh interpreter of our venv after each step of a chain of
   imports (what `supervisor run` loads, in its order), and the third-party packages each
   step brings in.
3. Cold start: from spawning `supervisor run` (10 instances) until the first answered status
   request on its socket, against spawning supervisord until its socket answers
   `supervisor.getAllProcessInfo` (what `supervisorctl status` asks); both polled in this
   process every millisecond, alternating, R runs each; also the time until all 10 run, and the
   CPU time the service used until its first answer (which the machine's load moves far less).

supervisord is installed into a venv of its own by bench/cli.py's `install_supervisord`
(its PyPI package is also named `supervisor`); `--supervisord-venv DIR` reuses one.

`--baseline DIR` also runs every part for an older tree of ours (DIR holds its `supervisor`
package, e.g. `git archive main supervisor | tar -x -C DIR`), with this venv's interpreter
and packages: before and after side by side, in the same run.

`--installed` also runs this checkout as a user has it: `pip install` of the checkout (not
editable) into a venv of its own, made from the same interpreter as supervisord's. The
project's venv is an editable install, whose import hook (and its imports: pathlib, re,
urllib.parse...) runs at every interpreter start; an installed package has none. supervisord
is measured as installed, so "ours (installed)" is the like-for-like row.
`--installed-venv DIR` reuses such a venv (it must hold this checkout's code).

Usage: python bench/memory.py [--instances 500] [--cold-runs 10] [--supervisord-venv DIR]
                              [--baseline DIR] [--installed | --installed-venv DIR]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path

from cli import OURS, base_python, environment, install_supervisord, machine, our_manifest, supervisord_conf

MiB = 1024 * 1024

# The third-party packages the import table names when a step brings them in.
PACKAGES = frozenset(
    [
        "anyio",
        "pydantic",
        "pydantic_core",
        "yaml",
        "starlette",
        "fastapi",
        "hypercorn",
        "h11",
        "h2",
        "wsproto",
        "httpx",
        "httpcore",
        "prometheus_client",
        "typing_extensions",
        "annotated_types",
        "typing_inspection",
        "idna",
        "sniffio",
        "trio",
        "priority",
        "hpack",
        "hyperframe",
        "opentelemetry",
        "multiprocessing",
        "ssl",
        "email",
    ]
)

# What `supervisor run` imports, in its order: each step's RSS includes the steps before it.
# pydantic, YAML and the manifest's models are loaded by the manifest check's child
# interpreter (supervisor/config/apart.py), not by the service; for a tree from before
# that change, the `supervisor.config` step is the one that loads them.
IMPORT_CHAIN = (
    "supervisor.cli",
    "anyio",
    "supervisor.config",
    "supervisor.manager",
    "supervisor.service",
    "supervisor.api.server",
    "supervisor.api.app",
)


# Runs the CLI of the tree in argv[1] instead of this checkout's (which the venv's editable
# install would otherwise find first).
BOOT = (
    "import sys; tree = sys.argv.pop(1); sys.path.insert(0, tree); "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(f).lower()]; "
    "from supervisor.cli import main; sys.exit(main())"
)


def install_ours(folder: Path) -> Path:
    """This checkout, installed as a user installs it (not editable), into a venv of its own."""
    venv = folder / "ours-venv"
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True)
    checkout = Path(__file__).resolve().parent.parent
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, str(checkout)], check=True)
    return venv


def ours_command(baseline: Path | None) -> list[str]:
    """How to run `supervisor`: this venv's script, or the CLI of an older tree."""
    return [str(OURS)] if baseline is None else [sys.executable, "-c", BOOT, str(baseline)]


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: the same client for both services' status requests."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def ours_status(path: Path) -> list[dict[str, object]] | None:
    """All instances' status, or None when nothing answers yet."""
    connection = UnixHTTPConnection(path)
    try:
        connection.request("GET", "/v1/instances")
        response = connection.getresponse()
        body = response.read()
    except OSError:
        return None
    finally:
        connection.close()
    return json.loads(body) if response.status == 200 else None


def theirs_status(path: Path) -> list[dict[str, object]] | None:
    """supervisord's `getAllProcessInfo` over its socket (supervisorctl status's one call)."""
    connection = UnixHTTPConnection(path)
    payload = xmlrpc.client.dumps((), "supervisor.getAllProcessInfo").encode()
    try:
        connection.request("POST", "/RPC2", payload, {"Content-Type": "text/xml"})
        response = connection.getresponse()
        body = response.read()
    except OSError:
        return None
    finally:
        connection.close()
    if response.status != 200:
        return None
    (infos,), _ = xmlrpc.client.loads(body)
    return infos


def ours_running(status: list[dict[str, object]] | None) -> int:
    return sum(1 for s in status or () if s.get("state") == "running")


def theirs_running(status: list[dict[str, object]] | None) -> int:
    return sum(1 for s in status or () if s.get("statename") == "RUNNING")


def poll(
    check: Callable[[], bool], what: str, process: subprocess.Popen[bytes], timeout: float = 120
) -> float:
    """Seconds until ``check()`` holds, trying every millisecond; the process must not exit meanwhile."""
    started = time.perf_counter()
    while not check():
        if process.poll() is not None:
            raise SystemExit(f"bench: the service exited ({process.returncode}) while waiting for: {what}")
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"bench: {what} did not happen within {timeout}s")
        time.sleep(0.001)
    return time.perf_counter() - started


def memory_of(pid: int) -> tuple[int, int]:
    """(VmRSS, private anonymous) of one process, in bytes."""
    rss = anonymous = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            anonymous = int(line.split()[1]) * 1024
    return rss, anonymous


def cpu_of(pid: int) -> float:
    """Seconds of CPU (user + system) a process has used: a figure that the machine's load moves
    far less than the wall clock (the cold start's second column)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def guardian_of(pid: int) -> int | None:
    """Our service's guardian: its child running guardian.py."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        try:
            if b"guardian.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        except OSError:
            continue
    return None


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def start_ours(
    folder: Path, instances: int, env: dict[str, str], command: list[str]
) -> tuple[subprocess.Popen[bytes], Path]:
    manifest = our_manifest(folder, instances)
    process = subprocess.Popen(
        [*command, "run", "-f", str(manifest)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    return process, folder / ".supervisor" / "control.sock"


def start_theirs(
    folder: Path, instances: int, venv: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    conf = supervisord_conf(folder, instances)
    fds = max(4096, 4 * instances + 256)  # a pipe pair per stream and a log file each
    conf.write_text(conf.read_text().replace("minfds=4096", f"minfds={fds}"))
    process = subprocess.Popen(
        [str(venv / "bin" / "supervisord"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    return process, folder / "supervisord.sock"


def resident(
    instances: int, venv: Path, env: dict[str, str], ours: dict[str, list[str]]
) -> dict[str, tuple[int, int]]:
    """Each service's memory with ``instances`` running, ours and theirs one after the other."""
    figures: dict[str, tuple[int, int]] = {}
    timeout = 60 + instances / 20
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as top:
        for who, command in ours.items():
            folder = Path(top, who)
            folder.mkdir()
            process = None
            try:
                process, sock = start_ours(folder, instances, env, command)
                poll(
                    lambda s=sock: ours_running(ours_status(s)) == instances,
                    f"{who}: all running",
                    process,
                    timeout,
                )
                figures[who] = memory_of(process.pid)
                guardian = guardian_of(process.pid)
                if guardian is not None:
                    figures[f"{who}' guardian"] = memory_of(guardian)
            finally:
                stop(process)
        theirs_folder = Path(top, "theirs")
        theirs_folder.mkdir()
        process = None
        try:
            process, sock = start_theirs(theirs_folder, instances, venv, env)
            poll(
                lambda: theirs_running(theirs_status(sock)) == instances,
                "supervisord: all RUNNING",
                process,
                timeout,
            )
            figures["supervisord"] = memory_of(process.pid)
        finally:
            stop(process)
    return figures


def import_chain(env: dict[str, str], baseline: Path | None) -> list[tuple[str, float, list[str]]]:
    """(module, RSS after importing it, third-party packages it brought in) along IMPORT_CHAIN."""
    script = (
        "import importlib, json, sys\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'): return int(line.split()[1]) * 1024\n"
        "if BASELINE:\n"
        "    sys.path.insert(0, BASELINE)\n"
        "    sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(f).lower()]\n"
        "rows = [['(interpreter)', rss(), []]]\n"
        "for name in sys.argv[1:]:\n"
        "    before = {m.partition('.')[0] for m in sys.modules}\n"
        "    importlib.import_module(name)\n"
        "    after = {m.partition('.')[0] for m in sys.modules}\n"
        "    new = sorted(m for m in after - before if m in OTHERS)\n"
        "    rows.append([name, rss(), new])\n"
        "print(json.dumps(rows))\n"
    )
    prelude = f"OTHERS = {set(PACKAGES)!r}\nBASELINE = {str(baseline or '')!r}\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + script, *IMPORT_CHAIN],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return [(name, rss / MiB, new) for name, rss, new in json.loads(result.stdout)]


def cold_starts(
    runs: int, venv: Path, env: dict[str, str], ours: dict[str, list[str]], instances: int = 10
) -> dict[str, list[float]]:
    """Seconds from spawn to the first answered status (and the service's CPU until then), and
    to all ``instances`` running."""
    times: dict[str, list[float]] = {}
    for who in [*ours, "supervisord"]:
        times[f"{who}: first status"] = []
        times[f"{who}: CPU until then"] = []
        times[f"{who}: all running"] = []
    for _ in range(runs):
        for who in [*ours, "supervisord"]:
            with tempfile.TemporaryDirectory(prefix="bench-cold-") as top:
                folder = Path(top)
                process = None
                try:
                    started = time.perf_counter()
                    if who in ours:
                        process, sock = start_ours(folder, instances, env, ours[who])
                        status, running = ours_status, ours_running
                    else:
                        process, sock = start_theirs(folder, instances, venv, env)
                        status, running = theirs_status, theirs_running
                    answers: list[list[dict[str, object]]] = []

                    def answered(
                        sock: Path = sock, status: Callable = status, answers: list = answers
                    ) -> bool:
                        got = status(sock)
                        if got is not None:
                            answers.append(got)
                        return got is not None

                    poll(answered, f"{who}: first status", process)
                    times[f"{who}: first status"].append(time.perf_counter() - started)
                    times[f"{who}: CPU until then"].append(cpu_of(process.pid))
                    poll(
                        lambda s=sock, st=status, r=running: r(st(s)) == instances,
                        f"{who}: all running",
                        process,
                    )
                    times[f"{who}: all running"].append(time.perf_counter() - started)
                finally:
                    stop(process)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", default="500", help="a size, or sizes for the slope: 1000,5000")
    parser.add_argument("--cold-runs", type=int, default=10, help="cold starts of each (0: none)")
    parser.add_argument("--supervisord-venv", type=Path, help="reuse a venv that has supervisord installed")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--baseline", type=Path, help="an older tree of ours to compare")
    parser.add_argument("--installed", action="store_true", help="also: this checkout pip-installed")
    parser.add_argument("--installed-venv", type=Path, help="reuse a venv with this checkout installed")
    args = parser.parse_args()
    if not OURS.exists():
        raise SystemExit(f"bench: {OURS} is missing: run from the project's venv (make test installs it)")
    sizes = [int(size) for size in args.instances.split(",")]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # supervisord takes its minfds from ours

    env = environment()
    ours = {"ours": ours_command(None)}
    if args.baseline is not None:
        ours = {"ours (baseline)": ours_command(args.baseline.resolve()), **ours}
    folder = Path(tempfile.mkdtemp(prefix="bench-memory-venv-"))
    try:
        venv = args.supervisord_venv or install_supervisord(folder)
        installed = args.installed_venv or (install_ours(folder) if args.installed else None)
        if installed is not None:
            ours["ours (installed)"] = [str(installed / "bin" / "supervisor")]
        version = subprocess.run(
            [str(venv / "bin" / "supervisord"), "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        print(machine())
        print(f"supervisord {version}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")

        if not args.skip_rss:
            print("RSS once all N `sleep 300` are running (MiB; private anonymous in brackets)")
            by_size = {}
            for size in sizes:
                by_size[size] = figures = resident(size, venv, env, ours)
                cells = "   ".join(
                    f"{who} {rss / MiB:6.1f} ({anon / MiB:5.1f})" for who, (rss, anon) in figures.items()
                )
                print(f"  N={size:<6} {cells}")
                for who in ours:
                    ratio = figures[who][0] / figures["supervisord"][0]
                    print(f"           ratio {who}/supervisord (service alone): {ratio:.2f}")
            for low, high in itertools.pairwise(sizes):
                for who in [*ours, "supervisord"]:
                    slope = (by_size[high][who][0] - by_size[low][who][0]) / (high - low) / 1024
                    print(f"  slope {low}→{high}, {who}: {slope:.1f} KiB per instance")
            print()

        for who, tree in [("ours (baseline)", args.baseline), ("ours", None)]:
            if who not in ours:
                continue
            print(f"Imports, {who}: RSS of a fresh interpreter after each step (MiB), the packages it loads")
            for name, rss, new in import_chain(env, tree and tree.resolve()):
                print(f"  {name:<24} {rss:6.1f}   {' '.join(new)}")
            print()

        if args.cold_runs:
            times = cold_starts(args.cold_runs, venv, env, ours)
            print(f"Cold start, 10 instances, {args.cold_runs} runs each, alternating (ms)")
            for name, values in times.items():
                ms = sorted(v * 1000 for v in values)
                print(
                    f"  {name:<28} median {statistics.median(ms):7.1f}   min {ms[0]:7.1f}   max {ms[-1]:7.1f}"
                )
            for who in ours:
                ratio = statistics.median(times[f"{who}: first status"]) / statistics.median(
                    times["supervisord: first status"]
                )
                print(f"  ratio (median first status, {who}/supervisord): {ratio:.2f}")
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
