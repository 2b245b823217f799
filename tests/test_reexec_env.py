"""A re-exec changes nothing that a reload compares: an edit not reloaded yet is still one after it.

The manifest crosses the exec as data, but an ``env_file``'s contents did not: the new code read
the file again, and took an edit made since the last reload as applied. The next reload then
saw no change, and the instance ran on for good with the old environment while the service
believed it had the new one. The record now carries what each ``env_file`` said when it was
applied (``service.env_files``). Real services, real processes, the real socket; the
environment a program runs with is read from ``/proc/PID/environ``.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.handoff.state import HandoffError, encode_state, parse_state

from .helpers import handoff_record, manifest_from
from .service_fixture import ServiceProcess

# min_uptime 0: ``running`` at the spawn, not a second later (each test waited for it twice);
# what they check is the environment each process runs with, never how long it has been up.
MANIFEST = """
version: 1
instances:
  app:
    command: [sleep, '3000.0371']
    env_file: app.env
    restart: {min_uptime: 0}
  pool:
    command: [sleep, '3000.0372']
    env_file: pool.env
    replicas: 2
    restart: {min_uptime: 0}
  plain:
    command: [sleep, '3000.0373']
    env: {MARK: plain-old}
    restart: {min_uptime: 0}
  steady:
    command: [sleep, '3000.0374']
    env_file: steady.env
    restart: {min_uptime: 0}
"""


def _environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` runs with, as the kernel shows it."""
    found = {}
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            found[key] = value
    return found


def _ok(done: subprocess.CompletedProcess[str], svc: ServiceProcess) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stderr + done.stdout + svc.log()
    return done


def _reexec(svc: ServiceProcess, handoffs: int) -> None:
    """``supervisor reexec``, then until the new service has resumed every instance."""
    _ok(svc.cli("reexec"), svc)
    assert svc.client().health()["handoffs"] == handoffs
    svc.wait_until(lambda: svc.log().count("re-exec'd: took over") == handoffs, 30, "every instance resumed")


def _program(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]


def _pids(svc: ServiceProcess) -> dict[str, int]:
    """Each instance's pid, once it runs ``sleep``: at ``running`` with min_uptime 0 it may still
    be in the launchers before it (setpriv, the gate), whose environment is not quite the
    program's (LC_ALL)."""
    pids = {name: status["pid"] for name, status in svc.status().items()}
    svc.wait_until(lambda: all(_program(pid) == b"sleep" for pid in pids.values()), 10, "the programs exec'd")
    return pids


def test_an_env_file_edited_before_a_reexec_is_applied_by_the_next_reload(
    service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """Edits of ``app.env``, ``pool.env`` and the manifest, then two re-execs: every instance keeps
    its process and its old environment; the reload after them restarts exactly the edited
    ones (``changed``), whose new processes have the new environment."""
    for name in ("app", "pool", "steady"):
        (tmp_path / f"{name}.env").write_text(f"MARK={name}-old\n")
    svc = service(MANIFEST)
    names = ["app", "pool-0", "pool-1", "plain", "steady"]
    svc.wait_for(names, "running")
    before = _pids(svc)
    assert {name: _environ(pid)["MARK"] for name, pid in before.items()} == {
        "app": "app-old", "pool-0": "pool-old", "pool-1": "pool-old", "plain": "plain-old",
        "steady": "steady-old",
    }

    # Edited, not reloaded: what runs is still the old environment.
    (tmp_path / "app.env").write_text("MARK=app-new\nADDED=1\n")
    (tmp_path / "pool.env").write_text("MARK=pool-new\n")
    manifest = tmp_path / "supervisor.yaml"
    manifest.write_text(manifest.read_text().replace("plain-old", "plain-new"))

    _reexec(svc, 1)
    _reexec(svc, 2)  # what the first new service was handed, it hands on
    assert _pids(svc) == before  # a re-exec restarts nothing
    assert _environ(before["app"])["MARK"] == "app-old"

    report = svc.client().reload()
    assert sorted(report["changed"]) == ["app", "plain", "pool-0", "pool-1"], (report, svc.log())
    assert report["unchanged"] == ["steady"]
    svc.wait_for(names, "running")
    after = _pids(svc)
    assert after["steady"] == before["steady"]
    for name in ("app", "pool-0", "pool-1", "plain"):
        assert after[name] != before[name], name
    assert _environ(after["app"])["MARK"] == "app-new" and _environ(after["app"])["ADDED"] == "1"
    assert _environ(after["pool-0"])["MARK"] == _environ(after["pool-1"])["MARK"] == "pool-new"
    assert _environ(after["plain"])["MARK"] == "plain-new"
    assert _environ(after["steady"])["MARK"] == "steady-old"
    # Each new service said which env_files differed from what ran (the manifest's edit: not read).
    assert svc.log().count("re-exec: the env_file of app, pool changed since it was applied") == 2
    assert "did not hand over what it read from the env_file" not in svc.log()

    # And now that it is applied, a re-exec and a reload change nothing more.
    _reexec(svc, 3)
    assert svc.log().count("changed since it was applied") == 2
    report = svc.client().reload()
    assert report["changed"] == [] and sorted(report["unchanged"]) == sorted(names), report
    assert _pids(svc) == after


def test_an_env_file_edited_back_before_the_reload_changes_nothing(
    service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """The comparison is with what runs: an edit undone before the reload (after the re-exec that
    carried the old contents) restarts nothing."""
    for name in ("app", "pool", "steady"):
        (tmp_path / f"{name}.env").write_text(f"MARK={name}-old\n")
    svc = service(MANIFEST)
    svc.wait_for(["app", "pool-0", "pool-1", "plain", "steady"], "running")
    before = _pids(svc)
    (tmp_path / "app.env").write_text("MARK=app-new\n")
    _reexec(svc, 1)
    (tmp_path / "app.env").write_text("MARK=app-old\n")
    report = svc.client().reload()
    assert report["changed"] == [], report
    assert _pids(svc) == before


def test_the_env_files_applied_are_what_the_manager_runs(tmp_path: Path) -> None:
    """The record's ``service.env_files``: each entry's contents as read when applied, by entry."""
    from supervisor.resumption import applied_env_files

    (tmp_path / "a.env").write_text("A=1\nB=two words\n")
    manifest = manifest_from(
        """
        version: 1
        instances:
          a: {command: [sleep, '1'], env_file: a.env, replicas: 3}
          b: {command: [sleep, '1'], env: {A: '2'}}
        """,
        tmp_path,
    )
    assert applied_env_files(manifest) == {"a": {"A": "1", "B": "two words"}}


def test_the_new_service_runs_with_the_contents_applied_and_says_which_differ(tmp_path: Path) -> None:
    from supervisor.handoff.reexec import _applied_env_files

    (tmp_path / "a.env").write_text("MARK=new\n")
    (tmp_path / "b.env").write_text("MARK=same\n")
    manifest = manifest_from(
        """
        version: 1
        instances:
          a: {command: [sleep, '1'], env_file: a.env}
          b: {command: [sleep, '1'], env_file: b.env}
          c: {command: [sleep, '1']}
        """,
        tmp_path,
    )
    notes: list[tuple[int, str]] = []
    resumed = _applied_env_files(manifest, {"a": {"MARK": "old"}, "b": {"MARK": "same"}}, notes)
    assert resumed.instances["a"].environment({})["MARK"] == "old"
    assert resumed.instances["b"] is manifest.instances["b"]  # the same contents: the same config
    assert resumed.instances["a"] != manifest.instances["a"]  # what the next reload finds changed
    assert notes == [
        (
            logging.INFO,
            "re-exec: the env_file of a changed since it was applied: its instances keep the "
            "environment they were started with; the next reload applies the change",
        )
    ]


def test_a_record_of_older_code_reads_the_env_files_again_and_says_so(tmp_path: Path) -> None:
    """A record without ``service.env_files`` (an older service's) is resumed as before, with the
    files read again, and the log names the entries whose environment cannot be known."""
    from supervisor.handoff.reexec import _applied_env_files

    (tmp_path / "a.env").write_text("MARK=now\n")
    manifest = manifest_from(
        """
        version: 1
        instances:
          a: {command: [sleep, '1'], env_file: a.env}
          c: {command: [sleep, '1']}
        """,
        tmp_path,
    )
    record = handoff_record()
    assert "env_files" not in record["service"]  # type: ignore[operator]
    parse_state(json.dumps(record).encode())  # its shape is still one this code reads
    notes: list[tuple[int, str]] = []
    resumed = _applied_env_files(manifest, None, notes)
    assert resumed is manifest
    assert resumed.instances["a"].environment({})["MARK"] == "now"
    assert len(notes) == 1 and notes[0][0] == logging.WARNING
    assert notes[0][1].startswith(
        "re-exec: the old service did not hand over what it read from the env_file of a (older code)"
    )


@pytest.mark.parametrize(
    ("env_files", "place"),
    [
        ({"a": {"MARK": 1}}, "service.env_files.a.MARK: Input should be a valid string (got 1)"),
        ({"a": ["MARK=1"]}, "service.env_files.a: Input should be a valid dictionary"),
        ([], "service.env_files: Input should be a valid dictionary (got [])"),
        (None, "service.env_files: Input should be a valid dictionary (got None)"),
    ],
)
def test_a_record_whose_env_files_are_not_strings_is_refused(env_files: object, place: str) -> None:
    record = handoff_record(env_files=env_files)
    with pytest.raises(HandoffError) as refused:
        parse_state(json.dumps(record).encode())
    assert place in str(refused.value)


def test_the_record_at_the_exec_carries_the_env_files(tmp_path: Path) -> None:
    """``service_record`` puts the manager's ``env_files`` in the record, and it reads back."""
    from supervisor.handoff.reexec import service_record
    from supervisor.resumption import applied_env_files

    (tmp_path / "a.env").write_text("MARK=x\n")
    text = "version: 1\ninstances:\n  a: {command: [sleep, '1'], env_file: a.env}\n"
    manifest = manifest_from(text, tmp_path)
    state = {
        "events_seq": 0,
        "scaled": [],
        "scaled_replicas": {},
        "env_files": applied_env_files(manifest),
        "instances": [],
    }
    listeners = {"path": "/run/x.sock", "inode": [1, 2], "token": None, "sockets": []}
    record = service_record(manifest, state, listeners, None, 0)
    assert parse_state(encode_state(record))["service"]["env_files"] == {"a": {"MARK": "x"}}
