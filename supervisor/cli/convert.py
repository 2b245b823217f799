"""import and export: conversions to and from other tools.

``supervisor.convert`` (and its YAML, TOML and pydantic) is imported only when one of these
commands runs, not when the parser is built: ``supervisor status`` never pays for it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .args import DEFAULT_MANIFEST, _manifest_arg


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
