"""Every control command of the CLI, run as a user runs it, against a real service."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .service_fixture import SUPERVISOR, ServiceProcess, pid_gone, write_manifest

Start = Callable[..., ServiceProcess]

MANIFEST = """
version: 1
instances:
  web:
    command: ["sh", "-c", "trap 'echo got HUP' HUP; echo web up; while true; do sleep 0.1; done"]
    replicas: 2
    restart: {min_uptime: 0}
  worker:
    command: ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; done; exec sleep 300"]
    restart: {min_uptime: 0}
  job:
    command: ["sh", "-c", "echo done"]
    autostart: false
"""


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SUPERVISOR_SOCKET"}
    return subprocess.run(
        [*SUPERVISOR, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**environ, **(env or {})},
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\nstderr: {result.stderr}"
    return result


def test_status_as_a_table_and_as_json(service: Start) -> None:
    svc = service(MANIFEST)
    ok(svc.cli("wait", "web", "worker", "--state", "running"))
    table = ok(svc.cli("status")).stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "READY", "PID", "UPTIME", "RESTARTS", "CPU", "MEM", "INFO"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == {"web-0", "web-1", "worker", "job"}
    assert rows["web-0"][1:3] == ["running", "-"] and rows["web-0"][3].isdigit() and rows["web-0"][5] == "0"
    assert rows["job"][1:5] == ["stopped", "-", "-", "-"]
    assert rows["web-0"][6].endswith("%") and rows["web-0"][7][-1] in "KMG", rows["web-0"]
    assert rows["job"][6:8] == ["-", "-"]

    statuses = json.loads(ok(svc.cli("status", "--json")).stdout)
    assert [s["name"] for s in statuses] == ["web-0", "web-1", "worker", "job"]
    by_name = {s["name"]: s for s in statuses}
    assert int(rows["worker"][3]) == by_name["worker"]["pid"]
    assert by_name["web-1"]["group"] == "web" and by_name["web-1"]["stdout"] == "log"
    assert by_name["job"]["pid"] is None and by_name["job"]["state"] == "stopped"
    assert by_name["worker"]["rss_bytes"] > 0 and by_name["worker"]["processes"] >= 1
    assert by_name["job"]["rss_bytes"] is None and by_name["job"]["cpu_percent"] is None

    picked = json.loads(ok(svc.cli("status", "web", "job", "--json")).stdout)
    assert [s["name"] for s in picked] == ["web-0", "web-1", "job"]
    unknown = svc.cli("status", "nope")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("supervisor: no instance matches 'nope'")


def test_start_stop_restart(service: Start) -> None:
    svc = service(MANIFEST)
    ok(svc.cli("wait", "--all", "--state", "running,stopped"))
    before = svc.status()

    stopped = json.loads(ok(svc.cli("stop", "web", "--json")).stdout)
    assert stopped["ok"] and [(r["name"], r["state"], r["pid"]) for r in stopped["results"]] == [
        ("web-0", "stopped", None),
        ("web-1", "stopped", None),
    ]
    assert pid_gone(before["web-0"]["pid"]) and pid_gone(before["web-1"]["pid"])

    again = svc.cli("stop", "web-0")
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr == "supervisor: web-0: not running (stopped)\n"

    started = ok(svc.cli("start", "web-*"))
    assert [line.split(":")[0] for line in started.stdout.splitlines()] == ["web-0", "web-1"]
    assert all(": running (pid " in line for line in started.stdout.splitlines())

    job = json.loads(ok(svc.cli("start", "job", "--json")).stdout)
    assert job["results"][0]["state"] == "exited"  # a one-shot job that succeeded is ok

    worker = svc.status("worker")["worker"]["pid"]
    restarted = json.loads(ok(svc.cli("restart", "worker", "--json", "--timeout", "10s")).stdout)
    [result] = restarted["results"]
    assert result["ok"] and result["state"] == "running" and result["pid"] != worker
    assert pid_gone(worker)

    accepted = ok(svc.cli("stop", "--all", "--no-wait"))
    assert "stop requested" in accepted.stdout
    ok(svc.cli("wait", "--all", "--state", "stopped,exited"))

    assert svc.cli("start").returncode == 2  # neither names nor --all
    assert svc.cli("start", "web", "--all").returncode == 2
    bad = svc.cli("start", "web", "--timeout", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_signal(service: Start) -> None:
    svc = service(MANIFEST)
    ok(svc.cli("wait", "web-0", "--state", "running"))
    sent = json.loads(ok(svc.cli("signal", "HUP", "web-0", "--json")).stdout)
    assert sent["ok"] and sent["results"][0]["name"] == "web-0"
    svc.wait_output("web-0", b"got HUP")
    refused = svc.cli("signal", "TERM", "job")
    assert refused.returncode == 1 and "not running" in refused.stderr
    by_number = ok(svc.cli("signal", "10", "worker"))
    assert by_number.stdout.startswith("worker: sent 10")


def _read_until(stream: int, needle: bytes, timeout: float = 20) -> bytes:
    """Read a pipe until ``needle`` shows up; bounded by ``timeout`` (select, no sleeping)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} did not come within {timeout}s; got {seen!r}"
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream, 65536)
            assert chunk, f"the stream ended before {needle!r}; got {seen!r}"
            seen += chunk
    return seen


def test_logs_tail_stderr_follow_and_reopen(service: Start, tmp_path: Path) -> None:
    fifo = tmp_path / "poke"
    os.mkfifo(fifo)
    svc = service(
        f"""
        version: 1
        instances:
          echo:
            command: ["sh", "-c", "echo ready; while true; do read line < {fifo}; echo \\"got $line\\"; done"]
            restart: {{min_uptime: 0}}
          lines:
            command: ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; done; echo warn >&2; exec sleep 300"]
            restart: {{min_uptime: 0}}
        """
    )
    ok(svc.cli("wait", "--all", "--state", "running"))
    svc.wait_output("lines", b"line 5")
    svc.wait_output("lines", b"warn", stream="stderr")
    assert ok(svc.cli("logs", "lines", "-n", "2")).stdout == "line 4\nline 5\n"
    assert ok(svc.cli("logs", "lines")).stdout == "".join(f"line {i}\n" for i in range(1, 6))
    assert ok(svc.cli("logs", "lines", "--stderr")).stdout == "warn\n"

    follower = subprocess.Popen(
        [*SUPERVISOR, "logs", "echo", "-n", "1", "-f", "-s", str(svc.socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        out = follower.stdout.fileno()
        assert _read_until(out, b"ready\n") == b"ready\n"  # the tail: it is following now
        with open(fifo, "w") as poke:
            poke.write("poked\n")
        assert b"got poked\n" in _read_until(out, b"got poked\n")
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=20) == 130
    assert follower.stderr is not None and follower.stderr.read() == b""

    log = Path(svc.status("lines")["lines"]["log_files"]["stdout"])
    log.rename(log.with_name("rotated.log"))
    assert ok(svc.cli("logs", "--reopen")).stdout == "reopened 4 log files\n"
    assert log.exists()

    unknown = svc.cli("logs", "nope")
    assert unknown.returncode == 1 and "no instance matches 'nope'" in unknown.stderr
    missing = svc.cli("logs")
    assert missing.returncode == 2 and "name an instance" in missing.stderr


def test_logs_dash_f_follows_or_names_the_manifest(service: Start, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    svc = service(manifest)
    ok(svc.cli("wait", "worker", "--state", "running"))
    # `-f FILE` is the manifest, as in every command; a bare -f follows (here, until ^C).
    tail = run("logs", "worker", "-n", "1", "-f", str(manifest))
    assert ok(tail).stdout in ("line 5\n", "")
    swapped = run("logs", "-f", "worker")
    assert swapped.returncode == 2 and "put -f after the name" in swapped.stderr
    follower = subprocess.Popen(
        [*SUPERVISOR, "logs", "worker", "-n", "5", "-f", "-f", str(manifest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        assert b"line 5\n" in _read_until(follower.stdout.fileno(), b"line 5\n")
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=20)


def test_wait(service: Start) -> None:
    svc = service(MANIFEST)
    reached = json.loads(ok(svc.cli("wait", "web", "--state", "running", "--json")).stdout)
    assert reached["ok"] and {r["state"] for r in reached["results"]} == {"running"}
    assert ok(svc.cli("wait", "job", "--state", "stopped")).stdout == "job: stopped\n"
    started = time.monotonic()
    timed_out = svc.cli("wait", "job", "--state", "running", "--timeout", "300ms")
    assert timed_out.returncode == 1
    assert timed_out.stderr == "supervisor: job: not running after 0.3s\n"
    assert time.monotonic() - started < 20
    assert svc.cli("wait", "job", "--state", "sleeping").returncode == 2


def test_shutdown(service: Start) -> None:
    svc = service(MANIFEST)
    ok(svc.cli("wait", "web", "worker", "--state", "running"))
    pids = [s["pid"] for s in svc.status().values() if s["pid"]]
    assert len(pids) == 3
    assert ok(svc.cli("shutdown")).stdout.startswith("shutting down")
    assert svc.proc.wait(timeout=30) == 0
    assert not svc.socket.exists()
    assert all(pid_gone(pid) for pid in pids)
    gone = svc.cli("status")
    assert gone.returncode == 2


def test_no_service_is_exit_2_with_one_line(tmp_path: Path) -> None:
    socket = tmp_path / "nothing.sock"
    for args, env in [
        (("status", "-s", str(socket)), {}),
        (("restart", "web", "-s", str(socket)), {}),
        (("status",), {"SUPERVISOR_SOCKET": str(socket)}),
    ]:
        result = run(*args, env=env)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr == f"supervisor: no service answers at {socket} (is 'supervisor run' running?)\n"
    write_manifest(tmp_path, MANIFEST)
    from_manifest = run("logs", "web-0", cwd=tmp_path)
    assert from_manifest.returncode == 2
    assert from_manifest.stderr.splitlines() == [
        f"supervisor: no service answers at {tmp_path / '.supervisor' / 'control.sock'} "
        "(is 'supervisor run' running?)"
    ]
    no_manifest = run("status", cwd=tmp_path.parent)
    assert no_manifest.returncode == 2 and "no manifest at supervisor.yaml" in no_manifest.stderr


def test_the_socket_is_found_as_the_manifest_says(service: Start, tmp_path: Path) -> None:
    os.environ.pop("SUPERVISOR_SOCKET", None)
    app = tmp_path / "app"
    app.mkdir()
    manifest = write_manifest(
        app,
        """
        version: 1
        supervisor:
          state_dir: ${APP_STATE:-state}
          control: {socket: "${APP_STATE:-state}/ctl/api.sock"}
        instances:
          one: {command: ["sleep", "300"]}
        """,
        name="app.yaml",
    )
    svc = service(manifest, socket=app / "state" / "ctl" / "api.sock")
    # -f from elsewhere: relative paths are relative to the manifest's folder.
    assert json.loads(ok(run("status", "--json", "-f", str(manifest))).stdout)[0]["name"] == "one"
    relative = ok(run("status", "--json", "-f", "app/app.yaml", cwd=tmp_path))
    assert json.loads(relative.stdout)[0]["name"] == "one"
    # -s wins over SUPERVISOR_SOCKET, which wins over the manifest.
    elsewhere = str(tmp_path / "elsewhere.sock")
    env = {"SUPERVISOR_SOCKET": elsewhere}
    assert run("status", "-f", str(manifest), env=env).returncode == 2
    assert ok(run("status", "-s", str(svc.socket), env=env)).stdout.startswith("NAME")


def test_the_cli_path_does_not_import_the_server_side(tmp_path: Path) -> None:
    """`supervisor status` must start fast: no pydantic, starlette, h11 or anyio on its way."""
    write_manifest(tmp_path, MANIFEST)
    result = subprocess.run(
        [SUPERVISOR[0], "-X", "importtime", *SUPERVISOR[1:], "status"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    server_side = {"pydantic", "fastapi", "starlette", "hypercorn", "h11", "anyio", "httpx"}
    heavy = {name for name in imported if name.split(".")[0] in server_side}
    assert not heavy, sorted(heavy)
    assert "supervisor.api.client" in imported and "supervisor.config" not in imported


COMMANDS = ["status", "start", "stop", "restart", "signal", "logs", "reload", "wait", "shutdown"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_control_command_takes_socket_and_file(command: str) -> None:
    usage = ok(run(command, "--help")).stdout
    assert "--socket" in usage and "--file" in usage


def test_the_socket_lookup_survives_a_hostile_manifest(tmp_path: Path) -> None:
    """`-f FILE` reads two keys of FILE to find the socket: a bomb or a deep nest is not read whole."""
    laughs = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("version: 1\n" + "\n".join(laughs) + "\nsupervisor: {control: {socket: nowhere.sock}}\n")
    done = run("status", "-f", str(bomb))
    assert done.returncode == 2 and "no service answers at" in done.stderr and "nowhere.sock" in done.stderr
    deep = tmp_path / "deep.yaml"
    deep.write_text("version: 1\nsupervisor: " + "[" * 100_000 + "]" * 100_000 + "\n")
    done = run("status", "-f", str(deep))
    assert done.returncode != 0 and "nested deeper than 64 levels" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# -- the parser: only the command named is built --------------------------------------------

SAMPLES = {
    "run": ["run", "-f", "x.yaml", "--pidfile", "p"],
    "validate": ["validate", "-f", "x.yaml"],
    "graph": ["graph", "--dot"],
    "schema": ["schema"],
    "status": ["status", "--json", "a", "b"],
    "start": ["start", "a", "--no-wait", "--timeout", "5s"],
    "stop": ["stop", "--all"],
    "restart": ["restart", "a"],
    "signal": ["signal", "HUP", "a"],
    "logs": ["logs", "-n", "5", "-f", "a"],
    "reload": ["reload", "--json"],
    "scale": ["scale", "w=3"],
    "wait": ["wait", "a", "--state", "running,ready"],
    "shutdown": ["shutdown"],
    "reexec": ["reexec", "--check"],
    "dashboard": ["dashboard", "--port", "0"],
    "import": ["import", "Procfile", "--format", "procfile"],
    "export": ["export", "systemd", "-o", "out"],
    "completion": ["completion", "bash"],
    "_names": ["_names"],
}


def _parsed(parser: object, words: list[str]) -> dict[str, object]:
    found = vars(parser.parse_args(words))  # type: ignore[attr-defined]
    func = found.pop("func")
    assert callable(func)
    return found


def test_the_command_list_is_the_full_parsers() -> None:
    from supervisor.cli import COMMANDS, build_parser

    parser = build_parser()
    assert list(parser._subparsers._group_actions[0].choices) == list(COMMANDS)  # type: ignore[union-attr]
    assert sorted(SAMPLES) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(SAMPLES))
def test_a_command_alone_parses_as_with_every_command_built(command: str) -> None:
    """``main`` builds the named command's parser alone (all twenty took ~10 ms of `status`)."""
    from supervisor.cli import build_parser

    alone = build_parser(command)
    assert list(alone._subparsers._group_actions[0].choices) == [command]  # type: ignore[union-attr]
    assert _parsed(alone, SAMPLES[command]) == _parsed(build_parser(), SAMPLES[command])


def test_help_and_a_mistyped_command_still_list_every_command() -> None:
    for words in (["--help"], ["stauts"]):
        done = subprocess.run([*SUPERVISOR, *words], capture_output=True, text=True, timeout=30)
        out = done.stdout + done.stderr
        assert all(name in out for name in ("run", "status", "reexec", "export", "completion")), out
    done = subprocess.run([*SUPERVISOR, "status", "--bogus"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr, done.stderr


def test_a_control_command_parses_without_shutil_and_help_still_fits_the_terminal(tmp_path: Path) -> None:
    """argparse's formatter imports shutil (and lzma, bz2) for the width at every add_argument:
    ours finds the width itself, as shutil does ($COLUMNS, then the terminal, then 80)."""
    probe = (
        "import json, sys; from supervisor.cli import build_parser\n"
        "build_parser('status').parse_args(['status', '--json'])\n"
        "print(json.dumps([m for m in ('shutil', 'lzma', 'bz2') if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=30
    )
    assert done.returncode == 0 and json.loads(done.stdout) == [], done.stdout + done.stderr
    for columns, widest in (("50", 50), ("", 80), ("nonsense", 80), ("-3", 80)):
        env = {**os.environ, "COLUMNS": columns}
        shown = subprocess.run(
            [*SUPERVISOR, "logs", "--help"], capture_output=True, text=True, env=env, timeout=30
        )
        lines = shown.stdout.splitlines()
        assert shown.returncode == 0 and len(lines) > 10, shown.stderr
        assert max(len(line) for line in lines) <= widest, (columns, shown.stdout)
        if columns == "50":
            assert max(len(line) for line in lines) > 40  # wrapped to it, not to some narrow default
