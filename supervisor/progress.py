"""A live count of instances done while a long CLI request runs (``restart --all``, ``stop``, ``wait``).

Only on a terminal: when stderr is not one, nothing happens here at all (no
extra request, not a byte written), so scripts and logs see what they always
saw. On a terminal, the event stream is subscribed *before* the request goes
out, the starting states are read once, and a thread counts the instances
that reach a target state as transitions arrive, rewriting one line on
stderr (``\\r``); the line is erased when the request returns.

Standard library only: the CLI imports this.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .api.client import Client, EventStream

__all__ = ["progress"]

_UP = frozenset({"running", "exited", "failed"})
_DOWN = frozenset({"stopped", "exited", "failed"})
_CLEAR = "\r\x1b[K"


def targets_for(verb: str) -> tuple[frozenset[str], bool]:
    """The states that count as done for ``verb``, and whether a state held at the start counts."""
    if verb == "stop":
        return _DOWN, True
    if verb == "start":
        return _UP, True
    return _UP, False  # restart: each one has to go round again


@contextmanager
def progress(
    client: Client,
    label: str,
    names: Sequence[str],
    *,
    every: bool,
    targets: Collection[str],
    count_initial: bool,
    stream: TextIO | None = None,
) -> Iterator[None]:
    """Show ``label: N/M done`` on a terminal while the block runs; do nothing otherwise."""
    out = sys.stderr if stream is None else stream
    if not _is_terminal(out):
        yield
        return
    from .api.client import ClientError

    try:
        events = client.event_stream()
    except ClientError:
        yield  # the request itself will say what is wrong
        return
    counter = _Counter(out, label, frozenset(targets))
    try:
        statuses = client.status([] if every else list(names))
        counter.begin(statuses, count_initial)
        reader = threading.Thread(target=counter.follow, args=(events, client), daemon=True)
        reader.start()
    except ClientError:
        events.close()
        yield
        return
    try:
        yield
    finally:
        events.interrupt()
        reader.join(timeout=5)
        events.close()
        counter.erase()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Counter:
    """Which of the selected instances are done; one line on the terminal that says how many."""

    def __init__(self, out: TextIO, label: str, targets: frozenset[str]) -> None:
        self._out = out
        self._label = label
        self._targets = targets
        self._pending: set[str] = set()
        self._done: set[str] = set()
        self._lock = threading.Lock()
        self._shown = ""

    def begin(self, statuses: list[dict[str, Any]], count_initial: bool) -> None:
        with self._lock:
            for status in statuses:
                if count_initial and status["state"] in self._targets:
                    self._done.add(status["name"])
                else:
                    self._pending.add(status["name"])
            self._render()

    def follow(self, events: EventStream, client: Client) -> None:
        from .api.client import ClientError

        try:
            for event in events:
                if "dropped" in event:
                    # Missed transitions: what the instances are in now is the best we know.
                    self._refresh(client.status(sorted(self._pending)) if self._pending else [])
                elif event.get("instance") in self._pending and event.get("to_state") in self._targets:
                    with self._lock:
                        self._pending.discard(event["instance"])
                        self._done.add(event["instance"])
                        self._render()
        except (ClientError, OSError, ValueError):
            return  # interrupted, or the service went away: the request says the rest

    def _refresh(self, statuses: list[dict[str, Any]]) -> None:
        with self._lock:
            for status in statuses:
                if status["state"] in self._targets:
                    self._pending.discard(status["name"])
                    self._done.add(status["name"])
            self._render()

    def _render(self) -> None:
        total = len(self._done) + len(self._pending)
        text = f"{self._label}: {len(self._done)}/{total} done"
        if text != self._shown and total:
            self._shown = text
            self._write(f"\r{text}\x1b[K")

    def erase(self) -> None:
        with self._lock:
            if self._shown:
                self._write(_CLEAR)
                self._shown = ""

    def _write(self, text: str) -> None:
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError):
            pass  # the terminal went away; the request goes on
