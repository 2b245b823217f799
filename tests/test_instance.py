"""The supervision core with real processes: lifecycle, restart policy, backoff, stop."""

from __future__ import annotations

import itertools
import os
import signal
import threading
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from supervisor.events import State
from supervisor.health import Health, Resumed
from supervisor.instance import InvalidRequest
from supervisor.process import raise_fd_limit

from .helpers import manifest_from, pid_alive, running, wait_for_output, wait_gone

pytestmark = pytest.mark.anyio


def _to(state: State, name: str | None = None):  # type: ignore[no-untyped-def]
    return lambda e: e.to_state is state and (name is None or e.instance == name)


async def test_exit_code_and_signal_are_reported(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          code:
            command: ["sh", "-c", "exit 3"]
            restart: {policy: "no", min_uptime: 0}
          killed:
            command: ["sh", "-c", "kill -KILL $$$$"]  # $$ is a literal $ in a manifest
            restart: {policy: "no", min_uptime: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        code = await events.wait_for(_to(State.EXITED, "code"))
        killed = await events.wait_for(_to(State.EXITED, "killed"))
        assert (code.exit_code, code.exit_signal) == (3, None)
        assert (killed.exit_code, killed.exit_signal) == (None, signal.SIGKILL)
        assert killed.reason == "killed by SIGKILL"
        status = {s.name: s for s in manager.status()}
        assert status["code"].exit_code == 3 and status["code"].pid is None
        assert status["killed"].exit_signal == signal.SIGKILL


async def test_on_failure_backs_off_with_growing_delays_then_fails(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          crash:
            command: ["sh", "-c", "exit 1"]
            restart:
              policy: on-failure
              min_uptime: 5s
              max_restarts: 4
              backoff: {initial: 50ms, factor: 2, max: 10s}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        failed = await events.wait_for(_to(State.FAILED, "crash"), timeout=20)
        assert "gave up after 5 failed starts in a row" in (failed.reason or "")
        assert "exit code 1" in (failed.reason or "")
        history = events.of("crash")
        delays = [
            after.at - before.at
            for before, after in itertools.pairwise(history)
            if before.to_state is State.BACKOFF and after.to_state is State.STARTING
        ]
        assert len(delays) == 4
        for k, delay in enumerate(delays):
            assert delay >= 0.05 * 2**k, delays
        assert all(b > a * 1.5 for a, b in itertools.pairwise(delays)), delays
        assert manager.instances["crash"].status().restarts == 4


async def test_success_code_does_not_restart_under_on_failure(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          job:
            command: ["sh", "-c", "exit 0"]
        """,
        tmp_path,
    )
    async with running(manifest) as (_manager, events):
        done = await events.wait_for(_to(State.EXITED, "job"))
        assert done.from_state is State.STARTING  # a one-shot job, not a failed start
        assert [e.to_state for e in events.of("job")] == [State.STARTING, State.EXITED]


async def test_early_exit_is_a_failed_start_even_with_policy_no(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          flaky:
            command: ["sh", "-c", "exit 2"]
            restart: {policy: "no", min_uptime: 5s, max_restarts: 1, backoff: {initial: 10ms}}
        """,
        tmp_path,
    )
    async with running(manifest) as (_, events):
        failed = await events.wait_for(_to(State.FAILED, "flaky"))
        assert "before min_uptime" in (failed.reason or "")


async def test_missing_command_goes_through_backoff_to_failed(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          ghost:
            command: ["/nonexistent/program", "--flag"]
            restart: {max_restarts: 2, backoff: {initial: 10ms}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        failed = await events.wait_for(_to(State.FAILED, "ghost"))
        states = [e.to_state for e in events.of("ghost")]
        assert states.count(State.BACKOFF) == 3 and states[-1] is State.FAILED
        backoff = next(e for e in events.of("ghost") if e.to_state is State.BACKOFF)
        assert "No such file or directory" in (backoff.reason or "")
        assert "/nonexistent/program" in (failed.reason or "")
        assert "No such file or directory" in (manager.instances["ghost"].status().reason or "")


async def test_program_ignoring_sigterm_is_killed_after_stop_timeout(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          stubborn:
            command: ["sh", "-c", "trap '' TERM; echo ready; while true; do sleep 1; done"]
            restart: {min_uptime: 0}
            stop: {timeout: 300ms}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        instance = manager.instances["stubborn"]
        await events.wait_for(_to(State.RUNNING, "stubborn"))
        await wait_for_output(instance, b"ready")  # the trap is set
        started = anyio.current_time()
        await instance.stop()
        elapsed = anyio.current_time() - started
        stopped = await events.wait_for(_to(State.STOPPED, "stubborn"))
        assert stopped.exit_signal == signal.SIGKILL
        assert "killed after" in (stopped.reason or "")
        assert elapsed >= 0.3


def _process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_a_stopped_program_is_continued_to_take_its_stop_signal(tmp_path: Path) -> None:
    """A program paused with SIGSTOP (``supervisor signal STOP``, ^Z, a debugger) takes SIGTERM only
    once it runs again: it sat until the SIGKILL, stop.timeout later, its handler never run."""
    manifest = manifest_from(
        """
        version: 1
        instances:
          paused:
            # No child processes: a child's exit while the group is stopped makes the kernel send
            # the (orphaned) group SIGHUP and SIGCONT, which would end or resume it behind the test.
            command:
              - python3
              - -c
              - |
                import signal, sys
                signal.signal(signal.SIGTERM, lambda *_: (print("got TERM", flush=True), sys.exit(0)))
                print("ready", flush=True)
                while True:
                    signal.pause()
            restart: {min_uptime: 0}
            stop: {timeout: 60s}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        instance = manager.instances["paused"]
        await events.wait_for(_to(State.RUNNING, "paused"))
        await wait_for_output(instance, b"ready")  # the trap is set
        assert instance.pid is not None
        pid = instance.pid
        instance.signal(signal.SIGSTOP)
        with anyio.fail_after(10):  # the kernel stops it as the signal is sent: a few turns at most
            while _process_state(pid) != "T":
                await anyio.lowlevel.checkpoint()
        with anyio.fail_after(30):
            await instance.stop()
        stopped = await events.wait_for(_to(State.STOPPED, "paused"))
        assert (stopped.exit_code, stopped.exit_signal) == (0, None), stopped
        assert "killed after" not in (stopped.reason or "")
        await wait_for_output(instance, b"got TERM")


async def test_grandchild_dies_with_the_group_on_stop(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          parent:
            command: ["sh", "-c", "sleep 300 & echo $! > {pidfile}; echo ready; wait"]
            restart: {{min_uptime: 0}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, _events):
        instance = manager.instances["parent"]
        await wait_for_output(instance, b"ready")
        grandchild = int(pidfile.read_text())
        assert pid_alive(grandchild)
        await instance.stop()
        await wait_gone(grandchild)
        assert not pid_alive(grandchild)


async def test_requests_that_make_no_sense_raise_and_change_nothing(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          idle:
            command: ["sleep", "300"]
            autostart: false
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        instance = manager.instances["idle"]
        assert instance.state is State.STOPPED
        with pytest.raises(InvalidRequest, match="not running"):
            instance.signal(signal.SIGHUP)
        with pytest.raises(InvalidRequest, match="not running"):
            await instance.stop()
        assert instance.state is State.STOPPED and events.of("idle") == []
        await instance.start()
        with pytest.raises(InvalidRequest, match="already"):
            await instance.start()
        assert await instance.wait(timeout=0.05) is None  # still running: the wait times out


async def test_signal_reaches_the_program(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          target:
            command: ["sleep", "300"]
            restart: {policy: "no", min_uptime: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        instance = manager.instances["target"]
        await events.wait_for(_to(State.RUNNING, "target"))
        instance.signal(signal.SIGUSR1)
        exit = await instance.wait(timeout=10)
        assert exit is not None and exit.signal == signal.SIGUSR1
        exited = await events.wait_for(_to(State.EXITED, "target"))
        assert exited.exit_signal == signal.SIGUSR1


async def test_stop_during_backoff_cancels_the_pending_start(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          crash:
            command: ["sh", "-c", "exit 1"]
            restart: {min_uptime: 5s, backoff: {initial: 30s}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.BACKOFF, "crash"))
        with anyio.fail_after(5):
            await manager.instances["crash"].stop()
        assert manager.instances["crash"].state is State.STOPPED
        stopped = await events.wait_for(_to(State.STOPPED, "crash"))
        assert stopped.from_state is State.BACKOFF
        assert [e.to_state for e in events.of("crash")].count(State.STARTING) == 1


async def test_start_during_stop_waits_then_starts(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          slow:
            command: ["sh", "-c", "trap 'sleep 0.3; exit 0' TERM; while true; do sleep 1; done"]
            restart: {min_uptime: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        instance = manager.instances["slow"]
        await events.wait_for(_to(State.RUNNING, "slow"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(instance.stop)
            await events.wait_for(_to(State.STOPPING, "slow"))
            await instance.start()  # queued behind the stop
        await events.until(lambda: [e.to_state for e in events.of("slow")].count(State.STARTING) == 2)
        states = [e.to_state for e in events.of("slow")]
        stopping = states.index(State.STOPPING)
        assert states[stopping : stopping + 3] == [State.STOPPING, State.STOPPED, State.STARTING]
        assert instance.pid is not None


async def test_twenty_concurrent_restarts_leave_exactly_one_process(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          svc:
            command: ["sleep", "300"]
            restart: {min_uptime: 0}
            stop: {timeout: 5s}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        instance = manager.instances["svc"]
        await events.wait_for(_to(State.RUNNING, "svc"))
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(instance.restart)
        starts = lambda: [e.pid for e in events.of("svc") if e.to_state is State.STARTING]  # noqa: E731
        await events.until(lambda: len(starts()) == 21)
        pids = set(starts())
        assert len(pids) == 21
        current = instance.pid
        assert current is not None and pid_alive(current)
        assert [pid for pid in pids if pid_alive(pid)] == [current]


async def test_no_write_end_of_a_log_pipe_stays_in_the_service(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          logger:
            command: ["sh", "-c", "echo hello; sh -c 'echo oops >&2'; exec sleep 300"]
            restart: {min_uptime: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        instance = manager.instances["logger"]
        await events.wait_for(_to(State.RUNNING, "logger"))
        # Past the gate (its redirections swap fds 1 and 2 for a moment). The line on stderr comes
        # from a shell of its own, so that the program's own fds 1 and 2 are never swapped.
        stderr = instance.sinks["stderr"]
        with anyio.fail_after(10):
            async with stderr.follow() as chunks:
                if not any(b"oops" in line for line in stderr.tail(10)):
                    async for chunk in chunks:
                        if b"oops" in chunk:
                            break
        pipes = {_inode(pipe.read_fd) for pipe in instance._pipes.values()}
        assert len(pipes) == 2
        writers = [fd for fd in _open_fds() if _inode(fd) in pipes and _is_write_end(fd)]
        assert writers == []
        # ... while the child holds them: its fd 1 and 2 are those pipes.
        child_fds = {os.stat(f"/proc/{instance.pid}/fd/{n}").st_ino for n in (1, 2)}
        assert child_fds == pipes


async def test_a_thousand_instances_run_with_few_threads(tmp_path: Path) -> None:
    raise_fd_limit()
    manifest = manifest_from(
        """
        version: 1
        instances:
          many:
            command: ["sleep", "300"]
            replicas: 1000
            stdout: null
            stderr: null
            restart: {min_uptime: 0}
            stop: {timeout: 5s}
        """,
        tmp_path,
    )
    before = threading.active_count()
    async with running(manifest) as (manager, events):
        await events.until(lambda: manager.count(State.RUNNING) == 1000, timeout=60)
        assert _os_threads() < 10, _os_threads()
        assert threading.active_count() <= before + 1
        pids = [s.pid for s in manager.status()]
        assert len(set(pids)) == 1000 and all(pids)
    assert not any(pid_alive(pid) for pid in pids if pid)


def _os_threads() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line in /proc/self/status")


def _open_fds() -> list[int]:
    return [int(n) for n in os.listdir("/proc/self/fd")]


def _inode(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def _is_write_end(fd: int) -> bool:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    except FileNotFoundError:
        return False
    return False


async def test_requests_queued_behind_a_shutdown_do_not_start_anything(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          slow:
            command: ["sh", "-c", "trap 'sleep 0.3; exit 0' TERM; echo ready; while true; do sleep 1; done"]
            restart: {min_uptime: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        instance = manager.instances["slow"]
        await wait_for_output(instance, b"ready")  # the trap is set
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.shutdown)
            await events.wait_for(_to(State.STOPPING, "slow"))
            with pytest.raises(InvalidRequest, match="closing"):
                await instance.restart()  # queued behind the stop, refused once it is done
            with pytest.raises(InvalidRequest, match="shutting down"):
                await manager.apply(manifest)
        assert instance.state is State.STOPPED
        assert [e.to_state for e in events.of("slow")].count(State.STARTING) == 1
        stopped = await events.wait_for(_to(State.STOPPED, "slow"))
        assert stopped.reason == "the service is shutting down"


async def test_a_fault_in_one_instances_supervision_fails_that_instance_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug of ours in one instance's loop (injected here: no program can cause one on purpose)
    ends that instance in `failed`, kills its program, and leaves the others and the manager be."""
    manifest = manifest_from(
        """
        version: 1
        instances:
          faulty: {command: ["sleep", "60"], restart: {min_uptime: 0}, autostart: false}
          healthy: {command: ["sleep", "60"], restart: {min_uptime: 0}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        await events.wait_for(_to(State.RUNNING, "healthy"))
        healthy_pid = manager.instances["healthy"].pid
        original = Health.begin_run

        def broken(self: Health, resumed: Resumed | None) -> float | None:
            if self._name == "faulty":  # once the program is spawned, as it begins to be watched
                raise RuntimeError("injected fault")
            return original(self, resumed)

        monkeypatch.setattr(Health, "begin_run", broken)
        await manager.instances["faulty"].start()
        failed = await events.wait_for(_to(State.FAILED, "faulty"))
        assert failed.reason == "unexpected error in its supervision: RuntimeError: injected fault"
        spawned = next(e for e in events.of("faulty") if e.to_state is State.STARTING)
        assert spawned.pid is not None and not pid_alive(spawned.pid)
        assert "faulty: unexpected error in its supervision" in caplog.text
        assert "Traceback" in caplog.text or "injected fault" in caplog.text
        assert manager.instances["healthy"].pid == healthy_pid
        # Started by hand again (the fault gone), it runs.
        monkeypatch.setattr(Health, "begin_run", original)
        await manager.instances["faulty"].start()
        await events.until(lambda: manager.instances["faulty"].state is State.RUNNING)


async def test_an_instance_keeps_one_task_and_its_log_pipes_none(tmp_path: Path) -> None:
    """A running instance with both streams captured costs one task (``run()``, hosting the
    supervise loop); its pipes are read by the manager's one reactor. A task per captured
    stream, a supervise loop apart from ``run()``, or a watcher left beside a plain run
    would each add one per instance here."""
    manifest = manifest_from(
        """
        version: 1
        instances:
          many:
            command: ["sh", "-c", "echo out; echo err >&2; exec sleep 300"]
            replicas: 10
            restart: {min_uptime: 0}
        """,
        tmp_path,
    )

    async def settled_tasks(count: int) -> int:
        await events.until(lambda: manager.count(State.RUNNING) == count, timeout=30)
        for instance in manager.instances.values():  # the reactor reads both pipes of each
            await wait_for_output(instance, b"out")
            with anyio.fail_after(10):
                while not instance.sinks["stderr"].tail(1):
                    await anyio.wait_all_tasks_blocked()
        await anyio.wait_all_tasks_blocked()
        return len(anyio.get_running_tasks())

    async with running(manifest) as (manager, events):
        ten = await settled_tasks(10)
        await manager.scale({"many": 40})
        forty = await settled_tasks(40)
        assert forty - ten == 30
        assert all(set(i.sinks) == {"stdout", "stderr"} for i in manager.instances.values())
