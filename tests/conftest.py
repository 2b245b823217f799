"""Shared fixtures: every async test runs under both anyio backends; ``service`` runs the real thing."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .service_fixture import ServiceProcess, write_manifest

# Tests stop the CLI's followers (`logs -f`, `dashboard`) with SIGINT, as a person at a terminal
# does. A suite started in the background (`make test &` in a script) begins with SIGINT ignored,
# and an ignored signal stays ignored across exec: every child would ignore it too. A handler
# instead is reset to the default at exec, so the children get SIGINT as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``supervisor run`` on a manifest (text, written to tmp_path) and wait until it answers.

    Every service started is stopped with SIGTERM at the end of the test; its exit status
    must then be ``expected_exit`` (0 unless the test says otherwise) and its socket gone.
    """
    started: list[ServiceProcess] = []

    def start(manifest: str | Path, *, ready: bool = True, **options: Any) -> ServiceProcess:
        path = manifest if isinstance(manifest, Path) else write_manifest(tmp_path, manifest)
        process = ServiceProcess(path, **options)
        started.append(process)
        if ready:
            process.wait_ready()
        return process

    yield start
    failures = []
    for process in started:
        code = process.stop()
        if process.expected_exit is not None and code != process.expected_exit:
            failures.append(f"the service exited with {code}, not {process.expected_exit}:\n{process.log()}")
        elif process.expected_exit == 0 and process.socket.exists():
            failures.append(f"the service left its socket {process.socket} behind")
    assert not failures, "\n".join(failures)
