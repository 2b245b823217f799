"""Prometheus exposition of the instances' status and resource figures, and of the service itself.

``prometheus_client`` is imported only when ``GET /metrics`` is asked
(``supervisor status`` must not pay for it). The service's own process
figures are its ``ProcessCollector``, rendered by its ``generate_latest``.
The per-instance families are written here, in the same text format (0.0.4)
with its escaping: through
``generate_latest`` each sample costs about 16 µs on the reference machine,
so 500 instances' 9,000 samples took 100 to 160 ms, three times the 50 ms a
scrape may take (docs/performance.md); written directly they take a tenth of
that. The tests read the answer with prometheus_client's own parser.

Nothing is kept between scrapes: each one reads the manager's status and the
figures the API's sampler read (at most once a second), so nobody scraping
costs nothing.

Names follow Prometheus' conventions: the ``procward_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` on counters. Instances are labelled
``name`` (the replica) and ``group`` (the manifest's name for it), not
``instance``, which Prometheus gives its scrape targets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from .events import State
from .manager import Manager
from .resources import GroupFigures

__all__ = ["CONTENT_TYPE", "render"]

#: The text format's media type (version 0.0.4, which every Prometheus reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Family:
    """One metric family's lines: ``# HELP``, ``# TYPE``, then its samples."""

    def __init__(self, name: str, kind: str, documentation: str) -> None:
        self.sample = f"{name}_total" if kind == "counter" else name
        # As prometheus_client writes them: a counter's HELP and TYPE name its samples (x_total).
        self.lines = [f"# HELP {self.sample} {documentation}\n", f"# TYPE {self.sample} {kind}\n"]

    def add(self, labels: str, value: float) -> None:
        self.lines.append(f"{self.sample}{{{labels}}} {_number(value)}\n")


def _number(value: float) -> str:
    """A sample's value as the text format spells it (``repr``: 4x quicker than floatToGoString)."""
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _gauge(name: str, documentation: str) -> _Family:
    return _Family(name, "gauge", documentation)


def _counter(name: str, documentation: str) -> _Family:
    return _Family(name, "counter", documentation)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _instances(manager: Manager, figures: Mapping[int, GroupFigures]) -> Iterator[str]:
    state = _gauge("procward_instance_state", "1 for the state it is in, 0 for the others.")
    up = _gauge("procward_instance_up", "1 when a process of the instance runs.")
    ready = _gauge("procward_instance_ready", "Readiness (1 or 0), where a check is configured.")
    restarts = _counter("procward_instance_restarts", "Automatic restarts since the last start by hand.")
    uptime = _gauge("procward_instance_uptime_seconds", "Seconds since the process started; 0 if none.")
    exit_code = _gauge("procward_instance_last_exit_code", "The last exit's code (none after a signal).")
    cpu = _counter("procward_instance_cpu_seconds", "CPU time of the live processes in the group.")
    cpu_ratio = _gauge(
        "procward_instance_cpu_usage_ratio",
        "CPU use of the group over the last sampling interval, in cores (1 = one core busy).",
    )
    rss = _gauge("procward_instance_resident_memory_bytes", "Resident memory of the group's processes.")
    fds = _gauge("procward_instance_open_fds", "Open fds of the group's processes.")
    threads = _gauge("procward_instance_threads", "Threads of the group's processes.")
    processes = _gauge("procward_instance_processes", "Live processes in the group.")
    written = _counter("procward_log_written_bytes", "Bytes written to the log, by stream.")
    lost = _counter("procward_log_lost_bytes", "Bytes the log could not take (disk full…).")
    states = [(str(s), f',state="{s}"') for s in State]
    for instance in manager.instances.values():
        status = instance.status()
        labels = f'name="{_escape(status.name)}",group="{_escape(status.group)}"'
        current = str(status.state)
        for name, label in states:
            one = "1" if name == current else "0"
            state.lines.append(f"procward_instance_state{{{labels}{label}}} {one}\n")
        up.add(labels, 0 if status.pid is None else 1)
        if status.ready is not None:
            ready.add(labels, 1 if status.ready else 0)
        restarts.add(labels, status.restarts)
        uptime.add(labels, round(status.uptime_s or 0.0, 3))
        if status.exit_code is not None:
            exit_code.add(labels, status.exit_code)
        group = figures.get(status.pid) if status.pid is not None else None
        if group is not None:
            cpu.add(labels, group.cpu_seconds)
            cpu_ratio.add(labels, group.cpu_percent / 100)
            rss.add(labels, group.rss_bytes)
            fds.add(labels, group.open_fds)
            threads.add(labels, group.threads)
            processes.add(labels, group.processes)
        for stream, sink in instance.sinks.items():
            streamed = f'{labels},stream="{_escape(stream)}"'
            written.add(streamed, sink.bytes_written)
            lost.add(streamed, sink.bytes_lost)
    for family in (state, up, ready, restarts, uptime, exit_code, cpu, cpu_ratio, rss, fds, threads):
        yield from family.lines
    for family in (processes, written, lost):
        yield from family.lines
    yield "# HELP procward_instances Instances (replicas) in the manifest.\n"
    yield "# TYPE procward_instances gauge\n"
    yield f"procward_instances {len(manager.instances)}\n"


def render(manager: Manager, figures: Mapping[int, GroupFigures]) -> bytes:
    """The exposition: every instance (``figures`` by pgid, for those with a process), and the service."""
    registry = CollectorRegistry(auto_describe=False)
    # The service's own process: procward_process_cpu_seconds_total, _resident_memory_bytes, _open_fds…
    ProcessCollector(namespace="procward", registry=registry)
    return "".join(_instances(manager, figures)).encode() + generate_latest(registry)
