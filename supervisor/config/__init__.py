"""The manifest: its models, its units, and loading it with every problem placed in the file.

Public names live here; the submodules hold one idea each. Loading a manifest
(``load_manifest``, ``parse_manifest``) is imported when first asked for: it needs
pydantic, which the running service never loads (docs/performance.md).

``Manifest``, ``InstanceConfig`` and the other model names are the checked records
the service runs (``records.py``), which ``load_manifest`` returns; the pydantic
models that check what a person wrote are in ``models.py``, ``checks.py`` and
``limits.py``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .problems import ManifestError, Problem
from .records import (
    AliveCheck,
    Backoff,
    ControlSettings,
    Dependency,
    FifoStream,
    FileStream,
    InheritStream,
    InstanceConfig,
    InstanceLogs,
    Limits,
    LogSettings,
    LogStream,
    Manifest,
    NullStream,
    ReadyCheck,
    RestartPolicy,
    ServiceSettings,
    StdoutStream,
    StopPolicy,
    StreamSpec,
    rlimit_pair,
)
from .units import format_duration, parse_duration, parse_signal, parse_size, signal_name

if TYPE_CHECKING:
    from .loader import load_manifest, parse_manifest, settled
    from .models import read_env_file

# These load pydantic and the models: imported when first asked for.
_CHECKING = {
    "load_manifest": "loader",
    "parse_manifest": "loader",
    "settled": "loader",
    "read_env_file": "models",
}

__all__ = [
    "AliveCheck",
    "Backoff",
    "ControlSettings",
    "Dependency",
    "FifoStream",
    "FileStream",
    "InheritStream",
    "InstanceConfig",
    "InstanceLogs",
    "Limits",
    "LogSettings",
    "LogStream",
    "Manifest",
    "ManifestError",
    "NullStream",
    "Problem",
    "ReadyCheck",
    "RestartPolicy",
    "ServiceSettings",
    "StdoutStream",
    "StopPolicy",
    "StreamSpec",
    "format_duration",
    "load_manifest",
    "parse_duration",
    "parse_manifest",
    "parse_signal",
    "parse_size",
    "read_env_file",
    "rlimit_pair",
    "settled",
    "signal_name",
]


def __getattr__(name: str) -> Any:
    module = _CHECKING.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
