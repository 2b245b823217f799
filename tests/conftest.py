"""Shared fixtures: every async test runs under both anyio backends; ``service`` runs the real thing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .service_fixture import ServiceProcess, write_manifest


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
