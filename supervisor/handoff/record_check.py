"""The resuming service's check of the record it was handed: its shape here, its manifest once.

A re-exec'd service checks the record before it takes anything (handoff/state.py): its
shape against this code's, in this process (shape.py, plain Python), then the manifest
in it against this code's models. The models are pydantic's, which the service does not
hold. So the old service's check of the new code (``reexec.check_report``, the new code
in a subprocess, a moment before the exec) hands its answer over: the manifest as
records, pickled, with a digest of what it was made for (this code's files as they were,
the manifest's data and source). The new process takes that answer when its own digest
of the record's manifest and of its files is the same, and starts no child: on the
handover's path, the child was a second interpreter importing pydantic on two busy cores.

Otherwise (an old service that hands no answer, a file of ours changed between the check
and the exec, a manifest too large to hand over) the manifest is checked as a cold start
checks its file, in the child of config/apart.py, started at once: it works while the
service imports itself. The answer is the manifest as records, or its problems.
"""

from __future__ import annotations

import binascii
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.apart import ManifestCheck, answer, manifest_from_data
from ..config.problems import ManifestError
from .state import HandoffError, StateRecord, parse_state, read_state_bytes

if TYPE_CHECKING:
    from ..config import Manifest

__all__ = ["HANDED_MAX", "HAND_OVER_ENV", "PendingResume", "check", "checked_answer", "main"]

ENTRY = "supervisor.handoff.record_check"
#: Set by the old service for its check of the new code: hand the manifest's answer over.
#: An environment variable, not an option: a code that does not know it goes on unchanged.
HAND_OVER_ENV = "PROCWARD_HAND_OVER_CHECK"
#: The largest answer handed over (base64 of the pickled records, in the record's JSON);
#: a larger one is checked again after the exec.
HANDED_MAX = 8 * 1024 * 1024
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PendingResume:
    """The record read from ``fd`` and checked, its manifest taken from the old service's check
    of this code, or checked in a child started here.

    ``of_bytes``: the same for a record already read (the old service's check of the new code,
    ``reexec.check_report``, runs this very path on its copy).
    """

    def __init__(self, fd: int | None, data: bytes = b"") -> None:
        self.error: HandoffError | None = None
        self.record: StateRecord = {}
        self.size = 0
        #: The manifest as the old service's check handed it over, when it is for this record and code.
        self.handed: Manifest | None = None
        self._check: ManifestCheck | None = None
        try:
            if fd is not None:
                data = read_state_bytes(fd)
                os.close(fd)
            self.size = len(data)
            self.record = parse_state(data)
            self.handed = _handed_answer(self.record["service"])
            if self.handed is None:
                self._check = ManifestCheck("the state record", data, entry=ENTRY, fork=True)
        except HandoffError as exc:
            self.error = exc
        except OSError as exc:  # no descriptor or process left for the check's child
            self.error = HandoffError(f"cannot check the state record: {exc.strerror or exc}")

    @classmethod
    def of_bytes(cls, data: bytes) -> PendingResume:
        return cls(None, data)

    def manifest(self) -> Manifest:
        """The record's manifest as records, once found good (by the check handed over, or the child)."""
        if self.error is not None:
            raise self.error
        if self.handed is not None:
            return self.handed
        assert self._check is not None
        try:
            found = self._check.result()
        except ManifestError as exc:
            raise HandoffError(f"the running manifest does not validate under the new code:\n{exc}") from None
        source = self.record["service"]["source"]
        return found.replace(_source=None if source is None else Path(source))

    def abandon(self) -> None:
        if self._check is not None:
            self._check.abandon()


def checked_answer(manifest: Manifest, service: dict[str, Any]) -> dict[str, str] | None:
    """The check's answer for the record's ``service`` section, as the record carries it over
    the exec (``service.checked``); None when it is too large to."""
    import pickle

    data = pickle.dumps(manifest, protocol=pickle.HIGHEST_PROTOCOL)
    text = binascii.b2a_base64(data, newline=False).decode("ascii")
    if len(text) > HANDED_MAX:
        return None
    return {"digest": _digest(service), "answer": text}


def _handed_answer(service: dict[str, Any]) -> Manifest | None:
    """The manifest the record carries from the check, if it was made for this record and code."""
    checked = service.get("checked")
    if checked is None or checked["digest"] != _digest(service):
        return None
    import pickle

    from ..config.records import Manifest

    try:
        found = pickle.loads(binascii.a2b_base64(checked["answer"]))
    except Exception:  # garbled on its way: checked again, as if none had come
        return None
    return found if isinstance(found, Manifest) else None


def _digest(service: dict[str, Any]) -> str:
    """What an answer is for: the interpreter, each of this package's files (size and change
    time: a file replaced between the check and the exec is another code), the manifest's
    data and its source."""
    import hashlib

    files = []
    for folder, subfolders, names in os.walk(_PACKAGE):
        subfolders[:] = sorted(name for name in subfolders if name != "__pycache__")
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                info = os.stat(path)
                files.append([os.path.relpath(path, _PACKAGE), info.st_size, info.st_mtime_ns])
    what = [sys.version, files, service["manifest"], service["source"]]
    return hashlib.sha256(json.dumps(what, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def main(argv: list[str]) -> int:
    """The child: the record on stdin (its shape checked by the service already); its manifest, checked."""
    data = sys.stdin.buffer.read()
    return answer(lambda: check(argv[0], data))


def check(path: str, data: dict[str, Any] | bytes | None) -> tuple[str, Any]:
    """The record's manifest under this code's models, as records."""
    record: dict[str, Any] = json.loads(data) if isinstance(data, bytes) else data or {}
    source = record["service"]["source"] or path
    return ("manifest", manifest_from_data(record["service"]["manifest"], source))
