"""The state folder is ours: ``supervisor run`` checks it, never chmods what it did not make,
writes no log through a symlink, and says in one line why it cannot start.

Everything here goes through the real CLI in a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.statedir import StateDirError, StateDirInUse, StateDirLock, prepare_state_dir, state_name

from .service_fixture import SUPERVISOR, ServiceProcess, answers, processes_with, write_manifest

Start = Callable[..., ServiceProcess]

SLEEPER = "{command: [sleep, '300'], restart: {min_uptime: 0}}"


def run_refused(manifest: Path) -> str:
    """``supervisor run`` that must refuse to start: exit 1, one line on stderr; that line."""
    done = subprocess.run(
        [*SUPERVISOR, "run", "-f", str(manifest)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- start-up problems: one line, exit 1 -----------------------------------------------------


@pytest.mark.parametrize(
    ("state_dir", "reason"),
    [
        ("afile/state", "Not a directory"),  # under a regular file
        ("/proc/supervisor-test-state", "No such file or directory"),  # a place that refuses
        ("/sys/supervisor-test-state", "Operation not permitted"),  # read-only for everyone
        ("x" * 300, "File name too long"),  # a component over 255 bytes
    ],
)
def test_a_state_dir_that_cannot_be_made_is_one_line(tmp_path: Path, state_dir: str, reason: str) -> None:
    (tmp_path / "afile").write_text("a regular file\n")
    manifest = write_manifest(tmp_path, f"version: 1\nsupervisor: {{state_dir: '{state_dir}'}}\n")
    line = run_refused(manifest)
    assert "cannot start: state_dir" in line
    assert reason in line
    assert state_dir[:40] in line


@pytest.mark.parametrize(
    ("socket_path", "reason"),
    [
        ("afile/control.sock", "afile is not a folder"),
        ("/proc/supervisor-test/control.sock", "No such file or directory"),
        ("x" * 300 + "/control.sock", "File name too long"),
        ("s" * 200 + ".sock", "too long"),  # longer than a unix socket address can be
    ],
)
def test_a_control_socket_that_cannot_be_made_is_one_line(
    tmp_path: Path, socket_path: str, reason: str
) -> None:
    (tmp_path / "afile").write_text("a regular file\n")
    manifest = write_manifest(
        tmp_path,
        f"version: 1\nsupervisor: {{control: {{socket: '{socket_path}'}}}}\ninstances: {{a: {SLEEPER}}}\n",
    )
    line = run_refused(manifest)
    assert "cannot start" in line and "control" in line
    assert reason in line


def test_a_nul_byte_in_the_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateDirError, match="contains a NUL byte"):
        prepare_state_dir(tmp_path / "a\0b")


# -- whose folder it is ---------------------------------------------------------------------


def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        other = tmp_path / "theirs"
        other.mkdir(mode=0o755)
        os.chown(other, 65534, 65534)  # nobody's
    else:
        other = Path("/")  # root's, and we are not root
    manifest = write_manifest(
        tmp_path, f"version: 1\nsupervisor: {{state_dir: '{other}'}}\ninstances: {{a: {SLEEPER}}}\n"
    )
    line = run_refused(manifest)
    owner = other.stat().st_uid
    assert f"state_dir {other} belongs to uid {owner}" in line
    assert not (other / "logs").exists()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_a_state_dir_others_can_write_is_refused_and_left_as_it_is(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)  # /tmp is 1777; a group-writable folder lets the group plant symlinks
    manifest = write_manifest(
        tmp_path, f"version: 1\nsupervisor: {{state_dir: shared}}\ninstances: {{a: {SLEEPER}}}\n"
    )
    line = run_refused(manifest)
    assert f"state_dir {shared} is writable by" in line
    assert "chmod go-w" in line
    assert stat.S_IMODE(shared.stat().st_mode) == mode  # not chmod-ed to 0700 behind the user's back
    assert list(shared.iterdir()) == []


def test_an_existing_folder_is_used_as_it_is_and_a_new_one_is_made_private(
    service: Start, tmp_path: Path
) -> None:
    tmp_path.chmod(0o755)  # `state_dir: .`: the manifest's own folder, readable by others
    svc = service(
        f"version: 1\nsupervisor: {{state_dir: .}}\ninstances: {{a: {SLEEPER}}}\n",
        socket=tmp_path / "control.sock",
    )
    svc.wait_for(["a"], "running")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert stat.S_IMODE(svc.socket.stat().st_mode) == 0o600

    fresh = tmp_path / "sub"
    fresh.mkdir()
    manifest = write_manifest(
        fresh, f"version: 1\nsupervisor: {{state_dir: state}}\ninstances: {{a: {SLEEPER}}}\n"
    )
    second = service(manifest, socket=fresh / "state" / "control.sock")
    second.wait_for(["a"], "running")
    assert stat.S_IMODE((fresh / "state").stat().st_mode) == 0o700


# -- symlinks inside it: never followed; that instance fails, the service goes on --------------


def test_a_symlinked_log_file_fails_that_instance_only(service: Start, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    state = tmp_path / ".supervisor"
    (state / "logs").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    (state / "logs" / "a.out.log").symlink_to(victim)
    svc = service(
        f"""
        version: 1
        instances:
          a: {{command: [sh, -c, 'echo secret; exec sleep 300'], restart: {{max_restarts: 1, min_uptime: 0}}}}
          b: {SLEEPER}
        """
    )
    svc.wait_for(["a"], "failed")
    svc.wait_for(["b"], "running")
    status = svc.status("a")["a"]
    assert "symlink" in status["reason"] and "a.out.log" in status["reason"], status
    assert victim.read_bytes() == b"precious\n"
    assert svc.client().health()["ok"]


@pytest.mark.parametrize(
    "stdout_file",
    ["afile/logs/a.log", "/proc/supervisor-test-logs/a.log", "/sys/supervisor-test-logs/a.log"],
)
def test_a_log_folder_that_cannot_be_made_fails_that_instance_only(
    service: Start, tmp_path: Path, stdout_file: str
) -> None:
    (tmp_path / "afile").write_text("a regular file\n")
    svc = service(
        f"""
        version: 1
        instances:
          a:
            command: [sleep, '300']
            restart: {{max_restarts: 1, min_uptime: 0}}
            logs: {{stdout_file: '{stdout_file}'}}
          b: {SLEEPER}
        """
    )
    svc.wait_for(["a"], "failed")
    svc.wait_for(["b"], "running")
    reason = svc.status("a")["a"]["reason"]
    assert "cannot create the log folder" in reason, reason
    assert svc.client().health()["ok"]


def test_a_reload_to_a_state_dir_others_can_write_changes_nothing(service: Start, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, f"version: 1\ninstances: {{a: {SLEEPER}}}\n")
    svc = service(manifest)
    svc.wait_for(["a"], "running")
    pid = svc.status()["a"]["pid"]
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    write_manifest(tmp_path, f"version: 1\nsupervisor: {{state_dir: shared}}\ninstances: {{a: {SLEEPER}}}\n")
    done = svc.cli("reload")
    assert done.returncode == 1, done.stdout
    assert f"state_dir {shared} is writable by" in done.stderr and "nothing was changed" in done.stderr
    assert svc.status()["a"]["pid"] == pid
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777 and list(shared.iterdir()) == []


# -- deleted under the running service: made again as private as at start -------------------


def test_a_deleted_state_folder_is_made_again_private_when_the_logs_are_reopened(
    service: Start, tmp_path: Path
) -> None:
    """SIGUSR2 after the whole state folder was deleted (a cleaner of old files): reopening the
    logs makes it again, 0700 as at start (it was made with the umask's mode: 0755 here, open to
    others; group-writable under umask 002); the log folder inside it as at start. Then the same
    for the log folder alone, through ``supervisor logs --reopen`` once SIGHUP has made the socket
    again."""
    # A fifo for each wait: on one fifo, the second `read` could open it while the test's writer
    # still holds it, and read its EOF instead of waiting.
    first, second = tmp_path / "first", tmp_path / "second"
    os.mkfifo(first)
    os.mkfifo(second)
    script = f"echo before; read line < {first}; echo after; read line < {second}; echo again; exec sleep 300"
    svc = service(
        f"""
        version: 1
        instances:
          talker:
            command: ["sh", "-c", "{script}"]
            restart: {{min_uptime: 0}}
        """
    )
    svc.wait_output("talker", b"before")
    state = tmp_path / ".supervisor"
    logs = state / "logs"
    log = logs / "talker.out.log"
    folder_at_start = stat.S_IMODE(logs.stat().st_mode)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700

    shutil.rmtree(state)  # the socket, the record and the logs with it
    svc.proc.send_signal(signal.SIGUSR2)
    svc.wait_log("reopened 2 log files")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(logs.stat().st_mode) == folder_at_start
    # The folder made again is the one locked now (a service started there finds it held by the
    # flock, as any other's would be): the deleted one's descriptor was let go.
    svc.wait_log("was gone or replaced: locked again")
    held = [fd for fd in os.listdir(f"/proc/{svc.pid}/fd") if _names(svc.pid, fd, state)]
    assert len(held) == 1, held
    with open(first, "w") as poke:
        poke.write("go\n")
    svc.wait_until(lambda: log.exists() and log.read_bytes() == b"after\n", 20, "'after' in the new log file")

    os.kill(svc.pid, signal.SIGHUP)  # the socket went with the folder: made again
    svc.wait_until(lambda: answers(svc.client(timeout=2)), 20, "the socket made again")
    svc.wait_log("reloaded ")  # the rest of the reload done: nothing changed
    shutil.rmtree(logs)
    done = svc.cli("logs", "--reopen")
    assert done.returncode == 0 and done.stdout == "reopened 2 log files\n", done
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(logs.stat().st_mode) == folder_at_start
    with open(second, "w") as poke:
        poke.write("go\n")
    svc.wait_until(lambda: log.exists() and log.read_bytes() == b"again\n", 20, "'again' in the new log file")


# -- one service per state folder ------------------------------------------------------------


def _unique_sleep() -> str:
    """A ``sleep`` argument no other test's process has: its processes are counted by it."""
    return f"3000.{secrets.randbelow(10**9):09d}"


def test_a_second_service_is_refused_even_when_the_first_ones_socket_is_gone(
    service: Start, tmp_path: Path
) -> None:
    marker = _unique_sleep()
    manifest = write_manifest(tmp_path, f"version: 1\ninstances: {{a: {{command: [sleep, '{marker}']}}}}\n")
    first = service(manifest)
    first.wait_for(["a"], "running")
    first.socket.unlink()  # a cleaner of old files, an rm in the wrong folder: nothing answers there now
    line = run_refused(manifest)
    state = tmp_path / ".supervisor"
    assert f"state_dir {state} is in use by another service (pid {first.pid})" in line, line
    assert "supervisor shutdown" in line
    # It started nothing: one `a`, the first service's (a second would have been spawned by now:
    # the refusal comes after the manifest's check, where a service starts its instances).
    assert len(processes_with(marker)) == 1
    assert first.proc.poll() is None


def test_two_manifests_with_one_state_dir_and_two_sockets_cannot_both_run(
    service: Start, tmp_path: Path
) -> None:
    one = tmp_path / "one"
    two = tmp_path / "two"
    one.mkdir()
    two.mkdir()
    shared = tmp_path / "state"
    text = (
        "version: 1\nsupervisor: {{state_dir: '{state}', control: {{socket: '{sock}'}}}}\n"
        "instances: {{a: {sleeper}}}\n"
    )
    first_manifest = write_manifest(one, text.format(state=shared, sock=one / "c.sock", sleeper=SLEEPER))
    first = service(first_manifest, socket=one / "c.sock")
    first.wait_for(["a"], "running")
    line = run_refused(write_manifest(two, text.format(state=shared, sock=two / "c.sock", sleeper=SLEEPER)))
    assert f"state_dir {shared} is in use by another service (pid {first.pid})" in line, line
    assert not (two / "c.sock").exists()


def test_the_folder_is_free_again_once_the_service_has_stopped(service: Start, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, f"version: 1\ninstances: {{a: {SLEEPER}}}\n")
    first = service(manifest)
    first.wait_for(["a"], "running")
    assert first.stop() == 0
    assert not first.socket.exists()
    first.expected_exit = None  # checked here: at the end its socket path is the second's
    second = service(manifest)
    second.wait_for(["a"], "running")


def test_a_reexec_hands_the_lock_and_the_folder_s_name_over(service: Start, tmp_path: Path) -> None:
    marker = _unique_sleep()
    manifest = write_manifest(tmp_path, f"version: 1\ninstances: {{a: {{command: [sleep, '{marker}']}}}}\n")
    svc = service(manifest)
    svc.wait_for(["a"], "running")
    state = tmp_path / ".supervisor"
    address = state_name(state)
    before = _name_holders(address)
    assert [pid for pid, _ in before] == [svc.pid]
    done = svc.cli("reexec")
    assert done.returncode == 0, done.stderr + svc.log()
    svc.wait_until(lambda: "re-exec'd: took over" in svc.log(), 30, "the new service took over")
    svc.socket.unlink()
    line = run_refused(manifest)
    assert f"is in use by another service (pid {svc.pid})" in line, line
    assert len(processes_with(marker)) == 1
    # Held once, by the service: the lock's descriptor was taken back close-on-exec, and is one.
    held = [fd for fd in os.listdir(f"/proc/{svc.pid}/fd") if _names(svc.pid, fd, state)]
    assert len(held) == 1, held
    # The name's socket too: the same one (its inode), held once, not claimed anew.
    assert _name_holders(address) == before
    shutil.rmtree(state)
    line = run_refused(manifest)
    assert f"is in use by another service (pid {svc.pid}), whose folder was deleted" in line, line
    assert len(processes_with(marker)) == 1


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sighup_makes_a_deleted_control_socket_again(service: Start, tmp_path: Path, backend: str) -> None:
    marker = _unique_sleep()
    manifest = write_manifest(tmp_path, f"version: 1\ninstances: {{a: {{command: [sleep, '{marker}']}}}}\n")
    svc = service(manifest, args=("--backend", backend))
    svc.wait_for(["a"], "running")
    pid = svc.status()["a"]["pid"]
    svc.socket.unlink()
    assert not answers(svc.client(timeout=2))
    line = run_refused(manifest)
    assert f"Its control socket {svc.socket} is gone: `kill -HUP {svc.pid}` makes it again" in line, line
    os.kill(svc.pid, signal.SIGHUP)
    svc.wait_until(lambda: answers(svc.client(timeout=2)), 20, "the socket made again")
    svc.wait_log("was gone: made again")
    assert svc.status()["a"]["pid"] == pid  # the reload changed nothing else
    assert stat.S_IMODE(svc.socket.stat().st_mode) == 0o600
    assert processes_with(marker) == [pid]
    # The old listening socket was closed: the service holds one unix listener, the new one.
    assert _listening_unix_sockets(svc.pid) == 1


def _listening_unix_sockets(pid: int) -> int:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    with open("/proc/net/unix") as table:
        next(table)
        # Num RefCount Protocol Flags Type St Inode Path; flags 00010000 is __SO_ACCEPTCON (listening)
        return sum(
            1
            for fields in (line.split() for line in table)
            if fields[6] in inodes
            and int(fields[3], 16) & 0x10000
            and len(fields) > 7
            and not fields[7].startswith("@")
        )


def _names(pid: int, fd: str, folder: Path) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == str(folder)
    except OSError:
        return False


def test_a_reload_onto_a_state_dir_another_service_holds_changes_nothing(
    service: Start, tmp_path: Path
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    their_manifest = write_manifest(theirs, f"version: 1\ninstances: {{b: {SLEEPER}}}\n")
    other = service(their_manifest, socket=theirs / ".supervisor" / "control.sock")
    other.wait_for(["b"], "running")
    manifest = write_manifest(tmp_path, f"version: 1\ninstances: {{a: {SLEEPER}}}\n")
    svc = service(manifest)
    svc.wait_for(["a"], "running")
    pid = svc.status()["a"]["pid"]
    moved = f"supervisor: {{state_dir: '{theirs / '.supervisor'}'}}"
    write_manifest(tmp_path, f"version: 1\n{moved}\ninstances: {{a: {SLEEPER}}}\n")
    done = svc.cli("reload")
    assert done.returncode == 1, done.stdout
    assert "is in use by another service" in done.stderr and "nothing was changed" in done.stderr, done.stderr
    assert svc.status()["a"]["pid"] == pid
    # Its own folder is still its own: a third service there is refused.
    write_manifest(tmp_path, f"version: 1\ninstances: {{a: {SLEEPER}}}\n", name="again.yaml")
    line = run_refused(tmp_path / "again.yaml")
    assert f"is in use by another service (pid {svc.pid})" in line, line


# -- a state folder deleted under the service ---------------------------------------------


def test_a_folder_deleted_under_the_service_and_made_again_is_still_refused(
    service: Start, tmp_path: Path
) -> None:
    """``rm -rf`` of the state folder (or a cleaner of ``/tmp``) takes the flocked inode away:
    a second ``supervisor run`` makes a new folder, which nothing locks. The abstract name of
    the path still stands for the first service; SIGHUP makes the folder, locks it and binds the
    socket again."""
    marker = _unique_sleep()
    manifest = write_manifest(tmp_path, f"version: 1\ninstances: {{a: {{command: [sleep, '{marker}']}}}}\n")
    svc = service(manifest)
    svc.wait_for(["a"], "running")
    pid = svc.status()["a"]["pid"]
    state = tmp_path / ".supervisor"
    shutil.rmtree(state)
    line = run_refused(manifest)
    assert f"is in use by another service (pid {svc.pid}), whose folder was deleted or replaced" in line, line
    assert "Its control socket" in line and f"`kill -HUP {svc.pid}`" in line, line
    assert processes_with(marker) == [pid]  # the refused run started nothing
    os.kill(svc.pid, signal.SIGHUP)
    svc.wait_until(lambda: answers(svc.client(timeout=2)), 20, "the socket made again")
    svc.wait_log("was gone or replaced: locked again")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    held = [fd for fd in os.listdir(f"/proc/{svc.pid}/fd") if _names(svc.pid, fd, state)]
    assert len(held) == 1, held  # the new folder's lock; the deleted one's descriptor was closed
    line = run_refused(manifest)  # the flock refuses now, as for a folder never deleted
    assert f"state_dir {state} is in use by another service (pid {svc.pid}):" in line, line
    assert svc.status()["a"]["pid"] == pid


def _name_holders(address: bytes) -> list[tuple[int, str]]:
    """(pid, socket inode) for each descriptor of a process that holds the socket bound at ``address``."""
    shown = "@" + address[1:].decode()
    with open("/proc/net/unix") as table:
        next(table)
        inodes = {f[6] for f in (line.split() for line in table) if len(f) > 7 and f[7] == shown}
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if (inode := os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]) in inodes:
                        holders.append((int(pid), inode))
    return holders


def test_the_name_is_given_up_with_the_lock_and_claimed_again(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    prepare_state_dir(folder)
    first = StateDirLock.acquire(folder)
    assert first.name is not None
    shutil.rmtree(folder)
    prepare_state_dir(folder)  # a new inode: its flock is free, the path's name is not
    with pytest.raises(StateDirInUse, match="whose folder was deleted or replaced") as refused:
        StateDirLock.acquire(folder)
    assert refused.value.holder == os.getpid()
    assert first.follow() is True  # the service's SIGHUP: it locks the folder now at the path
    assert first.follow() is False
    with pytest.raises(StateDirInUse, match=r"in use by another service \(pid \d+\):"):
        StateDirLock.acquire(folder)
    first.release()
    first.release()  # idempotent
    second = StateDirLock.acquire(folder)
    assert second.name is not None
    second.release()


@pytest.mark.parametrize("listens", [False, True], ids=["bound-only", "listening"])
def test_a_name_squatted_by_what_is_not_a_service_of_ours(tmp_path: Path, listens: bool) -> None:
    """Anyone can compute the name. One that is bound and does not listen is no service: the
    flock alone guards, and the service starts. One of our user that listens may be a service
    whose folder was deleted: refused. (Another user's listener is treated like the first: its
    uid is not ours. That needs a second user, which this test has not.)"""
    folder = tmp_path / "state"
    prepare_state_dir(folder)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:
        squatter.bind(state_name(folder))
        if listens:
            squatter.listen(1)
            with pytest.raises(StateDirInUse, match=f"pid {os.getpid()}"):
                StateDirLock.acquire(folder)
            return
        lock = StateDirLock.acquire(folder)
        assert lock.name is None and lock.fd is not None
        lock.release()


def test_a_record_of_older_code_hands_no_name_and_the_adopter_claims_it(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    prepare_state_dir(folder)
    old = StateDirLock.acquire(folder)
    assert old.name is not None and old.fd is not None
    old.name.close()  # what older code held: the flock only
    fd, old.fd = old.fd, None
    os.set_inheritable(fd, True)
    adopted = StateDirLock.adopt(folder, fd, None)
    assert adopted.name is not None and not os.get_inheritable(fd)
    shutil.rmtree(folder)
    prepare_state_dir(folder)
    with pytest.raises(StateDirInUse, match="whose folder was deleted"):
        StateDirLock.acquire(folder)
    adopted.release()
