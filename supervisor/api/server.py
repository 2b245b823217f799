"""``serve_control``, which the service runs: the app on every listener, until the service stops.

The routes are a FastAPI app (``app``), served by hypercorn inside the
service's task group: on a unix socket (mode 0600) always, and on a loopback
TCP port with a bearer token (``auth``) when the manifest asks for one
(``listeners``). hypercorn gets sockets we bound ourselves (``fd://N``) and a
shutdown trigger, so it installs no signal handler (the service owns the
signals) and leaves when the service does. What requests ask of instances
runs in the control plane's own task group (``actions``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..manager import Manager
from .app import KEEPALIVE, ControlHooks, create_app
from .auth import BearerAuth
from .listeners import ControlError, ControlListeners, check_socket_free

__all__ = [
    "ControlError",
    "ControlHooks",
    "ControlListeners",
    "check_socket_free",
    "create_app",
    "serve_control",
]

log = logging.getLogger("supervisor.control")

# How long the HTTP servers wait for open requests when the service stops. Streams (logs
# -f, events) end at once on their own; this bounds a request stuck elsewhere.
_GRACE = 2.0
# At a handoff, between the last accept() and telling hypercorn to stop (see serve_control).
_SETTLE = 0.05


async def serve_control(
    manager: Manager,
    hooks: ControlHooks,
    *,
    listeners: ControlListeners | None = None,
    keepalive: float = KEEPALIVE,
    hand_over: anyio.Event | None = None,
    answered: anyio.Event | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API until cancelled; ``started`` once every listener is listening.

    ``hand_over`` (a re-exec, handoff/): once set, stop accepting, let what was accepted be
    read and answered (bounded), and return, leaving the listening sockets open: connections
    that arrive meanwhile wait in the backlog for the next service. ``answered`` is set then,
    before the requests' background work (a stop under way) ends: the re-exec carries it over.

    ``listeners`` bound earlier are served (and closed at the end); without them the
    manifest's are bound here, and ``ControlError`` is raised (before ``started``) when
    one cannot be. ``keepalive``: seconds of quiet after which the event stream sends
    a comment line.
    """
    if listeners is None:
        listeners = ControlListeners(hooks.manifest)
    try:
        closing = anyio.Event()
        async with anyio.create_task_group() as background:
            app = create_app(manager, hooks, background=background, closing=closing, keepalive=keepalive)
            async with anyio.create_task_group() as servers:
                served_fds = []
                for sock, name in listeners.sockets:
                    served = app if name.startswith("unix:") else BearerAuth(app, listeners.token or b"")
                    fd = os.dup(sock.fileno())  # hypercorn owns (and closes) the duplicate
                    served_fds.append(fd)
                    servers.start_soon(_serve_http, served, fd, closing, name=f"control {name}")
                log.info("control API on %s", ", ".join(name for _, name in listeners.sockets))
                task_status.started()
                try:
                    if hand_over is None:
                        await anyio.sleep_forever()
                    await hand_over.wait()
                    _stop_accepting(served_fds)
                    # What was accepted gets read now and counts as in flight: hypercorn answers it
                    # before it stops, instead of closing it as idle (with the request unread).
                    await anyio.sleep(_SETTLE)
                finally:
                    closing.set()
            if answered is not None:
                answered.set()
            background.cancel_scope.cancel()
    finally:
        listeners.close()


def _stop_accepting(fds: list[int]) -> None:
    """No more accept() on hypercorn's listening fds; the sockets stay open (we hold the originals).

    Under asyncio the loop's reader goes (hypercorn removes it itself when it stops, after it
    told every idle connection to close: a connection accepted a moment before would be closed
    unread). Under trio hypercorn stops accepting first anyway.
    """
    if _under_trio():
        return
    import asyncio

    loop = asyncio.get_running_loop()
    for fd in fds:
        loop.remove_reader(fd)


async def _serve_http(app: Any, fd: int, closing: anyio.Event) -> None:
    """hypercorn on one bound socket, until ``closing``; shielded so that it can finish gracefully."""
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{fd}"]
    config.errorlog = _HTTP_LOG
    config.accesslog = None
    config.graceful_timeout = _GRACE
    config.include_server_header = False
    with anyio.CancelScope(shield=True):
        if _under_trio():
            from hypercorn.trio import serve as serve_trio

            await serve_trio(app, config, shutdown_trigger=closing.wait)
        else:
            from hypercorn.asyncio import serve as serve_asyncio

            await serve_asyncio(app, config, shutdown_trigger=closing.wait)


def _under_trio() -> bool:
    """Which hypercorn worker to run: trio's when trio runs this task, asyncio's otherwise.

    (sniffio would say it, but anyio no longer depends on it, and trio is only a test extra.)
    """
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


_HTTP_LOG = logging.getLogger("supervisor.control.http")
_HTTP_LOG.setLevel(logging.WARNING)  # not hypercorn's "Running on … (CTRL + C to quit)"
