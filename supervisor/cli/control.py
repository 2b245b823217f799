"""The commands that talk to the running service over its control socket.

Each is a request or two through ``supervisor.api.client`` (standard library only), imported
when the command runs; ``_control`` turns the client's errors into one line and an exit status.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .args import (
    DEFAULT_MANIFEST,
    SOCKET_ENV,
    STATES,
    TOKEN_ENV,
    Command,
    ControlCommand,
    _control_args,
    _duration,
    _json_arg,
    _selection_args,
)
from .status import format_status

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..api.client import Client


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
        for why in answer.get("failed", []):  # an older service does not say
            print(f"supervisor: {why}", file=sys.stderr)
        return 1 if answer.get("failed") else 0
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


def cmd_reexec(args: argparse.Namespace, client: Client) -> int:
    """Ask for the re-exec, then wait until the new service answers (its health counts one more)."""
    import time

    from ..api.client import ClientError

    before = client.health()
    answer = client.reexec(check=args.check)
    report = answer.get("report", {})
    what = f"{report.get('instances', '?')} instances, {report.get('processes', '?')} running processes"
    if args.check:
        gone = report.get("gone", 0)
        print(f"ok: the new code would resume {what}" + (f" ({gone} ended meanwhile)" if gone else ""))
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:  # during the handover this waits in the socket's backlog, it does not fail
            health = client.health()
        except ClientError:
            health = {}
        if health.get("handoffs", 0) > before.get("handoffs", 0):
            # What the new service took over, not the check's count of the state a moment before:
            # its status answers once they are built (its health, at once, before).
            try:
                took = f"{len(client.status())} instances"
            except ClientError:
                took = what
            print(f"re-exec'd: pid {health.get('pid')} runs the new code with {took}")
            return 0
        error = health.get("handoff_error")
        if error and error != before.get("handoff_error"):
            raise _Failure(f"reexec failed, the service goes on as it was: {error}")
        time.sleep(0.02)
    raise _Failure(f"reexec: the new service did not answer within {args.timeout:g}s")


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

    reexec = sub.add_parser(
        "reexec", help="replace the service with the installed code; every instance keeps running"
    )
    reexec.add_argument("--check", action="store_true", help="only ask the new code whether it would resume")
    reexec.add_argument("--timeout", type=_duration, default=30.0, help="wait this long for the new service")
    _control_args(reexec)
    reexec.set_defaults(func=_control(cmd_reexec))

    dashboard = sub.add_parser("dashboard", help="serve the web dashboard on a loopback port; print its URL")
    dashboard.add_argument("--port", type=int, default=0, help="the port (default: any free one)")
    _control_args(dashboard)
    dashboard.set_defaults(func=_control(cmd_dashboard))
