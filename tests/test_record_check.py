"""The resuming service takes the manifest's answer the old service's check handed over, or checks again.

handoff/record_check.py: the answer counts only for the record's manifest and source, and
for this code's files as they are; anything else (another manifest, a file changed
between the check and the exec, a garbled answer) is checked again in the child, as
before. Real records in real sealed memfds; the children are real interpreters.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from supervisor.handoff import record_check
from supervisor.handoff.record_check import PendingResume, checked_answer
from supervisor.handoff.state import HandoffError, write_state

from .helpers import handoff_record


def _data(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode()


def _pending(record: dict[str, Any]) -> PendingResume:
    """As the new service reads it: from a sealed memfd."""
    return PendingResume(write_state(_data(record)))


def _checked(record: dict[str, Any]) -> dict[str, str]:
    """What the old service's check (``check_report``) hands over for ``record``: its copy checked
    in the child, as this code does it."""
    copy = PendingResume.of_bytes(_data(record))
    answer = checked_answer(copy.manifest(), copy.record["service"])
    assert answer is not None
    return answer


def _with(record: dict[str, Any], checked: dict[str, str]) -> dict[str, Any]:
    record["service"]["checked"] = checked
    return record


def _checked_again(record: dict[str, Any]) -> None:
    """The handed answer is not taken: the child checks, and says what it says of the record."""
    pending = _pending(record)
    try:
        assert pending.handed is None and pending._check is not None
        del record["service"]["checked"]
        assert pending.manifest() == PendingResume.of_bytes(_data(record)).manifest()
    finally:
        pending.abandon()


def test_the_answer_for_this_record_and_code_is_taken_and_no_child_starts() -> None:
    checked = _checked(handoff_record(source="/srv/m.yaml"))
    pending = _pending(_with(handoff_record(source="/srv/m.yaml"), checked))
    assert pending.handed is not None
    assert pending._check is None  # no child: nothing to abandon, nothing to wait for
    fresh = PendingResume.of_bytes(_data(handoff_record(source="/srv/m.yaml")))
    assert pending.manifest() == fresh.manifest()  # what the child says of it, as records
    assert pending.manifest().source == Path("/srv/m.yaml")


@pytest.mark.parametrize("change", ["command", "source"])
def test_an_answer_for_another_manifest_is_not_taken(change: str) -> None:
    """The manifest at the exec is not the one the check read: it is checked again (and here
    its own problem is found, which the handed answer did not have)."""
    checked = _checked(handoff_record())
    record = handoff_record(source="/elsewhere.yaml") if change == "source" else handoff_record()
    if change == "command":
        record["service"]["manifest"]["instances"]["a"]["command"] = []
    pending = _pending(_with(record, checked))
    try:
        assert pending.handed is None and pending._check is not None
        if change == "command":
            with pytest.raises(HandoffError, match="does not validate under the new code"):
                pending.manifest()
        else:
            assert pending.manifest().source == Path("/elsewhere.yaml")
    finally:
        pending.abandon()


def test_an_answer_made_before_a_file_of_ours_changed_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of the package replaced between the check and the exec: the new process is
    another code than the one that made the answer."""
    package = tmp_path / "supervisor"
    (package / "config").mkdir(parents=True)
    module = package / "config" / "records.py"
    module.write_text("# one\n")
    monkeypatch.setattr(record_check, "_PACKAGE", str(package))
    checked = _checked(handoff_record())
    assert _pending(_with(handoff_record(), checked)).handed is not None
    module.write_text("# two, longer\n")
    _checked_again(_with(handoff_record(), checked))


@pytest.mark.parametrize(
    "answer",
    # garble; base64 of what is not a pickle; a pickle of something else than a manifest
    ["not base64 at all!", "aGVsbG8=", base64.b64encode(pickle.dumps(["a", "list"])).decode()],
)
def test_a_garbled_answer_is_checked_again(answer: str) -> None:
    checked = _checked(handoff_record()) | {"answer": answer}
    _checked_again(_with(handoff_record(), checked))


def test_an_answer_too_large_to_carry_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    copy = PendingResume.of_bytes(_data(handoff_record()))
    manifest = copy.manifest()
    assert checked_answer(manifest, copy.record["service"]) is not None
    monkeypatch.setattr(record_check, "HANDED_MAX", 16)
    assert checked_answer(manifest, copy.record["service"]) is None


@pytest.mark.parametrize("checked", [{"digest": 5, "answer": "x"}, {"digest": "x"}, "x", []])
def test_a_record_with_a_malformed_answer_is_refused_by_its_shape(checked: object) -> None:
    with pytest.raises(HandoffError, match=r"service\.checked"):
        PendingResume.of_bytes(_data(_with(handoff_record(), checked))).manifest()  # type: ignore[arg-type]


def test_the_digest_reads_files_not_bytecode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A __pycache__ written between the check and the exec (the new process's own imports) is
    not a change of code."""
    package = tmp_path / "supervisor"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(record_check, "_PACKAGE", str(package))
    service = handoff_record()["service"]
    before = record_check._digest(service)
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0" * 10)
    os.utime(package / "a.py")  # the same content, touched: a change of code for all we know
    assert record_check._digest(service) != before
    (package / "a.py").write_text("x = 1\n")
    os.utime(package / "a.py", ns=(1, 1))
    first = record_check._digest(service)
    (package / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\0")
    assert record_check._digest(service) == first
