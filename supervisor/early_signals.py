"""Signals that come before the service listens for them: none of them ends it.

``supervisor run`` takes its signals through the event loop (service.py), which listens
only once the manifest is checked and the service is set up: the first few hundred
milliseconds of a start. Until then the kernel's defaults applied, and each of SIGHUP,
SIGUSR1 and SIGUSR2 ended the process, although none of them means "stop" to the service:
a `systemctl reload`, a config tool or a logrotate recipe written for nginx that sent one
right after a start killed the service, and the guardian then SIGKILLed every instance.

So, from the moment ``cmd_run`` runs: USR1 does nothing (as later), USR2 does nothing
(the log files it would reopen are not open yet), and HUP is remembered: the service
reloads once it listens (``reload_asked``), so that a manifest edited while the start read
the old one is applied. Handlers, not SIG_IGN: an ignored signal stays ignored in what the
service starts, a handled one is back to its default there. A signal ignored when the
service started (nohup's SIGHUP) stays ignored. Before the interpreter reaches ``cmd_run``
(its own start-up, some 40 ms) the defaults still apply: nothing in Python runs sooner.
"""

from __future__ import annotations

import signal

__all__ = ["catch_early_signals", "reload_asked"]

_hup = False


def _nothing(signum: int, frame: object) -> None:
    """SIGUSR1 (and SIGUSR2 until the service listens for it): nothing to do."""


def _remember(signum: int, frame: object) -> None:
    global _hup
    _hup = True


def catch_early_signals() -> None:
    """Install the handlers above for the signals still at their default (main thread only)."""
    handlers = {signal.SIGUSR1: _nothing, signal.SIGUSR2: _nothing, signal.SIGHUP: _remember}
    for signum, handler in handlers.items():
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, handler)


def reload_asked() -> bool:
    """Whether a SIGHUP came before the service listened; the answer is given once."""
    global _hup
    asked, _hup = _hup, False
    return asked
