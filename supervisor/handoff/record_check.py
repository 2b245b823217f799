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
from typing import TYPE_CHECKING, Any

from ..config.apart import CheckRefused, ManifestCheck, answer, manifest_from_data
from ..config.problems import ManifestError
from .state import HandoffError, StateRecord, read_state

if TYPE_CHECKING:
    from ..config import Manifest

__all__ = ["PendingResume", "main"]

ENTRY = "supervisor.handoff.record_check"


class PendingResume:
    """The record read from ``fd`` (all but its shape), and its check started in a child."""

    def __init__(self, fd: int) -> None:
        self.error: HandoffError | None = None
        self.record: StateRecord = {}
        self.size = 0
        self._check: ManifestCheck | None = None
        try:
            self.record = read_state(fd, shape=False)
            self.size = os.fstat(fd).st_size  # read: it is open, and sealed
            os.close(fd)
        except HandoffError as exc:
            self.error = exc
            return
        source = self.record["service"].get("source") or "the state record"
        self._check = ManifestCheck(source, self.record, entry=ENTRY)

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
        from pathlib import Path

        return found.replace(_source=None if source is None else Path(source))

    def abandon(self) -> None:
        if self._check is not None:
            self._check.abandon()


def main(argv: list[str]) -> int:
    """The child: the record on stdin; its shape, then its manifest, checked."""
    record: dict[str, Any] = json.load(sys.stdin)

    def check() -> tuple[str, Any]:
        from .state import shape_refusal

        refusal = shape_refusal(record)
        if refusal is not None:
            return ("refused", refusal)
        return ("manifest", manifest_from_data(record["service"]["manifest"], argv[0]))

    return answer(check)
