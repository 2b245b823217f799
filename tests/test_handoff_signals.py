"""A signal sent during a re-exec reaches the service that acts on it (handoff/signals.py).

While the handover holds the signals, the main thread blocks them, so the kernel gives a
process-directed one to any other thread that accepts it. Each case runs in an interpreter of
its own (the hold changes the process's signal mask, handlers and wakeup fd) and execs into a
second program, as the re-exec does, which reports what came across: the signal must arrive
exactly once, in the pipe (a thread took it) or pending (none did).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.handoff.signals import HANDOFF_SIGNALS, read_held

from .helpers import handoff_record

ROOT = Path(__file__).resolve().parent.parent

#: The program exec'd into: what the new service would find.
AFTER_EXEC = textwrap.dedent(
    """
    import json, signal, sys
    from supervisor.handoff.signals import read_held
    fd = int(sys.argv[1])
    print(json.dumps({"held": read_held(fd), "pending": sorted(signal.sigpending())}), flush=True)
    """
)

#: Hold the signals, send ``SIGNAL`` to the process, wait until it is taken or pending, exec.
BEFORE_EXEC = textwrap.dedent(
    """
    import os, select, signal, sys, threading, time
    from supervisor.handoff.signals import HeldSignals
    idle = threading.Event()
    if WORKER:  # an idle worker thread, started before the hold: it accepts the signal
        threading.Thread(target=idle.wait, daemon=True).start()
    held = HeldSignals()
    os.kill(os.getpid(), SIGNAL)
    if WORKER:
        ready, _, _ = select.select([held.fd], [], [], 30)  # the worker's C handler wrote it
        assert ready, "no thread took the signal"
    else:
        assert SIGNAL in signal.sigpending()
    os.set_inheritable(held.fd, True)
    os.execv(sys.executable, [sys.executable, "-c", AFTER_EXEC, str(held.fd)])
    """
)


def _across_exec(signum: int, *, worker: bool) -> dict[str, list[int]]:
    program = f"WORKER = {worker}\nSIGNAL = {int(signum)}\nAFTER_EXEC = {AFTER_EXEC!r}\n" + BEFORE_EXEC
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_signal_a_worker_thread_takes_during_the_hold_crosses_the_exec_in_the_pipe() -> None:
    # Before, a worker's C handler only marked it for the main thread's Python handler, which
    # never ran once the main thread was in execv: the TERM was lost.
    found = _across_exec(signal.SIGTERM, worker=True)
    assert found == {"held": [signal.SIGTERM], "pending": []}


def test_a_signal_no_thread_takes_crosses_the_exec_pending_and_only_so() -> None:
    found = _across_exec(signal.SIGHUP, worker=False)
    assert found == {"held": [], "pending": [signal.SIGHUP]}


def test_release_gives_back_the_handlers_and_the_wakeup_fd_and_what_came() -> None:
    program = textwrap.dedent(
        """
        import json, os, select, signal, socket, threading
        from supervisor.handoff.signals import HeldSignals
        loop_side, _ = socket.socketpair()
        loop_side.setblocking(False)
        signal.set_wakeup_fd(loop_side.fileno())
        seen = []
        signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        held = HeldSignals()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert select.select([held.fd], [], [], 30)[0]
        came = held.release()
        wakeup = signal.set_wakeup_fd(-1)
        print(json.dumps({"came": came, "seen": seen, "wakeup_restored": wakeup == loop_side.fileno(),
                          "handler_restored": signal.getsignal(signal.SIGUSR2) is not signal.SIG_DFL
                          and signal.getsignal(signal.SIGUSR2).__name__ == "<lambda>",
                          "blocked": signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, [])}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    # The loop's handler did not act on it while held; the caller unblocks, then raises it again.
    assert found == {
        "came": [signal.SIGUSR2],
        "seen": [],
        "wakeup_restored": True,
        "handler_restored": True,
        "blocked": True,
    }


def test_the_pipe_keeps_only_the_handoffs_signals_each_once_in_order() -> None:
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # Another signal's number (USR1 had a Python handler), repeats, a byte that is no signal.
        os.write(write, bytes([signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM, signal.SIGHUP, 0, 255]))
        os.write(write, bytes([signal.SIGTERM]) * 10_000)  # more than one read's worth
        assert read_held(read) == [signal.SIGHUP, signal.SIGTERM]
        assert read_held(read) == []  # drained
        os.close(write)
        write = -1
        assert read_held(read) == []  # and at EOF
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    assert signal.SIGUSR1 not in HANDOFF_SIGNALS


def _record(**service: object) -> bytes:
    return json.dumps(handoff_record(**service)).encode()


@pytest.mark.parametrize("value", [-1, 2**31, 2**63, 3.0, "3", True, [3], {"fd": 3}])
def test_a_record_whose_held_signals_are_no_descriptor_is_refused(value: object) -> None:
    from supervisor.handoff.state import HandoffError, parse_state

    with pytest.raises(HandoffError, match=r"service\.signals must be a descriptor number") as refused:
        parse_state(_record(signals=value))
    assert "the running service goes on as it is" in str(refused.value)
    for word in (b"NaN", b"Infinity", b"1e400"):  # json.loads takes them as floats
        with pytest.raises(HandoffError, match=r"service\.signals must be a descriptor number"):
            parse_state(_record(signals=7).replace(b'"signals": 7', b'"signals": ' + word))
    assert parse_state(_record(signals=7))["service"]["signals"] == 7
    assert "signals" not in parse_state(_record())["service"]  # optional: an older service's
