"""The commands that read the manifest file itself: run, validate, graph, schema.

``run`` loads the service (anyio, pydantic) and the others the config models: each only
when it runs, never at import.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .args import _duration, _manifest_arg
from .status import format_status


def cmd_run(args: argparse.Namespace) -> int:
    if args.detach:
        from ..detach import start_detached

        options = {"log_file": args.log_file, "pidfile": args.pidfile, "backend": args.backend}
        extra = ["--pid-namespace"] if args.pid_namespace else []
        return start_detached(
            args.file, timeout=args.timeout, table=format_status, extra_args=extra, **options
        )
    from ..early_signals import catch_early_signals

    catch_early_signals()  # HUP, USR1, USR2 sent before the service listens: none ends it
    resumed_inside = args.resume is not None and args.pid_namespace
    if args.pid_namespace and not resumed_inside:
        return _run_in_pid_namespace(args)
    # Off before the imports: they make tens of thousands of objects that live as long as the
    # service and almost no garbage, and the collector's passes over them as they grow took a
    # tenth of a cold start. The service turns it on once it has frozen them (service.py).
    gc.disable()
    from ..config.apart import ManifestCheck

    # The manifest is checked in a child (config/apart.py), started first: it loads pydantic and
    # the models while this process imports the service. A fork: this process runs one thread yet.
    check = ManifestCheck(args.file, fork=True) if args.resume is None else None
    resume = None
    if args.resume is not None and not args.resume_check:  # a re-exec: the record's check, as early
        from ..handoff.record_check import PendingResume

        resume = PendingResume(args.resume)
    from ..service_process import run_service

    return run_service(
        args.file,
        log_file=args.log_file,
        backend=args.backend,
        # A re-exec inside a PID namespace: we are its init already; the pidfile is the outer process's.
        pidfile=None if resumed_inside else args.pidfile,
        ready_fd=args.ready_fd,
        resume_fd=args.resume,
        resume_check=args.resume_check,
        manifest_check=check,
        resume=resume,
    )


def _run_in_pid_namespace(args: argparse.Namespace) -> int:
    from ..config import ManifestError
    from ..config.apart import ManifestCheck
    from ..pidns import PidNamespaceError, run_in_pid_namespace
    from ..service_process import run_service
    from ..statedir import StateDirError, prepare_state_dir

    try:
        manifest = ManifestCheck(args.file, fork=True).result()  # the service never holds pydantic
        prepare_state_dir(manifest.state_dir)
    except (ManifestError, StateDirError) as exc:
        print(exc, file=sys.stderr)
        return 1

    def inner(on_ready: Callable[[], None]) -> int:
        return run_service(args.file, log_file=args.log_file, backend=args.backend, on_ready=on_ready)

    try:
        return run_in_pid_namespace(manifest.state_dir, inner, pidfile=args.pidfile, ready_fd=args.ready_fd)
    except PidNamespaceError as exc:
        print(f"supervisor: {exc}", file=sys.stderr)
        return 2


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

    from ..config.models import Manifest

    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "supervisor manifest"
    print(json.dumps(schema, indent=2))
    return 0


def add_manifest_commands(sub: Any) -> None:
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
    run.add_argument(
        "--pid-namespace",
        action="store_true",
        help="root: run as init of a PID namespace of its own, so every instance dies with the service",
    )
    run.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    # Set by `supervisor reexec` (handoff/reexec.py): the state record's fd, and its dry run.
    run.add_argument("--resume", type=int, metavar="FD", help=argparse.SUPPRESS)
    run.add_argument("--resume-check", action="store_true", help=argparse.SUPPRESS)
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
