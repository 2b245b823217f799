"""The re-exec record's shape check (handoff/shape.py) says what pydantic said of the same record.

The check was pydantic's (a TypedDict per section, validated strictly) until the resuming
service had to run it in its own process, without pydantic. Here the same shape is built
as pydantic types from the check's own description, and records spoilt at random places
with the values JSON allows (NaN, huge numbers, ``true`` for a count, a missing key, a
stray one) must get the same verdict and the same problems, place and words, from both.
"""

from __future__ import annotations

import copy
import json
from typing import Annotated, Any, Literal, NotRequired

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic reads typing's only from Python 3.12

from supervisor.handoff import shape
from supervisor.handoff.shape import RECORD, shape_problems

from .helpers import handoff_record


def _as_pydantic(node: shape.Shape, name: str = "Record") -> Any:
    """The pydantic type that checks what ``node`` checks (strict mode does the rest)."""
    if isinstance(node, shape.Int):
        return Annotated[int, Field(ge=node.lo, le=node.hi)]
    if isinstance(node, shape.Clock):
        return Annotated[float, Field(ge=0, allow_inf_nan=False)]
    if isinstance(node, shape.OneOf):
        return Literal[node.values]
    if isinstance(node, shape.Nullable):
        return _as_pydantic(node.shape, name) | None
    if isinstance(node, shape.ListOf):
        return Annotated[list[_as_pydantic(node.item, name)], Field(min_length=node.lo, max_length=node.hi)]
    if isinstance(node, shape.MapOf):
        return dict[_as_pydantic(node.key, name), _as_pydantic(node.value, name)]  # type: ignore[misc]
    if isinstance(node, shape.Struct):
        fields = {
            key: _as_pydantic(value, f"{name}_{key}") if key in node.required
            else NotRequired[_as_pydantic(value, f"{name}_{key}")]
            for key, value in node.fields.items()
        }
        typed = TypedDict(name, fields)  # type: ignore[operator]
        return with_config(ConfigDict(extra="forbid"))(typed) if node.closed else typed
    kinds = {str: str, bool: bool, dict: dict[str, Any]}
    return kinds[node.kind]  # type: ignore[attr-defined]


PYDANTIC = TypeAdapter(_as_pydantic(RECORD))


def _pydantic_problems(record: object) -> list[tuple[str, str, object]]:
    try:
        PYDANTIC.validate_python(record, strict=True)
    except ValidationError as exc:
        return [
            (shape._place(error["loc"]), error["msg"], error.get("input"))
            for error in exc.errors(include_url=False, include_context=False)
        ]
    return []


def _full_record() -> dict[str, Any]:
    """A valid record with every optional part there: a guardian, a notify socket, connections."""
    record = handoff_record(
        signals=7, handover_began=1.5, handover_cpu=0, nofile=[1024, 4096],
        guardian={"pid": 9, "pidfd": 10, "fd": 11, "cgroup": "/sys/fs/cgroup/x"},
        env_files={"a": {"MARK": "old", "EMPTY": ""}, "b": {}},
    )
    record["service"]["listeners"]["connections"] = [{"fd": 12, "listener": 0}]
    instance = record["instances"][0]
    instance["health"]["notify"] = {"fd": 13, "address": "@n"}
    second = copy.deepcopy(instance) | {"name": "b", "child": None, "last_exit": None, "state": "stopped"}
    del second["cgroup"]
    record["instances"].append(second)
    return record


def _places(value: object, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in the record: each key's and each item's."""
    found = [path]
    if isinstance(value, dict):
        for key, entry in value.items():
            found += _places(entry, (*path, key))
    elif isinstance(value, list):
        for index, entry in enumerate(value):
            found += _places(entry, (*path, index))
    return found


HOSTILE = st.sampled_from(
    [None, True, False, 0, 1, -1, 255, 256, 2**31 - 1, 2**31, 2**63, 10**40, 1.0, 1.5, -0.5,
     float("nan"), float("inf"), float("-inf"), "", "7", "stopped", "stdout", "stdbogus",
     [], [1], [1, 2], [1, 2, 3], ["x"], {}, {"x": 1}, {"fd": 3, "address": "@a"}]
)


@st.composite
def spoilt_records(draw: st.DrawFn) -> dict[str, Any]:
    record = _full_record()
    for _ in range(draw(st.integers(1, 3))):
        places = [place for place in _places(record) if place]
        place = draw(st.sampled_from(places))
        parent: Any = record
        for part in place[:-1]:
            parent = parent[part]
        how = draw(st.sampled_from(["set", "set", "delete", "extra"]))
        if how == "set":
            parent[place[-1]] = copy.deepcopy(draw(HOSTILE))
        elif how == "delete" and isinstance(parent, dict):
            del parent[place[-1]]
        elif how == "extra" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "stdbogus", "stdin"]))] = copy.deepcopy(draw(HOSTILE))
    return record


def _same(found: list[tuple[str, str, object]]) -> list[tuple[str, str, str]]:
    """Order aside (the problems of one section come in its own order), and NaN equal to itself."""
    return sorted((place, what, repr(value)) for place, what, value in found)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=spoilt_records())
def test_a_spoilt_record_gets_the_problems_pydantic_found(record: dict[str, Any]) -> None:
    ours = shape_problems(record)
    assert _same(ours) == _same(_pydantic_problems(record))
    assert RECORD.ok(record) == (not ours)


def test_a_good_record_passes_both() -> None:
    for record in (handoff_record(), _full_record()):
        assert RECORD.ok(record) and shape_problems(record) == [] == _pydantic_problems(record)


def test_the_check_reads_a_record_as_json_made_it() -> None:
    """What json.loads gives for NaN, a huge number and 1e3 (a float, not an int) is refused."""
    text = json.dumps(_full_record()).replace('"handoffs": 1', '"handoffs": 1e3')
    problems = shape_problems(json.loads(text))
    assert problems == [("service.handoffs", "Input should be a valid integer", 1000.0)]
