"""A manifest check's stand-in that blocks in a read nothing will answer (test_records.py).

The loader refuses what would block it (a fifo, a device); a manifest on a stuck network
mount can still hold a check in its read. This ``main`` (or ``check``, in a fork) is run by
``ManifestCheck(entry=...)`` in the same child, and opens the fifo it is given as the loader
once did.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    check(argv[0], None)
    return 0


def check(path: str, data: object) -> tuple[str, object]:
    """What a forked check runs (``ManifestCheck(fork=True)``)."""
    with open(path, "rb") as fifo:  # no writer: blocks here for good
        fifo.read()
    return ("manifest", None)
