"""The control plane's sockets: the unix socket (mode 0600), and TCP when configured.

They are bound by the service before it starts any instance, so that a
second ``supervisor run`` of the same manifest fails on the socket before it
spawns duplicates, with no window between a check and the bind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Manifest
from .client import ServiceUnavailable, connect_unix, unix_address

if TYPE_CHECKING:
    from .http1 import HTTPServer

__all__ = ["ControlError", "ControlListeners", "bind_tcp", "bind_unix", "check_socket_free"]

log = logging.getLogger("supervisor.control")


class ControlError(RuntimeError):
    """The control socket cannot be set up: the service must not run without it."""


def read_token(path: str) -> bytes:
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



class ControlListeners:
    """The control plane's bound sockets: the unix socket, and the TCP one when configured.

    The service binds them before it starts any instance, so that a second
    ``supervisor run`` of the same manifest fails on the socket before it
    spawns duplicates, with no window between a check and the bind.
    """

    def __init__(self, manifest: Manifest) -> None:
        control = manifest.supervisor.control
        self.path = manifest.control_socket
        self.token = read_token(control.token_file) if control.tcp and control.token_file else None
        unix = bind_unix(self.path)
        own = os.stat(self.path)
        self._inode = (own.st_dev, own.st_ino)
        self.sockets: list[tuple[socket.socket, str]] = [(unix, f"unix:{self.path}")]
        #: Connections a server stopped for a re-exec left open (http1.HTTPServer.handed), each
        #: with the index of its listening socket: the next server serves them.
        self.connections: list[tuple[socket.socket, int]] = []
        self._kept = False
        #: The server that accepts on the sockets now (``serve_control`` sets it while it serves).
        self.server: HTTPServer | None = None
        if control.tcp:
            try:
                self.sockets.append((bind_tcp(control.tcp), f"http://{control.tcp}"))
            except ControlError:
                self.close()
                raise

    @classmethod
    def adopt(cls, state: dict[str, Any]) -> ControlListeners:
        """After a re-exec: the listening sockets the old service bound, inherited with what waits
        in their backlogs (so a client never finds no service)."""
        listeners = cls.__new__(cls)
        listeners.path = Path(state["path"])
        listeners.token = None if state["token"] is None else bytes.fromhex(state["token"])
        listeners._inode = (int(state["inode"][0]), int(state["inode"][1]))
        listeners._kept = False
        listeners.server = None
        listeners.sockets = []
        listeners.connections = []
        for entry in state["sockets"]:
            sock = socket.socket(fileno=int(entry["fd"]))
            sock.set_inheritable(False)
            listeners.sockets.append((sock, str(entry["name"])))
        for entry in state.get("connections", ()):  # optional: an older service handed none
            sock = socket.socket(fileno=int(entry["fd"]))
            sock.set_inheritable(False)
            listeners.connections.append((sock, int(entry["listener"])))
        return listeners

    def handoff_state(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "inode": list(self._inode),
            "token": None if self.token is None else self.token.hex(),
            "sockets": [{"fd": sock.fileno(), "name": name} for sock, name in self.sockets],
            "connections": [{"fd": sock.fileno(), "listener": index} for sock, index in self.connections],
        }

    def remake_socket(self) -> bool:
        """Bind the unix socket again if its file is gone; True if it was made again.

        A socket file deleted under the running service (a cleaner of old files, an ``rm``
        in the wrong folder) leaves the service unreachable: nobody can connect to a socket
        without a name. ``reload`` (``SIGHUP``) calls this first thing. Only a missing file is
        replaced: whatever else is at the path now (another service's socket, a file) is not
        ours, and is left as it is. ``ControlError`` when it cannot be bound.
        """
        server = self.server
        if server is None or not server.listening:
            return False
        try:
            self.path.lstat()
            return False
        except FileNotFoundError:
            pass
        new = bind_unix(self.path)
        own = os.stat(self.path)
        self._inode = (own.st_dev, own.st_ino)
        _, name = self.sockets[0]
        self.sockets[0] = (new, name)
        server.replace_listener(0, new)  # closes the old one once nothing waits on it
        log.warning("the control socket %s was gone: made again", self.path)
        return True

    def take_connections(self) -> list[tuple[socket.socket, int]]:
        """The connections left for the next server: now its (``serve_control`` serves them)."""
        taken, self.connections = self.connections, []
        return taken

    def keep(self, keep: bool = True) -> None:
        """While set, ``close()`` leaves the sockets open and the file in place: a re-exec hands them
        over (and takes them back if the exec fails)."""
        self._kept = keep

    def close(self) -> None:
        """Close every socket and remove our socket file (only ours, not a newer service's)."""
        if self._kept:
            return
        for sock, _ in [*self.sockets, *self.connections]:
            sock.close()
        self.sockets = []
        self.connections = []
        _remove_socket(self.path, self._inode)

