"""The exec probes whose programs run now, and their end at a re-exec.

A probe's program is a child of the service (probes.py spawns it): at a re-exec its pidfd
and output pipe close, and the new code knows nothing of it. ``end_exec_probes`` is the
exec's last step (handoff/reexec.py), synchronous and without imports, so that none outlives
the handover; the new service probes again.
"""

from __future__ import annotations

import select
import signal
import time

from .process import Child

__all__ = ["END_WAIT", "EXEC_RUNS", "ExecRun", "end_exec_probes"]


class ExecRun:
    """One exec probe's program while it runs (``EXEC_RUNS``), and whether a re-exec ended it."""

    __slots__ = ("child", "ended")

    def __init__(self, child: Child) -> None:
        self.child = child
        self.ended = False


#: The exec probes whose program runs now, of every instance: what ``end_exec_probes`` ends.
EXEC_RUNS: dict[ExecRun, None] = {}
#: How long ``end_exec_probes`` waits, in all, for the killed programs to be reaped.
END_WAIT = 1.0


def end_exec_probes(wait: float = END_WAIT) -> int:
    """Kill every exec probe's process group now, and reap each program: the re-exec's last step.

    Synchronous, for ``handoff.reexec.exec_service`` right before its ``execv``: the probe's
    program is a child of the service, its pidfd and its output pipe close at the exec, and
    the new code knows nothing of it. Left alone, it ran on unwatched, its timeout counted by
    nobody (a ``sleep 30`` probe: 30 s; a hung one: for ever). Ended here, the new service
    simply runs the probe again when its check's turn comes. Each program is reaped (so the
    guardian forgets its group) once its pidfd says it has ended, within ``wait`` in all; one
    that has not by then (held in the kernel: a hung mount) is killed all the same, and the
    new service's orphan reaper takes its status when it goes, as it does the group's other
    processes (reparented to the service, a subreaper). Returns how many were killed.

    If the ``execv`` fails after this, the service goes on, and each probe ended here begins
    its attempt again (probes.py's ``_exec``): the kill is not the probe's failure.
    """
    runs = [run for run in EXEC_RUNS if run.child.exit is None]
    for run in runs:
        run.ended = True
        run.child.send_signal(signal.SIGKILL, group=True)
    deadline = time.monotonic() + wait
    for run in runs:
        child = run.child
        fd = child.pidfd
        if fd is not None and child.exit is None:
            poller = select.poll()  # not select(): a service with many instances has fds past 1024
            poller.register(fd, select.POLLIN)
            poller.poll(max(0, round((deadline - time.monotonic()) * 1000)))
        child.poll()
    return len(runs)
