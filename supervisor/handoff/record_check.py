"""The resuming service's check of the record it was handed, in a child interpreter.

A re-exec'd service checks the record before it takes anything (handoff/state.py): its
shape against this code's (shape.py), then the manifest in it against this code's
models. Both checks are pydantic's, so both run in the child that checks a manifest for
a cold start (config/apart.py), started as the new process begins: it works while the
service imports itself, and the resumed service holds no pydantic, as a started one holds
none. The answer is the manifest as records, its problems, or the shape's refusal.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.apart import CheckRefused, ManifestCheck, answer, manifest_from_data
from ..config.problems import ManifestError
from .state import HandoffError, StateRecord, parse_state, read_state_bytes, shape_refusal

if TYPE_CHECKING:
    from ..config import Manifest

__all__ = ["PendingResume", "main"]

ENTRY = "supervisor.handoff.record_check"


class PendingResume:
    """The record read from ``fd``, its check started in a child, then all but its shape checked here.

    The child starts on the record's bytes before this process parses them: it is the longer
    of the two, and the first to need the CPU. ``of_bytes``: the same for a record already
    read (the old service's check of the new code, ``reexec.check_report``, runs this very
    path on its copy).
    """

    def __init__(self, fd: int | None, data: bytes = b"") -> None:
        self.error: HandoffError | None = None
        self.record: StateRecord = {}
        self.size = 0
        self._check: ManifestCheck | None = None
        try:
            if fd is not None:
                data = read_state_bytes(fd)
                os.close(fd)
            self.size = len(data)
            self._check = ManifestCheck("the state record", data, entry=ENTRY)
            self.record = parse_state(data, shape=False)
        except HandoffError as exc:
            self.error = exc
        except OSError as exc:  # no descriptor or process left for the check's child
            self.error = HandoffError(f"cannot check the state record: {exc.strerror or exc}")

    @classmethod
    def of_bytes(cls, data: bytes) -> PendingResume:
        return cls(None, data)

    def manifest(self) -> Manifest:
        """The record's manifest as records, once the child found the record and it good."""
        if self.error is not None:
            raise self.error
        assert self._check is not None
        try:
            found = self._check.result()
        except CheckRefused as exc:
            raise HandoffError(str(exc)) from None
        except ManifestError as exc:
            raise HandoffError(f"the running manifest does not validate under the new code:\n{exc}") from None
        source = self.record["service"]["source"]
        return found.replace(_source=None if source is None else Path(source))

    def abandon(self) -> None:
        if self._check is not None:
            self._check.abandon()


def main(argv: list[str]) -> int:
    """The child: the record on stdin; its shape, then its manifest, checked."""
    record: dict[str, Any] = json.load(sys.stdin.buffer)  # parse_state's checks are the service's

    def check() -> tuple[str, Any]:
        refusal = shape_refusal(record)
        if refusal is not None:
            return ("refused", refusal)
        source = record["service"]["source"] or argv[0]
        return ("manifest", manifest_from_data(record["service"]["manifest"], source))

    return answer(check)
