"""A full disk under an instance's log: the loss is in its status and in the events, not only the log."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

PROGRAM = """
import json, resource, signal, sys
from pathlib import Path
import anyio
from supervisor.config import parse_manifest
from supervisor.events import Update
from supervisor.manager import Manager

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not death
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
folder = Path(sys.argv[1])
text = (
    "version: 1\\n"
    "instances:\\n"
    "  chatty:\\n"
    "    command: [sh, -c, 'yes 0123456789012345678901234567890123456789 | head -c 205000; exec sleep 60']\\n"
    "    logs: {max_bytes: 1GB}\\n"
    "    autostart: false\\n"
)
manifest = parse_manifest(text, folder / "supervisor.yaml")

async def main():
    manager = Manager(manifest)
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        chatty = manager.instances["chatty"]
        with anyio.fail_after(20):
            async with manager.events.subscribe() as events, chatty.sinks["stdout"].follow() as lines:
                await chatty.start()
                seen = 0
                while seen < 205_000:  # followers get every byte, whatever the file could take
                    seen += len(await anext(lines))
                async for event in events:
                    if isinstance(event, Update) and event.kind == "logs":
                        break
        status = chatty.status()
        print(json.dumps({"ok": event.ok, "message": event.message,
                          "lost": status.log_bytes_lost, "error": status.log_error}))
        await manager.shutdown()

anyio.run(main)
"""


def test_a_full_disk_shows_in_status_and_events(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROGRAM), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["ok"] is False and "chatty.out.log" in found["message"]
    assert found["lost"] == 205_000 - 50_000
    assert found["error"] == found["message"]
