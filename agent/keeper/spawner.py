"""The job spawner: a small single-threaded process that forks, sets up and execs every job.

Why it exists (the design notes, "Facts measured on these machines"): no
Python code may run between fork and exec in the gRPC process, and exec'ing
util-linux trampolines is unsafe (their execvp() hands an ENOEXEC file to
/bin/sh). This process never imports grpc (nor asyncio, nor yaml) and has
one thread, so its forked child may run Python freely before ``execve``.

It is started by the agent (:class:`agent.keeper.spawn.SpawnerOps`) as a
fresh isolated interpreter (``python -I``) running :func:`main` with ``FD PARENT_PID
[CGROUP_JOBS_DIR CONTROLLERS]``, with
one end of a ``socketpair(AF_UNIX, SOCK_SEQPACKET)`` as FD; the protocol is
in :mod:`agent.keeper.spawnproto`. The agent sends fully resolved plans; the
spawner checks what it can check before forking (an absolute path or a
descriptor, limits the kernel will accept) and answers with the pid once
``execve`` has succeeded, or with the step and errno that failed.

The child's set-up, in this order: setsid; join the cgroup (``cgroup``
descriptor: write "0"); rlimits; umask; chdir; user switch (setgroups([]),
setresgid, setresuid); default signal dispositions and an empty mask; stdin
/dev/null, stdout and stderr the output pipe, a pinned script on fd 3;
close every other descriptor; Landlock (or no_new_privs alone); seccomp;
``execve`` of the path, or ``fexecve`` of the pinned program's sealed copy.
Never execvp, never a shell, no PATH lookup: ENOEXEC is a start failure like
any other.

Two ways to run that set-up, the same steps in the same order with the same
error texts (tests/test_vspawn.py compares them):

* the C vfork path (:mod:`agent.keeper.vspawn`, ``_vspawn.c``), used when the
  extension is built: ``clone(CLONE_VM | CLONE_VFORK)`` on a stack of its own,
  every array prepared before, only system calls in the child. The spawner
  sleeps until the child has exec'd or failed, so the answer goes out at once;
  a failing step leaves its index and errno in the spawner's memory and the
  child exits 127.
* the Python fork path (:func:`agent.keeper.childsetup.child`), when the
  extension cannot be imported or ``WORKER_AGENT_SPAWN=fork``: ``os.fork()``
  and the set-up in Python. A failing step writes ``step\\0errno`` to a
  CLOEXEC pipe and exits 127; end of file without data on that pipe means the
  exec succeeded; the answer goes out when the pipe says so, so the next job
  can be forked meanwhile.

The first message the spawner sends says which (``{"op": "hello", "spawn":
"vfork" | "fork", "why": ...}``); the agent logs it. Measured (``python -m
bench.spawncost --jobs 1000 --rounds 3``, as root, /bin/true, 2 shared cores):
the C path 901 jobs/s and 1.25 ms start-to-exit at 1 in flight, 1037 jobs/s at
16, spawner CPU 0.19-0.24 ms a job; the fork path in the same run 253 jobs/s
and 5.2 ms, 333 jobs/s, 0.72-0.78 ms (docs/benchmarks.md).

Job cgroups (:mod:`agent.keeper.cgroups`): the spawner owns each job's
cgroup from creation to removal, and the agent asks by job id. A plan with
``cgroup: {"id": JOB_ID, "memory_bytes": N, "pids": N, "cpu_millicores": N}``
makes the spawner create the leaf ``<jobs>/<JOB_ID>`` with those limits and
open its ``cgroup.procs`` before the fork; the child joins it right after
setsid, before anything else, so no process of the job ever runs outside
it. Why here and not in the agent: the spawner is the process that forks,
the writes are blocking file operations that stay off the agent's event
loop, and it is the half that will keep privileges when the agent drops
them. ``signal`` reaches every process of the leaf (through pidfds, so a
reused pid is never hit) and SIGKILL is ``cgroup.kill``.

The spawner is the jobs' parent, so it reaps them: a pidfd per job in one
selector with the control socket, no polling. When a job's leader exits it
first kills the rest of the leader's process group (the leader is a zombie
until reaped, so its group id cannot have been reused), then ``wait4`` gives
the status. With a cgroup it then kills the whole leaf (``cgroup.kill``:
setsid'd and double-forked processes too) and waits, through inotify on
``cgroup.events`` in the same selector, until the leaf is unpopulated; only
then does it read ``cpu.stat``, ``memory.peak`` and ``memory.events``,
remove the leaf and report the exit. Peak memory is the leaf's
``memory.peak`` or nothing: ``ru_maxrss`` of a forked child keeps the
spawner's own high-water mark.

It exits when the agent closes the socket or asks it to, and dies with the
agent (PR_SET_PDEATHSIG). Jobs still running then are left alone: the
agent's next start finds them (by their cgroups, or without cgroups by
AGENT_INSTANCE) and reports them LOST, as it does after an agent crash.

The parts, each its own module: a start request from check to answer
(:mod:`agent.keeper.jobstart`); the job's place made before the fork and undone after
(:mod:`agent.keeper.jobplace`); the child started by vfork or fork
(:mod:`agent.keeper.childexec`) and, on the fork path, set up in Python
(:mod:`agent.keeper.childsetup`); signalling (:mod:`agent.keeper.jobsignal`); the exit's
report (:mod:`agent.keeper.jobreap`). This module holds the loop and the jobs' table.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import selectors
import signal
import socket
import sys
from typing import Any

from agent.keeper import capabilities as caps_mod
from agent.keeper import cgroups, seccomp, vspawn
from agent.keeper import spawnproto as proto
from agent.keeper.childexec import Launcher, Starting
from agent.keeper.childsetup import FIRST_FREE_FD, RLIMIT_RESOURCES
from agent.keeper.jobplace import JobPlaces
from agent.keeper.jobreap import Draining, account, reap, remove_leaf
from agent.keeper.jobsignal import other_user, signal_job, signal_leaf
from agent.keeper.jobstart import Starter

# Importable from here as before: the keeper's (Starting, signal_leaf) and the tests'.
__all__ = ["RLIMIT_RESOURCES", "Spawner", "Starting", "main", "signal_leaf"]

PR_SET_PDEATHSIG = 1


def _log(text: str) -> None:
    print(f"agent spawner: {text}", file=sys.stderr)


class Spawner:
    """The spawner's state: its children (unreaped pids) and the control socket.

    The parts of a job's life are its collaborators': the place made before the fork
    (:class:`JobPlaces`), the child's set-up and exec (:class:`Launcher`, and in the
    fork child :mod:`agent.keeper.childsetup`), signalling
    (:mod:`agent.keeper.jobsignal`) and the exit's report (:mod:`agent.keeper.jobreap`).
    """

    def __init__(
        self,
        sock: socket.socket | None,
        subtree: cgroups.Subtree | None = None,
        path: tuple[str, str, Any] = ("fork", "default", None),
    ) -> None:
        # The agent's channel (None: the job keeper, whose agent comes and goes).
        self.sock = sock
        # "vfork" (the C child of agent.keeper._vspawn) or "fork" (childsetup), and why.
        self.path, self.path_why, module = path
        self.sel = selectors.DefaultSelector()
        if sock is not None:
            self.sel.register(sock, selectors.EVENT_READ, None)
        self.children: dict[int, int] = {}  # pid -> pidfd, until reaped
        self.subtree = subtree
        self.cgroups: dict[int, cgroups.JobCgroup] = {}  # pid -> its job's leaf, until reported
        self.draining: dict[int, Draining] = {}  # inotify wd -> job being emptied
        self.watcher: cgroups.EventWatcher | None = None
        self.running = True
        self.root = os.geteuid() == 0
        # Sets jobs up as root does (any user, the entry's capabilities): root, or a keeper
        # of another user with CAP_SETUID, CAP_SETGID and CAP_SETPCAP (the privileged unit).
        self.gives = self.root or caps_mod.gives_capabilities()
        self.launcher = Launcher([], self.gives, caps_mod.last_cap(), module)
        self.places = JobPlaces(subtree, self.root)
        # self.send and self.started as the subclass has them (the keeper hears every answer).
        # Named spawning, not starter: the keeper (a subclass) has a Starter of its own.
        self.spawning = Starter(self.places, self.launcher, self.sel, self.send, self.started)
        self.scratch: dict[int, str] = {}  # pid -> its scratch directory, removed at exit
        # The places' own dict (path -> the job's (uid, gid)): a re-exec'd keeper saves it.
        self.scratch_owners = self.places.scratch_owners
        self.guards: dict[int, seccomp.ListenGuard] = {}  # pid -> its listen() checks
        # pid -> (uid, gid) of a running job of another uid than a non-root keeper's (its
        # dynamic user): signalled through a helper of that uid (no CAP_KILL here).
        self.job_users: dict[int, tuple[int, int]] = {}
        # Hold every number below FIRST_FREE_FD: a prepared ruleset's descriptors must
        # never land where the child puts the job's own (0-4) with dup2.
        while (low := os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)) < FIRST_FREE_FD:
            pass
        os.close(low)

    def setup_signals(self) -> None:
        """Survive the terminal's and the service manager's signals; note what the child resets."""
        # The agent decides when the spawner ends (closing the socket): a
        # Ctrl-C or systemd's SIGTERM to the whole group must not take the
        # spawner away while the agent stops its jobs.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for sig in signal.valid_signals():
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                if signal.getsignal(sig) != signal.SIG_DFL:
                    self.launcher.reset.append(sig)
            except (OSError, ValueError):
                continue

    def send(self, msg: dict[str, Any]) -> None:
        if self.sock is None:
            return
        try:
            proto.send(self.sock, msg)
        except OSError:
            self.running = False  # the agent is gone

    def serve(self) -> None:
        """Run until the agent closes the socket or says exit."""
        while self.running:
            asked = False
            for key, _ in self.sel.select():
                if key.data is None:
                    asked = True
                else:
                    self.dispatch(key.data)
                if not self.running:
                    break
            # One request per turn, after every exit that is ready: a job that
            # ended is reported before the next start, not behind a queue of
            # them (each start holds this loop while its child sets up and
            # execs, so under load exits waited many milliseconds, and
            # original-protocol clients polled for them meanwhile).
            if asked and self.running:
                self.on_socket()

    def dispatch(self, what: Any) -> None:
        """Handle one ready descriptor of a job (its pidfd, start report, listen() checks)
        or the cgroup watcher.

        A bug in one of these must not take the spawner down: its death kills every
        running job. It is logged with its traceback (the agent's log) and the loop
        goes on.
        """
        try:
            if what is self.watcher:
                self.on_cgroup_events()
            elif isinstance(what, Starting):
                self.spawning.on_started(what)
            elif isinstance(what, seccomp.ListenGuard):
                what.handle()
            else:
                self.on_exit(what)
        except Exception:
            import traceback

            _log(f"internal error handling {what!r}:\n{traceback.format_exc()}")

    def on_socket(self) -> None:
        """Take one request from the agent (the socket stays readable for the rest)."""
        assert self.sock is not None
        try:
            data, fds = proto.recv(self.sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except proto.ProtocolError as e:
            _log(f"bad message: {e}")
            return
        except OSError:
            self.running = False
            return
        if not data:
            self.running = False  # end of file: the agent closed or died
            return
        try:
            msg, byrole = proto.decode(data, fds)
        except proto.ProtocolError as e:
            _log(f"bad message: {e}")
            return
        self.request(msg, byrole)
        for fd in byrole.values():
            with contextlib.suppress(OSError):  # spawn() may have closed them already
                os.close(fd)

    def request(self, msg: dict[str, Any], byrole: dict[str, int]) -> None:
        """Carry out one request of the agent's: spawn, signal or exit."""
        op = msg["op"]
        try:
            if op == "spawn":
                self.spawn(msg, byrole)
            elif op == "signal":
                self.signal(msg)
            elif op == "exit":
                self.running = False
        except Exception:
            # As in dispatch(): logged, and the start (if it was one) answered as failed,
            # so the agent never waits for it.
            import traceback

            _log(f"internal error in {op}:\n{traceback.format_exc()}")
            if op == "spawn":
                error = "internal error in the job spawner (see the agent's log)"
                self.spawning.refuse(msg.get("id"), error, errno.EIO)

    def spawn(self, msg: dict[str, Any], fds: dict[str, int]) -> None:
        self.spawning.spawn(msg, fds)

    def started(
        self,
        pid: int,
        rid: Any,
        cg: cgroups.JobCgroup | None,
        scratch: str | None,
        listener: int = -1,
        plan: dict[str, Any] | None = None,
    ) -> None:
        """The job's program runs: watch its pidfd (and its listen() checks) and answer
        with the pid."""
        if listener >= 0 and plan is not None:
            who = plan.get("uid"), plan.get("gid"), plan.get("capabilities", [])
            guard = self.guards[pid] = seccomp.ListenGuard(listener, *who)
            self.sel.register(listener, selectors.EVENT_READ, guard)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = pidfd
        user = other_user(plan, self.root)
        if user is not None:
            self.job_users[pid] = user
        if cg is not None:
            self.cgroups[pid] = cg
        if scratch is not None:
            self.scratch[pid] = scratch
        self.sel.register(pidfd, selectors.EVENT_READ, pid)
        self.send({"op": "spawned", "id": rid, "pid": pid})

    def signal(self, msg: dict[str, Any]) -> None:
        pid, sig = msg.get("pid"), msg.get("sig")
        # Only a child not yet reaped: its pid (the group id) is still ours.
        if (
            not isinstance(pid, int)
            or pid <= 1
            or pid not in self.children
            or not isinstance(sig, int)
        ):
            return
        signal_job(pid, sig, self.cgroups.get(pid), self.job_users.get(pid), root=self.root)

    def on_exit(self, pid: int) -> None:
        """A job's leader has exited: reap it, and report once nothing of the job is left."""
        msg = reap(pid)
        pidfd = self.children.pop(pid)
        self.job_users.pop(pid, None)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        guard = self.guards.pop(pid, None)
        if guard is not None:
            # What is left of the job is killed next; a listen() of it meanwhile fails.
            self.sel.unregister(guard.fd)
            guard.close()
        cg = self.cgroups.get(pid)
        if cg is None:
            # Without a cgroup the group kill above is all there is; with one, the scratch
            # goes once the leaf is empty (cgroup_done): a process that left the job's
            # group could otherwise still be writing into it while it is removed.
            self.places.remove_scratch(self.scratch.pop(pid, None))
            self.send(msg)
            return
        self.drain(pid, cg, msg)

    def drain(self, pid: int, cg: cgroups.JobCgroup, msg: dict[str, Any]) -> None:
        """Empty the reaped job's leaf, then report (now, or when cgroup.events says so)."""
        # The usual case: nothing of the job is left (the zombie leader does
        # not count), so no kill and no watch are needed.
        if not cg.populated():
            self.cgroup_done(pid, cg, msg, emptied=True)
            return
        # The whole job ends with its leader: processes that left its session
        # or process group are still in its cgroup.
        try:
            cg.kill()
            wd = self.watch(cg)
        except cgroups.CgroupError as e:
            _log(str(e))
            self.cgroup_done(pid, cg, msg, emptied=False)
            return
        # Watch first, then look: an emptying before the watch is not missed.
        if wd is None or not cg.populated():
            if wd is not None:
                self.unwatch(wd)
            # Seen empty only when watched (without a watch it was killed by signals).
            self.cgroup_done(pid, cg, msg, emptied=wd is not None)
            return
        self.draining[wd] = Draining(cg, msg, wd)

    def watch(self, cg: cgroups.JobCgroup) -> int | None:
        """Watch the leaf's cgroup.events; None when inotify cannot be had."""
        if self.watcher is None:
            try:
                self.watcher = cgroups.EventWatcher()
            except cgroups.CgroupError as e:
                _log(f"{e}; killing jobs synchronously")
                cg.kill_by_signal()
                return None
            self.sel.register(self.watcher.fileno(), selectors.EVENT_READ, self.watcher)
        return self.watcher.watch(cg)

    def unwatch(self, wd: int) -> None:
        if self.watcher is not None:
            self.watcher.unwatch(wd)

    def on_cgroup_events(self) -> None:
        assert self.watcher is not None
        self.leaves_fired(self.watcher.drain())

    def leaves_fired(self, fired: list[int]) -> None:
        """The leaves whose cgroup.events changed (inotify watch descriptors)."""
        # A watch the kernel dropped (the leaf vanished) shows up as nothing:
        # check every draining leaf that fired, and any whose file is gone.
        for wd in list(self.draining):
            d = self.draining[wd]
            if (wd in fired or not d.cg.events_path.exists()) and not d.cg.populated():
                del self.draining[wd]
                self.unwatch(wd)
                self.cgroup_done(d.msg["pid"], d.cg, d.msg, emptied=True)

    def cgroup_done(
        self, pid: int, cg: cgroups.JobCgroup, msg: dict[str, Any], *, emptied: bool
    ) -> None:
        """The leaf is empty (``emptied``: seen so, rather than given up on after a failed
        kill): account from it, remove it and the scratch, report the exit."""
        self.cgroups.pop(pid, None)
        self.places.remove_scratch(self.scratch.pop(pid, None))
        memory = self.subtree is None or "memory" in self.subtree.controllers
        account(cg, msg, memory=memory)
        self.send(msg)
        # After the report (a waiting query is answered sooner): the empty leaf is
        # nothing of the job's any more; one left by a death in between is removed by
        # the next keeper's look at the leftovers.
        remove_leaf(cg)


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the agent died before the prctl
        os._exit(0)


def main(argv: list[str]) -> int:
    """``python -m agent.keeper.spawner FD PARENT_PID [CGROUP_JOBS_DIR CONTROLLERS]``.

    CONTROLLERS is a comma-separated list (may be empty) of the controllers
    enabled for job cgroups in CGROUP_JOBS_DIR.
    """
    if len(argv) not in (2, 4):
        print(
            "usage: python -m agent.keeper.spawner FD PARENT_PID [CGROUP_JOBS_DIR CONTROLLERS]",
            file=sys.stderr,
        )
        return 2
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    subtree = None
    if len(argv) == 4:
        from pathlib import Path

        subtree = cgroups.Subtree(Path(argv[2]), frozenset(c for c in argv[3].split(",") if c))
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    try:
        path = vspawn.choose(os.environ)
    except RuntimeError as e:
        print(f"agent spawner: {e}", file=sys.stderr)
        return 2
    sp = Spawner(sock, subtree, path)
    sp.setup_signals()
    # First message: which spawn path this spawner uses (the agent logs it).
    sp.send({"op": "hello", "spawn": sp.path, "why": sp.path_why})
    # Fewer copy-on-write faults in each forked child: the collector never
    # walks (and so never dirties) the spawner's long-lived objects.
    gc.freeze()
    sp.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
