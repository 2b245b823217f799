"""The manifest checked in a child interpreter while the service's event loop goes on serving.

A reload parses and validates the manifest with pydantic: seconds of the loop for a big one,
and tens of MiB that would stay in the service. ``config/apart.py`` is the child's side and
the protocol; this is the service's side, which spawns the child through ``process.spawn``
(the config package imports nothing of ours, as ARCHITECTURE.md has it: it cannot spawn).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio

from .config import Manifest, apart

__all__ = ["check_apart"]


async def check_apart(path: Path) -> Manifest:
    """The manifest at ``path`` checked in a child (config/apart.py) while the event loop serves.

    Spawned as the instances are (``process.spawn``: registered, so the orphan reaper never
    takes its status; killed with the service). A reload cancelled meanwhile (a shutdown)
    kills the child and waits for it: none is left to finish alone.
    """
    from .process import SpawnError, spawn

    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            argv = apart.child_argv(path)
            child = spawn(argv, env=apart.child_env(), stdin=None, stdout=out_w, stderr=err_w)
        except SpawnError as exc:
            raise apart.refusal(path, f"the check of the manifest cannot start: {exc}", b"") from None
        finally:
            os.close(out_w)
            os.close(err_w)
        output: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray()}

        async def drain(fd: int) -> None:
            os.set_blocking(fd, False)
            while True:
                await anyio.wait_readable(fd)
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                output[fd] += chunk

        try:
            with anyio.move_on_after(apart.CHECK_TIMEOUT) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain, out_r)
                    tg.start_soon(drain, err_r)
                await child.wait()
        finally:
            if child.exit is None:  # the time is up, or the reload was cancelled
                child.send_signal(signal.SIGKILL, group=True)
                with anyio.CancelScope(shield=True):
                    await child.wait()
        if scope.cancelled_caught:
            why = f"the check of the manifest took longer than {apart.CHECK_TIMEOUT:g}s"
            raise apart.refusal(path, why, bytes(output[err_r]))
    finally:
        os.close(out_r)
        os.close(err_r)
    status = child.exit
    assert status is not None
    code = status.code if status.code is not None else -(status.signal or 0)
    return apart.read_answer(path, bytes(output[out_r]), bytes(output[err_r]), code)
