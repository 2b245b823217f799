"""The manifest's dependency graph on paper: levels, and the text and Graphviz views of it.

The manager orders starts by waiting, not by these levels; they are for people
(`supervisor graph`) and for tools that need an order (export). Every walk is
iterative (Kahn's algorithm), so a chain of thousands of links is fine; cycles
were refused by the loader.
"""

from __future__ import annotations

import json

from .records import Manifest

__all__ = ["levels", "render_dot", "render_text"]


def levels(manifest: Manifest) -> dict[str, int]:
    """Each entry's depth: 0 for one that depends on nothing, else 1 + its deepest dependency."""
    edges = {name: list(config.depends_on) for name, config in manifest.instances.items()}
    waiting = {name: len(deps) for name, deps in edges.items()}
    users: dict[str, list[str]] = {name: [] for name in edges}
    for name, deps in edges.items():
        for dep in deps:
            users[dep].append(name)
    depth = dict.fromkeys(edges, 0)
    free = [name for name, count in waiting.items() if count == 0]
    while free:
        name = free.pop()
        for user in users[name]:
            depth[user] = max(depth[user], depth[name] + 1)
            waiting[user] -= 1
            if waiting[user] == 0:
                free.append(user)
    return depth


def render_text(manifest: Manifest) -> str:
    """One line per entry, in start order: its level, name, replicas and what it waits for."""
    depth = levels(manifest)
    order = sorted(manifest.instances, key=lambda name: (depth[name], name))
    width = max((len(name) for name in order), default=0)
    lines = []
    for name in order:
        config = manifest.instances[name]
        label = f"{name} ×{config.replicas}" if config.replicas != 1 else name
        edges = ", ".join(
            f"{dep} ({edge.condition}{', restart' if edge.restart else ''})"
            for dep, edge in config.depends_on.items()
        )
        check = f"  [ready: {config.ready.kind}]" if config.ready is not None else ""
        after = f"  <- {edges}" if edges else ""
        lines.append(f"{depth[name]}  {label.ljust(width + 3)}{after}{check}".rstrip())
    return "\n".join(lines)


def render_dot(manifest: Manifest) -> str:
    """A Graphviz digraph: an arrow from each entry to what it depends on, labelled by condition."""
    out = ["digraph supervisor {", "  rankdir=BT;", "  node [shape=box];"]
    for name, config in manifest.instances.items():
        label = name if config.replicas == 1 else f"{name} ×{config.replicas}"
        out.append(f"  {json.dumps(name)} [label={json.dumps(label)}];")
    for name, config in manifest.instances.items():
        for dep, edge in config.depends_on.items():
            style = ", style=bold" if edge.restart else ""
            label = json.dumps(edge.condition)
            out.append(f"  {json.dumps(name)} -> {json.dumps(dep)} [label={label}{style}];")
    out.append("}")
    return "\n".join(out)
