"""The ``supervisor`` command: a thin layer over the manifest loader, the service and the API client.

Start-up time matters (``supervisor status`` is typed by hand and run by
scripts in loops), so this module imports only the standard library at the
top; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..api.client import Client

DEFAULT_MANIFEST = "supervisor.yaml"
SOCKET_ENV = "SUPERVISOR_SOCKET"
TOKEN_ENV = "SUPERVISOR_TOKEN"

Command = Callable[[argparse.Namespace], int]
ControlCommand = Callable[[argparse.Namespace, "Client"], int]

STATES = ("stopped", "waiting", "starting", "running", "backoff", "stopping", "exited", "failed", "ready")


def _manifest_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--file",
        type=Path,
        default=Path(DEFAULT_MANIFEST),
        help=f"the manifest (default: {DEFAULT_MANIFEST} in the current folder)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    if args.detach:
        from ..detach import start_detached

        options = {"log_file": args.log_file, "pidfile": args.pidfile, "backend": args.backend}
        return start_detached(args.file, timeout=args.timeout, table=format_status, **options)
    from ..service import run_service

    return run_service(
        args.file, log_file=args.log_file, backend=args.backend, pidfile=args.pidfile, ready_fd=args.ready_fd
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from ..config import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.file)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    count = len(manifest.instances)
    replicas = sum(c.replicas for c in manifest.instances.values())
    extra = f" ({replicas} replicas)" if replicas != count else ""
    print(f"ok: {count} instance{'s' if count != 1 else ''}{extra}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from ..config import ManifestError, load_manifest
    from ..config.dependencies import render_dot, render_text

    try:
        manifest = load_manifest(args.file)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(render_dot(manifest) if args.dot else render_text(manifest))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from ..config import Manifest

    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "supervisor manifest"
    print(json.dumps(schema, indent=2))
    return 0


# -- the control commands: each one a request or two to the running service -------------------------


class _Failure(Exception):
    """A message for stderr and an exit status: the CLI's only way out besides a result."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _address(args: argparse.Namespace) -> str:
    """-s/--socket, else $SUPERVISOR_SOCKET, else the socket the manifest (-f) names."""
    if args.socket:
        return str(args.socket)
    if os.environ.get(SOCKET_ENV):
        return os.environ[SOCKET_ENV]
    from ..api.client import socket_from_manifest

    try:
        return str(socket_from_manifest(args.file))
    except FileNotFoundError:
        raise _Failure(
            f"no manifest at {args.file}: give -f FILE, or -s SOCKET, or set {SOCKET_ENV}", 2
        ) from None
    except (OSError, ValueError) as exc:
        raise _Failure(f"cannot read the manifest {args.file}: {exc}", 2) from None


def _control(command: ControlCommand, check: Callable[[argparse.Namespace], None] | None = None) -> Command:
    """Run ``command`` with a client for the service; turn the client's errors into one line each.

    ``check`` looks at the arguments first, before the socket is looked for.
    """

    def run(args: argparse.Namespace) -> int:
        from ..api.client import APIError, Client, ClientError, ServiceUnavailable

        try:
            if check is not None:
                check(args)
            address = _address(args)
            client = Client(address, token=os.environ.get(TOKEN_ENV))
            return command(args, client)
        except ServiceUnavailable as exc:
            hint = "(is 'supervisor run' running?)"
            print(f"supervisor: no service answers at {exc.address} {hint}", file=sys.stderr)
            return 2
        except APIError as exc:
            print(f"supervisor: {exc.error}", file=sys.stderr)
            for detail in exc.details:
                print(f"  {detail}", file=sys.stderr)
            return 1
        except ClientError as exc:
            print(f"supervisor: {exc}", file=sys.stderr)
            return 1
        except _Failure as exc:
            print(f"supervisor: {exc}", file=sys.stderr)
            return exc.status

    run.__name__ = command.__name__
    return run


def _print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str) -> float:
    """Seconds from ``30``, ``30s``, ``500ms``, ``2m``, ``1h30m`` (as the manifest writes durations)."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write it like 30, 30s, 500ms or 2m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def _info(status: dict[str, Any]) -> str:
    """What the table's last column says: why the instance is where it is (nothing when it runs)."""
    if status["reason"]:
        return str(status["reason"])
    if status["state"] in ("starting", "running"):
        return str(status.get("status_text") or "")
    if status["exit_signal"]:
        return f"last exit: killed by {status['exit_signal']}"
    if status["exit_code"] is not None:
        return f"last exit: code {status['exit_code']}"
    return ""


def _cpu(status: dict[str, Any]) -> str:
    percent = status.get("cpu_percent")
    return "-" if percent is None else f"{percent:.1f}%"


def _mem(status: dict[str, Any]) -> str:
    """Resident memory in binary units, as ``ps`` and ``top`` count them (K, M, G of 1024)."""
    if status.get("rss_bytes") is None:
        return "-"
    size, unit = float(status["rss_bytes"]), 0
    while size >= 1024 and unit < 3:
        size, unit = size / 1024, unit + 1
    return f"{size:.0f}{'BKMG'[unit]}" if unit == 0 or size >= 100 else f"{size:.1f}{'BKMG'[unit]}"


def format_status(statuses: list[dict[str, Any]]) -> str:
    """The ``supervisor status`` table: name, state, readiness, pid, uptime, restarts, CPU, memory, why."""
    header = ("NAME", "STATE", "READY", "PID", "UPTIME", "RESTARTS", "CPU", "MEM", "INFO")
    rows = [
        (
            s["name"],
            s["state"],
            {True: "yes", False: "no"}.get(s.get("ready"), "-"),  # type: ignore[arg-type]
            str(s["pid"]) if s["pid"] is not None else "-",
            _uptime(s["uptime_s"]),
            str(s["restarts"]),
            _cpu(s),
            _mem(s),
            _info(s),
        )
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    statuses = client.status(args.names)
    if args.json:
        _print_json(statuses)
    else:
        print(format_status(statuses))
    return 0


def _selection(args: argparse.Namespace) -> tuple[list[str], bool]:
    if args.all and args.names:
        raise _Failure("give instance names or --all, not both", 2)
    if not args.all and not args.names:
        raise _Failure(f"{args.command}: name some instances (names, manifest names, globs) or give --all", 2)
    return list(args.names), bool(args.all)


def _report(args: argparse.Namespace, answer: dict[str, Any], done: str) -> int:
    """One line per instance; failures on stderr. Exit 1 when any did not make it."""
    if args.json:
        _print_json(answer)
        return 0 if answer["ok"] else 1
    for result in answer["results"]:
        if result["ok"]:
            pid = f" (pid {result['pid']})" if result["pid"] else ""
            print(f"{result['name']}: {done or result['state']}{pid}")
        else:
            print(f"supervisor: {result['name']}: {result['error']}", file=sys.stderr)
    return 0 if answer["ok"] else 1


_DOING = {"start": "starting", "stop": "stopping", "restart": "restarting"}


def cmd_action(args: argparse.Namespace, client: Client) -> int:
    from contextlib import nullcontext

    from ..progress import progress, targets_for

    names, every = _selection(args)
    targets, initial = targets_for(args.command)
    label = _DOING[args.command]
    shown = (
        nullcontext()
        if args.no_wait
        else progress(client, label, names, every=every, targets=targets, count_initial=initial)
    )
    with shown:
        answer = client.action(args.command, names, all=every, wait=not args.no_wait, timeout=args.timeout)
    return _report(args, answer, "" if not args.no_wait else f"{args.command} requested")


def cmd_signal(args: argparse.Namespace, client: Client) -> int:
    names, every = _selection(args)
    signal: str | int = int(args.signal) if args.signal.isdigit() else args.signal
    answer = client.signal(signal, names, all=every)
    return _report(args, answer, f"sent {args.signal}")


def cmd_wait(args: argparse.Namespace, client: Client) -> int:
    names, every = _selection(args)
    states = [state for value in args.state for state in value.split(",") if state]
    unknown = [state for state in states if state not in STATES]
    if unknown or not states:
        raise _Failure(f"--state: {', '.join(unknown) or 'nothing'}: expected one of {', '.join(STATES)}", 2)
    from ..progress import progress

    with progress(client, "waiting", names, every=every, targets=states, count_initial=True):
        answer = client.wait(names, states, all=every, timeout=args.timeout)
    return _report(args, answer, "")


def _check_logs(args: argparse.Namespace) -> None:
    if args.reopen and args.names:
        raise _Failure("logs --reopen takes no instance name: it reopens every log file", 2)
    if not args.reopen and not args.names:
        hint = ""
        if args.file_from_f:
            hint = f" ('-f {args.file}' names the manifest; to follow, put -f after the name)"
        raise _Failure(f"logs: name an instance{hint}", 2)


_GLOB = re.compile(r"[*?\[]")


def _log_sources(args: argparse.Namespace, client: Client, stream: str) -> tuple[list[str], bool]:
    """The instances whose logs to show, and whether their lines get a name in front.

    One exact instance name keeps the plain output scripts rely on; several
    names, a glob or a manifest name with replicas are expanded by the service
    and prefixed (``--prefix``/``--no-prefix`` decide otherwise).
    """
    names: list[str] = list(args.names)
    single = len(names) == 1 and not _GLOB.search(names[0])
    if single:
        from ..api.client import APIError

        try:
            client.instance(names[0])
        except APIError as exc:
            if exc.status != 404:
                raise
            single = False  # maybe a manifest name: the status below expands it (or says none)
    if single:
        chosen = names
    else:
        statuses = client.status(names)
        chosen = []
        for status in statuses:
            if status[stream] == "log":
                chosen.append(status["name"])
            else:
                note = f"{status['name']}'s {stream} is not captured (it goes to {status[stream]}): skipped"
                print(f"supervisor: {note}", file=sys.stderr)
        if not chosen:
            raise _Failure(f"logs: none of the selected instances has a captured {stream}")
    prefix = (not single) if args.prefix is None else bool(args.prefix)
    return chosen, prefix


def _room_for_sockets(count: int) -> None:
    """One socket per followed instance: raise the soft open-file limit to the hard one if need be."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + 32  # stdio, the selector, Python's own
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise _Failure(f"following {count} instances needs {needed} open files; the limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))


def cmd_logs(args: argparse.Namespace, client: Client) -> int:
    if args.reopen:
        answer = client.reopen_logs()
        print(f"reopened {answer['reopened']} log files")
        return 0
    stream = "stderr" if args.stderr else "stdout"
    out = sys.stdout.buffer
    names, prefixed = _log_sources(args, client, stream)
    if len(names) == 1 and not prefixed:
        if not args.follow:
            out.write(client.logs(names[0], stream=stream, lines=args.lines))
            out.flush()
            return 0
        with client.follow(names[0], stream=stream, lines=args.lines) as chunks:
            for chunk in chunks:
                out.write(chunk)
                out.flush()
        return 0
    width = max(len(name) for name in names)
    labels = {name: (name.ljust(width) + " | ").encode() if prefixed else b"" for name in names}
    if not args.follow:
        for name in names:
            text = client.logs(name, stream=stream, lines=args.lines)
            out.writelines(labels[name] + line for line in text.splitlines(keepends=True))
        out.flush()
        return 0
    _room_for_sockets(len(names))
    with client.follow_many(names, stream=stream, lines=args.lines) as lines:
        for name, line in lines:
            out.write(labels[name] + line)
            out.flush()
    return 0


def cmd_reload(args: argparse.Namespace, client: Client) -> int:
    return _print_report(args, client.reload())


def _print_report(args: argparse.Namespace, report: dict[str, Any]) -> int:
    if args.json:
        _print_json(report)
        return 0
    for key in ("added", "removed", "changed", "unchanged"):
        print(f"{key}: {', '.join(report[key]) or 'none'}")
    for line in report.get("rescaled") or ():
        print(f"rescaled: {line}")
    return 0


def _scale_arg(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not name or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=COUNT, e.g. worker=5")
    return name, int(count)


def cmd_scale(args: argparse.Namespace, client: Client) -> int:
    return _print_report(args, client.scale(dict(args.counts)))


def cmd_shutdown(args: argparse.Namespace, client: Client) -> int:
    answer = client.shutdown()
    print(answer.get("message", "shutting down"))
    return 0


def cmd_dashboard(args: argparse.Namespace, client: Client) -> int:
    """Serve the page until ^C; the URL's token lets in the first browser that opens it, only."""
    from ..api.proxy import DashboardProxy

    client.health()  # a clear error now, not a broken page later
    try:
        proxy = DashboardProxy(client.connect, authorization=client.authorization, port=args.port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise _Failure(f"dashboard: cannot listen on 127.0.0.1:{args.port}: {reason}", 1) from None
    print(f"dashboard: {proxy.url}", flush=True)
    print("open it once (the token is spent then); ^C to stop", file=sys.stderr, flush=True)
    try:
        proxy.serve_forever()
    finally:
        proxy.server.server_close()
    return 0


class _FollowOrFile(argparse.Action):
    """``logs``: a bare ``-f`` follows (as ``tail -f``); ``-f FILE`` names the manifest, as everywhere."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values is None:
            namespace.follow = True
        else:
            namespace.file = Path(values)
            namespace.file_from_f = True


def _control_args(parser: argparse.ArgumentParser, *, file_flag: bool = True) -> None:
    parser.add_argument(
        "-s",
        "--socket",
        help=f"the service's control socket (default: ${SOCKET_ENV}, else the manifest's)",
    )
    if file_flag:
        _manifest_arg(parser)


def _selection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="instance, manifest name or glob ('web-*')")
    parser.add_argument("--all", action="store_true", help="every instance")


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")


def add_control_commands(sub: Any) -> None:
    status = sub.add_parser("status", help="show the instances (a table, or --json)")
    status.add_argument("names", nargs="*", metavar="NAME", help="instance, manifest name or glob")
    _json_arg(status)
    _control_args(status)
    status.set_defaults(func=_control(cmd_status))

    verbs = {
        "start": "start instances; waits until they run",
        "stop": "stop instances; waits until they stopped",
        "restart": "restart instances; waits until they run again",
    }
    for verb, text in verbs.items():
        action = sub.add_parser(verb, help=text)
        _selection_args(action)
        action.add_argument("--no-wait", action="store_true", help="answer once the request is under way")
        action.add_argument(
            "--timeout", type=_duration, help="give up waiting after this (default: min_uptime + 10s)"
        )
        _json_arg(action)
        _control_args(action)
        action.set_defaults(func=_control(cmd_action))

    sig = sub.add_parser("signal", help="send a signal to instances' processes")
    sig.add_argument("signal", metavar="SIGNAL", help="HUP, SIGUSR1, 15…")
    _selection_args(sig)
    _json_arg(sig)
    _control_args(sig)
    sig.set_defaults(func=_control(cmd_signal))

    logs = sub.add_parser("logs", help="instances' captured output: the last lines, or follow")
    logs.add_argument(
        "names", nargs="*", metavar="NAME", help="instance, manifest name or glob; several: each line named"
    )
    logs.add_argument("-n", "--lines", type=int, default=10, help="how many of the last lines (default 10)")
    logs.add_argument(
        "-f",
        nargs="?",
        action=_FollowOrFile,
        dest="file",
        metavar="FILE",
        help="alone: follow (as tail -f); with FILE: the manifest",
    )
    logs.add_argument("--follow", action="store_true", help="print what is written from now on, until ^C")
    logs.add_argument("--file", type=Path, dest="file", help=f"the manifest (default: {DEFAULT_MANIFEST})")
    logs.add_argument("--stderr", action="store_true", help="the stderr log instead of stdout")
    logs.add_argument("--reopen", action="store_true", help="reopen every log file (after logrotate)")
    logs.add_argument(
        "--prefix",
        action=argparse.BooleanOptionalAction,
        help="put each line's instance name in front (default: when more than one instance is asked for)",
    )
    _control_args(logs, file_flag=False)
    logs.set_defaults(
        func=_control(cmd_logs, _check_logs), file=Path(DEFAULT_MANIFEST), follow=False, file_from_f=False
    )

    reload = sub.add_parser("reload", help="re-read the manifest and apply the difference")
    _json_arg(reload)
    _control_args(reload)
    reload.set_defaults(func=_control(cmd_reload))

    scale = sub.add_parser("scale", help="run N replicas of a manifest entry until the next reload")
    scale.add_argument("counts", nargs="+", type=_scale_arg, metavar="NAME=N")
    _json_arg(scale)
    _control_args(scale)
    scale.set_defaults(func=_control(cmd_scale))

    wait = sub.add_parser("wait", help="wait until instances are in a state (exit 1 on timeout)")
    _selection_args(wait)
    wait.add_argument(
        "--state", action="append", required=True, help=f"{', '.join(STATES)} (repeat or comma-separate)"
    )
    wait.add_argument("--timeout", type=_duration, default=30.0, help="give up after this (default 30s)")
    _json_arg(wait)
    _control_args(wait)
    wait.set_defaults(func=_control(cmd_wait))

    shutdown = sub.add_parser("shutdown", help="stop every instance, then the service")
    _control_args(shutdown)
    shutdown.set_defaults(func=_control(cmd_shutdown))

    dashboard = sub.add_parser("dashboard", help="serve the web dashboard on a loopback port; print its URL")
    dashboard.add_argument("--port", type=int, default=0, help="the port (default: any free one)")
    _control_args(dashboard)
    dashboard.set_defaults(func=_control(cmd_dashboard))


# -- import and export: conversions to and from other tools (supervisor.convert, loaded lazily) ----


def _print_notes(notes: Sequence[Any]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def cmd_import(args: argparse.Namespace) -> int:
    from ..convert import ConvertError
    from ..convert.importer import import_file

    output = args.output or Path(DEFAULT_MANIFEST)
    try:
        result = import_file(args.source, output.absolute(), args.format)
    except ConvertError as exc:
        print(f"supervisor: {exc}", file=sys.stderr)
        return 1
    _print_notes(result.notes)
    if args.output is None:
        sys.stdout.write(result.text)
        return 0
    if args.output.exists() and not args.force:
        print(f"supervisor: {args.output} exists; give --force to replace it", file=sys.stderr)
        return 1
    args.output.write_text(result.text)
    print(f"wrote {args.output} ({len(result.notes)} notes)", file=sys.stderr)
    return 0


def _systemd_version() -> int:
    """The local systemd's version (the units' features depend on it); 254 where there is none."""
    import subprocess

    try:
        out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[1])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return 254


def cmd_export(args: argparse.Namespace) -> int:
    from ..convert import ConvertError, read_source
    from ..convert.exportbase import default_name

    name = args.name or default_name(args.file)
    try:
        text = read_source(args.file)
        if args.target == "systemd":
            from ..convert import systemd

            version = args.systemd_version or _systemd_version()
            result = systemd.export(text, args.file, name=name, version=version)
        else:
            from ..convert import kubernetes

            if not args.image:
                raise ConvertError("--image", None, "kubernetes needs the container image: --image NAME:TAG")
            result = kubernetes.export(
                text, args.file, name=name, image=args.image, wait_image=args.wait_image
            )
    except ConvertError as exc:
        print(f"supervisor: {exc}", file=sys.stderr)
        return 1
    _print_notes(result.notes)
    folder = args.output_dir or Path(args.target)
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, content in result.files.items():
        (folder / file_name).write_text(content)
    print(f"wrote {len(result.files)} files to {folder} ({len(result.notes)} notes)", file=sys.stderr)
    return 0


def add_convert_commands(sub: Any) -> None:
    imp = sub.add_parser("import", help="convert a supervisord config, a Procfile or a process-compose file")
    imp.add_argument("source", type=Path, metavar="FILE")
    formats = ["supervisord", "procfile", "process-compose"]
    imp.add_argument("--format", choices=formats, help="default: from the file's name, else its content")
    imp.add_argument("-o", "--output", type=Path, help="write the manifest here (default: stdout)")
    imp.add_argument("--force", action="store_true", help="replace an existing output file")
    imp.set_defaults(func=cmd_import)

    exp = sub.add_parser("export", help="write systemd units or Kubernetes objects for the manifest")
    exp.add_argument("target", choices=["systemd", "kubernetes"])
    _manifest_arg(exp)
    exp.add_argument("-o", "--output-dir", type=Path, help="the folder to write to (default: ./TARGET)")
    exp.add_argument("--name", help="unit prefix and target / part-of label (default: the manifest's folder)")
    exp.add_argument("--image", help="kubernetes: the container image (required)")
    exp.add_argument("--wait-image", default="busybox:1.36", help="kubernetes: the wait-for image")
    exp.add_argument("--systemd-version", type=int, help="systemd: its version (default: local)")
    exp.set_defaults(func=cmd_export)


# -- shell completion ------------------------------------------------------------------------------


def cmd_completion(args: argparse.Namespace) -> int:
    from ..completion import script

    print(script(args.shell, build_parser(), STATES), end="")
    return 0


def cmd_names(args: argparse.Namespace) -> int:
    """Instance names for the completion scripts: one a line; nothing (and 0) when no service answers."""
    from ..api.client import Client, ClientError

    try:
        statuses = Client(_address(args), token=os.environ.get(TOKEN_ENV), timeout=2).status()
    except (ClientError, _Failure, OSError, ValueError):
        return 0
    print("\n".join(str(s["name"]) for s in statuses if isinstance(s, dict) and "name" in s))
    return 0


def add_completion_commands(sub: Any) -> None:
    completion = sub.add_parser("completion", help="print a shell completion script (bash, zsh, fish)")
    completion.add_argument("shell", choices=["bash", "zsh", "fish"], metavar="SHELL", help="bash, zsh, fish")
    completion.set_defaults(func=cmd_completion)
    names = sub.add_parser("_names")  # no help: hidden; the completion scripts' source of names
    _control_args(names)
    names.set_defaults(func=cmd_names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supervisor", description="An async multi-instance process supervisor."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the manifest's instances (in the foreground, or -d)")
    _manifest_arg(run)
    run.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="start in the background; return once the instances are up, and show them",
    )
    run.add_argument(
        "--log-file", type=Path, help="the service's own log (default: stderr; -d: <state_dir>/service.log)"
    )
    run.add_argument("--pidfile", type=Path, help="write the service's pid here (removed when it ends)")
    run.add_argument(
        "--timeout", type=_duration, default=60.0, help="-d: give up waiting after this (default 60s)"
    )
    run.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a manifest and list every problem")
    _manifest_arg(validate)
    validate.set_defaults(func=cmd_validate)

    graph = sub.add_parser("graph", help="print the dependency graph, in start order (or --dot)")
    _manifest_arg(graph)
    graph.add_argument("--dot", action="store_true", help="Graphviz's dot language")
    graph.set_defaults(func=cmd_graph)

    schema = sub.add_parser("schema", help="print the manifest's JSON Schema")
    schema.set_defaults(func=cmd_schema)

    add_control_commands(sub)
    add_convert_commands(sub)
    add_completion_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `supervisor logs -f | head`: the reader went away; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
