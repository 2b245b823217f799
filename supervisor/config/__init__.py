"""The manifest: its models, its units, and loading it with every problem placed in the file.

Public names live here; the submodules hold one idea each, and each is imported when
one of its names is first asked for: ``supervisor run`` starts its manifest's check
(``apart.py``) before it has imported anything else of the package, and loading a
manifest (``load_manifest``, ``parse_manifest``) needs pydantic, which the running
service never loads (docs/performance.md).

``Manifest``, ``InstanceConfig`` and the other model names are the checked records
the service runs (``records.py``), which ``load_manifest`` returns; the pydantic
models that check what a person wrote are in ``models.py``, ``checks.py`` and
``limits.py``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loader import load_manifest, parse_manifest, settled
    from .models import read_env_file
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


# Where the names above are found, looked for in this order: the light modules first, so that
# asking for a record never imports pydantic (``loader`` and ``models`` do).
_SUBMODULES = ("records", "problems", "units", "loader", "models")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _SUBMODULES:
            found = importlib.import_module(f".{module}", __name__)
            if hasattr(found, name):
                value = getattr(found, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
