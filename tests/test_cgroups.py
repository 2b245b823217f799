"""Per-instance cgroups (v2): the manifest keys, and real cgroups made, joined, killed and removed.

The service tests run a real ``supervisor run`` as root and look at the kernel's own files
(/proc/PID/cgroup, cgroup.procs, memory.max). Where a controller is missing (a hybrid
machine whose memory and cpu controllers are held by cgroup v1) they check the fallback
and the refusal instead of the limit; they are skipped only where cgroup v2 is not
writable at all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from supervisor import launcher as launcher_module
from supervisor import orphans, process
from supervisor.cgroups import CgroupError, CgroupTree, cpu_max, find_v2_mount, own_cgroup
from supervisor.config import ManifestError, load_manifest
from supervisor.resources import ResourceSampler

from .service_fixture import ServiceProcess, pid_gone, write_manifest

Start = Callable[..., ServiceProcess]


def _v2_writable() -> str | None:
    """Why cgroup v2 cannot be written here, or None when it can."""
    mount = find_v2_mount()
    own = own_cgroup()
    if mount is None or own is None:
        return "no cgroup2 filesystem mounted"
    if not os.access(os.path.normpath(mount + own), os.W_OK):
        return f"cgroup v2 folder {mount}{own} is not writable by this user"
    return None


WHY_NOT = _v2_writable()
needs_v2 = pytest.mark.skipif(WHY_NOT is not None, reason=f"cgroup v2 is not writable here: {WHY_NOT}")


def _controllers_here() -> set[str]:
    """The controllers a service started by this test gets (offered to the cgroup it would make)."""
    mount, own = find_v2_mount(), own_cgroup()
    assert mount is not None and own is not None
    with open(os.path.join(os.path.normpath(mount + own), "cgroup.controllers")) as f:
        return set(f.read().split())


def cgroup_of(pid: int) -> str:
    """The folder of ``pid``'s cgroup v2, from the kernel's own /proc/PID/cgroup."""
    with open(f"/proc/{pid}/cgroup") as f:
        line = next(line for line in f if line.startswith("0::"))
    mount = find_v2_mount()
    assert mount is not None
    return os.path.normpath(mount + line[3:].strip())


# -- the manifest ---------------------------------------------------------------------------------


def problem_text(tmp_path: Path, body: str) -> str:
    path = tmp_path / "supervisor.yaml"
    path.write_text(body)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, {})
    return str(caught.value)


@pytest.mark.parametrize(
    ("written", "cpus"),
    [("0.5", 0.5), ("'50%'", 0.5), ("2", 2.0), ("'250 %'", 2.5), ("0.01", 0.01), ("4096", 4096.0)],
)
def test_cpu_quota_is_cpus_or_a_percentage(tmp_path: Path, written: str, cpus: float) -> None:
    path = tmp_path / "supervisor.yaml"
    path.write_text(f"version: 1\ninstances:\n  web:\n    command: w\n    limits: {{cpu_quota: {written}}}\n")
    assert load_manifest(path, {}).instances["web"].limits.cpu_quota == cpus


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("cpu_quota: .nan", "a CPU quota must be a finite number"),
        ("cpu_quota: .inf", "a CPU quota must be a finite number"),
        ("cpu_quota: -1", "below the smallest CPU quota"),
        ("cpu_quota: 0", "below the smallest CPU quota"),
        ("cpu_quota: '0.5%'", "below the smallest CPU quota"),
        ("cpu_quota: 99999999999999999999999999", "more than 4096 CPUs"),
        ("cpu_quota: 1e300", "more than 4096 CPUs"),
        ("cpu_quota: \"1\\0\"", "a NUL character"),
        ("cpu_quota: '١'", "is not a CPU quota"),
        ("cpu_quota: 1e3%", "is not a CPU quota"),
        ("cpu_quota: true", "expected a number of CPUs"),
        ("memory_max: 1000", "greater than or equal to 1048576"),
        ("memory_max: .nan", "is not a size"),
        ("memory_max: -1", "a size cannot be negative"),
        ("memory_max: 2048GB", "larger than the largest size allowed"),
    ],
)
def test_hostile_cgroup_limits_are_refused_with_their_place(tmp_path: Path, body: str, message: str) -> None:
    manifest = f"version: 1\ninstances:\n  web:\n    command: w\n    limits:\n      {body}\n"
    text = problem_text(tmp_path, manifest)
    key = body.partition(":")[0]
    assert "supervisor.yaml:6:" in text and f"instances.web.limits.{key}" in text, text
    assert message in text


def test_the_cgroups_switch_takes_three_words(tmp_path: Path) -> None:
    text = problem_text(tmp_path, "version: 1\nsupervisor: {cgroups: yes}\ninstances: {}\n")
    assert "supervisor.cgroups" in text and "'auto', 'off' or 'required'" in text


def test_cpu_max_is_written_as_systemd_writes_cpu_quota() -> None:
    assert cpu_max(0.5) == "50000 100000"
    assert cpu_max(2) == "200000 100000"
    assert cpu_max(0.01) == "1000 100000"
    assert cpu_max(None) == "max 100000"


def test_the_mount_and_own_cgroup_come_from_proc_files(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /mnt/my\\040cgroups rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert find_v2_mount(str(mountinfo)) == "/mnt/my cgroups"
    mountinfo.write_text("35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    assert find_v2_mount(str(mountinfo)) is None
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("4:memory:/x\n0::/system.slice/procward.service\n")
    assert own_cgroup(str(cgroup)) == "/system.slice/procward.service"
    cgroup.write_text("4:memory:/x\n")
    assert own_cgroup(str(cgroup)) is None


# -- in the test's own process: spawn into a cgroup, kill it, wait until it is empty ---------------

pytest_anyio = pytest.mark.anyio


@needs_v2
@pytest_anyio
async def test_spawn_puts_the_child_in_the_cgroup_and_a_kill_empties_it(tmp_path: Path) -> None:
    tree = CgroupTree.open(())
    try:
        cgroup = tree.instance(f"test-{uuid.uuid4().hex[:8]}")
        read, write = os.pipe()
        try:
            child = process.spawn(
                ["sh", "-c", "setsid sh -c 'echo forked; exec sleep 300' & exec sleep 300"],
                stdin=None,
                stdout=write,
                stderr=None,
                cgroup=cgroup,
            )
            os.close(write)
            with anyio.fail_after(10):
                await anyio.wait_readable(read)
            assert os.read(read, 100) == b"forked\n"
        finally:
            os.close(read)
        assert cgroup_of(child.pid) == cgroup.path
        members = cgroup.pids()
        assert child.pid in members and len(members) == 2  # the setsid'd sleep was forked inside
        assert cgroup.populated()
        # The figures of a group with a cgroup count what left the group, read from cgroup.procs.
        sampler = ResourceSampler(max_age=0)
        assert sampler.figures([child.pid])[child.pid].processes == 1
        assert sampler.figures([child.pid], {child.pid: cgroup.path})[child.pid].processes == 2
        cgroup.kill()
        with anyio.fail_after(10):
            await child.wait()
        assert child.exit is not None and child.exit.signal == signal.SIGKILL
        assert await cgroup.wait_empty(10)
        orphans.reap_orphans()
        cgroup.remove()
        assert not os.path.exists(cgroup.path)
    finally:
        for leftover in os.scandir(tree.root):  # a failed assertion must not leave processes behind
            if leftover.is_dir():
                await close_cgroup(leftover.path)
        tree.close()
    if tree.made:
        assert not os.path.exists(tree.root)


@needs_v2
@pytest.mark.parametrize("launcher", [True, False], ids=["util-linux", "python"])
def test_a_child_that_cannot_join_its_cgroup_does_not_run(
    tmp_path: Path, launcher: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher_module, "USE_LAUNCHER", launcher)
    tree = CgroupTree.open(())
    try:
        cgroup = tree.instance(f"test-{uuid.uuid4().hex[:8]}")
        cgroup.remove()  # gone before the spawn: the child must not run outside it
        marker = tmp_path / "ran"
        err = tmp_path / "stderr"
        with err.open("wb") as stderr:
            try:
                child = process.spawn(
                    ["touch", str(marker)], stdin=None, stdout=None, stderr=stderr.fileno(), cgroup=cgroup
                )
            except process.SpawnError as exc:  # the Python path: the child's own error, from Popen
                assert not launcher, exc
            else:  # behind the launcher: the gate refuses, as for a limit it cannot set
                assert launcher
                status = anyio.run(child.wait)
                assert status.code == 125
                assert "supervisor: cannot join cgroup" in err.read_text()
        assert not marker.exists()
    finally:
        tree.close()


TREE_OF = "from supervisor.cgroups import CgroupTree; tree = CgroupTree.open(()); print(tree.root, tree.made)"


@needs_v2
def test_alone_in_its_cgroup_the_service_moves_into_a_leaf_and_finds_it_again(tmp_path: Path) -> None:
    """Delegated (alone in a cgroup): into X/service, instances beside it; after a re-exec, the same X."""
    mount, own = find_v2_mount(), own_cgroup()
    assert mount is not None and own is not None
    delegated = os.path.join(os.path.normpath(mount + own), f"procward.test-{uuid.uuid4().hex[:8]}")
    os.mkdir(delegated)
    try:
        for where in (delegated, os.path.join(delegated, "service")):  # the second: as after a re-exec
            procs = os.path.join(where, "cgroup.procs")
            enter = f"import os; open({procs!r}, 'w').write(str(os.getpid())); "
            command = [sys.executable, "-c", enter + TREE_OF]
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
            assert result.returncode == 0, result.stderr
            assert result.stdout.split() == [delegated, "False"]  # its own cgroup, not one made inside
            assert os.path.isdir(os.path.join(delegated, "service"))
            assert Path(delegated, "cgroup.procs").read_text() == ""  # nobody left in X: it moved
    finally:
        for folder in (os.path.join(delegated, "service"), delegated):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(folder)


@needs_v2
def test_a_group_that_has_not_joined_its_cgroup_yet_is_read_without_it() -> None:
    """Just after a spawn the instance's cgroup is empty (its gate writes its pid there first
    thing): a status asked then had no figures, and kept none for the next second's requests."""
    tree = CgroupTree.open(())
    try:
        cgroup = tree.instance(f"test-{uuid.uuid4().hex[:8]}")
        proc = subprocess.Popen(["sleep", "300"], start_new_session=True)  # not in the cgroup
        try:
            assert cgroup.pids() == []
            whole = ResourceSampler(max_age=0).figures([proc.pid], {proc.pid: cgroup.path})
            assert whole[proc.pid].processes == 1, whole
            quick = ResourceSampler(max_age=0).quick([proc.pid], {proc.pid: cgroup.path})
            assert quick[proc.pid].processes == 1, quick
        finally:
            proc.kill()
            proc.wait()
        cgroup.remove()
    finally:
        tree.close()


async def close_cgroup(path: str) -> None:
    from supervisor.cgroups import InstanceCgroup

    with contextlib.suppress(CgroupError):
        await InstanceCgroup(path, frozenset()).close()


def test_an_instance_cgroup_is_made_again_with_its_root_and_a_file_in_its_place_is_an_error(
    tmp_path: Path,
) -> None:
    """One mkdir where the root is there; the root made again where it went (a guardian's sweep
    of empty trees); a cgroup there already is found; a file by its name is a clear error."""
    tree = CgroupTree(str(tmp_path), str(tmp_path / "procward-1"), frozenset())
    os.mkdir(tree.root)
    first = tree.instance("web")
    assert os.path.isdir(first.path) and first.path.startswith(tree.root + "/")
    assert tree.instance("web").path == first.path  # there already: the same one
    os.rmdir(first.path)
    os.rmdir(tree.root)
    assert os.path.isdir(tree.instance("web").path)  # with its root
    Path(tree.root, "db" + os.path.basename(first.path).removeprefix("web")).write_text("")
    with pytest.raises(CgroupError, match=r"cannot make the cgroup .*db"):
        tree.instance("db")


def test_wait_empty_raises_nothing_for_a_cgroup_that_is_gone(tmp_path: Path) -> None:
    from supervisor.cgroups import InstanceCgroup

    gone = InstanceCgroup(str(tmp_path / "nowhere"), frozenset())
    assert not gone.populated()
    assert anyio.run(gone.wait_empty, 1.0)
    gone.remove()  # gone already: fine
    with pytest.raises(CgroupError, match="cannot move pid"):
        gone.join(os.getpid())


# -- a real service ---------------------------------------------------------------------------------

SETSID = """
version: 1
instances:
  web:
    command: ["sh", "-c", "setsid sh -c 'echo $$$$ > {pidfile}; exec sleep 301' & exec sleep 300"]
    restart: {{min_uptime: 0}}
"""


def instance_cgroup(svc: ServiceProcess, name: str) -> str:
    """The folder of the instance's cgroup, once its process is in it.

    ``running`` can come at the spawn (``min_uptime: 0``), while the child still runs the
    launcher: the gate moves it into its cgroup just before the program runs.
    """
    pid = svc.status(name)[name]["pid"]
    svc.wait_until(lambda: cgroup_of(pid).endswith(f"/{name}.instance"), 10, f"{name} in its cgroup")
    return cgroup_of(pid)


def _grandchild(svc: ServiceProcess, pidfile: Path) -> int:
    svc.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 20, "the grandchild's pid")
    return int(pidfile.read_text())


@needs_v2
def test_each_instance_runs_in_its_own_cgroup_and_a_stop_kills_what_left_the_group(
    service: Start, tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    svc = service(SETSID.format(pidfile=pidfile))
    svc.wait_for(["web"], "running")
    pid = svc.status("web")["web"]["pid"]
    grandchild = _grandchild(svc, pidfile)
    assert not pid_gone(grandchild)
    folder = cgroup_of(pid)
    assert folder.endswith("/web.instance")
    assert cgroup_of(grandchild) == folder  # in another session, but not in another cgroup
    tree = os.path.dirname(folder)
    if os.path.basename(tree).startswith("procward-"):  # the guardian's: alone there, it moved into a leaf
        assert cgroup_of(svc.pid) == os.path.join(tree, "service")
    assert cgroup_of(svc.pid) != folder  # the service is not in its instances' cgroups
    assert os.getsid(grandchild) != os.getsid(pid)
    # The figures are the cgroup's: both sleeps (once a reading after the grandchild's start is out).
    svc.wait_until(lambda: svc.status("web")["web"]["processes"] == 2, 15, "both processes counted")
    result = svc.cli("stop", "web")
    assert result.returncode == 0, result.stderr
    svc.wait_until(lambda: pid_gone(grandchild), 10, "the setsid grandchild killed by cgroup.kill")
    assert "group kill by cgroup.kill" in svc.log()
    assert os.path.isdir(folder)  # stopped, not removed: the next start uses it again
    with open(os.path.join(folder, "cgroup.procs")) as procs:
        assert procs.read().split() == []


@needs_v2
def test_the_cgroup_is_removed_with_the_instance(service: Start, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    manifest = write_manifest(tmp_path, SETSID.format(pidfile=pidfile))
    svc = service(manifest)
    svc.wait_for(["web"], "running")
    folder = instance_cgroup(svc, "web")
    grandchild = _grandchild(svc, pidfile)
    write_manifest(tmp_path, "version: 1\ninstances:\n  other:\n    command: [sleep, '300']\n")
    result = svc.cli("reload")
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(folder)  # the reload answers once the instance and its cgroup are gone
    assert pid_gone(grandchild)
    tree = os.path.dirname(folder)
    svc.wait_for(["other"], "running")
    assert instance_cgroup(svc, "other") == os.path.join(tree, "other.instance")
    assert svc.stop() == 0
    assert not os.path.exists(tree)  # the service's own cgroups go with it


@needs_v2
def test_a_waiting_instance_has_its_cgroup_and_log_files_made_before_its_start(
    service: Start, tmp_path: Path
) -> None:
    """Made while it waits (pacer.py, soon after it begins to wait): the mkdir (kernel work) and
    the files' creation are not between its dependency's readiness and its start. It runs in
    that cgroup, and writes to those files, once the dependency is up."""
    svc = service(
        """
        version: 1
        instances:
          db: {command: [sleep, "300"], autostart: false, restart: {min_uptime: 0}}
          api: {command: [sh, -c, "echo api-out; echo api-err >&2; exec sleep 300"], depends_on: [db],
                restart: {min_uptime: 0}}
          other: {command: [sleep, "300"], restart: {min_uptime: 0}}
        """
    )
    svc.wait_for(["other"], "running")
    svc.wait_for(["api"], "waiting")
    tree = os.path.dirname(instance_cgroup(svc, "other"))
    svc.wait_until(lambda: os.path.isdir(os.path.join(tree, "api.instance")), 10, "api's cgroup")
    files = svc.status("api")["api"]["log_files"]
    assert sorted(files) == ["stderr", "stdout"], files
    svc.wait_until(lambda: all(os.path.isfile(path) for path in files.values()), 10, "api's log files")
    assert [os.path.getsize(path) for path in files.values()] == [0, 0]  # made, nothing written yet
    assert svc.status("api")["api"]["state"] == "waiting"
    assert not os.path.exists(os.path.join(tree, "db.instance"))  # stopped, never asked: none
    result = svc.cli("start", "db")
    assert result.returncode == 0, result.stderr
    svc.wait_for(["api"], "running")
    assert instance_cgroup(svc, "api") == os.path.join(tree, "api.instance")
    svc.wait_until(
        lambda: [Path(files[s]).read_text() for s in ("stdout", "stderr")] == ["api-out\n", "api-err\n"],
        10,
        "api's lines in the files made ahead",
    )


LIMITED = """
version: 1
supervisor: {{cgroups: {mode}}}
instances:
  web:
    command: ["sleep", "300"]
    limits: {{memory_max: 64MB, cpu_quota: 50%}}
"""


@needs_v2
def test_required_cgroups_without_the_controllers_are_refused_or_the_limits_are_set(
    service: Start, tmp_path: Path
) -> None:
    svc = service(LIMITED.format(mode="required"), ready=False)
    if {"memory", "cpu"} <= _controllers_here():  # a machine with both: the kernel holds the limits
        svc.wait_ready()
        svc.wait_for(["web"], "running")
        folder = instance_cgroup(svc, "web")
        assert Path(folder, "memory.max").read_text().strip() == str(64 << 20)
        assert Path(folder, "cpu.max").read_text().strip() == "50000 100000"
        return
    svc.expected_exit = 1
    assert svc.proc.wait(timeout=30) == 1
    log = svc.log()
    assert "cannot start: supervisor.cgroups is required, but the " in log
    assert "controller is not available in" in log
    assert "(needed by limits." in log
    assert "starting" not in log  # refused before any instance ran


@needs_v2
def test_auto_says_once_what_is_missing_and_falls_back(service: Start, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, LIMITED.format(mode="auto"))
    svc = service(manifest)
    svc.wait_for(["web"], "running")
    missing = {"memory", "cpu"} - _controllers_here()
    write_manifest(tmp_path, LIMITED.format(mode="auto").replace("64MB", "65MB"))
    assert svc.cli("reload").returncode == 0  # the changed instance is replaced: said again? no
    svc.wait_for(["web"], "running")
    log = svc.log()
    for controller in ("memory", "cpu"):
        said = log.count(f"cgroup v2: the {controller} controller is ")
        assert said == (1 if controller in missing else 0), log
    if "memory" in missing:
        assert "limits.memory_max is enforced by restarting an instance" in log


@needs_v2
def test_memory_max_without_the_memory_controller_restarts_on_rss(service: Start, tmp_path: Path) -> None:
    if "memory" in _controllers_here():
        pytest.skip("this machine has the memory controller: memory.max caps instead (tested above)")
    program = tmp_path / "allocate.py"
    program.write_text("import signal\nx = b'\\1' * (40 << 20)\nsignal.pause()\n")
    svc = service(
        f"""
        version: 1
        instances:
          hog:
            command: [{sys.executable}, {program}]
            limits: {{memory_max: 20MB, memory_interval: 200ms}}
            restart: {{min_uptime: 0, backoff: {{initial: 10ms}}}}
        """
    )
    # Stopped for the restart (`stopping`, with the reason, while it stops), then backed off.
    svc.wait_log("hog: stopping -> backoff", timeout=30)
    stopping = next(line for line in svc.log().splitlines() if "hog: running -> stopping" in line)
    assert "(memory: RSS " in stopping and "over the limit 20MiB" in stopping, stopping


@needs_v2
def test_off_makes_no_cgroup_and_a_stop_leaves_what_left_the_group(service: Start, tmp_path: Path) -> None:
    """The contrast to the cgroup case: without one, a setsid grandchild outlives a stop."""
    pidfile = tmp_path / "grandchild.pid"
    manifest = SETSID.format(pidfile=pidfile).replace("version: 1", "version: 1\nsupervisor: {cgroups: off}")
    svc = service(manifest)
    svc.wait_for(["web"], "running")
    assert not cgroup_of(svc.status("web")["web"]["pid"]).endswith(".instance")
    grandchild = _grandchild(svc, pidfile)
    try:
        assert svc.cli("stop", "web").returncode == 0
        assert not pid_gone(grandchild)  # the group was killed; it had left the group
        assert "cgroup v2:" not in svc.log()
    finally:
        os.kill(grandchild, signal.SIGKILL)
