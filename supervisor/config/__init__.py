"""The manifest: its models, its units, and loading it with every problem placed in the file.

Public names live here; the submodules hold one idea each.
"""

from .checks import AliveCheck, Dependency, ReadyCheck
from .limits import Limits, rlimit_pair
from .loader import ManifestError, Problem, load_manifest, parse_manifest
from .models import (
    Backoff,
    ControlSettings,
    FifoStream,
    FileStream,
    InheritStream,
    InstanceConfig,
    InstanceLogs,
    LogSettings,
    LogStream,
    Manifest,
    NullStream,
    RestartPolicy,
    ServiceSettings,
    StdoutStream,
    StopPolicy,
    StreamSpec,
    read_env_file,
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
    "signal_name",
]
