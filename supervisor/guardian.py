"""The guardian: a small process that kills the instances' process groups when the service dies.

The parent-death signal (process.py) reaches an instance's own process only: a
shell's background jobs, a worker pool, anything the program forked lives on with
parent 1 after a ``kill -9`` of the service. So the service starts one more
process at start-up, the guardian, which

- holds no state but the process groups: the service (``Guardian.started`` and
  ``ended``, called from ``process.spawn`` and ``Child._finish``) and every starting
  child itself (process.py's gate, before the program runs) write one line per
  spawn or exit into a pipe, ``+PGID`` or ``-PGID``;
- waits for the service's pidfd to turn readable or the pipe to reach EOF, then
  drains the pipe and SIGKILLs every group it knows, then every process whose
  session or group is one of them (found in ``/proc``: a shell with job control
  puts its jobs in groups of their own in the same session), round after round
  until a round finds no one new, then writes ``1`` to ``cgroup.kill`` of the
  instances' cgroup where there is one (placement.py's ``delegated_cgroup``), and exits;
- survives the service's SIGKILL: it runs in a session of its own (a terminal's
  Ctrl-C and a kill of the service's group do not reach it) and ignores INT and HUP;
- holds none of the service's fds but its stderr (for its one line of report):
  it is started with ``close_fds``, so it keeps no socket or log pipe open;
- is reaped by the service while the service runs (and restarted if it dies), and
  after the service's death by whoever adopts it (init, or the nearest subreaper),
  as soon as it has done its work.

This file is also the guardian's program: ``python -S -I guardian.py SERVICE_PID
[CGROUP]`` runs ``main`` below, which imports nothing but a few standard library
modules (-S: not even ``site``; about 20 ms to start, 9 MB of memory). The
service-side half, ``Guardian``, imports process.py lazily, so the program never does.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging
    from pathlib import Path

    from .placement import CgroupPlacement
    from .process import Child

#: How long the guardian waits for a killed cgroup to empty before removing it.
CGROUP_DRAIN = 5.0
#: At most this many rounds of looking for members of the known sessions in /proc.
SCAN_ROUNDS = 50
#: More restarts of the guardian than this within RESTART_WINDOW seconds: give up, say so.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: The largest pid Linux can hand out (PID_MAX_LIMIT); anything above is not a process group.
PID_MAX = 1 << 22


# -- the program ------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """Watch the service named in ``argv``, then kill what it leaves behind and exit."""
    service = int(argv[1])
    cgroup = argv[2] if len(argv) > 2 and argv[2] else None
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    outside = cgroup is None or _step_out(cgroup)
    os.set_blocking(0, False)
    groups: set[int] = set()
    why, dead = _watch(service, groups)
    killed, stragglers = _kill_groups(groups)
    if cgroup is not None and not outside:
        why += f"; the guardian is in {cgroup}: not killed"
    elif cgroup is not None:
        why += _kill_cgroup(cgroup, service, dead)
    if dead or killed:
        known = len(groups)
        _say(f"{why}; SIGKILLed {killed} of the {known} process groups it knew, {stragglers} more processes")
    return 0


def _step_out(cgroup: str) -> bool:
    """Out of the instances' cgroup into the one above it (the service's own), before anything else.

    The service spawns the guardian from inside its leaf (placement.py, or the leaf a
    re-exec'd service sits in): left there, the guardian's own write to ``cgroup.kill`` would
    kill it before it removed the cgroup. False where it is inside and cannot leave.
    """
    own = _own_cgroup()
    top = cgroup.rstrip("/")
    if own is None or not (str(own) == top or str(own).startswith(top + "/")):
        return True
    try:
        with open(os.path.join(os.path.dirname(top), "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    except OSError as exc:
        _say(f"cannot leave cgroup {own} ({exc.strerror}): it will not be killed")
        return False
    return True


def _watch(service: int, groups: set[int]) -> tuple[str, bool]:
    """Keep ``groups`` up to date until the service dies or says goodbye; (why, it died)."""
    try:
        pidfd: int | None = os.pidfd_open(service)
    except OSError:  # no pidfd (kernel < 5.3): EOF on the pipe is the sign, and getppid()
        pidfd = None
    if os.getppid() != service:  # checked after the open: the pidfd is the service's
        _read(groups)
        return f"the service (pid {service}) died before the guardian watched", True
    poller = select.poll()
    poller.register(0, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    while True:
        ready = dict(poller.poll(None if pidfd is not None else 1000))
        eof, leaving = _read(groups)
        if eof and pidfd is not None and pidfd not in ready:
            # A dying process closes its fds before its pidfd turns readable: wait a little.
            one = select.poll()
            one.register(pidfd, select.POLLIN)
            ready = dict(one.poll(1000))
        died = pidfd in ready if pidfd is not None else os.getppid() != service
        if died:
            _read(groups)  # whatever it wrote before dying is still in the pipe
            return f"the service (pid {service}) died", True
        if leaving:
            return "the service is stopping", False
        if eof:
            return f"the service (pid {service}) closed the guardian's pipe", False


_pending = bytearray()


def _read(groups: set[int]) -> tuple[bool, bool]:
    """Apply every complete line in the pipe; (EOF seen, "x" seen)."""
    eof = leaving = False
    while True:
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            break
        if not chunk:
            eof = True
            break
        _pending.extend(chunk)
    *lines, rest = bytes(_pending).split(b"\n")
    _pending[:] = rest
    for line in lines:
        if line == b"x":
            leaving = True
        elif line[:1] in (b"+", b"-") and line[1:].isdigit() and len(line) <= 8:
            pgid = int(line[1:])
            if not 1 < pgid <= PID_MAX or pgid == os.getpid():
                continue  # never killpg(0) (our own group), 1 (init's) or a number no pid can be
            if line[:1] == b"+":
                groups.add(pgid)
            else:
                groups.discard(pgid)
    if len(_pending) > 64:  # no line is that long: garbage, drop it
        _pending.clear()
    return eof, leaving


def _kill_groups(groups: set[int]) -> tuple[int, int]:
    """SIGKILL the groups, then every other member of their sessions; (groups, other processes)."""
    killed = 0
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
            killed += 1
    if not groups or not _proc_is_ours():
        return killed, 0
    signalled: set[tuple[int, str]] = set()
    for _ in range(SCAN_ROUNDS):  # a member forked between a scan and its kill shows in the next
        fresh = 0
        for pid, start, pgid in _members(groups):
            if pgid not in groups and (pid, start) not in signalled:
                signalled.add((pid, start))
                fresh += 1
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if not fresh:
            break
    return killed, len(signalled)


def _proc_is_ours() -> bool:
    """/proc shows our pid namespace (else its pids and session ids are someone else's)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _members(groups: set[int]) -> list[tuple[int, str, int]]:
    """(pid, start time, pgid) of each live process whose group or session is in ``groups``."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if fields[0] in (b"Z", b"X"):
            continue
        if int(fields[2]) in groups or int(fields[3]) in groups:
            found.append((int(entry.name), fields[19].decode(), int(fields[2])))
    return found


def _kill_cgroup(cgroup: str, service: int, dead: bool) -> str:
    """Kill everything in the instances' cgroup (not while the service lives in it), remove it.

    The service may have made cgroups inside (its leaf ``service``, one per instance:
    cgroups.py): it is looked for in each, and they are removed from the bottom up.
    """
    try:
        if not dead:
            for folder, _, _ in os.walk(cgroup):
                with open(os.path.join(folder, "cgroup.procs")) as procs:
                    if str(service) in procs.read().split():
                        return f"; the service is still in {folder}: not killed"
        with open(os.path.join(cgroup, "cgroup.kill"), "w") as kill:
            kill.write("1")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"; cannot kill cgroup {cgroup}: {exc.strerror}"
    deadline = time.monotonic() + CGROUP_DRAIN
    with open(os.path.join(cgroup, "cgroup.events"), "rb") as events:
        poller = select.poll()
        poller.register(events, select.POLLPRI)
        while True:
            events.seek(0)
            if b"populated 0" in events.read():
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return f"; cgroup {cgroup} still not empty after {CGROUP_DRAIN:g}s"
            poller.poll(left * 1000)
    try:
        for folder, _, _ in os.walk(cgroup, topdown=False):
            os.rmdir(folder)
    except OSError as exc:
        return f"; killed cgroup {cgroup} but cannot remove it: {exc.strerror}"
    return f"; killed and removed cgroup {cgroup}"


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"supervisor guardian (pid {os.getpid()}): {text}\n".encode())


# -- the service's side -----------------------------------------------------------------------


class Guardian:
    """The service's end of the guardian: starts it, tells it of groups, restarts it if it dies.

    It is the ``process.GroupWatch``: registered with ``process.watch_groups``, it hears
    of every spawn and every reaped leader. The guardian process is a ``process.Child``
    (so the orphan reaper leaves its exit status alone). Writes never block the event
    loop: the pipe is non-blocking and 1 MiB deep. A guardian that leaves it full is
    stuck (or SIGSTOPped): it is killed and replaced, which also frees any starting
    child blocked on its registration (the gate's write is a blocking one).
    """

    def __init__(self, cgroup: Path | None) -> None:
        self.cgroup = cgroup
        self.child: Child | None = None
        self._fd: int | None = None
        self._restarts: list[float] = []
        self._stopping = False
        self._proc_ours = _proc_is_ours()
        self._log = _logger()

    @classmethod
    def start(cls, *, resumed: bool = False, placement: CgroupPlacement | None = None) -> Guardian:
        """Start the guardian, in the instances' cgroup where one is delegated.

        ``placement``: the cgroup made and the service moved into its leaf already
        (``supervisor run`` does it while its manifest is checked); made here otherwise.

        ``resumed``: in a service that re-exec'd without a live guardian to adopt (the old one
        had given up, or had just ended): the instances' cgroup is the one the service already
        sits in (its leaf's parent), not a new one made inside it; the new guardian learns
        every adopted group as it starts (``_spawn``).
        """
        from . import process

        if resumed:
            from .placement import cgroup_before_the_exec

            guardian = cls(cgroup_before_the_exec())
            guardian._spawn()
            process.watch_groups(guardian)
            where = f"; instances run in cgroup {guardian.cgroup}" if guardian.cgroup else ""
            guardian._log.info("a new guardian %d watches the adopted groups%s", guardian.pid, where)
            return guardian
        if placement is None:
            from .placement import CgroupPlacement

            placement = CgroupPlacement.make()
        if placement.unavailable:
            why = placement.unavailable
            _logger().info("no cgroup for the instances (%s): the guardian alone kills their groups", why)
        guardian = cls(placement.cgroup)
        try:
            guardian._spawn()  # from inside the leaf: the guardian steps out first thing (_step_out)
        except BaseException:
            placement.undo()
            raise
        placement.taken = True
        process.watch_groups(guardian)
        where = f"; instances run in cgroup {guardian.cgroup}" if guardian.cgroup else ""
        guardian._log.info("guardian %d watches the process groups%s", guardian.pid, where)
        return guardian

    @classmethod
    def adopt(cls, state: dict[str, Any]) -> Guardian:
        """After a re-exec: the same guardian process on the same pipe (both inherited).

        Never a new one: the running guardian knows every group, and a closed pipe would
        tell it that the service is gone (it kills every group then).
        """
        from pathlib import Path

        from . import process

        guardian = cls(Path(state["cgroup"]) if state["cgroup"] else None)
        fd, pidfd, pid = int(state["fd"]), state["pidfd"], int(state["pid"])
        for inherited in (fd, pidfd):
            if inherited is not None:
                os.set_inheritable(inherited, False)
        guardian._fd = fd
        argv = [sys.executable, "-S", "-I", os.path.abspath(__file__), str(os.getpid())]
        guardian.child = process.Child.adopt(pid, pid, pidfd, argv, 0.0, kill_group_on_exit=False)
        process.watch_groups(guardian)
        return guardian

    def handoff_state(self) -> dict[str, Any] | None:
        """For a re-exec: what ``adopt`` needs (its pipe and its pidfd are handed over too).

        None when there is no live guardian on a pipe to hand over (it gave up after too many
        ends, or it ended a moment ago and is not restarted yet): the new service starts its
        own, where adopting half of one (a closed pidfd, no pipe) would have failed after the
        exec, with every instance going down with the service.
        """
        child = self.child
        if self._fd is None or child is None or child.exit is not None:
            return None
        return {
            "pid": child.pid,
            "pidfd": child.pidfd,
            "fd": self._fd,
            "cgroup": str(self.cgroup) if self.cgroup is not None else None,
        }

    @property
    def pid(self) -> int:
        return self.child.pid if self.child is not None else 0

    @property
    def fd(self) -> int | None:
        """For the gate, which opens /proc/SERVICE/fd/FD: only where /proc is our pid namespace's."""
        return self._fd if self._proc_ours else None

    def started(self, pgid: int) -> None:
        self._send(b"+%d\n" % pgid)

    def ended(self, pgid: int) -> None:
        if self.child is None or pgid != self.child.pid:
            self._send(b"-%d\n" % pgid)

    async def watch(self) -> None:
        """Restart the guardian whenever it dies while the service runs."""
        while not self._stopping and self.child is not None:
            status = await self.child.wait()
            if self._stopping:
                return
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
            if len(self._restarts) > MAX_RESTARTS:
                reason = status.describe()
                self._log.error("the guardian keeps ending (%s): children may outlive the service", reason)
                self._detach()
                return
            self._log.warning("the guardian ended (%s): starting another", status.describe())
            self._spawn()

    async def stop(self, timeout: float = 10) -> None:
        """At a clean exit: leave the cgroup, let the guardian kill what is left, wait for it."""
        import anyio

        from . import process

        self._stopping = True
        process.watch_groups(None)
        if self.cgroup is not None and not _move(os.getpid(), self.cgroup.parent):
            self._log.warning("cannot leave cgroup %s: the guardian leaves it be", self.cgroup)
        self._send(b"x\n")
        if self.child is not None:
            with anyio.move_on_after(timeout) as waiting:
                await self.child.wait()
            if waiting.cancelled_caught:
                self._log.error("the guardian did not finish within %gs: killed", timeout)
                self.child.send_signal(signal.SIGKILL, group=False)
                await self.child.wait()
        self._detach()

    # -- inside --------------------------------------------------------------------------------

    def _spawn(self) -> None:
        import fcntl
        import subprocess

        from . import process

        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 1 << 20)
            argv = [sys.executable, "-S", "-I", os.path.abspath(__file__), str(os.getpid())]
            argv.append(str(self.cgroup) if self.cgroup is not None else "")
            popen = subprocess.Popen(
                argv, stdin=read, stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd="/"
            )
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        self.child = process.Child(popen, argv, kill_group_on_exit=False)
        os.set_blocking(write, False)
        if self._fd is None:
            self._fd = write
        else:  # a restart keeps the fd number the gate is told (the old pipe is gone with it)
            os.dup2(write, self._fd, inheritable=False)
            os.close(write)
        for pgid in process.running_groups():
            if pgid != self.child.pid:
                self.started(pgid)

    def _send(self, line: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, line)
        except BlockingIOError:  # 1 MiB unread: it is stopped or stuck, and starting children would block
            if self.child is not None and self.child.send_signal(signal.SIGKILL, group=False):
                self._log.warning("the guardian (pid %d) does not read: killed, to be replaced", self.pid)
        except OSError:  # EPIPE: it died; watch() restarts it and tells the new one every running group
            pass

    def _detach(self) -> None:
        from . import process

        process.watch_groups(None)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _logger() -> logging.Logger:
    import logging

    return logging.getLogger("supervisor")


def _move(pid: int, cgroup: Path) -> bool:
    try:
        (cgroup / "cgroup.procs").write_text(str(pid))
    except OSError:
        return False
    return True


def _own_cgroup() -> Path | None:
    """The folder of this process's cgroup v2, from /proc/self/cgroup and the cgroup2 mount."""
    from pathlib import Path

    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    for mount in mounts:
        fields = mount.split()
        if relative is not None and "-" in fields and fields[fields.index("-") + 1] == "cgroup2":
            root, point = fields[3], fields[4]
            if root != "/" and relative.startswith(root):
                relative = relative[len(root) :]
            return Path(point) / relative.lstrip("/")
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv))
