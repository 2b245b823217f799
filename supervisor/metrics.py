"""Prometheus exposition of the instances' status and resource figures, and of the service itself.

Built with ``prometheus_client`` (imported only when ``GET /metrics`` is
asked: ``supervisor status`` must not pay for it). Nothing is kept between
scrapes: each one reads the manager's status and the figures the API's
sampler read (at most once a second), so a scrape costs what a status does
and nobody scraping costs nothing.

Names follow Prometheus' conventions: the ``procward_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` on counters. Instances are labelled
``name`` (the replica) and ``group`` (the manifest's name for it), not
``instance``, which Prometheus gives its scrape targets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .events import State
from .manager import Manager
from .resources import GroupFigures

__all__ = ["CONTENT_TYPE", "render"]

#: The text format's media type (version 0.0.4, which every Prometheus reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LABELS = ["name", "group"]


def _gauge(name: str, documentation: str, *extra: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=[*_LABELS, *extra])


def _counter(name: str, documentation: str, *extra: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, labels=[*_LABELS, *extra])


class _Instances(Collector):
    def __init__(self, manager: Manager, figures: Mapping[int, GroupFigures]) -> None:
        self.manager = manager
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        state = _gauge(
            "procward_instance_state", "1 for the state it is in, 0 for the others.", "state"
        )
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
        written = _counter("procward_log_written_bytes", "Bytes written to the log, by stream.", "stream")
        lost = _counter("procward_log_lost_bytes", "Bytes the log could not take (disk full…).", "stream")
        states = [str(s) for s in State]
        for instance in self.manager.instances.values():
            status = instance.status()
            labels = [status.name, status.group]
            current = str(status.state)
            for name in states:
                state.add_metric([*labels, name], 1.0 if name == current else 0.0)
            up.add_metric(labels, 0.0 if status.pid is None else 1.0)
            if status.ready is not None:
                ready.add_metric(labels, 1.0 if status.ready else 0.0)
            restarts.add_metric(labels, status.restarts)
            uptime.add_metric(labels, status.uptime_s or 0.0)
            if status.exit_code is not None:
                exit_code.add_metric(labels, status.exit_code)
            figures = self.figures.get(status.pid) if status.pid is not None else None
            if figures is not None:
                cpu.add_metric(labels, figures.cpu_seconds)
                cpu_ratio.add_metric(labels, figures.cpu_percent / 100)
                rss.add_metric(labels, figures.rss_bytes)
                fds.add_metric(labels, figures.open_fds)
                threads.add_metric(labels, figures.threads)
                processes.add_metric(labels, figures.processes)
            for stream, sink in instance.sinks.items():
                written.add_metric([*labels, stream], sink.bytes_written)
                lost.add_metric([*labels, stream], sink.bytes_lost)
        yield from (state, up, ready, restarts, uptime, exit_code, cpu, cpu_ratio)
        yield from (rss, fds, threads, processes, written, lost)
        count = GaugeMetricFamily("procward_instances", "Instances (replicas) in the manifest.")
        count.add_metric([], len(self.manager.instances))
        yield count


def render(manager: Manager, figures: Mapping[int, GroupFigures]) -> bytes:
    """The exposition: every instance (``figures`` by pgid, for those with a process), and the service."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Instances(manager, figures))
    # The service's own process: procward_process_cpu_seconds_total, _resident_memory_bytes, _open_fds…
    ProcessCollector(namespace="procward", registry=registry)
    return generate_latest(registry)
