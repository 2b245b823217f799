"""The OS edge, with real processes: spawn, exit statuses, groups, pidfd waits, orphans."""

from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from supervisor import launcher, process
from supervisor.orphans import living_children
from supervisor.process import Child, ExitStatus, SpawnError, spawn

pytestmark = pytest.mark.anyio

QUIET = {"stdin": None, "stdout": None, "stderr": None}


@pytest.fixture(params=["pidfd", "polling"])
def wait_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test over both ways of waiting: pidfd, and the fallback without it."""
    monkeypatch.setattr(process, "USE_PIDFD", request.param == "pidfd")
    return request.param


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Children a test spawns; any left running at the end are killed and reaped."""
    spawned: list[Child] = []
    yield spawned
    for child in spawned:
        if child.exit is None:
            child.send_signal(signal.SIGKILL)
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
            child.poll()


def sleeper(children: list[Child]) -> Child:
    child = spawn(["sleep", "30"], **QUIET)
    children.append(child)
    return child


async def read_line(fd: int) -> str:
    data = b""
    with anyio.fail_after(5):
        while not data.endswith(b"\n"):
            await anyio.wait_readable(fd)
            chunk = os.read(fd, 1024)
            if not chunk:
                break
            data += chunk
    return data.decode()


async def gone(pid: int, timeout: float = 5) -> None:
    """Wait until ``pid`` (anyone's process) has exited, with a pidfd of our own."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with anyio.fail_after(timeout):
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def argv0(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return os.path.basename(cmdline.read().split(b"\0")[0].decode())
    except OSError:
        return ""


async def exec_done(pid: int, program: str, timeout: float = 10) -> None:
    """Until ``pid`` runs ``program``: past the launcher and the gate, which exec themselves away.

    Between looks, a bounded wait on the process's own exit (a pidfd), never a sleep.
    """
    pidfd = os.pidfd_open(pid)
    try:
        with anyio.fail_after(timeout):
            while argv0(pid) != program:
                with anyio.move_on_after(0.005):
                    await anyio.wait_readable(pidfd)
                    raise AssertionError(f"{pid} ended before it ran {program}")
    finally:
        os.close(pidfd)


def run_script(script: str, *args: str) -> dict[str, object]:
    """Run ``script`` in a fresh interpreter (for what pytest itself must not become), return its JSON."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- exit statuses ----------------------------------------------------------------------------


async def test_exit_code(wait_path: str) -> None:
    child = spawn(["sh", "-c", "exit 3"], **QUIET)
    with anyio.fail_after(5):
        status = await child.wait()
    assert (status.pid, status.code, status.signal) == (child.pid, 3, None)
    assert status.describe() == "exit code 3"
    assert status.succeeded({3}) and not status.succeeded({0})
    assert child.exit is status and child.poll() is status
    assert status.at >= child.started_at


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_signal_death(wait_path: str, sig: signal.Signals) -> None:
    child = spawn(["sh", "-c", f"kill -{sig.name.removeprefix('SIG')} $$"], **QUIET)
    with anyio.fail_after(5):
        status = await child.wait()
    assert (status.code, status.signal) == (None, sig)
    assert status.describe() == f"killed by {sig.name}"
    assert not status.succeeded({0, 1, 143})


def test_describe_odd_statuses() -> None:
    assert ExitStatus(1, None, 40, 0.0).describe() == "killed by signal 40"
    lost = ExitStatus(1, None, None, 0.0)
    assert "lost" in lost.describe() and not lost.succeeded({0})


async def test_poll(children: list[Child]) -> None:
    child = sleeper(children)
    assert child.poll() is None
    assert child.send_signal(signal.SIGKILL)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # blocks until it is a zombie, reaps nothing
    status = child.poll()
    assert status is not None and status.signal == signal.SIGKILL
    assert await child.wait() is status
    assert child.pid not in living_children()


# -- spawn errors -----------------------------------------------------------------------------


def test_missing_command() -> None:
    with pytest.raises(SpawnError) as caught:
        spawn(["no-such-command-xyz", "arg"], **QUIET)
    err = caught.value
    assert err.errno == errno.ENOENT and "no-such-command-xyz" in err.reason
    assert err.argv == ["no-such-command-xyz", "arg"]
    assert str(err).startswith("cannot start no-such-command-xyz arg: ") and "\n" not in str(err)


def test_bad_cwd(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(SpawnError) as caught:
        spawn(["true"], **QUIET, cwd=missing)
    assert caught.value.errno == errno.ENOENT and caught.value.cwd == missing
    assert missing in str(caught.value)


def test_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(SpawnError) as caught:
        spawn([str(script)], **QUIET)
    assert caught.value.errno == errno.EACCES
    assert str(script) in str(caught.value)


async def test_a_program_looked_up_before_is_looked_up_again_when_it_went(tmp_path: Path) -> None:
    """check_program remembers where it found a program: gone, moved or no longer executable
    since, the spawn says so clearly (not a launcher's exit 127), or finds it where it went."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    env = {**os.environ, "PATH": f"{first}:{second}:/usr/bin:/bin"}

    async def runs(program: str) -> ExitStatus:
        child = spawn([program], **QUIET, env=env)
        with anyio.fail_after(10):
            return await child.wait()

    for folder in (first, second):
        (folder / "tool").write_text(f"#!/bin/sh\nexit {1 if folder == first else 2}\n")
    (first / "tool").chmod(0o755)
    assert (await runs("tool")).code == 1
    (first / "tool").unlink()
    with pytest.raises(SpawnError) as caught:
        spawn(["tool"], **QUIET, env=env)  # the second one is not executable
    assert caught.value.errno == errno.ENOENT and "tool" in caught.value.reason
    (second / "tool").chmod(0o755)
    assert (await runs("tool")).code == 2
    (second / "tool").unlink()
    (second / "tool").mkdir(mode=0o755)  # a folder where the program was: exec could not run it
    with pytest.raises(SpawnError) as caught:
        spawn(["tool"], **QUIET, env=env)
    assert caught.value.errno == errno.ENOENT
    (second / "tool").rmdir()
    (second / "tool").write_text("#!/bin/sh\nexit 3\n")
    (second / "tool").chmod(0o755)
    assert (await runs("tool")).code == 3
    (second / "tool").chmod(0o644)
    with pytest.raises(SpawnError) as caught:
        spawn(["tool"], **QUIET, env=env)
    assert caught.value.errno == errno.ENOENT


def test_unknown_user_and_group() -> None:
    with pytest.raises(SpawnError, match="unknown user 'no-such-user-xyz'") as caught:
        spawn(["true"], **QUIET, user="no-such-user-xyz")
    assert caught.value.errno is None
    with pytest.raises(SpawnError, match="unknown group 'no-such-group-xyz'"):
        spawn(["true"], **QUIET, group="no-such-group-xyz")
    with pytest.raises(SpawnError, match="empty command"):
        spawn([], **QUIET)


# -- what the child gets ----------------------------------------------------------------------


def _blocked(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)


@pytest.mark.parametrize("use_launcher", [True, False], ids=["launcher", "preexec_fn"])
def test_signals_the_service_blocks_are_not_blocked_in_the_child(
    children: list[Child], monkeypatch: pytest.MonkeyPatch, use_launcher: bool
) -> None:
    """A child inherits the signal mask, and the service blocks its stop signals at times (a
    re-exec holds them): an instance spawned then ran with SIGTERM blocked, and its stop waited
    for the SIGKILL. It gets none blocked; the service's own mask is left as it was."""
    monkeypatch.setattr(launcher, "USE_LAUNCHER", use_launcher)
    held = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        child = sleeper(children)
        assert held <= signal.pthread_sigmask(signal.SIG_BLOCK, ())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert _blocked(child.pid) == 0
    child.send_signal(signal.SIGTERM)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert child.poll() is not None and child.poll().signal == signal.SIGTERM


async def test_new_session(children: list[Child]) -> None:
    child = sleeper(children)
    assert child.pgid == child.pid == os.getpgid(child.pid) == os.getsid(child.pid)
    assert child.pid in living_children()


async def test_fds_passed_and_kept(tmp_path: Path) -> None:
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    in_r, in_w = os.pipe()
    os.write(in_w, b"from stdin\n")
    os.close(in_w)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        child = spawn(
            ["sh", "-c", "cat; echo to stdout; echo to stderr >&2"],
            stdin=in_r,
            stdout=out.fileno(),
            stderr=err.fileno(),
        )
        os.fstat(out.fileno())  # still ours: spawn does not close what it was given
        os.close(in_r)
        with anyio.fail_after(5):
            assert (await child.wait()).code == 0
    assert out_path.read_text() == "from stdin\nto stdout\n"
    assert err_path.read_text() == "to stderr\n"


async def test_none_is_dev_null_and_nothing_else_leaks(children: list[Child]) -> None:
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    os.set_inheritable(leak_w, True)
    try:
        # The C locale, built into libc: under C.UTF-8 sleep opens a locale file of its own
        # for a moment as it starts, which is not a leak.
        child = spawn(["sleep", "30"], **QUIET, env={"PATH": os.environ["PATH"], "LC_ALL": "C"})
        children.append(child)
        await exec_done(child.pid, "sleep")  # the fds of sleep, not of the launcher before it
        fds = {
            int(fd): os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")
        }
    finally:
        os.close(leak_r)
        os.close(leak_w)
    assert fds == {0: "/dev/null", 1: "/dev/null", 2: "/dev/null"}


async def test_env_cwd_umask(tmp_path: Path) -> None:
    out_path = tmp_path / "out"
    with open(out_path, "wb") as out:
        child = spawn(
            ["/bin/sh", "-c", 'echo "$ONLY"; pwd; umask; env | grep -c .'],
            stdin=None,
            stdout=out.fileno(),
            stderr=None,
            cwd=str(tmp_path),
            env={"ONLY": "this"},
            umask=0o027,
        )
        with anyio.fail_after(5):
            assert (await child.wait()).code == 0
    only, cwd, umask, count = out_path.read_text().split("\n")[:4]
    assert (only, cwd, umask) == ("this", str(tmp_path), "0027")
    assert int(count) <= 3  # ONLY, plus what sh itself sets (PWD, maybe SHLVL); nothing inherited


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_user_drops_groups(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    out_path = tmp_path / "out"
    with open(out_path, "wb") as out:
        child = spawn(
            ["sh", "-c", "id -u; id -g; id -G"], stdin=None, stdout=out.fileno(), stderr=None, user="nobody"
        )
        with anyio.fail_after(5):
            assert (await child.wait()).code == 0
    uid, gid, groups = out_path.read_text().split("\n")[:3]
    assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
    assert {int(g) for g in groups.split()} == set(os.getgrouplist("nobody", nobody.pw_gid))


# -- signals and groups -----------------------------------------------------------------------


async def spawn_with_grandchild(children: list[Child]) -> tuple[Child, int]:
    """A shell that starts a ``sleep`` in its group and waits: (the shell, the sleep's pid)."""
    out_r, out_w = os.pipe()
    child = spawn(["sh", "-c", "sleep 30 & echo $!; wait"], stdin=None, stdout=out_w, stderr=None)
    children.append(child)
    os.close(out_w)
    try:
        return child, int(await read_line(out_r))
    finally:
        os.close(out_r)


async def test_signal_reaches_the_group(children: list[Child]) -> None:
    child, grandchild = await spawn_with_grandchild(children)
    assert os.getpgid(grandchild) == child.pgid
    assert child.send_signal(signal.SIGTERM, group=True)
    await gone(grandchild)
    with anyio.fail_after(5):
        await child.wait()
    assert not child.send_signal(signal.SIGTERM)  # reaped: its pid is not ours to signal


async def test_leader_alone_and_group_killed_on_exit(wait_path: str, children: list[Child]) -> None:
    child, grandchild = await spawn_with_grandchild(children)
    assert child.send_signal(signal.SIGKILL, group=False)
    with anyio.fail_after(5):
        assert (await child.wait()).signal == signal.SIGKILL
    await gone(grandchild)  # killed when the leader was reaped


async def test_group_survives_without_kill_group_on_exit() -> None:
    out_r, out_w = os.pipe()
    child = spawn(
        ["sh", "-c", "sleep 30 & echo $!"], stdin=None, stdout=out_w, stderr=None, kill_group_on_exit=False
    )
    os.close(out_w)
    try:
        grandchild = int(await read_line(out_r))
    finally:
        os.close(out_r)
    pidfd = os.pidfd_open(grandchild)
    try:
        with anyio.fail_after(5):
            assert (await child.wait()).code == 0
        signal.pidfd_send_signal(pidfd, 0)  # still there
    finally:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
    await gone(grandchild)


# -- waiting ----------------------------------------------------------------------------------


async def test_concurrent_waiters_and_cancellation(wait_path: str, children: list[Child]) -> None:
    child = sleeper(children)
    results: list[ExitStatus] = []

    async def waiter() -> None:
        results.append(await child.wait())

    first = anyio.CancelScope()  # the first waiter watches the pidfd (or polls); it gets cancelled
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_scoped, first, waiter)
            await anyio.wait_all_tasks_blocked()
            for _ in range(3):
                tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            first.cancel()
            await anyio.wait_all_tasks_blocked()
            assert child.exit is None and results == []
            child.send_signal(signal.SIGKILL)
    assert len(results) == 3
    assert all(r is results[0] for r in results) and results[0].signal == signal.SIGKILL


async def _scoped(scope: anyio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()


async def test_poll_reaps_while_a_waiter_is_parked(wait_path: str, children: list[Child]) -> None:
    child = sleeper(children)
    fds_before = set(os.listdir("/proc/self/fd"))
    results: list[ExitStatus] = []

    async def waiter() -> None:
        results.append(await child.wait())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            child.send_signal(signal.SIGKILL)
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
            status = child.poll()
    assert status is not None and results == [status]
    assert set(os.listdir("/proc/self/fd")) <= fds_before  # the pidfd is closed once the waiter left it


async def test_no_fd_leak(children: list[Child]) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        sleeper(children)
    assert len(os.listdir("/proc/self/fd")) == before + 20  # one pidfd each
    for child in children:
        child.send_signal(signal.SIGKILL)
    with anyio.fail_after(10):
        for child in children:
            await child.wait()
    assert len(os.listdir("/proc/self/fd")) == before


WAIT_THREADS = """
    import json, os, signal, sys, threading
    import anyio
    from supervisor.process import spawn

    def threads():
        status = open("/proc/self/status").read()
        os_threads = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Threads:"))
        return [threading.active_count(), os_threads]

    async def main():
        seen = {"before": threads()}
        children = [spawn(["sleep", "30"], stdin=None, stdout=None, stderr=None) for _ in range(200)]
        seen["spawned"] = threads()
        results = []

        async def waiter(child):
            results.append(await child.wait())

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                for child in children:
                    tg.start_soon(waiter, child)
                await anyio.wait_all_tasks_blocked()
                seen["waiting"] = threads()
                for child in children:
                    child.send_signal(signal.SIGKILL)
        seen["after"] = threads()
        seen["killed"] = sum(1 for r in results if r.signal == signal.SIGKILL)
        print(json.dumps(seen))

    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_wait_uses_no_threads(backend: str) -> None:
    """200 children waited for at once, under each backend: not one thread more.

    In an interpreter of its own: the suite's shared event loops may start a worker thread
    for an earlier test's teardown while this one counts.
    """
    seen = run_script(WAIT_THREADS, backend)
    assert seen["killed"] == 200
    assert seen["spawned"] == seen["waiting"] == seen["after"] == seen["before"] == [1, 1]


# -- in a helper interpreter: parent death, orphans, fd limits --------------------------------

PARENT_DEATH = """
    import os, signal, sys
    from supervisor import launcher, process
    from supervisor.process import spawn
    death = None if sys.argv[1] == "none" else signal.SIGKILL
    launcher.USE_LAUNCHER = sys.argv[2] == "launcher"
    child = spawn(["sleep", "30"], stdin=None, stdout=None, stderr=None, parent_death_signal=death)
    print(child.pid, flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("how", ["launcher", "preexec"])
@pytest.mark.parametrize("death", ["kill", "none"])
async def test_parent_death_signal(death: str, how: str) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    script = textwrap.dedent(PARENT_DEATH)
    helper = spawn([sys.executable, "-c", script, death, how], stdin=in_r, stdout=out_w, stderr=None)
    os.close(in_r)
    os.close(out_w)
    try:
        grandchild = int(await read_line(out_r))
        pidfd = os.pidfd_open(grandchild)
    finally:
        os.close(out_r)
    try:
        # The death signal is set before the program runs: kill the helper once sleep runs.
        # (Before that, the gate's parent check stops an orphaned launcher: test_gate_*.)
        await exec_done(grandchild, "sleep")
        helper.send_signal(signal.SIGKILL, group=False)
        with anyio.fail_after(5):
            assert (await helper.wait()).signal == signal.SIGKILL
        if death == "kill":
            with anyio.fail_after(5):
                await anyio.wait_readable(pidfd)
        else:
            # alive, though the helper is reaped (a death signal would have been sent by now)
            signal.pidfd_send_signal(pidfd, 0)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await gone(grandchild)
    finally:
        os.close(pidfd)
        os.close(in_w)


def test_gate_stops_a_child_whose_parent_is_gone(tmp_path: Path) -> None:
    """The window setpriv leaves: the parent died before the death signal was set. No program then."""
    script = launcher._gate(True, None, keep_pwd=False)
    ran = tmp_path / "ran"
    touch = ["touch", str(ran)]
    orphaned = subprocess.run(["sh", "-c", script, "gate", "1", "", "", *touch], timeout=20)
    assert orphaned.returncode == 125 and not ran.exists()
    ours = subprocess.run(["sh", "-c", script, "gate", str(os.getpid()), "", "", *touch], timeout=20)
    assert ours.returncode == 0 and ran.exists()


WATCH = """
    import fcntl, json, os, sys
    from supervisor import launcher, process
    launcher.USE_LAUNCHER = sys.argv[1] == "launcher"
    env = {"PATH": os.environ["PATH"], **json.loads(sys.argv[2])}
    read, write = os.pipe2(os.O_CLOEXEC)
    high = fcntl.fcntl(write, fcntl.F_DUPFD_CLOEXEC, 100)  # a POSIX shell cannot name it
    os.close(write)
    os.set_blocking(read, False)
    calls = []

    class Watch:
        fd = high
        def started(self, pgid): calls.append(["started", pgid])
        def ended(self, pgid): calls.append(["ended", pgid])

    process.watch_groups(Watch())
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    program = (
        "import os, sys; "
        "print(repr((os.environ.get('PWD', 'unset'), os.environ.get('LC_ALL'))), flush=True); "
        "sys.stdin.read()"
    )
    child = process.spawn([sys.executable, "-c", program], stdin=in_r, stdout=out_w, stderr=None, env=env)
    os.close(in_r)
    os.close(out_w)
    pwd, locale = eval(os.read(out_r, 1000).decode())  # blocks until the program runs
    registered = os.read(read, 100).decode()  # so it must be here already
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{child.pid}/fd"))
    os.close(in_w)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    child.poll()
    output = {"fds": fds, "pwd": pwd, "locale": locale}
    print(json.dumps({"pid": child.pid, "registered": registered, "calls": calls, "out": output}))
"""


@pytest.mark.parametrize("how", ["launcher", "preexec"])
@pytest.mark.parametrize(("pwd", "locale"), [(None, None), ("/no/such/folder", ""), (None, "C.UTF-8 'x' $y")])
def test_child_registers_its_group_before_the_program_runs(
    how: str, pwd: str | None, locale: str | None
) -> None:
    """The launchers run in the C locale (launcher.launch_env); the program gets its own LC_ALL
    back from the gate, unset, empty or odd as it was, and its own PWD."""
    env = {"PWD": pwd} if pwd else {}
    if locale is not None:
        env["LC_ALL"] = locale
    report = run_script(WATCH, how, json.dumps(env))
    pid = report["pid"]
    assert report["registered"] == f"+{pid}\n"  # written by the child itself, before exec
    # Registered once, by the child: the service does not wake the guardian a second time for it.
    assert report["calls"] == [["ended", pid]]
    # No fd of the watch; PWD and LC_ALL as given.
    assert report["out"] == {"fds": [0, 1, 2], "pwd": pwd or "unset", "locale": locale}


ORPHANS = """
    import json, os, sys
    import anyio
    from supervisor import orphans as o, process as p

    def read_pid(fd):
        data = b""
        while not data.endswith(b"\\n"):
            data += os.read(fd, 100)
        return int(data)

    def start_orphan():
        # sh starts a subshell that exits 9 at EOF on its stdin, prints its pid, and exits
        # first: the subshell is reparented to us. (Its group is not killed on purpose.)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        leader = p.spawn(
            ["sh", "-c", "exec 3<&0; (cat <&3 >/dev/null; exit 9) & echo $!"],
            stdin=in_r, stdout=out_w, stderr=None, kill_group_on_exit=False,
        )
        os.close(in_r)
        os.close(out_w)
        orphan = read_pid(out_r)
        os.close(out_r)
        return leader, orphan, in_w

    def reaped(pid):
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return False

    async def main():
        report = {"subreaper": o.become_subreaper()}

        # 1. reap_orphans, with an exited direct child heading the wait queue
        direct = p.spawn(["sh", "-c", "exit 7"], stdin=None, stdout=None, stderr=None)
        leader, orphan, release = start_orphan()
        assert (await leader.wait()).code == 0
        report["adopted"] = orphan in o.living_children()
        pidfd = os.pidfd_open(orphan)
        os.close(release)
        await anyio.wait_readable(pidfd)  # the orphan exited: a zombie of ours now
        os.close(pidfd)
        os.waitid(os.P_PID, direct.pid, os.WEXITED | os.WNOWAIT)
        first = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        report["direct_first"] = first.si_pid == direct.pid
        statuses = o.reap_orphans()
        report["reaped"] = [[s.pid == orphan, s.code, s.signal] for s in statuses]
        report["gone"] = reaped(orphan)
        report["direct"] = (await direct.wait()).code

        # 2. run_orphan_reaper, woken by SIGCHLD
        leader, orphan, release = start_orphan()
        assert (await leader.wait()).code == 0
        seen, found = [], anyio.Event()
        real = o.reap_orphans

        def spy():
            statuses = real()
            seen.extend(statuses)
            if any(s.pid == orphan for s in statuses):
                found.set()
            return statuses

        o.reap_orphans = spy
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(o.run_orphan_reaper)
                await anyio.wait_all_tasks_blocked()
                os.close(release)
                await found.wait()
                tg.cancel_scope.cancel()
        report["reaper"] = [[s.pid == orphan, s.code] for s in seen]
        report["reaper_gone"] = reaped(orphan)
        report["left"] = o.living_children()
        print(json.dumps(report))

    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_orphans_are_reaped_without_stealing(backend: str) -> None:
    report = run_script(ORPHANS, backend)
    assert report == {
        "subreaper": True,
        "adopted": True,
        "direct_first": True,
        "reaped": [[True, 9, None]],
        "gone": True,
        "direct": 7,
        "reaper": [[True, 9]],
        "reaper_gone": True,
        "left": [],
    }


FD_LIMIT = """
    import json, os, resource, sys
    from supervisor import launcher, process
    from supervisor.process import raise_fd_limit, spawn
    launcher.USE_LAUNCHER = sys.argv[1] == "launcher"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    raised = raise_fd_limit()
    r, w = os.pipe()
    child = spawn(["sh", "-c", "ulimit -n"], stdin=None, stdout=w, stderr=None)
    os.close(w)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    child.poll()
    print(json.dumps({"raised": raised, "now": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                      "hard": hard, "child": int(os.read(r, 100))}))
"""


@pytest.mark.parametrize("how", ["launcher", "preexec"])
def test_raise_fd_limit_not_for_children(how: str) -> None:
    report = run_script(FD_LIMIT, how)
    assert report["raised"] == report["now"] > 256
    if report["hard"] != -1:  # RLIM_INFINITY: raised to fs.nr_open instead
        assert report["raised"] == report["hard"]
    assert report["child"] == 256  # children get the limit the service started with
