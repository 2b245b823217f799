"""A manifest check's stand-in that blocks in a read nothing will answer (test_records.py).

The loader refuses what would block it (a fifo, a device); a manifest on a stuck network
mount can still hold a check in its read. This ``main`` is run by ``ManifestCheck(entry=...)``
in the same child interpreter, and opens the fifo it is given as the loader once did.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    with open(argv[0], "rb") as fifo:  # no writer: blocks here for good
        fifo.read()
    return 0
