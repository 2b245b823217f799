"""Per-instance resource limits as a manifest writes them: memory, nice, oom_score_adj, rlimits.

An rlimit is written as prlimit(1) writes it: a number, ``unlimited``, or
``SOFT:HARD``. It is kept as the canonical ``SOFT:HARD`` text, which is what
``prlimit --nofile=…`` takes, what a reload compares, and what the model dumps.
"""

# Without `from __future__ import annotations`: pydantic then takes each field's type as the
# object it is, instead of evaluating its text (a compile and an eval per field, 5 ms of every
# manifest check, which is on the path of every cold start: docs/performance.md).

import math
import resource
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, StrictInt, WithJsonSchema

from .annotated import Duration, Size
from .base import StrictModel
from .records import rlimit_pair as rlimit_pair

#: The largest finite rlimit a manifest may give: 2**62. Larger is a typo, not a limit, and
#: RLIM_INFINITY itself (2**64-1) is written ``unlimited``.
MAX_RLIMIT = 2**62

#: prlimit's names, and the resource each sets (the unit is in the description).
RLIMITS: dict[str, tuple[int, str]] = {
    "as": (resource.RLIMIT_AS, "bytes of address space"),
    "core": (resource.RLIMIT_CORE, "bytes of a core file (0: none)"),
    "cpu": (resource.RLIMIT_CPU, "seconds of CPU time (SIGXCPU at the soft limit)"),
    "data": (resource.RLIMIT_DATA, "bytes of data segment"),
    "fsize": (resource.RLIMIT_FSIZE, "bytes of a file written (SIGXFSZ past it)"),
    "memlock": (resource.RLIMIT_MEMLOCK, "bytes of locked memory"),
    "nofile": (resource.RLIMIT_NOFILE, "open file descriptors"),
    "nproc": (resource.RLIMIT_NPROC, "processes of the instance's user"),
    "stack": (resource.RLIMIT_STACK, "bytes of stack"),
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:30] + "…" + text[-5:]


def _one_value(value: Any, written: Any) -> int | None:
    """One side of an rlimit: a number, or None for unlimited."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("unlimited", "infinity"):
            return None
        if not text.isascii() or not text.isdigit():
            raise ValueError(f"{_shown(written)} is not a limit: write a number, unlimited, or SOFT:HARD")
        if len(text) > 20:
            raise ValueError(f"{_shown(written)} is larger than the largest limit allowed, 2**62")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_shown(written)} is not a limit: write a number, unlimited, or SOFT:HARD")
    if value < 0:
        raise ValueError("a limit cannot be negative")
    if value > MAX_RLIMIT:
        raise ValueError(f"{_shown(written)} is larger than the largest limit allowed, 2**62")
    return value


def _text(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def parse_rlimit(value: Any) -> str:
    """``1024``, ``unlimited`` or ``1024:4096`` as the canonical ``SOFT:HARD``; the soft within the hard."""
    if isinstance(value, str) and ":" in value:
        soft_text, _, hard_text = value.partition(":")
        soft, hard = _one_value(soft_text, value), _one_value(hard_text, value)
    else:
        soft = hard = _one_value(value, value)
    if hard is not None and (soft is None or soft > hard):
        raise ValueError(f"the soft limit {_text(soft)} is above the hard limit {_text(hard)}")
    return f"{_text(soft)}:{_text(hard)}"


Rlimit = Annotated[
    str,
    BeforeValidator(parse_rlimit),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_RLIMIT},
                {"type": "string", "pattern": r"^(\d+|unlimited|infinity)(:(\d+|unlimited|infinity))?$"},
            ],
            "description": "A number, unlimited, or SOFT:HARD (as prlimit writes them).",
        }
    ),
]


#: The smallest and largest CPU quota, in CPUs: cpu.max takes at least 1 ms per 100 ms period.
MIN_CPUS = 0.01
MAX_CPUS = 4096.0


def parse_cpus(value: Any) -> float:
    """CPUs from ``0.5``, ``2``, ``"50%"`` or ``"150%"`` (systemd's CPUQuota= spelling)."""
    written = value
    if isinstance(value, bool):
        raise ValueError("expected a number of CPUs such as 0.5 or a percentage such as 50%")
    if isinstance(value, str):
        text = value.strip()
        percent = text.endswith("%")
        number = text.removesuffix("%").strip()
        if not number.isascii() or not number.replace(".", "", 1).isdigit() or len(number) > 20:
            raise ValueError(
                f"{_shown(written)} is not a CPU quota: write a number of CPUs (0.5, 2) or a percentage (50%)"
            )
        value = float(number) / 100 if percent else float(number)
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_CPUS:
            raise ValueError(f"{_shown(written)} is more than {MAX_CPUS:g} CPUs")
        value = float(value)
    if not isinstance(value, float):
        raise ValueError("expected a number of CPUs such as 0.5 or a percentage such as 50%")
    if not math.isfinite(value):
        raise ValueError(f"a CPU quota must be a finite number, not {_shown(written)}")
    if value < MIN_CPUS:
        raise ValueError(f"{_shown(written)} is below the smallest CPU quota, {MIN_CPUS:g} (1%)")
    if value > MAX_CPUS:
        raise ValueError(f"{_shown(written)} is more than {MAX_CPUS:g} CPUs")
    return value


CpuQuota = Annotated[
    float,
    BeforeValidator(parse_cpus),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": MIN_CPUS, "maximum": MAX_CPUS},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*%?\s*$"},
            ],
            "description": "CPUs: 0.5 or 50% (half of one), 2 or 200% (two); 0.01 to 4096.",
        }
    ),
]


def _rlimit_field(name: str) -> Any:
    return Field(None, description=f"RLIMIT_{name.upper()}: {RLIMITS[name][1]}.")


class Limits(StrictModel):
    """What one instance's processes may use; unset keys leave the service's own value.

    Raising a hard rlimit, a negative nice and a lower oom_score_adj need root
    (or the matching capability); without it, the program does not start and the
    reason is in its stderr log.
    """

    memory: Size | None = Field(
        None,
        gt=0,
        description="Restart the instance when the resident memory (RSS) of its whole process group "
        "stays above this for memory_interval, like pm2's max_memory_restart.",
    )
    memory_max: Size | None = Field(
        None,
        ge=1024 * 1024,
        description="A hard cap on the memory of the instance's cgroup (memory.max, like systemd's "
        "MemoryMax=): past it the kernel reclaims, then OOM-kills inside the cgroup. At least 1MB. "
        "Without a cgroup v2 memory controller: a restart like memory, after memory_interval above it.",
    )
    cpu_quota: CpuQuota | None = Field(
        None,
        description="The CPU time the instance's cgroup may use (cpu.max, like systemd's CPUQuota=): "
        "0.5 or 50% is half of one CPU, 2 or 200% two CPUs; 0.01 (1%) to 4096. Not enforced without "
        "a cgroup v2 cpu controller.",
    )
    memory_interval: Duration = Field(
        5.0,
        ge=0.1,
        description="How long the RSS must stay above memory before the restart (at least 100ms); "
        "it is read five times in this interval, at most once a second.",
    )
    nice: StrictInt | None = Field(None, ge=-20, le=19, description="The scheduling priority, -20 to 19.")
    oom_score_adj: StrictInt | None = Field(
        None, ge=-1000, le=1000, description="The kernel OOM killer's bias, -1000 (never) to 1000 (first)."
    )
    nofile: Rlimit | None = _rlimit_field("nofile")
    nproc: Rlimit | None = _rlimit_field("nproc")
    core: Rlimit | None = _rlimit_field("core")
    as_: Rlimit | None = Field(None, alias="as", description=f"RLIMIT_AS: {RLIMITS['as'][1]}.")
    fsize: Rlimit | None = _rlimit_field("fsize")
    stack: Rlimit | None = _rlimit_field("stack")
    cpu: Rlimit | None = _rlimit_field("cpu")
    memlock: Rlimit | None = _rlimit_field("memlock")
    data: Rlimit | None = _rlimit_field("data")

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)
