"""The service's state, written for and read back after a re-exec (decision 15).

The record is JSON in a sealed memfd. JSON, not pickle: the reader is a different
version of the code, and must be able to refuse a record it does not understand
with a message, not run whatever the old code put in it. Sealed (no write, grow or
shrink, no new seals): what the new service reads is exactly what the old one wrote.

The fds the record names (pidfds, log pipes' read ends, notify sockets, the control
sockets, the guardian's pipe) keep their numbers across the exec: the old service
clears close-on-exec on exactly those, and the new one sets it again as soon as it
has read the record, so that no instance it spawns inherits them.

Times that must survive the exec as deadlines (a backoff's next try, a stop's
SIGKILL) are absolute ``CLOCK_MONOTONIC`` readings: the exec keeps the boot, and
so the clock. Start times of processes are checked against ``/proc/PID/stat`` so
that a pid that was reused meanwhile is never adopted.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

from ..states import MAX_SEQ

__all__ = [
    "FORMAT",
    "VERSION",
    "HandoffError",
    "StateRecord",
    "encode_state",
    "process_start_ticks",
    "read_state",
    "read_state_bytes",
    "write_state",
]

FORMAT = "procward-handoff"
#: Bumped whenever a field changes meaning or a new field is required; a reader refuses others.
#: Version 2 adds the event sequence number (``service.events_seq``, required) and, optional,
#: when the handover began (``service.handover_began``), whether an instance had its cgroup
#: (``instances[].cgroup``), the fd of the signals held during the handover
#: (``service.signals``, handoff/signals.py), the connections between two requests
#: (``service.listeners.connections``, api/http1.py) and the new code's check of the manifest
#: (``service.checked``, record_check.py). Optional too, with no new version (an older reader
#: lets it through and reads ``service.scaled``, the names, as before): the count of each entry
#: ``scale`` changed (``service.scaled_replicas``); a record without it gives the counts of the
#: entries' instances in it (``resumption.scaled_counts``). And whether the run a check was
#: stopping had not come up (``instances[].trouble_failed_start``): a check's stop is ``stopping``
#: now; an older reader finishes such a stop as one asked for, and the instance stays stopped.
VERSION = 2
#: What this code reads: its own version, and version 1 (a service that numbered no events:
#: its successor numbers from 1, as a fresh start does; its instances' cgroups are looked up).
READS = frozenset({1, VERSION})
#: A record larger than this is refused unread (1,000 instances take about 1 MiB).
MAX_BYTES = 256 * 1024 * 1024

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class HandoffError(RuntimeError):
    """The handoff cannot happen (or a record cannot be used); the message says why."""


#: The record as plain data: {"format", "version", "service": {...}, "instances": [{...}, ...]}.
StateRecord = dict[str, Any]


def encode_state(record: StateRecord) -> bytes:
    """The record as the memfd holds it: JSON, with the format and the version."""
    return json.dumps({"format": FORMAT, "version": VERSION, **record}, separators=(",", ":")).encode()


def write_state(record: StateRecord | bytes) -> int:
    """The record (or ``encode_state``'s bytes) in a new sealed memfd (close-on-exec, read
    position at 0); its fd."""
    data = record if isinstance(record, bytes) else encode_state(record)
    fd = os.memfd_create("procward-handoff", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state(fd: int, *, require_seals: bool = True) -> StateRecord:
    """Read and check the record at ``fd`` (from its read position); raises ``HandoffError``.

    ``require_seals``: refuse a file that could still be changed.
    """
    return parse_state(read_state_bytes(fd, require_seals=require_seals))


def read_state_bytes(fd: int, *, require_seals: bool = True) -> bytes:
    """The record's bytes at ``fd``, from a sealed file of at most ``MAX_BYTES``; not parsed."""
    try:
        size = os.fstat(fd).st_size
        if require_seals:
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:  # EINVAL: not a memfd at all
                seals = 0
            if seals & _SEALS != _SEALS:
                raise HandoffError(f"the state record (fd {fd}) is not sealed: it might change")
        if size > MAX_BYTES:
            raise HandoffError(f"the state record (fd {fd}) has {size} bytes, more than {MAX_BYTES}")
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_BYTES:
                raise HandoffError(f"the state record (fd {fd}) is larger than {MAX_BYTES} bytes")
    except OSError as exc:
        raise HandoffError(f"cannot read the state record (fd {fd}): {exc.strerror or exc}") from None
    return b"".join(chunks)


def parse_state(data: bytes) -> StateRecord:
    """The record from its bytes, after checking its format, its version and its shape (shape.py)."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HandoffError(f"the state record is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise HandoffError("the state record is not a procward handoff record")
    version = record.get("version")
    if type(version) is not int or version not in READS:  # not True, nor 2.0: they compare equal
        readable = " and ".join(str(v) for v in sorted(READS))
        raise HandoffError(
            f"the state record has format version {version!r}; this code reads versions {readable}: "
            "the running service goes on as it is"
        )
    service = record.get("service")
    if not isinstance(service, dict) or not isinstance(record.get("instances"), list):
        raise HandoffError("the state record has no service or no instances section")
    if version >= 2:
        seq = service.get("events_seq")
        if type(seq) is not int or not 0 <= seq <= MAX_SEQ:  # NaN, 1e30, -1, true, "7", missing
            raise HandoffError(
                f"the state record's service.events_seq must be a whole number from 0 to {MAX_SEQ} "
                f"(got {_short(seq)}): the running service goes on as it is"
            )
    else:
        service["events_seq"] = 0
    _check_handed_fds(service)
    refusal = shape_refusal(record)
    if refusal is not None:
        raise HandoffError(refusal)
    return record


def shape_refusal(record: StateRecord) -> str | None:
    """Why the record's shape is not what this code reads (shape.py), or None."""
    from .shape import shape_problems  # a resume's, or its check's: a cold start never imports it

    problems = shape_problems(record)
    if not problems:
        return None
    lines = [f"  {place}: {what} (got {_short(value)})" for place, what, value in problems[:_SHOWN]]
    if len(problems) > _SHOWN:
        lines.append(f"  and {len(problems) - _SHOWN} more")
    head = "the state record is not what this code reads (the running service goes on as it is):"
    return "\n".join([head, *lines])


#: How many of a bad record's problems a refusal lists (a broken writer repeats one per instance).
_SHOWN = 5


#: The largest descriptor number a record may name (the kernel's own limit is below 2**31).
_MAX_FD = 2**31 - 1


def _check_handed_fds(service: dict[str, Any]) -> None:
    """The optional descriptors of the handover (its held signals, the connections between two
    requests) must be descriptor numbers: else the record is refused before anything is taken."""
    signals = service.get("signals")
    if signals is not None and not _is_fd(signals):
        raise HandoffError(
            f"the state record's service.signals must be a descriptor number (got {_short(signals)}): "
            "the running service goes on as it is"
        )
    listeners = service.get("listeners")
    connections = listeners.get("connections", []) if isinstance(listeners, dict) else []
    if not isinstance(connections, list) or not all(
        isinstance(entry, dict) and _is_fd(entry.get("fd")) and _is_fd(entry.get("listener"))
        for entry in connections
    ):
        raise HandoffError(
            "the state record's service.listeners.connections must be a list of {fd, listener} "
            f"with a descriptor number and a socket's index (got {_short(connections)}): "
            "the running service goes on as it is"
        )


def _is_fd(value: object) -> bool:
    return type(value) is int and 0 <= value <= _MAX_FD  # not NaN, 1e30, -1, true, "7"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22); None if gone.

    Together with the pid it names one process for the life of the boot: a pid reused
    by another process has a later start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')': cut after the last.
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None
