"""Limits set in a child before its program runs: rlimits, nice, oom_score_adj.

Part of the OS edge, beside ``process.py``: it says how each limit is set on
the fast path (arguments for util-linux ``prlimit`` and lines for the gate
script, all run after vfork and exec) and on the slow one (Python between fork
and exec). Both run after the switch to the instance's user, so they can only
do what that user may: a lower hard limit, a positive nice, a higher
oom_score_adj. Raising a hard limit, a negative nice or a lower oom_score_adj
needs the service to run as root with the instance under root too. A limit
that cannot be set keeps the program from starting, with the reason on its
stderr (fast path) or in the spawn error (slow path): never a program that
runs without the limit it was given.
"""

from __future__ import annotations

import os
import resource
import shlex
from dataclasses import dataclass, field

__all__ = ["RLIMIT_RESOURCES", "ChildLimits"]

#: prlimit's names for the resources a manifest may limit.
RLIMIT_RESOURCES: dict[str, int] = {
    "as": resource.RLIMIT_AS,
    "core": resource.RLIMIT_CORE,
    "cpu": resource.RLIMIT_CPU,
    "data": resource.RLIMIT_DATA,
    "fsize": resource.RLIMIT_FSIZE,
    "memlock": resource.RLIMIT_MEMLOCK,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "stack": resource.RLIMIT_STACK,
}

#: The gate's exit code when a limit cannot be set (as when the parent is gone): the program never ran.
GATE_REFUSED = 125


@dataclass(frozen=True)
class ChildLimits:
    """What to set in the child: rlimits by prlimit name as (soft, hard), nice, oom_score_adj."""

    rlimits: dict[str, tuple[int, int]] = field(default_factory=dict)
    nice: int | None = None
    oom_score_adj: int | None = None

    def __bool__(self) -> bool:
        return bool(self.rlimits) or self.nice is not None or self.oom_score_adj is not None

    def nofile(self, inherited_nofile: tuple[int, int] | None) -> tuple[int, int] | None:
        """The open-files limit the program gets: the manifest's, else the one the service found."""
        return self.rlimits.get("nofile", inherited_nofile)

    def prlimit_args(
        self, inherited_nofile: tuple[int, int] | None, *, nofile_in_gate: bool = False
    ) -> list[str]:
        """``--NAME=SOFT:HARD`` for prlimit; the service's own fd limit unless nofile is given.

        ``nofile_in_gate``: the gate sets the open-files limit (``gate_lines``), not prlimit.
        """
        wanted = dict(self.rlimits)
        if "nofile" not in wanted and inherited_nofile is not None:
            wanted["nofile"] = inherited_nofile
        if nofile_in_gate:
            wanted.pop("nofile", None)
        return [f"--{name}={_side(soft)}:{_side(hard)}" for name, (soft, hard) in sorted(wanted.items())]

    def gate_lines(self, renice: str, nofile: tuple[int, int] | None = None) -> list[str]:
        """Shell lines that set limits on the gate itself, which then execs the program.

        ``nofile``: the open-files limit, by the shell's ``ulimit -n`` (a count, the same in
        every shell, unlike the units of the other limits): most instances need no other
        limit, and then prlimit is not exec'd at all, one exec of two or three less per spawn.
        The shell sets one side at a time, and the kernel refuses a soft limit over the hard
        one: the hard side goes first (raising both, as root), else the soft side (lowering
        both, as from the service's raised limit to the one it started with).
        """
        lines = []
        refused = f"exit {GATE_REFUSED}"
        if nofile is not None:
            soft, hard = (_side(side) for side in nofile)
            hard_first = f"ulimit -H -n {hard} 2>/dev/null && ulimit -S -n {soft} 2>/dev/null"
            soft_first = f"ulimit -S -n {soft} 2>/dev/null && ulimit -H -n {hard} 2>/dev/null"
            complaint = f"supervisor: cannot set the open-files limit (RLIMIT_NOFILE) to {soft}:{hard}"
            either = f"{{ {hard_first}; }} || {{ {soft_first}; }}"
            lines.append(f"{either} || {{ echo '{complaint}' >&2; {refused}; }}")
        if self.oom_score_adj is not None:
            value = self.oom_score_adj
            lines.append(
                f"echo {value} 2>/dev/null >/proc/self/oom_score_adj || "
                f"{{ echo 'supervisor: cannot set oom_score_adj to {value}' >&2; {refused}; }}"
            )
        if self.nice is not None:
            lines.append(f'{shlex.quote(renice)} -n {self.nice} -p "$$" >/dev/null || {refused}')
        return lines

    def apply(self, inherited_nofile: tuple[int, int] | None) -> None:
        """The same in Python, in the child between fork and exec (the slow path)."""
        wanted = dict(self.rlimits)
        if "nofile" not in wanted and inherited_nofile is not None:
            wanted["nofile"] = inherited_nofile
        for name, pair in wanted.items():
            resource.setrlimit(RLIMIT_RESOURCES[name], pair)
        if self.oom_score_adj is not None:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"%d" % self.oom_score_adj)
            finally:
                os.close(fd)
        if self.nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, self.nice)


def _side(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)
