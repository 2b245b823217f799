"""The control server: the API's routes, and ``serve_control``, which the service runs.

The routes are a FastAPI app (so the OpenAPI document at ``/openapi.json`` is
the models' own), served by hypercorn inside the service's task group: on a
unix socket (mode 0600) always, and on a loopback TCP port with a bearer
token when the manifest asks for one. hypercorn gets sockets we bound
ourselves (``fd://N``) and a shutdown trigger, so it installs no signal
handler (the service owns the signals) and leaves when the service does.

Requests run in the server's tasks, but what they ask of an instance (start,
stop, restart) runs in the control plane's own task group: a client that
hangs up halfway, or a ``--no-wait``, never abandons a stop halfway.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import logging
import os
import socket
import stat
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from ..config import Manifest, ManifestError
from ..events import State, Transition, Update
from ..instance import Instance, InvalidRequest
from ..manager import ApplyError, Manager, ReloadReport, UnknownInstance
from .client import ServiceUnavailable, connect_unix, unix_address
from .models import (
    ActionRequest,
    ActionResponse,
    ErrorBody,
    EventBody,
    Health,
    ReloadBody,
    ReopenBody,
    ShutdownBody,
    SignalRequest,
    Status,
    WaitRequest,
    wire_status,
)

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
# A comment line on the event stream this often: a proxy or a client can tell a quiet
# stream from a dead one.
_KEEPALIVE = 15.0
_WAIT_DEFAULT = 30.0
_STARTED = frozenset({State.RUNNING, State.EXITED, State.FAILED})


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


class ControlError(RuntimeError):
    """The control socket cannot be set up: the service must not run without it."""


# -- errors as JSON ----------------------------------------------------------------------------


def _error(status: int, message: str, details: Collection[Any] = ()) -> JSONResponse:
    return JSONResponse({"error": message, "details": list(details)}, status_code=status)


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "A malformed request (a field, a signal, a duration)."},
    404: {"model": ErrorBody, "description": "No instance by that name (or no such log stream)."},
}


def _install_error_handlers(app: FastAPI) -> None:
    async def unknown(_: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc))

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        return _error(409, str(exc))

    async def bad_manifest(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ManifestError)
        count = len(exc.problems)
        return _error(
            422,
            f"the manifest has {count} problem{'s' if count != 1 else ''}; nothing was changed",
            [str(p) for p in exc.problems],
        )

    async def cannot_apply(_: Request, exc: Exception) -> JSONResponse:
        return _error(422, str(exc))

    async def bad_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = []
        for problem in exc.errors():
            if tuple(problem.get("loc", ())) == ("body",) and problem.get("type") == "model_attributes_type":
                details.append("the body must be a JSON object, sent with Content-Type: application/json")
                continue
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
            details.append(f"{where}: {message}" if where else message)
        return _error(400, "invalid request", details)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        return JSONResponse(
            {"error": str(exc.detail), "details": []}, status_code=exc.status_code, headers=exc.headers
        )

    app.add_exception_handler(UnknownInstance, unknown)
    app.add_exception_handler(InvalidRequest, invalid)
    app.add_exception_handler(ManifestError, bad_manifest)
    app.add_exception_handler(ApplyError, cannot_apply)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's document, with our errors and the event stream's model.

    FastAPI documents its own 422 for invalid input; ours is a 400 with
    ``ErrorBody``. The events' model is no route's return type, so FastAPI
    leaves it out of the components: it is added here.
    """
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.get("422", {}).get("description") == "Validation Error":
                    del responses["422"]
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        event = EventBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(event.pop("$defs", {}))
        components["EventBody"] = event
        if not any("HTTPValidationError" in json.dumps(op) for op in schema.get("paths", {}).values()):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    return openapi


# -- live responses (logs -f, events) -------------------------------------------------------------


class LiveResponse(Response):
    """A streaming answer that ends when the client goes away or the server stops.

    ``source`` is entered before the headers go out, so that a client that
    has the headers knows the subscription is in place; it is left (and so
    unsubscribed) however the stream ends.
    """

    def __init__(
        self,
        source: Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]],
        *,
        media_type: str,
        closing: anyio.Event,
    ) -> None:
        super().__init__(media_type=media_type, headers={"Cache-Control": "no-cache"})
        # No length: the body is chunked, and ends when the stream does.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._source = source
        self._closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._source() as chunks:
            try:
                async with anyio.create_task_group() as tg:

                    async def until_disconnect() -> None:
                        while (await receive())["type"] != "http.disconnect":
                            pass
                        tg.cancel_scope.cancel()

                    async def until_closing() -> None:
                        await self._closing.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(until_disconnect)
                    tg.start_soon(until_closing)
                    status, headers = self.status_code, self.raw_headers
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    with contextlib.suppress(OSError):  # the client went away while we wrote
                        async for chunk in chunks:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tg.cancel_scope.cancel()
            finally:
                close = getattr(chunks, "aclose", None)
                if close is not None:
                    with anyio.CancelScope(shield=True):
                        await close()
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- the app -----------------------------------------------------------------------------------


def create_app(
    manager: Manager,
    hooks: ControlHooks,
    *,
    background: TaskGroup,
    closing: anyio.Event | None = None,
    keepalive: float = _KEEPALIVE,
) -> FastAPI:
    """The API's routes over ``manager``.

    What requests ask of instances runs in ``background``; live streams end at ``closing``.
    """
    closing = closing or anyio.Event()
    app = FastAPI(
        title="supervisor control API",
        version="1",
        summary="Query and steer the instances of one running `supervisor run`.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    _install_error_handlers(app)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    actions = _Actions(manager, background, closing)

    @app.get("/v1/health", response_model=Health, tags=["service"])
    async def health() -> dict[str, Any]:
        """The service answers; what it runs."""
        states = Counter(str(i.state) for i in manager.instances.values())
        source = hooks.manifest.source
        return {
            "ok": True,
            "pid": os.getpid(),
            "manifest": str(source) if source else None,
            "instances": len(manager.instances),
            "states": dict(states),
        }

    @app.get("/v1/instances", response_model=list[Status], responses=_ERRORS, tags=["instances"])
    async def list_instances(
        names: Annotated[
            list[str] | None, Query(description="Names, manifest names or globs; none: every instance.")
        ] = None,
    ) -> Response:
        """Status of every instance, or of those ``names`` select (404 when one selects none)."""
        return JSONResponse([wire_status(s) for s in manager.status(names or ())])

    @app.get("/v1/instances/{name}", response_model=Status, responses=_ERRORS, tags=["instances"])
    async def get_instance(name: str) -> Response:
        """Status of one instance, by its exact name."""
        return JSONResponse(wire_status(_instance(manager, name).status()))

    for verb in ("start", "stop", "restart"):
        app.post(
            f"/v1/instances/{verb}",
            response_model=ActionResponse,
            responses={**_ERRORS, 409: {"model": ActionResponse, "description": "Some did not make it."}},
            tags=["instances"],
            summary=f"{verb.capitalize()} instances",
            description=_ACTION_DOCS[verb],
        )(actions.endpoint(verb))

    @app.post(
        "/v1/instances/signal",
        response_model=ActionResponse,
        responses={**_ERRORS, 409: {"model": ActionResponse, "description": "Some were not running."}},
        tags=["instances"],
    )
    async def send_signal(body: SignalRequest) -> Response:
        """Send a signal to each selected instance's process (its group when ``stop.group`` is set)."""
        results = []
        for instance in manager.select(body.patterns):
            try:
                instance.signal(body.signal)
            except InvalidRequest as exc:
                results.append(_result(instance, False, _refusal(instance, exc)))
            else:
                results.append(_result(instance, True))
        return _action_response(results)

    @app.post(
        "/v1/instances/wait",
        response_model=ActionResponse,
        responses={**_ERRORS, 409: {"model": ActionResponse, "description": "Some timed out."}},
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
            results[instance.name] = _result(instance, reached, error)

        await actions.unless_closing(_all(one, instances))
        return _action_response(
            [results.get(i.name) or _result(i, False, "the service is shutting down") for i in instances]
        )

    @app.get(
        "/v1/instances/{name}/logs",
        responses={
            **_ERRORS,
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
            return _error(404, f"{name}'s {stream} is not captured by the service: it goes to {target}")
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

        Each event is one ``data:`` line holding a transition (``EventBody``). A
        reader too slow to keep up gets ``event: dropped`` with ``{"dropped": N}``.
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
                            data = json.dumps(event.to_dict(), separators=(",", ":")).encode()
                            kind = (
                                b""
                                if isinstance(event, Transition)
                                else b"event: update\n"
                                if isinstance(event, Update)
                                else b"event: dropped\n"
                            )
                            chunk = b"%sdata: %s\n\n" % (kind, data)
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
        report = await hooks.reload()
        return {
            "added": list(report.added),
            "removed": list(report.removed),
            "changed": list(report.changed),
            "unchanged": list(report.unchanged),
        }

    @app.post("/v1/shutdown", status_code=202, response_model=ShutdownBody, tags=["service"])
    async def shutdown() -> Response:
        """Stop every instance gracefully, then end the service; answers before it starts."""
        async def begin() -> None:  # after the answer is out; in the control plane's task group
            background.start_soon(hooks.shutdown)

        later = BackgroundTask(begin)
        return JSONResponse(ShutdownBody().model_dump(), status_code=202, background=later)

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


def _joined(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n" if lines else b""


def _refusal(instance: Instance, exc: InvalidRequest) -> str:
    """The reason alone: the result names the instance already."""
    return str(exc).removeprefix(f"{instance.name}: ")


def _result(instance: Instance, ok: bool, error: str | None = None) -> dict[str, Any]:
    state = str(instance.state)
    return {"name": instance.name, "ok": ok, "state": state, "pid": instance.pid, "error": error}


def _action_response(results: list[dict[str, Any]]) -> JSONResponse:
    ok = all(r["ok"] for r in results)
    return JSONResponse({"ok": ok, "results": results}, status_code=200 if ok else 409)


async def _all(one: Callable[[Instance], Coroutine[Any, Any, None]], instances: list[Instance]) -> None:
    async with anyio.create_task_group() as tg:
        for instance in instances:
            tg.start_soon(one, instance)


class _Actions:
    """start, stop and restart: run in the control plane's task group, awaited by the request."""

    def __init__(self, manager: Manager, background: TaskGroup, closing: anyio.Event) -> None:
        self.manager = manager
        self.background = background
        self.closing = closing

    def endpoint(self, verb: str) -> Callable[[ActionRequest], Awaitable[Response]]:
        async def endpoint(body: ActionRequest) -> Response:
            instances = self.manager.select(body.patterns)
            results: dict[str, dict[str, Any]] = {}

            selected = {instance.name for instance in instances}

            async def one(instance: Instance) -> None:
                results[instance.name] = await self.perform(verb, instance, body, selected)

            await self.unless_closing(_all(one, instances))
            return _action_response(
                [results.get(i.name) or _result(i, False, "the service is shutting down") for i in instances]
            )

        endpoint.__name__ = f"{verb}_instances"
        return endpoint

    async def unless_closing(self, work: Awaitable[None]) -> None:
        """Await ``work``, but give up when the server stops (the service is shutting down)."""
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await self.closing.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await work
            tg.cancel_scope.cancel()

    async def perform(
        self, verb: str, instance: Instance, body: ActionRequest, selected: Collection[str] = ()
    ) -> dict[str, Any]:
        if body.all and (verb == "start") == instance.state.alive and verb != "restart":
            # `stop --all` means "nothing runs afterwards": one already down is not an error
            # (nor one already up for `start --all`). A name given explicitly still is.
            return _result(instance, True)
        config = instance.config
        default = config.stop.timeout + 5 if verb == "stop" else config.restart.min_uptime + 10
        timeout = body.timeout_for(default)
        request = {"start": instance.start, "stop": instance.stop, "restart": instance.restart}[verb]
        done = anyio.Event()
        refused: list[str] = []
        before = instance.state

        async def run() -> None:
            # Here, not in the request's task: the request may go (client gone, no-wait, timeout);
            # what it asked for is carried out all the same.
            try:
                if verb == "stop":
                    # Dependents stopped in the same request go first (`stop --all` in reverse order).
                    for dependent in self.manager.dependents(instance):
                        if dependent.name in selected:
                            await dependent.wait_until(lambda d=dependent: not d.state.alive)  # type: ignore[misc]
                await request()
            except InvalidRequest as exc:
                refused.append(_refusal(instance, exc))
            except Exception as exc:
                log.exception("%s %s failed", verb, instance.name)
                refused.append(f"{verb} failed: {exc}")
            finally:
                done.set()

        self.background.start_soon(run)
        with anyio.move_on_after(timeout):
            if not body.wait:
                await _first(done.wait, lambda: instance.wait_for(set(State) - {before}))
                return _result(instance, not refused, refused[0] if refused else None)
            await done.wait()
            if refused:
                return _result(instance, False, refused[0])
            targets = {State.STOPPED} if verb == "stop" else _STARTED
            await instance.wait_for(targets)
            return self._judge(verb, instance)
        return _result(instance, False, f"timed out after {timeout:g}s ({instance.state})")

    @staticmethod
    def _judge(verb: str, instance: Instance) -> dict[str, Any]:
        status = instance.status()
        state = status.state
        if verb == "stop" or state is State.RUNNING:
            return _result(instance, state is (State.STOPPED if verb == "stop" else State.RUNNING))
        succeeded = (
            state is State.EXITED
            and status.exit_signal is None
            and status.exit_code in instance.config.restart.success_codes
        )
        return _result(instance, succeeded, None if succeeded else status.reason or str(state))


async def _first(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return as soon as one of ``waits`` is done; the others are cancelled."""
    async with anyio.create_task_group() as tg:

        async def one(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(one, wait)


# -- authentication for TCP ------------------------------------------------------------------------


class BearerAuth:
    """Let a request through only with ``Authorization: Bearer <token>``; otherwise 401, and nothing more."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], token: bytes) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self._allowed(scope):
            body = b'{"error":"unauthorized","details":[]}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = credentials.strip()
        # Compared in constant time, and always compared: no early exit on a missing header.
        return hmac.compare_digest(given, self.token) and bool(given)


def _read_token(path: str) -> bytes:
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ControlError(f"cannot read control.token_file {path}: {exc.strerror}") from None
    if not token:
        raise ControlError(f"control.token_file {path} is empty")
    mode = os.stat(path).st_mode
    if mode & 0o077:
        log.warning("control.token_file %s is readable by others (mode %03o)", path, mode & 0o777)
    return token


# -- sockets ---------------------------------------------------------------------------------------


def check_socket_free(path: Path) -> None:
    """Raise ``ControlError`` if a service answers at ``path`` (or something not a socket is there).

    The service calls this before it starts any instance: a second ``supervisor
    run`` of the same manifest must stop before it spawns duplicates, not after.
    ``bind_unix`` checks again when it binds (and removes a stale socket file).
    """
    try:
        existing = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise ControlError(f"{path} exists and is not a socket: remove it or set control.socket")
    try:
        connect_unix(path, timeout=2).close()
    except ServiceUnavailable:
        return
    raise ControlError(f"another service answers at {path}: stop it first (supervisor shutdown)")


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600, its folder 0700.

    A socket file left by a service that died is removed first; one where a
    service answers is not (``ControlError``), and neither is anything that
    is not a socket. The socket is created under umask 0177, so it is never
    reachable by others, not even between ``bind`` and ``chmod``.
    """
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_socket_free(path)
    if path.exists():
        log.info("removing the stale control socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            with unix_address(path) as address:
                sock.bind(address)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ControlError(f"{path} was taken meanwhile by another process") from None
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def bind_tcp(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock


def _remove_socket(path: Path, inode: tuple[int, int]) -> None:
    """Remove our socket file, and only ours (not one a newer service put there)."""
    try:
        now = path.lstat()
        if (now.st_dev, now.st_ino) == inode:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the control socket %s: %s", path, exc)


# -- serving ---------------------------------------------------------------------------------------


class ControlListeners:
    """The control plane's bound sockets: the unix socket, and the TCP one when configured.

    The service binds them before it starts any instance, so that a second
    ``supervisor run`` of the same manifest fails on the socket before it
    spawns duplicates, with no window between a check and the bind.
    """

    def __init__(self, manifest: Manifest) -> None:
        control = manifest.supervisor.control
        self.path = manifest.control_socket
        self.token = _read_token(control.token_file) if control.tcp and control.token_file else None
        unix = bind_unix(self.path)
        own = os.stat(self.path)
        self._inode = (own.st_dev, own.st_ino)
        self.sockets: list[tuple[socket.socket, str]] = [(unix, f"unix:{self.path}")]
        if control.tcp:
            try:
                self.sockets.append((bind_tcp(control.tcp), f"http://{control.tcp}"))
            except ControlError:
                self.close()
                raise

    def close(self) -> None:
        """Close every socket and remove our socket file (only ours, not a newer service's)."""
        for sock, _ in self.sockets:
            sock.close()
        self.sockets = []
        _remove_socket(self.path, self._inode)


async def serve_control(
    manager: Manager,
    hooks: ControlHooks,
    *,
    listeners: ControlListeners | None = None,
    keepalive: float = _KEEPALIVE,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API until cancelled; ``started`` once every listener is listening.

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
                for sock, name in listeners.sockets:
                    served = app if name.startswith("unix:") else BearerAuth(app, listeners.token or b"")
                    servers.start_soon(_serve_http, served, sock, closing, name=f"control {name}")
                log.info("control API on %s", ", ".join(name for _, name in listeners.sockets))
                task_status.started()
                try:
                    await anyio.sleep_forever()
                finally:
                    closing.set()
            background.cancel_scope.cancel()
    finally:
        listeners.close()


async def _serve_http(app: Any, sock: socket.socket, closing: anyio.Event) -> None:
    """hypercorn on one bound socket, until ``closing``; shielded so that it can finish gracefully."""
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]  # hypercorn owns (and closes) the duplicate
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
