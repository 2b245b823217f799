"""Where each key of a YAML document was written, so that a note can name its line.

Walking the composed nodes is bounded: an alias-heavy document ("billion laughs")
is refused rather than walked for ever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .notes import ConvertError

KeyPath = tuple[str | int, ...]
MAX_NODES = 200_000


def load_yaml(text: str, file: str | Path) -> tuple[Any, dict[KeyPath, int]]:
    """The document's data and the line of each key path; a syntax error is a ConvertError with its line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConvertError(file, mark.line + 1 if mark else None, f"YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConvertError(file, None, f"YAML: {exc}") from None
    lines: dict[KeyPath, int] = {}
    budget = [MAX_NODES]

    def walk(node: yaml.Node, path: KeyPath) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConvertError(file, node.start_mark.line + 1, f"more than {MAX_NODES} YAML nodes (aliases?)")
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value) if isinstance(key, yaml.ScalarNode) else "?")
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*path, index))

    if node is None:
        return None, lines
    walk(node, ())
    try:
        data = yaml.SafeLoader("").construct_document(node)
    except yaml.YAMLError as exc:
        raise ConvertError(file, None, f"YAML: {exc}") from None
    return data, lines
