"""A real ``supervisor run`` in a subprocess, for the control plane's tests.

No mocks: the service is started as a user would start it, and spoken to
over its real socket. Waiting is always bounded, and never a sleep: the
service is polled with a blocking ``proc.wait(timeout=...)`` between tries
(which also notices a service that died), and states are awaited server-side
(``POST /v1/instances/wait``) or on the event stream.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.api.client import Client, ClientError

SUPERVISOR = [sys.executable, "-m", "supervisor"]


def wait_until(done: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Until ``done()``; between looks, a bounded wait on ``proc`` (which must not exit meanwhile)."""
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        try:
            code = proc.wait(timeout=min(0.05, left))
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"the service exited with {code} before {what}")


def write_manifest(folder: Path, text: str, name: str = "supervisor.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


class ServiceProcess:
    """``supervisor run -f MANIFEST`` as a child of the test; stopped with SIGTERM at the end."""

    def __init__(
        self,
        manifest: Path,
        *,
        args: tuple[str, ...] = (),
        socket: Path | None = None,
        env: dict[str, str] | None = None,
        default_signals: tuple[int, ...] = (),
    ) -> None:
        """``default_signals``: set to their default action in the service (a test run under
        ``nohup`` or by a CI runner may ignore SIGHUP, and the service leaves an ignored signal
        ignored)."""
        self.manifest = manifest
        self.socket = socket or manifest.parent / ".supervisor" / "control.sock"
        self.output = manifest.parent / "service.log"
        #: What the fixture's teardown expects ``stop()`` to return; None: the test checked.
        self.expected_exit: int | None = 0
        self._output_file = self.output.open("ab")
        self.proc = subprocess.Popen(
            [*SUPERVISOR, "run", "-f", str(manifest), *args],
            stdin=subprocess.DEVNULL,
            stdout=self._output_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=(lambda: [signal.signal(sig, signal.SIG_DFL) for sig in default_signals])
            if default_signals
            else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def client(self, timeout: float | None = 30) -> Client:
        return Client(self.socket, timeout=timeout)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until ``/v1/health`` answers; fails at once if the service exits."""
        self.wait_until(lambda: answers(self.client(timeout=5)), timeout, "an answer on the socket")

    def wait_log(self, text: str, timeout: float = 20) -> None:
        """Until the service's own log shows ``text``; waits on the process between looks."""
        self.wait_until(lambda: text in self.log(), timeout, f"{text!r} in the service's log")

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            wait_until(done, self.proc, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.log()}") from None

    def cli(self, *args: str, timeout: float = 60, socket: bool = True) -> subprocess.CompletedProcess[str]:
        """``supervisor ARGS -s SOCKET``; the completed process, output as text."""
        where = ["-s", str(self.socket)] if socket else []
        return subprocess.run(
            [*SUPERVISOR, *args, *where], capture_output=True, text=True, timeout=timeout, check=False
        )

    def wait_for(self, names: list[str], state: str, timeout: float = 20) -> dict[str, Any]:
        answer = self.client().wait(names, state, timeout=timeout)
        assert answer["ok"], f"{answer}\n{self.log()}"
        return answer

    def wait_output(self, name: str, needle: bytes, *, stream: str = "stdout", timeout: float = 20) -> None:
        """Until the instance's captured ``stream`` shows ``needle`` (bounded by the socket timeout)."""
        with self.client(timeout=timeout).follow(name, stream=stream, lines=1000) as chunks:
            for chunk in chunks:  # the tail first, then what comes
                if needle in chunk:
                    return
        raise AssertionError(f"{name}'s {stream} ended without {needle!r}")

    def status(self, *names: str) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.client().status(list(names))}

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit; SIGKILL (and a failure) if it does not come."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    return self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    message = f"the service ignored SIGTERM for {timeout}s:\n{self.log()}"
                    raise AssertionError(message) from None
            return self.proc.returncode
        finally:
            self._output_file.close()


def health_times(client: Client, seconds: float) -> list[float]:
    """How long each health check took, asked one after another for ``seconds``: a window
    longer than whatever might hold the service, which a few answers in a row would miss."""
    took: list[float] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        began = time.monotonic()
        client.health()
        took.append(time.monotonic() - began)
    return took


def answers(client: Client) -> bool:
    """The service answers and is done starting (its socket answers from the start, before the
    spawns: a test that reads pids right after ``wait_ready`` must not race them)."""
    try:
        return not client.health().get("starting", False)
    except ClientError:
        return False


def pid_gone(pid: int) -> bool:
    """True once ``pid`` is no more (or only a zombie about to be reaped by someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone between the look and the read
        return True


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (any of its threads), from /proc."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            found += [int(p) for p in children.read().split()]
    return found


def processes_with(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (an argument unique to one test)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv and not pid_gone(int(entry.name)):
            found.append(int(entry.name))
    return found


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick; bound again by the test's service)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_tcp_listener(folder: Path, token: str, instances: str) -> tuple[str, int]:
    """A manifest whose control API also listens on a loopback port, its token in a 0600 file.

    ``instances`` is the YAML of the instances mapping, as it would be indented under it.
    """
    token_file = folder / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_port()
    body = textwrap.indent(textwrap.dedent(instances).strip("\n"), "  ")
    text = (
        "version: 1\n"
        f'supervisor:\n  control: {{tcp: "127.0.0.1:{port}", token_file: token}}\n'
        f"instances:\n{body}\n"
    )
    return text, port
