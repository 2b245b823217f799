"""Reading a manifest's YAML safely: bounded in size, depth and expansion, one schema, no tags.

A manifest comes from a person, but a reload runs it inside the service, so
no file may take the loader down or make it run for minutes: PyYAML alone
reads a billion-laughs file until memory runs out, recurses until Python's
stack ends on deep nesting, loops on a recursive alias, and builds Python
objects for any tag. Here:

- the bytes must be UTF-8 (a byte-order mark is allowed), at most
  ``MAX_MANIFEST_BYTES``, without control characters; each refusal says where;
- plain scalars are read by the YAML 1.2 core schema: ``no``, ``on`` and
  ``1:30`` are text (YAML 1.1 made them false, true and 90), ``022`` is 22;
- only the core tags (``!!str``, ``!!int``, ``!!float``, ``!!bool``, ``!!null``,
  ``!!seq``, ``!!map``) and the merge key ``<<`` are understood;
- composing stops past ``MAX_DEPTH`` levels, at an undefined alias and at an
  alias inside its own anchor; an alias is kept as an ``AliasNode`` that says
  where it was written, so that the loader can bound what aliases expand to
  (``MAX_VALUES``) and say where the budget ran out.

Every refusal is a ``SourceError`` with a 1-based line and column.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent, MappingStartEvent, ScalarEvent, SequenceStartEvent
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

#: The largest manifest read, in bytes: 1 MiB holds about ten thousand instances written out.
MAX_MANIFEST_BYTES = 1024 * 1024
#: The deepest nesting of lists and mappings; a real manifest is about six deep.
MAX_DEPTH = 32
#: The most values (scalars, lists, mappings) a manifest may hold once its aliases are expanded.
MAX_VALUES = 200_000
#: The longest number read as one: longer digit strings mean nothing in a manifest.
MAX_NUMBER_LENGTH = 64

_CORE = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL = (_CORE + kind for kind in ("str", "int", "float", "bool", "null"))
SEQ, MAP, MERGE = _CORE + "seq", _CORE + "map", _CORE + "merge"
_SCALAR_TAGS = {STR, INT, FLOAT, BOOL, NULL, MERGE}

_NULL = re.compile(r"~|null|Null|NULL|")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
# What YAML does not allow in a stream, found here first to say where: PyYAML's own test, written
# as the few ranges refused (C0 and C1 controls but tab, line feed, carriage return and NEL; DEL;
# lone surrogates; U+FFFE, U+FFFF) instead of as its class of all that is allowed. The same set;
# `re` compiles this one in a tenth of a millisecond, that one in 6 to 11 ms, on the path of every
# cold start (tests/test_loader_limits.py compares the two on every code point).
_NOT_PRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # as PyYAML counts lines
_CONTROL_NAMES = {0: "NUL", 7: "BEL", 8: "BS", 0x0B: "VT", 0x0C: "FF", 0x1B: "ESC", 0x7F: "DEL"}


class SourceError(Exception):
    """The YAML cannot be read as a manifest, at this line and column."""

    def __init__(self, line: int | None, column: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.message = message


class AliasNode:
    """``*name`` where it was written; ``target`` is the anchored node it stands for."""

    __slots__ = ("anchor", "start_mark", "target")

    def __init__(self, target: yaml.Node, start_mark: Any, anchor: str) -> None:
        self.target = target
        self.start_mark = start_mark
        self.anchor = anchor


def _at(mark: Any, message: str) -> SourceError:
    return SourceError(mark.line + 1, mark.column + 1, message) if mark else SourceError(None, None, message)


# -- bytes to text ------------------------------------------------------------------------------


def decode(data: bytes) -> str:
    """The manifest's text: UTF-8 only, and not larger than MAX_MANIFEST_BYTES."""
    if len(data) > MAX_MANIFEST_BYTES:
        line = data.count(b"\n", 0, MAX_MANIFEST_BYTES) + 1
        column = MAX_MANIFEST_BYTES - (data.rfind(b"\n", 0, MAX_MANIFEST_BYTES) + 1) + 1
        raise SourceError(line, column, _too_large())
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):  # fmt: skip
        if data.startswith(bom):
            raise SourceError(1, 1, f"the manifest is {name} text: save it as UTF-8")
    if len(data) >= 2 and (data[0] == 0 or data[1] == 0):
        raise SourceError(1, 1, "the manifest looks like UTF-16 or UTF-32 text: save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start
        line = data.count(b"\n", 0, start) + 1
        line_start = data.rfind(b"\n", 0, start) + 1
        column = len(data[line_start:start].decode("utf-8", errors="replace")) + 1
        raise SourceError(
            line, column, f"the manifest is not UTF-8 text: byte 0x{data[start]:02x} cannot start a character"
        ) from None


def _too_large() -> str:
    return f"the manifest is larger than {MAX_MANIFEST_BYTES // 1024} KiB ({MAX_MANIFEST_BYTES} bytes)"


def check_text(text: str) -> str:
    """Refuse what YAML would choke on without a place: too much text, control characters."""
    text = text.removeprefix("\ufeff")
    if len(text) > MAX_MANIFEST_BYTES // 4 and len(text.encode(errors="surrogatepass")) > MAX_MANIFEST_BYTES:
        raise SourceError(None, None, _too_large())
    bad = _NOT_PRINTABLE.search(text)
    if bad:
        line, column = position(text, bad.start())
        code = ord(bad.group())
        if 0xD800 <= code <= 0xDFFF:
            what = f"a lone surrogate U+{code:04X} (not a character)"
        elif code in (0xFFFE, 0xFFFF):
            what = f"the noncharacter U+{code:04X}"
        else:
            name = _CONTROL_NAMES.get(code)
            what = f"the control character U+{code:04X}" + (f" ({name})" if name else "")
        message = f"{what} is not allowed in a manifest"
        if code < 0x100:
            message += f'; inside double quotes, write it as an escape such as "\\x{code:02x}"'
        raise SourceError(line, column, message)
    return text


def position(text: str, index: int) -> tuple[int, int]:
    """The 1-based line and column of ``text[index]``, with line breaks counted as PyYAML counts them."""
    line, line_start = 1, 0
    for match in _LINE_BREAK.finditer(text, 0, index):
        line += 1
        line_start = match.end()
    return line, index - line_start + 1


# -- text to nodes ------------------------------------------------------------------------------


class _CoreResolver(BaseResolver):
    """YAML 1.2's core schema for plain scalars, and the merge key ``<<``."""


for _tag, _pattern, _first in (
    (BOOL, "true|True|TRUE|false|False|FALSE", "tTfF"),
    (INT, _INT.pattern, "-+0123456789"),
    (FLOAT, _FLOAT.pattern, "-+0123456789."),
    (NULL, _NULL.pattern, ["~", "n", "N", ""]),
    (MERGE, "<<", "<"),
):
    _CoreResolver.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), list(_first))


def resolve_plain(text: str) -> str:
    """The tag a plain (unquoted) scalar with this text gets."""
    return _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))


_RESOLVER = _CoreResolver()


class _Composer(Composer):
    """PyYAML's composer, bounded: depth, tags, aliases kept as AliasNode, no alias inside its anchor."""

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._count = 0
        self._open: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            event = self.get_event()
            anchor = event.anchor
            if anchor not in self.anchors:
                raise _at(event.start_mark, f"the alias *{anchor} has no anchor &{anchor} before it")
            if anchor in self._open:
                raise _at(
                    event.start_mark,
                    f"the alias *{anchor} is inside its own anchor &{anchor}: a value cannot contain itself",
                )
            return AliasNode(self.anchors[anchor], event.start_mark, anchor)
        event = self.peek_event()
        _check_tag(event)
        self._count += 1
        if self._count > MAX_VALUES:
            raise _at(event.start_mark, f"the manifest holds more than {MAX_VALUES:,} values")
        if self._depth >= MAX_DEPTH:
            raise _at(event.start_mark, f"the manifest is nested more than {MAX_DEPTH} levels deep")
        anchor = event.anchor
        if anchor is not None and anchor in self.anchors:
            # YAML allows an anchor to be defined again; PyYAML does not, and a manifest needs not.
            raise _at(event.start_mark, f"the anchor &{anchor} is defined twice: give each one its own name")
        self._depth += 1
        if anchor is not None:
            self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)


    def compose_scalar_node(self, anchor: Any) -> Any:
        event = self.peek_event()
        node = super().compose_scalar_node(anchor)
        # Unquoted and untagged (`!!str 1` and `! 1` are not read by the schema). The implicit flag,
        # not the style: libyaml and PyYAML give a plain scalar different styles.
        node.plain = event.tag is None and event.implicit[0]
        return node


def is_plain(node: yaml.ScalarNode) -> bool:
    """Whether the scalar was written unquoted and untagged: its type comes from its text."""
    return getattr(node, "plain", False)


def _check_tag(event: Any) -> None:
    tag = event.tag
    if tag is None or tag == "!":
        return
    if isinstance(event, ScalarEvent):
        allowed, what = _SCALAR_TAGS, "a single value"
    elif isinstance(event, SequenceStartEvent):
        allowed, what = {SEQ}, "a list"
    elif isinstance(event, MappingStartEvent):
        allowed, what = {MAP}, "a mapping"
    else:  # pragma: no cover - compose_node only sees node events
        return
    if tag in allowed:
        return
    shown = "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag
    if tag in _SCALAR_TAGS | {SEQ, MAP}:
        message = f"the tag {shown} does not fit {what}"
    else:
        message = (
            f"the tag {shown} is not allowed: a manifest holds only text, numbers, true/false, null, lists "
            "and mappings (the core tags !!str, !!int, !!float, !!bool, !!null, !!seq, !!map)"
        )
    raise _at(event.start_mark, message)


class _PyLoader(Reader, Scanner, Parser, _Composer, _CoreResolver):
    """PyYAML's own scanner and parser, in Python: the fallback where libyaml is missing."""

    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        _Composer.__init__(self)
        _CoreResolver.__init__(self)


_Loader: Any = _PyLoader
if yaml.__with_libyaml__:
    from yaml.cyaml import CParser

    class _CLoader(CParser, _Composer, _CoreResolver):  # type: ignore[misc]
        """libyaml's scanner and parser (six times faster), our composer on its events.

        CParser composes nodes itself too, recursively and without limits: only its
        events are used (``compose`` calls the Python composer's ``get_single_node``).
        """

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            _Composer.__init__(self)
            _CoreResolver.__init__(self)

    _Loader = _CLoader


def compose(text: str) -> yaml.Node | None:
    """The one document in ``text`` as nodes (None when empty); SourceError says what and where."""
    text = check_text(text)
    loader = _Loader(text)
    try:
        return _Composer.get_single_node(loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"YAML syntax error: {exc.problem or exc}"
        if exc.context:
            message += f" ({exc.context})"
        raise _at(mark, message) from None
    except yaml.reader.ReaderError as exc:
        line, column = position(text, exc.position)
        raise SourceError(line, column, f"YAML error: {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise SourceError(None, None, f"YAML error: {exc}") from None
    finally:
        loader.dispose()


# -- scalar nodes to values ---------------------------------------------------------------------


def construct(tag: str, text: str) -> Any:
    """The value of a scalar; ValueError says why the text does not fit its tag."""
    if tag == STR:
        return text
    if tag == NULL:
        if _NULL.fullmatch(text):
            return None
        raise ValueError(f"{text!r} is not null (write null, ~ or nothing)")
    if tag == BOOL:
        if text in _BOOL:
            return _BOOL[text]
        raise ValueError(f"{text!r} is not a boolean (write true or false)")
    if tag in (INT, FLOAT) and len(text) > MAX_NUMBER_LENGTH:
        raise ValueError(f"a number of {len(text)} characters is too long to mean anything here")
    if tag == INT:
        if not _INT.fullmatch(text):
            raise ValueError(f"{text!r} is not an integer")
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text)
    if tag == FLOAT:
        if not (_FLOAT.fullmatch(text) or _INT.fullmatch(text)):
            raise ValueError(f"{text!r} is not a number")
        if text.startswith(("0o", "0x")):
            return float(construct(INT, text))
        lowered = text.lower()
        if lowered.endswith(".nan"):
            return math.nan
        if lowered.endswith(".inf"):
            return -math.inf if text.startswith("-") else math.inf
        return float(text)
    if tag == MERGE:
        return "<<"
    raise ValueError(f"the tag {tag} is not allowed")  # pragma: no cover - the composer refused it
