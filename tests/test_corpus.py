"""Hostile and malformed manifests (tests/corpus/): each is refused with its first problem placed.

Every file goes through the CLI's entry point, ``supervisor validate -f FILE``, in a process
of its own bounded in address space, CPU time and wall time: no traceback, no hang, exit
status 1, and the first problem at the line and column ``expected.yaml`` gives, with its
phrase. The processes are forks of one that imported the loader once (validate_forks.py:
122 interpreter start-ups took 20 s of the suite); a sample, a bomb among them, also goes
through the real ``python -m supervisor validate``, which must answer byte for byte as its
fork did. A sample goes through ``reload`` of a live service: each is a 422 with the same
placed problems, and the running instance keeps its process.
"""

from __future__ import annotations

import json
import locale
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.api.client import APIError

from .service_fixture import SUPERVISOR, ServiceProcess

CORPUS = Path(__file__).parent / "corpus"
EXPECTED: dict[str, dict[str, Any]] = yaml.safe_load((CORPUS / "expected.yaml").read_text())
FILES = sorted(p for p in CORPUS.glob("*.yaml") if p.name != "expected.yaml")
FORKS = Path(__file__).parent / "validate_forks.py"

MEMORY_LIMIT = 1024**3  # address space: a billion-laughs file once took 3 GB
CPU_SECONDS = 30
WALL_SECONDS = 60


def _bounded() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SUPERVISOR, "validate", "-f", path.name],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=WALL_SECONDS,
        preexec_fn=_bounded,
        check=False,
    )


def _text(data: bytes) -> str:
    """Output bytes as ``subprocess.run(text=True)`` gives them: the locale's encoding, and
    universal newlines."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


def validate_in_forks(paths: list[Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Each file's ``supervisor validate`` in a fork of one bounded worker (validate_forks.py).

    A worker that ends before it answered for every file (it should not: a bomb kills its
    fork, not the worker) has that file reported with the worker's end, and a new worker
    goes on with the files after it.
    """
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    left = [path.name for path in paths]
    while left:
        worker = subprocess.run(
            [sys.executable, str(FORKS), str(WALL_SECONDS), *left],
            cwd=CORPUS,
            capture_output=True,
            timeout=WALL_SECONDS * (len(left) + 1),  # each fork is killed after WALL_SECONDS
            preexec_fn=_bounded,  # inherited by the forks, whose CPU time starts at zero
            check=False,
        )
        for line in worker.stdout.splitlines():
            answer = json.loads(line)
            name = answer["name"]
            returncode, stderr = answer["returncode"], _text(answer["stderr"].encode("latin-1"))
            if returncode is None:
                returncode, stderr = -signal.SIGKILL, f"{stderr}\n(killed after {WALL_SECONDS}s of wall time)"
            stdout = _text(answer["stdout"].encode("latin-1"))
            args = [*SUPERVISOR, "validate", "-f", name]
            results[Path(name).stem] = subprocess.CompletedProcess(args, returncode, stdout, stderr)
            left.remove(name)
        if left:  # the worker itself ended while on left[0]
            name = left.pop(0)
            died = f"the worker ended with {worker.returncode} before it answered for this file:\n"
            args = [*SUPERVISOR, "validate", "-f", name]
            results[Path(name).stem] = subprocess.CompletedProcess(
                args, worker.returncode, "", died + _text(worker.stderr)
            )
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every file validated once, in two workers (the machine has two cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        halves = pool.map(validate_in_forks, [FILES[0::2], FILES[1::2]])
        return {name: result for half in halves for name, result in half.items()}


def test_the_corpus_and_its_expectations_match() -> None:
    assert len(FILES) >= 80
    assert sorted(EXPECTED) == sorted(p.stem for p in FILES)


#: Through the real ``python -m supervisor validate`` too: a bomb (a billion laughs: with the
#: nested aliases the most memory and time), a nesting past the limit (a fork runs on its
#: parent's stack), a file that is not UTF-8 (refused as it is decoded) and one refused by
#: the models' validation (pydantic's path, the slowest import).
REAL_CLI_SAMPLE = ["billion-laughs", "deep-flow", "latin1", "nan-backoff-initial"]


@pytest.mark.parametrize("name", REAL_CLI_SAMPLE)
def test_the_real_cli_answers_as_its_fork_did(
    name: str, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """The forks stand for ``python -m supervisor validate``: each of the sample answers the
    same status, stdout and stderr in a subprocess of its own, the test's bounds on it."""
    real = validate(CORPUS / f"{name}.yaml")
    forked = results[name]
    assert (real.returncode, real.stdout, real.stderr) == (forked.returncode, forked.stdout, forked.stderr)


@pytest.mark.parametrize("name", [p.stem for p in FILES])
def test_validate_refuses_with_the_first_problem_placed(
    name: str, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = results[name]
    expected = EXPECTED[name]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert lines[0].endswith("in the manifest:"), result.stderr
    first = lines[1].strip()
    where = f"{name}.yaml:{expected['line']}:{expected['column']}: "
    assert first.startswith(where), f"expected {where!r}, got {first!r}"
    assert expected["phrase"] in first, f"expected {expected['phrase']!r} in {first!r}"


RELOAD_SAMPLE = [
    "billion-laughs",
    "alias-bomb-7",
    "deep-flow",
    "utf16-bom",
    "latin1",
    "raw-nul",
    "tag-python",
    "merge-scalar",
    "nan-backoff-initial",
    "replicas-quoted",
    "depends-chain-cycle",
    "name-too-long",
]

RUNNING = """\
version: 1
instances:
  keep:
    command: ["sleep", "300"]
    restart: {min_uptime: 0}
"""


def test_reload_answers_422_with_the_placed_problems_and_keeps_what_runs(
    service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    svc = service(RUNNING)
    svc.wait_for(["keep"], "running")
    pid = svc.status()["keep"]["pid"]
    client = svc.client()
    for name in RELOAD_SAMPLE:
        shutil.copyfile(CORPUS / f"{name}.yaml", svc.manifest)
        with pytest.raises(APIError) as refused:
            client.reload()
        error = refused.value
        assert error.status == 422, (name, error.status, error.error)
        assert "nothing was changed" in error.error
        expected = EXPECTED[name]
        first = str(error.details[0])
        assert first.startswith(f"{svc.manifest}:{expected['line']}:{expected['column']}: "), (name, first)
        assert expected["phrase"] in first, (name, first)
        assert svc.status()["keep"]["pid"] == pid, name
    # Still the same service, and still willing: a good manifest applies.
    svc.manifest.write_text(RUNNING.replace('"300"]', '"300"]\n    autostart: true'))
    assert client.reload()["unchanged"] == ["keep"]
    assert svc.status()["keep"]["pid"] == pid


def test_a_reload_of_a_fifo_or_a_bomb_changes_nothing(service: Callable[..., ServiceProcess]) -> None:
    """Neither a manifest swapped for a fifo nor a billion laughs holds or changes the service.

    The fifo is refused before it is read (a reload used to wait on it for a writer; that the
    event loop serves while a reload's check runs is tests/test_records.py's
    ``test_a_reload_checks_in_a_child_beside_the_loop``); the bomb is refused by its check.
    Each is a 422 that changed nothing, and the service answers after each.
    """
    svc = service(RUNNING)
    svc.wait_for(["keep"], "running")
    pid = svc.status()["keep"]["pid"]
    svc.manifest.unlink()
    os.mkfifo(svc.manifest)  # no one will ever write it
    with pytest.raises(APIError) as refused:
        svc.client(timeout=20).reload()  # the check's own limit is 120 s
    assert refused.value.status == 422 and "not a regular file" in str(refused.value.details[0])
    assert svc.client(timeout=5).health()["ok"] and svc.status()["keep"]["pid"] == pid
    svc.manifest.unlink()
    shutil.copyfile(CORPUS / "billion-laughs.yaml", svc.manifest)
    with pytest.raises(APIError) as refused:
        svc.client(timeout=60).reload()
    assert refused.value.status == 422 and "more than 200,000 values" in str(refused.value.details[0])
    assert svc.status()["keep"]["pid"] == pid
