"""The re-exec itself: check the new code, hand the state over, ``execv``; and, after it, take over.

The old service's side, in the order ``Service.reexec`` runs it:

1. ``check_new_code``: the new code runs in a subprocess (``run --resume 0 --resume-check``, the
   same interpreter, environment and arguments the exec would use) on a copy of the state, and
   says whether it would resume. Nothing is stopped yet: a new code that cannot be imported
   (a broken ``PYTHONPATH``, a syntax error), or that refuses the record's version, is found
   here, and the old service goes on and says why. ``supervisor reexec --check`` stops here.
2. The control plane stops taking requests (the listening sockets stay open: a client that
   connects now waits in the backlog) and lets the ones in flight finish (bounded).
3. ``exec_service``, in one synchronous stretch (no other task runs): the state is read from
   every instance, written to a sealed memfd, close-on-exec is cleared on exactly the fds
   handed over, and ``os.execv`` runs. If ``execv`` itself fails (the interpreter is gone,
   E2BIG, ENOMEM) it returns the reason, close-on-exec is set back, and the service serves again.

Why check in a subprocess rather than exec a trampoline that could fall back: once ``execv``
succeeds the old image is gone, so nothing could fall back to it; a check right before the
exec catches every failure that does not come from files changing in the moment between the
two (the residual window, said in the guide).

The new service's side: ``prepare_resume`` reads the record (a version it does not know is
refused), sets close-on-exec again on every inherited fd, checks that each pid still is the
process it was (start time from /proc), and returns what ``Service`` and ``Manager`` adopt.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import anyio

from ..config import Manifest
from ..config.records import as_data
from ..process import Child, SpawnError, inherited_fd_limit, spawn
from ..resumption import scaled_counts, with_applied_env_files
from .record import ProcessIdentity, identity
from .record_check import HAND_OVER_ENV, HANDED_MAX
from .signals import HANDOFF_SIGNALS, read_held
from .state import (
    VERSION,
    HandoffError,
    StateRecord,
    encode_state,
    parse_state,
    process_start_ticks,
    write_state,
)

__all__ = [
    "CHECK_TIMEOUT",
    "HANDOFF_SIGNALS",
    "Takeover",
    "check_new_code",
    "check_report",
    "exec_service",
    "log_handover",
    "prepare_resume",
    "resume_argv",
]

log = logging.getLogger("supervisor")

#: How long the new code may take to import and read the state in ``check_new_code``.
CHECK_TIMEOUT = 30.0
#: What the check may print: its report, with the manifest's answer (record_check.py) in it.
_CHECK_OUTPUT = 64 * 1024 + HANDED_MAX
_DROPPED_OPTIONS = ("--ready-fd", "--resume")
_DROPPED_FLAGS = ("--resume-check", "-d", "--detach")


def resume_argv(argv: Sequence[str], fd: int, *, check: bool = False) -> list[str]:
    """The command line of the new service: the original arguments, then ``--resume FD``.

    Dropped: ``--ready-fd`` (detach.py's pipe was used up at the first start), and an earlier
    ``--resume`` (a second re-exec). ``-d`` cannot be there (the detached child runs without it).
    """
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _DROPPED_OPTIONS:
            skip = True
            continue
        if arg.startswith(tuple(f"{option}=" for option in _DROPPED_OPTIONS)) or arg in _DROPPED_FLAGS:
            continue
        kept.append(arg)
    extra = ["--resume", str(fd)] + (["--resume-check"] if check else [])
    return [sys.executable, "-m", "supervisor", *kept, *extra]


# -- the old service's side ---------------------------------------------------------------------


def service_record(
    manifest: Manifest,
    manager_state: dict[str, Any],
    listeners: dict[str, object],
    guardian: dict[str, object] | None,
    handoffs: int,
    began: tuple[float, float] | None = None,
    start_ticks: Callable[[int], int | None] = process_start_ticks,
    signals: int | None = None,
    checked: dict[str, str] | None = None,
    *,
    state_lock: int | None = None,
    state_name: int | None = None,
) -> StateRecord:
    """The record's ``service`` section and instances, with each live child's start time.

    ``began``: when the handover began, ``(time.monotonic(), time.process_time())``, for the new
    service's log (the CPU time of a process goes on across execve).
    ``start_ticks``: a child's start time (the crash record's keeper knows it from its spawn:
    no read of /proc per instance in the handover).
    ``signals``: the read end of ``HeldSignals``' pipe, handed over (signals.py).
    ``checked``: the new code's answer for the manifest, from its check (``check_new_code``).
    ``state_lock``: the descriptor of the state folder's lock (statedir.StateDirLock), handed
    over so that no second service can start on the folder while the new code starts;
    ``state_name``: the abstract socket named after the folder's path, handed over with it.
    """
    for instance in manager_state["instances"]:
        child = instance["child"]
        if child is not None:
            child["start_ticks"] = start_ticks(child["pid"])
    from ..pidns import service_pid

    source = manifest.source
    record: StateRecord = {
        "service": {
            "pid": os.getpid(),
            "service_pid": service_pid(),  # the outer process's under --pid-namespace
            "manifest": as_data(manifest),
            "source": None if source is None else str(source),
            "listeners": listeners,
            "guardian": guardian,
            "nofile": inherited_fd_limit(),
            "signals": signals,
            "state_lock": state_lock,
            "state_name": state_name,
            "handoffs": handoffs + 1,
            "events_seq": manager_state["events_seq"],
            "scaled": manager_state["scaled"],
            "scaled_replicas": manager_state["scaled_replicas"],
            "env_files": manager_state["env_files"],
            "handover_began": None if began is None else began[0],
            "handover_cpu": None if began is None else began[1],
            "written_at": time.monotonic(),
        },
        "instances": manager_state["instances"],
    }
    if checked is not None:
        record["service"]["checked"] = checked
    return record


async def check_new_code(record: StateRecord) -> dict[str, Any]:
    """Run the new code on a copy of ``record`` in a subprocess; its report (``check_report``).

    The report's ``checked``, when there, is the new code's answer for the manifest, for the
    record at the exec (``service_record``): the new process then checks it no more.
    Raises ``HandoffError`` with the reason when it would not resume.
    """
    state_fd = write_state(record)
    read, write = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            child = spawn(
                resume_argv(sys.argv[1:], 0, check=True),
                stdin=state_fd,
                stdout=write,
                stderr=write,
                env={**os.environ, HAND_OVER_ENV: "1"},
            )
        except SpawnError as exc:
            raise HandoffError(f"the new code cannot start, the service goes on as it is: {exc}") from None
        finally:
            os.close(write)
            os.close(state_fd)
        output = await _read_all(read, child)
    finally:
        os.close(read)
    lines = output.decode(errors="replace").strip().splitlines()
    report = _last_json(lines)
    status = child.exit
    if report is None or not report.get("ok") or status is None or status.code != 0:
        why = "\n".join(lines[-12:]) or (status.describe() if status else "no answer")
        if report is not None and report.get("error"):
            why = str(report["error"])
        raise HandoffError(f"the new code would not resume, the service goes on as it is:\n{why}")
    checked = report.get("checked")
    if checked is not None and not (
        isinstance(checked, dict) and all(isinstance(checked.get(key), str) for key in ("digest", "answer"))
    ):
        report["checked"] = None  # not one the record can carry: the new process checks again
    return report


async def _read_all(fd: int, child: Child) -> bytes:
    os.set_blocking(fd, False)
    output = bytearray()
    with anyio.move_on_after(CHECK_TIMEOUT) as scope:
        while True:
            await anyio.wait_readable(fd)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            output += chunk[: max(0, _CHECK_OUTPUT - len(output))]
        await child.wait()
    if scope.cancelled_caught:
        child.send_signal(signal.SIGKILL, group=True)
        await child.wait()
        raise HandoffError(f"the new code did not answer the check within {CHECK_TIMEOUT:g}s")
    return bytes(output)


def _last_json(lines: list[str]) -> dict[str, Any] | None:
    import json

    for line in reversed(lines):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def exec_service(record: StateRecord) -> str:
    """Write ``record``, hand over the fds it names and ``execv`` the new service; returns only on
    failure (the service goes on).

    The fds kept open across the exec are read from the record (``handed_fds``, what the new
    service takes), not from a second list that could name another set: one the record names
    that is not open refuses the exec here, where the new service would have failed after it.
    Synchronous on purpose: no task runs between reading the state and the exec.
    """
    handed = sorted(set(handed_fds(record)))
    data = encode_state(record)
    try:
        # The check ran the new code on an earlier copy; this is the record it will read. What
        # this code cannot read back is refused here, before the point of no return.
        parse_state(data)
    except HandoffError as exc:
        return f"the state record at the exec is not one this code reads back: {exc}"
    try:
        state_fd = write_state(data)
    except OSError as exc:
        return f"cannot write the state record: {exc.strerror or exc}"
    reason = "execv returned"
    try:
        for fd in handed:
            try:
                os.set_inheritable(fd, True)
            except OSError as exc:
                reason = f"the state record names fd {fd}, which is not open ({exc.strerror or exc})"
                return reason
        os.set_inheritable(state_fd, True)
        argv = resume_argv(sys.argv[1:], state_fd)
        _end_exec_probes()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.execv(sys.executable, argv)
    except OSError as exc:
        reason = f"cannot exec {sys.executable}: {exc.strerror or exc}"
    finally:  # reached only when the exec failed
        for fd in handed:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        os.close(state_fd)
    return reason


def _end_exec_probes() -> None:
    """Kill and reap the exec probes' programs that run now (exec_probe_runs.py): the new
    service knows nothing of them, and runs each probe again when its turn comes.

    Looked up among the modules loaded, never imported here: a service whose instances have no
    probe never loaded the probes, so none runs; and nothing may be imported at the exec, where
    the package on disk may be the new (or a broken) one.
    """
    probes = sys.modules.get(_PROBES)
    if probes is not None:
        ended = probes.end_exec_probes()
        if ended:
            log.info("re-exec: ended %d exec probes in flight (each runs again after the exec)", ended)


_PROBES = f"{__name__.rsplit('.', 2)[0]}.exec_probe_runs"


# -- the new service's side ---------------------------------------------------------------------


@dataclass
class Takeover:
    """What a re-exec'd service adopts: read from the record by ``prepare_resume``."""

    manifest: Manifest
    record: StateRecord
    children: dict[str, Child] = field(default_factory=dict)
    #: Each adopted child as /proc showed it when checked (the crash record's keeper learns them).
    identities: list[ProcessIdentity] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    #: time.monotonic() when the new code had read the record (its imports done).
    read_at: float = field(default_factory=time.monotonic)
    #: The record's size in bytes, for the log.
    size: int = 0
    #: Whether the manifest came checked from the old service's check of this code (record_check.py).
    handed: bool = False
    #: The handoff's signals that a thread of the old service took during the handover (the
    #: new service acts on them as it starts listening).
    signals: list[int] = field(default_factory=list)
    #: What the service's log must say of the takeover, as (level, text): the log is set up after
    #: ``prepare_resume``, and ``log_handover`` says them.
    notes: list[tuple[int, str]] = field(default_factory=list)

    @property
    def service(self) -> dict[str, Any]:
        return self.record["service"]


def handed_fds(record: StateRecord) -> list[int]:
    """Every fd the record says was handed over."""
    service = record["service"]
    listeners = service["listeners"]
    fds = [int(entry["fd"]) for entry in [*listeners["sockets"], *listeners.get("connections", ())]]
    guardian = service["guardian"]
    if guardian is not None:
        fds += [int(fd) for fd in (guardian["fd"], guardian["pidfd"]) if fd is not None]
    if service.get("signals") is not None:  # optional: a record without it held no signals
        fds.append(int(service["signals"]))
    for held in ("state_lock", "state_name"):  # optional: older code held neither
        if service.get(held) is not None:
            fds.append(int(service[held]))
    for instance in record["instances"]:
        fds += [int(fd) for fd in instance["pipes"].values()]
        notify = instance["health"]["notify"]
        if notify is not None:
            fds.append(int(notify["fd"]))
        child = instance["child"]
        if child is not None and child["pidfd"] is not None:
            fds.append(int(child["pidfd"]))
    return fds


def prepare_resume(record: StateRecord, manifest: Manifest) -> Takeover:
    """Take the fds back (close-on-exec), check each pid, adopt the children; before any task runs.

    Adopting registers the children at once, so the orphan reaper never takes their statuses.
    ``manifest``: the record's, checked already (``record_check.PendingResume``).
    The record's ``service.scaled`` becomes the count of each entry ``scale`` changed (what
    ``Manager.resume`` applies): ``service.scaled_replicas``, or, from an older service that
    handed names only, the count of the entry's instances in the record (what it ran).
    Each ``env_file``'s contents are the ones the old service applied (``service.env_files``),
    not what the file says now (``_applied_env_files``).
    """
    for fd in handed_fds(record):
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise HandoffError(f"the inherited fd {fd} is not open ({exc.strerror}): not resuming") from None
    service = record["service"]
    takeover = Takeover(manifest, record)
    takeover.manifest = _applied_env_files(manifest, service.get("env_files"), takeover.notes)
    service["scaled"] = scaled_counts(service.get("scaled_replicas", service["scaled"]), record["instances"])
    held = record["service"].get("signals")
    if held is not None:
        try:
            takeover.signals = read_held(int(held))
        finally:
            os.close(int(held))
    from ..pidns import remember_service_pid

    remember_service_pid(int(record["service"]["service_pid"]))
    for instance in record["instances"]:
        child = instance["child"]
        if child is None:
            continue
        found = identity(child["pid"])
        if found is None or found.start != child["start_ticks"]:
            if child["pidfd"] is not None:
                os.close(child["pidfd"])
            instance["child"] = None
            takeover.gone.append(instance["name"])
            log.warning(
                "%s: pid %d is not the process it was (start time): not adopted",
                instance["name"],
                child["pid"],
            )
            continue
        takeover.identities.append(found)
        takeover.children[instance["name"]] = Child.adopt(
            child["pid"],
            child["pgid"],
            child["pidfd"],
            list(child["argv"]),
            float(child["started_at"]),
            bool(child["kill_group_on_exit"]),
        )
    return takeover


def _applied_env_files(
    manifest: Manifest, applied: dict[str, dict[str, str]] | None, notes: list[tuple[int, str]]
) -> Manifest:
    """The manifest with the ``env_file`` contents its instances were started with; ``notes``
    gets what the log must say of it.

    The manifest crosses the exec as data, and the new code read each ``env_file`` again: an
    edit not reloaded yet would be taken as applied, and the next reload would see no change
    (the instances running on with the old environment for good). With what the old service
    applied, that reload replaces them, as it would have without the re-exec.
    """
    manifest, edited, unknown = with_applied_env_files(manifest, applied)
    if edited:
        notes.append((
            logging.INFO,
            f"re-exec: the env_file of {', '.join(edited)} changed since it was applied: its "
            "instances keep the environment they were started with; the next reload applies the change",
        ))
    if unknown:
        notes.append((
            logging.WARNING,
            f"re-exec: the old service did not hand over what it read from the env_file of "
            f"{', '.join(unknown)} (older code): read again now, so an edit made since the last "
            "reload cannot be told from what runs, and the next reload does not apply it "
            "(restart those instances to be sure they run with what the file says)",
        ))
    return manifest


def log_handover(takeover: Takeover, served: float, known: tuple[float, float] | None) -> None:
    """Where a re-exec's time went (bench/reexec.py reads these lines), all from one clock.

    ``served``: when the control plane served the inherited sockets; ``known``: when the
    adopted instances were built, and so status answered with every one of them, as
    ``(time.monotonic(), time.process_time())``.
    """
    service = takeover.service
    written = float(service["written_at"])
    for level, note in takeover.notes:
        log.log(level, "%s", note)
    if takeover.handed:
        log.info("re-exec: the manifest came checked, from the old service's check of this code")
    else:
        log.info("re-exec: the manifest was checked again after the exec, in a child")
    began, began_cpu = service.get("handover_began"), service.get("handover_cpu")  # optional
    if _number(began):
        log.info("re-exec: the old service wrote its state %.3fs after the handover began", written - began)
    now, cpu = time.monotonic(), time.process_time()
    at, at_cpu = (now, cpu) if known is None else known
    log.info(
        "re-exec: answering %.3fs after the old service wrote its state (%.3fs to import; "
        "then %.3fs until the socket was served, %.3fs adopting); every instance resumed %.3fs later; "
        "the state took %d bytes",
        at - written,
        takeover.read_at - written,
        served - takeover.read_at,
        at - served,
        now - at,
        takeover.size,
    )
    if _number(began_cpu):  # the process's CPU time goes on across execve
        log.info(
            "re-exec: CPU since the handover began: %.3fs until answering, %.3fs until every "
            "instance resumed",
            at_cpu - began_cpu,
            cpu - began_cpu,
        )


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_start(
    record: StateRecord, manifest: Manifest, log_file: Path | None, pidfile: Path | None
) -> None:
    """What the new service refuses as it starts, found here: a state folder that others may
    write in now (or that is no longer ours), a log file it cannot open again, a pidfile it
    cannot write again. After the exec, such a refusal would end the service, and every
    instance with it."""
    from ..pidfile import PidfileError, live_service
    from ..statedir import StateDirError, check_state_dir

    if pidfile is not None:
        try:
            other = live_service(pidfile)
        except PidfileError as exc:
            raise HandoffError(str(exc)) from None
        if other is not None and other != record["service"]["pid"]:  # not the service re-exec'ing
            raise HandoffError(f"pidfile {pidfile} names another running service (pid {other})")
        if not os.path.isdir(os.path.dirname(os.path.abspath(pidfile))):
            raise HandoffError(f"pidfile {pidfile}: its folder is gone")

    if os.path.lexists(manifest.state_dir):  # a missing one is made again
        try:
            check_state_dir(manifest.state_dir)
        except StateDirError as exc:
            raise HandoffError(str(exc)) from None
    if log_file is not None:
        try:  # opened for appending, as the new service will; never made, never written
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            if not os.path.isdir(os.path.dirname(os.path.abspath(log_file))):
                raise HandoffError(f"the log file {log_file}: its folder is gone") from None
        except OSError as exc:
            raise HandoffError(f"the log file {log_file} cannot be opened: {exc.strerror or exc}") from None
        else:
            os.close(fd)


def check_report(data: bytes, log_file: Path | None = None, pidfile: Path | None = None) -> dict[str, Any]:
    """``run --resume-check``: what the new code makes of the state, touching nothing.

    ``log_file``, ``pidfile``: the service's own ``--log-file`` and ``--pidfile``, which the
    new service opens and writes again.
    """
    # What the real resume imports, so that a broken install is found here and not after the exec
    # (where the instances would go down with the service): the modules it imports at once, and
    # those it imports on its way (an instance's notify socket and checks, the PID namespace, the
    # cgroup policy; the pidfile's module comes with ``_check_start``).
    from .. import cgroup_policy, pidns, probe_loop, probes, service, service_process  # noqa: F401
    from ..api import app, server  # noqa: F401
    from .record_check import PendingResume, checked_answer

    try:
        # What the new service does with the record after the exec (record_check.py), on this copy.
        pending = PendingResume.of_bytes(data)
        try:
            manifest = pending.manifest()
        finally:
            pending.abandon()
        record = pending.record
        _check_start(record, manifest, log_file, pidfile)
    except HandoffError as exc:
        return {"ok": False, "error": str(exc), "version": VERSION}
    same = gone = 0
    for instance in record["instances"]:
        child = instance["child"]
        if child is None:
            continue
        if process_start_ticks(child["pid"]) == child["start_ticks"]:
            same += 1
        else:
            gone += 1
    report = {
        "ok": True,
        "version": VERSION,
        "instances": len(record["instances"]),
        "manifest_instances": sum(len(c.replica_names(n)) for n, c in manifest.instances.items()),
        "processes": same,
        "gone": gone,
        "python": sys.version.split()[0],
    }
    if os.environ.get(HAND_OVER_ENV):  # an old service that carries it over the exec asked for it
        report["checked"] = checked_answer(manifest, record["service"])
    return report
