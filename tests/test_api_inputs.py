"""Hostile bodies and query parameters against a real service: each a 400 that names what is wrong.

The routes validate their input with the wire models (``supervisor/api/inputs.py``);
these requests are the ones a careless script or a fuzzer sends: NUL in a name, a
number too large for any integer type, NaN, a body that is not JSON, not UTF-8, or
not an object. None may reach an instance or the service's error log, and every
answer says which field or parameter is wrong and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from .service_fixture import ServiceProcess
from .test_api import assert_error, http

Start = Callable[..., ServiceProcess]

MANIFEST = """
version: 1
instances:
  sleeper:
    command: ["sh", "-c", "echo one; echo two; echo three; exec sleep 300"]
    restart: {min_uptime: 0}
  idle:
    command: ["sleep", "300"]
    autostart: false
"""
JSON = {"content-type": "application/json"}
NOT_AN_OBJECT = "the body must be a JSON object, sent with Content-Type: application/json"


def details(response: httpx.Response, status: int = 400) -> list[str]:
    body = assert_error(response, status)
    if status == 400:
        assert body["error"] == "invalid request", body
    return [str(line) for line in body["details"]]


def post(api: httpx.Client, route: str, raw: bytes, headers: dict[str, str] = JSON) -> httpx.Response:
    return api.post(f"/v1/instances/{route}", content=raw, headers=headers)


def test_bodies_that_are_not_json_objects_are_a_400_that_says_so(service: Start) -> None:
    svc = service(MANIFEST)
    svc.wait_for(["sleeper"], "running")
    with http(svc) as api:
        for raw in (b"[]", b'["idle"]', b'"idle"', b"17", b"true", b"null"):
            assert details(post(api, "stop", raw)) == [NOT_AN_OBJECT], raw
        for route in ("start", "restart", "signal", "wait"):
            assert details(post(api, route, b'[{"names": ["idle"]}]')) == [NOT_AN_OBJECT], route
        assert details(api.post("/v1/scale", content=b"[]", headers=JSON)) == [NOT_AN_OBJECT]
        # Not JSON at all: where the parser gave up.
        [line] = details(post(api, "stop", b"{not json"))
        assert line.startswith("the body is not valid UTF-8 JSON: ") and "line 1 column 2" in line
        [line] = details(post(api, "stop", b'{"names": ["idle"]}{}'))
        assert "unexpected content after document" in line and "column 20" in line
        # Not UTF-8: Latin-1 in a name.
        [line] = details(post(api, "stop", b'{"names": ["caf\xe9"]}'))
        assert "not valid UTF-8 JSON" in line and "not valid UTF-8" in line.split(": ", 1)[1]
        # Nested past any sense, within the size limit: refused by depth, not by a crash.
        [line] = details(post(api, "start", b'{"names": ' + b"[" * 100_000))
        assert "depth limit exceeded" in line
        # No body, or the right JSON sent as something else.
        assert details(post(api, "stop", b"")) == ["this route needs a JSON body (ActionRequest)"]
        assert details(api.post("/v1/instances/wait")) == ["this route needs a JSON body (WaitRequest)"]
        form = {"content-type": "application/x-www-form-urlencoded"}
        assert details(post(api, "stop", b'{"names": ["idle"]}', form)) == [NOT_AN_OBJECT]
        assert details(post(api, "stop", b'{"names": ["idle"]}', {})) == [NOT_AN_OBJECT]
        # A JSON type with parameters, or a +json type, is JSON.
        charset = {"content-type": "application/json; charset=utf-8"}
        stopped = post(api, "stop", b'{"names": ["sleeper"]}', charset)
        assert stopped.status_code == 200, stopped.text
        started = post(api, "start", b'{"names": ["sleeper"]}', {"content-type": "application/vnd.x+json"})
        assert started.status_code == 200, started.text
    assert "Traceback" not in svc.log()


def test_fields_that_do_not_fit_are_named_with_what_was_expected(service: Start) -> None:
    svc = service(MANIFEST)
    svc.wait_for(["sleeper"], "running")
    with http(svc) as api:
        # Unknown keys are refused, as in the manifest: a misspelt key must not be ignored.
        assert details(api.post("/v1/instances/stop", json={"names": ["idle"], "timout": 1})) == [
            "timout: Extra inputs are not permitted"
        ]
        wait = {"names": ["idle"], "state": "running", "tiemout": 1}
        [line] = details(api.post("/v1/instances/wait", json=wait))
        assert line == "tiemout: Extra inputs are not permitted"
        assert details(api.post("/v1/scale", json={"scale": {"idle": 1}, "all": True})) == [
            "all: Extra inputs are not permitted"
        ]
        # NaN, infinities and numbers past any float, in a wait's timeout: NaN and the infinities
        # are not JSON (refused by their column), the others are too long a wait.
        for timeout in (b"NaN", b"-Infinity", b"1e999", b"1e308", b"9" * 5000):
            raw = b'{"names": ["idle"], "state": "running", "timeout": %s}' % timeout
            [line] = details(post(api, "wait", raw))
            assert line.startswith("timeout: ") or "line 1 column 5" in line, (timeout, line)
        [line] = details(post(api, "wait", b'{"names": ["idle"], "state": "running", "timeout": NaN}'))
        assert line == (
            "the body is not valid UTF-8 JSON: unexpected character, expected a JSON value: "
            "line 1 column 52 (char 51)"
        )
        # A replica count that is no integer, or out of range.
        counts = ((2.5, "valid integer"), ("2", "valid integer"), (10_001, "less than or equal"))
        for count, expected in counts:
            [line] = details(api.post("/v1/scale", json={"scale": {"idle": count}}))
            assert line.startswith("scale.idle: ") and expected in line, line
        [line] = details(api.post("/v1/instances/stop", json={"names": ["idle", 3]}))
        assert line == "names.1: Input should be a valid string"
        # reexec's body is optional, but checked when there is one (nothing is handed over).
        assert details(api.post("/v1/reexec", json=[])) == [NOT_AN_OBJECT]
        [line] = details(api.post("/v1/reexec", json={"check": "maybe"}))
        assert line.startswith("check: ") and "boolean" in line
    assert svc.status("idle")["idle"]["state"] == "stopped"


def test_nul_in_a_name_is_a_name_that_matches_nothing(service: Start) -> None:
    """NUL is refused nowhere on the way (it is a valid JSON and URL character): it matches nothing."""
    svc = service(MANIFEST)
    with http(svc) as api:
        for answer in (
            api.get("/v1/instances", params={"names": "sleep\x00er"}),
            api.get("/v1/instances/sleep%00er"),
            api.get("/v1/instances/sleep%00er/logs"),
            api.post("/v1/instances/stop", json={"names": ["sleep\x00er"]}),
        ):
            body = assert_error(answer, 404)
            assert body["error"].startswith("no instance matches 'sleep\\x00er'"), body
    assert svc.status("sleeper")["sleeper"]["state"] == "running"


def test_query_parameters_are_checked_and_named(service: Start) -> None:
    svc = service(MANIFEST)
    svc.wait_output("sleeper", b"three")
    logs = "/v1/instances/sleeper/logs"
    with http(svc) as api:
        for lines, expected in (
            ("-1", "greater than or equal to 0"),
            ("1000001", "less than or equal to 1000000"),
            ("9" * 40, "less than or equal to 1000000"),  # past any machine integer
            ("9" * 5000, "exceeded maximum size"),  # past Python's int-from-str digit limit
            ("1.5", "valid integer"),
            ("", "valid integer"),
            ("NaN", "valid integer"),
        ):
            [line] = details(api.get(logs, params={"lines": lines}))
            assert line.startswith("query.lines: ") and expected in line, (lines, line)
        [line] = details(api.get(logs, params={"stream": "stdin"}))
        assert line == "query.stream: Input should be 'stdout' or 'stderr'"
        [line] = details(api.get(logs, params={"follow": "maybe"}))
        assert line.startswith("query.follow: ") and "boolean" in line
        # Both wrong: both named.
        assert len(details(api.get(logs, params={"lines": "x", "stream": "x"}))) == 2
        # What is valid still works: the last of a repeated parameter, unknown ones ignored.
        assert api.get(logs, params={"lines": "2"}).text == "two\nthree\n"
        repeated = [("lines", "1"), ("lines", "2"), ("colour", "red")]
        assert api.get(logs, params=repeated).text == "two\nthree\n"
        assert api.get(logs, params={"lines": "0", "follow": "false"}).text == ""
        # names repeats; a name that selects nothing is a 404 that names it.
        listed = api.get("/v1/instances", params=[("names", "sleeper"), ("names", "idle")]).json()
        assert sorted(s["name"] for s in listed) == ["idle", "sleeper"]
        assert "'nope'" in assert_error(api.get("/v1/instances", params={"names": "nope"}), 404)["error"]


def test_routing_errors_keep_their_shape(service: Start) -> None:
    svc = service(MANIFEST)
    with http(svc) as api:
        assert assert_error(api.get("/v1/nothing-here"), 404)["error"] == "Not Found"
        # Allow names every method taken at the path (GET: an instance named "stop").
        refused = api.delete("/v1/instances/stop")
        assert assert_error(refused, 405)["error"] == "Method Not Allowed"
        assert refused.headers["allow"] == "GET, POST"
        assert api.put("/v1/health").headers["allow"] == "GET"
        # No implicit HEAD: the document offers none, and a stream would stream for it.
        for path in ("/v1/health", "/v1/events", "/"):
            head = api.head(path)
            assert head.status_code == 405 and head.headers["allow"] == "GET", path
        assert api.head("/openapi.json").status_code == 200
        document = api.get("/openapi.json")
        assert document.headers["content-type"] == "application/json"
        assert api.get("/openapi.json").content == document.content  # built once


def test_the_document_describes_what_the_routes_validate(service: Start) -> None:
    svc = service(MANIFEST)
    with http(svc) as api:
        document = api.get("/openapi.json").json()
    paths = document["paths"]
    logs = paths["/v1/instances/{name}/logs"]["get"]
    parameters = {p["name"]: p for p in logs["parameters"]}
    assert list(parameters) == ["name", "stream", "lines", "follow"]
    assert parameters["name"]["in"] == "path" and parameters["name"]["required"]
    assert parameters["lines"]["schema"] == {
        "default": 10,
        "description": "How many of the last lines.",
        "maximum": 1_000_000,
        "minimum": 0,
        "title": "Lines",
        "type": "integer",
    }
    assert parameters["stream"]["schema"]["enum"] == ["stdout", "stderr"]
    names = paths["/v1/instances"]["get"]["parameters"]
    assert [(p["name"], p["in"], p["required"]) for p in names] == [("names", "query", False)]
    reexec = paths["/v1/reexec"]["post"]
    assert reexec["requestBody"]["required"] is False and "400" in reexec["responses"]
    stop = paths["/v1/instances/stop"]["post"]
    assert stop["operationId"] == "stop_instances_v1_instances_stop_post"
    assert stop["requestBody"] == {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ActionRequest"}}},
        "required": True,
    }
    assert stop["description"].startswith("Stop the selected instances")
    listing = paths["/v1/instances"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listing == {"type": "array", "items": {"$ref": "#/components/schemas/Status"}}
    assert paths["/v1/health"]["get"]["description"] == "The service answers; what it runs."
    # Every $ref points at a schema the document has.
    text = json.dumps(document)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in document["components"]["schemas"], name
