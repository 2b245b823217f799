"""What a log sink keeps in memory: the tail of a stream and each follower's queue, bounded in bytes.

Both are bounded by what they cost, not by what they count. A chatty child that writes
2-byte lines one ``write`` at a time hands the sink one tiny ``bytes`` object per read; a
tail kept as those objects costs about 40 bytes of memory per 2 bytes of text (a
256 KiB tail took 7.45 MB). A follower that stopped reading (a paused ``| less``)
must not pin what it has not read: its queue holds at most a fixed number of bytes,
and what does not fit is dropped and counted.
"""

from __future__ import annotations

from collections import deque

import anyio
import anyio.lowlevel

__all__ = ["Follower", "Tail", "dropped_marker"]

# The tail copies what it keeps into blocks of this size: one Python object per block,
# and at most about two blocks beyond the limit (the oldest, partly trimmed, and the one
# being filled).
_BLOCK = 16 * 1024
_NEWLINE = ord("\n")


class Tail:
    """The last ``limit`` bytes of a stream, in blocks of ``_BLOCK`` bytes.

    Appending copies the chunk into the open block (a ``bytearray``), which is sealed
    into ``bytes`` once full; a big chunk is cut into blocks. Trimming moves an offset
    into the oldest block and lets the block go once the offset passes its end. So the
    memory held is ``limit`` plus about two blocks, whatever the chunks were. Splitting
    into lines waits until someone asks, which is rare next to how often chunks arrive.
    """

    def __init__(self, limit: int) -> None:
        self._limit = max(0, limit)
        # Sealed, oldest first. A list, not a deque: an empty deque takes 0.6 KB and every instance
        # has two tails; popping the front moves at most limit/_BLOCK pointers.
        self._blocks: list[bytes] = []
        self._open = bytearray()  # the newest bytes, after every sealed block
        self._head = 0  # bytes of _blocks[0] already trimmed
        self._size = 0  # bytes kept
        # The kept bytes begin a line (nothing trimmed yet, or trimmed right after a newline).
        self._starts_line = True

    def append(self, data: bytes) -> None:
        limit = self._limit
        if not limit or not data:
            return
        if len(data) > limit:
            # Everything kept so far, and this chunk's front, would be trimmed at once.
            self._starts_line = data[-limit - 1] == _NEWLINE
            data = data[-limit:]
            self._blocks.clear()
            self._open = bytearray()
            self._head = self._size = 0
        view = memoryview(data)
        room = _BLOCK - len(self._open)
        if len(view) < room:
            self._open += view
        else:
            self._open += view[:room]
            self._seal()
            pos = room
            while len(view) - pos >= _BLOCK:
                self._blocks.append(bytes(view[pos : pos + _BLOCK]))
                pos += _BLOCK
            self._open += view[pos:]
        self._size += len(view)
        self._trim(self._size - limit)

    def lines(self, n: int) -> list[bytes]:
        """The last ``n`` lines, without newlines; a line cut off by trimming is left out."""
        if n <= 0 or not self._size:
            return []
        parts: list[bytes | bytearray | memoryview] = list(self._blocks)
        if parts:
            parts[0] = memoryview(self._blocks[0])[self._head :]
        parts.append(self._open)
        data = b"".join(parts)
        if data.endswith(b"\n"):
            data = data[:-1]
        lines = data.rsplit(b"\n", n)
        if len(lines) > n or not self._starts_line:
            del lines[0]
        return lines

    def _seal(self) -> None:
        if self._open:
            self._blocks.append(bytes(self._open))
            self._open = bytearray()

    def _trim(self, excess: int) -> None:
        while excess > 0:
            if self._blocks:
                first = self._blocks[0]
                left = len(first) - self._head
                if left <= excess:
                    del self._blocks[0]
                    self._starts_line = first[-1] == _NEWLINE
                    self._head = 0
                    cut = left
                else:
                    self._head += excess
                    self._starts_line = first[self._head - 1] == _NEWLINE
                    cut = excess
            else:  # a tail smaller than a block: trim the open one (cheap at its front)
                self._starts_line = self._open[excess - 1] == _NEWLINE
                del self._open[:excess]
                cut = excess
            self._size -= cut
            excess -= cut


def dropped_marker(count: int) -> bytes:
    return b"[supervisor] follower too slow: %d bytes dropped\n" % count


class Follower:
    """One subscriber's queue of whole-line chunks, bounded in bytes.

    ``offer`` never waits. A chunk that would take the queue past ``capacity`` bytes
    is dropped and counted; an empty queue takes any one chunk whole (so a line longer
    than the capacity still gets through to a reader that keeps up), so a follower
    holds at most ``capacity`` bytes or one chunk. Once it has read everything it had
    before the gap, it gets a marker line saying how much it missed, then live data
    again. Until then new chunks are dropped too: a follower just a little slower than
    the child gets one marker per gap, not a marker after every other line.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._dropped = 0
        self._closed = False
        self._wakeup: anyio.Event | None = None

    def offer(self, chunk: bytes) -> None:
        if self._queue and (self._dropped or self._queued + len(chunk) > self._capacity):
            self._dropped += len(chunk)
            return
        if self._dropped:
            self._push(dropped_marker(self._dropped))
            self._dropped = 0
        self._push(chunk)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _push(self, chunk: bytes) -> None:
        self._queue.append(chunk)
        self._queued += len(chunk)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> bytes:
        # A checkpoint even when data is ready: a follower that never waits must still
        # let the read loop (and everything else) run. Taken before popping, so a
        # cancellation here loses nothing.
        await anyio.lowlevel.checkpoint()
        while True:
            if self._queue:
                chunk = self._queue.popleft()
                self._queued -= len(chunk)
                return chunk
            if self._dropped:
                # The gap is the last thing that happened: say so now, not at the next line.
                count, self._dropped = self._dropped, 0
                return dropped_marker(count)
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
