"""Stuck log readers against a real ``supervisor run``: they miss data, they never pin the service's memory.

A reader of ``logs -f`` that stops reading (a paused ``| less``) is a real HTTP client
on the real control socket that reads the answer's headers and then nothing more.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

from .service_fixture import ServiceProcess, health_times

MEGABYTES = 200

CHATTY = f"""
    version: 1
    supervisor:
      logs: {{max_bytes: 4MB, backups: 1}}
    instances:
      chatty:
        # {MEGABYTES} MB of 100-byte lines as fast as the pipe takes them, then done.
        command:
          - python3
          - -c
          - |
            import os
            block = (b"x" * 99 + b"\\n") * 10_000
            for _ in range({MEGABYTES}):
                view = memoryview(block)
                while view:
                    view = view[os.write(1, view):]
        autostart: false
        restart: {{policy: "no"}}
"""


def peak_rss_kib(pid: int) -> int:
    """The process's resident high-water mark (VmHWM): a peak between two looks is not missed."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def stuck_reader(path: Path, name: str) -> socket.socket:
    """``logs NAME -f`` that reads the answer's headers, then never reads again."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(str(path))
    sock.sendall(f"GET /v1/instances/{name}/logs?follow=true&lines=0 HTTP/1.1\r\nHost: sv\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: not one byte of the body is taken
        byte = sock.recv(1)
        assert byte, f"the service closed the stream: {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock  # the headers mean the service follows the stream now


def read_until_marker(sock: socket.socket, owed: int) -> tuple[int, int]:
    """Read what the stuck reader was owed; (bytes read, bytes it was told it missed).

    Until the markers' counts and what came through add up to ``owed`` (less what the
    kernel's buffers held): a gap is told once the follower has sent all it had before it,
    and while the socket's buffers still took data early in the flood, that came once or
    twice before the reader stopped reading for good (one marker per gap, not one in all).
    """
    seen = b""
    marker = re.compile(rb"\[supervisor\] follower too slow: (\d+) bytes dropped\n")
    missed = 0
    while missed + len(seen) < owed - 16 * 1024 * 1024:
        chunk = sock.recv(1024 * 1024)  # bounded by the socket's timeout
        assert chunk, f"the stream ended after {len(seen)} bytes and {missed} missed"
        seen += chunk
        missed = sum(int(m[1]) for m in marker.finditer(seen))
    return len(seen), missed


def test_stuck_followers_do_not_hold_the_service_s_memory(
    service: Callable[..., ServiceProcess],
) -> None:
    svc = service(CHATTY)
    readers = [stuck_reader(svc.socket, "chatty") for _ in range(6)]
    try:
        before = peak_rss_kib(svc.pid)
        svc.client().start(["chatty"])
        svc.wait_for(["chatty"], "exited", timeout=300)
        grown_mib = (peak_rss_kib(svc.pid) - before) / 1024
        # Each reader may hold 1 MiB queued plus what is on its way to the socket: six of
        # them, a few MiB each. Unbounded queues held the whole flood (MEGABYTES).
        assert grown_mib < 48, f"the service grew by {grown_mib:.0f} MiB with {len(readers)} stuck readers"
        total = MEGABYTES * 1_000_000
        for sock in readers:
            read, missed = read_until_marker(sock, total)
            # Told how much it missed: nearly everything, since it read nothing.
            assert total - 16 * 1024 * 1024 < missed <= total, (read, missed)
        assert svc.status("chatty")["chatty"]["state"] == "exited"
    finally:
        for sock in readers:
            sock.close()


def test_an_instance_never_started_holds_no_log_file(service: Callable[..., ServiceProcess]) -> None:
    """The log files are opened by the spawn (or a first write after a re-exec), not when the
    instance is made: one never started costs no descriptor and leaves no empty file."""
    svc = service(
        """
        version: 1
        instances:
          idle: {command: [sh, -c, "echo hello; exec sleep 300"], autostart: false}
          busy: {command: [sleep, "300"], restart: {min_uptime: 0}}
        """
    )
    svc.wait_for(["busy"], "running")
    logs = svc.socket.parent / "logs"

    def open_logs() -> set[str]:
        names = set()
        for fd in os.listdir(f"/proc/{svc.pid}/fd"):
            try:
                link = os.readlink(f"/proc/{svc.pid}/fd/{fd}")
            except FileNotFoundError:  # closed since the listing (a spawn's pipe end, a request's socket)
                continue
            if link.endswith(".log"):
                names.add(Path(link).name)
        return names

    assert "idle.out.log" not in open_logs() and not (logs / "idle.out.log").exists()
    assert "busy.out.log" in open_logs()  # opened by its spawn
    svc.client().start(["idle"])
    svc.wait_output("idle", b"hello\n")
    assert "idle.out.log" in open_logs()


BACKUPS = 1000

TINY_FILES = f"""
    version: 1
    instances:
      flood:
        # 300 lines in one write: with max_bytes 16, each line or two is a rotation.
        command: [python3, -c, 'import os; os.write(1, b"".join(b"line %d\\n" % i for i in range(300)))']
        restart: {{policy: "no"}}
        logs: {{max_bytes: 16, backups: {BACKUPS}}}
"""


def test_a_flood_into_tiny_files_with_a_thousand_backups_leaves_the_service_answering(
    service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """Each rotation renames every backup, in the event loop: with a thousand there (15 ms a
    rotation) and files of 16 bytes, 300 lines held the service for seconds (with files of one
    byte, 3,000 lines held it for seven minutes: no status, no SIGTERM). Rotations now have a
    twentieth of the loop's time; beyond it a file grows past max_bytes until the next is due.
    No line is lost either way."""
    logs = tmp_path / ".supervisor" / "logs"
    logs.mkdir(parents=True)
    for index in range(1, BACKUPS + 1):
        (logs / f"flood.out.log.{index}").write_bytes(b"from before\n")
    svc = service(TINY_FILES)
    newest = logs / "flood.out.log.1"
    svc.wait_until(lambda: newest.read_bytes() != b"from before\n", 20, "the first rotation")
    client = svc.client(timeout=10)
    # Two seconds of answers from the first rotation on: a hold (the whole write's rotations in
    # one go, a few seconds) would be under way by then, and the first answer would wait it out.
    took = health_times(client, 2)
    assert max(took) < 1.0, sorted(took)[-3:]
    svc.wait_for(["flood"], "exited", timeout=60)
    assert svc.stop() == 0
    files = [logs / f"flood.out.log.{index}" for index in range(BACKUPS, 0, -1)] + [logs / "flood.out.log"]
    lines = b"".join(path.read_bytes() for path in files if path.exists()).splitlines()
    assert [line for line in lines if line.startswith(b"line")] == [b"line %d" % i for i in range(300)]
