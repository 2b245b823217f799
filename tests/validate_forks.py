"""``supervisor validate`` of many files from one interpreter, a fork per file (test_corpus.py).

Run as ``python validate_forks.py WALL_SECONDS FILE...`` in the files' folder. A subprocess
per file spent about 0.4 s starting Python and importing the loader (pydantic) before it read
its file, and most files are refused within milliseconds of that. This process imports the
CLI and the loader once, then for each file forks a child that runs the CLI's entry point as
``python -m supervisor validate -f FILE`` does (``sys.exit(main(argv))``, an escaping error's
traceback on stderr), with its descriptors 1 and 2 on files of its own:

- the child is a copy of a process that has read no manifest, and ends (``os._exit``) before
  the next is forked: nothing one file does (a cache, a warning already shown, memory taken)
  is seen by the next;
- the address-space and CPU-time limits the test sets on this process are inherited, and a
  child's CPU time starts at zero, so each file has the limits a process of its own had; a
  bomb that kills its child kills only that child, and is reported as a subprocess would be
  (a negative return code: the signal);
- a child still running after WALL_SECONDS is killed, and reported as timed out.

One JSON line per file on stdout: ``name``, ``returncode`` (``None``: timed out), ``stdout``
and ``stderr`` (their bytes as latin-1 text, for the test to decode as ``subprocess`` does).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import tempfile
from typing import Any, NoReturn


def main(argv: list[str]) -> int:
    wall = float(argv[0])
    # What every child would import first: imported here once, before any fork.
    import supervisor.cli
    import supervisor.config.loader

    for name in argv[1:]:
        print(json.dumps(validate(name, wall, supervisor.cli.main)), flush=True)
    return 0


def validate(name: str, wall: float, cli: Any) -> dict[str, Any]:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()  # nothing of ours may be left in a buffer the child would write too
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(cli, ["validate", "-f", name], out.fileno(), err.fileno())
        returncode = _wait(pid, wall)
        out.seek(0)
        err.seek(0)
        return {
            "name": name,
            "returncode": returncode,
            "stdout": out.read().decode("latin-1"),
            "stderr": err.read().decode("latin-1"),
        }


def _child(cli: Any, argv: list[str], out: int, err: int) -> NoReturn:
    """Run ``cli(argv)`` as ``supervisor/__main__.py`` does, and end as the interpreter would."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        try:
            sys.exit(cli(argv))
        except SystemExit as exc:  # as the interpreter ends on it
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
        except BaseException as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


def _wait(pid: int, wall: float) -> int | None:
    """The child's return code as ``subprocess`` gives it; ``None`` (and killed) after ``wall`` s."""
    ended = os.pidfd_open(pid)
    try:
        if not select.select([ended], [], [], wall)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
    finally:
        os.close(ended)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
