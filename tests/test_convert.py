"""Import: supervisord configs, Procfiles and process-compose files become manifests that validate and run."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.config import load_manifest
from supervisor.convert import ConvertError
from supervisor.convert.importer import detect_format, import_file
from supervisor.convert.writer import validated

from .service_fixture import ServiceProcess

DATA = Path(__file__).parent / "data" / "convert"
ROOT = Path(__file__).parent.parent
WHEEL = ROOT / ".cache" / "supervisor-4.2.5-py2.py3-none-any.whl"


def convert(source: Path, output: Path, fmt: str | None = None) -> tuple[str, list[str]]:
    result = import_file(source, output, fmt)
    output.write_text(result.text)
    load_manifest(output, environ={"WEB_PORT": "8000"})  # what `supervisor validate` does
    return result.text, [str(n) for n in result.notes]


@pytest.fixture(scope="session")
def sample_conf() -> str:
    """supervisord's own sample.conf, read out of its wheel (fetched by `make test`, never installed)."""
    if not WHEEL.exists():
        download = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "supervisor==4.2.5",
            "-d",
            str(WHEEL.parent),
        ]
        subprocess.run(download, capture_output=True, timeout=120, check=False)
    if not WHEEL.exists():
        pytest.skip(f"supervisord's wheel could not be had ({WHEEL}): no sample.conf to read")
    with zipfile.ZipFile(WHEEL) as wheel:
        return wheel.read("supervisor/skel/sample.conf").decode()


def test_sample_conf_as_shipped(sample_conf: str, tmp_path: Path) -> None:
    """Every program in the sample is commented out: a manifest of no instances is an error, not a file."""
    (tmp_path / "supervisord.conf").write_text(sample_conf)
    with pytest.raises(ConvertError) as caught:
        import_file(tmp_path / "supervisord.conf", tmp_path / "supervisor.yaml")
    conf = tmp_path / "supervisord.conf"
    assert str(caught.value).startswith(f"{conf}: nothing to convert: no [program:x] section; ")
    assert f" notes, the first: {conf}:" in str(caught.value)  # notes are not printed: the first is said
    cli = subprocess.run(
        [sys.executable, "-m", "supervisor", "import", str(tmp_path / "supervisord.conf")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 1 and not cli.stdout and "nothing to convert" in cli.stderr


def test_sample_conf_program_uncommented(sample_conf: str, tmp_path: Path) -> None:
    """The sample's commented [program:x], with every key it documents, switched on."""
    lines = sample_conf.splitlines()
    start = lines.index(";[program:theprogramname]")
    end = lines.index("", start)
    program = [line.removeprefix(";") for line in lines[start:end]]
    (tmp_path / "supervisord.conf").write_text("\n".join([*lines, *program, ""]))
    _, notes = convert(tmp_path / "supervisord.conf", tmp_path / "supervisor.yaml")
    dropped = {n.split(": ")[1] for n in notes}
    assert {"[supervisord]", "[unix_http_server]", "[supervisorctl]", "[rpcinterface:supervisor]"} <= dropped
    assert all(n.startswith(f"{tmp_path / 'supervisord.conf'}:") for n in notes)
    config = load_manifest(tmp_path / "supervisor.yaml").instances["theprogramname"]
    assert config.command == "/bin/cat"
    assert (config.cwd, config.umask, config.user) == ("/tmp", 0o22, "chrism")
    assert config.stop.signal == 3 and config.stop.timeout == 10 and config.stop.group is False
    assert config.stderr.kind == "stdout" and config.logs.stdout_file == "/a/path"
    assert (config.logs.max_bytes, config.logs.backups) == (1024**2, 10)
    assert config.restart.policy == "on-failure" and config.restart.success_codes == [0]
    assert config.env == {"A": "1", "B": "2"}
    for key in (
        "stdout_events_enabled",
        "stdout_syslog",
        "serverurl",
        "stdout_capture_maxbytes",
    ):
        line = next(i for i, text in enumerate(program) if text.startswith(key)) + len(lines) + 1
        assert any(n.startswith(f"{tmp_path / 'supervisord.conf'}:{line}: {key}:") for n in notes), key


def test_supervisord_doc_shapes(tmp_path: Path) -> None:
    text, notes = convert(DATA / "supervisord" / "supervisord.conf", tmp_path / "supervisor.yaml")
    manifest = load_manifest(tmp_path / "supervisor.yaml", environ={"WEB_PORT": "8000"})
    web = manifest.instances["web"]
    assert "${WEB_PORT}" in text and web.command == "python3 -m http.server 8000 --bind 127.0.0.1"
    assert web.cwd == str(DATA / "supervisord")  # %(here)s
    # [supervisord] environment= reaches every program; the program's own wins
    assert web.env == {"TZ": "UTC", "GREETING": "hello, world", "MODE": "prod", "EMPTY": ""}
    assert manifest.instances["cron"].env == {"TZ": "UTC", "MODE": "dev"}
    assert web.restart.policy == "always" and web.restart.min_uptime == 2
    assert web.stop.signal == 2 and web.stop.group is True
    # numprocs with %(process_num)s only in the name: replicas; in the command too: one instance each
    assert manifest.instances["worker"].replicas == 3 and "worker_00" in text
    assert manifest.instances["shard-1"].command == "/bin/echo shard 1 of 2"
    assert manifest.instances["shard-2"].autostart is False
    # priority 5 < 10 < 20 < 999 (the included cron), as depends_on with condition started
    assert manifest.instances["web"].depends_on["migrate"].condition == "started"
    assert list(manifest.instances["worker"].depends_on) == ["web"]
    assert list(manifest.instances["cron"].depends_on) == ["worker"]
    assert manifest.instances["cron"].user == "nobody"  # from conf.d/cron.conf, an [include]
    migrate = manifest.instances["migrate"]
    assert migrate.restart.policy == "no" and migrate.restart.success_codes == [0, 2]
    assert migrate.stdout.kind == "null" and migrate.stderr.kind == "log"
    cron = str(DATA / "supervisord" / "conf.d" / "cron.conf")
    assert f"{cron}:5: stdout_syslog: dropped" in "\n".join(notes)
    assert any(":50: [group:backend]: dropped" in n for n in notes)


def test_procfile_as_foreman(tmp_path: Path) -> None:
    for name in ("Procfile", ".env"):
        shutil.copy(DATA / "procfile" / name, tmp_path / name)
    text, notes = convert(tmp_path / "Procfile", tmp_path / "supervisor.yaml")
    assert "cwd: ." in text and "env_file: .env" in text  # beside the manifest: relative
    manifest = load_manifest(tmp_path / "supervisor.yaml")
    assert list(manifest.instances) == ["web", "worker", "release_task"]
    ports = [c.env["PORT"] for c in manifest.instances.values()]
    assert ports == ["6100", "6200", "6300"]  # PORT from .env, + 100 a line
    worker = manifest.instances["worker"]
    assert worker.shell and worker.env_file == str(tmp_path / ".env") and worker.cwd == str(tmp_path)
    assert worker.environment({})["GREETING"] == "hi there"
    assert '"worker on $$PORT with $$GREETING"' in text  # the shell expands them, not the loader
    assert any(":5: this line is not a process" in n for n in notes)


def test_process_compose(tmp_path: Path) -> None:
    _, notes = convert(DATA / "process-compose" / "process-compose.yaml", tmp_path / "supervisor.yaml")
    manifest = load_manifest(tmp_path / "supervisor.yaml")
    db, api, migrate = (manifest.instances[n] for n in ("db", "api", "migrate"))
    assert db.ready is not None and db.ready.http == "http://127.0.0.1:18754/" and db.ready.interval == 2
    assert db.stop.signal == 2 and db.stop.timeout == 4 and db.cwd == "/tmp"
    assert migrate.depends_on["db"].condition == "ready"
    assert {k: v.condition for k, v in api.depends_on.items()} == {"migrate": "completed", "db": "started"}
    assert api.replicas == 2 and api.restart.max_restarts == 5 and api.restart.backoff.initial == 2
    assert api.alive is not None and api.alive.argv == ["/bin/sh", "-c", "test -d /tmp"]
    assert api.stderr.kind == "stdout" and api.env["GLOBAL"] == "yes"
    assert manifest.instances["legacy-daemon"].autostart is False
    joined = "\n".join(notes)
    for key in ("shutdown.command", "is_daemon", "namespace", "log_level", "failure_threshold"):
        assert f": {key}: " in joined, key


def test_process_compose_variables(tmp_path: Path) -> None:
    """$VAR and ${VAR} are read at load time: from the .env beside the file now, else by the loader."""
    (tmp_path / ".env").write_text("VERSION=1.2.3\n")
    (tmp_path / "process-compose.yaml").write_text(
        "processes:\n"
        "  dl:\n"
        '    command: "echo ${VERSION} $HOME_DIR_X $$literal cost 5$"\n'
        "    environment: ['REPLICA=$PC_REPLICA_NUM']\n"
    )
    text, _ = convert(tmp_path / "process-compose.yaml", tmp_path / "supervisor.yaml")
    assert "echo 1.2.3 ${HOME_DIR_X-} $$literal cost 5$$" in text
    dl = load_manifest(tmp_path / "supervisor.yaml", environ={"HOME_DIR_X": "/h"}).instances["dl"]
    assert dl.command == "echo 1.2.3 /h $literal cost 5$" and dl.env_file == str(tmp_path / ".env")
    assert dl.env["REPLICA"] == "0"  # one replica: number 0, filled in


def test_process_compose_block_command(tmp_path: Path) -> None:
    """A multi-line command (a YAML block scalar) comes through whole."""
    (tmp_path / "process-compose.yaml").write_text(
        "processes:\n  job:\n    command: |\n      echo 'one'\n      echo \"two\" 100%\n"
    )
    text, _ = convert(tmp_path / "process-compose.yaml", tmp_path / "supervisor.yaml")
    assert 'command: "echo \'one\'\\necho \\"two\\" 100%\\n"' in text
    job = load_manifest(tmp_path / "supervisor.yaml").instances["job"]
    assert job.command == "echo 'one'\necho \"two\" 100%\n" and job.shell


def test_process_compose_replica_number_splits(tmp_path: Path) -> None:
    """A replica number in a key makes one instance per replica, named as replicas would be."""
    (tmp_path / "process-compose.yaml").write_text(
        "processes:\n"
        "  server:\n"
        "    command: python3 -m http.server 404{{.PC_REPLICA_NUM}}\n"
        "    replicas: 2\n"
        "    readiness_probe:\n"
        "      http_get: {host: 127.0.0.1, port: '404{{.PC_REPLICA_NUM}}', scheme: http}\n"
        "  client:\n"
        "    command: 'curl 127.0.0.1:4040'\n"
        "    depends_on: {server: {condition: process_healthy}}\n"
    )
    _, notes = convert(tmp_path / "process-compose.yaml", tmp_path / "supervisor.yaml")
    manifest = load_manifest(tmp_path / "supervisor.yaml")
    servers = [manifest.instances[f"server-{i}"] for i in (0, 1)]
    assert [s.command for s in servers] == [f"python3 -m http.server 404{i}" for i in (0, 1)]
    assert [s.ready.http for s in servers if s.ready] == [f"http://127.0.0.1:404{i}/" for i in (0, 1)]
    assert [s.env["PC_REPLICA_NUM"] for s in servers] == ["0", "1"]
    assert dict.fromkeys(manifest.instances["client"].depends_on) == {"server-0": None, "server-1": None}
    assert any(":4: replicas: approximated: 2 instances server-0 … server-1" in n for n in notes)


def test_detect_format() -> None:
    assert detect_format(Path("Procfile.dev"), "") == "procfile"
    assert detect_format(Path("x"), "[program:a]\ncommand=b\n") == "supervisord"
    assert detect_format(Path("pc.yml"), "version: '0.5'\nprocesses:\n  a: {}\n") == "process-compose"
    with pytest.raises(ConvertError, match="--format"):
        detect_format(Path("x"), "   \n")


def test_docker_compose_is_named(tmp_path: Path) -> None:
    """`services:` is docker compose's: refused as such, not read as a Procfile with no lines."""
    compose = 'version: "3.8"\nservices:\n  web:\n    image: nginx\n'
    with pytest.raises(ConvertError, match=r"^x:2: a docker compose file"):
        detect_format(Path("x"), compose)
    # a key alone on its line is not a `name: command` line: the command is not on the next line
    with pytest.raises(ConvertError, match="cannot tell the format"):
        detect_format(Path("x"), "web:\n  image: nginx\n")
    assert detect_format(Path("x"), "services: ./run-services\n") == "procfile"  # a process type
    for name in ("docker-compose.yml", "process-compose.yml"):  # by content, and by a misleading name
        (tmp_path / name).write_text(compose)
        cli = subprocess.run(
            [sys.executable, "-m", "supervisor", "import", str(tmp_path / name)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 1 and not cli.stdout, cli.stdout
        assert f"{tmp_path / name}:2: a docker compose file (top-level services:)" in cli.stderr
        for readable in ("process-compose (processes:)", "a Procfile", "supervisord.conf"):
            assert readable in cli.stderr


@pytest.mark.parametrize(
    ("name", "content", "wanted"),
    [
        ("Procfile", "# nothing yet\n\n", "no `name: command` line"),
        ("Procfile", "  web: indented\n", "no `name: command` line"),
        ("process-compose.yaml", "processes: {}\n", "no process under processes:"),
        ("a.conf", "[supervisord]\nlogfile=/tmp/x\n", "no [program:x] section"),
    ],
)
def test_nothing_to_convert(tmp_path: Path, name: str, content: str, wanted: str) -> None:
    """A manifest of no instances runs nothing: an error, and no file, rather than a silent success."""
    (tmp_path / name).write_text(content)
    with pytest.raises(ConvertError, match=f"^{re.escape(str(tmp_path / name))}: nothing to convert: "):
        import_file(tmp_path / name, tmp_path / "supervisor.yaml")
    out = tmp_path / "out.yaml"
    cli = subprocess.run(
        [sys.executable, "-m", "supervisor", "import", str(tmp_path / name), "-o", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 1 and wanted in cli.stderr and not out.exists()


def test_process_compose_ipv6_probe(tmp_path: Path) -> None:
    """An IPv6 host is bracketed in the URL, as a URL needs it; a bracketed one is kept."""
    (tmp_path / "process-compose.yaml").write_text(
        "processes:\n"
        "  a:\n    command: x\n    readiness_probe: {http_get: {host: '::1', port: 8080}}\n"
        "  b:\n    command: x\n    liveness_probe: {http_get: {host: '[2001:db8::5]', port: 80, path: /h}}\n"
    )
    convert(tmp_path / "process-compose.yaml", tmp_path / "supervisor.yaml")
    manifest = load_manifest(tmp_path / "supervisor.yaml")
    a, b = manifest.instances["a"], manifest.instances["b"]
    assert a.ready is not None and a.ready.http == "http://[::1]:8080/"
    assert b.alive is not None and b.alive.http == "http://[2001:db8::5]:80/h"


def test_unplaced_problem_names_the_converted_manifest(tmp_path: Path) -> None:
    """Without a source place, a problem's line is said to be the converted manifest's, not the source's."""
    text = "version: 1\ninstances:\n  a:\n    command: ''\n"
    with pytest.raises(ConvertError) as caught:
        validated(text, tmp_path / "supervisor.yaml", "Procfile")
    assert str(caught.value) == (
        "Procfile: the converted manifest does not validate: "
        "instances.a.command: the command is empty (in the converted manifest, line 4)"
    )


def test_imported_procfile_runs(tmp_path: Path, service: Callable[..., ServiceProcess]) -> None:
    (tmp_path / "Procfile").write_text('web: echo "web on $PORT"; exec tail -f /dev/null\n')
    (tmp_path / ".env").write_text("PORT=7100\n")
    convert(tmp_path / "Procfile", tmp_path / "supervisor.yaml")
    running = service(tmp_path / "supervisor.yaml")
    running.wait_for(["web"], "running")
    running.wait_output("web", b"web on 7100")


def test_imported_supervisord_runs(tmp_path: Path, service: Callable[..., ServiceProcess]) -> None:
    (tmp_path / "supervisord.conf").write_text(
        "[program:echo]\n"
        "command=/bin/sh -c 'echo from %(program_name)s in %(here)s; exec tail -f /dev/null'\n"
        "numprocs=2\nprocess_name=%(program_name)s_%(process_num)d\nstartsecs=0\n"
    )
    convert(tmp_path / "supervisord.conf", tmp_path / "supervisor.yaml")
    running = service(tmp_path / "supervisor.yaml")
    running.wait_for(["echo-0", "echo-1"], "running")
    running.wait_output("echo-1", f"from echo in {tmp_path}".encode())


def test_imported_process_compose_runs(tmp_path: Path, service: Callable[..., ServiceProcess]) -> None:
    (tmp_path / "process-compose.yaml").write_text(
        "environment: ['GREETING=hello']\n"
        "processes:\n"
        "  hello:\n"
        '    command: echo "$$GREETING from $$PWD"; exec tail -f /dev/null\n'
        f"    working_dir: {tmp_path}\n"
        "    availability: {restart: always}\n"
        "    shutdown: {signal: 15, timeout_seconds: 3}\n"
    )
    convert(tmp_path / "process-compose.yaml", tmp_path / "supervisor.yaml")
    running = service(tmp_path / "supervisor.yaml")
    running.wait_for(["hello"], "running")
    running.wait_output("hello", f"hello from {tmp_path}".encode())


def test_imported_process_compose_graph_runs(tmp_path: Path, service: Callable[..., ServiceProcess]) -> None:
    """process_healthy and process_completed_successfully keep their order under the real service."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "process-compose.yaml").write_text(
        "processes:\n"
        "  db:\n"
        f"    command: python3 -m http.server {port} --bind 127.0.0.1\n"
        f"    readiness_probe: {{http_get: {{host: 127.0.0.1, port: {port}, path: /}}, period_seconds: 1}}\n"
        "  migrate:\n"
        f"    command: python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/')\""
        " && echo migrated\n"
        "    availability: {restart: 'no'}\n"
        "    depends_on: {db: {condition: process_healthy}}\n"
        "  api:\n"
        "    command: echo api up; exec tail -f /dev/null\n"
        "    depends_on: {migrate: {condition: process_completed_successfully}}\n"
    )
    convert(tmp_path / "process-compose.yaml", tmp_path / "supervisor.yaml")
    running = service(tmp_path / "supervisor.yaml")
    running.wait_for(["api"], "running", timeout=60)
    assert running.status("migrate")["migrate"]["state"] == "exited"
    running.wait_output("migrate", b"migrated")
    running.wait_output("api", b"api up")


# -- hostile input: a clear error with file:line, never a traceback --------------------------------


@pytest.mark.parametrize(
    ("name", "content", "where", "message"),
    [
        ("a.conf", "[program:a]\ncommand=x\nnumprocs=100000000\n", ":3", "numprocs"),
        ("a.conf", "[program:a]\ncommand=x\nnumprocs=" + "9" * 5000 + "\n", ":3", "numprocs"),
        ("a.conf", b"[program:a]\ncommand=x\x00y\n", ":2", "NUL"),
        ("a.conf", b"[program:a]\ncommand=caf\xe9\n", ":2", "not UTF-8"),
        ("a.conf", "[program:a]\ncommand=x %(nope)s\n", ":2", "nope"),
        ("a.conf", "[program:a]\ncommand=x 100%\n", ":2", "a literal % is %%"),
        ("a.conf", "[program:a]\ncommand=x\nenvironment=A=1,B\n", ":3", "environment"),
        ("a.conf", "[program:a]\ncommand=x\nstopsignal=NOPE\n", ":3", "stopsignal"),
        ("a.conf", "[program:a]\ncommand=x\nautorestart=sometimes\n", ":3", "autorestart"),
        ("a.conf", "[program:a]\nnumprocs=2\ncommand=x\n", ":2", "process_num"),
        ("a.conf", "command=x\n", ":1", "before any [section]"),
        ("a.conf", "[program:a]\ncommand='x\n", ":2", "cannot split"),
        ("a.conf", "[include]\nfiles=*.conf\n", ":2", "include loop"),
        ("Procfile", "web: a\nworker: b\nweb: c\n", ":3", "given twice (first on line 1)"),
        ("Procfile", "WEB: a\nweb: b\n", ":2", "'web' and 'WEB' (line 1) both become the instance 'web'"),
        # found only when the converted manifest is loaded: reported at the source line it came from
        ("Procfile", "web: \n", ":1", "web.command: the command is empty"),
        ("Procfile", "# jobs\n\nweb: run\nworker: echo 'x\n", ":4", "worker.command: cannot split"),
        ("a.conf", "[program:a]\ncommand=x\nstopwaitsecs=999999999\n", ":3", "a.stop.timeout: "),
        (
            "process-compose.yaml",
            "processes:\n  a:\n    command: x\n    depends_on: {a: {}}\n",
            ":4",
            "a.depends_on.a: a cannot depend on itself",
        ),
        (
            "process-compose.yaml",
            'processes:\n  a:\n    command: x\n    working_dir: "\\0"\n',
            ":4",
            "a.cwd: a NUL character",
        ),
        ("process-compose.yaml", "processes:\n  a: {command: x\n", ":3", "YAML"),
        (
            "process-compose.yaml",
            "processes:\n  a:\n    command: x\n    replicas: 1000000\n",
            ":4",
            "replicas",
        ),
        (
            "process-compose.yaml",
            "processes:\n  a:\n    command: x\n    depends_on: {b: {}}\n",
            ":4",
            "no process",
        ),
    ],
)
def test_hostile_input(tmp_path: Path, name: str, content: str | bytes, where: str, message: str) -> None:
    source = tmp_path / name
    if isinstance(content, bytes):
        source.write_bytes(content)
    else:
        source.write_text(content)
    with pytest.raises(ConvertError) as caught:
        import_file(source, tmp_path / "supervisor.yaml")
    assert str(caught.value).startswith(f"{source}{where}: "), caught.value
    assert message in str(caught.value)
    cli = subprocess.run(
        [sys.executable, "-m", "supervisor", "import", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1 and "Traceback" not in cli.stderr and f"{source}{where}: " in cli.stderr


def test_not_a_config_file(tmp_path: Path) -> None:
    """A fifo (never written to), a folder and a file of 5 MB are refused at once, by name."""
    os.mkfifo(tmp_path / "Procfile")
    (tmp_path / "folder.conf").mkdir()
    (tmp_path / "big.conf").write_bytes(b"; padding\n" * 500_000)
    for name, message in (("Procfile", "not a regular file"), ("folder.conf", "not a regular file"),
                          ("big.conf", "is not a config"), ("missing.conf", "cannot read")):  # fmt: skip
        with pytest.raises(ConvertError, match=message) as caught:
            import_file(tmp_path / name, tmp_path / "supervisor.yaml")
        assert str(caught.value).startswith(f"{tmp_path / name}: ")


def test_include_loop_through_an_included_file(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "main.conf").write_text("[include]\nfiles = conf.d/*.conf\n")
    (tmp_path / "conf.d" / "b.conf").write_text("[program:b]\ncommand=x\n\n[include]\nfiles = ../main.conf\n")
    with pytest.raises(ConvertError, match=r"b\.conf:5: include loop"):
        import_file(tmp_path / "main.conf", tmp_path / "supervisor.yaml")


def test_import_cli_writes_and_keeps(tmp_path: Path) -> None:
    out = tmp_path / "supervisor.yaml"
    args = [
        sys.executable,
        "-m",
        "supervisor",
        "import",
        str(DATA / "process-compose" / "process-compose.yaml"),
    ]
    first = subprocess.run([*args, "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "note: " in first.stderr and "is_daemon" in first.stderr
    assert (
        subprocess.run(
            [sys.executable, "-m", "supervisor", "validate", "-f", str(out)], timeout=60
        ).returncode
        == 0
    )
    again = subprocess.run([*args, "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "--force" in again.stderr


def test_status_does_not_import_convert() -> None:
    probe = "import sys, supervisor.cli as c; c.build_parser(); print('supervisor.convert' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "False"
    )
