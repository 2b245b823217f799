"""Per-instance limits: the manifest keys, what the running program gets, and the memory restart.

The spawn tests read the limits back from /proc of the program itself (the shell that the
launcher and its gate exec into), on the util-linux path and on the Python fallback.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import yaml

from supervisor import launcher
from supervisor.config import Limits, ManifestError, Problem, load_manifest
from supervisor.config import limits as models
from supervisor.config.loader import settled
from supervisor.config.records import as_data
from supervisor.convert import kubernetes, read_source, systemd
from supervisor.events import State, Transition
from supervisor.process import ChildLimits, SpawnError, spawn

from .helpers import manifest_from, running, wait_for_output
from .service_fixture import ServiceProcess

pytestmark = pytest.mark.anyio


def limits_of(tmp_path: Path, body: str) -> Limits:
    path = tmp_path / "supervisor.yaml"
    path.write_text(f"version: 1\ninstances:\n  web:\n    command: run-web\n    limits:\n      {body}\n")
    return load_manifest(path, {}).instances["web"].limits


def problem_of(tmp_path: Path, body: str) -> Problem:
    path = tmp_path / "supervisor.yaml"
    path.write_text(f"version: 1\ninstances:\n  web:\n    command: run-web\n    limits:\n      {body}\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, {})
    (problem,) = caught.value.problems
    assert problem.file == str(path)
    return problem


# -- the manifest ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("1024", "1024:1024"),
        ("unlimited", "unlimited:unlimited"),
        ("'1024:4096'", "1024:4096"),
        ("'0:unlimited'", "0:unlimited"),
        ("' 64 : 128 '", "64:128"),
    ],
)
def test_an_rlimit_is_kept_as_soft_and_hard(tmp_path: Path, written: str, kept: str) -> None:
    limits = limits_of(tmp_path, f"nofile: {written}")
    assert limits.nofile == kept
    assert limits.rlimits() == {"nofile": kept}


def test_every_key_loads_and_dumps_back_as_written(tmp_path: Path) -> None:
    limits = limits_of(
        tmp_path,
        "{memory: 512MB, memory_interval: 2s, nice: 5, oom_score_adj: -100, as: unlimited, core: 0, "
        "cpu: '10:20', nproc: 100, fsize: 1048576, stack: 8388608, memlock: 65536, data: unlimited}",
    )
    model = models.Limits.model_validate(as_data(limits))  # what a reload reads back
    dumped = model.model_dump()
    assert dumped["memory"] == 512 * 1024**2
    assert dumped["memory_interval"] == "2s"
    assert (dumped["nice"], dumped["oom_score_adj"]) == (5, -100)
    assert dumped["as"] == "unlimited:unlimited" and "as_" not in dumped
    assert limits.rlimits()["cpu"] == "10:20"
    assert settled(models.Limits.model_validate(dumped)) == limits == settled(model)
    assert as_data(limits)["as"] == "unlimited:unlimited"  # the re-exec's record writes it as written


def test_no_limits_by_default(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.yaml"
    path.write_text("version: 1\ninstances:\n  web:\n    command: run-web\n")
    limits = load_manifest(path, {}).instances["web"].limits
    assert limits.memory is None and limits.nice is None and limits.oom_score_adj is None
    assert limits.rlimits() == {}


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ("nice: 20", "nice", "less than or equal to 19"),
        ("nice: -21", "nice", "greater than or equal to -20"),
        ("nice: .nan", "nice", "valid integer"),
        ("nice: '5'", "nice", "expected a number, not the text '5'"),
        ("oom_score_adj: 1001", "oom_score_adj", "less than or equal to 1000"),
        ("oom_score_adj: 1e400", "oom_score_adj", "valid integer"),
        ("nofile: -1", "nofile", "a limit cannot be negative"),
        ("nofile: 99999999999999999999999999", "nofile", "larger than the largest limit allowed"),
        ("nofile: '99999999999999999999999999999:1'", "nofile", "larger than the largest limit allowed"),
        ("nofile: '4096:1024'", "nofile", "the soft limit 4096 is above the hard limit 1024"),
        ("nofile: 'unlimited:1024'", "nofile", "the soft limit unlimited is above the hard limit 1024"),
        ("nofile: \"12\\0\"", "nofile", "a NUL character"),
        ("nofile: .nan", "nofile", "is not a limit"),
        ("nofile: 1.5", "nofile", "is not a limit"),
        ("nofile: true", "nofile", "is not a limit"),
        ("nofile: '١٢'", "nofile", "is not a limit"),  # Arabic-Indic digits: isdigit() but not prlimit's
        ("core: lots", "core", "is not a limit"),
        ("memory: .nan", "memory", "is not a size"),
        ("memory: -1", "memory", "a size cannot be negative"),
        ("memory: 2TB", "memory", "'2TB' is not a size"),
        ("memory: 2048GB", "memory", "larger than the largest size allowed"),
        ("memory: 0", "memory", "greater than 0"),
        ("memory_interval: 0", "memory_interval", "greater than or equal to 0.1"),
        ("memory_interval: .inf", "memory_interval", "a duration must be a finite number"),
        ("nofiles: 10", "nofiles", "unknown key 'nofiles' (did you mean 'nofile'?)"),
    ],
)
def test_hostile_limits_are_refused_with_their_place(
    tmp_path: Path, body: str, key: str, message: str
) -> None:
    problem = problem_of(tmp_path, body)
    assert problem.path == f"instances.web.limits.{key}"
    assert message in problem.message
    assert problem.line == 6


# -- what the program gets ------------------------------------------------------------------------

READ_BACK = 'cat /proc/$$/limits; echo "oom $(cat /proc/$$/oom_score_adj)"; echo "stat $(cat /proc/$$/stat)"'


async def read_back(limits: ChildLimits) -> tuple[dict[str, tuple[str, str]], int, int]:
    """Run a shell that prints its own limits; (soft, hard) by /proc/PID/limits row, oom, nice."""
    out_r, out_w = os.pipe()
    child = spawn(["sh", "-c", READ_BACK], stdin=None, stdout=out_w, stderr=None, limits=limits)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as out:
        text = (await anyio.to_thread.run_sync(out.read)).decode()
    status = await child.wait()
    assert status.code == 0, text
    rows: dict[str, tuple[str, str]] = {}
    oom = nice = None
    for line in text.splitlines():
        if line.startswith("oom "):
            oom = int(line.split()[1])
        elif line.startswith("stat "):
            fields = line[line.rfind(")") + 2 :].split()
            nice = int(fields[16])  # field 19 of /proc/PID/stat, counted from the state (field 3)
        elif line.startswith("Max "):
            name = line[:26].strip()
            soft, hard = line[26:].split()[:2]
            rows[name] = (soft, hard)
    assert oom is not None and nice is not None
    return rows, oom, nice


def test_the_open_files_limit_alone_is_set_by_the_gate_without_prlimit(tmp_path: Path) -> None:
    """The shell's ``ulimit -n`` sets it: one exec less per spawn; other limits still need prlimit,
    and a shell that cannot set it gets prlimit for it too."""
    import signal

    found = launcher.argv_before(signal.SIGKILL, (1024, 4096), None, None, ChildLimits())
    if not found:
        pytest.skip("util-linux setpriv is missing: the preexec path sets the limits")
    assert not any(arg.endswith("prlimit") for arg in found)
    script = found[found.index("-c") + 1]
    assert "ulimit -S -n 1024" in script and "ulimit -H -n 4096" in script
    core = launcher.argv_before(signal.SIGKILL, (1024, 4096), None, None, ChildLimits({"core": (0, 0)}))
    assert core[0].endswith("prlimit") and core[1:3] == ["--core=0:0", "--"]
    assert "ulimit -S -n 1024" in core[core.index("-c") + 1]

    refuses = tmp_path / "sh-without-ulimit"
    refuses.write_text("#!/bin/sh\nexit 2\n")
    refuses.chmod(0o755)
    assert not launcher._shell_sets_nofile(str(refuses))
    assert launcher._shell_sets_nofile(found[found.index("-c") - 1])


def test_a_shell_that_cannot_set_the_open_files_limit_leaves_it_to_prlimit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import signal

    if not launcher.argv_before(signal.SIGKILL, (1024, 4096), None, None, ChildLimits()):
        pytest.skip("util-linux setpriv is missing: the preexec path sets the limits")
    monkeypatch.setattr(launcher, "_gate_sets_nofile", False)
    found = launcher.argv_before(signal.SIGKILL, (1024, 4096), None, None, ChildLimits())
    assert found[0].endswith("prlimit") and found[1:3] == ["--nofile=1024:4096", "--"]
    assert "ulimit" not in found[found.index("-c") + 1]


@pytest.fixture(params=["launcher", "preexec"])
def path_taken(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(launcher, "USE_LAUNCHER", request.param == "launcher")
    return str(request.param)


async def test_the_program_runs_with_its_limits(path_taken: str) -> None:
    limits = ChildLimits(
        {
            "nofile": (256, 512),
            "core": (0, resource.RLIM_INFINITY),
            "nproc": (4000, 5000),
            "cpu": (100, 200),
            "fsize": (1 << 30, 1 << 30),
        },
        nice=7,
        oom_score_adj=321,
    )
    rows, oom, nice = await read_back(limits)
    assert rows["Max open files"] == ("256", "512")
    assert rows["Max core file size"] == ("0", "unlimited")
    assert rows["Max processes"] == ("4000", "5000")
    assert rows["Max cpu time"] == ("100", "200")
    assert rows["Max file size"] == (str(1 << 30), str(1 << 30))
    assert (oom, nice) == (321, 7)


def _may_raise_hard_limits() -> bool:
    """CAP_SYS_RESOURCE (bit 24) in this process's effective set."""
    status = Path("/proc/self/status").read_text()
    effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    return bool(effective >> 24 & 1)


async def test_both_sides_of_a_higher_open_files_limit_are_raised_where_the_service_may(
    path_taken: str,
) -> None:
    """The shell sets one side at a time, and the kernel refuses a soft limit over the hard one:
    raising both, the gate sets the hard side first (prlimit sets both at once)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    if hard == resource.RLIM_INFINITY or hard >= nr_open:
        pytest.skip(f"the hard fd limit ({hard}) is fs.nr_open already: nothing above it to raise it to")
    if not _may_raise_hard_limits():
        pytest.skip("raising a hard limit needs CAP_SYS_RESOURCE, which this process lacks")
    target = min(hard + 1000, nr_open)
    rows, _, _ = await read_back(ChildLimits({"nofile": (target, target)}))
    assert rows["Max open files"] == (str(target), str(target))


async def test_without_limits_the_program_keeps_the_services_values(path_taken: str) -> None:
    rows, oom, nice = await read_back(ChildLimits())
    assert oom == int(Path("/proc/self/oom_score_adj").read_text())
    assert nice == os.getpriority(os.PRIO_PROCESS, 0)
    core = resource.getrlimit(resource.RLIMIT_CORE)
    shown = tuple("unlimited" if v == resource.RLIM_INFINITY else str(v) for v in core)
    assert rows["Max core file size"] == shown


async def test_a_limit_the_kernel_refuses_keeps_the_program_from_running(
    path_taken: str, tmp_path: Path
) -> None:
    """Even root cannot raise the fd limit past fs.nr_open: the program must not run without it."""
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    marker = tmp_path / "ran"
    limits = ChildLimits({"nofile": (nr_open + 1, nr_open + 1)})
    argv = ["sh", "-c", f"touch {marker}"]
    err_r, err_w = os.pipe()
    try:
        child = spawn(argv, stdin=None, stdout=None, stderr=err_w, limits=limits)
    except SpawnError:
        assert path_taken == "preexec"
    else:
        os.close(err_w)
        err_w = -1
        status = await child.wait()
        assert status.code not in (0, None)
        with os.fdopen(err_r, "rb") as err:
            assert b"NOFILE" in err.read()
        err_r = -1
    finally:
        for fd in (err_r, err_w):
            if fd >= 0:
                os.close(fd)
    assert not marker.exists()


async def test_the_manifest_limits_reach_an_instances_program(tmp_path: Path) -> None:
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          app:
            command: [{sys.executable}, -c, "import signal; print('up', flush=True); signal.pause()"]
            limits: {{nice: 3, oom_score_adj: 250, nofile: '100:200', core: 0}}
            restart: {{min_uptime: 0}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, _events):
        # The gate sets nice and oom_score_adj after the spawn returns: wait for the program itself.
        await wait_for_output(manager.instances["app"], b"up")
        pid = manager.instances["app"].pid
        assert pid is not None
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["100", "200"]
                   for line in limits.splitlines())
        assert any(line.startswith("Max core file size") and line.split()[4:6] == ["0", "0"]
                   for line in limits.splitlines())
        assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "250"
        assert os.getpriority(os.PRIO_PROCESS, pid) == 3


# -- limits.memory --------------------------------------------------------------------------------

ALLOCATE = "import signal\nx = b'\\1' * (120 << 20)\nprint('allocated', flush=True)\nsignal.pause()\n"


def allocating_program(folder: Path) -> Path:
    """A program that touches 120MB and waits: b'\\1' * N writes every page (bytearray(N) would not)."""
    path = folder / "allocate.py"
    path.write_text(ALLOCATE)
    return path


def _backoff(name: str) -> object:
    return lambda e: isinstance(e, Transition) and e.instance == name and e.to_state is State.BACKOFF


async def test_a_program_over_its_memory_limit_is_restarted_with_the_reason(tmp_path: Path) -> None:
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          hog:
            command: [{sys.executable}, {allocating_program(tmp_path)}]
            limits: {{memory: 60MB, memory_interval: 300ms}}
            restart: {{min_uptime: 0, backoff: {{initial: 10ms}}}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        first = await events.wait_for(lambda e: e.instance == "hog" and e.to_state is State.RUNNING)
        backoff = await events.wait_for(_backoff("hog"), timeout=30)
        assert backoff.reason is not None
        assert backoff.reason.startswith("memory: RSS ")
        assert backoff.reason.endswith(" over the limit 60MiB for 0.3s")
        rss = int(backoff.reason.split()[2].removesuffix("MiB"))
        assert 60 < rss < 400
        updates = [u for u in events.updates if u.kind == "memory"]
        assert updates and updates[0].ok is False and updates[0].message == backoff.reason
        assert first.pid is not None and not Path(f"/proc/{first.pid}").exists()
        # Restarted as after a crash: a second run, with a new pid.
        await events.until(lambda: len([e for e in events.of("hog") if e.to_state is State.RUNNING]) == 2)
        assert manager.instances["hog"].pid != first.pid


async def test_a_program_under_its_memory_limit_keeps_running(tmp_path: Path) -> None:
    """The same program under a limit above its RSS: no restart while a second one is cut."""
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          small:
            command: [{sys.executable}, {allocating_program(tmp_path)}]
            limits: {{memory: 1GB, memory_interval: 300ms}}
            restart: {{min_uptime: 0}}
          hog:
            command: [{sys.executable}, {allocating_program(tmp_path)}]
            limits: {{memory: 60MB, memory_interval: 300ms}}
            restart: {{min_uptime: 0, backoff: {{initial: 10ms}}}}
        """,
        tmp_path,
    )
    async with running(manifest) as (_manager, events):
        # hog is read as often as small and needs the same interval: by its second run, small
        # had more than that time over nothing to report.
        await events.until(lambda: len([e for e in events.of("hog") if e.to_state is State.RUNNING]) == 2,
                           timeout=30)
        assert [e.to_state for e in events.of("small")] == [State.STARTING, State.RUNNING]
        assert not [u for u in events.updates if u.kind == "memory" and u.instance == "small"]


def test_allocate_program_really_allocates() -> None:
    """The memory tests rely on this: b'\\1' * N touches every page (a bytearray(N) would not)."""
    code = ALLOCATE.replace("signal.pause()", "print(open('/proc/self/statm').read().split()[1])")
    assert code != ALLOCATE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    pages = int(out.split()[-1])
    assert pages * os.sysconf("SC_PAGE_SIZE") > 100 << 20


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
@pytest.mark.parametrize(
    ("limits", "said"),
    [
        (ChildLimits(oom_score_adj=-100), b"cannot set oom_score_adj to -100"),
        (ChildLimits(nice=-5), b"renice"),
    ],
)
async def test_a_privileged_limit_under_an_unprivileged_user_is_refused(
    path_taken: str, limits: ChildLimits, said: bytes
) -> None:
    """Set as the instance's user: nobody may not lower its oom_score_adj or its nice value."""
    if int(Path("/proc/self/oom_score_adj").read_text()) != 0 or os.getpriority(os.PRIO_PROCESS, 0) != 0:
        pytest.skip("the test runs with a changed oom_score_adj or nice")
    err_r, err_w = os.pipe()
    try:
        argv = ["sh", "-c", "echo the program ran >&2"]
        child = spawn(argv, stdin=None, stdout=None, stderr=err_w, user="nobody", limits=limits)
    except SpawnError:
        assert path_taken == "preexec"
    else:
        os.close(err_w)
        err_w = -1
        status = await child.wait()
        assert status.code == 125
        with os.fdopen(err_r, "rb") as err:
            said_by_the_gate = err.read()
        assert said in said_by_the_gate and b"the program ran" not in said_by_the_gate
        err_r = -1
    finally:
        for fd in (err_r, err_w):
            if fd >= 0:
                os.close(fd)


# -- export ---------------------------------------------------------------------------------------

EXPORTED = """\
version: 1
instances:
  worker:
    command: /usr/bin/env true
    limits:
      memory: 256MB
      nice: 5
      oom_score_adj: 100
      nofile: '1024:4096'
      core: unlimited
"""


def test_systemd_export_carries_the_limits(tmp_path: Path) -> None:
    source = tmp_path / "supervisor.yaml"
    source.write_text(EXPORTED)
    systemd_version = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=True)
    result = systemd.export(
        read_source(source), source, name="jobs", version=int(systemd_version.stdout.split()[1])
    )
    unit = result.files["jobs-worker.service"]

    def values(key: str) -> list[str]:
        return re.findall(rf"^{key}=(.*)$", unit, re.MULTILINE)

    assert values("Nice") == ["5"] and values("OOMScoreAdjust") == ["100"]
    assert values("LimitNOFILE") == ["1024:4096"] and values("LimitCORE") == ["infinity:infinity"]
    assert values("MemoryMax") == [str(256 * 1024**2)]
    notes = "\n".join(map(str, result.notes))
    assert "supervisor.yaml:6: worker.limits.memory: approximated" in notes
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: `make test` installs Debian's systemd package")
    units = tmp_path / "units"
    units.mkdir()
    for name, text in result.files.items():
        (units / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in units.iterdir())],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and not done.stdout and not done.stderr, done.stdout + done.stderr


def test_kubernetes_export_caps_memory_and_says_what_it_drops(tmp_path: Path) -> None:
    source = tmp_path / "supervisor.yaml"
    source.write_text(EXPORTED)
    result = kubernetes.export(read_source(source), source, name="jobs", image="busybox:1")
    docs = [doc for text in result.files.values() for doc in yaml.safe_load_all(text)]
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"limits": {"memory": str(256 * 1024**2)}}
    notes = "\n".join(map(str, result.notes))
    assert "worker.limits.memory: approximated" in notes
    for key in ("nice", "oom_score_adj", "nofile", "core"):
        assert f"worker.limits.{key}: dropped" in notes


def test_the_service_says_once_how_a_memory_limit_is_enforced(
    service: Callable[..., ServiceProcess],
) -> None:
    svc = service(
        """
        version: 1
        instances:
          capped: {command: [sleep, "300"], limits: {memory: 1GB}}
          plain: {command: [sleep, "300"]}
        """
    )
    svc.wait_log("limits.memory is enforced by restarting an instance whose group stays over it")
    assert svc.log().count("limits.memory is enforced") == 1
