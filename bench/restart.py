"""Restart after a crash of a program that was up: latency, and that it never gives up.

One instance of `sleep` with the default restart settings but `min_uptime: 100ms`. For
`--seconds` (60), this script kills the instance's process with SIGKILL 200 ms after
each start (read off the event stream), and measures, for each kill:

- kill → exit seen: the time until the service's BACKOFF event;
- kill → restarted: the time until the next STARTING event (the new pid).

Every kill must be followed by a restart, and none may end in `failed`: with the
restart semantics of supervisord and pm2, a run that was up is restarted at once and
does not count towards `max_restarts`. Before that change, the same loop backed off
0.1, 0.2 … 13.6 s and then gave up.

Usage: python bench/restart.py [--seconds 60] [--after 0.2]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from graph import start, stop  # bench/graph.py: run the service, and stop it

MANIFEST = """\
version: 1
instances:
  victim:
    command: ["sleep", "600"]
    restart: {min_uptime: 100ms}
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--after", type=float, default=0.2, help="kill this long after each start")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as folder:
        path = Path(folder) / "supervisor.yaml"
        path.write_text(textwrap.dedent(MANIFEST))
        service, client, _ = start(path)
        kills: dict[int, float] = {}  # pid → when it was killed (wall clock, as the events' `at`)
        seen_exit: list[float] = []
        restarted: list[float] = []
        failed: list[str] = []
        timers: list[threading.Timer] = []
        last_killed: int | None = None

        def kill(pid: int) -> None:
            kills[pid] = time.time()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                del kills[pid]

        try:
            client.wait(["victim"], "running", timeout=30)  # its first start, before the stream
            with client.events() as events:
                client.restart(["victim"])  # a start this script sees from its first event
                ends = time.monotonic() + args.seconds
                for event in events:
                    if event.get("instance") != "victim":
                        continue
                    state, pid, at = event["to_state"], event.get("pid"), event["at"]
                    if state == "failed":
                        failed.append(event.get("reason") or "")
                        break
                    if state == "backoff" and pid in kills:
                        seen_exit.append(at - kills[pid])
                    if state == "starting":
                        if last_killed is not None:
                            restarted.append(at - kills[last_killed])
                            last_killed = None
                        if time.monotonic() >= ends:
                            break
                        timer = threading.Timer(max(0.0, at + args.after - time.time()), kill, (pid,))
                        timer.start()
                        timers.append(timer)
                        last_killed = pid
        finally:
            for timer in timers:
                timer.cancel()
            restarts = client.status(["victim"])[0]["restarts"]
            stop(service)
    ms = [1000 * x for x in restarted]
    exits = [1000 * x for x in seen_exit]
    print(f"# {platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, {args.seconds:g}s")
    print(f"kills: {len(kills)}, restarts seen: {len(restarted)}, restarts counted: {restarts}")
    print(f"failed: {failed[0] if failed else 'never'}")
    for what, values in (("kill -> exit seen", exits), ("kill -> restarted", ms)):
        if values:
            median, p95 = statistics.median(values), percentile(values, 0.95)
            print(f"{what}: median {median:.2f} ms, p95 {p95:.2f} ms")
    every = len(restarted) == len(kills) - (1 if last_killed in kills else 0)
    print(f"every kill followed by a restart: {'yes' if every and not failed else 'NO'}")


if __name__ == "__main__":
    main()
