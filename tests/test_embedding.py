"""The embedding API as docs/embedding.md shows it: its example runs under asyncio and trio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "embed.py"

EXPECTED = """\
greeter is running
greeter got USR1
restarted with a new pid: True
job exited with code 0
greeter is stopped
status: greeter=stopped, job=exited
job went stopped->starting starting->exited
done under {backend}
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_example_runs_under_both_backends(backend: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), backend],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED.format(backend=backend)
    assert list(tmp_path.iterdir()) == []  # its state lived in a temporary folder, now gone


def test_the_package_re_exports_lazily() -> None:
    program = (
        "import sys, supervisor\n"
        "heavy = sorted(m for m in ('anyio', 'pydantic', 'supervisor.manager') if m in sys.modules)\n"
        "print('before:', heavy)\n"
        "from supervisor import Manager, State, load_manifest\n"
        "import supervisor.manager, supervisor.config\n"
        "assert Manager is supervisor.manager.Manager and load_manifest is supervisor.config.load_manifest\n"
        "assert all(getattr(supervisor, name) for name in supervisor.__all__)\n"
        "print('after:', State.RUNNING)\n"
        "try:\n"
        "    supervisor.nothing\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "before: []",
        "after: running",
        "module 'supervisor' has no attribute 'nothing'",
    ]
