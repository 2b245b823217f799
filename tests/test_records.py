"""The records the service runs: each the image of its model, and the service without pydantic.

The models check what a person wrote; the service holds records (config/records.py) and
gets them from a child interpreter (config/apart.py). These tests keep the two sides one
contract: the same fields, equal exactly when the models are, a round trip through the
re-exec's data, and the child's answers (records, problems, a crash) as the service sees them.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from pydantic import BaseModel

from supervisor.config import checks, limits, models, records
from supervisor.config.apart import ManifestCheck
from supervisor.config.loader import load_manifest, settled
from supervisor.config.problems import ManifestError
from supervisor.manifest_check import check_apart

from .service_fixture import ServiceProcess, write_manifest

MODELS = [
    cls
    for module in (models, checks, limits)
    for _, cls in inspect.getmembers(module, inspect.isclass)
    if issubclass(cls, BaseModel) and cls.__module__ == module.__name__ and not cls.__name__.startswith("_")
]

FULL = """
version: 1
supervisor:
  shutdown_timeout: 30s
  logs: {max_bytes: 1MB, backups: 2}
instances:
  db:
    command: ["sleep", "300"]
    env: {A: "1"}
    env_file: app.env
    umask: "027"
    stdout: {file: db.log, mode: truncate}
    stderr: stdout
    stop: {signal: INT, timeout: 250ms, group: true}
    restart: {policy: on-failure, min_uptime: 2s, backoff: {initial: 50ms, max: 1h}}
    ready: {tcp: "127.0.0.1:5432", interval: 200ms}
    limits: {memory: 512MB, nofile: "1024:4096", as: unlimited, nice: 5}
  api:
    command: "sleep 300"
    replicas: 3
    depends_on: {db: {condition: ready, restart: true}}
    alive: {http: "http://127.0.0.1:8080/health", expect: [200], failure_threshold: 2}
  job:
    command: ["true"]
    restart: {policy: "no"}
    logs: {stdout_file: job.out}
"""


def full_manifest(tmp_path: Path) -> Path:
    (tmp_path / "app.env").write_text("FROM_FILE=yes\n")
    return write_manifest(tmp_path, FULL)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_each_record_has_its_models_fields_and_private_values(model: type[BaseModel]) -> None:
    record = getattr(records, model.__name__)
    assert record.__slots__ == (*model.model_fields, *model.__private_attributes__)
    for name, field in model.model_fields.items():
        assert record.aliases.get(name, name) == (field.alias or name)


def test_a_loaded_manifest_is_records_all_the_way_down(tmp_path: Path) -> None:
    manifest = load_manifest(full_manifest(tmp_path))
    seen: list[type] = []

    def walk(value: object) -> None:
        if isinstance(value, BaseModel):
            raise AssertionError(f"a model in the records: {value!r}")
        if isinstance(value, records.Record):
            seen.append(type(value))
            for name in value.__slots__:
                walk(getattr(value, name))
        elif isinstance(value, dict | list | tuple):
            for item in value.values() if isinstance(value, dict) else value:
                walk(item)

    walk(manifest)
    assert {records.Manifest, records.InstanceConfig, records.ReadyCheck, records.AliveCheck} <= set(seen)
    db = manifest.instances["db"]
    assert db.environment({"PATH": "/bin"}) == {"PATH": "/bin", "FROM_FILE": "yes", "A": "1"}
    assert db.limits.rlimits() == {"as": "unlimited:unlimited", "nofile": "1024:4096"}
    assert manifest.instances["api"].replica_names("api") == ["api-0", "api-1", "api-2"]
    assert manifest.instances["api"].alive.kind == "http"
    assert db.ready.address == ("127.0.0.1", 5432)
    assert manifest.control_socket == manifest.state_dir / "control.sock"


def test_records_are_frozen_equal_as_the_models_and_replaced_with_their_private_values(
    tmp_path: Path,
) -> None:
    path = full_manifest(tmp_path)
    one, two = load_manifest(path), load_manifest(path)
    assert one == two and one is not two
    with pytest.raises(AttributeError, match="frozen"):
        one.version = 2  # type: ignore[misc]
    db = one.instances["db"]
    assert db.replace(replicas=2) != db and db.replace(replicas=2).replace(replicas=1) == db
    assert db.replace(replicas=2).environment({})["FROM_FILE"] == "yes"  # env_file's values come along
    with pytest.raises(TypeError, match="no field bogus"):
        db.replace(bogus=1)
    # The env_file's contents are part of the identity, as they were of the model: a reload sees them.
    (tmp_path / "app.env").write_text("FROM_FILE=no\n")
    assert load_manifest(path).instances["db"] != db


def test_the_re_exec_data_reads_back_as_the_same_records(tmp_path: Path) -> None:
    manifest = load_manifest(full_manifest(tmp_path))
    data = records.as_data(manifest)
    assert data["instances"]["db"]["limits"]["as"] == "unlimited:unlimited"
    again = settled(models.Manifest.model_validate(data)).replace(_source=manifest.source)
    assert again == manifest
    assert pickle.loads(pickle.dumps(manifest)) == manifest


def test_the_child_answers_records_or_the_problems_with_their_places(tmp_path: Path) -> None:
    path = full_manifest(tmp_path)
    assert ManifestCheck(path).result() == load_manifest(path)
    text = "version: 1\ninstances:\n  web: {command: x, replicas: -1}\n"
    bad = write_manifest(tmp_path, text, name="bad.yaml")
    with pytest.raises(ManifestError) as found:
        ManifestCheck(bad).result()
    [problem] = found.value.problems
    assert (problem.line, problem.path) == (3, "instances.web.replicas"), problem
    with pytest.raises(ManifestError, match="cannot read"):
        ManifestCheck(tmp_path / "missing.yaml").result()


_READER_ON_USE = """
import re, sys
compile = re.compile
from supervisor.config import apart
apart._lean()
assert re.compile is compile, "re.compile is put back"
import yaml.reader
pattern = yaml.reader.Reader.NON_PRINTABLE
print(type(pattern).__name__, pattern._compiled)
try:
    yaml.reader.Reader("ok\\x07")  # the pure-Python reader checks what it reads
except yaml.reader.ReaderError as exc:
    print(str(exc).splitlines()[0])
print(type(pattern._compiled).__name__, pattern.pattern == yaml.reader.Reader.NON_PRINTABLE.pattern)
import yaml.resolver, yaml.constructor
resolvers = yaml.resolver.Resolver.yaml_implicit_resolvers.values()
lazy = [regexp for each in resolvers for _, regexp in each]
lazy.append(yaml.constructor.SafeConstructor.timestamp_regexp)
print(len(lazy) > 10, {type(regexp).__name__ for regexp in lazy}, {regexp._compiled for regexp in lazy})
print(yaml.safe_load("{a: 2001-12-14, b: yes, c: 0x1f, d: 1_000.5, e: ~}"))  # YAML 1.1, as PyYAML reads it
"""


def test_the_check_compiles_yaml_s_expressions_at_their_first_use(tmp_path: Path) -> None:
    """The check's child imports PyYAML with the expressions it compiles as it is imported
    compiled at their first use (the pure-Python reader's, 6 to 11 ms of every cold start, and
    the YAML 1.1 resolver's, config/apart.py): the reader still refuses what it refused, PyYAML
    still reads YAML 1.1 as it did, and a manifest with a control character is still refused
    by the check, with its place."""
    done = subprocess.run([sys.executable, "-c", _READER_ON_USE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "_CompiledOnUse None",
        "unacceptable character #x0007: special characters are not allowed",
        "Pattern True",
        "True {'_CompiledOnUse'} {None}",
        "{'a': datetime.date(2001, 12, 14), 'b': True, 'c': 31, 'd': 1000.5, 'e': None}",
    ], done.stdout
    bad = write_manifest(tmp_path, 'version: 1\ninstances:\n  a: {command: [sleep, "1\x07"]}\n')
    with pytest.raises(ManifestError, match=r"control character U\+0007") as found:
        ManifestCheck(bad, fork=True).result()
    assert [(p.line, p.column) for p in found.value.problems] == [(3, 26)]


@pytest.mark.anyio
async def test_a_reload_checks_in_a_child_beside_the_loop(tmp_path: Path) -> None:
    path = full_manifest(tmp_path)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        manifest = await check_apart(path)
        tg.cancel_scope.cancel()
    assert manifest == load_manifest(path)
    assert ticks > 10  # the loop went on while the child checked
    (tmp_path / "app.env").unlink()
    with pytest.raises(ManifestError, match=r"app\.env"):
        await check_apart(path)


def test_the_models_types_are_objects_not_text() -> None:
    """The modules of the manifest's pydantic models do without ``from __future__ import
    annotations``: pydantic then takes each field's type as it is, instead of compiling and
    evaluating its text (5 ms of every check, on the path of every cold start)."""
    import __future__

    for module in (models, checks, limits):
        assert getattr(module, "annotations", None) is not __future__.annotations, module.__name__
    for model in (models.InstanceConfig, models.Manifest, checks.ReadyCheck, limits.Limits):
        hints = inspect.get_annotations(model)
        assert hints and not any(isinstance(hint, str) for hint in hints.values()), model


@pytest.mark.parametrize("reap_later", [False, True], ids=["waited for", "reaped later"])
def test_a_child_that_dies_is_a_refusal_that_says_so(tmp_path: Path, reap_later: bool) -> None:
    """A check that crashes (here: its interpreter is killed) refuses the manifest, with why:
    also where a whole answer would have been taken before the child's end (``reap_later``),
    since a child that ends without one is waited for, and its status read."""
    path = full_manifest(tmp_path)
    check = ManifestCheck(path)
    os.kill(check.pid, 9)
    with pytest.raises(ManifestError, match="was killed by a signal"):
        check.result(reap_later=reap_later)


@pytest.mark.parametrize("fork", [True, False], ids=["fork", "new interpreter"])
def test_an_answer_is_taken_before_the_child_is_gone_and_the_child_is_left_to_reap(
    tmp_path: Path, fork: bool
) -> None:
    """The child closes its answer's pipes before it ends (its end, the kernel handing back
    pydantic's memory, took 2.5 to 5 ms of a cold start): with ``reap_later`` the parent takes
    the whole answer without waiting for that, and leaves a child that has not ended yet to
    whoever reaps its children (the service's orphan reaper; here, the test), or reaps one
    that has. ``abandon`` then kills nothing: the pid may be reaped and reused by then. Which
    of the two happens is the machine's timing; the answer and the child's good end are not."""

    def ended(check: ManifestCheck) -> int | None:
        if check._left_to_reap:  # still ours to reap
            _, status = os.waitpid(check.pid, 0)
            return os.waitstatus_to_exitcode(status)
        return check._status

    path = full_manifest(tmp_path)
    check = ManifestCheck(path, fork=fork)
    assert check.result(reap_later=True) == load_manifest(path)
    check.abandon()  # a no-op: answered
    assert ended(check) == 0
    text = "version: 1\ninstances:\n  web: {command: x, replicas: -1}\n"
    bad = write_manifest(tmp_path, text, name="bad.yaml")
    refused = ManifestCheck(bad, fork=fork)
    with pytest.raises(ManifestError, match="replicas"):  # the problems: an answer too
        refused.result(reap_later=True)
    refused.abandon()
    assert ended(refused) == 0


def test_the_serving_service_never_imports_pydantic(tmp_path: Path) -> None:
    """`supervisor run`, a status, a reload and a request with a body: pydantic stays out."""
    path = full_manifest(tmp_path)
    code = f"""
import json, sys, threading
from supervisor.api.client import Client
from supervisor.service_process import run_service

socket = {str(load_manifest(path).control_socket)!r}

def steer():
    client = Client(socket, timeout=30)
    client.status()
    client.reload()
    client.stop(["job"])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "pydantic_core"))
    print("LOADED", json.dumps(loaded), flush=True)
    client.request("POST", "/v1/shutdown", accept=(202,))

sys.exit(run_service({str(path)!r}, on_ready=lambda: threading.Thread(target=steer).start()))
"""
    argv = [sys.executable, "-c", code]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    [line] = [line for line in done.stdout.splitlines() if line.startswith("LOADED ")]
    assert line == "LOADED []", (line, done.stderr[-2000:])


HANGS = [sys.executable, "-c", "import signal; signal.pause()"]


def test_a_check_that_hangs_is_killed_and_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.config import apart

    monkeypatch.setattr(apart, "CHECK_TIMEOUT", 0.5)
    monkeypatch.setattr(apart, "child_argv", lambda *_, **__: HANGS)
    check = ManifestCheck(full_manifest(tmp_path))
    with pytest.raises(ManifestError, match=r"took longer than 0\.5s"):
        check.result()
    with pytest.raises(ProcessLookupError):
        os.kill(check.pid, 0)  # killed and reaped


@pytest.mark.anyio
async def test_a_reload_whose_check_hangs_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.config import apart

    monkeypatch.setattr(apart, "CHECK_TIMEOUT", 0.5)
    monkeypatch.setattr(apart, "child_argv", lambda *_, **__: HANGS)
    with pytest.raises(ManifestError, match=r"took longer than 0\.5s"):
        await check_apart(full_manifest(tmp_path))


def loads_pydantic_or_yaml(pid: int) -> list[str]:
    """The shared objects of pydantic-core and of PyYAML's C loader mapped in ``pid``."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    found = {line.split()[-1] for line in maps.splitlines() if "_pydantic_core" in line or "/_yaml" in line}
    return sorted(found)


def test_a_real_service_holds_no_pydantic_through_reload_requests_and_reexec(
    service: Callable[..., ServiceProcess],
) -> None:
    svc = service(
        "version: 1\ninstances:\n  a: {command: [sleep, '271.5']}\n  b: {command: [sleep, '271.5']}\n"
    )
    svc.wait_for(["a", "b"], "running")
    client = svc.client()
    client.reload()
    assert client.stop(["b"])["ok"]
    assert client.signal("HUP", ["a"])["ok"]
    assert loads_pydantic_or_yaml(svc.pid) == []
    done = svc.cli("reexec")
    assert done.returncode == 0, done.stderr + svc.log()
    assert client.health()["handoffs"] == 1
    assert svc.status("a", "b") and loads_pydantic_or_yaml(svc.pid) == []
    client.reload()
    assert loads_pydantic_or_yaml(svc.pid) == []
    # The probe of the probe: the document's route builds the wire models, in the service.
    client.request("GET", "/openapi.json")
    assert loads_pydantic_or_yaml(svc.pid) != []


def test_a_check_that_cannot_start_refuses_and_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor.config import apart

    path = full_manifest(tmp_path)
    before = set(os.listdir("/proc/self/fd"))
    missing = [str(tmp_path / "no-such-python"), "-c", "pass"]
    monkeypatch.setattr(apart, "child_argv", lambda *_, **__: missing)
    check = ManifestCheck(path, {"version": 1})
    with pytest.raises(ManifestError, match="the check of the manifest cannot start: No such file"):
        check.result()
    check.abandon()  # nothing to kill
    assert set(os.listdir("/proc/self/fd")) <= before | {str(fd) for fd in range(3)}


def running_with(marker: str) -> list[int]:
    """The processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.anyio
async def test_a_reload_cancelled_while_its_check_runs_leaves_no_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor.config import apart

    gate = tmp_path / "gate"
    os.mkfifo(gate)
    waits = [sys.executable, "-c", "import signal, sys; open(sys.argv[1], 'w'); signal.pause()", str(gate)]
    monkeypatch.setattr(apart, "child_argv", lambda *_, **__: waits)
    async with anyio.create_task_group() as tg:
        tg.start_soon(check_apart, full_manifest(tmp_path))
        with anyio.fail_after(30):
            await anyio.to_thread.run_sync(lambda: open(gate).close())  # the child is running
        assert running_with(str(gate))
        tg.cancel_scope.cancel()
    assert running_with(str(gate)) == []  # killed and reaped before the cancel went on


# A parent that starts a check of a manifest that is a fifo no one writes, says its child's
# pid and waits to be killed.
ORPHANING = """
import os, sys
from supervisor.config.apart import ManifestCheck
held = os.pipe()  # one inheritable (a --ready-fd, say), one not: a fork must hold neither
os.set_inheritable(held[1], True)
check = ManifestCheck(sys.argv[1], entry="tests.blocked_check", fork=sys.argv[2] == "fork")
print(check.pid, os.fstat(held[0]).st_ino, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("how", ["fork", "new interpreter"])
def test_a_check_whose_parent_dies_does_not_outlive_it(tmp_path: Path, how: str) -> None:
    """`supervisor run` killed while its check is stuck in a read leaves no child behind.

    The child (tests/blocked_check.py, in the check's own process) is blocked in the open of a
    fifo with no writer, where nothing else would ever wake it; its parent's death must. (The
    loader refuses a fifo; a stuck network mount blocks the same way.) A forked check (as
    `supervisor run` starts it) names itself for ps and holds only its own stdio.
    """
    import select
    import signal

    fifo = tmp_path / "supervisor.yaml"
    os.mkfifo(fifo)
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHANING, str(fifo), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child, held = (int(word) for word in parent.stdout.readline().split())
    watched = os.pidfd_open(child)
    try:
        # The child is still checking (on its way to the fifo, or blocked on it) while its parent lives.
        assert select.select([watched], [], [], 0)[0] == []
        if how == "fork":
            comm = Path(f"/proc/{child}/comm")
            deadline = time.monotonic() + 30
            while comm.read_text().strip() != "procward-check":  # named once its descriptors are closed
                assert time.monotonic() < deadline and not select.select([watched], [], [], 0.001)[0]
            fds = {}
            for fd in os.listdir(f"/proc/{child}/fd"):  # what it opens itself (its imports) comes and goes
                with contextlib.suppress(FileNotFoundError):
                    fds[int(fd)] = os.readlink(f"/proc/{child}/fd/{fd}")
            assert f"pipe:[{held}]" not in fds.values(), fds  # the parent's, inheritable or not
            assert fds[0] == os.devnull and fds[1].startswith("pipe:") and fds[2].startswith("pipe:"), fds
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        ended, _, _ = select.select([watched], [], [], 30)  # readable once the child has ended
        assert ended == [watched], "the check outlived its parent"
    finally:
        if not select.select([watched], [], [], 0)[0]:  # a failed run leaves no orphan either
            signal.pidfd_send_signal(watched, signal.SIGKILL)
        os.close(watched)
        parent.stdin.close()  # type: ignore[union-attr]


def test_the_parent_watch_cannot_end_a_check_that_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch's timer is off before the check answers: the interpreter gives SIGALRM its default
    action back as it exits, and a tick then ended the process ("killed by a signal") after it had
    answered. With a tick every millisecond, each exit met one; with the 1 s period, once in a few
    hundred checks that outlasted a second (a re-exec's check under load, in CI)."""
    from supervisor.config import apart

    monkeypatch.setattr(apart, "ORPHAN_CHECK_PERIOD", 0.001)
    path = write_manifest(tmp_path, "version: 1\ninstances:\n  one: {command: [sleep, '1']}\n")
    for _ in range(3):
        manifest = ManifestCheck(path).result()
        assert list(manifest.instances) == ["one"]


@pytest.mark.parametrize("kind", ["fifo", "symlink to a fifo", "folder", "/dev/zero"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """Not read, not waited on: a fifo with no writer would hold the check (and a reload) for good."""
    path = tmp_path / "supervisor.yaml"
    if kind == "/dev/zero":
        path = Path("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(tmp_path / "fifo")
        if kind == "fifo":
            path = tmp_path / "fifo"
        else:
            path.symlink_to(tmp_path / "fifo")
    validate = [sys.executable, "-m", "supervisor", "validate", "-f", str(path)]
    done = subprocess.run(validate, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"{path}: cannot read: not a regular file" in done.stderr, done.stderr


def test_a_symlink_to_a_manifest_is_read_through(tmp_path: Path) -> None:
    """Only what the link points to is judged: a link to a regular file is that file."""
    target = full_manifest(tmp_path)
    link = tmp_path / "linked.yaml"
    link.symlink_to(target)
    assert ManifestCheck(link).result() == load_manifest(target)


def test_a_manifest_path_with_a_nul_is_one_problem_that_shows_it() -> None:
    """Only code can pass one (argv cannot hold a NUL); refused with a message, not a traceback."""
    with pytest.raises(ManifestError) as caught:
        load_manifest("app\0.yaml")
    assert str(caught.value.problems[0]) == "app\\0.yaml: cannot read: a NUL byte is not allowed in a path"
