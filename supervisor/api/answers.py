"""The answers the service builds most, as plain data: the status of its instances.

``GET /v1/instances`` answers with thousands of these on a big manifest, and every
``supervisor status`` waits for it: they are built as dicts, without validation,
and the tests check that the result validates as ``models.Status``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..config.units import signal_name

if TYPE_CHECKING:
    from ..instance_status import InstanceStatus
    from ..resources import GroupFigures

__all__ = ["wire_status", "wire_statuses"]


_NO_FIGURES: dict[str, Any] = dict.fromkeys(
    ("cpu_percent", "cpu_seconds", "rss_bytes", "open_fds", "threads", "processes", "paused")
)


def wire_status(status: InstanceStatus, figures: GroupFigures | None = None) -> dict[str, Any]:
    """A ``Status`` as a plain dict, built without validation.

    ``GET /v1/instances`` answers with thousands of these on a big manifest, and
    every ``supervisor status`` waits for it; the tests check that the result
    validates as ``Status``. ``figures``: the process group's, when a process runs.
    """
    return {
        "name": status.name,
        "group": status.group,
        "state": str(status.state),
        "pid": status.pid,
        "started_at": status.started_at,
        "uptime_s": None if status.uptime_s is None else round(status.uptime_s, 3),
        "restarts": status.restarts,
        "exit_code": status.exit_code,
        "exit_signal": signal_name(status.exit_signal) if status.exit_signal else None,
        "reason": status.reason,
        "ready": status.ready,
        "last_check": status.last_check,
        "status_text": status.status_text,
        "log_bytes_lost": status.log_bytes_lost,
        "log_error": status.log_error,
        "stdin": status.stdin,
        "stdout": status.stdout,
        "stderr": status.stderr,
        "log_files": dict(status.log_files),
        **(_NO_FIGURES if figures is None else _figures(figures)),
    }


def wire_statuses(
    statuses: Sequence[InstanceStatus], figures: Mapping[int, GroupFigures] | None = None
) -> bytes:
    """The JSON body of a list of ``Status``, encoded by orjson.

    With 10,000 instances the answer is 4 MB: the standard library's encoder takes
    30 to 110 ms over it on the reference machine, orjson 3 to 15 (``bench/scale.py``).
    A string orjson refuses (a lone surrogate, from a file name that is not UTF-8)
    falls back to the standard encoder, which escapes it.
    """
    from ..wire import json_bytes  # the service's, on the first status; the CLI never imports this module

    found = figures or {}
    return json_bytes([wire_status(status, found.get(status.pid or 0)) for status in statuses])


def _figures(figures: GroupFigures) -> dict[str, Any]:
    return {
        "cpu_percent": figures.cpu_percent,
        "cpu_seconds": round(figures.cpu_seconds, 2),
        "rss_bytes": figures.rss_bytes,
        "open_fds": figures.open_fds,
        "threads": figures.threads,
        "processes": figures.processes,
        "paused": figures.paused,
    }
