"""Shell completion: the scripts run in the real shells, and complete names from a live service."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .service_fixture import ServiceProcess
from .test_cli import ok, run

Start = Callable[..., ServiceProcess]
PROGRAM = str(Path(sys.executable).parent / "supervisor")  # the console script, as a user types it

MANIFEST = """
version: 1
instances:
  web:
    command: ["sleep", "300"]
    replicas: 2
  worker:
    command: ["sleep", "300"]
"""


def _script(shell: str, tmp_path: Path) -> Path:
    path = tmp_path / f"supervisor.{shell}"
    path.write_text(ok(run("completion", shell)).stdout)
    return path


def _bash_complete(script: Path, *words: str, env: dict[str, str] | None = None) -> list[str]:
    """COMPREPLY for the command line ``words`` (the last one being completed), from real bash."""
    quoted = " ".join(f"'{w}'" for w in (PROGRAM, *words))
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({quoted}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n"
        "_supervisor\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return sorted(line for line in result.stdout.splitlines() if line)


def test_bash_completes_commands_flags_and_live_instance_names(service: Start, tmp_path: Path) -> None:
    svc = service(MANIFEST)
    script = _script("bash", tmp_path)
    socket = {"SUPERVISOR_SOCKET": str(svc.socket)}
    assert _bash_complete(script, "re") == ["reexec", "reload", "restart"]
    assert "_names" not in _bash_complete(script, "")
    assert _bash_complete(script, "restart", "", env=socket) == ["web-0", "web-1", "worker"]
    assert _bash_complete(script, "restart", "") == []  # no manifest here, no socket: no names
    assert _bash_complete(script, "restart", "w", env=socket) == ["web-0", "web-1", "worker"]
    assert _bash_complete(script, "logs", "-n", "5", "web-", env=socket) == ["web-0", "web-1"]
    assert _bash_complete(script, "stop", "-s", str(svc.socket), "wo") == ["worker"]
    assert _bash_complete(script, "restart", "--a") == ["--all"]
    assert _bash_complete(script, "wait", "--state", "run") == ["running"]
    assert _bash_complete(script, "signal", "US") == ["USR1", "USR2"]
    assert _bash_complete(script, "signal", "HUP", "web-1", env=socket) == ["web-1"]
    assert _bash_complete(script, "completion", "") == ["bash", "fish", "zsh"]
    # Another socket on the line: that service's names, here none (nothing answers there).
    assert _bash_complete(script, "status", "-s", str(tmp_path / "none.sock"), "", env=socket) == []


def test_names_prints_nothing_when_no_service_answers(tmp_path: Path) -> None:
    for args in (("-s", str(tmp_path / "none.sock")), ("-f", str(tmp_path / "missing.yaml"))):
        result = run("_names", *args)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    stale = tmp_path / "stale.sock"
    stale.write_bytes(b"")  # a plain file where a socket should be
    assert run("_names", "-s", str(stale)).stdout == ""
    # A socket that takes the connection and never answers: given up on within the 2s bound.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen()
    try:
        started = time.monotonic()
        quiet = run("_names", "-s", str(tmp_path / "silent.sock"))
        assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
        assert time.monotonic() - started < 15
    finally:
        silent.close()
    usage = ok(run("--help")).stdout
    assert "completion" in usage and "_names" not in usage


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (apt-get install zsh)")
def test_zsh_script_parses_and_completes_names(service: Start, tmp_path: Path) -> None:
    svc = service(MANIFEST)
    script = _script("zsh", tmp_path)
    assert subprocess.run(["zsh", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    # The completion widgets need a live line editor; compadd and friends print what they are given.
    program = f"""
        compadd() {{ [[ $1 == -- ]] && shift; print -l -- "$@" }}
        compdef() {{ }}
        _files() {{ print FILES }}
        _describe() {{ print -l -- ${{(P)4}} }}
        source {script}
        words=({PROGRAM} restart w); CURRENT=3; PREFIX=w; _supervisor; print -r -- ---
        words=({PROGRAM} run --pidfile ''); CURRENT=4; PREFIX=''; _supervisor; print -r -- ---
        words=({PROGRAM} wait --state ''); CURRENT=4; PREFIX=''; _supervisor; print -r -- ---
        words=({PROGRAM} re); CURRENT=2; PREFIX=re; _supervisor
    """
    result = subprocess.run(
        ["zsh", "-f", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SUPERVISOR_SOCKET": str(svc.socket)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    names, files, states, commands = result.stdout.split("---\n")
    assert names.split() == ["web-0", "web-1", "worker"]
    assert files.split() == ["FILES"]
    assert "running" in states.split() and "exited" in states.split()
    described = commands.splitlines()
    assert "restart:restart instances; waits until they run again" in described
    assert "_names" not in commands and any(line.startswith("completion:") for line in described)


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed (apt-get install fish)")
def test_fish_script_parses_and_completes_names(service: Start, tmp_path: Path) -> None:
    svc = service(MANIFEST)
    script = _script("fish", tmp_path)
    assert subprocess.run(["fish", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    program = f"source {script}; complete -C 'supervisor restart '; echo ---; complete -C 'supervisor re'"
    result = subprocess.run(
        ["fish", "--no-config", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            **os.environ,
            "SUPERVISOR_SOCKET": str(svc.socket),
            "PATH": f"{Path(PROGRAM).parent}:{os.environ['PATH']}",
        },
        check=False,
    )
    assert result.returncode == 0, result.stderr
    names, commands = result.stdout.split("---\n")
    assert sorted(line.split("\t")[0] for line in names.splitlines()) == ["web-0", "web-1", "worker"]
    assert [line.split("\t")[0] for line in commands.splitlines()] == ["reexec", "reload", "restart"]
