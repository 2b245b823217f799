"""What the commands share: the defaults and environment variables, and the common arguments.

Every command module imports this one, so it holds only the standard library and nothing
that talks to the service.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..api.client import Client

DEFAULT_MANIFEST = "supervisor.yaml"
SOCKET_ENV = "SUPERVISOR_SOCKET"
TOKEN_ENV = "SUPERVISOR_TOKEN"

Command = Callable[[argparse.Namespace], int]
ControlCommand = Callable[[argparse.Namespace, "Client"], int]

STATES = ("stopped", "waiting", "starting", "running", "backoff", "stopping", "exited", "failed", "ready")


def _manifest_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--file",
        type=Path,
        default=Path(DEFAULT_MANIFEST),
        help=f"the manifest (default: {DEFAULT_MANIFEST} in the current folder)",
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str) -> float:
    """Seconds from ``30``, ``30s``, ``500ms``, ``2m``, ``1h30m`` (as the manifest writes durations)."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write it like 30, 30s, 500ms or 2m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _control_args(parser: argparse.ArgumentParser, *, file_flag: bool = True) -> None:
    parser.add_argument(
        "-s",
        "--socket",
        help=f"the service's control socket (default: ${SOCKET_ENV}, else the manifest's)",
    )
    if file_flag:
        _manifest_arg(parser)


def _selection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="instance, manifest name or glob ('web-*')")
    parser.add_argument("--all", action="store_true", help="every instance")


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
