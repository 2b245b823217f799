"""Log capture throughput: a child writing 200 MB of 100-byte lines, captured vs direct.

Both in this one run, on the same machine and disk:

- direct: ``sh -c 'python3 writer.py > FILE'`` (the shell redirects; no supervisor);
- captured: the same writer as an instance whose stdout is `log`, from spawn
  until the sink has written every byte to the rotating log.

Prints the throughput ratio (target: >= 0.7) and the service's own CPU seconds
per 100 MB (getrusage of this process, which is the service here).

Usage: python bench/logs.py [MEGABYTES] [--backend asyncio|trio] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio

from supervisor.config import parse_manifest
from supervisor.events import State
from supervisor.manager import Manager

WRITER = """
import sys
line = b"x" * 99 + b"\\n"
block = line * 640
total = int(sys.argv[1])
out = sys.stdout.buffer
for _ in range(total // len(block)):
    out.write(block)
out.flush()
"""


def direct(writer: Path, total: int, folder: Path) -> float:
    target = folder / "direct.log"
    started = time.perf_counter()
    subprocess.run(["sh", "-c", f'"{sys.executable}" "{writer}" {total} > "{target}"'], check=True)
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


async def captured(writer: Path, total: int, folder: Path) -> tuple[float, float, int]:
    text = textwrap.dedent(
        f"""
        version: 1
        supervisor: {{state_dir: {folder / "state"}}}
        instances:
          writer:
            command: ["{sys.executable}", "{writer}", "{total}"]
            restart: {{policy: "no", min_uptime: 0}}
            logs: {{max_bytes: 50MB, backups: 10}}
        """
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.yaml"
    path.write_text(text)
    manager = Manager(parse_manifest(text, path))
    expected = (total // (100 * 640)) * 100 * 640
    usage = resource.getrusage(resource.RUSAGE_SELF)
    async with anyio.create_task_group() as tg:
        started = time.perf_counter()
        await tg.start(manager.run)
        instance = manager.instances["writer"]
        await instance.wait_for({State.EXITED, State.FAILED}, timeout=600)
        sink = instance.sinks["stdout"]
        while sink.bytes_written < expected:  # the last chunks are still in the pipe
            await anyio.sleep(0.001)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        await manager.shutdown()
        tg.cancel_scope.cancel()
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return elapsed, cpu, sink.bytes_written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("megabytes", type=int, nargs="?", default=200)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--repeat", type=int, default=7, help="runs of each, interleaved; medians are shown")
    args = parser.parse_args()
    total = args.megabytes * 1_000_000
    plains, captures, cpus = [], [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        writer = folder / "writer.py"
        writer.write_text(WRITER)
        for run in range(args.repeat):
            os.sync()  # each run starts with no dirty pages left by the one before
            plains.append(direct(writer, total, folder))
            os.sync()
            elapsed, cpu, written = anyio.run(
                captured, writer, total, folder / str(run), backend=args.backend
            )
            captures.append(elapsed)
            shutil.rmtree(folder / str(run))
            cpus.append(cpu)
    plain, elapsed, cpu = (statistics.median(x) for x in (plains, captures, cpus))
    mb = written / 1e6
    print(f"{args.repeat} runs of each, interleaved; medians")
    print(f"direct (shell redirection): {mb:.0f} MB in {plain:.3f}s = {mb / plain:.0f} MB/s")
    print(f"captured by supervisor:     {mb:.0f} MB in {elapsed:.3f}s = {mb / elapsed:.0f} MB/s")
    print(f"throughput ratio captured/direct: {plain / elapsed:.2f} (target: >= 0.7)")
    print(f"service CPU: {cpu:.2f}s for {mb:.0f} MB = {cpu / mb * 100:.2f}s per 100 MB")


if __name__ == "__main__":
    main()
