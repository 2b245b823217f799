"""The service's own log handler: a write to stderr that would block is dropped and counted instead.

Why not ``logging.StreamHandler(sys.stderr)``: the service is one event loop, and a blocking
write to a stderr nobody reads (``supervisor run 2>&1 | sleep 1000``, a terminal paused with
Ctrl-S) stopped it for good once the pipe held 64 KiB: no control API, no restarts, not even
SIGTERM. Two easier ways out are closed:

* O_NONBLOCK on fd 2 would be set on its open file description, which instances share
  (``stdout: inherit`` / ``stderr: inherit`` hand them the service's own streams): they would
  start getting EAGAIN from their own writes.
* A writer thread: the service is single-threaded by design.

So each write is asked first: ``poll`` says whether the fd takes output now, and a write goes
out in pieces of at most PIPE_BUF (4096) bytes. What guarantees that such a write does not block
on a pipe (Linux, fs/pipe.c): ``pipe_poll`` reports POLLOUT exactly when the pipe's ring has a
free slot, and ``pipe_write`` puts a write of at most a page (4096 bytes or more) either into
the last buffer, when it fits there, or whole into one free slot; it waits only when no slot is
free. The one window left: another writer of the same pipe (an instance with ``inherit``) taking
the last slot between the poll and the write; the service then waits, as before, until the
reader reads. A terminal stopped by XOFF, or with no room, polls as not writable (one with some
room, but less than the piece, takes part and waits for the rest: a best effort there, where
the pipe's is a guarantee); regular files and /dev/null always poll writable (their writes do
not wait on a reader).

When the fd does not take output, the rest of that record and the records after it are
dropped and counted; once it does again, one line first says how many were lost and why, then
logging goes on. A reader that went away (EPIPE) or any other write error loses the record the
same way, and the service carries on, as it did with the stream handler.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import traceback

__all__ = ["PIPE_BUF", "NonBlockingHandler", "service_handler"]

#: The most bytes one write takes: POSIX's PIPE_BUF on Linux, and no more than a page.
PIPE_BUF = 4096
_ANY = select.POLLOUT | select.POLLERR | select.POLLHUP | select.POLLNVAL


class NonBlockingHandler(logging.Handler):
    """Writes each formatted record to ``fd`` only while it takes output without blocking.

    ``name`` says what ``fd`` is in the line reporting losses ("stderr"). ``dropped`` counts the
    records lost since the last line that got out; 0 while writing works.
    """

    def __init__(
        self, fd: int, *, name: str = "stderr", encoding: str = "utf-8", errors: str = "backslashreplace"
    ) -> None:
        super().__init__()
        self.fd = fd
        self.name = name
        self.encoding = encoding
        self.errors = errors
        self.dropped = 0
        self._why = ""
        self._midline = False  # part of a record got out: the next line starts with a newline
        self._poll = select.poll()  # poll, not select: no FD_SETSIZE limit on the fd
        self._poll.register(fd, select.POLLOUT)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(self.encoding, self.errors)
        except Exception:
            self.handleError(record)
            return
        if self.dropped and not self._announce_losses():
            self.dropped += 1
            return
        if not self._write(data):
            self.dropped += 1

    def handleError(self, record: logging.LogRecord) -> None:
        """What ``logging`` would print for a record it cannot format, through the same careful write.

        The default handler prints it to ``sys.stderr``, blocking: the very write this one avoids.
        """
        if logging.raiseExceptions:
            text = f"--- Logging error ---\n{traceback.format_exc()}Message: {record.msg!r}\n"
            self._write(text.encode(self.encoding, self.errors))

    def _announce_losses(self) -> bool:
        count, self.dropped = self.dropped, 0
        args = (count, self.name, self._why)
        notice = logging.LogRecord(
            "supervisor", logging.WARNING, __file__, 0, "%d log lines dropped: %s %s", args, None
        )
        try:
            line = ("\n" if self._midline else "") + self.format(notice) + "\n"
        except Exception:
            line = f"{count} log lines dropped: {self.name} {self._why}\n"
        self._midline = False
        if self._write(line.encode(self.encoding, self.errors)):
            return True
        self.dropped = count  # still lost; this record is counted by the caller
        return False

    def _write(self, data: bytes) -> bool:
        """All of ``data``, or as much as the fd takes without blocking: True when all got out."""
        sent = 0
        while sent < len(data):
            reason = self._unwritable()
            if reason is None:
                try:
                    sent += os.write(self.fd, data[sent : sent + PIPE_BUF])
                    continue
                except OSError as exc:  # EAGAIN: an fd made non-blocking by someone else, and full
                    full = exc.errno == errno.EAGAIN
                    reason = "was not being read" if full else f"failed: {exc.strerror or exc}"
            self._why = reason
            if sent:
                self._midline = True
            return False
        return True

    def _unwritable(self) -> str | None:
        """None when a write of up to PIPE_BUF bytes goes out now; else why not."""
        try:
            ready = self._poll.poll(0)
        except OSError as exc:
            return f"failed: {exc.strerror or exc}"
        if not any(events & _ANY for _, events in ready):
            return "was not being read"
        return None  # POLLERR, POLLHUP, POLLNVAL: the write fails at once, with its own reason


def service_handler(stream: object | None = None) -> logging.Handler:
    """The handler for the service's own log on ``stream`` (``sys.stderr`` by default).

    A stream without a real fd (a test's in-memory capture) keeps the plain stream handler:
    it cannot block on a reader.
    """
    stream = sys.stderr if stream is None else stream
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return logging.StreamHandler(stream)  # type: ignore[arg-type]
    encoding = getattr(stream, "encoding", None) or "utf-8"
    errors = getattr(stream, "errors", None) or "backslashreplace"
    return NonBlockingHandler(fd, name="stderr", encoding=encoding, errors=errors)
