"""procward: an async multi-instance process supervisor.

The embedding API (docs/embedding.md) is re-exported here, lazily: ``from
supervisor import Manager`` works, while ``import supervisor.cli`` (what
``supervisor status`` runs) pays for none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Manifest, ManifestError, load_manifest, parse_manifest
    from .events import Dropped, EventBus, State, Transition, Update
    from .instance import Instance, InvalidRequest
    from .instance_status import InstanceStatus
    from .manager import ApplyError, Manager, ReloadReport, UnknownInstance

_EXPORTS = {
    "Manifest": "config",
    "ManifestError": "config",
    "load_manifest": "config",
    "parse_manifest": "config",
    "Dropped": "events",
    "EventBus": "events",
    "State": "events",
    "Transition": "events",
    "Update": "events",
    "Instance": "instance",
    "InstanceStatus": "instance_status",
    "InvalidRequest": "instance",
    "Manager": "manager",
    "ReloadReport": "manager",
    "ApplyError": "manager",
    "UnknownInstance": "manager",
}

__all__ = [
    "ApplyError",
    "Dropped",
    "EventBus",
    "Instance",
    "InstanceStatus",
    "InvalidRequest",
    "Manager",
    "Manifest",
    "ManifestError",
    "ReloadReport",
    "State",
    "Transition",
    "UnknownInstance",
    "Update",
    "load_manifest",
    "parse_manifest",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
