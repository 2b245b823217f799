"""What ``supervisor.cgroups`` (auto, off, required) makes of the cgroups the machine offers.

cgroups.py is the OS edge and knows no manifest; this is the one place that
reads the manifest's wishes (``limits.memory_max`` needs the memory controller,
``limits.cpu_quota`` the cpu controller) against what the kernel gave, and says
so: once, in the service's log, when something is missing and ``auto`` falls
back; as an error that stops the start (or the reload) under ``required``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .cgroups import CgroupError, CgroupTree
from .config import InstanceConfig, Manifest

__all__ = ["CgroupPolicy", "CgroupRefused"]

log = logging.getLogger("supervisor.cgroups")

#: What each controller's absence means for the manifest, in the log's words.
_FALLBACK = {
    "memory": "limits.memory_max is enforced by restarting an instance whose processes' RSS stays "
    "above it for memory_interval (as limits.memory), not by the kernel",
    "cpu": "limits.cpu_quota is not enforced",
}


class CgroupRefused(CgroupError):
    """``cgroups: required`` and the machine cannot give what the manifest needs; nothing started."""


def needed_controllers(configs: Iterable[InstanceConfig]) -> set[str]:
    """The controllers the instances' limits need."""
    needs: set[str] = set()
    for config in configs:
        if config.limits.memory_max is not None:
            needs.add("memory")
        if config.limits.cpu_quota is not None:
            needs.add("cpu")
    return needs


class CgroupPolicy:
    """The service's cgroup tree (None when off or unavailable), and what has been said about it."""

    def __init__(self, mode: str, tree: CgroupTree | None) -> None:
        self.mode = mode
        self.tree = tree
        self._said: set[str] = set()

    @classmethod
    def open(cls, manifest: Manifest) -> CgroupPolicy:
        """Make the tree as ``supervisor.cgroups`` says; CgroupRefused where ``required`` cannot be met."""
        mode = manifest.supervisor.cgroups
        if mode == "off":
            return cls(mode, None)
        try:
            tree = CgroupTree.open()
        except CgroupError as exc:
            if mode == "required":
                raise CgroupRefused(f"supervisor.cgroups is required, but {exc}") from None
            log.warning(
                "no cgroup per instance (%s): a stop kills each instance's process group, and a "
                "process that left it (setsid) survives; limits.memory_max falls back to restarts "
                "on RSS, limits.cpu_quota is not enforced",
                exc,
            )
            return cls(mode, None)
        policy = cls(mode, tree)
        try:
            policy.check(manifest)
        except CgroupRefused:
            tree.close()
            raise
        log.info("%s", tree.describe())
        return policy

    def check(self, manifest: Manifest) -> None:
        """Before a manifest is applied: refuse it (``required``) or say once what falls back (``auto``)."""
        tree = self.tree
        if tree is None:
            return
        needs = sorted(needed_controllers(manifest.instances.values()))
        missing = {c: tree.missing.get(c, "not enabled") for c in needs if c not in tree.controllers}
        if missing and self.mode == "required":
            what = "; ".join(f"the {c} controller is {why}" for c, why in missing.items())
            raise CgroupRefused(
                f"supervisor.cgroups is required, but {what} (needed by "
                + ", ".join(_KEYS[c] for c in missing)
                + ")"
            )
        for controller, why in missing.items():
            if controller not in self._said:
                self._said.add(controller)
                log.warning("cgroup v2: the %s controller is %s: %s", controller, why, _FALLBACK[controller])

    def close(self) -> None:
        if self.tree is not None:
            self.tree.close()


_KEYS = {"memory": "limits.memory_max", "cpu": "limits.cpu_quota"}
