"""Which instances a request's names select: exact names, manifest names, globs.

A request names what it acts on by replica name (``web-0``), by manifest name
(``web``: every replica) or by glob (``web-*``). Names are looked up; only a glob
is matched against every instance, so a request's cost is its globs times the
instances, and the number of globs is what is bounded: a mebibyte of JSON holds
eighty thousand, and matched one by one over a thousand instances they held the
event loop for about a minute (twenty thousand plain names, each compared with
every instance then, held it ten seconds; looked up, 70 ms with the request's
parsing). Instance names cannot hold ``*``, ``?`` or ``[``
(config/models.py), so a pattern with one of them is a glob and nothing else.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

__all__ = ["MAX_GLOBS", "TooManyGlobs", "UnknownInstance", "select"]

#: Globs one selection may hold. Each is a regular expression's match per instance (a glob over
#: 10,000 instances: 2 to 4 ms of the event loop), and a person or a script names a few:
#: ``'web-*' 'worker-*'``. Names and manifest names are looked up, any number of them.
MAX_GLOBS = 16

_GLOB = re.compile(r"[*?\[]")


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class UnknownInstance(LookupError):
    """A name or pattern that matches no instance."""

    def __init__(self, pattern: str, known: Iterable[str]) -> None:
        self.pattern = pattern
        names = sorted(known)
        listing = ", ".join(names[:10]) + (", …" if len(names) > 10 else "")
        super().__init__(f"no instance matches {pattern!r} (known: {listing or 'none'})")


class TooManyGlobs(ValueError):
    """More globs in one selection than ``MAX_GLOBS``: refused before any is matched."""

    def __init__(self, count: int) -> None:
        self.count = count
        super().__init__(
            f"at most {MAX_GLOBS} patterns with * ? or [ in one request, not {count}: "
            "name the instances (any number of names), or use fewer, broader patterns"
        )


def select(instances: Mapping[str, T], groups: Mapping[str, Sequence[T]], patterns: Sequence[str]) -> list[T]:
    """The instances ``patterns`` select, in the patterns' order (each pattern's in
    ``instances``' order), each once; every instance when there is no pattern.

    ``groups``: the replicas by manifest name. TooManyGlobs before anything is matched;
    UnknownInstance for the first pattern that selects nothing.
    """
    if not patterns:
        return list(instances.values())
    distinct = list(dict.fromkeys(patterns))
    globs = [pattern for pattern in distinct if _GLOB.search(pattern)]
    if len(globs) > MAX_GLOBS:
        raise TooManyGlobs(len(globs))
    names = list(instances) if globs else []
    chosen: dict[str, T] = {}
    for pattern in distinct:
        if _GLOB.search(pattern):
            found = [instances[name] for name in filter(re.compile(fnmatch.translate(pattern)).match, names)]
        elif pattern in groups:
            found = list(groups[pattern])
        else:
            one = instances.get(pattern)
            found = [] if one is None else [one]
        if not found:
            raise UnknownInstance(pattern, instances)
        chosen.update((instance.name, instance) for instance in found)
    return list(chosen.values())
