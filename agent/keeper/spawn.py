"""Starting, signalling and reaping job processes: the only place that does.

Everything here is behind :class:`ProcessOps`, so the agent's supervisor
(its ``supervisor`` module) is driven by a fake in unit tests
(tests/test_supervisor_unit.py) and by the real kernel in integration tests.

The real implementation, :class:`SpawnerOps`, hands every job to the job
spawner (:mod:`agent.keeper.spawner`), a small single-threaded process
started from a fresh interpreter when the agent starts. Why (the design
notes, "Facts measured on these machines"): no Python code may run between
fork and exec in the gRPC process, and util-linux ``prlimit``/``setpriv``
trampolines call execvp(), which hands a file the kernel refuses (ENOEXEC)
to /bin/sh. The spawner sets up the job in its forked child (session,
cgroup, rlimits, umask, cwd, user, signals, descriptors) and calls
``execve`` (or ``fexecve`` of a pinned program's sealed copy) itself: no
PATH lookup, no shell, ENOEXEC is a start failure. It is the jobs' parent,
so it reaps them (pidfd + ``wait4``: status, no polling) after killing what
each job left in its process group, and reports the exit. With a cgroup
subtree (``cgroups``) it also creates each job's cgroup (``SpawnSpec.cgroup``,
asked for by job id), kills it as a whole when the leader exits, waits until
it is empty, accounts from it and removes it (see :mod:`agent.keeper.spawner`).

The agent side sends a fully resolved plan over a ``SOCK_SEQPACKET``
socketpair (:mod:`agent.keeper.spawnproto`), with the job's descriptors by
SCM_RIGHTS, and reads the answers with ``loop.add_reader``: nothing blocks
the event loop but one ``sendmsg``.

When the spawner dies (end of file on the socket, whatever the cause):
every job it was running is killed (``killpg`` SIGKILL from the agent where
permitted, and ``cgroup.kill`` of its cgroup) and ends FAILED, "start
failed: the job spawner died; the job's processes were killed"; starts
waiting for an answer fail the same way; a new spawner is started and new
jobs work. If it dies more than
:data:`MAX_DEATHS` times in :data:`DEATH_WINDOW` seconds, the agent logs an
error and shuts down with a non-zero status (``on_fatal``). At the agent's
shutdown :meth:`SpawnerOps.close` tells the spawner to exit and waits for
it; the spawner also dies with the agent (PR_SET_PDEATHSIG), so it never
outlives it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.keeper import spawnproto as proto
from agent.keeper.cgroups import CgroupError, Subtree
from agent.keeper.errors import SpawnFailure
from agent.keeper.filetrust import SCRIPT_FD_PATH
from agent.keeper.launch import SPAWN_ENV, helper_argv, python_main, start_helper
from agent.keeper.lifecycle import Exit
from agent.keeper.spawnplan import SpawnSpec, plan_of

__all__ = [
    "SCRIPT_FD_PATH",
    "SPAWNER_DIED",
    "SPAWN_ENV",
    "SpawnFailure",
    "SpawnSpec",
    "SpawnerOps",
    "plan_of",
]

log = logging.getLogger(__name__)

SPAWNER_DIED = "the job spawner died; the job's processes were killed"
MAX_DEATHS = 3
DEATH_WINDOW = 60.0
CLOSE_WAIT = 2.0
_SPAWNER_MAIN = python_main("agent.keeper.spawner", "main")


class ProcessOps(Protocol):
    """The process operations the supervisor needs: the seam for a fake or a spawner.

    Contract: ``spawn`` starts the job as the leader of its own session and
    process group and returns its pid, or raises OSError when the program
    could not be started. When the leader exits, the implementation kills
    whatever the job left behind (while the leader's pid is still reserved),
    reaps it and then calls ``on_exit`` once, on the event loop's thread.
    ``signal`` signals the whole job; False if it is already gone.
    """

    async def spawn(self, spec: SpawnSpec, on_exit: Callable[[Exit], None]) -> int: ...
    def signal(self, pid: int, sig: int) -> bool: ...
    def close(self) -> None: ...


class SpawnerOps:
    """:class:`ProcessOps` through the job spawner process (see the module docstring)."""

    def __init__(
        self,
        *,
        on_fatal: Callable[[str], None] | None = None,
        cgroups: Subtree | None = None,
    ) -> None:
        self._on_fatal = on_fatal
        self._cgroups = cgroups
        self._job_cgroups: dict[int, str] = {}  # pid -> job id, while a job with a cgroup runs
        self._pending_cgroups: dict[int, str] = {}  # request id -> job id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._next_id = 0
        # request id -> (answer, on_exit); pid -> on_exit while it runs
        self._pending: dict[int, tuple[asyncio.Future[int], Callable[[Exit], None]]] = {}
        self._running: dict[int, Callable[[Exit], None]] = {}
        self._deaths = Deaths(MAX_DEATHS, DEATH_WINDOW)
        self._closed = False
        # "vfork" or "fork": what the current spawner said it uses (its first message).
        self.spawn_path: str | None = None
        self._start()

    @property
    def spawner_pid(self) -> int | None:
        """The pid of the current spawner process (None when there is none)."""
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        self.spawn_path = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # A fresh interpreter (exec right after vfork, no Python in the child):
            # neither the agent's environment nor its working directory can change what
            # the spawner imports.
            argv = helper_argv(
                _SPAWNER_MAIN, str(theirs.fileno()), str(os.getpid()), *self._cgroup_args()
            )
            self._proc = start_helper(argv, theirs.fileno())
        finally:
            theirs.close()
        self._sock = ours
        self._attach()

    def _cgroup_args(self) -> list[str]:
        if self._cgroups is None:
            return []
        return [str(self._cgroups.jobs), ",".join(sorted(self._cgroups.controllers))]

    def _attach(self) -> None:
        if self._sock is None:
            return
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return
        self._loop.add_reader(self._sock.fileno(), self._readable)

    async def spawn(self, spec: SpawnSpec, on_exit: Callable[[Exit], None]) -> int:
        """Start the job; raise :class:`SpawnFailure` naming the step that failed."""
        if self._loop is None:
            self._attach()
        if self._sock is None:
            raise SpawnFailure(errno.EIO, "the job spawner is not running")
        loop = asyncio.get_running_loop()
        plan, roles, fds = plan_of(spec)
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[int] = loop.create_future()
        try:
            proto.send(self._sock, {"op": "spawn", "id": rid, "plan": plan, "fds": roles}, fds)
        except OSError as e:
            code = e.errno or errno.EIO
            if code in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self._died()
                raise SpawnFailure(code, "the job spawner died") from None
            raise SpawnFailure(code, proto.error_text("sending the plan", code)) from None
        self._pending[rid] = (fut, on_exit)
        if spec.cgroup is not None:
            self._pending_cgroups[rid] = str(spec.cgroup["id"])
        return await fut

    def signal(self, pid: int, sig: int) -> bool:
        """Signal a job's process group (through the spawner); False if it is not running."""
        if pid <= 1:
            raise ValueError(f"refusing to signal process group {pid}")
        if pid not in self._running or self._sock is None:
            return False
        try:
            proto.send(self._sock, {"op": "signal", "pid": pid, "sig": int(sig)})
        except OSError:
            return False  # the reader sees the end of file and fails the job
        return True

    def _readable(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(proto.RECV_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._died()
                return
            try:
                self._dispatch(json.loads(data))
            except (ValueError, KeyError, TypeError) as e:
                log.error("bad message from the job spawner: %s", e)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        assert self._loop is not None
        if msg["op"] == "hello":
            self.spawn_path = str(msg["spawn"])
            log.info(
                "job spawner (pid %s): %s path (%s)", self.spawner_pid, msg["spawn"], msg["why"]
            )
        elif msg["op"] == "spawned":
            fut, on_exit = self._pending.pop(msg["id"])
            job_id = self._pending_cgroups.pop(msg["id"], None)
            pid = msg.get("pid")
            if pid is not None and job_id is not None:
                self._job_cgroups[pid] = job_id
            if pid is None:
                if not fut.done():
                    fut.set_exception(
                        SpawnFailure(int(msg.get("errno", errno.EIO)), str(msg["error"]))
                    )
                return
            self._running[pid] = on_exit
            if fut.done():  # the start was cancelled: the job must not run unseen
                self._running[pid] = lambda ex: None
                self.signal(pid, signal.SIGKILL)
            else:
                fut.set_result(pid)
        elif msg["op"] == "exited":
            on_exit = self._running.pop(msg["pid"])
            self._job_cgroups.pop(msg["pid"], None)
            ex = Exit(
                exit_code=msg["code"],
                signal=msg["signal"],
                user_cpu=msg["utime"],
                system_cpu=msg["stime"],
                max_rss=msg["maxrss"],
                oom_kills=int(msg.get("oom", 0)),
                end_time=msg.get("ended"),
            )
            # Scheduled, not called: the task awaiting this job's spawn (woken
            # by the answer just before) runs first, as with a pidfd reader.
            self._loop.call_soon(on_exit, ex)

    def _died(self) -> None:
        if self._closed or self._sock is None:
            return
        stop_reading(self._loop, self._sock)
        self._sock = None
        status = self._reap_spawner(0.5)
        log.error(
            "the job spawner (pid %s) died (%s); killing its %d running job(s)",
            self.spawner_pid,
            status,
            len(self._running),
        )
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(SpawnFailure(errno.EIO, "the job spawner died"))
        self._pending.clear()
        # A start in flight may have its cgroup (and a child in it) already.
        for job_id in self._pending_cgroups.values():
            self._kill_cgroup(job_id)
        self._pending_cgroups.clear()
        for pid, on_exit in self._running.items():
            try:
                # The jobs are orphans now; their groups are still theirs
                # while anything of them lives.
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            self._kill_cgroup(self._job_cgroups.pop(pid, None))
            # They had started: FAILED with the reason, never "start failed".
            ex = Exit(exit_code=None, signal=None, lost=SPAWNER_DIED, end_time=time.time())
            if self._loop is not None:
                self._loop.call_soon(on_exit, ex)
        self._running.clear()
        if not self._deaths.count(time.monotonic()):
            why = (
                f"the job spawner died {self._deaths.recent} times in {DEATH_WINDOW:.0f} s; "
                "the agent cannot run jobs"
            )
            log.error("%s", why)
            self._proc = None
            if self._on_fatal is not None:
                self._on_fatal(why)
            return
        try:
            self._start()
        except OSError as e:
            log.error("cannot restart the job spawner: %s", e)
            if self._on_fatal is not None:
                self._on_fatal(f"cannot restart the job spawner: {e}")

    def _kill_cgroup(self, job_id: str | None) -> None:
        if job_id is not None:
            kill_job_cgroup(self._cgroups, job_id)

    def _reap_spawner(self, timeout: float) -> str:
        return "not running" if self._proc is None else reap(self._proc, timeout)

    def close(self) -> None:
        """Tell the spawner to exit and wait briefly for it (after the jobs ended)."""
        self._closed = True
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            try:
                proto.send(self._sock, {"op": "exit"})
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            self._reap_spawner(CLOSE_WAIT)


def kill_job_cgroup(subtree: Subtree | None, job_id: str) -> None:
    """Kill a job whose spawner or keeper died by its cgroup (what left its process group
    too), and remove the cgroup; a failure is logged."""
    if subtree is None:
        return
    try:
        leaf = subtree.job(job_id)
        leaf.kill()
        # Usually empty within a millisecond; what is not is removed at
        # the next start (leftovers).
        leaf.remove(timeout=0.2)
    except (CgroupError, ValueError) as e:
        log.warning("job %s: %s", job_id, e)


def stop_reading(loop: asyncio.AbstractEventLoop | None, sock: socket.socket) -> None:
    """A dead helper's socket (the spawner's, the keeper's): no longer read on ``loop``
    (where it was), and closed."""
    if loop is not None:
        loop.remove_reader(sock.fileno())
    sock.close()


def reap(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait for a helper process (the spawner, the keeper) to end, killing it after
    ``timeout``; how it ended."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return f"exit status {code}" if code >= 0 else f"signal {-code}"


class Deaths:
    """The recent deaths of a helper process (the spawner, the keeper): more than
    ``most`` within ``window`` seconds are too many (the agent gives up on it)."""

    def __init__(self, most: int, window: float) -> None:
        self.most, self.window = most, window
        self._times: list[float] = []

    def count(self, now: float) -> bool:
        """Count a death at ``now`` (monotonic seconds); False when it makes too many."""
        self._times = [t for t in self._times if now - t < self.window] + [now]
        return len(self._times) <= self.most

    @property
    def recent(self) -> int:
        """The deaths within the window, at the last count."""
        return len(self._times)
