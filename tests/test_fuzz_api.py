"""The control API fuzzed from its own OpenAPI document, against a real service.

schemathesis generates requests from ``/openapi.json`` (valid ones, and some
made invalid on purpose) and checks each answer: never a 5xx, every status
code, content type, header and body as the document says. It speaks to a real
``supervisor run`` over the TCP listener with its token (the unix socket
serves the same app).

What the fuzz leaves out, and why: ``/v1/shutdown`` and ``/v1/reexec`` (they would end or replace the service
under test), ``/v1/events`` and ``logs?follow=true`` (streams that end only
when the client leaves; tests/test_api.py covers them), and timeouts longer
than half a second, or left to their defaults (a valid ``wait`` may take up to a week; the limits are
tested in tests/test_api_limits.py). The cut is made on a copy of the document,
never in the service's own.
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from supervisor.config.units import parse_duration

from .service_fixture import ServiceProcess, with_tcp_listener

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

Start = Callable[..., ServiceProcess]

#: Examples per operation and mode (valid, invalid): about 30 s on a busy 2-core machine.
EXAMPLES = 40
CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)
LEFT_OUT = {("/v1/shutdown", "post"), ("/v1/reexec", "post"), ("/v1/events", "get")}


def _fuzzable(document: dict[str, Any]) -> dict[str, Any]:
    """The document without what the fuzz must not call, and with short timeouts."""
    document = copy.deepcopy(document)
    for path, method in LEFT_OUT:
        del document["paths"][path][method]
    logs = document["paths"]["/v1/instances/{name}/logs"]["get"]
    # Left out, not pinned to false: the invalid-input phase would send "true" all the same.
    logs["parameters"] = [p for p in logs["parameters"] if p["name"] != "follow"]
    for schema in document["components"]["schemas"].values():
        timeout = schema.get("properties", {}).get("timeout")
        if timeout is not None:
            schema["properties"]["timeout"] = {"type": "number", "minimum": 0, "maximum": 0.5}
            schema.setdefault("required", []).append("timeout")
    return document


def _waiting_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(path, method) of each operation whose body has a ``timeout``: it waits for an outcome."""
    schemas = document["components"]["schemas"]
    found = set()
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            name = body.get("schema", {}).get("$ref", "").rpartition("/")[2]
            if "timeout" in schemas.get(name, {}).get("properties", {}):
                found.add((path, method))
    return found


def _waits_long(case: Any, waiting: set[tuple[str, str]]) -> bool:
    """Whether the service would wait past the fuzz's half second: a case of the invalid-input
    phase that is invalid to the fuzz's copy of the document only, not to the service: without a
    timeout (the service's default is seconds), or with a longer one (up to a week is valid).
    Such a wait for a state that does not come held the fuzz's client to its read timeout."""
    if (case.path, case.method.lower()) not in waiting:
        return False
    body = case.body
    if not isinstance(body, dict) or body.get("wait") is False:
        return False
    if body.get("timeout") is None:
        return True
    try:
        return parse_duration(body["timeout"]) > 0.5
    except (ValueError, TypeError):
        return False  # refused at once


def test_fuzz_the_live_api_finds_no_server_error(service: Start, tmp_path: Path) -> None:
    token = "fuzz-token"
    manifest, port = with_tcp_listener(
        tmp_path,
        token,
        """
      web:
        command: ["sh", "-c", "echo serving; exec sleep 300"]
        replicas: 2
        restart: {min_uptime: 0}
        stop: {timeout: 1}
      job:
        command: ["true"]
        restart: {policy: "no", min_uptime: 0}
        stop: {timeout: 1}
        """,
    )
    svc = service(manifest)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    document = httpx.get(f"{base}/openapi.json", headers=headers, timeout=10).json()
    schema = schemathesis.openapi.from_dict(_fuzzable(document))
    waiting = _waiting_operations(document)
    assert ("/v1/instances/wait", "post") in waiting
    names = st.sampled_from(["web", "web-0", "web-1", "job", "web-*", "nope"])
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    calls = 0
    failures: list[str] = []
    began = time.monotonic()
    for operation, mode in itertools.product(operations, GenerationMode):
        strategy = operation.as_strategy(generation_mode=mode)
        if "{name}" in operation.path:
            strategy = st.tuples(strategy, names).map(lambda pair: _named(*pair))

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            nonlocal calls
            assume(not _waits_long(case, waiting))
            try:
                response = case.call(base_url=base, headers=headers, timeout=10)
                calls += 1
                case.validate_response(response, checks=CHECKS)
            except Exception as exc:  # collect them all: one report names every broken operation
                failures.append(f"{case.method} {case.formatted_path}: {exc}")

        try:
            fuzz()
        except Unsatisfiable:  # nothing to make invalid: an operation with no parameters
            assert mode is GenerationMode.NEGATIVE, operation.path
    print(f"{calls} calls to {len(operations)} operations")
    assert not failures, "\n\n".join(failures[:10])
    assert calls >= len(operations) * 5
    # The service is still there, and still answers.
    assert svc.client().health()["ok"]
    assert time.monotonic() - began < 120


def _named(case: Any, name: str) -> Any:
    """Most names the fuzzer makes up select nothing: use a real one half the time."""
    if case.path_parameters and hash(case.path_parameters["name"]) % 2:
        case.path_parameters["name"] = name
    return case


def test_an_undocumented_method_is_a_405_that_says_what_is_allowed(service: Start) -> None:
    svc = service(
        """
        version: 1
        instances:
          web: {command: ["sleep", "300"]}
        """
    )
    transport = httpx.HTTPTransport(uds=str(svc.socket))
    with httpx.Client(transport=transport, base_url="http://supervisor", timeout=10) as api:
        document = api.get("/openapi.json").json()
        checked = 0
        paths = document["paths"]
        for path in paths:
            concrete = path.replace("{name}", "web")
            # /v1/instances/stop takes POST, and GET too: the status of an instance named "stop".
            documented = {
                method.upper()
                for template, operations in paths.items()
                if re.fullmatch(template.replace("{name}", "[^/]+"), concrete)
                for method in operations
            }
            for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - documented:
                answer = api.request(method, concrete)
                assert answer.status_code == 405, (method, path, answer.text)
                assert set(answer.headers["allow"].split(", ")) == documented, (method, path)
                assert answer.json()["error"] == "Method Not Allowed"
                checked += 1
        assert checked >= 40
