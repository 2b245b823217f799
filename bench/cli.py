"""Wall time of `supervisor status` against `supervisorctl status`, each with N `sleep` instances.

hyperfine-like: both commands run R times, interleaved (so drift in the machine's load
hits both alike), after a few warm-up runs; the median and p90 of each, and the ratio.

- ours: `supervisor run` on a generated manifest (one instance of N replicas), and the
  `supervisor` console script of this venv, finding the socket through `-f MANIFEST`
  (what a user types in the manifest's folder, minus the folder);
- theirs: supervisord, pip-installed by this script into its own venv under a temp
  folder (the PyPI package is also called `supervisor`), with a generated
  supervisord.conf (a unix_http_server socket, N processes of one program), and its
  `supervisorctl -c CONF status`.

Both print the same thing: one line per instance. `PYTHONDONTWRITEBYTECODE` is removed
from both commands' environment, so each uses its bytecode cache as an ordinary
install does (the warm-up runs write it).

Usage: python bench/cli.py [--instances 100] [--runs 40] [--supervisord-venv DIR] [--importtime]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OURS = Path(sys.executable).parent / "supervisor"


def base_python() -> str:
    """The interpreter this venv was made from (not a pyenv shim: a shell script is slow to start)."""
    candidate = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(candidate if candidate.exists() else sys.executable)


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONDONTWRITEBYTECODE", "SUPERVISOR_SOCKET"}}
    return env


def wait_until(check: object, what: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until ``check()`` is true; waits on ``process`` between tries (it must not exit meanwhile)."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not happen within {timeout}s")
        try:
            code = process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        raise SystemExit(f"bench: the service exited ({code}) while waiting for: {what}")


def install_supervisord(folder: Path) -> Path:
    venv = folder / "supervisord-venv"
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "supervisor"],
        check=True,
    )
    return venv


def supervisord_conf(
    folder: Path, instances: int, *, command: str = "sleep 300", minfds: int = 4096, extra: str = ""
) -> Path:
    """supervisord's config: N processes of one program (``numprocs``); ``extra``: more sections."""
    conf = folder / "supervisord.conf"
    logs = folder / "supervisord-logs"
    logs.mkdir()
    conf.write_text(
        textwrap.dedent(
            f"""
            [unix_http_server]
            file={folder}/supervisord.sock
            chmod=0700

            [supervisord]
            nodaemon=true
            logfile={folder}/supervisord.log
            pidfile={folder}/supervisord.pid
            childlogdir={logs}
            minfds={minfds}

            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

            [supervisorctl]
            serverurl=unix://{folder}/supervisord.sock

            [program:sleep]
            command={command}
            numprocs={instances}
            process_name=%(program_name)s-%(process_num)d
            startsecs=0
            autorestart=false
            """
        )
        + extra
    )
    return conf


def our_manifest(folder: Path, instances: int) -> Path:
    manifest = folder / "supervisor.yaml"
    manifest.write_text(
        textwrap.dedent(
            f"""
            version: 1
            instances:
              sleep:
                command: ["sleep", "300"]
                replicas: {instances}
                restart: {{min_uptime: 0}}
            """
        )
    )
    return manifest


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, bytes]:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench: {argv} exited {result.returncode}: {result.stderr.decode()}")
    return elapsed, result.stdout


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def describe(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name:<26} median {statistics.median(ms):7.1f} ms   p90 {percentile(ms, 0.9):7.1f} ms   "
        f"mean {statistics.fmean(ms):7.1f} ms   min {min(ms):7.1f} ms"
    )


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0))
    return f"nproc {nproc}, {model}, Python {platform.python_version()} ({platform.python_implementation()})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--python-floor", action="store_true", help="also time `python -c pass` in each venv")
    parser.add_argument("--supervisord-venv", type=Path, help="reuse a venv that has supervisord installed")
    parser.add_argument("--importtime", action="store_true", help="also show what ours spends importing")
    args = parser.parse_args()
    if not OURS.exists():
        raise SystemExit(f"bench: {OURS} is missing: run from the project's venv (make test installs it)")

    folder = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    env = environment()
    theirs_service = ours_service = None
    try:
        venv = args.supervisord_venv or install_supervisord(folder)
        conf = supervisord_conf(folder, args.instances)
        manifest = our_manifest(folder, args.instances)
        ctl = [str(venv / "bin" / "supervisorctl"), "-c", str(conf), "status"]
        ours = [str(OURS), "status", "-f", str(manifest)]
        # The same service, found through a manifest with a `supervisor:` section (the CLI
        # then reads it with PyYAML), and through -s (no manifest read at all).
        sectioned = folder / "with-settings.yaml"
        socket = folder / ".supervisor" / "control.sock"
        section = f"supervisor:\n  control: {{socket: {socket}}}\ninstances:"
        sectioned.write_text(manifest.read_text().replace("instances:", section))
        variants = {
            "supervisor status": ours,
            "  (manifest read w/ YAML)": [str(OURS), "status", "-f", str(sectioned)],
            "  (-s SOCKET)": [str(OURS), "status", "-s", str(socket)],
            "supervisorctl status": ctl,
        }
        if args.python_floor:
            variants["python -c pass (our venv)"] = [sys.executable, "-c", "pass"]
            variants["python -c pass (theirs)"] = [str(venv / "bin" / "python"), "-c", "pass"]

        theirs_service = subprocess.Popen(
            [str(venv / "bin" / "supervisord"), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        ours_service = subprocess.Popen(
            [str(OURS), "run", "-f", str(manifest)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )

        def all_running(argv: list[str], word: bytes) -> bool:
            result = subprocess.run(argv, capture_output=True, env=env, check=False)
            lines = [line for line in result.stdout.splitlines() if word in line]
            return len(lines) == args.instances

        wait_until(lambda: all_running(ctl, b"RUNNING"), "supervisord: all RUNNING", theirs_service)
        wait_until(lambda: all_running(ours, b"running"), "supervisor: all running", ours_service)

        outputs = {name: timed(argv, env)[1] for name, argv in variants.items()}
        for name, output in outputs.items():
            if "status" in variants[name]:
                assert len(output.splitlines()) >= args.instances, (name, output[:200])
        for _ in range(args.warmup):
            for argv in variants.values():
                timed(argv, env)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, argv in variants.items():
                times[name].append(timed(argv, env)[0])

        print(machine())
        print(f"{args.instances} instances of `sleep 300` each; {args.runs} runs each, interleaved\n")
        for name, values in times.items():
            print(describe(name, values))
        ours_median = statistics.median(times["supervisor status"])
        ratio = ours_median / statistics.median(times["supervisorctl status"])
        print(f"\nratio (median, supervisor status / supervisorctl status): {ratio:.2f}")

        if args.importtime:
            result = subprocess.run(
                [sys.executable, "-X", "importtime", "-m", "supervisor", "status", "-f", str(manifest)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            rows = [
                line
                for line in result.stderr.splitlines()
                if line.startswith("import time:") and line.split("|")[1].strip().isdigit()
            ]
            rows.sort(key=lambda line: int(line.split("|")[1]), reverse=True)
            print("\nours, slowest imports (cumulative µs):")
            for line in rows[:12]:
                print("  " + line.removeprefix("import time:").strip())
        return 0
    finally:
        if ours_service is not None and ours_service.poll() is None:
            ours_service.send_signal(signal.SIGTERM)
            ours_service.wait(timeout=60)
        if theirs_service is not None and theirs_service.poll() is None:
            theirs_service.send_signal(signal.SIGTERM)
            theirs_service.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
