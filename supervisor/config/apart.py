"""The manifest checked in a child process: how the service loads it without pydantic.

pydantic and the manifest's models were 13 MiB of the service's memory and 100 ms
of its start, for work done once per start and once per reload. So the service
asks a child of the same code to load the file, and takes back the records
(``records.py``), pickled, or the problems, each with its place, exactly as
``load_manifest`` in this process would have raised them. At start-up the child is a
fork of ``supervisor run`` (which runs one thread then), and runs while the service
imports the rest of itself (``ManifestCheck``); at a reload the service starts a child
interpreter (``python -S -c``, given this process's module path with this package's
folder first) through its own spawn, and waits for it beside the event loop
(``manifest_check.check_apart``: this package imports nothing of ours, as ARCHITECTURE.md has it).

The child's environment is the service's, so ``${VAR}`` reads what it always read.
It runs no pydantic plugins: the manifest's models use none, and looking for them
(``importlib.metadata`` and a scan of every installed package) was a sixth of its time.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .problems import ManifestError
    from .records import Manifest

__all__ = [
    "CHECK_TIMEOUT",
    "ManifestCheck",
    "answer",
    "check",
    "main",
    "manifest_from_data",
    "read_answer",
    "refusal",
    "watch_parent",
]

#: A child that has not answered by then is killed, and the manifest refused with that reason.
CHECK_TIMEOUT = 120.0
#: The most a child may print on stderr that a refusal quotes.
_ERROR_TAIL = 4000
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
# The collector off: the imports and the check make tens of thousands of objects and almost no
# garbage, and its passes over them as they grew were a tenth of the check's time. No `site`
# (-S): the child gets this process's module path as it is, with this package's folder first,
# which spares it the .pth files and an editable install's import hook (15-20 ms of ~170).
_CHILD = (
    "import gc; gc.disable(); import sys; sys.path[:] = {path!r}; {watch}"
    "from {entry} import main; sys.exit(main(sys.argv[1:]))"
)
_WATCH = "from supervisor.config.apart import watch_parent; watch_parent({parent}, {period}); "
#: How often a ManifestCheck's child looks whether its parent is still there.
ORPHAN_CHECK_PERIOD = 1.0
#: The child's ``main``: this module's; a re-exec's record has its own (handoff/record_check.py).
MANIFEST = "supervisor.config.apart"


def child_argv(
    path: str | os.PathLike[str], entry: str = MANIFEST, *, watch_parent: bool = False
) -> list[str]:
    """The child's command line; ``watch_parent``: it ends once this process is gone (``watch_parent``)."""
    watch = _WATCH.format(parent=os.getpid(), period=ORPHAN_CHECK_PERIOD) if watch_parent else ""
    code = _CHILD.format(path=[_PACKAGE_ROOT, *(part for part in sys.path if part)], entry=entry, watch=watch)
    return [sys.executable, "-S", "-c", code, os.fspath(path)]


def child_env() -> dict[str, str]:
    return dict(os.environ)


def read_answer(path: str | Path, out: bytes, err: bytes, status: int | None) -> Manifest:
    """The child's pickled answer as the records, or the ManifestError it found or met."""
    import pickle

    if status == 0 and out:
        try:
            kind, value = pickle.loads(out)  # our own child, of this very code
        except Exception as exc:  # any garble is a failed check, said as such
            raise refusal(path, f"its answer could not be read ({exc})", err) from None
        found = _answered(kind, value)
        if found is not None:
            return found
        raise refusal(path, f"the check of the manifest answered {kind!r}, which this code cannot read", err)
    how = "was killed by a signal" if status is not None and status < 0 else f"exited with {status}"
    raise refusal(path, f"the check of the manifest {how}", err)


def _answered(kind: object, value: object) -> Manifest | None:
    """The records of a "manifest" answer; a "problems" answer raised; None for anything else."""
    from .problems import ManifestError
    from .records import Manifest

    if kind == "manifest" and isinstance(value, Manifest):
        return value
    if kind == "problems" and isinstance(value, list):
        raise ManifestError(value)
    return None


def _whole_answer(out: bytes) -> Manifest | None:
    """``out`` read as a whole answer (``_answered``), or None where it is not one."""
    import pickle

    try:
        kind, value = pickle.loads(out)
    except Exception:  # cut short, or garbled: not an answer
        return None
    return _answered(kind, value)


def refusal(path: Path | str, what: str, err: bytes) -> ManifestError:
    """A failed check as the manifest's one problem: ``what`` happened, and the child's stderr."""
    from .problems import ManifestError, Problem

    tail = err.decode(errors="replace").strip()[-_ERROR_TAIL:]
    return ManifestError([Problem(str(path), None, None, "", f"{what}{': ' + tail if tail else ''}")])


class ManifestCheck:
    """A check started now and answered later: ``supervisor run`` starts it before its imports.

    Started from a module that has imported nothing yet but ``os`` and ``sys``: every
    millisecond before the child starts is on the path to the first status. ``data``:
    instead of the file, the manifest a re-exec'd service ran, as its state record holds it
    (``records.as_data``), checked by this code's models.

    ``fork``: the child is a fork of this process, not a new interpreter, where this process
    runs one thread (``supervisor run`` as it begins: a fork of a process with other threads
    could inherit a lock one of them held). The fork has the interpreter, and what this
    process imported, already: 60 ms less on a cold start's path than a new interpreter that
    starts and imports again (251 against 188 ms for a check of ten instances, medians of 12).
    Otherwise, and for a caller that may run threads, a new interpreter (``posix_spawn``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        data: dict[str, Any] | bytes | None = None,
        *,
        entry: str = MANIFEST,
        fork: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.pid = 0
        self._status: int | None = None
        #: Answered, and its exit left to whoever reaps this process's children (``result``).
        self._left_to_reap = False
        self._pipes_open = False
        self._in: int | None = None
        self._input = b""
        self._unstarted: ManifestError | None = None
        try:
            if fork and _one_thread():
                self._fork(entry, data)
            else:
                argv = child_argv(self.path, entry, watch_parent=True)
                self._start(argv + (["--data"] if data is not None else []), data)
        except OSError as exc:  # no descriptor, process or interpreter for it: said, not raised here
            why = f"the check of the manifest cannot start: {exc.strerror or exc}"
            self._unstarted = refusal(self.path, why, b"")

    def _fork(self, entry: str, data: dict[str, Any] | bytes | None) -> None:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            os.close(out_r)
            os.close(out_w)
            raise
        for stream in (sys.stdout, sys.stderr):  # what waits in a buffer is written once, by us
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        if pid == 0:
            _check_in_fork(entry, self.path, data, parent, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        self.pid = pid
        self._out, self._err = out_r, err_r
        self._pipes_open = True

    def _start(self, argv: list[str], data: dict[str, Any] | bytes | None) -> None:
        opened: list[int] = []  # closed here if the start fails halfway

        def pipe() -> tuple[int, int]:
            ends = os.pipe2(os.O_CLOEXEC)
            opened.extend(ends)
            return ends

        try:
            out_r, out_w = pipe()
            err_r, err_w = pipe()
            actions: list[tuple[Any, ...]] = [
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ]
            ours = [out_w, err_w]  # the child's ends, closed here once it has them
            if data is None:
                actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
            else:
                if isinstance(data, bytes):
                    self._input = data  # JSON already
                else:
                    import json

                    self._input = json.dumps(data).encode()
                in_r, in_w = pipe()
                actions.append((os.POSIX_SPAWN_DUP2, in_r, 0))
                ours.append(in_r)
            # What this process inherited and kept (a --ready-fd, say) is not the child's to hold.
            actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited_fds()]
            self.pid = os.posix_spawn(argv[0], argv, child_env(), file_actions=actions)
        except OSError:
            for fd in opened:
                os.close(fd)
            raise
        for fd in ours:
            os.close(fd)
        self._out, self._err = out_r, err_r
        self._in = None if data is None else in_w
        self._pipes_open = True

    def result(
        self,
        *,
        reap_later: bool = False,
        wakeup_fd: int | None = None,
        on_signal: Callable[[], None] | None = None,
    ) -> Manifest:
        """The records, or ManifestError: the manifest's problems, or why the check failed.

        ``wakeup_fd``: the read end of the interpreter's signal wakeup fd (non-blocking), polled
        beside the child's pipes; once it has woken the wait, and the signal's Python handler
        has run, ``on_signal`` is called, which raises to end the wait (a stop signal while
        ``supervisor run`` checks, check_signals.py). A handler runs only between two steps of
        Python code: a signal that came just before the poll began, or that the kernel gave
        another thread, would otherwise be seen when the poll ended, after the check.

        ``reap_later``: a whole answer is taken as soon as the child has closed its pipes
        (``answer`` does, before it ends), not once it is gone: its end, the kernel handing
        back its memory (pydantic's, the models'), took 2.5 to 5 ms of every cold start. The
        child is then reaped by whoever reaps this process's children: the service's orphan
        reaper (orphans.py). A child that closed them without a whole answer is waited for,
        and its exit status says what happened, as before.
        """
        import select
        import time

        if self._unstarted is not None:
            raise self._unstarted

        output = {self._out: bytearray(), self._err: bytearray()}
        poller = select.poll()
        for fd in output:
            poller.register(fd, select.POLLIN)
        pending = memoryview(self._input)
        if self._in is not None:
            os.set_blocking(self._in, False)
            poller.register(self._in, select.POLLOUT)
        if wakeup_fd is not None:
            poller.register(wakeup_fd, select.POLLIN)
        deadline = time.monotonic() + CHECK_TIMEOUT
        open_fds = len(output)
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                self.abandon()
                why = f"the check of the manifest took longer than {CHECK_TIMEOUT:g}s"
                raise refusal(self.path, why, bytes(output[self._err]))
            for fd, _ in poller.poll(left * 1000):
                if fd == wakeup_fd:
                    _drain(fd)  # the handler has run by the time the read returns
                    if on_signal is not None:
                        on_signal()  # raises for a stop; other signals (a SIGHUP remembered) go on
                    continue
                if fd == self._in:
                    try:
                        pending = pending[os.write(fd, pending) :]
                    except BrokenPipeError:  # the child is gone: its stderr says why
                        pending = pending[:0]
                    if not pending:
                        poller.unregister(fd)
                        os.close(fd)
                        self._in = None
                    continue
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    output[fd] += chunk
                else:
                    poller.unregister(fd)
                    open_fds -= 1
        out, err = bytes(output[self._out]), bytes(output[self._err])
        self._reap(wait=not reap_later)
        if self._status is None:  # still ending
            from .problems import ManifestError

            try:
                found = _whole_answer(out)
            except ManifestError:  # the manifest's problems: a whole answer too
                self._left_to_reap = True
                raise
            if found is not None:
                self._left_to_reap = True
                return found
            self._reap()
        return read_answer(self.path, out, err, self._status)

    def _reap(self, *, wait: bool = True) -> None:
        if self._pipes_open:
            self._pipes_open = False
            for fd in (self._out, self._err, self._in):
                if fd is not None:
                    os.close(fd)
            self._in = None
        if self._status is None:
            done, status = os.waitpid(self.pid, 0 if wait else os.WNOHANG)
            if done:
                self._status = os.waitstatus_to_exitcode(status)

    def abandon(self) -> None:
        """The start failed before it needed the answer: no child is left behind."""
        if self._status is None and self._unstarted is None and not self._left_to_reap:
            os.kill(self.pid, signal.SIGKILL)
            self._reap()


def _drain(fd: int) -> None:
    """Read a non-blocking pipe empty (the signal numbers are not needed: each handler ran)."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _inherited_fds() -> list[int]:
    """The descriptors above 2 that an exec would pass on."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return found


def _one_thread() -> bool:
    """Whether this process runs one thread (a fork copies only the one that forks)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _check_in_fork(
    entry: str, path: str, data: dict[str, Any] | bytes | None, parent: int, out: int, err: int
) -> NoReturn:
    """The forked child: its own stdio (the answer's pipes, /dev/null), nothing else of the
    parent's descriptors, named ``procward-check`` for ps; then the check, and the end."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        # In this order even where the parent ran with a standard stream closed (a pipe may then
        # be 0, 1 or 2): each pipe's read end took the lower number, and only read ends, not
        # needed here, are overwritten before they are used (tests/test_startup.py).
        for fd, number in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, number)
        # Nothing else of the parent's: a --ready-fd, a re-exec's handed descriptors, all of them.
        os.closerange(3, max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1)
        sys.stdin = None  # type: ignore[assignment]
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - until the process ends
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: ended, as the parent undoes the start
        try:
            with open("/proc/self/comm", "w") as comm:
                comm.write("procward-check")
        except OSError:
            pass
        watch_parent(parent, ORPHAN_CHECK_PERIOD)
        import importlib

        check = importlib.import_module(entry).check
        answer(lambda: check(path, data))
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(1)  # never the parent's own way out (its atexit, its buffers)


def watch_parent(parent: int, period: float) -> None:
    """End this process once ``parent`` is gone, looking every ``period`` seconds.

    A child stuck in a read that never answers (a manifest on a network mount that stopped
    answering; a fifo is refused before it is read) would outlive a parent that died meanwhile,
    and hang on forever. The alarm interrupts the read, which goes on if the parent is still
    there; a check takes the usual 200 ms at no cost. A child of the service's own spawn needs
    none: its launch chain gives it the parent-death signal, as every instance has it.
    """
    signal.signal(signal.SIGALRM, lambda *_: os.getppid() == parent or os._exit(1))
    signal.setitimer(signal.ITIMER_REAL, period, period)


def main(argv: list[str]) -> int:
    """The child: load the manifest (``--data``: from stdin, as data), answer on stdout."""
    data = sys.stdin.buffer.read() if argv[1:] == ["--data"] else None
    return answer(lambda: check(argv[0], data))


def check(path: str, data: dict[str, Any] | bytes | None) -> tuple[str, Any]:
    """The manifest at ``path``, or ``data`` (a re-exec's record holds it so), as records."""
    if data is not None:
        import json

        return ("manifest", manifest_from_data(json.loads(data) if isinstance(data, bytes) else data, path))
    from .loader import load_manifest

    return ("manifest", load_manifest(path))


def answer(check: Callable[[], tuple[str, Any]]) -> NoReturn:
    """Run a child's ``check``, write its answer, pickled, on stdout: (kind, value); and end.

    A ManifestError is the answer ("problems", its problems); anything else that goes wrong is
    a traceback on stderr and a non-zero status, which the service reports as a failed check.
    """
    import pickle

    from .problems import ManifestError

    _lean()
    try:
        found = check()
    except ManifestError as exc:
        found = ("problems", exc.problems)
    finally:
        # The parent watch's timer (watch_parent) off before the answer: nothing is left to watch
        # for, and a tick as the process ends (Python gives SIGALRM its default action back at its
        # exit, if it gets there) made a good answer "killed by a signal" once in a few hundred.
        signal.setitimer(signal.ITIMER_REAL, 0)
    view = memoryview(pickle.dumps(found, protocol=pickle.HIGHEST_PROTOCOL))
    while view:  # on the descriptor itself: a forked child's sys.stdout is not its own
        view = view[os.write(1, view) :]
    sys.stderr.flush()
    # The answer's end, now: the parent may take it before this process is gone (the kernel
    # handing back its memory, 2.5 to 5 ms; ManifestCheck.result's reap_later).
    os.close(1)
    os.close(2)
    # Done, and ended here: the interpreter's own end (pydantic's modules and the models' schemas
    # freed one by one, a last collection) took 25-30 ms more, for a parent that waits for it.
    os._exit(0)


def manifest_from_data(data: Any, source: str) -> Manifest:
    """A manifest given as data (a re-exec's record holds it so) read by the models, as records."""
    from pathlib import Path

    from pydantic import ValidationError

    from .loader import settled
    from .models import Manifest as Model
    from .problems import ManifestError, Problem

    try:
        model = Model.model_validate(data)
    except ValidationError as exc:
        raise ManifestError([Problem("the state record", None, None, "manifest", str(exc))]) from None
    manifest: Manifest = settled(model)
    return manifest.replace(_source=Path(source))


def _lean() -> None:
    """The child's imports, cut to what a check needs (this process's alone: it checks and ends).

    pydantic's plugin loader becomes a module that finds none (see the top), OpenSSL's
    ``_hashlib`` is not loaded: ``hashlib`` falls back to its own digests, which nothing
    of a check uses anyway (pydantic's ``types`` imports ``secrets``); and PyYAML compiles its
    expressions at their first use (``_import_yaml``).
    """
    import types

    loader = types.ModuleType("pydantic.plugin._loader")
    loader.get_plugins = lambda: ()  # type: ignore[attr-defined]
    sys.modules.setdefault("pydantic.plugin._loader", loader)
    sys.modules.setdefault("_hashlib", None)  # type: ignore[arg-type]
    _import_yaml()


class _CompiledOnUse:
    """A regular expression compiled at its first use, then that compiled expression."""

    __slots__ = ("_compile", "_compiled", "_flags", "_pattern")

    def __init__(self, compile: Callable[[str, int], Any], pattern: str, flags: int) -> None:
        self._compile = compile
        self._pattern = pattern
        self._flags = flags
        self._compiled: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._compiled is None:
            self._compiled = self._compile(self._pattern, self._flags)
        return getattr(self._compiled, name)


def _import_yaml() -> None:
    """Import PyYAML with the expressions it compiles as it is imported compiled at their first use.

    The check reads a manifest with libyaml (where PyYAML has it) and its own YAML 1.2
    resolver (yaml_source.py): it never asks for PyYAML's pure-Python reader's class of
    Unicode ranges (6 to 11 ms for ``re`` to compile, a twentieth of a check, on the path of
    every cold start), nor for the YAML 1.1 resolver's and constructor's expressions (3 ms
    more). Each is compiled if it is used (PyYAML only calls their ``match`` and ``search``).
    """
    if "yaml" in sys.modules:
        return
    import re

    compile = re.compile

    def compile_on_use(pattern: Any, flags: int = 0) -> Any:
        if sys._getframe(1).f_globals.get("__name__", "").startswith("yaml."):  # not what it imports
            return _CompiledOnUse(compile, pattern, flags)
        return compile(pattern, flags)

    re.compile = compile_on_use  # type: ignore[assignment]
    try:
        import yaml  # noqa: F401
    except ImportError:  # said by the check that needs it, with its reason
        pass
    finally:
        re.compile = compile
