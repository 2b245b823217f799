"""Log capture through real instances: nothing lost across crashes, restarts and rotations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from supervisor.events import State

from .helpers import manifest_from, running, wait_for_output

pytestmark = pytest.mark.anyio

RUNS = 51  # the first run, then 50 restarts after a crash
LINES = 20


def _rotated_in_order(current: Path) -> list[Path]:
    """NAME.out.log.N … .1, then NAME.out.log: oldest first."""
    backups = sorted(
        current.parent.glob(current.name + ".*"), key=lambda p: int(p.suffix[1:]), reverse=True
    )
    return [*backups, current]


async def test_fifty_crashes_and_many_rotations_lose_no_line(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    # Each run writes LINES numbered lines, the last one without a newline, then crashes (exit 1);
    # the last run exits 0. The padding makes the log rotate every few runs.
    script = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}; "
        f"i=0; while [ $i -lt {LINES - 1} ]; do "
        'echo "line $n.$i ........................................"; i=$((i + 1)); done; '
        'printf "line $n.$i last, no newline"; '
        f'[ "$n" -ge {RUNS - 1} ] && exit 0; exit 1'
    )
    manifest = manifest_from(
        f"""
        version: 1
        instances:
          crasher:
            command: ["sh", "-c", {script!r}]
            restart:
              policy: on-failure
              min_uptime: 0
              max_restarts: 1000
              backoff: {{initial: 1ms, factor: 1, max: 1ms}}
            logs: {{max_bytes: 4KB, backups: 1000}}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, events):
        instance = manager.instances["crasher"]
        await events.wait_for(
            lambda e: e.instance == "crasher" and e.to_state in (State.EXITED, State.FAILED), timeout=60
        )
        assert instance.state is State.EXITED, instance.status().reason
        # Every start after the first is a restart, and every crash was followed by a run of the
        # script (the counter file counts them). A start whose spawn failed (the machine out of
        # processes, under the load of a parallel suite: once, 51 restarts for 50 crashes) is a
        # restart too: a start with no process of its own, then a backoff with no exit status.
        moves = events.of("crasher")
        starts = [e for e in moves if e.to_state is State.STARTING]
        runs = {e.pid for e in starts if e.pid is not None}
        said = [e.reason for e in moves if e.to_state is State.BACKOFF and e.exit_code is None]
        assert instance.status().restarts == len(starts) - 1, said
        assert len(runs) == RUNS and counter.read_text().strip() == str(RUNS), said
        await wait_for_output(instance, f"line {RUNS - 1}.{LINES - 1} last".encode())
        log_file = Path(instance.status().log_files["stdout"])
    files = _rotated_in_order(log_file)
    assert len(files) > 10, "the log should have rotated many times"
    text = b"".join(f.read_bytes() for f in files).decode()
    numbers = [(int(a), int(b)) for a, b in re.findall(r"line (\d+)\.(\d+)", text)]
    assert numbers == [(n, i) for n in range(RUNS) for i in range(LINES)]


async def test_stderr_merged_into_stdout_keeps_both_in_order(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          both:
            command: ["sh", "-c", "echo out-1; echo err-1 >&2; echo out-2; echo err-2 >&2; echo done"]
            stderr: stdout
            restart: {policy: "no", min_uptime: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, _events):
        instance = manager.instances["both"]
        assert set(instance.sinks) == {"stdout"}  # no separate stderr log
        await wait_for_output(instance, b"done")
        assert instance.sinks["stdout"].tail(10) == [b"out-1", b"err-1", b"out-2", b"err-2", b"done"]
        text = Path(instance.status().log_files["stdout"]).read_text()
        assert text == "out-1\nerr-1\nout-2\nerr-2\ndone\n"


async def test_replicas_with_a_custom_log_file_each_get_their_own(tmp_path: Path) -> None:
    manifest = manifest_from(
        """
        version: 1
        instances:
          web:
            command: ["sh", "-c", "echo i am $$$$; exec sleep 300"]
            replicas: 2
            logs: {stdout_file: logs/web.log}
            restart: {min_uptime: 0}
        """,
        tmp_path,
    )
    async with running(manifest) as (manager, _events):
        for name in ("web-0", "web-1"):
            instance = manager.instances[name]
            await wait_for_output(instance, b"i am")
            path = Path(instance.status().log_files["stdout"])
            assert path == tmp_path / "logs" / f"{name}.log"
            assert path.read_text() == f"i am {instance.pid}\n"
