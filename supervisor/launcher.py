"""The launcher: what runs in a new child between fork and its program.

The parent-death signal, the fd limit and the other rlimits, the group watch's
registration and the move into the instance's cgroup must all happen in the
child, before its program runs. ``argv_before`` puts util-linux's ``prlimit`` and
``setpriv`` and a small POSIX shell script (the gate) in front of the command, so
that ``subprocess.Popen`` may still vfork; ``child_setup`` is the slower
``preexec_fn`` fallback where util-linux is missing. process.py's ``spawn`` uses
both; this module imports nothing of ours but the rlimit settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_codes
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from .child_limits import GATE_REFUSED, ChildLimits

if TYPE_CHECKING:
    from .process import Cgroup

__all__ = ["USE_LAUNCHER", "argv_before", "check_program", "child_setup", "prctl"]

#: Set the parent-death signal and fd limit through util-linux (see ``argv_before``); False
#: forces the ``preexec_fn`` fallback, which is also what happens when util-linux is missing.
USE_LAUNCHER: bool = True

_PR_SET_PDEATHSIG = 1

try:
    prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    prctl = None
else:
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]  # type: ignore[union-attr]
    prctl.restype = ctypes.c_int  # type: ignore[union-attr]


def argv_before(
    death_signal: int | None,
    nofile: tuple[int, int] | None,
    register: int | None,
    env: Mapping[str, str] | None,
    limits: ChildLimits,
    cgroup: Cgroup | None = None,
    *,
    own_user: bool = True,
) -> list[str]:
    """util-linux's ``prlimit`` and ``setpriv``, then the gate, to run before the program; or [].

    The parent-death signal and the fd limit must be set in the child, between fork
    and exec. Doing that in Python (``preexec_fn``) makes Popen fork instead of vfork
    and run Python in the child: 3 to 6 ms per spawn in a service with a big heap,
    against 0.5 ms. Two small programs exec'd in front of the command do the same
    work in C after a vfork, for a fraction of that (bench/spawn.py). Without them
    (no util-linux), ``child_setup`` does it the slow way. The gate (``_gate``) adds
    about 0.1 ms: one more exec, of the POSIX shell. A ``nice`` needs util-linux's
    ``renice`` too.
    """
    nothing = death_signal is None and nofile is None and register is None and not limits and cgroup is None
    if nothing or not USE_LAUNCHER:
        return []
    tools = look_up_tools()
    if not tools:
        return []
    setpriv, prlimit, sh = tools
    renice = shutil.which("renice") if limits.nice is not None else ""
    if renice is None:
        return []
    launcher: list[str] = []
    rlimits = limits.prlimit_args(nofile, nofile_in_gate=_gate_sets_nofile)
    if rlimits:
        launcher += [prlimit, *rlimits, "--"]
    if death_signal is not None:
        launcher += [setpriv, f"--pdeathsig={signal.Signals(death_signal).name.removeprefix('SIG')}", "--"]
    gate_limits = limits.gate_lines(renice, limits.nofile(nofile) if _gate_sets_nofile else None)
    if cgroup is not None:
        procs = shlex.quote(cgroup.procs)
        if own_user:  # it may move itself (the service may): the program never runs outside
            refused = f"{{ echo 'supervisor: cannot join cgroup {procs}' >&2; exit {GATE_REFUSED}; }}"
            gate_limits.append(f"echo $$ 2>/dev/null >{procs} || {refused}")
        else:  # another user may not move itself: the service moves it after the spawn
            gate_limits.append(f"echo $$ 2>/dev/null >{procs} || :")
    if death_signal is not None or register is not None or gate_limits:
        given = env if env is not None else os.environ
        pwd = given.get("PWD")
        script = _gate(death_signal is not None, register, keep_pwd=pwd is not None, limits=gate_limits)
        locale = given.get("LC_ALL")  # the program's, put back by the gate: "=" + it, or "" for none
        locale_arg = "" if locale is None else f"={locale}"
        launcher += [sh, "-c", script, _GATE, str(os.getpid()), pwd or "", locale_arg]
    return launcher


#: The gate's $0, which marks a launch chain that has one (``launch_env``).
_GATE = "gate"


def launch_env(before: Sequence[str], env: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """The environment the launch chain starts with: the program's, in the C locale where a gate
    puts the program's ``LC_ALL`` back before the program runs.

    ``setpriv`` and ``prlimit`` load the locale the environment names as they start; for
    C.UTF-8 that is a dozen files, a third of setpriv's CPU (0.35 of 1.1 ms a spawn, measured
    side by side), and the launchers say nothing a user reads in the normal case.
    """
    if _GATE not in before:
        return env
    return {**(env if env is not None else os.environ), "LC_ALL": "C"}


def _gate(check_parent: bool, register: int | None, *, keep_pwd: bool, limits: Sequence[str] = ()) -> str:
    """The shell script between ``setpriv`` and the program; its arguments: the parent's pid, $PWD,
    and the program's $LC_ALL (``launch_env``: "=" and its value, or empty for none).

    Once the death signal is set, a parent still there is one whose death kills us;
    else it is gone, and the program must not start (exit 125). Then the child tells
    the watch its pid through the parent's fd (opening a pipe's /proc link opens the
    pipe). Then the limits the gate sets on itself (they pass to the program through
    exec). dash exports a PWD of its own: the program's is put back, and its LC_ALL.
    """
    lines = []
    if check_parent:
        lines.append('[ "$PPID" = "$1" ] || exit 125')
    if register is not None:  # only while the parent is known to be there: never a reused pid's fd
        lines.append(f'echo "+$$" 2>/dev/null >"/proc/$1/fd/{register}"')
    lines += limits
    lines.append('PWD=$2; export PWD' if keep_pwd else "unset PWD")
    lines.append('case $3 in =*) LC_ALL=${3#=}; export LC_ALL;; *) unset LC_ALL;; esac')
    lines.append('shift 3; exec "$@"')
    return "\n".join(lines)


class _Probe:
    """A short process that says what a tool can do: started now, its answer read later."""

    def __init__(self, argv: list[str]) -> None:
        try:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        except OSError:
            self._process = None

    def answer(self) -> tuple[int, bytes] | None:
        """Its exit status and what it printed; None if it could not run or took over 5 s."""
        process = self._process
        if process is None:
            return None
        try:
            out, _ = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return None
        return process.returncode, out


#: Whether the shell sets the soft and hard open-files limits (dash, bash, busybox ash do).
_SHELL_SETS_NOFILE = 'ulimit -S -n "$(ulimit -S -n)" && ulimit -H -n "$(ulimit -H -n)"'


class _ToolLookup:
    """Where setpriv, prlimit and sh are, and what setpriv and the shell can do (util-linux
    learnt ``--pdeathsig`` in 2.33, 2018): both probes started at once, read by ``finish``."""

    def __init__(self) -> None:
        found = [shutil.which(tool) or "" for tool in ("setpriv", "prlimit", "sh")]
        self._found = tuple(found) if all(found) else ()
        self._probes: tuple[_Probe, ...] = ()
        if self._found:
            self._probes = (_Probe([found[0], "--help"]), _Probe([found[2], "-c", _SHELL_SETS_NOFILE]))

    def finish(self) -> tuple[tuple[str, ...], bool]:
        """(setpriv, prlimit, sh), or () when one is missing or setpriv is too old; and whether
        the shell sets the open-files limit itself."""
        if not self._probes:
            return (), False
        helped, shell = (probe.answer() for probe in self._probes)
        if helped is None or b"--pdeathsig" not in helped[1]:
            return (), False
        return self._found, shell is not None and shell[0] == 0


#: (setpriv, prlimit, sh) once looked up; () when one is missing.
_tools: tuple[str, ...] | None = None
#: The shell sets the open-files limit itself (``ulimit -S -n``, ``-H -n``): no prlimit for it.
_gate_sets_nofile = False
#: A lookup started ahead (``start_tool_lookup``), not read yet.
_lookup: _ToolLookup | None = None


def start_tool_lookup() -> None:
    """Start the launch tools' lookup now, to be read by ``look_up_tools``: ``supervisor run``
    starts it as its manifest's check begins, so that its two probes (10 to 20 ms) run while
    the service imports itself, off the path to the first spawn."""
    global _lookup
    if _tools is None and _lookup is None:
        _lookup = _ToolLookup()


def look_up_tools() -> tuple[str, ...]:
    """(setpriv, prlimit, sh), or () when one is missing: looked up once (by the first spawn,
    unless ``supervisor run`` did it while its manifest was checked)."""
    global _tools, _gate_sets_nofile, _lookup
    if _tools is None:
        lookup, _lookup = _lookup or _ToolLookup(), None
        _tools, _gate_sets_nofile = lookup.finish()
    return _tools


def _shell_sets_nofile(sh: str) -> bool:
    """Whether ``sh`` sets the soft and hard open-files limits (dash, bash, busybox ash do)."""
    answer = _Probe([sh, "-c", _SHELL_SETS_NOFILE]).answer()
    return answer is not None and answer[0] == 0


def check_program(program: str, cwd: str | None, env: Mapping[str, str] | None) -> None:
    """Raise the OSError that exec would, before a launcher runs the program.

    Behind a launcher, a missing or non-executable program would only show as the
    launcher's exit code 127 or 126; checked here, it is the same clear spawn error
    (no such file, permission denied) as without one.
    """
    if "/" in program:
        path = program if os.path.isabs(program) or cwd is None else os.path.join(cwd, program)
        if not os.path.exists(path):
            if cwd is not None and not os.path.isdir(cwd):
                return  # Popen's chdir reports the missing cwd itself
            raise FileNotFoundError(errno_codes.ENOENT, os.strerror(errno_codes.ENOENT), program)
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise PermissionError(errno_codes.EACCES, os.strerror(errno_codes.EACCES), program)
        return
    search = (env if env is not None else os.environ).get("PATH", os.defpath)
    found = _found.get((program, search))
    if found is not None and os.access(found, os.X_OK) and not os.path.isdir(found):
        return  # still there: exec finds it (or one earlier on the PATH)
    found = shutil.which(program, path=search)
    if found is None:
        _found.pop((program, search), None)
        raise FileNotFoundError(errno_codes.ENOENT, os.strerror(errno_codes.ENOENT), program)
    if len(_found) >= _FOUND_MAX:
        _found.clear()
    _found[(program, search)] = found


#: (program, PATH) -> where ``check_program`` found it last. A thousand spawns of one program
#: looked it up in every folder of the PATH before its own a thousand times (a stat and an
#: access each); a program found before is checked where it was, with one access and one stat.
_found: dict[tuple[str, str], str] = {}
_FOUND_MAX = 1024


def child_setup(
    parent: int,
    death_signal: int | None,
    nofile: tuple[int, int] | None,
    register: int | None,
    limits: ChildLimits,
    cgroup: Cgroup | None = None,
    *,
    own_user: bool = True,
) -> Callable[[], None] | None:
    """What runs in the child between fork and exec (after setuid, which would clear PDEATHSIG).

    The same steps as the launcher and its gate. None when there is nothing to do,
    so that Popen may use the faster vfork.
    """
    if death_signal is None and nofile is None and register is None and not limits and cgroup is None:
        return None

    def setup() -> None:
        if cgroup is not None:  # as the service's user; another is moved by the service after the spawn
            try:
                with open(cgroup.procs, "w") as procs:
                    procs.write(str(os.getpid()))
            except OSError:
                if own_user:
                    raise
        limits.apply(nofile)
        if death_signal is not None and prctl is not None:
            if prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
            if os.getppid() != parent:  # the parent died before we asked: the signal will never come
                os.kill(os.getpid(), death_signal)
        if register is not None:  # still open here: close_fds runs after this, CLOEXEC at exec
            with contextlib.suppress(OSError):
                os.write(register, b"+%d\n" % os.getpid())

    return setup
