"""The ``supervisor status`` table, apart from the commands: ``run -d`` prints it too."""

from __future__ import annotations

from typing import Any


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def _info(status: dict[str, Any]) -> str:
    """What the table's last column says: why the instance is where it is (nothing when it runs)."""
    if status["reason"]:
        return str(status["reason"])
    if status.get("paused"):
        return f"paused by a stop signal: `supervisor signal {status['name']} CONT` resumes it"
    if status["state"] in ("starting", "running"):
        return str(status.get("status_text") or "")
    if status["exit_signal"]:
        return f"last exit: killed by {status['exit_signal']}"
    if status["exit_code"] is not None:
        return f"last exit: code {status['exit_code']}"
    return ""


def _cpu(status: dict[str, Any]) -> str:
    percent = status.get("cpu_percent")
    return "-" if percent is None else f"{percent:.1f}%"


def _mem(status: dict[str, Any]) -> str:
    """Resident memory in binary units, as ``ps`` and ``top`` count them (K, M, G of 1024)."""
    if status.get("rss_bytes") is None:
        return "-"
    size, unit = float(status["rss_bytes"]), 0
    while size >= 1024 and unit < 3:
        size, unit = size / 1024, unit + 1
    return f"{size:.0f}{'BKMG'[unit]}" if unit == 0 or size >= 100 else f"{size:.1f}{'BKMG'[unit]}"


def format_status(statuses: list[dict[str, Any]]) -> str:
    """The ``supervisor status`` table: name, state, readiness, pid, uptime, restarts, CPU, memory, why."""
    header = ("NAME", "STATE", "READY", "PID", "UPTIME", "RESTARTS", "CPU", "MEM", "INFO")
    rows = [
        (
            s["name"],
            s["state"],
            {True: "yes", False: "no"}.get(s.get("ready"), "-"),  # type: ignore[arg-type]
            str(s["pid"]) if s["pid"] is not None else "-",
            _uptime(s["uptime_s"]),
            str(s["restarts"]),
            _cpu(s),
            _mem(s),
            _info(s),
        )
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)
