"""Applying a manifest is all or nothing: a change the service cannot make changes nothing."""

from __future__ import annotations

import gc
import os
import resource
import weakref
from pathlib import Path

import pytest

from supervisor.events import State
from supervisor.instance import InvalidRequest
from supervisor.manager import ApplyError, UnknownInstance, _collector_held, descriptors_per_instance

from .helpers import manifest_from, running

pytestmark = pytest.mark.anyio

BASE = """
version: 1
instances:
  keep: {command: [sleep, "60"], restart: {min_uptime: 0}}
"""


async def test_a_change_that_would_run_out_of_descriptors_changes_nothing(tmp_path: Path) -> None:
    async with running(manifest_from(BASE, tmp_path)) as (manager, events):
        await events.wait_for(lambda e: e.to_state is State.RUNNING)
        before = manager.manifest
        pid = manager.instances["keep"].pid
        bigger = manifest_from(
            BASE + "  many: {command: [sleep, '60'], replicas: 100, autostart: false}\n", tmp_path
        )
        per = descriptors_per_instance(bigger.instances["many"])
        assert per == 3  # two captured streams (a pipe's read end each) and a pidfd; log files are pooled
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 200, hard))
        try:
            with pytest.raises(ApplyError, match=r"needs 500 more file descriptors, but only \d+ "):
                await manager.apply(bigger)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert list(manager.instances) == ["keep"]
        assert manager.instances["keep"].pid == pid and manager.manifest is before
        # With the limit back, the same change goes through.
        report = await manager.apply(bigger)
        assert len(report.added) == 100 and report.unchanged == ["keep"]


async def test_the_instances_keep_the_manifest_order_after_a_change(tmp_path: Path) -> None:
    text = BASE + "  b: {command: [sleep, '60']}\n  c: {command: [sleep, '60']}\n"
    async with running(manifest_from(text, tmp_path)) as (manager, _):
        edited = text.replace("  b: {command: [sleep, '60']}", "  b: {command: [sleep, '61']}")
        changed = manifest_from(edited, tmp_path)
        report = await manager.apply(changed)
        assert report.changed == ["b"]
        assert list(manager.instances) == ["keep", "b", "c"]


@pytest.mark.parametrize("order", ["web first", "web-2 first"])
async def test_scale_refuses_a_replica_name_that_is_another_instance(tmp_path: Path, order: str) -> None:
    """``web`` scaled to 3 would name ``web-2``, another entry: the scale said `unchanged: web-2`
    and left both as they were, web still at two replicas. It is refused, and nothing changes."""
    web = "  web: {command: [sleep, '60'], replicas: 2, restart: {min_uptime: 0}}\n"
    other = "  web-2: {command: [sleep, '61'], restart: {min_uptime: 0}}\n"
    text = "version: 1\ninstances:\n" + (web + other if order == "web first" else other + web)
    manifest = manifest_from(text, tmp_path)
    async with running(manifest) as (manager, events):
        await events.until(lambda: manager.count(State.RUNNING) == 3)
        pid = manager.instances["web-2"].pid
        with pytest.raises(InvalidRequest, match=r"cannot scale to 3: the replica name 'web-2' is the inst"):
            await manager.scale({"web": 3})
        assert sorted(manager.instances) == ["web-0", "web-1", "web-2"]
        assert manager.instances["web-2"].group == "web-2" and manager.instances["web-2"].pid == pid
        report = await manager.scale({"web": 1})  # to one: named web, its own name
        assert sorted(manager.instances) == ["web", "web-2"] and report.removed == ["web-0", "web-1"]


async def test_scale_adds_and_removes_replicas_until_the_next_reload(tmp_path: Path) -> None:
    text = BASE + "  web: {command: [sleep, '60'], replicas: 2, restart: {min_uptime: 0}}\n"
    manifest = manifest_from(text, tmp_path)
    async with running(manifest) as (manager, events):
        await events.until(lambda: manager.count(State.RUNNING) == 3)
        pids = {name: manager.instances[name].pid for name in ("web-0", "web-1")}
        report = await manager.scale({"web": 4})
        assert (report.added, report.removed) == (["web-2", "web-3"], [])
        assert report.unchanged == ["keep", "web-0", "web-1"]
        await events.until(lambda: manager.count(State.RUNNING) == 5)
        assert {name: manager.instances[name].pid for name in pids} == pids
        report = await manager.scale({"web": 3})
        assert report.removed == ["web-3"] and list(manager.instances) == ["keep", "web-0", "web-1", "web-2"]
        with pytest.raises(UnknownInstance):
            await manager.scale({"nope": 2})
        with pytest.raises(InvalidRequest, match="cannot scale to -1"):
            await manager.scale({"web": -1})
        # A reload brings the manifest's count back, and says so.
        report = await manager.apply(manifest_from(text, tmp_path))
        assert report.removed == ["web-2"] and report.rescaled == ["web: back to the manifest's 2 replicas"]
        assert list(manager.instances) == ["keep", "web-0", "web-1"]
        assert manager.manifest.source == (tmp_path / "supervisor.yaml").resolve()


async def test_the_collector_waits_while_a_change_makes_and_spawns_its_instances(tmp_path: Path) -> None:
    """Hundreds of instances allocate enough to set the collector off again and again during
    their spawns, each time walking objects that all live on: it is off while a change makes
    and spawns them, and on again after (a service left without it would keep its cycles)."""
    collections: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    many = BASE + "  many: {command: [sleep, '60'], replicas: 300, restart: {min_uptime: 0}}\n"
    async with running(manifest_from(BASE, tmp_path)) as (manager, events):
        await events.wait_for(lambda e: e.to_state is State.RUNNING)
        assert gc.isenabled()
        gc.callbacks.append(seen)
        try:
            report = await manager.apply(manifest_from(many, tmp_path))
        finally:
            gc.callbacks.remove(seen)
        assert len(report.added) == 300 and gc.isenabled()
        # The allocations a hold counted set one off as it ends (and one may come before the
        # change): a few, not one every few spawns (about 50 here without the holds). A full
        # collection is a change's own, when it stopped instances (the last test), not counted.
        assert len([g for g in collections if g < 2]) <= 3, collections
        await events.until(lambda: manager.count(State.RUNNING) == 301)


def test_the_collector_is_on_again_after_a_change_that_failed() -> None:
    assert gc.isenabled()
    with pytest.raises(ApplyError), _collector_held():
        assert not gc.isenabled()
        raise ApplyError("cannot make instance x")
    assert gc.isenabled()
    gc.disable()  # a service that holds it itself (until it has frozen its start) keeps it off
    try:
        with _collector_held():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_a_change_leaves_none_of_the_instances_it_replaced_frozen(tmp_path: Path) -> None:
    """An instance and its log sinks point at each other: a replaced one is garbage in cycles,
    which only a full collection frees. The change froze it with the living (to spare the
    collector 10,000 instances), so every reload kept what it replaced, for good."""
    text = BASE + "  flip: {command: [sleep, '60'], replicas: 5, env: {G: '0'}, restart: {min_uptime: 0}}\n"
    async with running(manifest_from(text, tmp_path)) as (manager, events):
        await events.until(lambda: manager.count(State.RUNNING) == 6)
        replaced = weakref.WeakSet(manager.instances.values())
        for generation in range(1, 6):  # the test holds none of them while a change runs
            replaced.update(i for i in manager.instances.values() if i.group == "flip")
            await manager.apply(manifest_from(text.replace("G: '0'", f"G: '{generation}'"), tmp_path))
        living = {id(i) for i in manager.instances.values()}
        left = [i.name for i in replaced if id(i) not in living]
        assert left == [], f"{len(left)} replaced instances still in memory"
