"""The ``supervisor`` command: a thin layer over the manifest loader, the service and the API client.

Start-up time matters (``supervisor status`` is typed by hand and run by
scripts in loops), so this package imports only the standard library at the
top, and so do the modules it imports; each command imports what it needs
when it runs. The commands live by concern:

- ``manifest``: run, validate, graph, schema (they read the manifest file);
- ``control``: the commands that talk to the running service (``status`` its table);
- ``convert``: import and export;
- ``completion``: the shell completion script and the names it completes;
- ``args``: the defaults, environment variables and arguments they share.

This module builds the parser from them and runs the chosen command; the
names it re-exports are the ones other code imported from ``supervisor.cli``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .args import DEFAULT_MANIFEST, SOCKET_ENV, STATES, TOKEN_ENV, Command, ControlCommand
from .completion import add_completion_commands, cmd_completion, cmd_names
from .control import add_control_commands, cmd_status
from .convert import add_convert_commands, cmd_export, cmd_import
from .manifest import add_manifest_commands, cmd_graph, cmd_run, cmd_schema, cmd_validate
from .status import format_status

__all__ = [
    "DEFAULT_MANIFEST",
    "SOCKET_ENV",
    "STATES",
    "TOKEN_ENV",
    "Command",
    "ControlCommand",
    "add_completion_commands",
    "add_control_commands",
    "add_convert_commands",
    "add_manifest_commands",
    "build_parser",
    "cmd_completion",
    "cmd_export",
    "cmd_graph",
    "cmd_import",
    "cmd_names",
    "cmd_run",
    "cmd_schema",
    "cmd_status",
    "cmd_validate",
    "format_status",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supervisor", description="An async multi-instance process supervisor."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_manifest_commands(sub)
    add_control_commands(sub)
    add_convert_commands(sub)
    add_completion_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `supervisor logs -f | head`: the reader went away; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
