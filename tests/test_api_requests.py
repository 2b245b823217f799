"""The service's hand checks of requests (api/requests.py) against the wire models they stand for.

The pydantic models are the contract: the OpenAPI document is made from them. The service
checks with the classes of ``requests.py`` instead, so that it never loads pydantic. Here
both read the same bodies, as JSON, and must agree: the same refusals, and from what both
take, the same values.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from supervisor.api import models, requests
from supervisor.api.requests import InvalidInput

BODIES = [
    requests.ActionRequest,
    requests.SignalRequest,
    requests.WaitRequest,
    requests.ScaleRequest,
    requests.ReexecRequest,
]

# Values a client may send, right and wrong: what each field takes, at and past its limits.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 10_000, 10_001, 604_800, 604_801, 0.0, 1.0, 2.5, 1e308, -0.5]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            *("", "30s", "250ms", "1h30m", "8d", "-1s", "soon", "TERM", "SIGHUP", "hup", "9", "NOPE", "0"),
            *("yes", "no", "on", "off", "true", "False", "t", "2", "running", "ready", "asleep", "stopped"),
            *("web", "web-*", "a\x00b", "\u00e9"),
        ]
    ),
    st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["web", "db", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = st.sampled_from(["names", "all", "wait", "timeout", "signal", "state", "scale", "check", "timout"])
BODY = st.dictionaries(KEYS, VALUES, max_size=5)


def verdict_of_model(model: type[BaseModel], body: dict[str, Any]) -> BaseModel | None:
    try:
        return model.model_validate_json(json.dumps(body))
    except ValidationError:
        return None


def verdict_of_hand(cls: type, body: dict[str, Any]) -> Any:
    """As the service reads it: parsed by orjson (which makes an integer past 64 bits a float)."""
    try:
        return cls(orjson.loads(json.dumps(body)))
    except InvalidInput as refused:
        assert refused.details and all(isinstance(line, str) and line for line in refused.details)
        return None


def same_values(cls: type, hand: Any, model: BaseModel) -> None:
    for name in type(model).model_fields:
        theirs = getattr(model, name)
        if name == "state":
            theirs = [str(state) for state in theirs]
        assert getattr(hand, name) == theirs, (cls.__name__, name)


@pytest.mark.parametrize("cls", BODIES, ids=lambda c: c.__name__)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODY)
def test_the_hand_checks_agree_with_the_models(cls: type, body: dict[str, Any]) -> None:
    model = getattr(models, cls.__name__)
    theirs, ours = verdict_of_model(model, body), verdict_of_hand(cls, body)
    assert (theirs is None) == (ours is None), (cls.__name__, body, theirs, ours)
    if theirs is not None:
        same_values(cls, ours, theirs)


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (requests.ActionRequest, {"names": ["web"], "wait": False, "timeout": "1h30m"}),
        (requests.ActionRequest, {"all": True, "timeout": 604_800}),
        (requests.SignalRequest, {"names": ["web-*"], "signal": "HUP"}),
        (requests.SignalRequest, {"all": True, "signal": 9}),
        (requests.WaitRequest, {"names": ["web"], "state": "ready"}),
        (requests.WaitRequest, {"names": ["web"], "state": ["running", "exited"], "timeout": "250ms"}),
        (requests.ScaleRequest, {"scale": {"web": 0, "db": 10_000}}),
        (requests.ReexecRequest, {"check": True, "anything": 1}),
        (requests.ReexecRequest, {}),
    ],
)
def test_what_a_client_sends_is_taken_with_the_models_values(cls: type, body: dict[str, Any]) -> None:
    theirs = verdict_of_model(getattr(models, cls.__name__), body)
    assert theirs is not None
    same_values(cls, verdict_of_hand(cls, body), theirs)


@pytest.mark.parametrize(
    ("cls", "body", "line"),
    [
        (requests.ActionRequest, {"names": ["idle"], "timout": 1}, "timout: Extra inputs are not permitted"),
        (requests.ActionRequest, {}, "name some instances, or set all to true"),
        (requests.ActionRequest, {"names": ["a"], "all": True}, "give names or all, not both"),
        (requests.ActionRequest, {"names": ["idle", 3]}, "names.1: Input should be a valid string"),
        (requests.ActionRequest, {"all": True, "timeout": 10**6}, "timeout: at most a week (604800s)"),
        (requests.WaitRequest, {"all": True}, "state: Field required"),
        (requests.WaitRequest, {"all": True, "state": []}, "state: List should have at least 1 item"),
        (requests.ScaleRequest, {"scale": {"web": 2.5}}, "scale.web: Input should be a valid integer"),
        (requests.ScaleRequest, {"scale": {"web": 10_001}}, "scale.web: Input should be less than or equal"),
        (requests.ReexecRequest, {"check": "maybe"}, "check: Input should be a valid boolean"),
    ],
)
def test_a_refusal_names_the_field_and_what_was_expected(
    cls: type, body: dict[str, Any], line: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        cls(body)
    assert any(found.startswith(line) for found in refused.value.details), refused.value.details


QUERY = st.dictionaries(
    st.sampled_from(["stream", "lines", "follow"]),
    st.one_of(
        st.sampled_from(["stdout", "stderr", "stdin", "10", "0", "-1", "1000000", "1000001", " 7 ", "+3"]),
        st.sampled_from(["1.5", "1.0", "1_000", "1__0", "_1", "0x10", "00012", "-0", "\u0663"]),
        st.sampled_from(["", "NaN", "1e3", "yes", "no", "true", "0", "1", "off", "maybe", "9" * 40]),
        st.text(max_size=6),
    ),
    max_size=3,
)


@settings(max_examples=400, deadline=None)
@given(params=QUERY)
def test_the_logs_query_is_read_as_the_model_reads_it(params: dict[str, str]) -> None:
    theirs: BaseModel | None
    try:
        theirs = models.LogsQuery.model_validate(params)
    except ValidationError:
        theirs = None
    try:
        ours = requests.LogsQuery(params)
    except InvalidInput:
        ours = None
    assert (theirs is None) == (ours is None), (params, theirs, ours)
    if theirs is not None:
        same_values(requests.LogsQuery, ours, theirs)


def test_a_body_of_thousands_of_unknown_keys_is_refused_in_a_few_lines() -> None:
    body = {f"{'k' * 500}{i}": i for i in range(5000)} | {"names": ["a"], "bad\x00key": 1}
    with pytest.raises(InvalidInput) as refused:
        requests.ActionRequest(body)
    lines = refused.value.details
    assert len(lines) == requests.MAX_PROBLEMS + 1 and lines[-1] == "… and 4981 more problems"
    assert all(len(line) < 120 for line in lines), max(lines, key=len)
    assert lines[0] == f"{'k' * 40}…(501 characters): Extra inputs are not permitted"
    with pytest.raises(InvalidInput) as refused:
        requests.ScaleRequest({"scale": {"web\x00\x1b": "2"}})
    assert refused.value.details == ["scale.web\\x00\\x1b: Input should be a valid integer"]


@pytest.mark.parametrize(
    ("timeout", "shown"),
    [(604_800.0000001, "604800.0000001s"), ("7d1ms", "604800.001s"), (10**6, "1000000s")],
)
def test_a_timeout_past_a_week_is_shown_as_refused_not_rounded_to_a_week(timeout: Any, shown: str) -> None:
    """``{:g}`` wrote 604800.0000001 as 604800: "at most 604800s, not 604800s". Both sides alike."""
    line = f"timeout: at most a week (604800s), not {shown}"
    for cls in (requests.ActionRequest, requests.WaitRequest):
        body = {"all": True, "state": "running", "timeout": timeout}
        if cls is requests.ActionRequest:
            del body["state"]
        with pytest.raises(InvalidInput) as refused:
            cls(body)
        assert refused.value.details == [line]
        with pytest.raises(ValidationError) as theirs:
            getattr(models, cls.__name__).model_validate(body)
        assert line.removeprefix("timeout: ") in str(theirs.value)
