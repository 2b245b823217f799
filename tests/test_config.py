"""The manifest layer: units, loading real files, every problem placed in the file, and the docs.

Every manifest here is a real file in tmp_path, loaded with an explicit environment (never the
test runner's), so that each test says exactly which variables exist.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel

from supervisor.api.client import _interpolate as client_interpolate
from supervisor.config import (
    InstanceConfig,
    Manifest,
    ManifestError,
    Problem,
    format_duration,
    load_manifest,
    models,
    parse_duration,
    parse_signal,
    parse_size,
)
from supervisor.config.loader import settled
from supervisor.config.records import as_data
from supervisor.config.reference import render

ROOT = Path(__file__).resolve().parent.parent


def _record_of(model: type[BaseModel]) -> Any:
    """Builds the record the service holds as the model builds it (defaults, validation)."""
    return lambda **fields: settled(model(**fields))


# The stream kinds as the records a loaded manifest holds.
_KINDS = ("LogStream", "NullStream", "InheritStream", "FileStream", "FifoStream", "StdoutStream")
LogStream, NullStream, InheritStream, FileStream, FifoStream, StdoutStream = (
    _record_of(getattr(models, kind)) for kind in _KINDS
)


def dumped(config: InstanceConfig) -> dict[str, Any]:
    """The model's own dump of a loaded instance: the words a person would write."""
    return models.InstanceConfig.model_validate(as_data(config)).model_dump(mode="json")


# -- helpers ------------------------------------------------------------------------------------


def write(folder: Path, text: str, name: str = "supervisor.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def load(folder: Path, text: str, environ: Mapping[str, str] | None = None) -> Manifest:
    return load_manifest(write(folder, text), {} if environ is None else environ)


def problems(folder: Path, text: str, environ: Mapping[str, str] | None = None) -> list[Problem]:
    path = write(folder, text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, {} if environ is None else environ)
    for problem in caught.value.problems:
        assert problem.file == str(path)
    return caught.value.problems


def web(body: str = "") -> str:
    """A manifest with one instance, ``web``, whose extra keys (``body``) start on line 5."""
    indented = "".join(f"    {line}\n" for line in body.splitlines())
    return f"version: 1\ninstances:\n  web:\n    command: run-web\n{indented}"


def web_config(folder: Path, body: str, environ: Mapping[str, str] | None = None) -> InstanceConfig:
    return load(folder, web(body), environ).instances["web"]


def only(found: list[Problem]) -> Problem:
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


# -- units --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("2d", 172800.0),
        ("1 H", 3600.0),
        ("90", 90.0),
        (90, 90.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_durations(written: Any, seconds: float) -> None:
    assert parse_duration(written) == seconds


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("10 parsecs", "'10 parsecs' is not a duration: write it like 250ms"),
        ("-5s", "'-5s' is not a duration"),
        ("5x", "'5x' is not a duration"),
        ("ms", "'ms' is not a duration"),
        ("", "'' is not a duration"),
        (-1, "a duration cannot be negative"),
        (True, "expected a duration such as 250ms"),
        (None, "expected a duration such as 250ms"),
    ],
)
def test_bad_durations(written: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(written)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.1, "100ms"), (0.25, "250ms"), (30.0, "30s"), (1.5, "1.5s"), (0.0, "0s")]
)
def test_durations_are_written_back_in_the_same_words(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("written", "size"),
    [
        (4096, 4096),
        ("7", 7),
        ("100b", 100),
        ("512KB", 512 * 1024),
        ("512k", 512 * 1024),
        ("512KiB", 512 * 1024),
        ("50MB", 50 * 1024**2),
        ("50 MiB", 50 * 1024**2),
        ("1GB", 1024**3),
        ("1.5MB", 1572864),
    ],
)
def test_sizes(written: Any, size: int) -> None:
    assert parse_size(written) == size


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("12XB", "'12XB' is not a size: write it like 4096, 512KB, 50MB or 1GB"),
        ("MB", "'MB' is not a size"),
        ("-1", "'-1' is not a size"),
        (-1, "a size cannot be negative"),
        (1.5, "1.5 is not a size"),
        (True, "expected a size such as 512KB"),
    ],
)
def test_bad_sizes(written: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(written)


@pytest.mark.parametrize(
    ("written", "number"),
    [
        ("TERM", signal.SIGTERM),
        ("SIGTERM", signal.SIGTERM),
        ("sigterm", signal.SIGTERM),
        (" int ", signal.SIGINT),
        ("KILL", signal.SIGKILL),
        (15, signal.SIGTERM),
        ("15", signal.SIGTERM),
        (1, signal.SIGHUP),
    ],
)
def test_signals(written: Any, number: int) -> None:
    assert parse_signal(written) == number


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("SIGBOGUS", "'SIGBOGUS' is not a signal: write it like TERM, SIGINT or 9"),
        ("-1", "'-1' is not a signal"),
        (0, "0 is not a signal number on this system"),
        ("0", "0 is not a signal number on this system"),
        (1000, "1000 is not a signal number"),
        (True, "expected a signal name such as TERM"),
        (1.5, "expected a signal name such as TERM"),
    ],
)
def test_bad_signals(written: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_signal(written)


def test_units_in_a_manifest_are_parsed_and_dumped_back_in_words(tmp_path: Path) -> None:
    manifest = load(
        tmp_path,
        "version: 1\n"
        "supervisor:\n"
        "  shutdown_timeout: 2m\n"
        "  logs: {max_bytes: 512KB}\n"
        "instances:\n"
        "  web:\n"
        "    command: run-web\n"
        "    stop: {signal: INT, timeout: 250ms}\n"
        "    restart: {min_uptime: 2s, backoff: {initial: 50ms, max: 1h}}\n"
        "    logs: {max_bytes: 1MB}\n",
    )
    config = manifest.instances["web"]
    assert manifest.supervisor.shutdown_timeout == 120.0
    assert manifest.supervisor.logs.max_bytes == 512 * 1024
    assert config.stop.signal == signal.SIGINT
    assert config.stop.timeout == 0.25
    assert config.restart.min_uptime == 2.0
    assert (config.restart.backoff.initial, config.restart.backoff.max) == (0.05, 3600.0)
    assert config.logs.max_bytes == 1024**2
    words = dumped(config)
    assert words["stop"] == {"signal": "SIGINT", "timeout": "250ms", "group": True}
    assert words["restart"]["backoff"]["initial"] == "50ms"


def test_bad_units_in_a_manifest_are_placed_at_their_values(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        web("stop: {signal: BOGUS, timeout: 10 parsecs}\nlogs:\n  max_bytes: 12XB\n"),
    )
    assert [str(p).split(": ", 1)[1] for p in found] == [
        "instances.web.stop.signal: 'BOGUS' is not a signal: write it like TERM, SIGINT or 9",
        "instances.web.stop.timeout: '10 parsecs' is not a duration: write it like 250ms, 30s, 2m, 1h "
        "or 1h30m",
        "instances.web.logs.max_bytes: '12XB' is not a size: write it like 4096, 512KB, 50MB or 1GB",
    ]
    assert [(p.line, p.column) for p in found] == [(5, 20), (5, 36), (7, 18)]


def test_umask_is_octal_text(tmp_path: Path) -> None:
    config = web_config(tmp_path, "umask: '027'")
    assert config.umask == 0o027
    assert dumped(config)["umask"] == "027"
    # YAML 1.1 reads an unquoted 022 as octal, and an unquoted 27 as decimal: the docs say quote it.
    # Unquoted digits are read as a shell's `umask 022` and `umask 27` read them: octal.
    assert web_config(tmp_path, "umask: 022").umask == 0o022
    assert web_config(tmp_path, "umask: 27").umask == 0o027
    assert web_config(tmp_path, "umask: 0o77").umask == 0o077
    problem = only(problems(tmp_path, web("umask: '089'")))
    assert problem.path == "instances.web.umask"
    assert "'089' is not an octal umask" in problem.message


# -- command ------------------------------------------------------------------------------------


def test_command_as_a_list_is_the_argument_vector(tmp_path: Path) -> None:
    config = load(
        tmp_path, "version: 1\ninstances:\n  web:\n    command: [python3, -c, 'print(1)', 'a b']\n"
    ).instances["web"]
    assert config.argv == ["python3", "-c", "print(1)", "a b"]


def test_command_as_a_string_is_split_as_a_shell_would(tmp_path: Path) -> None:
    config = load(
        tmp_path, """version: 1\ninstances:\n  web:\n    command: python3 -m http.server 'a b' "c d"\\ e\n"""
    ).instances["web"]
    assert config.argv == ["python3", "-m", "http.server", "a b", "c d e"]


def test_shell_true_runs_the_string_through_sh(tmp_path: Path) -> None:
    config = web_config(tmp_path, "shell: true")
    assert config.argv == ["/bin/sh", "-c", "run-web"]
    text = "version: 1\ninstances:\n  web:\n    command: 'echo $$HOME | tr a b'\n    shell: true\n"
    assert load(tmp_path, text).instances["web"].argv == ["/bin/sh", "-c", "echo $HOME | tr a b"]
    listed = "version: 1\ninstances:\n  web:\n    command: [echo, 'a b']\n    shell: true\n"
    assert load(tmp_path, listed).instances["web"].argv == ["/bin/sh", "-c", "echo 'a b'"]


def test_bad_commands_are_refused(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "version: 1\n"
        "instances:\n"
        "  a: {command: 'x \"unterminated'}\n"
        "  b: {command: []}\n"
        "  c: {command: '   '}\n"
        "  d: {replicas: 2}\n",
    )
    assert [(p.path, p.message) for p in found] == [
        ("instances.a.command", "cannot split the command: No closing quotation"),
        ("instances.b.command", "the command is empty"),
        ("instances.c.command", "the command is empty"),
        ("instances.d", "the key 'command' is required here"),
    ]
    assert (found[3].line, found[3].column) == (6, 3)


def test_an_empty_program_name_or_user_is_refused(tmp_path: Path) -> None:
    # execve("") fails at every start; `user: ""` is no user a lookup can find.
    found = problems(
        tmp_path,
        "version: 1\n"
        "instances:\n"
        "  a: {command: ['', x]}\n"
        "  b: {command: \"'' x\"}\n"
        "  c: {command: run, user: ''}\n"
        "  d: {command: run, group: ''}\n",
    )
    program = "the command's first word is the program to run: it cannot be empty"
    named = "the name is empty: expected a name or a number from 0 to 4294967294"
    assert [(p.path, (p.line, p.column), p.message) for p in found] == [
        ("instances.a.command", (3, 16), program),
        ("instances.b.command", (4, 16), program),
        ("instances.c.user", (5, 27), named),
        ("instances.d.group", (6, 28), named),
    ]


# -- environment --------------------------------------------------------------------------------


def test_env_is_merged_over_the_service_environment(tmp_path: Path) -> None:
    config = web_config(tmp_path, "env: {A: mine, N: 1, F: 1.5, T: true, OFF: false}")
    service = {"PATH": "/bin", "A": "service's"}
    assert config.environment(service) == {
        "PATH": "/bin",
        "A": "mine",
        "N": "1",
        "F": "1.5",
        "T": "true",
        "OFF": "false",
    }
    assert service == {"PATH": "/bin", "A": "service's"}  # not changed in place


def test_inherit_env_false_starts_from_an_empty_environment(tmp_path: Path) -> None:
    config = web_config(tmp_path, "inherit_env: false\nenv: {A: '1'}")
    assert config.environment({"PATH": "/bin", "HOME": "/root"}) == {"A": "1"}


def test_env_file_is_read_at_load_time_and_env_wins_over_it(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text(
        "# a comment\n"
        "\n"
        "A=from-file\n"
        "export B = two words\n"
        "C='single quoted'\n"
        'D="double quoted"\n'
        "E=\n"
        "URL=http://x/?a=b\n"
    )
    config = web_config(tmp_path, "env_file: app.env\nenv: {A: from-env}")
    (tmp_path / "app.env").unlink()  # read once, at load time
    assert config.env_file == str(tmp_path / "app.env")
    assert config.environment({"A": "service", "B": "service", "KEEP": "k"}) == {
        "A": "from-env",
        "B": "two words",
        "C": "single quoted",
        "D": "double quoted",
        "E": "",
        "URL": "http://x/?a=b",
        "KEEP": "k",
    }


def test_env_file_problems_are_load_errors(tmp_path: Path) -> None:
    missing = only(problems(tmp_path, web("env_file: nope.env")))
    assert missing.path == "instances.web"
    assert missing.message == f"cannot read env_file '{tmp_path / 'nope.env'}': No such file or directory"
    (tmp_path / "bad.env").write_text("A=1\nnot a pair\n")
    bad = only(problems(tmp_path, web("env_file: bad.env")))
    assert bad.message == f"env_file '{tmp_path / 'bad.env'}' line 2: expected KEY=VALUE, got 'not a pair'"
    (tmp_path / "bad.env").write_text("1A=x\n")
    assert "line 1: expected KEY=VALUE" in only(problems(tmp_path, web("env_file: bad.env"))).message


def test_every_bad_env_key_is_reported_at_its_key(tmp_path: Path) -> None:
    # Only the first was reported, at the mapping: a fix-one-reload-find-the-next loop.
    found = problems(tmp_path, web("env:\n  A=B: c\n  OK: d\n  '': e\nenv_file: {}"))
    message = "cannot name an environment variable: it is empty or holds '='"
    assert [(p.path, (p.line, p.column), p.message) for p in found] == [
        ("instances.web.env.A=B", (6, 7), f"'A=B' {message}"),
        ("instances.web.env.", (8, 7), f"'' {message}"),
        ("instances.web.env_file", (9, 15), "Input should be a valid string"),
    ]
    flow = problems(tmp_path, web('env: {"A=B": c, "": d}'))
    assert [(p.line, p.column) for p in flow] == [(5, 11), (5, 21)]


# -- interpolation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("${PORT}", "8080"),
        ("http://${HOST}:${PORT}/", "http://example:8080/"),
        ("${MISSING:-fallback}", "fallback"),
        ("${PORT:-80}", "8080"),
        ("${EMPTY}", ""),
        ("${EMPTY:-fallback}", "fallback"),
        ("${MISSING:-}", ""),
        ("${MISSING-fallback}", "fallback"),  # without the colon, as in a shell: unset only
        ("${EMPTY-fallback}", ""),
        ("${PORT-80}", "8080"),
        ("$$", "$"),
        ("cost: $$5", "cost: $5"),
        ("$${PORT}", "${PORT}"),
        ("$$$$", "$$"),
        ("$HOME and $", "$HOME and $"),
        ("${LOOP}", "${PORT}"),  # a value is not interpolated again
    ],
)
def test_interpolation(tmp_path: Path, written: str, value: str) -> None:
    environ = {"PORT": "8080", "HOST": "example", "EMPTY": "", "LOOP": "${PORT}"}
    config = web_config(tmp_path, f"env: {{X: '{written}'}}", environ)
    assert config.env["X"] == value
    # The CLI finds the socket without the loader (no pydantic at its start): same reading.
    assert client_interpolate(written, environ) == value


def test_interpolation_reaches_keys_and_non_string_values(tmp_path: Path) -> None:
    text = "version: 1\ninstances:\n  ${NAME}:\n    command: run\n    replicas: ${N}\n    autostart: ${ON}\n"
    manifest = load(tmp_path, text, {"NAME": "svc", "N": "3", "ON": "false"})
    assert list(manifest.instances) == ["svc"]
    assert manifest.instances["svc"].replicas == 3
    assert manifest.instances["svc"].autostart is False


def test_unset_variables_are_each_reported_at_their_value(tmp_path: Path) -> None:
    found = problems(tmp_path, web("env: {A: '${FIRST}'}\ncwd: '${SECOND}/x'\nuser: '${1BAD}'"))
    assert [(p.path, p.line, p.column) for p in found] == [
        ("instances.web.env.A", 5, 14),
        ("instances.web.cwd", 6, 10),
        ("instances.web.user", 7, 11),
    ]
    assert found[0].message == (
        "the environment variable FIRST is not set "
        "(give a default with ${FIRST:-default}, or write $$ for a literal $)"
    )
    assert "SECOND is not set" in found[1].message
    assert found[2].message == "${1BAD} is not a variable reference: write ${NAME}"


def test_the_process_environment_is_used_when_none_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPERVISOR_TEST_QUEUE", "jobs")
    path = write(tmp_path, web("env: {Q: '${SUPERVISOR_TEST_QUEUE}'}"))
    assert load_manifest(path).instances["web"].env["Q"] == "jobs"
    monkeypatch.delenv("SUPERVISOR_TEST_QUEUE")
    with pytest.raises(ManifestError, match="SUPERVISOR_TEST_QUEUE is not set"):
        load_manifest(path)


# -- instance names and replicas ----------------------------------------------------------------


@pytest.mark.parametrize(("replicas", "names"), [(1, ["web"]), (3, ["web-0", "web-1", "web-2"]), (0, [])])
def test_replica_names(tmp_path: Path, replicas: int, names: list[str]) -> None:
    assert web_config(tmp_path, f"replicas: {replicas}").replica_names("web") == names


def test_a_replica_name_may_not_be_another_instances_name(tmp_path: Path) -> None:
    text = "version: 1\ninstances:\n  web-1: {command: y}\n  web: {command: x, replicas: 2}\n"
    problem = only(problems(tmp_path, text))
    assert (problem.path, problem.line, problem.column) == ("instances.web", 4, 3)
    assert problem.message == "the replica name 'web-1' clashes with instance 'web-1'"
    negative = only(problems(tmp_path, web("replicas: -1")))
    assert negative.message == "Input should be greater than or equal to 0 (got -1)"


@pytest.mark.parametrize("name", ["Web", "-web", "_web", ".web", "my app", "a/b", "web!", "wéb"])
def test_bad_instance_names_are_refused_at_the_key(tmp_path: Path, name: str) -> None:
    text = f"version: 1\ninstances:\n  ok: {{command: x}}\n  '{name}': {{command: x}}\n"
    problem = only(problems(tmp_path, text))
    assert (problem.line, problem.column) == (4, 3)
    assert problem.path == f"instances.{name}"
    assert problem.message == f"{name!r} is not a valid instance name: use ^[a-z0-9][a-z0-9_.-]*$"


@pytest.mark.parametrize("name", ["web", "w", "0", "worker_2", "api.v1", "db-primary", "8080", "on", "null"])
def test_good_instance_names(tmp_path: Path, name: str) -> None:
    # A key is the text written: 8080 is not an int, `on` is not True, `null` is not None.
    manifest = load(tmp_path, f"version: 1\ninstances:\n  {name}: {{command: x}}\n")
    assert list(manifest.instances) == [name]


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    text = "version: 1\ninstances:\n  web: {command: x}\n  web: {command: y}\n"
    problem = only(problems(tmp_path, text))
    assert (problem.path, problem.line, problem.column) == ("instances.web", 4, 3)
    assert problem.message == "the key 'web' is given twice"


def test_merge_keys_take_an_anchor_and_written_keys_win(tmp_path: Path) -> None:
    manifest = load(
        tmp_path,
        "version: 1\n"
        "instances:\n"
        "  web: &base\n"
        "    command: run-web\n"
        "    restart: {policy: always}\n"
        "  api:\n"
        "    <<: *base\n"
        "    command: run-api\n"
        "  copy: *base\n",
    )
    assert manifest.instances["api"].command == "run-api"
    assert manifest.instances["api"].restart.policy == "always"
    assert manifest.instances["copy"] == manifest.instances["web"]
    twice = "version: 1\ninstances:\n  web: &b {command: x}\n  api:\n"
    twice += "    <<: *b\n    replicas: 2\n    replicas: 3\n"
    problem = only(problems(tmp_path, twice))
    assert (problem.path, problem.line, problem.message) == (
        "instances.api.replicas",
        7,
        "the key 'replicas' is given twice",
    )


# -- streams ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "stream"),
    [
        ("stdout: log", LogStream()),
        ("stdout: null", NullStream()),
        ("stdout: ~", NullStream()),
        ("stdout:", NullStream()),
        ("stdout: inherit", InheritStream()),
        ("stdout: out.log", FileStream(path="{dir}/out.log")),
        ("stdout: logs/out.log", FileStream(path="{dir}/logs/out.log")),
        ("stdout: /var/log/out.log", FileStream(path="/var/log/out.log")),
        ("stdout: {file: out.log}", FileStream(path="{dir}/out.log", mode="append")),
        ("stdout: {file: out.log, mode: truncate}", FileStream(path="{dir}/out.log", mode="truncate")),
        ("stdout: {fifo: run/out.fifo}", FifoStream(path="{dir}/run/out.fifo")),
        (
            "stdout: {kind: file, path: o.log, mode: truncate}",
            FileStream(path="{dir}/o.log", mode="truncate"),
        ),
        ("stdout: {kind: inherit}", InheritStream()),
        ("stdout: ''", FileStream(path="")),  # an empty path: "not set up", decided by the stdio layer
        ("stdin: null", NullStream()),
        ("stdin: inherit", InheritStream()),
        ("stdin: input.txt", FileStream(path="{dir}/input.txt")),
        ("stdin: {fifo: in.fifo}", FifoStream(path="{dir}/in.fifo")),
        ("stderr: stdout", StdoutStream()),
        ("stderr: err.log", FileStream(path="{dir}/err.log")),
        ("stderr: null", NullStream()),
    ],
)
def test_stream_forms(tmp_path: Path, written: str, stream: Any) -> None:
    expected = stream
    if getattr(stream, "path", None):
        expected = stream.replace(path=stream.path.format(dir=tmp_path))
    config = web_config(tmp_path, written)
    assert getattr(config, written.split(":")[0]) == expected


def test_stream_defaults(tmp_path: Path) -> None:
    config = web_config(tmp_path, "")
    assert (config.stdin, config.stdout, config.stderr) == (NullStream(), LogStream(), LogStream())


def test_streams_are_dumped_in_the_long_form_and_read_back(tmp_path: Path) -> None:
    config = web_config(tmp_path, "stdout: {file: o.log, mode: truncate}\nstderr: stdout\nstdin: ~")
    words = dumped(config)
    assert words["stdout"] == {"kind": "file", "path": str(tmp_path / "o.log"), "mode": "truncate"}
    assert (words["stderr"], words["stdin"]) == ({"kind": "stdout"}, {"kind": "null"})
    assert settled(models.InstanceConfig.model_validate(words)) == config


@pytest.mark.parametrize(
    ("written", "path", "where", "message"),
    [
        (
            "stdout: stdout",
            "instances.web.stdout",
            (5, 13),
            "Input tag 'stdout' found using 'kind' does not match any of the expected tags: "
            "'log', 'null', 'inherit', 'file', 'fifo'",
        ),
        ("stdin: stdout", "instances.web.stdin", (5, 12), "Input tag 'stdout' found using 'kind'"),
        ("stdin: log", "instances.web.stdin", (5, 12), "Input tag 'log' found using 'kind'"),
        (
            "stdout: {mode: truncate}",
            "instances.web.stdout",
            (5, 13),
            "a stream mapping needs a 'file' or a 'fifo' key",
        ),
        (
            "stdout: {file: o.log, mode: sideways}",
            "instances.web.stdout.mode",
            (5, 33),
            "Input should be 'append' or 'truncate' (got 'sideways')",
        ),
        ("stdout: {file: o.log, mod: truncate}", "instances.web.stdout.mod", (5, 27), "unknown key 'mod'"),
        ("stderr: {fifo: p, mode: truncate}", "instances.web.stderr.mode", (5, 23), "unknown key 'mode'"),
        ("stdout: {file: [a]}", "instances.web.stdout.file", (5, 20), "Input should be a valid string"),
        ("stdout: 42", "instances.web.stdout", (5, 13), "Input should be a valid dictionary"),
    ],
)
def test_bad_streams(tmp_path: Path, written: str, path: str, where: tuple[int, int], message: str) -> None:
    problem = only(problems(tmp_path, web(written)))
    assert (problem.path, (problem.line, problem.column)) == (path, where)
    assert problem.message.startswith(message)


# -- paths --------------------------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_manifests_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.env").write_text("A=1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        app,
        "version: 1\n"
        "supervisor:\n"
        "  state_dir: state\n"
        "  control: {socket: run/ctl.sock, tcp: '127.0.0.1:9001', token_file: secret/token}\n"
        "instances:\n"
        "  web:\n"
        "    command: run\n"
        "    cwd: work\n"
        "    env_file: app.env\n"
        "    stdin: {fifo: in.fifo}\n"
        "    stdout: out/web.log\n"
        "    stderr: {file: /abs/err.log}\n"
        "    logs: {stdout_file: logs/o.log, stderr_file: ../shared/e.log}\n",
    )
    manifest = load_manifest(Path(os.path.relpath(path)), {})  # a relative manifest path, too
    config = manifest.instances["web"]
    assert manifest.source == path
    assert manifest.state_dir == app / "state"
    assert manifest.control_socket == app / "run/ctl.sock"
    assert manifest.supervisor.control.token_file == str(app / "secret/token")
    assert config.cwd == str(app / "work")
    assert config.env_file == str(app / "app.env")
    assert config.stdin == FifoStream(path=str(app / "in.fifo"))
    assert config.stdout == FileStream(path=str(app / "out/web.log"))
    assert config.stderr == FileStream(path="/abs/err.log")
    assert config.logs.stdout_file == str(app / "logs/o.log")
    assert config.logs.stderr_file == str(app / "../shared/e.log")


def test_home_is_expanded_in_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = web_config(tmp_path, "cwd: ~/work\nstdout: ~/out.log")
    assert config.cwd == str(tmp_path / "home/work")
    assert config.stdout == FileStream(path=str(tmp_path / "home/out.log"))


def test_a_symlinked_manifest_resolves_against_its_real_folder(tmp_path: Path) -> None:
    real = write(tmp_path / "real", web("cwd: work"))
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "supervisor.yaml"
    link.symlink_to(real)
    manifest = load_manifest(link, {})
    assert manifest.source == real
    assert manifest.instances["web"].cwd == str(tmp_path / "real" / "work")
    assert manifest.state_dir == tmp_path / "real" / ".supervisor"


def test_state_dir_and_control_socket_default_beside_the_manifest(tmp_path: Path) -> None:
    manifest = load(tmp_path / "app", "version: 1\n")
    assert manifest.instances == {}
    assert manifest.state_dir == tmp_path / "app" / ".supervisor"
    assert manifest.control_socket == tmp_path / "app" / ".supervisor" / "control.sock"
    moved = load(tmp_path / "app", "version: 1\nsupervisor: {state_dir: /var/lib/sv}\n")
    assert moved.control_socket == Path("/var/lib/sv/control.sock")


def test_defaults_of_an_instance(tmp_path: Path) -> None:
    manifest = load(tmp_path, web(""))
    config = manifest.instances["web"]
    assert (config.shell, config.cwd, config.env, config.inherit_env, config.replicas) == (
        False,
        None,
        {},
        True,
        1,
    )
    assert (config.autostart, config.user, config.group, config.umask, config.depends_on) == (
        True,
        None,
        None,
        None,
        {},
    )
    restart = config.restart
    assert (restart.policy, restart.success_codes, restart.min_uptime) == ("on-failure", [0], 1.0)
    assert (restart.max_restarts, restart.delay) == (10, 0.0)
    backoff = restart.backoff
    assert (backoff.initial, backoff.factor, backoff.max) == (0.1, 2.0, 30.0)
    assert (config.stop.signal, config.stop.timeout, config.stop.group) == (signal.SIGTERM, 10.0, True)
    logs = config.logs.resolved(manifest.supervisor.logs)
    assert (logs.max_bytes, logs.backups, logs.timestamps) == (50 * 1024**2, 5, False)
    assert manifest.supervisor.shutdown_timeout == 30.0
    assert manifest.supervisor.control.tcp is None


def test_instance_logs_fall_back_to_the_service_settings(tmp_path: Path) -> None:
    manifest = load(
        tmp_path,
        "version: 1\n"
        "supervisor:\n  logs: {max_bytes: 1MB, backups: 2, timestamps: true}\n"
        "instances:\n"
        "  a: {command: x, logs: {backups: 0}}\n"
        "  b: {command: x}\n",
    )
    service = manifest.supervisor.logs
    a = manifest.instances["a"].logs.resolved(service)
    b = manifest.instances["b"].logs.resolved(service)
    assert (a.max_bytes, a.backups, a.timestamps) == (1024**2, 0, True)
    assert (b.max_bytes, b.backups, b.timestamps) == (1024**2, 2, True)


def test_loading_the_same_file_twice_gives_equal_manifests(tmp_path: Path) -> None:
    text = web("stop: {signal: INT}\nstdout: out.log\nreplicas: 2\ndepends_on: [db]") + "  db: {command: x}\n"
    assert load(tmp_path, text) == load(tmp_path, text)
    assert load(tmp_path, text) != load(tmp_path, text.replace("INT", "TERM"))


# -- log files --------------------------------------------------------------------------------------

_SHARED = (
    "would both be logged to {path!r}: give each captured stream its own file (two writers interleave "
    "their lines and rotate the file under each other)"
)


def test_two_instances_logged_to_one_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    found = problems(
        tmp_path,
        "version: 1\n"
        "instances:\n"
        "  a: {command: run, logs: {stdout_file: real/app.log}}\n"
        "  b: {command: run, logs: {stdout_file: link/../link/app.log}}\n"  # the same file, by a symlink
        "  c: {command: run, logs: {stderr_file: real/app.log}}\n",
    )
    shared = _SHARED.format(path=str(tmp_path / "real" / "app.log"))
    assert [(p.path, (p.line, p.column), p.message) for p in found] == [
        ("instances.b.logs.stdout_file", (4, 28), f"a's stdout and b's stdout {shared}"),
        ("instances.c.logs.stderr_file", (5, 28), f"a's stdout and c's stderr {shared}"),
    ]
    # A stream that is not captured has no log file, whatever logs.*_file says; a file: is the program's.
    manifest = load(
        tmp_path,
        "version: 1\n"
        "instances:\n"
        "  a: {command: run, logs: {stdout_file: o.log, stderr_file: e.log}}\n"
        "  b: {command: run, stdout: null, stderr: stdout, logs: {stdout_file: o.log, stderr_file: o.log}}\n"
        "  c: {command: run, stderr: stdout, logs: {stdout_file: c.log, stderr_file: c.log}}\n"
        "  d: {command: run, replicas: 2, logs: {stdout_file: d.log, stderr_file: d.err}}\n"
        "  e: {command: run, stdout: {file: d.log.txt}, stderr: inherit}\n",  # not a log's name
    )
    assert sorted(manifest.instances) == ["a", "b", "c", "d", "e"]


def test_the_stdout_and_stderr_of_one_instance_or_its_replicas_logged_to_one_file_are_refused(
    tmp_path: Path,
) -> None:
    one = only(problems(tmp_path, web("logs: {stdout_file: o.log, stderr_file: ./o.log}")))
    assert (one.path, one.line, one.column) == ("instances.web.logs.stderr_file", 5, 32)
    assert one.message == f"web's stdout and web's stderr {_SHARED.format(path=str(tmp_path / 'o.log'))}"
    # Replicas: said once for the instance, not once for each of them.
    replicas = only(problems(tmp_path, web("replicas: 3\nlogs: {stdout_file: o.log, stderr_file: o.log}")))
    assert replicas.path == "instances.web.logs.stderr_file"
    first = str(tmp_path / "o-0.log")
    assert replicas.message.startswith(f"web-0's stdout and web-0's stderr would both be logged to {first!r}")


def test_a_replicas_file_or_another_instances_default_log_is_refused(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "version: 1\n"
        "instances:\n"
        "  web: {command: run, replicas: 2, logs: {stdout_file: web.log}}\n"
        "  other: {command: run, logs: {stdout_file: web-1.log}}\n"  # what web-1 writes
        "  db: {command: run}\n"
        "  late: {command: run, logs: {stderr_file: .supervisor/logs/db.err.log}}\n",  # db's default
    )
    assert [(p.path, (p.line, p.column), p.message) for p in found] == [
        (
            "instances.other.logs.stdout_file",
            (4, 32),
            f"web-1's stdout and other's stdout {_SHARED.format(path=str(tmp_path / 'web-1.log'))}",
        ),
        (
            "instances.late.logs.stderr_file",
            (6, 31),
            f"db's stderr and late's stderr "
            f"{_SHARED.format(path=str(tmp_path / '.supervisor' / 'logs' / 'db.err.log'))}",
        ),
    ]
    # Said at the file that can change even when the default comes second.
    text = (
        "version: 1\n"
        "instances:\n"
        "  early: {command: run, logs: {stdout_file: .supervisor/logs/db.out.log}}\n"
        "  db: {command: run}\n"
    )
    early = only(problems(tmp_path, text))
    assert (early.path, early.line) == ("instances.early.logs.stdout_file", 3)
    assert early.message.startswith("early's stdout and db's stdout would both be logged to")


def _backup_of(owner: str, stream: str, base: Path, kept: int) -> str:
    name = base.name
    return (
        f"the name of a backup of {owner}'s {stream} log {str(base)!r} (it keeps {kept}: {name}.1 to "
        f"{name}.{kept}): each rotation of that log would move this file away, and in the end delete "
        "it; choose another file"
    )


def test_a_log_file_named_as_another_logs_backup_is_refused(tmp_path: Path) -> None:
    # The rotation of a.out.log renames a.out.log.1 to .2 … and drops the last: b's log with it.
    found = problems(
        tmp_path,
        "version: 1\n"
        "instances:\n"
        "  b: {command: run, logs: {stdout_file: a.out.log.1}}\n"  # before the log it is a backup of
        "  a: {command: run, logs: {stdout_file: a.out.log, backups: 3}}\n"
        "  c: {command: run, logs: {stderr_file: ./a.out.log.3}}\n"
        "  d: {command: run, logs: {stdout_file: .supervisor/logs/db.err.log.5}}\n"  # a default's, 5 kept
        "  db: {command: run}\n"
        "  web: {command: run, replicas: 2, logs: {stdout_file: web.log, max_bytes: 1MB, backups: 2}}\n"
        "  e: {command: run, logs: {stdout_file: web-1.log.2}}\n",  # a replica's
    )
    a, web1 = tmp_path / "a.out.log", tmp_path / "web-1.log"
    db = tmp_path / ".supervisor" / "logs" / "db.err.log"
    assert [(p.path, (p.line, p.column), p.message) for p in found] == [
        (
            "instances.b.logs.stdout_file",
            (3, 28),
            f"b's stdout would be logged to {str(a) + '.1'!r}, {_backup_of('a', 'stdout', a, 3)}",
        ),
        (
            "instances.c.logs.stderr_file",
            (5, 28),
            f"c's stderr would be logged to {str(a) + '.3'!r}, {_backup_of('a', 'stdout', a, 3)}",
        ),
        (
            "instances.d.logs.stdout_file",
            (6, 28),
            f"d's stdout would be logged to {str(db) + '.5'!r}, {_backup_of('db', 'stderr', db, 5)}",
        ),
        (
            "instances.e.logs.stdout_file",
            (9, 28),
            f"e's stdout would be logged to {str(web1) + '.2'!r}, {_backup_of('web-1', 'stdout', web1, 2)}",
        ),
    ]
    # Names no rotation takes: past the backups kept, not a backup's number, a log that keeps none
    # or is not rotated, a stream that is not captured (no log at all).
    manifest = load(
        tmp_path,
        "version: 1\n"
        "instances:\n"
        "  a: {command: run, logs: {stdout_file: a.out.log, backups: 3}}\n"
        "  f: {command: run, logs: {stdout_file: a.out.log.4}}\n"
        "  g: {command: run, logs: {stdout_file: a.out.log.0, stderr_file: a.out.log.01}}\n"
        "  n: {command: run, logs: {stdout_file: n.log, backups: 0}}\n"
        "  m: {command: run, logs: {stdout_file: n.log.1}}\n"
        "  o: {command: run, logs: {stdout_file: o.log, max_bytes: 0}}\n"
        "  p: {command: run, logs: {stdout_file: o.log.1}}\n"
        "  q: {command: run, stdout: null, logs: {stdout_file: q.log}}\n"
        "  r: {command: run, logs: {stdout_file: q.log.1}}\n",
    )
    assert len(manifest.instances) == 9


def test_a_log_or_output_file_that_the_manifest_reads_is_refused(tmp_path: Path) -> None:
    # Output appended to the manifest made the next reload fail on it.
    (tmp_path / "app.env").write_text("A=1\n")
    (tmp_path / "token").write_text("secret\n")
    found = problems(
        tmp_path,
        "version: 1\n"
        "supervisor: {control: {tcp: '127.0.0.1:9001', token_file: token}}\n"
        "instances:\n"
        "  a: {command: run, logs: {stdout_file: supervisor.yaml}}\n"
        "  b: {command: run, env_file: app.env, logs: {stderr_file: ./app.env}}\n"
        "  c: {command: run, stdout: {file: supervisor.yaml, mode: truncate}}\n"
        "  d: {command: run, replicas: 1, logs: {stdout_file: token}}\n",
    )
    manifest, env, token = (str(tmp_path / name) for name in ("supervisor.yaml", "app.env", "token"))
    assert [(p.path, (p.line, p.column), p.message) for p in found] == [
        (
            "instances.a.logs.stdout_file",
            (4, 28),
            f"a's stdout would be logged to {manifest!r}, the manifest itself: choose another file",
        ),
        (
            "instances.b.logs.stderr_file",
            (5, 47),
            f"b's stderr would be logged to {env!r}, the env_file of b, which the manifest reads: "
            "choose another file",
        ),
        ("instances.c.stdout", (6, 21), f"c's stdout would be written to {manifest!r}, the manifest itself"),
        (
            "instances.d.logs.stdout_file",
            (7, 41),
            f"d's stdout would be logged to {token!r}, supervisor.control.token_file, which the service "
            "reads: choose another file",
        ),
    ]


def test_an_output_file_that_is_a_log_file_or_its_backup_is_refused(tmp_path: Path) -> None:
    """The sink rotates its log: a program writing there by ``file:`` interleaved its lines with the
    sink's, and went on into a backup (then into a deleted file) after each rotation."""
    found = problems(
        tmp_path,
        "version: 1\n"
        "instances:\n"
        "  web: {command: run}\n"
        "  a: {command: run, stdout: {file: .supervisor/logs/web.out.log}}\n"  # web's default log
        "  b: {command: run, stderr: {file: ./custom.log.2, mode: truncate}}\n"  # a backup of c's log
        "  c: {command: run, logs: {stdout_file: custom.log, backups: 2}}\n"
        "  d: {command: run, stdout: {file: shared.out}, stderr: {file: shared.out}}\n"  # outputs may share
        "  e: {command: run, stdout: {file: shared.out}}\n"
        "  f: {command: run, stdout: {file: custom.log.3}}\n",  # past the backups kept
    )
    web, custom = tmp_path / ".supervisor" / "logs" / "web.out.log", tmp_path / "custom.log"
    assert [(p.path, (p.line, p.column), p.message) for p in found] == [
        (
            "instances.a.stdout",
            (4, 21),
            f"a's stdout would be written to {str(web)!r}, the log file of web's stdout, which the service "
            "writes and rotates: choose another file, or capture a's stdout (log) to have it logged",
        ),
        (
            "instances.b.stderr",
            (5, 21),
            f"b's stderr would be written to {str(custom) + '.2'!r}, a backup name (it keeps 2) of the log "
            "file of c's stdout, which the service writes and rotates: choose another file, or capture "
            "b's stderr (log) to have it logged",
        ),
    ]


# -- http probe URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:8/a b", "'http://127.0.0.1:8/a b' holds a space, which a request cannot carry: "),
        ("http://127.0.0.1:8/a\tb", "'http://127.0.0.1:8/a\\tb' holds '\\t' (U+0009), which a request"),
        ("http://127.0.0.1:8/?q=\x7f", "holds '\\x7f' (U+007F), which a request cannot carry"),
        ("http://127.0.0.1:8/caf\u00e9", "holds 'é' (U+00E9), which a request cannot carry: percent-encode"),
        ("http://b\u00fccher.example/", "the host holds 'ü' (U+00FC); write it in ASCII, a name with other "
         "letters in its xn-- form (bücher.example is xn--bcher-kva.example)"),
    ],
)
def test_an_http_url_a_request_cannot_carry_is_refused(tmp_path: Path, url: str, message: str) -> None:
    # h11 refuses such a target at the probe ("Illegal target characters"): the loader says so first.
    for key in ("ready", "alive"):
        problem = only(problems(tmp_path, web(f'{key}: {{http: "{url.encode("unicode_escape").decode()}"}}')))
        column = len(f"    {key}: {{http: ") + 1
        assert (problem.path, problem.line, problem.column) == (f"instances.web.{key}.http", 5, column)
        assert message in problem.message, problem.message


def test_an_http_url_on_port_0_is_refused_as_a_tcp_address_is(tmp_path: Path) -> None:
    problem = only(problems(tmp_path, web('alive: {http: "http://127.0.0.1:0/health"}')))
    assert problem.path == "instances.web.alive.http"
    assert problem.message == (
        "'http://127.0.0.1:0/health': port 0 cannot be connected to; give a port from 1 to 65535"
    )
    tcp = only(problems(tmp_path, web('alive: {tcp: "127.0.0.1:0"}')))
    assert tcp.message == "'127.0.0.1:0' is not HOST:PORT, e.g. 127.0.0.1:5432"
    assert web_config(tmp_path, 'alive: {http: "http://127.0.0.1:1/"}').alive is not None


#: Hosts with an xn-- label: some are the punycode of a name, some are not.
_XN_HOSTS = [
    "xn--a.example",  # punycode of U+0080: idna's InvalidCodepoint ended the instance's supervision
    "xn--9.example",  # not punycode at all
    "xn--.example",
    "www.xn--a.example",
    "xn--ls8h.example",  # an emoji: IDNA 2003 allowed it, IDNA 2008 (httpx's idna) does not
    "xn--a-ecp.example",  # a⒈: not a letter
    "xn--bcher-kva.example",  # bücher
    "xn--zca.example",  # ß: the IDNA 2003 'idna' codec refuses it, httpx sends it
    "xn--80ak6aa92e.example",
    "xn--nxasmq6b.example",
]


def test_an_xn_label_loads_exactly_when_httpx_can_send_to_it(tmp_path: Path) -> None:
    import httpx  # what sends an https probe (probes.py); the loader must not import it

    refused = []
    for host in _XN_HOSTS:
        url = f"https://{host}/health"
        try:
            for label in host.split("."):
                httpx.URL(f"https://{label}/").host  # noqa: B018 - decodes an xn-- host, or raises
        except UnicodeError:
            refused.append(host)
            problem = only(problems(tmp_path, web(f"ready: {{http: '{url}'}}")))
            assert problem.path == "instances.web.ready.http"
            label = next(part for part in host.split(".") if part.startswith("xn--"))
            assert problem.message == (
                f"{url!r}: the host's label {label!r} is not the xn-- form of a name (its punycode does "
                "not decode to letters and digits): write the name's own xn-- form"
            )
        else:
            ready = web_config(tmp_path, f"ready: {{http: '{url}'}}").ready
            assert ready is not None and ready.http == url
    assert len(refused) == 6  # a guard on the guard: both kinds are tried


# -- depends_on ---------------------------------------------------------------------------------


def test_depends_on_as_a_list_means_ready(tmp_path: Path) -> None:
    text = web("depends_on: [db, cache]") + "  db: {command: x}\n  cache: {command: x}\n"
    deps = load(tmp_path, text).instances["web"].depends_on
    assert {name: (d.condition, d.restart) for name, d in deps.items()} == {
        "db": ("ready", False),
        "cache": ("ready", False),
    }


def test_depends_on_as_a_mapping_of_conditions(tmp_path: Path) -> None:
    text = (
        web(
            "depends_on: {db: ready, migrate: {condition: completed, restart: true}, seed: running, "
            "log: started, cache: {}}"
        )
        + "  db: {command: x}\n  migrate: {command: x}\n  seed: {command: x}\n  log: {command: x}\n"
        + "  cache: {command: x}\n"
    )
    deps = load(tmp_path, text).instances["web"].depends_on
    assert {name: (d.condition, d.restart) for name, d in deps.items()} == {
        "db": ("ready", False),
        "migrate": ("completed", True),
        "seed": ("running", False),
        "log": ("started", False),
        "cache": ("ready", False),
    }


def test_an_all_digit_name_works_in_the_list_form(tmp_path: Path) -> None:
    text = "version: 1\ninstances:\n  '8080': {command: x}\n  web: {command: x, depends_on: [8080]}\n"
    assert list(load(tmp_path, text).instances["web"].depends_on) == ["8080"]


def test_a_bad_condition_is_refused(tmp_path: Path) -> None:
    problem = only(problems(tmp_path, web("depends_on: {db: healthy}") + "  db: {command: x}\n"))
    assert (problem.path, problem.line, problem.column) == ("instances.web.depends_on.db", 5, 22)
    assert problem.message == "Input should be 'started', 'running', 'ready' or 'completed' (got 'healthy')"


def test_completed_on_an_instance_that_always_restarts_is_refused(tmp_path: Path) -> None:
    text = web("depends_on: {job: completed}") + "  job: {command: x, restart: {policy: always}}\n"
    problem = only(problems(tmp_path, text))
    assert (problem.path, problem.line) == ("instances.web.depends_on.job", 5)
    assert "job has restart.policy always and never completes" in problem.message


def test_unknown_and_self_dependencies(tmp_path: Path) -> None:
    text = (
        "version: 1\n"
        "instances:\n"
        "  web: {command: x, depends_on: [dbb, web]}\n"
        "  api: {command: x, depends_on: {ghost: ready}}\n"
        "  db: {command: x}\n"
    )
    found = problems(tmp_path, text)
    assert [(p.path, p.line, p.column, p.message) for p in found] == [
        ("instances.web.depends_on.0", 3, 34, "unknown instance 'dbb' (did you mean 'db'?)"),
        ("instances.web.depends_on.1", 3, 39, "web cannot depend on itself"),
        ("instances.api.depends_on.ghost", 4, 34, "unknown instance 'ghost'"),
    ]


def test_a_dependency_cycle_is_named_once(tmp_path: Path) -> None:
    text = (
        "version: 1\n"
        "instances:\n"
        "  a: {command: x, depends_on: [b]}\n"
        "  b: {command: x, depends_on: {c: ready}}\n"
        "  c: {command: x, depends_on: [a]}\n"
        "  d: {command: x, depends_on: [a]}\n"
    )
    problem = only(problems(tmp_path, text))
    assert (problem.path, problem.line, problem.column) == ("instances.a.depends_on", 3, 19)
    assert problem.message == "dependency cycle: a -> b -> c -> a"


def test_cross_instance_checks_run_even_when_fields_are_wrong(tmp_path: Path) -> None:
    text = (
        "version: 1\ninstances:\n  a: {command: x, depends_on: [b], replicas: lots}\n  b: {depends_on: [a]}\n"
    )
    messages = [p.message for p in problems(tmp_path, text)]
    assert "dependency cycle: a -> b -> a" in messages
    assert "the key 'command' is required here" in messages
    assert any(m.startswith("Input should be a valid integer") for m in messages)


# -- unknown keys, YAML, the whole report -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "where", "message"),
    [
        ("version: 1\nversoin: 1\n", "versoin", (2, 1), "unknown key 'versoin' (did you mean 'version'?)"),
        (
            "version: 1\nsupervisor:\n  contrl: {}\n",
            "supervisor.contrl",
            (3, 3),
            "unknown key 'contrl' (did you mean 'control'?)",
        ),
        (
            "version: 1\nsupervisor:\n  control: {sokcet: x}\n",
            "supervisor.control.sokcet",
            (3, 13),
            "unknown key 'sokcet' (did you mean 'socket'?)",
        ),
        (
            "version: 1\nsupervisor:\n  logs:\n    max_byte: 1\n",
            "supervisor.logs.max_byte",
            (4, 5),
            "unknown key 'max_byte' (did you mean 'max_bytes'?)",
        ),
        (web("resart: {}"), "instances.web.resart", (5, 5), "unknown key 'resart' (did you mean 'restart'?)"),
        (
            web("restart: {polcy: always}"),
            "instances.web.restart.polcy",
            (5, 15),
            "unknown key 'polcy' (did you mean 'policy'?)",
        ),
        (
            web("restart:\n  backoff: {intial: 1s}"),
            "instances.web.restart.backoff.intial",
            (6, 17),
            "unknown key 'intial' (did you mean 'initial'?)",
        ),
        (
            web("restart: {window: 5m}"),
            "instances.web.restart.window",
            (5, 15),
            "restart.window was removed: max_restarts now counts failed starts in a row,"
            " and a run that came up ends the streak; delete the key",
        ),
        (
            web("restart:\n  backoff: {reset_after: 1m}"),
            "instances.web.restart.backoff.reset_after",
            (6, 17),
            "restart.backoff.reset_after was removed: the back-off now starts over as soon as a run"
            " comes up (reaches running); delete the key",
        ),
        (
            web("stop: {singal: INT}"),
            "instances.web.stop.singal",
            (5, 12),
            "unknown key 'singal' (did you mean 'signal'?)",
        ),
        (
            web("logs: {stdout_fiel: x}"),
            "instances.web.logs.stdout_fiel",
            (5, 12),
            "unknown key 'stdout_fiel' (did you mean 'stdout_file'?)",
        ),
        (
            web("stop: {zzz: 1}"),
            "instances.web.stop.zzz",
            (5, 12),
            "unknown key 'zzz'; valid keys here: group, signal, timeout",
        ),
    ],
)
def test_unknown_keys_are_placed_at_the_key_with_a_suggestion(
    tmp_path: Path, text: str, path: str, where: tuple[int, int], message: str
) -> None:
    problem = only(problems(tmp_path, text))
    assert (problem.path, (problem.line, problem.column), problem.message) == (path, where, message)


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        (
            "version: 1\ninstances:\n  web:\n    command: [a, b\n    replicas: 2\n",
            (5, 13),
            "expected ',' or ']'",
        ),
        (
            "version: 1\ninstances:\n  web:\n    command: a\n   replicas: 2\n",
            (5, 4),
            "(while parsing a block mapping)",
        ),
        ("version: 1\n\tinstances: {}\n", (2, 1), ("found a tab character", "found character '\\t'")),
    ],
)
def test_yaml_syntax_errors_have_line_and_column(
    tmp_path: Path, text: str, where: tuple[int, int], message: str | tuple[str, str]
) -> None:
    # The words are libyaml's, or PyYAML's where it is built without libyaml: a phrase both use,
    # or each one's.
    problem = only(problems(tmp_path, text))
    assert ((problem.line, problem.column), problem.path) == (where, "")
    phrases = (message,) if isinstance(message, str) else message
    assert problem.message.startswith("YAML syntax error: ")
    assert any(phrase in problem.message for phrase in phrases), problem.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the manifest is empty: start with 'version: 1'"),
        ("# only a comment\n", "the manifest is empty: start with 'version: 1'"),
        ("- version: 1\n", "the manifest must be a mapping with 'version' and 'instances'"),
        ("instances: {}\n", "the key 'version' is required here"),
        ("version: 2\n", "Input should be 1 (got 2)"),
        ("version: '1'\n", "Input should be 1 (got '1')"),
        ("version: 1\ninstances: [web]\n", "Input should be a valid dictionary"),
        ("version: 1\ninstances:\n  web: run-web\n", "Input should be a valid dictionary or instance"),
    ],
)
def test_what_is_not_a_manifest(tmp_path: Path, text: str, message: str) -> None:
    assert only(problems(tmp_path, text)).message.startswith(message)


def test_an_unreadable_file_is_one_problem_without_a_place(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ManifestError) as caught:
        load_manifest(missing, {})
    problem = only(caught.value.problems)
    assert (problem.line, problem.column, problem.path) == (None, None, "")
    assert str(problem) == f"{missing}: cannot read: No such file or directory"


def test_every_problem_is_listed_at_once_in_file_order(tmp_path: Path) -> None:
    text = (
        "version: 1\n"  # 1
        "supervisor:\n"  # 2
        "  shutdown_timeout: soon\n"  # 3
        "  control: {tcp: '0.0.0.0:9001', token_file: t}\n"  # 4
        "instances:\n"  # 5
        "  web:\n"  # 6
        "    command: run-web\n"  # 7
        "    resart: {policy: always}\n"  # 8
        "    replicas: many\n"  # 9
        "    env: {A: '${NOPE}'}\n"  # 10
        "  Bad: {command: x}\n"  # 11
        "  db: {command: x, depends_on: [web, ghost], stop: {signal: 0}}\n"  # 12
    )
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, {})
    found = caught.value.problems
    assert [(p.line, p.column, p.path) for p in found] == [
        (3, 21, "supervisor.shutdown_timeout"),
        (4, 18, "supervisor.control.tcp"),
        (8, 5, "instances.web.resart"),
        (9, 15, "instances.web.replicas"),
        (10, 14, "instances.web.env.A"),
        (11, 3, "instances.Bad"),
        (12, 38, "instances.db.depends_on.1"),
        (12, 61, "instances.db.stop.signal"),
    ]
    lines = str(caught.value).splitlines()
    assert lines[0] == "8 problems in the manifest:"
    assert lines[1] == (
        f"  {path}:3:21: supervisor.shutdown_timeout: 'soon' is not a duration: "
        "write it like 250ms, 30s, 2m, 1h or 1h30m"
    )
    assert lines[2] == (
        f"  {path}:4:18: supervisor.control.tcp: 0.0.0.0 is not a loopback address: only 127.0.0.0/8 or ::1"
    )
    assert lines[7] == f"  {path}:12:38: instances.db.depends_on.1: unknown instance 'ghost'"
    assert all(line.startswith(f"  {path}:") for line in lines[1:])
    assert str(found[0]) == lines[1].strip()


def test_one_problem_is_counted_in_the_singular(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 2\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, {})
    assert str(caught.value).splitlines() == [
        "1 problem in the manifest:",
        f"  {path}:1:10: version: Input should be 1 (got 2)",
    ]


# -- the control socket over TCP ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tcp", ["127.0.0.1:9001", "127.1.2.3:80", "localhost:9001", "[::1]:9001", "::1:65535"]
)
def test_control_tcp_on_loopback_with_a_token(tmp_path: Path, tcp: str) -> None:
    manifest = load(tmp_path, f"version: 1\nsupervisor:\n  control: {{tcp: '{tcp}', token_file: tok}}\n")
    assert manifest.supervisor.control.tcp == tcp
    assert manifest.supervisor.control.token_file == str(tmp_path / "tok")


@pytest.mark.parametrize(
    ("tcp", "message"),
    [
        ("0.0.0.0:9001", "0.0.0.0 is not a loopback address: only 127.0.0.0/8 or ::1"),
        ("192.168.1.5:80", "192.168.1.5 is not a loopback address"),
        ("[::]:80", ":: is not a loopback address"),
        ("example.com:80", "'example.com' is not an IP address"),
        ("127.0.0.1", "'127.0.0.1' is not HOST:PORT, e.g. 127.0.0.1:9001"),
        ("127.0.0.1:0", "'127.0.0.1:0' is not HOST:PORT"),
        ("127.0.0.1:65536", "'127.0.0.1:65536' is not HOST:PORT"),
        ("127.0.0.1:http", "'127.0.0.1:http' is not HOST:PORT"),
    ],
)
def test_control_tcp_elsewhere_is_refused(tmp_path: Path, tcp: str, message: str) -> None:
    problem = only(
        problems(tmp_path, f"version: 1\nsupervisor:\n  control: {{tcp: '{tcp}', token_file: tok}}\n")
    )
    assert (problem.path, problem.line, problem.column) == ("supervisor.control.tcp", 3, 18)
    assert problem.message.startswith(message)


def test_control_tcp_needs_a_token_file(tmp_path: Path) -> None:
    problem = only(problems(tmp_path, "version: 1\nsupervisor:\n  control: {tcp: '127.0.0.1:9001'}\n"))
    assert (problem.path, problem.line, problem.column) == ("supervisor.control", 3, 12)
    assert problem.message == "control.tcp needs control.token_file: TCP clients must authenticate"


# -- the reference page -------------------------------------------------------------------------


def _union_members(annotation: Any) -> list[Any]:
    """The types inside ``Annotated``, ``X | None`` and other unions, ``list[X]`` and ``dict[K, X]``."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _union_members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _union_members(a)]
    return [annotation]


def _every_field(model: type[BaseModel], prefix: str) -> Iterator[tuple[type[BaseModel], str, str]]:
    """(model, field name, key path as the reference writes it) for every field below ``model``."""
    for name, field in model.model_fields.items():
        key = field.alias or name  # `as`, a Python keyword, is the field `as_`
        path = f"{prefix}.{key}" if prefix else key
        yield model, name, path
        members = _union_members(field.annotation)
        if len(members) == 1 and typing.get_origin(members[0]) is dict:
            members, path = _union_members(typing.get_args(members[0])[1]), f"{path}.NAME"
        nested = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if len(nested) > 1:  # a tagged union: the stdio streams, documented once for all three
            path = f"{prefix}.STREAM"
        for sub in nested:
            yield from _every_field(sub, path)


ALL_FIELDS = list(_every_field(models.Manifest, ""))


def test_the_walk_sees_every_model() -> None:
    # A guard on the guard: the walk reaches the nested models and the stream kinds.
    seen = {model.__name__ for model, _, _ in ALL_FIELDS}
    assert seen >= {
        "Manifest", "ServiceSettings", "ControlSettings", "LogSettings", "InstanceConfig", "InstanceLogs",
        "RestartPolicy", "Backoff", "StopPolicy", "LogStream", "NullStream", "InheritStream", "FileStream",
        "FifoStream", "StdoutStream",
    }  # fmt: skip
    assert len(ALL_FIELDS) >= 60


def test_every_field_has_a_description() -> None:
    missing = [f"{m.__name__}.{n}" for m, n, _ in ALL_FIELDS if not m.model_fields[n].description]
    assert not missing, f"add description= to these fields in supervisor/config/models.py: {missing}"


def test_every_field_has_a_row_in_the_reference() -> None:
    page = render()
    rows = {
        match.group(1): line for line in page.splitlines() if (match := re.match(r"^\| `([^`]+)` \|", line))
    }
    for model, name, path in ALL_FIELDS:
        assert path in rows, f"{model.__name__}.{name}: no row for `{path}` in the reference"
        description = model.model_fields[name].description or ""
        cells = [line for line in page.splitlines() if line.startswith(f"| `{path}` |")]
        escaped = description.replace("|", "\\|").replace("<", "\\<")
        assert any(escaped in line for line in cells), f"`{path}`: the row lacks the description"


def test_reference_rows_show_types_and_defaults_in_words() -> None:
    page = render()
    for row in [
        "| `instances.NAME.restart.policy` | one of `no`, `on-failure`, `always` | `on-failure` |",
        "| `instances.NAME.restart.backoff.initial` | duration | `100ms` |",
        "| `supervisor.logs.max_bytes` | size | `50MB` |",
        "| `instances.NAME.stop.signal` | signal | `TERM` |",
        "| `instances.NAME.command` | string or list of strings | required |",
        "| `instances.NAME.restart.success_codes` | list of integers | `[0]` |",
        "| `instances.NAME.replicas` | integer ≥ 0 | `1` |",
        "| `instances.NAME.stdin` | stream: `null`, `inherit`, `file`, `fifo` | `null` |",
        "| `instances.NAME.stderr` | stream: `log`, `null`, `inherit`, `file`, `fifo`, `stdout` | `log` |",
        "| `supervisor.state_dir` | path | `.supervisor` |",
        "| `instances.NAME.cwd` | path | unset |",
        "| `version` | `1` | required |",
    ]:
        assert row in page, row


def test_the_shipped_reference_is_current() -> None:
    shipped = (ROOT / "docs" / "manifest.md").read_text()
    assert shipped == render(), (
        "docs/manifest.md is stale: run python -m supervisor.config.reference > docs/manifest.md"
    )


def test_the_reference_module_prints_the_page() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.config.reference"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == render()
