"""Nothing outlives the service: `kill -9` of a real `supervisor run`, then no process of any group.

Each test names its processes with a marker argument unique to it, snapshots them by
pid *and* start time (field 22 of /proc/PID/stat: a pid reused meanwhile is not the
same process), kills the service with SIGKILL, waits for the guardian to finish
(its pidfd), then for every process of the snapshot (their pidfds), then looks again
for anything with the marker. No sleeps: every wait is on a pidfd or a bounded
``proc.wait``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import guardian, placement

from .service_fixture import (
    SUPERVISOR,
    ServiceProcess,
    children_of,
    processes_with,
    wait_until,
    write_manifest,
)

CGROUP_MODES = ["cgroup", "guardian-only"]


def unique_marker() -> str:
    """A sleep duration no other run on this machine uses: other checkouts run the same tests."""
    return f"1001.{os.getpid()}{random.randrange(10**6):06d}"


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def snapshot(marker: str) -> dict[int, str]:
    found = {pid: start_time(pid) for pid in processes_with(marker)}
    return {pid: start for pid, start in found.items() if start is not None}


def wait_dead(pids: dict[int, str], timeout: float = 20) -> list[str]:
    """Wait on a pidfd per process (pid, start time); what still runs the same process after it."""
    survivors = []
    deadline = time.monotonic() + timeout
    for pid, start in pids.items():
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if start_time(pid) != start:  # the pidfd is someone else's: ours is gone
                continue
            left = max(0.0, deadline - time.monotonic())
            if not select.select([pidfd], [], [], left)[0] and start_time(pid) == start:
                survivors.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()!r}")
        finally:
            os.close(pidfd)
    return survivors


def guardians_of(svc: ServiceProcess) -> list[int]:
    found = []
    for pid in children_of(svc.pid):
        try:
            if b"guardian.py" in Path(f"/proc/{pid}/cmdline").read_bytes():  # empty for a zombie
                found.append(pid)
        except (FileNotFoundError, ProcessLookupError):  # gone between the listing and the read
            continue
    return found


def guardian_of(svc: ServiceProcess) -> int:
    (pid,) = guardians_of(svc)
    return pid


def wait_pid(pid: int, timeout: float = 30) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([pidfd], [], [], timeout)[0], f"pid {pid} still there after {timeout}s"
    finally:
        os.close(pidfd)


def groups_of(pids: dict[int, str]) -> int:
    """How many process groups ``pids`` are in (0 if one is gone meanwhile)."""
    with contextlib.suppress(ProcessLookupError):
        return len({os.getpgid(pid) for pid in pids})
    return 0


def kill_9(svc: ServiceProcess) -> None:
    svc.proc.send_signal(signal.SIGKILL)
    assert svc.proc.wait(timeout=30) == -signal.SIGKILL
    svc.expected_exit = None


def guardian_in(pid: int, tree: Path) -> bool:
    """Whether process ``pid`` sits in cgroup ``tree`` or one below it."""
    folders = [Path(folder) for folder, _, _ in os.walk(tree)]
    return any(str(pid) in (folder / "cgroup.procs").read_text().split() for folder in folders)


def cgroup_dir(svc: ServiceProcess) -> Path | None:
    own = guardian._own_cgroup()
    return None if own is None else own / f"procward-{svc.pid}"


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for svc in started:
        code = svc.stop()
        if svc.expected_exit is not None:
            assert code == svc.expected_exit, svc.log()


def start(services: list[ServiceProcess], folder: Path, manifest: str, mode: str) -> ServiceProcess:
    path = write_manifest(folder, manifest)
    svc = ServiceProcess(path, env={"SUPERVISOR_CGROUP": "on" if mode == "cgroup" else "off"})
    services.append(svc)
    svc.wait_ready()
    if mode == "cgroup" and "instances run in cgroup" not in svc.log():
        pytest.skip("no writable cgroup v2 here")
    return svc


NEW_GROUP = "import os, subprocess, sys; subprocess.Popen(['sleep', sys.argv[1]], process_group=0); " + (
    "os.execvp('sleep', ['sleep', sys.argv[1]])"
)


def forkers(marker: str, replicas: int) -> str:
    """Shells that fork two background sleeps, and one program that puts a child in a group of its own.

    That is ``2 + 3 × replicas`` processes with the marker, in as many sessions as instances.
    """
    return f"""
        version: 1
        instances:
          forker:
            command: ["sh", "-c", "sleep {marker} & sleep {marker} & wait", "{marker}"]
            replicas: {replicas}
            restart: {{min_uptime: 0}}
          regrouper:
            command: ["{sys.executable}", "-c", "{NEW_GROUP}", "{marker}"]
            restart: {{min_uptime: 0}}
        """


@pytest.mark.parametrize("mode", CGROUP_MODES)
def test_kill_9_leaves_no_process_of_any_group(
    tmp_path: Path, services: list[ServiceProcess], mode: str
) -> None:
    marker = unique_marker()
    svc = start(services, tmp_path, forkers(marker, 4), mode)
    # forker-N: sh + 2 sleeps; regrouper: itself + a child that moves to a group of its own. Waited
    # for by groups too: that child is counted from its fork, before its setpgid().
    svc.wait_until(
        lambda: len(snapshot(marker)) == 4 * 3 + 2 and groups_of(snapshot(marker)) == 4 + 2,
        30,
        "every instance's grandchildren, one group escaped its leader's",
    )
    before = snapshot(marker)
    keeper = guardian_of(svc)
    kill_9(svc)
    wait_pid(keeper)  # the guardian has done its work and is gone, not a zombie left to init
    assert wait_dead(before) == []
    assert snapshot(marker) == {}
    assert f"the service (pid {svc.pid}) died" in svc.log()
    cgroup = cgroup_dir(svc)
    if mode == "cgroup":
        assert cgroup is not None and not cgroup.exists()
        assert "killed and removed cgroup" in svc.log()
    else:  # said once, and the guardian alone did it
        assert svc.log().count("no cgroup for the instances (SUPERVISOR_CGROUP is off)") == 1


def test_cgroup_kills_what_left_the_session(tmp_path: Path, services: list[ServiceProcess]) -> None:
    """A daemon that made a session of its own escapes group and session; not the cgroup."""
    marker = unique_marker()
    manifest = f"""
        version: 1
        instances:
          daemonizer:
            command: ["sh", "-c", "setsid sleep {marker} & wait; exec sleep {marker}", "{marker}"]
            restart: {{min_uptime: 0}}
        """
    svc = start(services, tmp_path, manifest, "cgroup")

    def sessions() -> int:  # of the marked processes: 2 once `setsid` has made its own
        with contextlib.suppress(ProcessLookupError):
            return len({os.getsid(pid) for pid in snapshot(marker)})
        return 0

    # Both processes exist before the daemon's setsid() (the forked shell, then `setsid`): the
    # count of processes alone let the test look too early, and find them in one session.
    in_two = "the daemon in a session of its own"
    svc.wait_until(lambda: len(snapshot(marker)) == 2 and sessions() == 2, 30, in_two)
    before = snapshot(marker)
    keeper = guardian_of(svc)
    kill_9(svc)
    wait_pid(keeper)
    assert wait_dead(before) == []


@pytest.mark.parametrize("mode", CGROUP_MODES)
def test_kill_9_during_a_start_of_300(tmp_path: Path, services: list[ServiceProcess], mode: str) -> None:
    marker = unique_marker()
    manifest = f"""
        version: 1
        instances:
          many:
            command: ["sh", "-c", "sleep {marker} & sleep {marker} & wait", "{marker}"]
            replicas: 300
            restart: {{min_uptime: 0}}
        """
    svc = start(services, tmp_path, manifest, mode)
    # Mid-start: some instances have forked, others are being spawned right now.
    svc.wait_until(lambda: len(processes_with(marker)) >= 60, 60, "the start of 60 processes")
    keeper = guardian_of(svc)
    kill_9(svc)
    wait_pid(keeper)
    for _ in range(3):  # what the first look finds dying, the second must not find at all
        left = snapshot(marker)
        assert wait_dead(left) == []
    assert snapshot(marker) == {}


def test_guardian_killed_is_replaced_and_still_guards(tmp_path: Path, services: list[ServiceProcess]) -> None:
    marker = unique_marker()
    svc = start(services, tmp_path, forkers(marker, 2), "guardian-only")
    svc.wait_until(lambda: len(snapshot(marker)) == 2 * 3 + 2, 30, "every instance's grandchildren")
    first = guardian_of(svc)
    os.kill(first, signal.SIGKILL)
    svc.wait_log("the guardian ended (killed by SIGKILL): starting another")
    svc.wait_until(lambda: guardians_of(svc) not in ([], [first]), 10, "a new guardian")
    assert not os.path.exists(f"/proc/{first}")  # reaped by the service, not left a zombie
    second = guardian_of(svc)
    before = snapshot(marker)
    kill_9(svc)
    wait_pid(second)
    assert wait_dead(before) == []


@pytest.mark.parametrize("mode", CGROUP_MODES)
def test_clean_stop_ends_the_guardian(tmp_path: Path, services: list[ServiceProcess], mode: str) -> None:
    marker = unique_marker()
    svc = start(services, tmp_path, forkers(marker, 1), mode)
    svc.wait_until(lambda: len(snapshot(marker)) == 3 + 2, 30, "every instance's grandchildren")
    keeper = guardian_of(svc)
    # The move into its leaf was made by a thread while the service imported itself
    # (placement.PendingPlacement): done, and the thread gone, before the service ran.
    assert os.listdir(f"/proc/{svc.pid}/task") == [str(svc.pid)]
    if mode == "cgroup":
        own = Path(f"/proc/{svc.pid}/cgroup").read_text().strip().rpartition("::")[2]
        assert own.endswith(f"/procward-{svc.pid}/service"), own
    assert os.getsid(keeper) == keeper != os.getsid(svc.pid)  # out of reach of the service's group
    fds = {int(fd): os.readlink(f"/proc/{keeper}/fd/{fd}") for fd in os.listdir(f"/proc/{keeper}/fd")}
    assert sorted(fds) == [0, 1, 2, 3]  # none of the service's sockets, pipes or log files
    assert fds[0].startswith("pipe:") and fds[1] == "/dev/null" and fds[3] == "anon_inode:[pidfd]"
    assert fds[2] == os.readlink(f"/proc/{svc.pid}/fd/2")  # the service's stderr: its one line of report
    assert svc.stop() == 0
    svc.expected_exit = None
    assert not os.path.exists(f"/proc/{keeper}")  # ended and reaped by the service
    assert snapshot(marker) == {}
    assert "died" not in svc.log()
    cgroup = cgroup_dir(svc)
    assert cgroup is None or not cgroup.exists()


def test_pid_namespace_kills_everything(tmp_path: Path) -> None:
    """The strongest mode: the service as PID 1 of its own namespace; its death ends the namespace."""
    marker = unique_marker()
    unshare_pid = ["unshare", "--pid", "--fork", "--mount-proc"]
    probe = subprocess.run([*unshare_pid, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("needs unshare(1) and the right to make a PID namespace")
    manifest = write_manifest(tmp_path, forkers(marker, 2).replace("sleep", "setsid sleep", 1))
    unshare = subprocess.Popen(
        [*unshare_pid, *SUPERVISOR, "run", "-f", str(manifest)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "SUPERVISOR_CGROUP": "off"},
    )
    try:
        wait_until(lambda: len(snapshot(marker)) == 2 * 3 + 2, unshare, 30, "every instance's grandchildren")
        before = snapshot(marker)
        (init,) = children_of(unshare.pid)
        os.kill(init, signal.SIGKILL)
        unshare.wait(timeout=30)  # its child, our PID 1, is gone: so is the namespace
        assert wait_dead(before) == []
        assert snapshot(marker) == {}
    finally:
        if unshare.poll() is None:
            unshare.kill()
            unshare.wait()


# -- the guardian program alone, fed by a stand-in service -------------------------------------

STAND_IN = """
    import json, os, subprocess, sys
    from supervisor import guardian
    read, write = os.pipe()
    keeper = subprocess.Popen(
        [sys.executable, "-S", "-I", guardian.__file__, str(os.getpid())],
        stdin=read, stdout=subprocess.DEVNULL, start_new_session=True,
    )
    os.close(read)
    victim = subprocess.Popen(["sleep", "1006.5"], stdout=subprocess.DEVNULL, start_new_session=True)
    hostile = b"+0\\n+1\\n+-5\\n+99999999999999999999\\n+%d\\n-abc\\n\\0\\n" % keeper.pid + b"x" * 100
    os.write(write, hostile + b"\\n+%d\\n+4194305\\n" % victim.pid)
    print(json.dumps({"guardian": keeper.pid, "victim": victim.pid}), flush=True)
    os._exit(0)  # no goodbye: as if killed; the pipe closes, the pidfd turns readable
"""


def test_guardian_program_ignores_garbage_and_kills_the_group() -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(STAND_IN)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    pids = json.loads(done.stdout)
    wait_pid(pids["guardian"])  # survived its own pid written to it, and ended on its own
    wait_pid(pids["victim"])
    assert "SIGKILLed 1 of the 1 process groups it knew" in done.stderr


def test_a_starting_service_clears_dead_services_cgroups_and_leaves_live_ones_alone() -> None:
    """An empty cgroup under a live service's ``procward-PID`` is a stopped instance's, not a
    leftover: a second service on the machine must neither remove it nor walk it at its start."""
    own = guardian._own_cgroup()
    if own is None or not os.access(own, os.W_OK):
        pytest.skip("no writable cgroup v2 here")
    alive = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    live_folder, dead_folder = own / f"procward-{alive.pid}", own / f"procward-{dead.pid}"
    made = None
    try:
        (live_folder / "web.instance").mkdir(parents=True)
        (dead_folder / "web.instance").mkdir(parents=True)
        made = placement.delegated_cgroup()[0]
        assert made == own / f"procward-{os.getpid()}"
        assert (live_folder / "web.instance").is_dir()
        assert not dead_folder.exists()
    finally:
        alive.kill()
        alive.wait()
        for folder in (live_folder / "web.instance", live_folder, dead_folder / "web.instance", dead_folder):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if made is not None:
            made.rmdir()


@pytest.mark.parametrize("refusal", ["a bad manifest", "a second service on the state folder"])
def test_a_refused_start_leaves_no_cgroup_behind(
    tmp_path: Path, services: list[ServiceProcess], refusal: str
) -> None:
    """``supervisor run`` makes the instances' cgroup and moves itself into its leaf while the
    manifest is checked (placement.CgroupPlacement): a start refused after that (its manifest, or
    a state folder another service holds) moves out again and takes the folders away."""
    own = guardian._own_cgroup()
    if own is None or not os.access(own, os.W_OK):
        pytest.skip("no writable cgroup v2 here")
    if refusal == "a bad manifest":
        manifest = write_manifest(tmp_path, "version: 1\ninstances:\n  one: {nonsense: 1}\n")
        expected = "unknown key 'nonsense'"
    else:
        manifest = start(services, tmp_path, "version: 1\ninstances: {}\n", "cgroup").manifest
        expected = "is in use by another service"
    second = subprocess.Popen(
        [*SUPERVISOR, "run", "-f", str(manifest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "SUPERVISOR_CGROUP": "on"},
    )
    output = second.communicate(timeout=60)[0]
    assert second.returncode == 1 and expected in output, output
    assert not (own / f"procward-{second.pid}").exists(), output


@pytest.mark.parametrize(
    ("signum", "status", "ignored"),
    [
        (signal.SIGTERM, -signal.SIGTERM, None),
        (signal.SIGINT, 130, None),
        # Ignored at the start (nohup): it stays ignored while SIGTERM is caught. (A SIGHUP that is
        # not ignored is a reload once the service listens: test_user_signals.py.)
        (signal.SIGTERM, -signal.SIGTERM, signal.SIGHUP),
    ],
    ids=["SIGTERM", "SIGINT", "SIGHUP ignored"],
)
def test_a_stop_signal_while_the_manifest_is_checked_undoes_the_start(
    tmp_path: Path, signum: int, status: int, ignored: int | None
) -> None:
    """A stop signal while ``supervisor run`` checks its manifest, once it has made the instances'
    cgroup and moved into it (placement.CgroupPlacement): the start is undone (the service moved
    back, the folders gone, the check's child ended), then the signal ends the process, as it
    did before the cgroup was made that early (Ctrl-C: the CLI's 130). The check's child is
    stopped (SIGSTOP) as soon as it is there, so the signal comes while the service waits for it
    (after the check, SIGHUP is a reload and SIGTERM a clean stop); the signal is sent as soon as
    the leaf exists, often while the move into it is still under way."""
    own = guardian._own_cgroup()
    if own is None or not os.access(own, os.W_OK):
        pytest.skip("no writable cgroup v2 here")
    # 1,000 entries: the check takes long enough (most of a second) to be caught and stopped.
    entries = "".join(f"  i{n}: {{command: [sleep, '300'], autostart: false}}\n" for n in range(1000))
    manifest = tmp_path / "supervisor.yaml"
    manifest.write_text("version: 1\ninstances:\n" + entries)
    service = subprocess.Popen(
        [*SUPERVISOR, "run", "-f", str(manifest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SUPERVISOR_CGROUP": "on"},
        # A test run in the background (nohup, a CI runner) may ignore SIGINT or SIGHUP, and so would
        # the service (it leaves an ignored signal ignored): here it starts with both at their default.
        preexec_fn=lambda: [
            signal.signal(sig, signal.SIG_IGN if sig == ignored else signal.SIG_DFL)
            for sig in (signal.SIGINT, signal.SIGHUP)
        ],
    )

    def checking(pid: int) -> bool:
        """Whether ``pid`` is the check: a fork of the service, which names itself so for ps."""
        try:
            return Path(f"/proc/{pid}/comm").read_bytes().strip() == b"procward-check"
        except OSError:
            return False

    check = None
    try:
        deadline = time.monotonic() + 30
        while check is None and time.monotonic() < deadline and service.poll() is None:
            found = [pid for pid in children_of(service.pid) if checking(pid)]
            if found:
                check = found[0]
                os.kill(check, signal.SIGSTOP)
            else:  # a bounded wait on the service, which must not exit meanwhile
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.wait(timeout=0.001)
        assert check is not None, "the manifest's check was not seen"

        def state() -> bytes:  # of the check: T once it is stopped, Z if it had ended already
            return Path(f"/proc/{check}/stat").read_bytes().rpartition(b")")[2].split()[0]

        wait_until(lambda: state() in (b"T", b"Z"), service, 30, "the check stopped")
        assert state() == b"T", "the check ended before it could be stopped: make the manifest longer"
        leaf = own / f"procward-{service.pid}" / "service"
        wait_until(leaf.exists, service, 30, "the service's move into its leaf")
        status_file = Path(f"/proc/{service.pid}/status")
        fields = (line.partition(":\t") for line in status_file.read_text().splitlines())
        masks = {key: int(value, 16) for key, _, value in fields if key in ("SigIgn", "SigCgt")}
        for caught in (signal.SIGTERM, signal.SIGHUP):  # while it waits, unless ignored at the start
            mask = "SigIgn" if caught == ignored else "SigCgt"
            assert masks[mask] & (1 << (caught - 1)), (signal.Signals(caught).name, mask, masks)
        service.send_signal(signum)
        output = service.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        if check is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(check, signal.SIGKILL)
    assert service.returncode == status, output
    assert not leaf.parent.exists(), output
    wait_pid(check)  # killed by the service as it undid the start, and reaped


# The wait on the manifest's check as `supervisor run` makes it (the check, tests/blocked_check.py,
# never answers), and a SIGTERM that comes where a handler that raised was taken apart.
STOPPED_DURING_THE_CHECK = """
import os, signal, sys, threading
from pathlib import Path
from supervisor.check_signals import CheckSignals, StopDuringCheck
from supervisor.config.apart import ManifestCheck

check = ManifestCheck(sys.argv[1], entry="tests.blocked_check", fork=True)
waiting = Path(f"/proc/self/task/{threading.get_native_id()}/wchan")

def stop_from_here():  # the kernel runs the C handler in this thread, which does not block SIGTERM
    while "poll" not in waiting.read_text():
        threading.Event().wait(0.001)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

class Sends:
    def __set_name__(self, owner, name):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, as this call returns

try:
    with CheckSignals() as signals:
        if sys.argv[2] == "in a class body":
            class Imported:  # as the imports of the control plane make classes
                field = Sends()
            print("the class was made")
        else:
            threading.Thread(target=stop_from_here).start()
        check.result(wakeup_fd=signals.wakeup_fd, on_signal=signals.stop_if_signalled)
except StopDuringCheck as stop:
    print("stopped by", signal.Signals(stop.signum).name)
finally:
    check.abandon()
"""


@pytest.mark.parametrize(
    ("where", "said"),
    [("in a class body", "the class was made\n"), ("to another thread, in the poll", "")],
)
def test_a_stop_signal_during_the_check_ends_the_start_wherever_it_came(
    tmp_path: Path, where: str, said: str
) -> None:
    """A handler that raised where the signal found the start was taken apart (the test above, once
    in about 60 tries each): inside a class's ``__set_name__`` (starlette's, imported during the
    check) Python turned it into a RuntimeError, the service ended with a traceback and status 1;
    and a SIGTERM that came just before the wait's poll began ran no handler until the poll ended,
    so the service sat waiting for a check that was stopped. A signal given to another thread once
    the main one sleeps in the poll is that case made certain. The handler now only remembers, the
    wait polls the signal wakeup fd, and the start acts on the signal between its steps."""
    fifo = tmp_path / "supervisor.yaml"
    os.mkfifo(fifo)  # no writer: the check's child blocks in its open for good
    ended = subprocess.run(
        [sys.executable, "-c", STOPPED_DURING_THE_CHECK, str(fifo), where],
        capture_output=True,
        text=True,
        timeout=30,  # the check's own time limit is 120 s
    )
    assert ended.stdout == said + "stopped by SIGTERM\n", ended.stderr


@pytest.mark.parametrize("mode", CGROUP_MODES)
def test_a_reexec_after_the_guardian_gave_up_starts_a_new_one_that_guards_the_adopted(
    tmp_path: Path, services: list[ServiceProcess], mode: str
) -> None:
    """The guardian ended more than MAX_RESTARTS times in its window, so the service gave up on
    it: a re-exec then hands no half guardian over (its pipe closed: adopting it failed after the
    exec, and every instance went down with the service). The new service starts one, in the
    cgroup the instances already run in, and tells it every adopted group: after a kill -9 of
    the service, the adopted instances' background children are gone too."""
    marker = unique_marker()
    svc = start(services, tmp_path, forkers(marker, 1), mode)
    svc.wait_until(lambda: len(snapshot(marker)) == 3 + 2, 30, "every instance's grandchildren")
    tree = cgroup_dir(svc) if mode == "cgroup" else None
    for _ in range(guardian.MAX_RESTARTS + 1):
        svc.wait_until(lambda: len(guardians_of(svc)) == 1, 10, "a guardian")
        killed = guardian_of(svc)
        os.kill(killed, signal.SIGKILL)
        svc.wait_until(lambda k=killed: k not in guardians_of(svc), 10, "the killed guardian gone")
    svc.wait_log("the guardian keeps ending")
    assert guardians_of(svc) == []
    pids = {name: status["pid"] for name, status in svc.status().items()}

    done = svc.cli("reexec")
    assert done.returncode == 0, done.stderr + svc.log()
    svc.wait_log("a new guardian")
    assert {name: status["pid"] for name, status in svc.status().items()} == pids  # nothing restarted
    new = guardian_of(svc)
    argv = Path(f"/proc/{new}/cmdline").read_bytes().split(b"\0")
    assert argv[-2] == (str(tree).encode() if tree is not None else b"")  # the same cgroup, none nested
    if tree is not None:
        assert not (tree / "service" / tree.name).exists()
    if tree is not None:  # spawned from inside the service's leaf, it steps out of the tree first
        svc.wait_until(lambda: not guardian_in(new, tree), 10, "the new guardian out of the cgroup")
    before = snapshot(marker)
    kill_9(svc)
    wait_pid(new)
    assert wait_dead(before) == []
    if tree is not None:  # and so its cgroup.kill did not kill it before it removed the tree
        assert not tree.exists(), svc.log()
        assert "killed and removed cgroup" in svc.log()
