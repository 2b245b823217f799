"""The control API's client: HTTP/1.1 over the service's unix socket, standard library only.

``supervisor status`` is typed by hand and run by scripts in loops, and it is
benchmarked against ``supervisorctl status``: so this module imports nothing
but the standard library (no pydantic, starlette or httpx), and answers are
plain dicts and lists as the JSON has them. ``supervisor.api.models`` is the
reference for their shape.

A unix socket path longer than the kernel's ``sun_path`` (107 bytes) cannot
be bound or connected to by name; ``unix_address`` gives a short alias for it
through ``/proc/self/fd``, and the server uses the same helper to bind.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

__all__ = [
    "APIError",
    "Client",
    "ClientError",
    "EventStream",
    "ServiceUnavailable",
    "connect_unix",
    "socket_from_manifest",
    "unix_address",
]

#: The longest path ``bind``/``connect`` take by name (``sun_path`` is 108 bytes with its NUL).
MAX_UNIX_PATH = 107


class ClientError(Exception):
    """The request could not be made or answered."""


class ServiceUnavailable(ClientError):
    """Nothing answers at the socket: no service runs there (or we may not talk to it)."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"no service answers at {address} ({reason})")


class APIError(ClientError):
    """The service answered with an error: ``{"error": ..., "details": [...]}``."""

    def __init__(self, status: int, error: str, details: Sequence[Any] = ()) -> None:
        self.status = status
        self.error = error
        self.details = list(details)
        super().__init__(error)


# -- unix sockets with long paths ----------------------------------------------------------------


@contextmanager
def unix_address(path: str | os.PathLike[str]) -> Iterator[str]:
    """An address for ``bind`` or ``connect`` that names ``path``, whatever its length.

    A path past ``MAX_UNIX_PATH`` bytes is reached through an ``O_PATH``
    descriptor of its folder: ``/proc/self/fd/N/NAME`` is short, and the
    kernel resolves it to the same folder. The descriptor is closed when the
    block ends; the bound socket file stays where it is.
    """
    text = os.fspath(path)
    if len(os.fsencode(text)) <= MAX_UNIX_PATH:
        yield text
        return
    folder, name = os.path.split(text)
    fd = os.open(folder or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def connect_unix(path: str | os.PathLike[str], timeout: float | None = None) -> socket.socket:
    """A stream socket connected to ``path``; ``ServiceUnavailable`` when nothing listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with unix_address(path) as address:
            sock.connect(address)
    except (FileNotFoundError, NotADirectoryError):
        sock.close()
        raise ServiceUnavailable(os.fspath(path), "no socket file") from None
    except ConnectionRefusedError:
        sock.close()
        raise ServiceUnavailable(os.fspath(path), "connection refused: a stale socket") from None
    except PermissionError:
        sock.close()
        raise ServiceUnavailable(os.fspath(path), "permission denied: it belongs to another user") from None
    except OSError as exc:
        sock.close()
        raise ServiceUnavailable(os.fspath(path), exc.strerror or str(exc)) from None
    return sock


# -- the socket named by a manifest --------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)-([^}]*))?\})")


def socket_from_manifest(manifest: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Path:
    """The control socket a manifest names, read without validating the manifest.

    Validation means pydantic, which the CLI does not import; only two keys
    matter here, read with the same defaults and path rules as
    ``supervisor.config``: ``supervisor.state_dir`` (default ``.supervisor``)
    and ``supervisor.control.socket`` (default ``<state_dir>/control.sock``),
    relative to the manifest's folder, with ``${VAR}`` and ``~`` expanded.
    Raises ``OSError`` when the file cannot be read, ``ValueError`` when it is
    not YAML.
    """
    file = Path(manifest)
    text = file.read_text()
    base = file.resolve().parent
    if "supervisor" not in text:
        # No `supervisor:` key can be in there, so the defaults hold; and YAML costs as much
        # to import as the rest of `supervisor status` together.
        return base / ".supervisor" / "control.sock"

    settings = _scalars_at(file, text, "supervisor", ("state_dir", "control"))
    control = settings.get("control") or {}
    control = control if isinstance(control, dict) else {}
    env = os.environ if environ is None else environ

    def resolve(value: Any, default: str) -> Path:
        text = _interpolate(str(value), env) if value else default
        path = Path(os.path.expanduser(text))
        return path if path.is_absolute() else base / path

    state_dir = resolve(settings.get("state_dir"), ".supervisor")
    if control.get("socket"):
        return resolve(control["socket"], "")
    return state_dir / "control.sock"


#: What the CLI reads of a manifest to find its socket; the service's loader has the full limits.
_MANIFEST_MAX = 1024 * 1024
_FLOW_DEPTH_MAX = 64


def _scalars_at(file: Path, text: str, top: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """``text[top][key]`` for each key, walking the composed nodes without constructing anything.

    A manifest is a person's file, but ``supervisor status -f FILE`` must not hang or
    run out of memory on a hostile one: nodes are composed (an alias stays one shared
    node, so a billion laughs costs nothing), only the few scalars wanted are read,
    and the size and the flow nesting (which the C composer follows by recursion)
    are bounded first.
    """
    if len(text) > _MANIFEST_MAX:
        raise ValueError(f"{file}: larger than {_MANIFEST_MAX // 1024} KiB")
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    if deepest > _FLOW_DEPTH_MAX:
        raise ValueError(f"{file}: nested deeper than {_FLOW_DEPTH_MAX} levels")

    import yaml

    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ValueError(f"{file}: not valid YAML ({exc})") from None

    def child(node: Any, key: str) -> Any:
        if isinstance(node, yaml.MappingNode):
            for key_node, value in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                    return value
        return None

    def scalar(node: Any) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag.endswith(":null"):
            return None
        return str(node.value)

    section = child(root, top)
    found: dict[str, Any] = {}
    for key in keys:
        node = child(section, key)
        if isinstance(node, yaml.MappingNode):
            found[key] = {k.value: scalar(v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        else:
            found[key] = scalar(node)
    return found


def _interpolate(text: str, environ: Mapping[str, str]) -> str:
    """``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$``, as the manifest loader reads them."""

    def substitute(match: re.Match[str]) -> str:
        dollar, name, colon, default = match.groups()
        if dollar:
            return "$"
        value = environ.get(name)
        if default is not None and (value is None or (colon and not value)):
            return default
        return value or ""

    return _INTERPOLATION.sub(substitute, text) if "$" in text else text


# -- HTTP/1.1, the small part of it we need ------------------------------------------------------
#
# Not http.client: it imports the email package (for header parsing), which costs more than
# everything else `supervisor status` does together (measured in docs/performance.md). The
# server is ours and speaks plain HTTP/1.1; a request is one connection (Connection: close),
# an answer has a Content-Length or is chunked (the live streams).


class _Response:
    """An answer's status and headers, with its body read whole or as it arrives."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._address = address
        try:
            parts = self._file.readline(65537).split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise ValueError("the answer is not HTTP")
            self.status = int(parts[1])
            self.headers: dict[str, str] = {}
            while True:
                line = self._file.readline(65537)
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                self.headers[name.strip().lower()] = value.strip()
        except (OSError, ValueError) as exc:
            self.close()
            raise _broken(address, exc) from None

    def chunks(self) -> Iterator[bytes]:
        """The body, piece by piece as the service sends it; ends with the body."""
        try:
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                while True:
                    size = int(self._file.readline(1024).split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        return
                    data = self._file.read(size)
                    self._file.readline(1024)  # the CRLF after the data
                    if len(data) < size:
                        return  # the service went away mid-chunk
                    yield data
            elif "content-length" in self.headers:
                left = int(self.headers["content-length"])
                while left > 0:
                    data = self._file.read1(min(left, 65536))
                    if not data:
                        return
                    left -= len(data)
                    yield data
            else:
                while data := self._file.read1(65536):
                    yield data
        except (OSError, ValueError) as exc:
            if isinstance(exc, TimeoutError):
                raise _broken(self._address, exc) from None
            return  # the connection broke: the stream is over

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def fileno(self) -> int:
        return self._sock.fileno()

    def read1_nonblocking(self) -> bytes | None:
        """What has arrived, read without waiting: bytes, ``b""`` at the end, None when nothing yet.

        For a selector over several answers (``supervisor.api.multiplex``). The buffered
        reader says ``b""`` both for "nothing yet" and for the end: a peek at the socket
        tells the two apart.
        """
        if self._sock.gettimeout() != 0.0:
            self._sock.setblocking(False)
        try:
            data = self._file.read1(65536)
            if data:
                return data
            return None if self._sock.recv(1, socket.MSG_PEEK) else b""
        except BlockingIOError:
            return None
        except OSError:
            return b""  # the connection broke: the stream is over

    def json(self) -> Any:
        body = self.read()
        if not body:
            return None
        if self.headers.get("content-type", "").startswith("application/json"):
            try:
                return json.loads(body)
            except ValueError:
                pass
        return body.decode(errors="replace")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def _broken(address: str, exc: BaseException) -> ClientError:
    if isinstance(exc, TimeoutError):
        return ClientError(f"the service at {address} did not answer in time")
    return ClientError(f"the service at {address} broke off its answer: {exc}")


class Client:
    """Requests to one service, each on its own connection (the CLI makes one or two).

    ``address`` is a socket path, or ``http://HOST:PORT`` for the optional TCP
    listener, which needs ``token``. ``timeout`` bounds each blocking socket
    operation (None: wait as long as the request takes, e.g. a ``wait``).
    """

    def __init__(
        self,
        address: str | os.PathLike[str],
        *,
        token: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.address = os.fspath(address)
        self.token = token
        self.timeout = timeout
        self._tcp = urlsplit(self.address) if self.address.startswith("http://") else None

    # -- plumbing ---------------------------------------------------------------------------

    def connect(self) -> socket.socket:
        """A new connection to the service (the dashboard's proxy sends its own requests on it)."""
        return self._connect()

    @property
    def authorization(self) -> str | None:
        """The ``Authorization`` header's value the service wants, if any."""
        return None if self.token is None else f"Bearer {self.token}"

    def _connect(self) -> socket.socket:
        if self._tcp is None:
            return connect_unix(self.address, self.timeout)
        host, port = self._tcp.hostname or "127.0.0.1", self._tcp.port or 80
        try:
            return socket.create_connection((host, port), timeout=self.timeout)
        except OSError as exc:
            raise ServiceUnavailable(self.address, exc.strerror or str(exc)) from None

    def _open(self, method: str, path: str, body: Any = None) -> _Response:
        payload = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close", "Accept: */*"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        elif method != "GET":
            head.append("Content-Length: 0")
        if self.token is not None:
            head.append(f"Authorization: Bearer {self.token}")
        sock = self._connect()
        try:
            sock.sendall("\r\n".join([*head, "", ""]).encode() + payload)
        except OSError as exc:
            sock.close()
            raise _broken(self.address, exc) from None
        return _Response(sock, self.address)

    def request(self, method: str, path: str, body: Any = None, *, accept: Sequence[int] = ()) -> Any:
        """One request; the decoded JSON answer. A status >= 400 not in ``accept`` raises APIError."""
        response = self._open(method, path, body)
        try:
            decoded = response.json()
        finally:
            response.close()
        if response.status >= 400 and response.status not in accept:
            raise _api_error(response.status, decoded)
        return decoded

    @contextmanager
    def _stream(self, path: str) -> Iterator[_Response]:
        response = self._open("GET", path)
        try:
            if response.status >= 400:
                raise _api_error(response.status, response.json())
            yield response
        finally:
            response.close()

    # -- the API ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/v1/health")  # type: ignore[no-any-return]

    def status(self, names: Sequence[str] = ()) -> list[dict[str, Any]]:
        query = f"?{urlencode([('names', n) for n in names])}" if names else ""
        return self.request("GET", f"/v1/instances{query}")  # type: ignore[no-any-return]

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text format."""
        with self._stream("/metrics") as response:
            return b"".join(response.chunks()).decode()

    def instance(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/instances/{quote(name, safe='')}")  # type: ignore[no-any-return]

    def action(
        self,
        verb: str,
        names: Sequence[str] = (),
        *,
        all: bool = False,
        wait: bool = True,
        timeout: float | str | None = None,
    ) -> dict[str, Any]:
        """start, stop or restart: ``{"ok": ..., "results": [{name, ok, state, pid, error}]}``."""
        body = {"names": list(names), "all": all, "wait": wait, "timeout": timeout}
        return self.request("POST", f"/v1/instances/{verb}", body, accept=(409,))  # type: ignore[no-any-return]

    def start(self, names: Sequence[str] = (), **options: Any) -> dict[str, Any]:
        return self.action("start", names, **options)

    def stop(self, names: Sequence[str] = (), **options: Any) -> dict[str, Any]:
        return self.action("stop", names, **options)

    def restart(self, names: Sequence[str] = (), **options: Any) -> dict[str, Any]:
        return self.action("restart", names, **options)

    def signal(self, signal: str | int, names: Sequence[str] = (), *, all: bool = False) -> dict[str, Any]:
        body = {"signal": signal, "names": list(names), "all": all}
        return self.request("POST", "/v1/instances/signal", body, accept=(409,))  # type: ignore[no-any-return]

    def wait(
        self,
        names: Sequence[str],
        state: str | Sequence[str],
        *,
        all: bool = False,
        timeout: float | str | None = None,
    ) -> dict[str, Any]:
        states = [state] if isinstance(state, str) else list(state)
        body = {"names": list(names), "all": all, "state": states, "timeout": timeout}
        return self.request("POST", "/v1/instances/wait", body, accept=(409,))  # type: ignore[no-any-return]

    def logs(self, name: str, *, stream: str = "stdout", lines: int = 10) -> bytes:
        """The last ``lines`` lines of an instance's captured stream, as bytes."""
        with self._stream(_logs_path(name, stream, lines, follow=False)) as response:
            return response.read()

    @contextmanager
    def follow(self, name: str, *, stream: str = "stdout", lines: int = 10) -> Iterator[Iterator[bytes]]:
        """The last ``lines`` lines, then what is written from now on, as chunks of whole lines.

        Once the block is entered the service is following: nothing written
        after that point is missed.
        """
        with self._stream(_logs_path(name, stream, lines, follow=True)) as response:
            yield response.chunks()

    @contextmanager
    def follow_many(
        self, names: Sequence[str], *, stream: str = "stdout", lines: int = 10
    ) -> Iterator[Iterator[tuple[str, bytes]]]:
        """``follow`` for several instances at once: ``(name, line)`` pairs in arrival order.

        Each instance's last ``lines`` lines come first (as they arrive), then
        what is written; the iterator ends when every stream has ended.
        """
        from .multiplex import interleave_lines

        with ExitStack() as stack:
            opened = [
                (name, stack.enter_context(self._stream(_logs_path(name, stream, lines, follow=True))))
                for name in names
            ]
            yield interleave_lines(opened)

    @contextmanager
    def events(self) -> Iterator[Iterator[dict[str, Any]]]:
        """Transitions from now on (``Transition.to_dict()``), from the Server-Sent Events stream.

        Once the block is entered the service has subscribed: no transition
        after that point is missed. A ``{"dropped": N}`` item says the reader
        was too slow and N events were lost.
        """
        with self._stream("/v1/events") as response:
            yield _server_sent_events(response)

    def event_stream(self) -> EventStream:
        """Like ``events()``, as an object another thread may ``interrupt()`` (the CLI's progress line)."""
        response = self._open("GET", "/v1/events")
        if response.status >= 400:
            try:
                raise _api_error(response.status, response.json())
            finally:
                response.close()
        return EventStream(response)

    def reload(self) -> dict[str, Any]:
        return self.request("POST", "/v1/reload")  # type: ignore[no-any-return]

    def scale(self, counts: dict[str, int]) -> dict[str, Any]:
        return self.request("POST", "/v1/scale", {"scale": counts})  # type: ignore[no-any-return]

    def shutdown(self) -> dict[str, Any]:
        return self.request("POST", "/v1/shutdown")  # type: ignore[no-any-return]

    def reopen_logs(self) -> dict[str, Any]:
        return self.request("POST", "/v1/logs/reopen")  # type: ignore[no-any-return]

    def reexec(self, *, check: bool = False) -> dict[str, Any]:
        return self.request("POST", "/v1/reexec", {"check": check})  # type: ignore[no-any-return]


class EventStream:
    """The event stream, subscribed from the moment this exists; iterate it in one thread.

    ``interrupt()`` may come from another thread: it shuts the socket down, so
    the iteration ends at once; ``close()`` then frees it.
    """

    def __init__(self, response: _Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return _server_sent_events(self._response)

    def interrupt(self) -> None:
        try:
            self._response._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already, or the service went away

    def close(self) -> None:
        self._response.close()


def _logs_path(name: str, stream: str, lines: int, *, follow: bool) -> str:
    query = urlencode({"stream": stream, "lines": lines, "follow": "true" if follow else "false"})
    return f"/v1/instances/{quote(name, safe='')}/logs?{query}"


def _api_error(status: int, decoded: Any) -> APIError:
    if isinstance(decoded, dict) and "error" in decoded:
        return APIError(status, str(decoded["error"]), decoded.get("details") or [])
    return APIError(status, f"HTTP {status}: {decoded or 'no details'}")


def _server_sent_events(response: _Response) -> Iterator[dict[str, Any]]:
    data: list[bytes] = []
    pending = b""
    for chunk in response.chunks():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if data:
                    yield json.loads(b"\n".join(data))
                    data.clear()
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            # `event:` names only say what `data` says anyway; `:` lines are comments (keep-alives).
