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
from collections.abc import Callable, Sequence
from typing import Any

from .args import DEFAULT_MANIFEST, SOCKET_ENV, STATES, TOKEN_ENV, Command, ControlCommand
from .completion import add_completion_commands, cmd_completion, cmd_names
from .control import add_control_commands, cmd_status
from .convert import add_convert_commands, cmd_export, cmd_import
from .manifest import add_manifest_commands, cmd_graph, cmd_run, cmd_schema, cmd_validate
from .status import format_status

__all__ = [
    "COMMANDS",
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


#: Every command, in the order the full parser lists them (a test keeps the two the same).
COMMANDS = (
    *("run", "validate", "graph", "schema"),
    *("status", "start", "stop", "restart", "signal", "logs", "reload", "scale", "wait"),
    *("shutdown", "reexec", "dashboard", "import", "export", "completion", "_names"),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with ``only``, that command's alone (``main`` says why)."""
    parser = _Parser(prog="supervisor", description="An async multi-instance process supervisor.")
    sub: Any = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    if only is not None:
        sub = _OneCommand(sub, only)
    add_manifest_commands(sub)
    add_control_commands(sub)
    add_convert_commands(sub)
    add_completion_commands(sub)
    return parser


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, with the terminal's width found without ``shutil``.

    argparse makes a formatter at every ``add_argument`` (to check the metavar), and its
    own imports ``shutil`` for the width: with ``lzma`` and ``bz2``, 3 to 4 ms of every
    `supervisor status`, which never prints help. The width is found as shutil finds it.
    """

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    """$COLUMNS when set and positive, else the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    if stdout is None:
        return 80
    try:
        return os.get_terminal_size(stdout.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):  # not a terminal, closed, replaced
        return 80


class _Parser(argparse.ArgumentParser):
    """Every parser of ours (the subcommands' too), with ``_HelpFormatter``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class _OneCommand:
    """The subcommands' action, building the parser of one command and no other."""

    def __init__(self, sub: Any, name: str) -> None:
        self._sub = sub
        self._name = name

    def add_parser(self, name: str, **options: Any) -> Any:
        return self._sub.add_parser(name, **options) if name == self._name else _Unbuilt()


class _Unbuilt:
    """A command's parser that is not built: whatever is asked of it (or of what that returns)
    does nothing."""

    def __getattr__(self, name: str) -> Callable[..., _Unbuilt]:
        return self._nothing

    def _nothing(self, *args: object, **kwargs: object) -> _Unbuilt:
        return self


def fill_standard_streams() -> None:
    """/dev/null for each of 0, 1 and 2 the process was started without, before anything is opened.

    A process started with them closed (``supervisor run <&- >&- 2>&-``, some init systems) gets
    its next descriptors there: the event loop's epoll and its signal pipe became 0 to 2, an
    instance with ``stderr: inherit`` was handed the signal pipe, and a byte 0x0f it wrote was
    read as SIGTERM (0x01 as SIGHUP, a reload). Three ``fstat`` calls when nothing is missing.
    """
    for number, mode in ((0, "r"), (1, "w"), (2, "w")):
        try:
            os.fstat(number)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != number:
                os.dup2(null, number)
                os.close(null)
            stream = open(number, mode, buffering=1 if mode == "w" else -1, closefd=False)  # noqa: SIM115
            setattr(sys, ("stdin", "stdout", "stderr")[number], stream)


def main(argv: Sequence[str] | None = None) -> int:
    fill_standard_streams()
    words = sys.argv[1:] if argv is None else list(argv)
    # Only the command named first needs its arguments: building all twenty parsers took about
    # 10 ms, a fifth of `supervisor status`. Anything else (--help, a typo) gets every parser.
    only = words[0] if words and words[0] in COMMANDS else None
    args = build_parser(only).parse_args(words)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `supervisor logs -f | head`: the reader went away; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
