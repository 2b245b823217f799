"""Whether this machine can hold what a manifest asks for: instances and their open files.

Checked at load time, so that ``validate`` and a reload refuse a manifest the
service would run out of descriptors on half-way (issue 9: 6,000 replicas took
19,998 of 20,000 descriptors, and the next spawn failed; issue 13: 5,000
instances ended in an EMFILE traceback). The check counts exactly what the
service holds for an instance while it runs (``descriptors_per_instance``)
against the open-files limit the service will run under: the hard
RLIMIT_NOFILE of the process that loads the manifest, because the service
raises its soft limit to it, or the kernel's ``fs.nr_open`` where the process
may raise the hard limit too (CAP_SYS_RESOURCE). ``validate`` on another
machine, or under another limit, may answer differently.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

from .records import InstanceConfig, Manifest

#: The most instances (replicas counted one by one) one manifest may declare.
MAX_INSTANCES = 50_000
#: Descriptors the service needs besides its instances: its event loop, listening sockets and
#: control connections, the guardian's pipe, its own stdio and the saved copies, and what one
#: spawn holds for a moment (the child's stdio before the child has it).
SERVICE_RESERVE = 64
#: The most log files the service keeps open at once (``logfile.OPEN_FILES``; the core's
#: layering keeps the two apart, and a test keeps them equal).
LOG_FILES_OPEN = 256
_CAP_SYS_RESOURCE = 24


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def may_raise_hard_limit() -> bool:
    """Whether this process may raise its hard RLIMIT_NOFILE (it holds CAP_SYS_RESOURCE).

    Root in a container often does not: the capability is read, not assumed from the uid.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError):
        pass
    return False


def open_files_limit() -> int:
    """The open-files limit the service will run under (``process.raise_fd_limit`` gets it there)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or may_raise_hard_limit():
        return max(_nr_open(), 0 if hard == resource.RLIM_INFINITY else hard)
    return hard


def descriptors_per_instance(config: InstanceConfig) -> int:
    """What the service holds for one running instance, exactly.

    Its pidfd; the read end of a log pipe per captured stream (one for both where
    stderr is ``stdout``, none for a stream that is not captured: ``null``,
    ``inherit``, a file); its ``NOTIFY_SOCKET`` when readiness is sd_notify. Log
    files are not counted here: at most ``LOG_FILES_OPEN`` are open at once, all
    instances together, and log folders one each (``manifest_descriptors``).
    Streams opened for a run (files, fifos, the pipe's write end) are handed to
    the child and closed at the spawn: not held.
    """
    count = 1
    for spec in (config.stdout, config.stderr):
        if captured(spec):
            count += 1
    if config.ready is not None and config.ready.kind == "notify":
        count += 1
    return count


def captured(spec: object) -> bool:
    """`log`, and the forms that fall back to the log when not set up (a fifo, an empty file path)."""
    kind = getattr(spec, "kind", "")
    return kind in ("log", "fifo") or (kind == "file" and not getattr(spec, "path", ""))


def captured_streams(config: InstanceConfig) -> int:
    """How many log files one replica writes (0, 1 or 2)."""
    return sum(1 for spec in (config.stdout, config.stderr) if captured(spec))


def _log_folders(manifest: Manifest) -> set[str]:
    folders: set[str] = set()
    default = str(Path(manifest.supervisor.state_dir) / "logs")
    for config in manifest.instances.values():
        custom = {"stdout": config.logs.stdout_file, "stderr": config.logs.stderr_file}
        for stream, spec in (("stdout", config.stdout), ("stderr", config.stderr)):
            if captured(spec):
                path = custom[stream]
                folders.add(str(Path(path).parent) if path else default)
    return folders


def manifest_descriptors(manifest: Manifest) -> tuple[int, int, int]:
    """(the total the service needs, the instances' share, the log files' and folders' share)."""
    instances = sum(descriptors_per_instance(c) * c.replicas for c in manifest.instances.values())
    files = sum(c.replicas * captured_streams(c) for c in manifest.instances.values())
    logs = min(files, LOG_FILES_OPEN) + len(_log_folders(manifest))
    return SERVICE_RESERVE + instances + logs, instances, logs


def capacity_problems(manifest: Manifest, *, this_machine: bool) -> Iterator[str]:
    """Too many instances anywhere; and, for ``this_machine``, more than its descriptors hold."""
    total = sum(config.replicas for config in manifest.instances.values())
    if total > MAX_INSTANCES:
        yield f"{total:,} instances (replicas counted one by one) are more than the {MAX_INSTANCES:,} allowed"
        return
    if not this_machine:
        return
    needed, instances, logs = manifest_descriptors(manifest)
    limit = open_files_limit()
    if needed > limit:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        why = (
            "the kernel's fs.nr_open, as the service may raise its hard limit to it"
            if limit != hard
            else "the hard RLIMIT_NOFILE, which this process may not raise"
        )
        yield (
            f"{total:,} instances need {needed:,} open files ({instances:,} for the instances: a pidfd "
            f"each, a log pipe per captured stream, a socket per sd_notify check; {logs:,} for log files "
            f"and folders; {SERVICE_RESERVE} for the service), more than this machine's open-files limit "
            f"of {limit:,} ({why}): run fewer replicas, capture fewer streams (stderr: stdout shares "
            "stdout's pipe; null captures nothing), or raise the limit (ulimit -Hn, LimitNOFILE= in a "
            "systemd unit)"
        )
