"""Export: systemd units that `systemd-analyze verify` accepts, Kubernetes objects valid against the
schemas of a pinned version, and round trips that keep what the notes do not say was lost."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from supervisor.config import load_manifest, parse_manifest
from supervisor.convert import ConvertError, kubernetes, read_source, systemd
from supervisor.convert.importer import import_file

DATA = Path(__file__).parent / "data" / "convert"
KUBERNETES = "1.30.0"


def local_systemd() -> int:
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[1])


def verify(folder: Path) -> None:
    """`systemd-analyze verify` on every unit: it must print nothing and succeed."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: `make test` installs Debian's systemd package")
    units = sorted(str(p) for p in folder.iterdir())
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and not done.stdout and not done.stderr, done.stdout + done.stderr


def write(files: dict[str, str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def unit_values(text: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", text, re.MULTILINE)


def test_systemd_units_verify(tmp_path: Path) -> None:
    source = DATA / "export.yaml"
    result = systemd.export(read_source(source), source, name="shop", version=local_systemd())
    verify(write(result.files, tmp_path / "units"))
    files = result.files
    assert set(files) == {
        "shop-db.service", "shop-migrate.service", "shop-api@.service", "shop-tail.service",
        "shop-check.service", "shop.target",
    }  # fmt: skip
    db, api, migrate = files["shop-db.service"], files["shop-api@.service"], files["shop-migrate.service"]
    assert unit_values(db, "Environment") == ['"GREETING=hello \\"world\\" 100%% $HOME"']
    assert unit_values(db, "ExecStart") == ["python3 -m http.server 18755 --bind 127.0.0.1"]
    assert unit_values(db, "KillSignal") == ["SIGINT"] and unit_values(db, "TimeoutStopSec") == ["7s"]
    assert unit_values(db, "UMask") == ["0027"] and unit_values(db, "User") == ["root"]
    # 6 failed starts in a row here take 6 × min_uptime (1s) + 1 + 2 + 4 + 8 + 16 s of back-off
    assert unit_values(db, "StartLimitBurst") == ["6"] and unit_values(db, "StartLimitIntervalSec") == ["37s"]
    assert unit_values(migrate, "Type") == ["oneshot"] and unit_values(migrate, "SuccessExitStatus") == ["3"]
    assert unit_values(api, "Type") == ["notify"] and unit_values(api, "WatchdogSec") == ["30s"]
    assert unit_values(api, "BindsTo") == ["shop-db.service"]
    assert unit_values(api, "StandardOutput") == ["truncate:/tmp/api.out"]
    assert unit_values(api, "StandardError") == ["inherit"]
    assert "shop-api@0.service shop-api@1.service" in unit_values(files["shop-check.service"], "After")[0]
    assert "shop-tail" not in files["shop.target"]  # autostart: false
    assert unit_values(files["shop-tail.service"], "KillMode") == ["process"]
    assert unit_values(files["shop-check.service"], "ExecStartPost")[0].startswith(
        '/bin/sh -c "until test -d /tmp;'
    )
    notes = "\n".join(map(str, result.notes))
    for dropped in (
        "tail.stdin: dropped",
        "tail.ready: dropped",
        "api.alive: dropped",
        "tail.logs.max_bytes: dropped",
    ):
        assert dropped in notes
    assert "export.yaml:33: tail.stop.group: approximated" in notes
    check = files["shop-check.service"]
    assert unit_values(check, "MemoryMax") == [str(256 << 20)] and unit_values(check, "CPUQuota") == ["50%"]


def test_systemd_backoff_steps_by_version() -> None:
    source = DATA / "export.yaml"
    new = systemd.export(read_source(source), source, name="shop", version=254).files["shop-db.service"]
    assert unit_values(new, "RestartSteps") == ["5"] and unit_values(new, "RestartMaxDelaySec") == ["30s"]
    old = systemd.export(read_source(source), source, name="shop", version=252)
    assert "RestartSteps" not in old.files["shop-db.service"]
    assert any("no RestartSteps" in str(n) for n in old.notes)


def test_kubernetes_objects_validate() -> None:
    source = DATA / "export.yaml"
    result = kubernetes.export(read_source(source), source, name="shop", image="registry.local/shop:1.0")
    objects = {
        (doc["kind"], doc["metadata"]["name"]): doc
        for text in result.files.values()
        for doc in yaml.safe_load_all(text)
    }
    for doc in objects.values():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert set(objects) == {
        ("Deployment", "db"), ("Service", "db"), ("Job", "migrate"), ("Deployment", "api"),
        ("Deployment", "tail"), ("Deployment", "check"), ("Service", "api"),
    }  # fmt: skip
    db = objects[("Deployment", "db")]["spec"]["template"]["spec"]
    assert db["terminationGracePeriodSeconds"] == 7
    assert db["containers"][0]["readinessProbe"]["tcpSocket"] == {"port": 18755}
    assert db["containers"][0]["command"] == ["python3"] and db["containers"][0]["workingDir"] == "/tmp"
    migrate = objects[("Job", "migrate")]["spec"]
    assert migrate["template"]["spec"]["restartPolicy"] == "OnFailure"
    wait = migrate["template"]["spec"]["initContainers"][0]
    assert "nc -z -w 2 db 18755" in wait["command"][2]
    api = objects[("Deployment", "api")]
    assert api["spec"]["replicas"] == 2
    assert api["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/health"
    assert objects[("Deployment", "tail")]["spec"]["replicas"] == 0
    check = objects[("Deployment", "check")]["spec"]["template"]["spec"]["containers"][0]
    assert check["resources"] == {"limits": {"cpu": "500m", "memory": str(256 << 20)}}
    notes = "\n".join(map(str, result.notes))
    for text in (
        "api.ready: dropped",
        "tail.ready: dropped",
        "depends_on.migrate: dropped",
        "db.umask: dropped",
    ):
        assert text in notes


def test_kubernetes_needs_an_image(tmp_path: Path) -> None:
    source = DATA / "export.yaml"
    with pytest.raises(ConvertError, match="--image"):
        kubernetes.export(read_source(source), source, name="shop", image=" ")
    cli = subprocess.run(
        [sys.executable, "-m", "supervisor", "export", "kubernetes", "-f", str(source), "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 1 and "--image" in cli.stderr and "Traceback" not in cli.stderr


def test_export_of_a_bad_manifest_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "supervisor.yaml"
    bad.write_text("version: 1\ninstances:\n  a:\n    command: x\n    stop: {signal: NOPE}\n")
    with pytest.raises(ConvertError, match=r"supervisor\.yaml:5"):
        systemd.export(bad.read_text(), bad, name="x")


def test_systemd_refuses_more_than_ten_thousand_units(tmp_path: Path) -> None:
    # The loader takes at most 10000 replicas of one instance; two of them make too many units.
    huge = tmp_path / "supervisor.yaml"
    huge.write_text(
        "version: 1\ninstances:\n  a:\n    command: x\n    replicas: 6000\n"
        "  b:\n    command: x\n    replicas: 5000\n"
    )
    with pytest.raises(ConvertError, match=r"supervisor\.yaml:5: 11000 units"):
        systemd.export(huge.read_text(), huge, name="x")
    k8s = kubernetes.export(huge.read_text(), huge, name="x", image="i")  # just a number there
    assert "replicas: 6000" in k8s.files["a.yaml"]


def test_systemd_awkward_values(tmp_path: Path) -> None:
    """Line breaks, quotes, % and $ survive into a unit that verifies; a relative program becomes absolute."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "app").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "app").chmod(0o755)
    manifest = tmp_path / "supervisor.yaml"
    manifest.write_text(
        "version: 1\ninstances:\n  app:\n"
        "    command: ['bin/app', \"two\\nlines\", '50% of $$HOME']\n"
        '    env: {NOTE: "say \\"hi\\"\\n100%"}\n'
    )
    result = systemd.export(manifest.read_text(), manifest, name="odd", version=local_systemd())
    verify(write(result.files, tmp_path / "units"))
    unit = result.files["odd-app.service"]
    assert unit_values(unit, "ExecStart") == [f'{tmp_path}/bin/app "two\\nlines" "50%% of $$HOME"']
    assert unit_values(unit, "Environment") == ['"NOTE=say \\"hi\\"\\n100%%"']
    assert any("app.command: approximated" in str(n) for n in result.notes)
    manifest.write_text('version: 1\ninstances:\n  app:\n    command: x\n    cwd: "/tmp/a\\nb"\n')
    with pytest.raises(ConvertError, match=r"supervisor\.yaml:3: app: .* line break"):
        systemd.export(manifest.read_text(), manifest, name="odd")


def test_systemd_zero_timeouts(tmp_path: Path) -> None:
    """A 0 here is no wait; systemd reads 0 as no limit at all: the unit gets 1ms, and a note says so."""
    manifest = tmp_path / "supervisor.yaml"
    manifest.write_text(
        "version: 1\ninstances:\n"
        "  quick:\n    command: sleep 1\n    stop: {timeout: 0}\n"
        "  notified:\n    command: sleep 1\n    ready: {notify: true, start_timeout: 0}\n"
        "    watchdog: 0.4ms\n"
        "  polled:\n    command: sleep 1\n    ready: {exec: 'true', start_timeout: 0s}\n"
        "  patient:\n    command: sleep 1\n    ready: {notify: true, start_timeout: null}\n"
    )
    result = systemd.export(manifest.read_text(), manifest, name="z", version=local_systemd())
    verify(write(result.files, tmp_path / "units"))
    units = result.files
    assert unit_values(units["z-quick.service"], "TimeoutStopSec") == ["1ms"]
    assert unit_values(units["z-notified.service"], "TimeoutStartSec") == ["1ms"]
    assert unit_values(units["z-notified.service"], "WatchdogSec") == ["1ms"]
    assert unit_values(units["z-polled.service"], "TimeoutStartSec") == ["1ms"]
    assert unit_values(units["z-patient.service"], "TimeoutStartSec") == ["infinity"]  # null: no limit
    assert unit_values(units["z-patient.service"], "TimeoutStopSec") == ["10s"]
    notes = "\n".join(map(str, result.notes))
    assert "supervisor.yaml:5: quick.stop.timeout: approximated: TimeoutStopSec=1ms" in notes
    assert "supervisor.yaml:8: notified.ready.start_timeout: approximated: TimeoutStartSec=1ms" in notes
    assert "supervisor.yaml:9: notified.watchdog: approximated: WatchdogSec=1ms" in notes
    assert "polled.ready.start_timeout: approximated" in notes and "patient.ready" not in notes


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """What the kubelet runs for a command, arg or env value: Kubernetes' expansion.Expand in Python.

    ``$(NAME)`` becomes NAME's value (kept as written where unset), ``$$`` one ``$``, any other
    ``$`` stays: the oracle that an exported string reaches the program as the manifest says.
    """
    out, i = [], 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
            continue
        after = text[i + 1]
        close = text.find(")", i + 2) if after == "(" else -1
        if after == "$":
            out.append("$")
        elif close >= 0:
            name = text[i + 2 : close]
            out.append(env.get(name, f"$({name})"))
            i = close - 1
        else:
            out.append("$" + after)
        i += 2
    return "".join(out)


def test_kubernetes_keeps_dollar_parens() -> None:
    """$(NAME) and $$ reach the program as written: the kubelet would expand them, procward does not."""
    manifest = Path("/srv/app/supervisor.yaml")
    text = (
        "version: 1\ninstances:\n  app:\n"
        '    command: ["sh", "-c", "echo $$(HOSTNAME) $$(date) pid $$$$ cost $$5 $$(open"]\n'
        '    env: {HOSTNAME: h, URL: "http://$$(HOSTNAME)/"}\n'
        '    ready: {exec: ["sh", "-c", "test $$(cat /tmp/x) = $$HOSTNAME"]}\n'
    )
    config = parse_manifest(text, manifest).instances["app"]
    assert config.argv[2] == "echo $(HOSTNAME) $(date) pid $$ cost $5 $(open"  # what procward runs
    result = kubernetes.export(text, manifest, name="d", image="registry.local/app:1")
    deployment = yaml.safe_load(result.files["app.yaml"])
    kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["-c", "echo $$(HOSTNAME) $$(date) pid $$$ cost $5 $$(open"]
    assert {"name": "URL", "value": "http://$$(HOSTNAME)/"} in container["env"]
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe == ["sh", "-c", "test $$(cat /tmp/x) = $HOSTNAME"]
    env = {e["name"]: kubelet_expand(e["value"], {}) for e in container["env"]}
    assert env == config.env
    assert [kubelet_expand(a, env) for a in [*container["command"], *container["args"]]] == config.argv
    assert config.ready is not None and [kubelet_expand(a, env) for a in probe] == config.ready.argv


def test_supervisord_continuation_lines(tmp_path: Path) -> None:
    """configparser joins an indented continuation with a line break: the command reads it as a space."""
    (tmp_path / "s.conf").write_text("[program:a]\ncommand=/bin/echo one\n  two\n")
    imported = import_file(tmp_path / "s.conf", tmp_path / "supervisor.yaml")
    (tmp_path / "supervisor.yaml").write_text(imported.text)
    config = load_manifest(tmp_path / "supervisor.yaml").instances["a"]
    assert config.argv == ["/bin/echo", "one", "two"]
    units = systemd.export(imported.text, tmp_path / "supervisor.yaml", name="c", version=local_systemd())
    assert unit_values(units.files["c-a.service"], "ExecStart") == ["/bin/echo one two"]


# -- round trips: foreign config in, systemd and Kubernetes out; what is lost was announced ----------


def round_trip(source: Path, tmp_path: Path) -> tuple[dict[str, str], dict[str, str], str]:
    manifest = tmp_path / "supervisor.yaml"
    imported = import_file(source, manifest)
    manifest.write_text(imported.text)
    load_manifest(manifest, environ={"WEB_PORT": "8000"})
    text = manifest.read_text().replace("${WEB_PORT}", "8000")
    units = systemd.export(text, manifest, name="rt", version=local_systemd())
    verify(write(units.files, tmp_path / "units"))
    k8s = kubernetes.export(text, manifest, name="rt", image="busybox:1.36")
    for file_text in k8s.files.values():
        for doc in yaml.safe_load_all(file_text):
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    notes = "\n".join(map(str, [*imported.notes, *units.notes, *k8s.notes]))
    return units.files, k8s.files, notes


def test_round_trip_supervisord(tmp_path: Path) -> None:
    units, k8s, notes = round_trip(DATA / "supervisord" / "supervisord.conf", tmp_path)
    web = units["rt-web.service"]
    # survived: command, directory, environment, stop signal and wait, autorestart, start order
    assert unit_values(web, "ExecStart") == ["python3 -m http.server 8000 --bind 127.0.0.1"]
    assert unit_values(web, "WorkingDirectory") == [str(DATA / "supervisord")]
    assert '"GREETING=hello, world"' in unit_values(web, "Environment")
    assert unit_values(web, "KillSignal") == ["SIGINT"] and unit_values(web, "TimeoutStopSec") == ["5s"]
    assert unit_values(web, "Restart") == ["always"] and unit_values(web, "After") == ["rt-migrate.service"]
    assert unit_values(units["rt-migrate.service"], "SuccessExitStatus") == ["2"]
    assert "rt-worker@.service" in units and unit_values(units["rt-cron.service"], "DynamicUser") == ["yes"]
    # lost, and said so: the startsecs (min_uptime), the group, the log rotation, the events
    assert "web.restart.min_uptime: dropped" in notes and "[group:backend]: dropped" in notes
    assert "web.logs.max_bytes: dropped" in notes and "stdout_events_enabled: dropped" in notes
    assert "worker.stop.group" not in notes and "migrate.stop.group: approximated" in notes
    assert "replicas: 3" in k8s["worker.yaml"]


def test_round_trip_procfile(tmp_path: Path) -> None:
    for name in ("Procfile", ".env"):
        shutil.copy(DATA / "procfile" / name, tmp_path / name)
    units, k8s, notes = round_trip(tmp_path / "Procfile", tmp_path)
    web = units["rt-web.service"]
    assert unit_values(web, "ExecStart") == ['/bin/sh -c "echo \\"web on $$PORT\\"; exec tail -f /dev/null"']
    assert unit_values(web, "EnvironmentFile") == [str(tmp_path / ".env")]
    assert unit_values(web, "Environment") == ['"PORT=6100"'] and unit_values(web, "Restart") == ["no"]
    worker = yaml.safe_load(k8s["worker.yaml"])["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "PORT", "value": "6200"} in worker["env"]
    assert {"name": "GREETING", "value": "hi there"} in worker["env"]  # .env, copied in
    assert "worker.env_file: approximated" in notes and "worker.restart.policy: approximated" in notes


def test_round_trip_process_compose(tmp_path: Path) -> None:
    units, k8s, notes = round_trip(DATA / "process-compose" / "process-compose.yaml", tmp_path)
    api = units["rt-api@.service"]
    assert unit_values(api, "Requires") == ["rt-migrate.service", "rt-db.service"]
    assert unit_values(units["rt-migrate.service"], "Type") == ["oneshot"]
    assert unit_values(units["rt-db.service"], "KillSignal") == ["SIGINT"]
    assert unit_values(api, "StandardOutput") == ["append:" + str(tmp_path / "api.log")]
    db = yaml.safe_load_all(k8s["db.yaml"])
    deployment = next(db)
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"] == {"path": "/", "port": 18754, "scheme": "HTTP"} and probe["periodSeconds"] == 2
    assert next(db)["kind"] == "Service"  # migrate waits for db's readiness through it
    # lost, and said so
    for text in (
        "shutdown.command: dropped",
        "db.ready: dropped",
        "api.alive: dropped",
        "is_daemon: approximated",
    ):
        assert text in notes
