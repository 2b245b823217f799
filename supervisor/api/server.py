"""``serve_control``, which the service runs: the app on every listener, until the service stops.

The routes are an ASGI app (``app``), served by our own HTTP/1.1 server (``http1``)
inside the service's task group: on a unix socket (mode 0600) always, and on a
loopback TCP port with a bearer token (``auth``) when the manifest asks for one
(``listeners``). The server takes the sockets we bound ourselves and never closes
them, installs no signal handler (the service owns the signals), and knows which
connections it accepted: a re-exec answers exactly those and leaves the rest in
the backlog for the next service. What requests ask of instances runs in the
control plane's own task group (``actions``).
"""

from __future__ import annotations

import logging
import socket

import anyio
from anyio.abc import TaskStatus

from ..manager import Manager
from .app import KEEPALIVE, ControlHooks, create_app
from .auth import BearerAuth
from .http1 import ASGIApp, HTTPServer, Limits
from .listeners import ControlError, ControlListeners, check_socket_free
from .live import stream_cap, wait_cap

__all__ = [
    "ControlError",
    "ControlHooks",
    "ControlListeners",
    "check_socket_free",
    "create_app",
    "serve_control",
]

log = logging.getLogger("supervisor.control")

# How long the HTTP server waits for open requests when the service stops. Streams (logs
# -f, events) end at once on their own; this bounds a request stuck elsewhere.
_GRACE = 2.0


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

    ``hand_over`` (a re-exec, handoff/): once set, stop accepting, let the requests that have
    begun to arrive be read and answered (bounded), and return, leaving the listening sockets
    open (connections that arrive meanwhile wait in the backlog for the next service) and
    every connection between two requests open in ``listeners.connections``, for the next
    service to serve. ``answered`` is set then, before the requests' background work (a stop
    under way) ends: the re-exec carries it over.

    ``listeners`` bound earlier are served (and closed at the end); without them the
    manifest's are bound here, and ``ControlError`` is raised (before ``started``) when
    one cannot be. ``keepalive``: seconds of quiet after which the event stream sends
    a comment line.
    """
    if listeners is None:
        listeners = ControlListeners(hooks.manifest)
    try:
        closing = anyio.Event()
        limits = Limits(grace=_GRACE)
        server = HTTPServer(limits)
        async with anyio.create_task_group() as background:
            app = create_app(
                manager,
                hooks,
                background=background,
                closing=closing,
                keepalive=keepalive,
                # Streams hold their connections: some are always left to the other requests.
                max_streams=stream_cap(limits.connections),
                max_waiting=wait_cap(limits.connections),
            )
            endpoints: list[tuple[socket.socket, ASGIApp]] = [
                (sock, app if name.startswith("unix:") else BearerAuth(app, listeners.token or b""))
                for sock, name in listeners.sockets
            ]
            adopted = listeners.take_connections()  # handed over by the last server (a re-exec)
            async with anyio.create_task_group() as servers:
                servers.start_soon(_serve_http, server, endpoints, adopted, name="control API")
                listeners.server = server  # a reload makes the unix socket again if it was deleted
                log.info("control API on %s", ", ".join(name for _, name in listeners.sockets))
                task_status.started()
                try:
                    if hand_over is None:
                        await anyio.sleep_forever()
                    await hand_over.wait()
                    # No accept() from here; a request that has begun to arrive is read and
                    # answered, a connection between two requests is kept (http1.HTTPServer).
                    server.stop(handover=True)
                finally:
                    listeners.server = None
                    server.stop()
                    closing.set()
            listeners.connections += server.handed
            if answered is not None:
                answered.set()
            background.cancel_scope.cancel()
    finally:
        listeners.close()


async def _serve_http(
    server: HTTPServer,
    endpoints: list[tuple[socket.socket, ASGIApp]],
    adopted: list[tuple[socket.socket, int]],
) -> None:
    """The server, shielded: when the service stops (or cancels us), it still finishes gracefully."""
    with anyio.CancelScope(shield=True):
        await server.serve(endpoints, adopted=adopted)


_HTTP_LOG = logging.getLogger("supervisor.control.http")
_HTTP_LOG.setLevel(logging.WARNING)  # failed requests; never an access log
