"""Readiness and liveness checks, and dependency edges, as a manifest writes them.

A check is one mapping with exactly one probe kind (``exec``, ``http``, ``tcp``,
``log``, ``notify``) and its settings. The kind is found at load time, so a
check with two kinds, none, or a setting that belongs to another kind (``expect``
on a tcp check) is an error with its place in the file, not a surprise when the
instance first starts.
"""

# Without `from __future__ import annotations`: pydantic then takes each field's type as the
# object it is, instead of evaluating its text (a compile and an eval per field, 5 ms of every
# manifest check, which is on the path of every cold start: docs/performance.md).

import shlex
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, ConfigDict, Field, StrictInt, field_validator, model_validator

from .annotated import Duration
from .base import StrictModel
from .records import _KINDS, LOG_SEARCH_TIMEOUT, ProbeKind, _Probe, split_address

__all__ = ["AliveCheck", "Dependencies", "Dependency", "ProbeKind", "ReadyCheck", "split_address"]

_HTTP_ONLY = ("expect", "body")


class _Check(_Probe, StrictModel):
    """What readiness and liveness checks share: the probe kinds that poll, and their timing.

    Never validated itself: its own schema is not built (1 ms of every manifest check's
    start-up); ``ReadyCheck`` and ``AliveCheck`` build theirs, each with these fields.
    """

    model_config = ConfigDict(defer_build=True)

    exec: str | list[str] | None = Field(
        None,
        description="Run this command (a list, or a string split as a shell would); exit 0 passes. "
        "It runs in the instance's folder, with its environment and user.",
    )
    http: str | None = Field(
        None,
        description="GET this http:// or https:// URL; a status in expect (and body, if set) passes. "
        "Printable ASCII only: percent-encode a space or another character, write a host in its xn-- form.",
    )
    tcp: str | None = Field(None, description="Connect to HOST:PORT; an accepted connection passes.")
    expect: list[Annotated[StrictInt, Field(ge=100, le=599)]] | None = Field(
        None,
        max_length=500, description="http only: the status codes that pass. Unset: any 2xx or 3xx."
    )
    body: str | None = Field(None, description="http only: the answer's body must contain this text.")
    interval: Duration = Field(
        1.0,
        ge=0.01,
        description=(
            "Time between two probes (at least 10ms). tcp and status-only http probes of all "
            "instances share one loop and may run up to a tenth of this early, to share its wake-ups."
        ),
    )
    timeout: Duration = Field(1.0, gt=0, description="A probe that takes longer fails.")
    initial_delay: Duration = Field(0.0, description="Wait this long after the start before the first probe.")

    @field_validator("exec")
    @classmethod
    def _exec_splits(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return value
        try:
            words = shlex.split(value) if isinstance(value, str) else value
        except ValueError as exc:
            raise ValueError(f"cannot split the command: {exc}") from None
        if not words or not words[0]:
            raise ValueError("the command is empty")
        return value

    @field_validator("http")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        _sendable(value)
        try:
            parts = urlsplit(value)
            port = parts.port  # raises ValueError for a port out of range
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if port == 0:  # as a tcp check's: nothing listens there, and `:0` is no way to say "the default"
            raise ValueError(f"{value!r}: port 0 cannot be connected to; give a port from 1 to 65535")
        for label in parts.hostname.split("."):
            if label.startswith("xn--") and not _a_label_decodes(label):
                raise ValueError(
                    f"{value!r}: the host's label {label!r} is not the xn-- form of a name "
                    "(its punycode does not decode to letters and digits): write the name's own xn-- form"
                )
        return value

    @field_validator("tcp")
    @classmethod
    def _tcp_address(cls, value: str | None) -> str | None:
        if value is not None:
            split_address(value)
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> "_Check":
        given = [kind for kind in _KINDS if getattr(self, kind, None) not in (None, False)]
        if len(given) != 1:
            kinds = ", ".join(k for k in _KINDS if k in type(self).model_fields)
            found = f"found {' and '.join(given)}" if given else "found none"
            raise ValueError(f"a check takes exactly one probe kind ({kinds}); {found}")
        if given[0] != "http":
            for key in _HTTP_ONLY:
                if getattr(self, key) is not None:
                    raise ValueError(f"{key!r} belongs to an http check, not to a {given[0]} check")
        return self


def _sendable(url: str) -> None:
    """Refuse what a request cannot carry: printable ASCII only (0x21 to 0x7E), as h11 sends it.

    A space, a control character or a non-ASCII letter passed ``urlsplit`` (which even
    drops tabs and newlines silently), and then every probe failed to be sent.
    """
    bad = next((char for char in url if not "!" <= char <= "~"), None)
    if bad is None:
        return
    shown = "a space" if bad == " " else f"{bad!r} (U+{ord(bad):04X})"
    rest = url.partition("//")[2]
    if bad in rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]:  # the authority: host, port
        raise ValueError(
            f"{url!r}: the host holds {shown}; write it in ASCII, a name with other letters in its "
            "xn-- form (bücher.example is xn--bcher-kva.example)"
        )
    raise ValueError(
        f"{url!r} holds {shown}, which a request cannot carry: percent-encode it (%20 for a space)"
    )


#: What a label of an internationalized host name is made of (IDNA 2008's PVALID, nearly):
#: lower-case letters, marks after a letter, digits. An upper-case letter, a symbol (an emoji),
#: a control character or a space is not; httpx's idna refuses those when the probe runs.
_LABEL_CATEGORIES = frozenset({"Ll", "Lo", "Lm", "Mn", "Mc", "Nd"})


def _a_label_decodes(label: str) -> bool:
    """Whether an ``xn--`` label is the punycode of a host name httpx can send a request to.

    Python's own punycode codec and character database, not the idna package httpx uses:
    this runs at every load, and idna's tables cost more than the check (idna also applies
    the bidi and context rules this leaves out; a probe with such a host fails as 'cannot be sent').
    Not the 'idna' codec either: it is IDNA 2003, which refuses names IDNA 2008 allows (ß).
    """
    import unicodedata  # only for a host with an xn-- label: not on every load's path

    encoded = label[4:]
    if not encoded or encoded.endswith("-"):
        return False
    try:
        name = encoded.encode("ascii").decode("punycode")
    except UnicodeError:
        return False
    return (
        not name.isascii()
        and not name.startswith("-")
        and not name.endswith("-")
        and name[2:4] != "--"
        and not unicodedata.category(name[0]).startswith("M")
        and unicodedata.is_normalized("NFC", name)
        and all(char == "-" or unicodedata.category(char) in _LABEL_CATEGORIES for char in name)
    )


class ReadyCheck(_Check):
    """When a started instance counts as ready: it stays ``starting`` (and its dependents wait) until then.

    Checked from the start of each run until it first passes; after that,
    liveness (``alive``) watches the instance.
    """

    model_config = ConfigDict(defer_build=False)

    log: str | None = Field(
        None,
        description="A regular expression (Python's syntax) searched in each line the instance writes "
        f"to a captured stdout or stderr. A search that takes over {LOG_SEARCH_TIMEOUT * 1000:g} ms on one "
        "line (a pattern that backtracks without end, like (a|aa)+) is stopped, and the start fails with "
        "that reason.",
    )
    notify: bool | None = Field(
        None,
        description="true: the sd_notify protocol. The instance gets NOTIFY_SOCKET and is ready when "
        "it sends READY=1; STATUS=, WATCHDOG=1, RELOADING=1, STOPPING=1 and MAINPID= are understood.",
    )
    success_threshold: StrictInt = Field(1, ge=1, le=1000, description="Passes in a row that make it ready.")
    start_timeout: Duration | None = Field(
        60.0,
        description="Not ready by then is a failed start: the program is stopped and backs off, "
        "with the probe's last error as the reason. null: wait for ever.",
    )

    @field_validator("log")
    @classmethod
    def _log_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            if not value:
                raise ValueError("the pattern is empty: it would match every line")
            import regex  # what runs it (probes.py): what loads is what runs

            try:
                regex.compile(value)
            except regex.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
            except RecursionError:  # the parser's own recursion, on thousands of nested groups
                nested = "not a regular expression the service can run: its groups are nested too deeply"
                raise ValueError(nested) from None
        return value

    @field_validator("notify")
    @classmethod
    def _notify_true(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError("write notify: true, or leave the key out")
        return value


class AliveCheck(_Check):
    """How a running instance is checked for life: failures in a row restart it."""

    model_config = ConfigDict(defer_build=False)

    interval: Duration = Field(
        10.0,
        ge=0.01,
        description=(
            "Time between two probes (at least 10ms). tcp and status-only http probes of all "
            "instances share one loop and may run up to a tenth of this early, to share its wake-ups."
        ),
    )
    failure_threshold: StrictInt = Field(
        3, ge=1, le=1000, description="This many failures in a row restart the instance."
    )


DependencyConditionName = Literal["started", "running", "ready", "completed"]


class Dependency(StrictModel):
    """One edge of the dependency graph: what this instance waits for in another one."""

    condition: DependencyConditionName = Field(
        "ready",
        description="started: spawned; running: up past min_uptime; ready: its readiness check passed "
        "(without one, the same as running); completed: a one-shot job that exited with a success code.",
    )
    restart: bool = Field(
        False,
        description="When the other instance restarts, restart this one too, once the other meets "
        "the condition again.",
    )


def _dependencies_from_yaml(value: Any) -> Any:
    """``[db, cache]`` (each ready), ``{db: started}`` and ``{db: {condition: …}}`` as one mapping."""

    def name(key: Any) -> Any:
        # An all-digit name reads as an int in YAML (`depends_on: [8080]`): it is still a name.
        return str(key) if isinstance(key, int) and not isinstance(key, bool) else key

    if isinstance(value, list):
        if not all(isinstance(item, str | int) for item in value):
            raise ValueError("depends_on lists instance names")
        return {name(item): {} for item in value}
    if isinstance(value, dict):
        return {
            name(key): {"condition": item} if isinstance(item, str) else {} if item is None else item
            for key, item in value.items()
        }
    return value


Dependencies = Annotated[dict[str, Dependency], BeforeValidator(_dependencies_from_yaml)]
