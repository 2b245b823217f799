"""``supervisor run -d``: start the service in the background and come back once it is up.

The service is started by a double fork: the first child calls ``setsid``
(a new session, away from the caller's terminal and its job control), the
second is not a session leader (so opening a terminal can never make it the
service's controlling terminal) and execs ``supervisor run`` afresh, without
``-d`` (so an upgrade's re-exec does not detach again). Before the exec its
stdin is /dev/null and its stdout/stderr the log file: the caller's terminal
or pipe is not held open (``$(supervisor run -d)`` returns), and what the new
process says before its own logging starts lands in the log too.

The caller waits on a pipe for the service's pid (written once the control
socket answers; EOF without a pid means it could not start, and the log's
new lines say why), then for the autostart instances to settle, and prints
the status table.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ManifestError, load_manifest
from .stdio import Stdio, StdioStream

if TYPE_CHECKING:
    from .config import Manifest

__all__ = ["start_detached"]

#: States an instance settles in after a start (the lead's `waiting` is not one of them).
SETTLED = ("running", "exited", "failed")
#: Exit status when the service runs but some autostart instance did not come up.
SOME_FAILED = 3
_LOG_LINES = 20
#: How the caller prints statuses (the CLI's table).
Table = Callable[[list[dict[str, Any]]], str]


def start_detached(
    manifest_path: Path,
    *,
    log_file: Path | None,
    pidfile: Path | None,
    backend: str,
    timeout: float,
    table: Table,
    extra_args: Sequence[str] = (),
) -> int:
    """The whole of ``supervisor run -d``; ``table`` formats the statuses it prints at the end."""
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    if log_file is None:
        try:
            manifest.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            reason = exc.strerror or exc
            print(f"supervisor: cannot create the state dir {manifest.state_dir}: {reason}", file=sys.stderr)
            return 1
        log_file = manifest.state_dir / "service.log"
    log_file = log_file.absolute()
    if pidfile is not None:
        from .pidfile import PidfileError, live_service

        try:
            if other := live_service(pidfile):
                raise PidfileError(f"pidfile {pidfile} names a running service (pid {other}): stop it first")
        except PidfileError as exc:
            print(f"supervisor: {exc}", file=sys.stderr)
            return 1
        pidfile = pidfile.absolute()
    try:
        log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        print(f"supervisor: cannot open the log file {log_file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    offset = os.fstat(log_fd).st_size
    argv = [sys.executable, "-m", "supervisor", "run", "-f", str(manifest_path.absolute())]
    argv += ["--log-file", str(log_file), "--backend", backend]
    if pidfile is not None:
        argv += ["--pidfile", str(pidfile)]
    argv += extra_args
    deadline = time.monotonic() + timeout
    try:
        pid = _spawn(argv, log_fd, deadline)
    except TimeoutError:
        print(f"supervisor: the service did not answer within {timeout:g}s; see {log_file}", file=sys.stderr)
        return 1
    if pid is None:
        print(f"supervisor: the service could not start{_log_since(log_file, offset)}", file=sys.stderr)
        return 1
    return _report(manifest, pid, log_file, deadline, table)


def _spawn(argv: list[str], log_fd: int, deadline: float) -> int | None:
    """Double fork and exec; the service's pid once it answers, None if it ended before.

    TimeoutError when neither happens by ``deadline`` (the service may still come up).
    """
    read_end, write_end = os.pipe()
    argv += ["--ready-fd", str(write_end)]
    sys.stdout.flush()
    sys.stderr.flush()
    first = os.fork()
    if first == 0:  # pragma: no cover - runs in the children, which exec or _exit
        try:
            os.close(read_end)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            Stdio(StdioStream(0, null), StdioStream(1, log_fd), StdioStream(2, os.dup(log_fd))).redirect()
            os.set_inheritable(write_end, True)
            os.execv(argv[0], argv)
        except BaseException as exc:
            os.write(2, f"supervisor: cannot start the service: {exc}\n".encode())
        os._exit(127)
    os.close(write_end)
    os.close(log_fd)
    os.waitpid(first, 0)
    try:
        answer = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(read_end, 64)
            if not chunk or len(answer) > 64:
                break
            answer += chunk
    finally:
        os.close(read_end)
    text = answer.strip()
    return int(text) if text.isdigit() else None


def _report(manifest: Manifest, pid: int, log_file: Path, deadline: float, table: Table) -> int:
    """Wait for the autostart instances to settle; the status table; 0, or SOME_FAILED."""
    from .api.client import Client, ClientError

    client = Client(manifest.control_socket)
    names = [
        replica
        for name, config in manifest.instances.items()
        if config.autostart
        for replica in config.replica_names(name)
    ]
    where = f"the service runs (pid {pid}, log {log_file})"
    from .progress import progress

    try:
        if names:
            with progress(client, "starting", names, every=False, targets=SETTLED, count_initial=True):
                client.wait(names, list(SETTLED), timeout=max(0.0, deadline - time.monotonic()))
        statuses = client.status()
    except ClientError as exc:
        print(f"supervisor: {where}, but does not answer: {exc}", file=sys.stderr)
        return 1
    print(table(statuses))
    failed = [s for s in statuses if s["name"] in names and not _came_up(manifest, s)]
    if failed:
        listing = ", ".join(f"{s['name']} ({s['reason'] or s['state']})" for s in failed)
        print(f"supervisor: {where}; not up: {listing}", file=sys.stderr)
        return SOME_FAILED
    print(where, file=sys.stderr)
    return 0


def _came_up(manifest: Manifest, status: dict[str, Any]) -> bool:
    if status["state"] == "running":
        return True
    if status["state"] != "exited" or status["exit_signal"]:
        return False
    config = manifest.instances.get(status["group"])
    return config is not None and status["exit_code"] in config.restart.success_codes


def _log_since(log_file: Path, offset: int) -> str:
    """The last lines the service wrote to its log since ``offset``, to show why it stopped."""
    try:
        with open(log_file, "rb") as log:
            log.seek(offset)
            tail = log.read()[-65536:]
    except OSError:
        return f" (see {log_file})"
    lines = tail.decode(errors="replace").splitlines()[-_LOG_LINES:]
    if not lines:
        return f"; it said nothing in {log_file}"
    return f"; from {log_file}:\n" + "\n".join(f"  {line}" for line in lines)
