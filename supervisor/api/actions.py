"""What requests ask of instances: start, stop and restart, and the answer each gets.

The work runs in the control plane's own task group, not in the request's
task: a client that hangs up halfway, or a ``--no-wait``, never abandons a
stop halfway. The request only awaits the outcome (or its timeout).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..events import State
from ..instance import Instance, InvalidRequest
from ..manager import Manager
from .inputs import body as read_body
from .live import WaitSlots
from .requests import ActionRequest

__all__ = ["REMOVED", "Actions", "action_response", "refusal", "result", "run_all"]

log = logging.getLogger("supervisor.control")

_STARTED = frozenset({State.RUNNING, State.EXITED, State.FAILED})
#: Why a request on an instance that a reload or a scale took away ended before its timeout.
REMOVED = "removed while the request waited (a reload or a scale took it away)"
#: How many instances' actions a request queues before the loop goes round: queued all at
#: once, a thousand took it for about 100 ms before the first ran (a task each, anyio's).
_QUEUED_PER_TURN = 64

def refusal(instance: Instance, exc: InvalidRequest) -> str:
    """The reason alone: the result names the instance already."""
    return str(exc).removeprefix(f"{instance.name}: ")


def result(instance: Instance, ok: bool, error: str | None = None) -> dict[str, Any]:
    state = str(instance.state)
    return {"name": instance.name, "ok": ok, "state": state, "pid": instance.pid, "error": error}


def action_response(results: list[dict[str, Any]]) -> JSONResponse:
    ok = all(r["ok"] for r in results)
    return JSONResponse({"ok": ok, "results": results}, status_code=200 if ok else 409)


async def run_all(one: Callable[[Instance], Coroutine[Any, Any, None]], instances: list[Instance]) -> None:
    async with anyio.create_task_group() as tg:
        for queued, instance in enumerate(instances, 1):
            tg.start_soon(one, instance)
            if queued % _QUEUED_PER_TURN == 0:
                await anyio.lowlevel.checkpoint()


class Actions:
    """start, stop and restart: run in the control plane's task group, awaited by the request."""

    def __init__(
        self, manager: Manager, background: TaskGroup, closing: anyio.Event, slots: WaitSlots
    ) -> None:
        self.manager = manager
        self.background = background
        self.closing = closing
        self.slots = slots

    def endpoint(self, verb: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            body = await read_body(request, ActionRequest)
            if not body.wait:
                return await act(request, body)
            # It waits for the outcome, up to its timeout (a week at most): it holds one of the
            # places of the requests that wait, or 64 of them left the short requests no connection.
            with self.slots.place() as taken:
                return await act(request, body) if taken else self.slots.refused()

        async def act(request: Request, body: ActionRequest) -> Response:
            instances = self.manager.select(body.patterns)
            results: dict[str, dict[str, Any]] = {}
            selected = {instance.name for instance in instances}

            async def one(instance: Instance) -> None:
                results[instance.name] = await self.perform(verb, instance, body, selected)

            await self.unless_closing(run_all(one, instances), request)
            return action_response(
                [results.get(i.name) or result(i, False, "the service is shutting down") for i in instances]
            )

        endpoint.__name__ = f"{verb}_instances"
        return endpoint

    async def unless_closing(self, work: Awaitable[None], request: Request) -> None:
        """Await ``work``, but give up when the server stops (the service is shutting down) or
        the client goes away: nobody is left to read the answer, and a wait held its connection
        and its place (``live.StreamSlots``) until its timeout, a week at most. What an action
        asked for goes on in the background either way."""
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await self.closing.wait()
                tg.cancel_scope.cancel()

            async def until_gone() -> None:
                # The body is read: receive() now returns only when the client has left.
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            tg.start_soon(until_gone)
            await work
            tg.cancel_scope.cancel()

    async def perform(
        self, verb: str, instance: Instance, body: ActionRequest, selected: Collection[str] = ()
    ) -> dict[str, Any]:
        if body.all and (verb == "start") == instance.state.alive and verb != "restart":
            # `stop --all` means "nothing runs afterwards": one already down is not an error
            # (nor one already up for `start --all`). A name given explicitly still is.
            return result(instance, True)
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
                refused.append(refusal(instance, exc))
            except Exception as exc:
                log.exception("%s %s failed", verb, instance.name)
                refused.append(f"{verb} failed: {exc}")
            finally:
                done.set()
                instance.wake_waiters()  # a request that ends without a transition (refused)

        self.background.start_soon(run)
        with anyio.move_on_after(timeout):
            if not body.wait:
                # Its end, the instance's next transition, or its spawn in line at the gate,
                # whichever comes first: a wait on the instance's own event, not two tasks (and a
                # task group) for each instance asked. A stop of an instance `stopping` already (a
                # check stops it, to restart it) takes that stop over: no transition until `stopped`.
                taken_over = verb == "stop" and before is State.STOPPING
                await instance.wait_until(
                    lambda: taken_over
                    or done.is_set()
                    or instance.state is not before
                    or instance.in_line_to_spawn
                )
                return result(instance, not refused, refused[0] if refused else None)
            await done.wait()
            if refused:
                return result(instance, False, refused[0])
            targets = {State.STOPPED} if verb == "stop" else _STARTED
            await instance.wait_until(lambda: instance.state in targets or instance.removed)
            if instance.removed and verb != "stop":
                return result(instance, False, REMOVED)
            return self._judge(verb, instance)
        return result(instance, False, f"timed out after {timeout:g}s ({instance.state})")

    @staticmethod
    def _judge(verb: str, instance: Instance) -> dict[str, Any]:
        status = instance.status()
        state = status.state
        if verb == "stop" or state is State.RUNNING:
            return result(instance, state is (State.STOPPED if verb == "stop" else State.RUNNING))
        succeeded = (
            state is State.EXITED
            and status.exit_signal is None
            and status.exit_code in instance.config.restart.success_codes
        )
        return result(instance, succeeded, None if succeeded else status.reason or str(state))
