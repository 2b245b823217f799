"""The API's routes over a manager: a FastAPI app, so the OpenAPI document is the models' own."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any, Literal, Protocol

import anyio
from anyio.abc import TaskGroup
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from ..config import Manifest
from ..events import sse_chunk
from ..instance import Instance, InvalidRequest
from ..manager import Manager, ReloadReport, UnknownInstance
from ..pidns import service_pid
from .actions import Actions, action_response, refusal, result, run_all
from .errors import ERRORS, error, install_error_handlers, openapi_with_our_errors
from .limits import BodyLimit
from .live import LiveResponse
from .models import (
    ActionResponse,
    ErrorBody,
    Health,
    ReexecBody,
    ReexecRequest,
    ReloadBody,
    ReopenBody,
    ScaleRequest,
    ShutdownBody,
    SignalRequest,
    Status,
    WaitRequest,
    wire_status,
)
from .sampling import Sampler
from .web import add_dashboard

__all__ = ["KEEPALIVE", "ControlHooks", "UntilRosterKnown", "create_app"]

# A comment line on the event stream this often: a proxy or a client can tell a quiet
# stream from a dead one.
KEEPALIVE = 15.0
_WAIT_DEFAULT = 30.0


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

    def reopen_logs(self) -> int:
        """Reopen every log file; the number of files."""
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
) -> FastAPI:
    """The API's routes over ``manager``.

    What requests ask of instances runs in ``background``; live streams end at ``closing``.
    """
    with _without_pydantic_v1():
        return _routes(manager, hooks, background, closing or anyio.Event(), keepalive)


@contextmanager
def _without_pydantic_v1() -> Iterator[None]:
    """FastAPI imports all of ``pydantic.v1`` while it adds routes, only to refuse v1 models (we
    have none): 1.9 MiB and half of this app's build time, on every cold start. Blocked for
    that moment (a None in sys.modules makes the import fail, which FastAPI takes as "no v1");
    anyone may import it afterwards."""
    if "pydantic.v1" in sys.modules:
        yield
        return
    sys.modules["pydantic.v1"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("pydantic.v1", ...) is None:
            del sys.modules["pydantic.v1"]


def _routes(
    manager: Manager, hooks: ControlHooks, background: TaskGroup, closing: anyio.Event, keepalive: float
) -> FastAPI:
    app = FastAPI(
        title="supervisor control API",
        version="1",
        summary="Query and steer the instances of one running `supervisor run`.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(UntilRosterKnown, manager=manager)
    app.openapi = openapi_with_our_errors(app)  # type: ignore[method-assign]
    actions = Actions(manager, background, closing)
    sampler = Sampler(background)
    add_dashboard(app)

    @app.get("/v1/health", response_model=Health, tags=["service"])
    async def health() -> dict[str, Any]:
        """The service answers; what it runs."""
        states = Counter(str(i.state) for i in manager.instances.values())
        source = hooks.manifest.source
        return {
            "ok": True,
            "pid": service_pid(),  # as seen from outside (--pid-namespace: not 1)
            "manifest": str(source) if source else None,
            "instances": len(manager.instances),
            "states": dict(states),
            "handoffs": getattr(hooks, "handoffs", 0),
            "handoff_error": getattr(hooks, "handoff_error", None),
            "starting": not manager.started.is_set(),
        }

    @app.get("/v1/instances", response_model=list[Status], responses=ERRORS, tags=["instances"])
    async def list_instances(
        names: Annotated[
            list[str] | None, Query(description="Names, manifest names or globs; none: every instance.")
        ] = None,
    ) -> Response:
        """Status of every instance, or of those ``names`` select (404 when one selects none)."""
        statuses = manager.status(names or ())
        figures = await sampler.figures([s.pid for s in statuses], _cgroups(manager))
        body = [wire_status(s, figures.get(s.pid or 0)) for s in statuses]
        return JSONResponse(body, background=sampler.after_response())

    @app.get("/v1/instances/{name}", response_model=Status, responses=ERRORS, tags=["instances"])
    async def get_instance(name: str) -> Response:
        """Status of one instance, by its exact name."""
        instance = _instance(manager, name)
        status = instance.status()
        figures = await sampler.figures([status.pid], _cgroups(manager))
        body = wire_status(status, figures.get(status.pid or 0))
        return JSONResponse(body, background=sampler.after_response())

    for verb in ("start", "stop", "restart"):
        app.post(
            f"/v1/instances/{verb}",
            response_model=ActionResponse,
            responses={**ERRORS, 409: {"model": ActionResponse, "description": "Some did not make it."}},
            tags=["instances"],
            summary=f"{verb.capitalize()} instances",
            description=_ACTION_DOCS[verb],
        )(actions.endpoint(verb))

    @app.post(
        "/v1/instances/signal",
        response_model=ActionResponse,
        responses={**ERRORS, 409: {"model": ActionResponse, "description": "Some were not running."}},
        tags=["instances"],
    )
    async def send_signal(body: SignalRequest) -> Response:
        """Send a signal to each selected instance's process (its group when ``stop.group`` is set)."""
        results = []
        for instance in manager.select(body.patterns):
            try:
                instance.signal(body.signal)
            except InvalidRequest as exc:
                results.append(result(instance, False, refusal(instance, exc)))
            else:
                results.append(result(instance, True))
        return action_response(results)

    @app.post(
        "/v1/instances/wait",
        response_model=ActionResponse,
        responses={**ERRORS, 409: {"model": ActionResponse, "description": "Some timed out."}},
        tags=["instances"],
    )
    async def wait(body: WaitRequest) -> Response:
        """Wait until each selected instance is in one of ``state`` (default timeout 30s)."""
        timeout = _WAIT_DEFAULT if body.timeout is None else body.timeout
        wanted = frozenset(str(state) for state in body.state)
        instances = manager.select(body.patterns)
        results: dict[str, dict[str, Any]] = {}

        async def one(instance: Instance) -> None:
            reached = await instance.wait_until(
                lambda: instance.state in wanted or ("ready" in wanted and instance.is_ready), timeout
            )
            error = None if reached else f"not {' or '.join(sorted(wanted))} after {timeout:g}s"
            results[instance.name] = result(instance, reached, error)

        await actions.unless_closing(run_all(one, instances))
        return action_response(
            [results.get(i.name) or result(i, False, "the service is shutting down") for i in instances]
        )

    @app.get(
        "/v1/instances/{name}/logs",
        responses={
            **ERRORS,
            200: {"content": {"text/plain": {}}, "description": "The lines, as the program wrote them."},
        },
        response_class=Response,
        tags=["logs"],
    )
    async def logs(
        name: str,
        stream: Literal["stdout", "stderr"] = "stdout",
        lines: Annotated[int, Query(ge=0, le=1_000_000, description="How many of the last lines.")] = 10,
        follow: Annotated[
            bool, Query(description="Then stream what is written, until the client leaves.")
        ] = False,
    ) -> Response:
        """The last ``lines`` lines of a captured stream, then (``follow``) what comes next."""
        instance = _instance(manager, name)
        sink = instance.sinks.get(stream)
        if sink is None:
            target = getattr(instance.status(), stream)
            return error(404, f"{name}'s {stream} is not captured by the service: it goes to {target}")
        if not follow:
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

        return LiveResponse(source, media_type="text/plain; charset=utf-8", closing=closing)

    @app.get(
        "/v1/events",
        response_class=Response,
        responses={
            200: {
                "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/EventBody"}}},
                "description": "Server-Sent Events: one `data: <json>` per transition.",
            }
        },
        tags=["events"],
    )
    async def events() -> Response:
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
                                event = await anext(subscription)
                            except StopAsyncIteration:
                                return
                            chunk = sse_chunk(event)
                        yield chunk

                yield body()

        return LiveResponse(source, media_type="text/event-stream", closing=closing)

    @app.post(
        "/v1/reload",
        response_model=ReloadBody,
        responses={422: {"model": ErrorBody, "description": "The manifest has problems; nothing changed."}},
        tags=["service"],
    )
    async def reload() -> dict[str, list[str]]:
        """Re-read the manifest file and apply the difference (same as SIGHUP)."""
        return _report(await hooks.reload())

    @app.post(
        "/v1/scale",
        response_model=ReloadBody,
        responses={
            **ERRORS,
            409: {"model": ErrorBody, "description": "A count out of range, or the service is stopping."},
            422: {"model": ErrorBody, "description": "Not enough descriptors for it; nothing changed."},
        },
        tags=["service"],
    )
    async def scale(body: ScaleRequest) -> dict[str, list[str]]:
        """Run this many replicas of each named entry until the next reload: new ones start (where
        the entry autostarts), the highest-numbered ones stop. 1 to more renames NAME to NAME-0 …"""
        return _report(await manager.scale(body.scale))

    @app.post("/v1/shutdown", status_code=202, response_model=ShutdownBody, tags=["service"])
    async def shutdown() -> Response:
        """Stop every instance gracefully, then end the service; answers before it starts."""
        async def begin() -> None:  # after the answer is out; in the control plane's task group
            background.start_soon(hooks.shutdown)

        later = BackgroundTask(begin)
        return JSONResponse(ShutdownBody().model_dump(), status_code=202, background=later)

    @app.post(
        "/v1/reexec",
        response_model=ReexecBody,
        status_code=202,
        responses={
            200: {"model": ReexecBody, "description": "`check`: the new code would resume."},
            409: {
                "model": ErrorBody,
                "description": "The new code would not resume (why), or a re-exec, reload or shutdown is "
                "under way; the service goes on as it is.",
            },
        },
        tags=["service"],
    )
    async def reexec(body: ReexecRequest | None = None) -> Response:
        """Replace the service with a fresh start of the installed code, in the same process: every
        instance keeps running (same pid, log pipe, counters). The new code is checked first, in a
        subprocess; answered (202) before the handover starts. See the guide's "Upgrading"."""
        check = body is not None and body.check
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
        answer = ReexecBody(check=check, message=message, report=report, handoffs=handoffs)
        return JSONResponse(answer.model_dump(), status_code=200 if check else 202)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "The Prometheus text format."}},
        tags=["service"],
    )
    async def metrics() -> Response:
        """Every instance's state and resource figures, and the service's own, for Prometheus."""
        from ..metrics import CONTENT_TYPE, render  # prometheus_client only for those who ask

        figures = await sampler.figures([i.pid for i in manager.instances.values()], _cgroups(manager))
        later = sampler.after_response()
        return Response(render(manager, figures), media_type=CONTENT_TYPE, background=later)

    @app.post("/v1/logs/reopen", response_model=ReopenBody, tags=["logs"])
    async def reopen_logs() -> dict[str, int]:
        """Reopen every log file, after an external logrotate moved them (same as SIGUSR2)."""
        return {"reopened": hooks.reopen_logs()}

    return app


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



def _report(report: ReloadReport) -> dict[str, list[str]]:
    return {
        "added": list(report.added),
        "removed": list(report.removed),
        "changed": list(report.changed),
        "unchanged": list(report.unchanged),
        "rescaled": list(report.rescaled),
    }
