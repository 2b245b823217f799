"""The log file each captured stream is written to, and the manifests whose streams would share one.

A log file has one writer, its sink, which rotates it past ``max_bytes``. Two sinks on one
file (two instances, the stdout and stderr of one, two replicas) interleave their lines and
rotate the file under each other, which left files past ``max_bytes``. A log file, or an output
``file:``, that is the manifest (or a file the manifest has read: an env_file, the control
token) is appended to, and the next reload failed on the output it held. A log file named as
another one's backup (``a.log.1`` beside ``a.log``, which keeps backups) is renamed away by
that log's rotation (``logfile.py``: ``a.log.1`` to ``a.log.2`` …, the last one dropped), and
its writer goes on in a file that ends up deleted; so does a program whose output ``file:``
is a log file or one of its backups. All are refused at load time, with the
paths derived as ``run_setup.py`` derives them when the instance starts, and compared with
their folders' symlinks and ``..`` resolved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from .capacity import captured
from .records import FileStream, InstanceConfig, Manifest

KeyPath = tuple[str | int, ...]

_SUFFIX = {"stdout": "out", "stderr": "err"}

#: ``NAME.N``: the name of backup N of the log NAME (``RotatingFile._backup``: N from 1, no zeros before it).
_BACKUP = re.compile(r"(?P<log>.+)\.(?P<index>[1-9][0-9]*)")


class _Folders:
    """``os.path.realpath`` of folders, each resolved once.

    A manifest may declare 50,000 instances: their default logs share one folder, and the
    replicas of an instance share the folder of their file. A log file's own name is not
    resolved: the service never follows a symlink there (logfile.py), that start fails.
    """

    def __init__(self) -> None:
        self._resolved: dict[str, str] = {}

    def __call__(self, folder: str) -> str:
        resolved = self._resolved.get(folder)
        if resolved is None:
            resolved = self._resolved[folder] = os.path.realpath(folder).rstrip("/")
        return resolved

    def file(self, path: str) -> str:
        folder, name = os.path.split(path)
        return f"{self(folder)}/{name}"


def _log_files(
    name: str, config: InstanceConfig, logs_dir: str, folders: _Folders
) -> Iterator[tuple[str, str, str, bool]]:
    """(replica, stream, resolved path, written in the manifest) for each captured stream's log file.

    As ``RunSetup._open_logs``: ``logs.<stream>_file``, or ``<state_dir>/logs/NAME.out.log``;
    with replicas a written file gets the replica's suffix before its extension (web-0.log).
    """
    custom = {"stdout": config.logs.stdout_file, "stderr": config.logs.stderr_file}
    replicas = config.replica_names(name)
    for stream, spec in (("stdout", config.stdout), ("stderr", config.stderr)):
        if not captured(spec):
            continue
        written = custom[stream]
        if not written:
            folder, stem, suffix, written_here = folders(logs_dir), "", f".{_SUFFIX[stream]}.log", False
        elif replicas == [name]:
            yield name, stream, folders.file(written), True
            continue
        else:
            path = Path(written)  # Path's stem and suffix, as run_setup.py splits the name
            folder, stem, suffix, written_here = folders(str(path.parent)), path.stem, path.suffix, True
        for replica in replicas:
            # A default is the replica's own name; a written file takes the replica's suffix ("-0").
            middle = replica if not written_here else stem + replica.removeprefix(name)
            yield replica, stream, f"{folder}/{middle}{suffix}", written_here


def _read_files(manifest: Manifest) -> dict[str, str]:
    """Resolved path -> what it is, for each file the manifest reads (output there would spoil it).

    Resolved whole: these are read through a symlink, so a log file at its target is the same file.
    """
    found: dict[str, str] = {}
    token = manifest.supervisor.control.token_file
    if token:
        found[os.path.realpath(token)] = "supervisor.control.token_file, which the service reads"
    for name, config in manifest.instances.items():
        if config.env_file:
            read = f"the env_file of {name}, which the manifest reads"
            found.setdefault(os.path.realpath(config.env_file), read)
    if manifest.source is not None:
        found[str(manifest.source)] = "the manifest itself"
    return found


def log_file_problems(manifest: Manifest) -> Iterator[tuple[KeyPath, str]]:
    """(where, what) for each log file another stream writes too, that the manifest reads, or that
    another log's rotation takes as a backup."""
    folders = _Folders()
    logs_dir = str(Path(manifest.supervisor.state_dir) / "logs")
    read = _read_files(manifest)
    #: resolved path -> the first stream logged there: (instance, replica, stream, written)
    owners: dict[str, tuple[str, str, str, bool]] = {}
    #: resolved path -> the backups its rotation keeps (none where it is not rotated)
    kept: dict[str, int] = {}
    said: set[tuple[KeyPath, str]] = set()  # the replicas of a clash: said once, for the first of them
    outputs: list[tuple[str, str, str]] = []  # (instance, stream, folder-resolved path) of each output file
    defaults = manifest.supervisor.logs
    for name, config in manifest.instances.items():
        logs = config.logs  # as ``InstanceLogs.resolved``, without a record per instance
        rotated = (defaults.max_bytes if logs.max_bytes is None else logs.max_bytes) > 0
        backups = (defaults.backups if logs.backups is None else logs.backups) if rotated else 0
        for replica, stream, path, written in _log_files(name, config, logs_dir, folders):
            where: KeyPath = ("instances", name, "logs", f"{stream}_file") if written else ("instances", name)
            if path in read:
                yield (
                    where,
                    f"{replica}'s {stream} would be logged to {path!r}, {read[path]}: choose another file",
                )
                continue
            if path not in owners:
                owners[path] = (name, replica, stream, written)
                kept[path] = backups
                continue
            other_name, other_replica, other_stream, other_written = owners[path]
            if not written and other_written:
                # Said where it can be changed: at the file written in the manifest, not at a default.
                where = ("instances", other_name, "logs", f"{other_stream}_file")
            if (where, other_name) in said:
                continue
            said.add((where, other_name))
            yield (
                where,
                (
                    f"{other_replica}'s {other_stream} and {replica}'s {stream} would both be logged to "
                    f"{path!r}: give each captured stream its own file (two writers interleave their lines "
                    "and rotate the file under each other)"
                ),
            )
        for stream, spec in (("stdout", config.stdout), ("stderr", config.stderr)):
            if isinstance(spec, FileStream) and spec.path:
                if (path := os.path.realpath(spec.path)) in read:
                    yield (
                        ("instances", name, stream),
                        f"{name}'s {stream} would be written to {path!r}, {read[path]}",
                    )
                else:
                    outputs.append((name, stream, folders.file(spec.path)))
    yield from _backup_names_taken(owners, kept)
    yield from _outputs_into_logs(outputs, owners, kept)


def _outputs_into_logs(
    outputs: list[tuple[str, str, str]], owners: dict[str, tuple[str, str, str, bool]], kept: dict[str, int]
) -> Iterator[tuple[KeyPath, str]]:
    """(where, what) for each output ``file:`` that is a log file, or one of its backups.

    The log's sink writes and rotates it: the program's lines would interleave with the
    sink's, and a rotation renames the file under the program, which goes on writing into a
    backup (and, the last one dropped, into a deleted file). Outputs may share a file with
    each other (appended by each, as with ``>>``): only a log's file is refused.
    """
    for name, stream, path in outputs:
        log = path if path in owners else _backup_of(path, owners, kept)
        if log is None:
            continue
        _, other_replica, other_stream, _ = owners[log]
        what = "the log file" if log == path else f"a backup name (it keeps {kept[log]}) of the log file"
        yield (
            ("instances", name, stream),
            (
                f"{name}'s {stream} would be written to {path!r}, {what} of {other_replica}'s "
                f"{other_stream}, which the service writes and rotates: choose another file, or "
                f"capture {name}'s {stream} (log) to have it logged"
            ),
        )


def _backup_of(path: str, owners: dict[str, tuple[str, str, str, bool]], kept: dict[str, int]) -> str | None:
    """The log whose rotation makes a backup named ``path`` (``LOG.N``, N within its backups), if any."""
    # Most names end in a letter (every default: NAME.out.log): no match to try.
    if not path[-1].isdigit() or (match := _BACKUP.fullmatch(path)) is None:
        return None
    log = match["log"]
    return log if log in owners and int(match["index"]) <= kept[log] else None


def _backup_names_taken(
    owners: dict[str, tuple[str, str, str, bool]], kept: dict[str, int]
) -> Iterator[tuple[KeyPath, str]]:
    """(where, what) for each log file named as a backup another log's rotation makes.

    Each log file's name is looked up once (is it ``LOG.N`` with LOG a log that keeps N
    backups or more?), not each log's backup names: a log may keep a thousand.
    """
    said: set[tuple[KeyPath, str]] = set()
    for path, (name, replica, stream, written) in owners.items():
        log = _backup_of(path, owners, kept)
        if log is None:
            continue
        where: KeyPath = ("instances", name, "logs", f"{stream}_file") if written else ("instances", name)
        other_name, other_replica, other_stream, _ = owners[log]
        if (where, other_name) in said:  # replicas: said once, for the first of them
            continue
        said.add((where, other_name))
        backups, file = kept[log], os.path.basename(log)
        yield (
            where,
            (
                f"{replica}'s {stream} would be logged to {path!r}, the name of a backup of "
                f"{other_replica}'s {other_stream} log {log!r} (it keeps {backups}: {file}.1 to "
                f"{file}.{backups}): each rotation of that log would move this file away, and in the end "
                "delete it; choose another file"
            ),
        )
