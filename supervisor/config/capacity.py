"""Whether this machine can hold what a manifest asks for: instances and their open files.

Checked at load time, so that ``validate`` and a reload refuse a manifest the
service would run out of descriptors on half-way (issue 9: 6,000 replicas took
19,998 of 20,000 descriptors, and the next spawn failed). The check uses the
hard RLIMIT_NOFILE of the process that loads the manifest, because the
service raises its soft limit to the hard one when it starts; ``validate`` on
another machine, or under another limit, may answer differently.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator

from .models import Manifest

#: The most instances (replicas counted one by one) one manifest may declare.
MAX_INSTANCES = 50_000
#: Descriptors the service needs besides its instances: sockets, listeners, the event loop, logs.
SERVICE_RESERVE = 64


def open_files_limit() -> int:
    """The open-files limit the service will run under (its soft limit is raised to this)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        return hard
    try:  # unlimited: the kernel's per-process ceiling is the real one
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def descriptors_per_instance(manifest: Manifest, name: str) -> int:
    """Its pidfd, a pipe and a log file per captured stream, the sd_notify socket."""
    config = manifest.instances[name]
    count = 1
    for spec in (config.stdout, config.stderr):
        kind = spec.kind
        if kind in ("log", "fifo") or (kind == "file" and not spec.path):  # fifo/empty: the log as fallback
            count += 2
    if config.ready is not None and config.ready.kind == "notify":
        count += 1
    return count


def capacity_problems(manifest: Manifest, *, this_machine: bool) -> Iterator[str]:
    """Too many instances anywhere; and, for ``this_machine``, more than its descriptors hold."""
    total = sum(config.replicas for config in manifest.instances.values())
    if total > MAX_INSTANCES:
        yield f"{total:,} instances (replicas counted one by one) are more than the {MAX_INSTANCES:,} allowed"
        return
    if not this_machine:
        return
    instances = manifest.instances
    per_name = (descriptors_per_instance(manifest, name) * c.replicas for name, c in instances.items())
    needed = SERVICE_RESERVE + sum(per_name)
    limit = open_files_limit()
    if needed > limit:
        yield (
            f"{total:,} instances need about {needed:,} open files, more than this machine's open-files "
            f"limit of {limit:,} (the hard RLIMIT_NOFILE): run fewer replicas, or raise the limit "
            "(ulimit -Hn, or LimitNOFILE= in a systemd unit)"
        )
