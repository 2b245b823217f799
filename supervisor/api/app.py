"""The API's routes over a manager: a starlette app; each route declares what the OpenAPI document says of it.

Bodies and query parameters are validated by the wire models (``inputs``); the
document is built from the same declarations (``openapi``), on first request.
FastAPI did both until #13: it cost about 7 MiB and 40 % of the control plane's
start-up for four small bodies and two query strings (docs/performance.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from ..config import Manifest
from ..events import Event, sse_chunk
from ..instance import Instance, InvalidRequest
from ..manager import Manager, ReloadReport, UnknownInstance
from ..pidns import service_pid
from .actions import REMOVED, Actions, action_response, refusal, result, run_all
from .answers import wire_status, wire_statuses
from .errors import ERRORS, HANDLERS, error
from .inputs import body, optional_body, query
from .limits import BodyLimit
from .live import MAX_STREAMS, MAX_WAITING, LiveResponse, StreamSlots, WaitSlots
from .openapi import Answer, Endpoint, Operation, serve_document
from .requests import (
    ActionRequest,
    InstancesQuery,
    LogsQuery,
    ReexecRequest,
    ScaleRequest,
    SignalRequest,
    WaitRequest,
)
from .sampling import Sampler
from .web import dashboard_routes

__all__ = ["KEEPALIVE", "ControlHooks", "UntilRosterKnown", "create_app"]

# A comment line on the event stream this often: a proxy or a client can tell a quiet
# stream from a dead one.
KEEPALIVE = 15.0
_WAIT_DEFAULT = 30.0
_INFO = {
    "title": "supervisor control API",
    "version": "1",
    "summary": "Query and steer the instances of one running `supervisor run`.",
}


class ControlHooks(Protocol):
    """What the control server asks of the service (``service.Service`` is one)."""

    @property
    def manifest(self) -> Manifest:
        """The manifest in force: where to listen, and how to authenticate TCP clients."""
        ...

    async def reload(self) -> ReloadReport:
        """Re-read the manifest; raise ``ManifestError`` (and change nothing) when it is bad."""
        ...

    async def shutdown(self) -> None:
        """Stop every instance gracefully, then end the service."""
        ...

    def reopen_logs(self) -> tuple[int, list[str]]:
        """Reopen every log file; how many were, and why each other one was not."""
        ...



class UntilRosterKnown:
    """ASGI middleware: during start-up, requests wait until the manager knows its instances.

    The socket is served before the manager makes the first manifest's instances (a cold
    start answers sooner, and status answers while they spawn). Meanwhile ``/v1/health``
    answers at once; everything else waits those few moments instead of finding no
    instance (``supervisor run & supervisor wait web`` must not get "no instance matches").
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], manager: Manager) -> None:
        self.app = app
        self.known = manager.roster_known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.known.is_set() and scope["type"] == "http" and scope["path"] != "/v1/health":
            await self.known.wait()
        await self.app(scope, receive, send)


def create_app(
    manager: Manager,
    hooks: ControlHooks,
    *,
    background: TaskGroup,
    closing: anyio.Event | None = None,
    keepalive: float = KEEPALIVE,
    max_streams: int = MAX_STREAMS,
    max_waiting: int = MAX_WAITING,
) -> Starlette:
    """The API's routes over ``manager``.

    What requests ask of instances runs in ``background``; live streams end at ``closing``,
    and at most ``max_streams`` of them are open at once (``live.StreamSlots``: give it
    fewer than the server's connections, ``live.stream_cap(connections)``).
    """
    slots = StreamSlots(max_streams)
    waiting = WaitSlots(max_waiting)
    routes: list[BaseRoute] = [
        *_routes(manager, hooks, background, closing or anyio.Event(), keepalive, slots, waiting),
        *dashboard_routes(),
    ]
    routes.append(Route("/openapi.json", serve_document(routes, _INFO), methods=["GET"]))
    return Starlette(
        routes=routes,
        middleware=[Middleware(UntilRosterKnown, manager=manager), Middleware(BodyLimit)],
        exception_handlers=HANDLERS,
    )


def _routes(
    manager: Manager,
    hooks: ControlHooks,
    background: TaskGroup,
    closing: anyio.Event,
    keepalive: float,
    slots: StreamSlots,
    waiting: WaitSlots,
) -> list[Endpoint]:
    actions = Actions(manager, background, closing, waiting)
    sampler = Sampler(background)

    async def health(_: Request) -> Response:
        """The service answers; what it runs."""
        states = Counter(str(i.state) for i in manager.instances.values())
        source = hooks.manifest.source
        return JSONResponse({
            "ok": True,
            "pid": service_pid(),  # as seen from outside (--pid-namespace: not 1)
            "manifest": str(source) if source else None,
            "instances": len(manager.instances),
            "states": dict(states),
            "handoffs": getattr(hooks, "handoffs", 0),
            "handoff_error": getattr(hooks, "handoff_error", None),
            "starting": not manager.started.is_set(),
            "streams": slots.open,
            "streams_max": slots.cap,
            "waits": waiting.open,
            "waits_max": waiting.cap,
        })

    async def list_instances(request: Request) -> Response:
        """Status of every instance, or of those ``names`` select (404 when one selects none)."""
        names = query(request, InstancesQuery).names
        statuses = manager.status(names or ())
        figures = await sampler.figures([s.pid for s in statuses], _cgroups(manager))
        body = wire_statuses(statuses, figures)
        return Response(body, media_type="application/json", background=sampler.after_response())

    async def get_instance(request: Request) -> Response:
        """Status of one instance, by its exact name."""
        instance = _instance(manager, request.path_params["name"])
        status = instance.status()
        figures = await sampler.figures([status.pid], _cgroups(manager))
        body = wire_status(status, figures.get(status.pid or 0))
        return JSONResponse(body, background=sampler.after_response())

    async def send_signal(request: Request) -> Response:
        """Send a signal to each selected instance's process (its group when ``stop.group`` is set)."""
        asked = await body(request, SignalRequest)
        results = []
        for instance in manager.select(asked.patterns):
            try:
                instance.signal(asked.signal)
            except InvalidRequest as exc:
                results.append(result(instance, False, refusal(instance, exc)))
            else:
                results.append(result(instance, True))
        return action_response(results)

    async def wait(request: Request) -> Response:
        """Wait until each selected instance is in one of ``state`` (default timeout 30s)."""
        asked = await body(request, WaitRequest)
        # Up to its timeout, a week at most: it holds one of the places of the requests that wait.
        with waiting.place() as taken:
            return await waited(request, asked) if taken else waiting.refused()

    async def waited(request: Request, asked: WaitRequest) -> Response:
        timeout = _WAIT_DEFAULT if asked.timeout is None else asked.timeout
        wanted = frozenset(str(state) for state in asked.state)
        instances = manager.select(asked.patterns)
        results: dict[str, dict[str, Any]] = {}

        async def one(instance: Instance) -> None:
            def there() -> bool:
                return instance.state in wanted or ("ready" in wanted and instance.is_ready)

            await instance.wait_until(lambda: there() or instance.removed, timeout)
            reached = there()
            late = f"not {' or '.join(sorted(wanted))} after {timeout:g}s"
            error = None if reached else REMOVED if instance.removed else late
            results[instance.name] = result(instance, reached, error)

        await actions.unless_closing(run_all(one, instances), request)
        return action_response(
            [results.get(i.name) or result(i, False, "the service is shutting down") for i in instances]
        )

    async def logs(request: Request) -> Response:
        """The last ``lines`` lines of a captured stream, then (``follow``) what comes next."""
        asked = query(request, LogsQuery)
        name, stream, lines = request.path_params["name"], asked.stream, asked.lines
        instance = _instance(manager, name)
        sink = instance.sinks.get(stream)
        if sink is None:
            target = getattr(instance.status(), stream)
            return error(404, f"{name}'s {stream} is not captured by the service: it goes to {target}")
        if not asked.follow:
            return Response(_joined(sink.tail(lines)), media_type="text/plain; charset=utf-8")

        @asynccontextmanager
        async def source() -> AsyncIterator[AsyncIterator[bytes]]:
            async with sink.follow() as chunks:
                tail = _joined(sink.tail(lines))  # after subscribing: nothing falls in between

                async def body() -> AsyncIterator[bytes]:
                    if tail:
                        yield tail
                    async for chunk in chunks:
                        yield chunk

                yield body()

        return LiveResponse(source, media_type="text/plain; charset=utf-8", closing=closing, slots=slots)

    async def events(_: Request) -> Response:
        """Every transition from now on, as Server-Sent Events (``text/event-stream``).

        Each event is one ``data:`` line holding a transition (``EventBody``), after an
        ``id:`` line with its sequence number (``seq``: increasing, and continued across a
        re-exec; missed events are not replayed on reconnect). A reader too slow to keep up
        gets ``event: dropped`` with ``{"dropped": N, "first_seq": F, "seq": L}``.
        A comment line (``: keep-alive``) comes after 15 seconds of quiet.
        """

        @asynccontextmanager
        async def source() -> AsyncIterator[AsyncIterator[bytes]]:
            async with manager.events.subscribe() as subscription:

                async def body() -> AsyncIterator[bytes]:
                    yield b": subscribed\n\n"
                    while True:
                        # Cancelling a memory stream's receive loses nothing (unlike cancelling
                        # a generator, which would end it): so the keep-alive timer goes here.
                        chunk = b": keep-alive\n\n"
                        with anyio.move_on_after(keepalive):
                            try:
                                event = await subscription.receive()
                            except anyio.EndOfStream:
                                return
                            chunk = sse_chunk(event)
                        yield chunk + _more_events(subscription)

                yield body()

        return LiveResponse(source, media_type="text/event-stream", closing=closing, slots=slots)

    async def reload(_: Request) -> Response:
        """Re-read the manifest file and apply the difference (same as SIGHUP)."""
        return JSONResponse(_report(await hooks.reload()))

    async def scale(request: Request) -> Response:
        """Run this many replicas of each named entry until the next reload: new ones start (where
        the entry autostarts), the highest-numbered ones stop. 1 to more renames NAME to NAME-0 …"""
        asked = await body(request, ScaleRequest)
        return JSONResponse(_report(await manager.scale(asked.scale)))

    async def shutdown(_: Request) -> Response:
        """Stop every instance gracefully, then end the service; answers before it starts."""
        async def begin() -> None:  # after the answer is out; in the control plane's task group
            background.start_soon(hooks.shutdown)

        later = BackgroundTask(begin)
        shutting = {"ok": True, "message": "shutting down: stopping every instance"}  # a ShutdownBody
        return JSONResponse(shutting, status_code=202, background=later)

    async def reexec(request: Request) -> Response:
        """Replace the service with a fresh start of the installed code, in the same process: every
        instance keeps running (same pid, log pipe, counters). The new code is checked first, in a
        subprocess; answered (202) before the handover starts. See the guide's "Upgrading"."""
        asked = await optional_body(request, ReexecRequest)
        check = asked is not None and asked.check
        hook = getattr(hooks, "reexec", None)
        if hook is None:
            raise InvalidRequest("service", "this service cannot re-exec itself (it is embedded)")
        from ..handoff.state import HandoffError

        try:
            report = await hook(check)
        except HandoffError as exc:
            return error(409, str(exc))
        handoffs = getattr(hooks, "handoffs", 0)
        message = "the new code would resume" if check else "handing over to the new code"
        answer = {"ok": True, "check": check, "message": message, "report": report, "handoffs": handoffs}
        return JSONResponse(answer, status_code=200 if check else 202)  # a ReexecBody

    async def metrics(_: Request) -> Response:
        """Every instance's state and resource figures, and the service's own, for Prometheus."""
        from ..metrics import CONTENT_TYPE, render  # prometheus_client only for those who ask

        figures = await sampler.figures([i.pid for i in manager.instances.values()], _cgroups(manager))
        later = sampler.after_response()
        return Response(render(manager, figures), media_type=CONTENT_TYPE, background=later)

    async def reopen_logs(_: Request) -> Response:
        """Reopen every log file, after an external logrotate moved them (same as SIGUSR2)."""
        reopened, failed = hooks.reopen_logs()
        return JSONResponse({"reopened": reopened, "failed": failed})

    def some(description: str) -> dict[int, Answer]:
        """The answers of a request on some instances: 200 when all made it, 409 when some did not."""
        return {**ERRORS, 200: Answer(model="ActionResponse"), 409: Answer(description, "ActionResponse")}

    routes = [
        Endpoint("/v1/health", health, "GET", Operation("service", {200: Answer(model="Health")})),
        Endpoint(
            "/v1/instances",
            list_instances,
            "GET",
            Operation("instances", {200: Answer(model="Status", many=True), **ERRORS}, query=InstancesQuery),
        ),
        Endpoint(
            "/v1/instances/{name}",
            get_instance,
            "GET",
            Operation("instances", {200: Answer(model="Status"), **ERRORS}),
        ),
    ]
    for verb in ("start", "stop", "restart"):
        routes.append(
            Endpoint(
                f"/v1/instances/{verb}",
                actions.endpoint(verb),
                "POST",
                Operation(
                    "instances",
                    {**some("Some did not make it."), 503: _TOO_MANY_WAITING},
                    body=ActionRequest,
                    summary=f"{verb.capitalize()} instances",
                    description=_ACTION_DOCS[verb],
                ),
            )
        )
    text = "text/plain"
    routes += [
        Endpoint(
            "/v1/instances/signal",
            send_signal,
            "POST",
            Operation("instances", some("Some were not running."), body=SignalRequest),
        ),
        Endpoint(
            "/v1/instances/wait",
            wait,
            "POST",
            Operation("instances", {**some("Some timed out."), 503: _TOO_MANY_WAITING}, body=WaitRequest),
        ),
        Endpoint(
            "/v1/instances/{name}/logs",
            logs,
            "GET",
            Operation(
                "logs",
                {
                    **ERRORS,
                    200: Answer("The lines, as the program wrote them.", media_type=text),
                    503: _TOO_MANY_STREAMS,
                },
                query=LogsQuery,
            ),
        ),
        Endpoint(
            "/v1/events",
            events,
            "GET",
            Operation(
                "events",
                {
                    200: Answer(
                        "Server-Sent Events: one `data: <json>` per transition.",
                        "EventBody",
                        media_type="text/event-stream",
                    ),
                    503: _TOO_MANY_STREAMS,
                },
            ),
        ),
        Endpoint(
            "/v1/reload",
            reload,
            "POST",
            Operation(
                "service",
                {
                    200: Answer(model="ReloadBody"),
                    422: Answer("The manifest has problems; nothing changed.", "ErrorBody"),
                },
            ),
        ),
        Endpoint(
            "/v1/scale",
            scale,
            "POST",
            Operation(
                "service",
                {
                    200: Answer(model="ReloadBody"),
                    **ERRORS,
                    409: Answer("A count out of range, or the service is stopping.", "ErrorBody"),
                    422: Answer("Not enough descriptors for it; nothing changed.", "ErrorBody"),
                },
                body=ScaleRequest,
            ),
        ),
        Endpoint("/v1/shutdown", shutdown, "POST", Operation("service", {202: Answer(model="ShutdownBody")})),
        Endpoint(
            "/v1/reexec",
            reexec,
            "POST",
            Operation(
                "service",
                {
                    202: Answer(model="ReexecBody"),
                    200: Answer("`check`: the new code would resume.", "ReexecBody"),
                    400: ERRORS[400],
                    409: Answer(
                        "The new code would not resume (why), or a re-exec, reload or shutdown is "
                        "under way; the service goes on as it is.",
                        "ErrorBody",
                    ),
                },
                body=ReexecRequest,
                body_required=False,
            ),
        ),
        Endpoint(
            "/metrics",
            metrics,
            "GET",
            Operation("service", {200: Answer("The Prometheus text format.", media_type=text)}),
        ),
        Endpoint(
            "/v1/logs/reopen", reopen_logs, "POST", Operation("logs", {200: Answer(model="ReopenBody")})
        ),
    ]
    return routes


_TOO_MANY_STREAMS = Answer(
    "`follow` (logs) or the event stream, while every place for a stream is taken (`streams` = "
    "`streams_max` in `/v1/health`): nothing is streamed and the connection is closed.",
    "ErrorBody",
)
_TOO_MANY_WAITING = Answer(
    "Every place for a request that waits is taken (`waits` = `waits_max` in `/v1/health`): nothing "
    "was done, and the connection is closed.",
    "ErrorBody",
)

_ACTION_DOCS = {
    "start": (
        "Start the selected instances, concurrently. With `wait` (the default), answer once each is "
        "`running` (or `exited` with success: a one-shot job), or has failed, or `timeout` passed."
    ),
    "stop": (
        "Stop the selected instances, concurrently: stop signal, then SIGKILL after `stop.timeout`. "
        "With `wait`, answer once each is `stopped`."
    ),
    "restart": (
        "Stop (if running) and start again, concurrently; each instance serves its requests one at "
        "a time, so concurrent restarts of one instance end with one process. `wait` as for start."
    ),
}


def _instance(manager: Manager, name: str) -> Instance:
    instance = manager.instances.get(name)
    if instance is None:
        raise UnknownInstance(name, manager.instances)
    return instance


def _cgroups(manager: Manager) -> dict[int, str]:
    """pid → the folder of its instance's own cgroup, for every instance that has both.

    All of them, also for one instance's figures: a reading covers the groups of the one
    before it too, and a group without its folder here costs a scan of the whole of /proc.
    """
    found = {}
    for instance in manager.instances.values():
        pid, folder = instance.pid, instance.cgroup
        if pid is not None and folder is not None:
            found[pid] = folder
    return found


def _joined(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n" if lines else b""



#: The most events one write of the event stream carries.
_SSE_BURST = 256


def _more_events(subscription: MemoryObjectReceiveStream[Event]) -> bytes:
    """The events already waiting, for the same write as the one just received.

    A start of a hundred instances publishes a thousand events in bursts (the waiting
    reasons of every dependent change at each transition of what they wait for): one
    write a burst, not one for each event, is a tenth of the service's time for them.
    """
    chunks = []
    for _ in range(_SSE_BURST - 1):
        try:
            chunks.append(sse_chunk(subscription.receive_nowait()))
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return b"".join(chunks)


def _report(report: ReloadReport) -> dict[str, list[str]]:
    return {
        "added": list(report.added),
        "removed": list(report.removed),
        "changed": list(report.changed),
        "unchanged": list(report.unchanged),
        "rescaled": list(report.rescaled),
    }
