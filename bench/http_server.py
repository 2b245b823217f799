"""What the control API's HTTP server costs by itself: ours (supervisor/api/http1.py) against hypercorn.

Each server runs in a fresh interpreter that has already imported what the service
imports anyway (anyio, pydantic, the config and the manager, starlette), and serves a
trivial ASGI app (a small JSON answer) on a unix socket bound as the service binds it.
Measured: the RSS and CPU that process adds by importing the server and answering the
first request, then the latency of R requests made one after the other from this
process with the client `supervisor status` uses (a connection per request). Servers alternate, N rounds,
under asyncio and trio. hypercorn is measured when it is installed (it is no dependency
any more: `pip install hypercorn` into the venv to compare).

Usage: python bench/http_server.py [--rounds 5] [--requests 2000] [--size 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from supervisor.api.client import Client

# The server's process: what the service imports anyway, then the server, on a bound socket.
SERVER = r"""
import json, os, resource, sys
server, backend, path, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

import anyio, pydantic, supervisor.config, supervisor.manager, starlette.applications, starlette.responses
if backend == "trio":
    import trio
from pathlib import Path
from supervisor.api.listeners import bind_unix

async def app(scope, receive, send):
    body = b'{"ok": true, "pad": "' + b"x" * size + b'"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})

async def main():
    listener = bind_unix(Path(path))
    print("ready", flush=True)  # the parent takes RSS and CPU now, and again after the first answer
    if server == "ours":
        from supervisor.api.http1 import HTTPServer
        await HTTPServer().serve([(listener, app)])
    else:
        from hypercorn.config import Config
        if backend == "trio":
            from hypercorn.trio import serve
        else:
            from hypercorn.asyncio import serve
        config = Config()
        config.bind = [f"fd://{os.dup(listener.fileno())}"]
        config.accesslog = None
        await serve(app, config, shutdown_trigger=anyio.sleep_forever)

anyio.run(main, backend=backend)
"""


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(server: str, backend: str, requests: int, size: int) -> dict[str, float]:
    """One server process; this process is its client (as the CLI is: another process)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "http.sock"
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, server, backend, str(path), str(size)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # hypercorn's "Running on …"
            text=True,
        )
        try:
            assert process.stdout is not None and process.stdout.readline() == "ready\n", f"{server} failed"
            before_rss, before_cpu = rss_of(process.pid), cpu_of(process.pid)
            client = Client(path, timeout=30)
            client.health()
            result = {
                "first_rss": rss_of(process.pid) - before_rss,
                "first_cpu": cpu_of(process.pid) - before_cpu,
            }
            samples = []
            for _ in range(requests):
                began = time.perf_counter()
                client.health()
                samples.append(time.perf_counter() - began)
        finally:
            process.terminate()
            process.wait(timeout=60)
    samples.sort()
    result["p50"] = samples[len(samples) // 2] * 1e3
    result["p99"] = samples[int(len(samples) * 0.99)] * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--size", type=int, default=0, help="bytes of padding in each answer")
    args = parser.parse_args()
    servers = ["ours"] + (["hypercorn"] if importlib.util.find_spec("hypercorn") else [])
    print(f"{platform.machine()}, Python {platform.python_version()}; servers: {', '.join(servers)}")
    for backend in ("asyncio", "trio"):
        results: dict[str, list[dict[str, float]]] = {server: [] for server in servers}
        for _ in range(args.rounds):
            for server in servers:
                results[server].append(run(server, backend, args.requests, args.size))
        print(f"\n{backend}: medians of {args.rounds} rounds; {args.requests} requests a round, "
              f"answers of {args.size + 24} bytes")
        print(f"{'server':10} | + RSS (MiB) | + CPU to the first answer (ms) | request p50 | p99 (ms)")
        for server, rows in results.items():
            median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
            print(
                f"{server:10} | {median['first_rss'] / 2**20:11.1f} | {median['first_cpu'] * 1e3:30.0f} "
                f"| {median['p50']:11.3f} | {median['p99']:8.3f}"
            )
        if len(servers) == 2:
            ours, theirs = ({k: statistics.median(r[k] for r in results[s]) for k in ("p50", "first_rss")}
                            for s in servers)
            print(f"ratio ours/hypercorn: request p50 {ours['p50'] / theirs['p50']:.2f}")


if __name__ == "__main__":
    main()
