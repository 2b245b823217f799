"""Prometheus exposition of the instances' status and resource figures, and of the service itself.

``prometheus_client`` is imported only when ``GET /metrics`` is asked
(``supervisor status`` must not pay for it). The service's own process
figures are a collector of prometheus_client's kind (``_Service``, named as its
``ProcessCollector`` names them), rendered by its ``generate_latest``.
The per-instance families are written here, in the same text format (0.0.4)
with its escaping: through
``generate_latest`` each sample costs about 16 µs on the reference machine,
so 500 instances' 9,000 samples took 100 to 160 ms, three times the 50 ms a
scrape may take (docs/performance.md); written directly, one comprehension per
family over values read once per instance, they take 5 to 10 ms. The tests read
the answer with prometheus_client's own parser.

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
import os
import time
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .events import State
from .manager import Manager
from .resources import GroupFigures

__all__ = ["CONTENT_TYPE", "render"]

#: The text format's media type (version 0.0.4, which every Prometheus reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


#: (name, kind, documentation) of the per-instance families, in the order they are written.
_FAMILIES = (
    ("procward_instance_state", "gauge", "1 for the state it is in, 0 for the others."),
    ("procward_instance_up", "gauge", "1 when a process of the instance runs."),
    ("procward_instance_ready", "gauge", "Readiness (1 or 0), where a check is configured."),
    ("procward_instance_restarts", "counter", "Automatic restarts since the last start by hand."),
    ("procward_instance_uptime_seconds", "gauge", "Seconds since the process started; 0 if none."),
    ("procward_instance_last_exit_code", "gauge", "The last exit's code (none after a signal)."),
    ("procward_instance_cpu_seconds", "counter", "CPU time of the live processes in the group."),
    (
        "procward_instance_cpu_usage_ratio",
        "gauge",
        "CPU use of the group over the last sampling interval, in cores (1 = one core busy).",
    ),
    ("procward_instance_resident_memory_bytes", "gauge", "Resident memory of the group's processes."),
    ("procward_instance_open_fds", "gauge", "Open fds of the group's processes."),
    ("procward_instance_threads", "gauge", "Threads of the group's processes."),
    ("procward_instance_processes", "gauge", "Live processes in the group."),
    ("procward_instance_paused", "gauge", "1 while the program is stopped by a signal (SIGSTOP…)."),
    ("procward_log_written_bytes", "counter", "Bytes written to the log, by stream."),
    ("procward_log_lost_bytes", "counter", "Bytes the log could not take (disk full…)."),
)

#: Per current state, the one-hot family's lines for one instance, with NUL where its labels go.
_STATE_LINES = {
    current: "".join(
        f'procward_instance_state{{\0,state="{state}"}} {1 if state is current else 0}\n' for state in State
    )
    for current in State
}


def _header(name: str, kind: str, documentation: str) -> str:
    # As prometheus_client writes them: a counter's HELP and TYPE name its samples (x_total).
    sample = f"{name}_total" if kind == "counter" else name
    return f"# HELP {sample} {documentation}\n# TYPE {sample} {kind}\n"


def _number(value: float) -> str:
    """A sample's value as the text format spells it (``repr``: 4x quicker than floatToGoString)."""
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _instances(manager: Manager, figures: Mapping[int, GroupFigures]) -> Iterator[str]:
    """The per-instance families, one family at a time (the text format wants each family whole).

    First one pass over the instances collects each one's labels and values; then each
    family is one comprehension over that: about 0.2 µs a sample, against 1 µs through a
    method call per sample.
    """
    rows = []
    streams = []
    now = time.time()
    for instance in manager.instances.values():
        labels = f'name="{_escape(instance.name)}",group="{_escape(instance.group)}"'
        pid = instance.pid
        started = instance.started_at
        last = instance.last_exit
        rows.append(
            (
                labels,
                instance.state,
                pid,
                instance.ready,
                instance.restarts,
                0.0 if started is None else round(max(0.0, now - started), 3),
                None if last is None else last.code,
                figures.get(pid) if pid is not None else None,
            )
        )
        for stream, sink in instance.sinks.items():
            streams.append((f'{labels},stream="{_escape(stream)}"', sink.bytes_written, sink.bytes_lost))
    running = [(row[0], row[7]) for row in rows if row[7] is not None]
    names = iter(_FAMILIES)

    def family(lines: list[str]) -> str:
        name, kind, documentation = next(names)
        return _header(name, kind, documentation) + "".join(lines)

    yield family([_STATE_LINES[row[1]].replace("\0", row[0]) for row in rows])
    yield family([f"procward_instance_up{{{r[0]}}} {0 if r[2] is None else 1}\n" for r in rows])
    yield family(
        [f"procward_instance_ready{{{r[0]}}} {1 if r[3] else 0}\n" for r in rows if r[3] is not None]
    )
    yield family([f"procward_instance_restarts_total{{{r[0]}}} {r[4]}\n" for r in rows])
    yield family([f"procward_instance_uptime_seconds{{{r[0]}}} {r[5]!r}\n" for r in rows])
    yield family([f"procward_instance_last_exit_code{{{r[0]}}} {r[6]}\n" for r in rows if r[6] is not None])
    yield family(
        [f"procward_instance_cpu_seconds_total{{{lb}}} {_number(g.cpu_seconds)}\n" for lb, g in running]
    )
    yield family(
        [f"procward_instance_cpu_usage_ratio{{{lb}}} {_number(g.cpu_percent / 100)}\n" for lb, g in running]
    )
    yield family([f"procward_instance_resident_memory_bytes{{{lb}}} {g.rss_bytes}\n" for lb, g in running])
    yield family([f"procward_instance_open_fds{{{lb}}} {g.open_fds}\n" for lb, g in running])
    yield family([f"procward_instance_threads{{{lb}}} {g.threads}\n" for lb, g in running])
    yield family([f"procward_instance_processes{{{lb}}} {g.processes}\n" for lb, g in running])
    yield family([f"procward_instance_paused{{{lb}}} {1 if g.paused else 0}\n" for lb, g in running])
    yield family([f"procward_log_written_bytes_total{{{lb}}} {written}\n" for lb, written, _ in streams])
    yield family([f"procward_log_lost_bytes_total{{{lb}}} {lost}\n" for lb, _, lost in streams])
    yield "# HELP procward_instances Instances (replicas) in the manifest.\n"
    yield "# TYPE procward_instances gauge\n"
    yield f"procward_instances {len(manager.instances)}\n"


class _Service(Collector):
    """The service's own process, as prometheus_client's ``ProcessCollector`` names it.

    Not that collector itself: it counts open fds by listing /proc/self/fd, 4 ms a scrape
    for a service holding 2,000 (four per instance); the size of that folder says the same
    for one stat (Linux 6.2 and later; the listing before that).
    """

    _ticks = os.sysconf("SC_CLK_TCK")
    _page = os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterable[Metric]:
        prefix = "procward_process_"
        try:
            with open("/proc/self/stat", "rb") as stat:
                parts = stat.read().rpartition(b")")[2].split()
            with open("/proc/stat", "rb") as machine:
                boot = next(float(line.split()[1]) for line in machine if line.startswith(b"btime "))
        except (OSError, StopIteration, IndexError, ValueError):
            return []
        cpu = (int(parts[11]) + int(parts[12])) / self._ticks
        fds = os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))
        return [
            GaugeMetricFamily(
                prefix + "virtual_memory_bytes", "Virtual memory size in bytes.", float(parts[20])
            ),
            GaugeMetricFamily(
                prefix + "resident_memory_bytes",
                "Resident memory size in bytes.",
                float(parts[21]) * self._page,
            ),
            GaugeMetricFamily(
                prefix + "start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                int(parts[19]) / self._ticks + boot,
            ),
            CounterMetricFamily(
                prefix + "cpu_seconds", "Total user and system CPU time spent in seconds.", cpu
            ),
            GaugeMetricFamily(prefix + "open_fds", "Number of open file descriptors.", fds),
            GaugeMetricFamily(prefix + "max_fds", "Maximum number of open file descriptors.", _max_fds()),
        ]


def _max_fds() -> float:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return math.inf if soft == resource.RLIM_INFINITY else float(soft)


def render(manager: Manager, figures: Mapping[int, GroupFigures]) -> bytes:
    """The exposition: every instance (``figures`` by pgid, for those with a process), and the service."""
    registry = CollectorRegistry(auto_describe=False)
    # The service's own process: procward_process_cpu_seconds_total, _resident_memory_bytes, _open_fds…
    registry.register(_Service())
    return "".join(_instances(manager, figures)).encode() + generate_latest(registry)
