"""The job keeper: the process that holds the jobs, so that they outlive the agent.

It grows out of the job spawner (:mod:`agent.daemon.spawner`, whose spawning,
reaping, cgroups, Landlock and seccomp it inherits) and adds what a job needs
while nobody faces the network for it:

* **its output**: the keeper makes each job's pipe, reads it and records it in
  the job's output file (:mod:`agent.daemon.outputfile`: the cap truncates, a
  write error fails the job), and tells the agent how far each file got;
* **its lifecycle**: the pure :class:`agent.daemon.lifecycle.Life` of each job
  runs here, with its timers: the timeout, the grace between SIGTERM and
  SIGKILL, the output cap's kill, the end of the output after the exit. So a
  job times out, is capped and ends with its true status whether or not an
  agent is attached;
* **its end**: each finished job's record (state, end text, exit status, CPU,
  output size) is kept until the agent says it is durably in the history
  (``ack``); an agent that died before that is told again when one attaches.

Its own death (kill -9, a crash): the jobs run on in their cgroup leaves, and the next
keeper *adopts* them at its start (:meth:`Keeper.adopt_leftovers`): the leaf is the
job (its name the job id, its processes signalled only through it, its end the leaf
emptying), what the dead keeper knew of it (deadline, cap, grace, record) is in the
``<job id>.keeper`` file it wrote at the start, and its output pipe comes back from
systemd's descriptor store where there is one. Only the exit status is lost (only the
dead parent could reap it), and the job's end says so: LOST, "exit status unknown: the
keeper restarted". Without cgroups nothing can find them again.

The agent faces the network and keeps the history; it attaches to the keeper's
socket (``SOCK_SEQPACKET``, the protocol of :mod:`agent.daemon.spawnproto`),
and when it goes (restart, crash, kill -9, upgrade) the jobs run on. The next
agent attaches and gets a ``hello`` listing every running job (with the record
the first agent gave it, as the keeper completed it, so a start the agent never
managed to commit is still recorded) and every finished one not yet acknowledged.

Who may attach (the kernel's word, never the peer's): a peer whose uid is the
agent's (``SO_PEERCRED``), that is neither one of this keeper's descendants (the
keeper is a child subreaper, so every process a job starts stays its descendant,
however it double-forks) nor in a job cgroup. A job, even one running as the
agent's own uid in the development mode, cannot talk to the keeper.

The keeper decides every start (:mod:`agent.daemon.decision`): it loads the
configuration and the policy itself (``--config``: the agent's own config file, read
in a loader process; again on ``reload``), and the agent sends only who asks (the
caller's identity, as the agent saw it) and what (the request): never a plan, a user,
capabilities or descriptors. So code execution in the agent can start only what the
policy allows some identity to start. What only the agent knows stays there: who may
call StartJob, whether it accepts jobs, ``max_running``, the history.

Agent -> keeper (besides the spawner's messages, which the keeper does not take)::

    {"op": "start", "id": N, "job": JOB_ID, "record": {...},
     "request": {"identity": TEXT, "command": TEXT, "path": TEXT, "args": [TEXT],
                 "env": {NAME: TEXT}, "secret_args": [N], "timeout": s | null,
                 "limits": {NAME: N | null}}}
    {"op": "stop", "job": JOB_ID, "how": "stop" | "shutdown" | "kill" | "not_recorded"}
    {"op": "ack", "jobs": [JOB_ID, ...]}     finished records now in the history
    {"op": "reload", "id": N}                 read the policy again (SIGHUP)
    {"op": "exit"}                            stop serving; jobs still running are killed

Keeper -> agent::

    {"op": "hello", "protocol": 2, "pid": P, "spawn": "vfork" | "fork", "why": TEXT,
     "jobs": [{"job", "pid", "size", "truncated", "ending", "record"}],
     "ended": [finished messages]}
    {"op": "refused", "id": N, "job": JOB_ID, "kind": KIND, "rule": TEXT, "message": TEXT}
        not admitted, nothing started: the agent answers the caller with exactly this
        (KIND: agent.vocabulary.Kind's name; INTERNAL for a malformed start)
    {"op": "admitted", "id": N, "job": JOB_ID, "command": PATH, "timeout": s,
     "limits": {NAME: N}, "entry": NAME}
        what the record needs (the keeper completes the record it keeps the same way);
        then, once spawned:
    {"op": "started", "id": N, "job": JOB_ID, "pid": P}   (or "error", "errno")
    {"op": "output", "jobs": [[JOB_ID, size, truncated], ...]}
    {"op": "ending", "job": JOB_ID}           its exit or its output's end was seen
    {"op": "finished", "job": JOB_ID, "state": NAME, "text": TEXT, "exit": {...},
     "size": bytes, "truncated": bool, "persist": bool, "record": {...}}
    {"op": "reloaded", "id": N, "error": TEXT ("" if accepted), "entries": N,
     "warnings": [TEXT]}
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import heapq
import itertools
import json
import os
import re
import selectors
import signal
import socket
import struct
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.daemon import capabilities, cgroups, uids, vspawn
from agent.daemon import lifecycle as lc
from agent.daemon import spawnproto as proto
from agent.daemon.decision import Decided, Decider, LoadError, load_in_child, request_from_wire
from agent.daemon.errors import AgentError
from agent.daemon.outputfile import OutputFile
from agent.daemon.spawner import Spawner, signal_leaf
from agent.daemon.spawnplan import plan_of

PROTOCOL = 2  # 2: the keeper decides (requests, not plans)
LISTEN = "listen"
READ_CHUNK = 1 << 20
# After the main process exits, how long to wait for the output pipe to close
# (processes that escaped the group may hold it open).
OUTPUT_CLOSE_GRACE = 2.0
# A running job's record as the agent gave it: kept and handed back, never read.
RECORD_MAX = 1 << 20
JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STOP_EVENTS: dict[str, Callable[[], lc.Event]] = {
    "stop": lc.StopRequested,
    "shutdown": lc.ShutdownRequested,
    "kill": lc.KillGraceExpired,
    "not_recorded": lc.NotRecorded,
}
PR_SET_CHILD_SUBREAPER = 36
SEND_WAIT = 5  # seconds
KEEPER_STOP = "the job keeper's stop"  # "stopped by the job keeper's stop (signal 15)"
MAX_SLEEP = 3600.0  # seconds: the longest the loop waits at once
# A stopping service keeper, its jobs ended: how long it waits for the agent's acks.
CLOSE_LINGER = 5.0
ENDED_FILE_MAX = 64 << 20  # bytes: the ends a stopped keeper leaves for the next
SO_PEERPIDFD = 77  # Linux 6.5: a pidfd of the peer, pinned at connect()
# What a start may carry (a plan, a run or descriptors are the keeper's own to make).
START_KEYS = frozenset({"op", "id", "job", "request", "record", "fds"})
# Beside each running job's output file (<output_dir>/<job id>.keeper), while it runs
# in a cgroup: what a keeper that adopts it after this one's death needs (its deadline,
# cap, grace, record). The output directory is out of every job's reach (Landlock), so
# a job cannot forge its own deadline or record.
JOB_FILE = ".keeper"
JOB_FILE_MAX = 2 << 20  # bytes (a record is at most RECORD_MAX)
# The end of a job adopted from a dead keeper's cgroup: seen (the cgroup emptied), but
# not its exit status, which only the dead keeper (its parent) could have read.
ADOPTED_TEXT = "exit status unknown: the keeper restarted"
NO_PIPE_NOTE = "its output after the keeper's death was lost (its pipe died with the keeper)"
NO_FILE_NOTE = "its timeout and output cap were lost with the keeper (no .keeper file)"
ADOPTED_POLL = 1.0  # seconds: how often adopted jobs are looked at without inotify


def log(text: str) -> None:
    """One line on stderr (the agent's log while it lives); never raises."""
    with contextlib.suppress(OSError, ValueError):
        print(f"agent keeper: {text}", file=sys.stderr, flush=True)


class Timer:
    """A pending lifecycle event of one job (cancelled when the job finishes)."""

    __slots__ = ("cancelled", "event", "job")

    def __init__(self, job: KeptJob, event: lc.Event) -> None:
        self.job, self.event, self.cancelled = job, event, False


class KeptJob:
    """One job the keeper holds: its process, pipe, output file and lifecycle."""

    __slots__ = (
        "exit",
        "gen",
        "grace",
        "id",
        "key",
        "kill_on_cap",
        "leaf",
        "life",
        "out",
        "pid",
        "record",
        "rfd",
        "rid",
        "run",
        "stored",
        "timers",
    )

    def __init__(self, job_id: str, rid: Any, gen: int, run: dict[str, Any], out: OutputFile):
        self.id, self.rid, self.gen = job_id, rid, gen
        self.pid = 0
        self.rfd = -1
        self.out = out
        self.grace = float(run["grace"])
        self.kill_on_cap = bool(run["kill_on_cap"])
        self.life = lc.Life(
            timeout_seconds=run["timeout"],
            cpu_seconds=run["cpu_seconds"],
            memory_max=run["memory_max"],
            note=run["note"],
        )
        self.record: dict[str, Any] = {}
        self.timers: list[Timer] = []
        self.exit: lc.Exit | None = None
        self.run = run
        # Adopted from a dead keeper (not this keeper's child): its cgroup is all there is
        # to signal and to watch, and ``key`` (negative, never a pid) its by_pid entry.
        self.leaf: cgroups.JobCgroup | None = None
        self.key = 0
        self.stored = False  # its pipe is in systemd's descriptor store


def exit_of(msg: dict[str, Any]) -> lc.Exit:
    """The lifecycle's Exit of a spawner "exited" report."""
    return lc.Exit(
        exit_code=msg["code"],
        signal=msg["signal"],
        user_cpu=msg["utime"],
        system_cpu=msg["stime"],
        max_rss=msg["maxrss"],
        oom_kills=int(msg.get("oom", 0)),
        unknown=str(msg.get("unknown", "")),
        end_time=msg.get("ended"),
    )


def exit_to_wire(ex: lc.Exit) -> dict[str, Any]:
    return {
        "code": ex.exit_code,
        "signal": ex.signal,
        "utime": ex.user_cpu,
        "stime": ex.system_cpu,
        "maxrss": ex.max_rss,
        "oom": ex.oom_kills,
        "ended": ex.end_time,
    }


def _peer_cgroup(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return cgroups.parse_proc_cgroup(f.read())
    except OSError:
        return None


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def descends_from(pid: int, ancestor: int) -> bool | None:
    """Whether ``pid`` is ``ancestor`` or one of its descendants (per /proc); None when a
    process on the way up cannot be read (a job may make one of its processes
    non-dumpable, which hides it: the answer must not then be "no")."""
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == ancestor:
            return True
        pid = _ppid(pid)
        if pid <= 0:
            return None
        seen += 1
    return False


class Keeper(Spawner):
    """The keeper's state: the spawner's, its jobs, and the agent's attachment."""

    def __init__(
        self,
        listener: socket.socket,
        *,
        agent_uid: int,
        output_dir: str,
        subtree: cgroups.Subtree | None = None,
        path: tuple[str, str, Any] = ("fork", "default", None),
        decider: Decider | None = None,
        service: bool = False,
        ended_file: str = "",
    ) -> None:
        super().__init__(None, subtree, path)
        # The policy and settings every start is decided with (None: no --config, every
        # start refused).
        self.decider = decider
        # Where a keeper that exits with ends the agent has not recorded leaves them for
        # the next keeper (a service stopped after its agent: systemd stops the agent
        # first). "": nowhere (the agent's child: it ends only when the agent says so).
        self.ended_file = ended_file
        # A service of its own (`agent keeper`): SIGTERM stops its jobs, then it exits.
        # Otherwise (the agent's child) only the agent's "exit" ends it.
        self.service = service
        self.closing = False  # SIGTERM: jobs are being stopped, no new start is taken
        self.linger_until = 0.0  # after the last job: how long to wait for the acks
        self.listener = listener
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, LISTEN)
        self.agent_uid = agent_uid
        self.output_dir = output_dir
        # Output files are the agent's to read and remove: a root keeper serving another
        # user's agent (the privileged deployment) hands each to that user.
        self.file_owner = agent_uid if os.geteuid() == 0 and agent_uid != 0 else -1
        self.gen = 0  # attachments so far: a start is answered only on its own
        self.hello_due = False
        self.peer_pidfd = -1  # the attached agent's pidfd (-1: none, or not pinned)
        self.deaf = False  # the attached agent died: read what it sent, say nothing
        self.reexec_wanted = False  # SIGUSR2: replace the code in place when quiet
        self.jobs: dict[str, KeptJob] = {}  # started (pid known) and not finished
        self.by_pid: dict[int, KeptJob] = {}
        self.by_rid: dict[int, KeptJob] = {}  # handed to the spawner, not yet answered
        self.ended: dict[str, dict[str, Any]] = {}  # finished, not yet acknowledged
        self.heap: list[tuple[float, int, Timer]] = []
        self.seq = itertools.count()
        self.dirty: dict[str, KeptJob] = {}  # output progress not yet told
        self.endings: dict[str, KeptJob] = {}  # "ending" not yet told (end of the turn)
        self.rids = itertools.count(1)
        # [jobs] dynamic_users: the uids jobs hold (the range read at the keeper's start:
        # its own seccomp filter allows that range and no other, see main()).
        dyn = decider.settings.dynamic_users if decider is not None else None
        self.pool = uids.Pool(*dyn) if dyn is not None else None
        self.dynamic: dict[str, int] = {}  # job id -> its dynamic uid, until released
        # Jobs adopted from a dead keeper's cgroups, by inotify watch (-1: unwatched).
        self.adopted: dict[int, KeptJob] = {}
        self.unwatched: list[KeptJob] = []
        self.adopt_keys = itertools.count(1)
        # systemd's descriptor store holds each job's pipe for the next keeper (a service
        # whose unit sets FileDescriptorStoreMax= and FDSTORE=, see fdstore_push).
        self.fdstore = False
        self.notify_sock: socket.socket | None = None
        self.mounts: list[Path] = []
        with contextlib.suppress(OSError):
            self.mounts = cgroups.parse_cgroup2_mounts(Path("/proc/self/mountinfo").read_text())

    # ------------------------------------------------------------ attachment

    def peer_problem(self, conn: socket.socket) -> tuple[str, int]:
        """Why this peer may not attach ("" if it may): the kernel's word on who it is; and
        a pidfd of the peer (-1: none), the caller's to close."""
        pidfd = -1
        with contextlib.suppress(OSError):
            # Pinned at connect() where the kernel offers it: the pid below cannot be a
            # reused one while we look at it.
            pidfd = struct.unpack("i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        why = self._peer_problem(conn, pidfd)
        return why, pidfd

    def _peer_problem(self, conn: socket.socket, pidfd: int) -> str:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        if uid != self.agent_uid:
            return f"uid {uid} is not the agent's ({self.agent_uid})"
        if pid <= 0:
            return "no peer process"
        # Every process of a job is this keeper's descendant (a child subreaper
        # adopts what a job orphans), whatever its uid, session or environment.
        mine = descends_from(pid, os.getpid())
        if mine is None:
            # Fail closed: a peer (or an ancestor) whose /proc entry this keeper cannot
            # read (another user namespace, a non-dumpable process) cannot be checked.
            return f"pid {pid}: its process or one of its parents cannot be read"
        if mine:
            return f"pid {pid} is one of the keeper's jobs"
        if self.subtree is not None:
            where = _peer_cgroup(pid)
            if where is None:
                return f"pid {pid}: its cgroup cannot be read"
            for mount in self.mounts:
                if (mount / where.lstrip("/")).is_relative_to(self.subtree.jobs):
                    return f"pid {pid} is in a job cgroup ({where})"
        # Still the same process (the pidfd of an exited one is readable): the
        # answers above were about the peer, not about a process that reused its pid.
        if pidfd >= 0 and select_readable(pidfd):
            return f"pid {pid} exited while it was checked"
        return ""

    def on_accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        why, pidfd = self.peer_problem(conn)
        if not why and self.sock is not None:
            if self.agent_gone():
                # What the dead agent sent before it died is still carried out (a start
                # it recorded must run, a stop it asked for must happen); then it goes.
                self.drain_requests()
                self.detach("it exited")
            else:
                why = "another agent is attached"
        if why:
            log(f"refused a connection: {why}")
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)
            return
        self.peer_pidfd = pidfd
        conn.setblocking(True)
        # An agent that stops reading (stopped, wedged) must not stall the jobs' keeper:
        # a send that cannot go within SEND_WAIT detaches it (it attaches again).
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_WAIT, 0))
        self.sock = conn
        self.gen += 1
        self.sel.register(conn, selectors.EVENT_READ, None)
        # Said once no start is in the spawner's hands: every job in it is known.
        self.hello_due = True

    def hello(self) -> None:
        self.hello_due = False
        jobs = [
            {
                "job": j.id,
                "pid": j.pid,
                "size": j.out.size,
                "truncated": j.out.truncated,
                # (An adopted job without its pipe is not ending: it runs on.)
                "ending": j.exit is not None or (j.rfd < 0 and j.leaf is None),
                "record": j.record,
            }
            for j in self.jobs.values()
        ]
        self.dirty.clear()
        self.tell(
            {
                "op": "hello",
                "protocol": PROTOCOL,
                "pid": os.getpid(),
                "uid": os.geteuid(),  # what the agent's policy check needs to know
                # Root or not, whether it runs jobs as any user with capabilities (the
                # privileged unit's keeper is worker-agent with CAP_SETUID/SETGID/SETPCAP).
                "gives": self.gives,
                "spawn": self.path,
                "why": self.path_why,
                "jobs": jobs,
                "ended": list(self.ended.values()),
                "service": self.service,
                # Where the job cgroups are, for the agent's limits (it never writes there).
                "cgroups": None
                if self.subtree is None
                else {
                    "jobs": str(self.subtree.jobs),
                    "controllers": sorted(self.subtree.controllers),
                },
            }
        )

    def detach(self, why: str) -> None:
        if self.sock is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.sock)
        self.sock.close()
        self.sock = None
        if self.peer_pidfd >= 0:
            os.close(self.peer_pidfd)
            self.peer_pidfd = -1
        self.hello_due = False
        self.deaf = False
        log(f"the agent detached ({why}); {len(self.jobs)} job(s) go on running")

    def agent_gone(self) -> bool:
        """Whether the attached agent has exited (its end of file may wait unread behind
        requests it sent before)."""
        if self.deaf or self.sock is None or peer_gone(self.sock):
            return True
        # Requests may wait unread ahead of the end of file: the process says it.
        return self.peer_pidfd >= 0 and select_readable(self.peer_pidfd)

    def drain_requests(self, most: int = 100_000) -> None:
        """Carry out every request a dead agent left in the socket, up to its end."""
        sock = self.sock
        for _ in range(most):
            if self.sock is not sock or sock is None or not select_readable(sock.fileno()):
                return
            self.on_socket()

    def tell(self, msg: dict[str, Any]) -> None:
        """Send to the attached agent, if any (a finished job's record also waits in
        ``ended`` until acknowledged).

        Nothing goes to a new agent before its hello: the hello is the whole state (each
        job's output size, whether it is ending, every unacknowledged end), and an agent
        reads its first message as the hello."""
        if self.sock is None or self.deaf or self.hello_due:
            return
        try:
            proto.send(self.sock, msg)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                # The agent died. Its last requests may still wait in the socket: they are
                # read and carried out until its end of file (a start it recorded before it
                # died must run and be kept for the next agent); nothing more is said.
                self.deaf = True
                return
            # It is alive but does not read (SEND_WAIT passed): it attaches again.
            self.detach(f"send failed: {e.strerror or e}")

    # ------------------------------------------------------------ the loop

    def serve(self) -> None:
        """Run until told to exit (the agent's ``exit``, or SIGTERM to a service once its
        jobs have ended); agents come and go."""
        while self.running:
            timeout = None
            if self.heap:
                # At most an hour: epoll refuses a timeout above INT_MAX ms (24.8 days,
                # OverflowError), and a job's timeout may be a uint32 of seconds.
                timeout = min(MAX_SLEEP, max(0.0, self.heap[0][0] - time.monotonic()))
            if self.closing or self.unwatched:
                timeout = min(timeout if timeout is not None else 1.0, 1.0)
            asked = False
            for key, _ in self.sel.select(timeout):
                what = key.data
                if what is None:
                    asked = True
                elif what == LISTEN:
                    self.on_accept()
                elif isinstance(what, KeptJob):
                    self.guarded(self.on_output, what)
                elif isinstance(what, _Wakeup):
                    self.guarded(what)
                else:
                    self.dispatch(what)
                if not self.running:
                    break
            self.run_timers()
            if self.unwatched:
                self.look_at_adopted(self.unwatched)
            if asked and self.running and self.sock is not None:
                self.on_socket()
            self.flush_output()
            if self.hello_due and not self.by_rid and self.sock is not None:
                self.hello()
            if self.reexec_wanted and not self.closing:
                self.maybe_reexec()
            if self.closing:
                self.check_closed()
        self.kill_all()

    def maybe_reexec(self) -> None:
        """Re-execute the code on disk once quiet (see agent.daemon.keeperstate)."""
        from agent.daemon import keeperstate

        if not keeperstate.quiet(self):
            return  # again after the next turn
        self.reexec_wanted = False
        log(f"re-executing in place with {len(self.jobs)} job(s)")
        if self.service:
            notify("RELOADING=1\nSTATUS=re-executing its code in place")
        why = keeperstate.reexec(self)
        log(f"not re-executed: {why}; going on as before")
        if self.service:
            notify(f"READY=1\nSTATUS=not re-executed: {why}")

    def close_down(self) -> None:
        """SIGTERM to the keeper's service: stop every job (SIGTERM to its cgroup, the
        grace, then SIGKILL, as the agent's shutdown does), take no new start, tell the
        agent how each ended, then exit."""
        if self.closing:
            return
        self.closing = True
        log(f"stopping: {len(self.jobs)} running job(s) are stopped, then the keeper exits")
        notify(f"STOPPING=1\nSTATUS=stopping {len(self.jobs)} job(s)")
        for job in list(self.jobs.values()):
            self.guarded(self.handle, job, lc.ShutdownRequested(KEEPER_STOP))

    def save_ended(self) -> None:
        """At exit: the ends the agent has not recorded, for the next keeper's hello."""
        if not self.ended_file or not self.ended:
            return
        tmp = f"{self.ended_file}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(list(self.ended.values()), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.ended_file)
        except (OSError, ValueError) as e:
            log(f"cannot keep {len(self.ended)} unrecorded end(s) in {self.ended_file}: {e}")
            return
        log(f"kept {len(self.ended)} end(s) the agent has not recorded in {self.ended_file}")

    def load_ended(self) -> None:
        """At start: the ends a previous keeper left (handed to the agent in the hello,
        forgotten once it acknowledges them; a bad file is said and set aside)."""
        if not self.ended_file:
            return
        try:
            fd = os.open(self.ended_file, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        except OSError as e:
            log(f"cannot read {self.ended_file}: {e}")
            return
        try:
            with os.fdopen(fd) as f:
                got = json.loads(f.read(ENDED_FILE_MAX))
            if not isinstance(got, list):
                raise ValueError("not a list")
            for msg in got:
                ok = isinstance(msg, dict) and msg.get("op") == "finished"
                if not ok or not isinstance(msg.get("job"), str) or not JOB_ID.match(msg["job"]):
                    raise ValueError(f"not an end record: {str(msg)[:80]}")
            for msg in got:
                self.ended[msg["job"]] = msg
            os.unlink(self.ended_file)
        except (OSError, ValueError) as e:
            log(f"{self.ended_file}: {e}; set aside as {self.ended_file}.bad")
            with contextlib.suppress(OSError):
                os.replace(self.ended_file, f"{self.ended_file}.bad")
            return
        log(f"{len(got)} end(s) a previous keeper kept, for the agent to record")

    def check_closed(self) -> None:
        """Once every job has ended: exit when the agent has recorded their ends, or a
        few seconds later (an agent that does not answer must not hold the stop)."""
        if self.jobs or self.by_rid:
            return
        now = time.monotonic()
        if not self.linger_until:
            self.linger_until = now + CLOSE_LINGER
        if not self.ended or self.sock is None or self.deaf or now >= self.linger_until:
            if self.ended:
                log(f"exiting with {len(self.ended)} end(s) the agent has not recorded")
            self.running = False

    def guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a job's handler; a bug in it is logged and the keeper goes on (its death
        would leave every job without a keeper)."""
        try:
            fn(*args)
        except Exception:
            import traceback

            name = getattr(fn, "__name__", type(fn).__name__)
            log(f"internal error in {name}:\n{traceback.format_exc()}")

    def run_timers(self) -> None:
        now = time.monotonic()
        while self.heap and self.heap[0][0] <= now:
            _, _, t = heapq.heappop(self.heap)
            if not t.cancelled:
                self.guarded(self.handle, t.job, t.event)

    def arm(self, job: KeptJob, delay: float, event: lc.Event) -> None:
        t = Timer(job, event)
        job.timers.append(t)
        heapq.heappush(self.heap, (time.monotonic() + delay, next(self.seq), t))

    def on_socket(self) -> None:
        """Take one request from the agent."""
        assert self.sock is not None
        try:
            data, fds = proto.recv(self.sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except proto.ProtocolError as e:
            log(f"bad message: {e}")
            return
        except OSError as e:
            self.detach(f"receive failed: {e.strerror or e}")
            return
        if not data:
            self.detach("end of file")
            return
        try:
            msg, byrole = proto.decode(data, fds)
        except proto.ProtocolError as e:
            log(f"bad message: {e}")
            return
        op = msg["op"]
        try:
            if op == "start":
                self.start(msg, byrole)
            elif op == "stop":
                self.stop(msg)
            elif op == "ack":
                self.ack(msg)
            elif op == "reload":
                self.reload(msg)
            elif op == "exit":
                self.running = False
            else:
                log(f"bad message: unknown op {op[:40]!r}")
        except Exception:
            import traceback

            log(f"internal error in {op}:\n{traceback.format_exc()}")
            if op == "start":
                rid, job_id = msg.get("id"), msg.get("job")
                job = next((j for j in self.by_rid.values() if j.rid == rid), None)
                if job is None and job_id not in self.jobs:
                    self.refuse(
                        rid,
                        job_id,
                        "INTERNAL",
                        "keeper-internal-error",
                        "internal error in the job keeper (see the agent's log)",
                    )
        for fd in byrole.values():
            with contextlib.suppress(OSError):  # start() may have closed them already
                os.close(fd)

    # ------------------------------------------------------------ start

    def refuse(self, rid: Any, job_id: Any, kind: str, rule: str, message: str) -> None:
        self.tell(
            {
                "op": "refused",
                "id": rid,
                "job": job_id,
                "kind": kind,
                "rule": rule,
                "message": message,
            }
        )

    def start(self, msg: dict[str, Any], fds: dict[str, int]) -> None:
        """A start: who asks and what (never a plan). The keeper decides it (the policy,
        the limits, the timeout: :mod:`agent.daemon.decision`), answers "refused" or
        "admitted" (with what the record needs, which it completes itself), then
        spawns and answers "started"."""
        rid, job_id, record = msg.get("id"), msg.get("job"), msg.get("record")
        why = ""
        if not isinstance(rid, int) or isinstance(rid, bool):
            why = "malformed start: id"
        elif not isinstance(job_id, str) or not JOB_ID.match(job_id):
            why = "malformed start: job"
        elif job_id in self.jobs or job_id in self.ended or self._starting(job_id):
            why = f"job {job_id} exists already"
        elif set(msg) - START_KEYS:
            why = "malformed start: unknown keys"
        elif fds:
            why = "malformed start: descriptors (the keeper opens the job's files itself)"
        elif not isinstance(record, dict) or len(str(record)) > RECORD_MAX:
            why = "malformed start: record"
        req = why or request_from_wire(msg.get("request"))
        if isinstance(req, str):
            self.refuse(rid, job_id, "INTERNAL", "malformed-start", req)
            return
        assert isinstance(rid, int) and isinstance(job_id, str) and isinstance(record, dict)
        if self.closing:
            self.refuse(
                rid,
                job_id,
                "UNAVAILABLE",
                "keeper-stopping",
                "not started: the job keeper is stopping (its service was told to stop)",
            )
            return
        if self.decider is None:
            self.refuse(
                rid,
                job_id,
                "FAILED_PRECONDITION",
                "no-policy",
                "not started: the job keeper has no policy (it was started without --config)",
            )
            return
        try:
            decided = self.decider.decide(job_id, req)
        except AgentError as e:
            self.refuse(rid, job_id, e.kind.name, e.rule, e.message)
            return
        uid = None
        if decided.spec.dynamic_user:
            uid = self.pool.take() if self.pool is not None else None
            if uid is None:
                for fd in (decided.spec.exec_fd, decided.spec.script_fd):
                    if fd is not None:
                        os.close(fd)
                if self.pool is None:
                    self.refuse(
                        rid,
                        job_id,
                        "FAILED_PRECONDITION",
                        "dynamic-users-off",
                        "not started: [jobs] dynamic_users was switched on by a reload; it "
                        "takes effect when the job keeper is restarted",
                    )
                else:
                    self.refuse(
                        rid,
                        job_id,
                        "RESOURCE_EXHAUSTED",
                        "dynamic-users-exhausted",
                        f"not started: every uid of [jobs] dynamic_uid_min..dynamic_uid_max "
                        f"({self.pool.lo}-{self.pool.hi}) is held by a running job",
                    )
                return
            self.dynamic[job_id] = uid
        # The record is completed here, from the decision: what the next agent is
        # handed (hello) says what really runs.
        record.update(
            command=decided.executable, timeout_seconds=decided.timeout, limits=decided.limits
        )
        self.tell(
            {
                "op": "admitted",
                "id": rid,
                "job": job_id,
                "command": decided.executable,
                "timeout": decided.timeout,
                "limits": decided.limits,
                "entry": decided.entry,
            }
        )
        try:
            self.spawn_admitted(rid, job_id, record, decided, uid)
        except Exception:
            import traceback

            log(f"internal error starting job {job_id}:\n{traceback.format_exc()}")
            if job_id not in self.jobs and not self._starting(job_id):
                self.release_uid(job_id, ran=True)
            if job_id not in self.jobs:
                self.tell(
                    {
                        "op": "started",
                        "id": rid,
                        "job": job_id,
                        "error": "internal error in the job keeper (see the agent's log)",
                        "errno": errno.EIO,
                    }
                )

    def spawn_admitted(
        self, rid: int, job_id: str, record: dict[str, Any], decided: Decided, uid: int | None
    ) -> None:
        """The output file and pipe of an admitted job, then the spawn (as ``uid``, its
        dynamic user, when it has one)."""
        spec = decided.spec
        plan, roles, kid_fds = plan_of(spec)
        if uid is not None:
            plan["uid"] = plan["gid"] = uid
            plan["env"]["USER"] = plan["env"]["LOGNAME"] = str(uid)
        theirs = {r: fd for r, fd in zip(roles, kid_fds, strict=True) if r != "stdout"}
        run = decided.run.to_wire()
        out = OutputFile(
            os.path.join(self.output_dir, f"{job_id}.out"), run["cap"], self.file_owner
        )
        try:
            out.reserve()
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except (AgentError, OSError) as e:
            out.close()
            for fd in theirs.values():
                os.close(fd)
            self.release_uid(job_id, ran=False)
            code = getattr(e, "errno", None) or errno.EMFILE
            self.tell(
                {
                    "op": "started",
                    "id": rid,
                    "job": job_id,
                    "error": proto.error_text("output", code),
                    "errno": code,
                }
            )
            return
        # The child gets a blocking write end: a job must not see EAGAIN on stdout just
        # because the keeper is momentarily behind.
        os.set_blocking(w, True)
        with contextlib.suppress(OSError):
            fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, READ_CHUNK)
        job = KeptJob(job_id, rid, self.gen, run, out)
        job.rfd = r
        job.record = record
        theirs["stdout"] = w
        kid = next(self.rids)
        self.by_rid[kid] = job
        # The spawner's checks and spawn; its answer comes back through send(). It
        # closes the descriptors it took (and clears them); what is left is ours.
        try:
            Spawner.spawn(self, {"op": "spawn", "id": kid, "plan": plan}, theirs)
        except BaseException:
            if self.by_rid.pop(kid, None) is not None:  # never answered: nothing runs
                os.close(r)
                job.rfd = -1
                out.close()
            raise
        finally:
            for fd in theirs.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def reload(self, msg: dict[str, Any]) -> None:
        """The agent's SIGHUP: read the policy again from this keeper's own config file
        (the agent cannot hand one over); a rejected one leaves the current one."""
        rid = msg.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            return
        answer: dict[str, Any] = {"op": "reloaded", "id": rid, "error": "", "entries": 0}
        try:
            if self.decider is None:
                raise LoadError("the job keeper was started without --config: no policy")
            answer["entries"], answer["warnings"] = self.decider.reload()
        except (LoadError, OSError) as e:
            answer["error"] = str(e)
            log(f"policy reload rejected, keeping the current policy: {e}")
        self.tell(answer)

    def release_uid(self, job_id: str, *, ran: bool) -> None:
        """Give a job's dynamic uid back; when a process of it ran, only after everything
        that uid still has is gone (uids.reclaim: its processes, IPC objects, message
        queues, shared memory, keyrings), so the next job given the uid inherits nothing.
        A uid whose reclaim failed is never handed out again by this keeper (logged)."""
        uid = self.dynamic.pop(job_id, None)
        if uid is None or self.pool is None:
            return
        if ran and not uids.reclaim(uid):
            log(f"job {job_id}: uid {uid} could not be cleaned up; it stays out of use")
            return
        self.pool.release(uid)

    def _starting(self, job_id: str) -> bool:
        return any(j.id == job_id for j in self.by_rid.values())

    def send(self, msg: dict[str, Any]) -> None:
        """The spawner's reports, taken here instead of going to a socket."""
        op = msg.get("op")
        if op == "spawned":
            self.guarded(self.on_spawned, msg)
        elif op == "exited":
            self.guarded(self.on_exited, msg)

    def on_spawned(self, msg: dict[str, Any]) -> None:
        job = self.by_rid.pop(msg["id"])
        if "pid" not in msg:
            os.close(job.rfd)
            job.rfd = -1
            job.out.close()
            # A child that failed before its exec: it ran only the keeper's set-up.
            self.release_uid(job.id, ran=False)
            error = str(msg.get("error", "unknown error"))
            if job.gen == self.gen and self.sock is not None:
                self.tell(
                    {
                        "op": "started",
                        "id": job.rid,
                        "job": job.id,
                        "error": error,
                        "errno": msg.get("errno", errno.EIO),
                    }
                )
                return
            # Its agent went away meanwhile: the next one learns of it as a finished job.
            ex = lc.Exit(exit_code=None, signal=None, start_failure=error, end_time=time.time())
            self.handle(job, lc.OutputClosed())  # it never had any
            self.handle(job, lc.Exited(ex))
            return
        job.pid = msg["pid"]
        self.jobs[job.id] = job
        self.by_pid[job.pid] = job
        if job.id in self.dynamic:
            uid = self.dynamic[job.id]
            self.job_users[job.pid] = (uid, uid)
        self.sel.register(job.rfd, selectors.EVENT_READ, job)
        if job.life.timeout_seconds:
            self.arm(job, job.life.timeout_seconds, lc.TimedOut())
        if self.subtree is not None:
            self.write_job_file(job)
            if self.fdstore:
                self.fdstore_push(job)
        if job.gen == self.gen:
            self.tell({"op": "started", "id": job.rid, "job": job.id, "pid": job.pid})
        if self.closing:  # started while the service was told to stop: stopped as the rest
            self.handle(job, lc.ShutdownRequested(KEEPER_STOP))

    # ------------------------------------------------------------ a job's life

    def handle(self, job: KeptJob, event: lc.Event) -> None:
        for action in job.life.handle(event):
            self.apply(job, action)

    def apply(self, job: KeptJob, action: lc.Action) -> None:
        if isinstance(action, lc.Signal):
            if job.leaf is not None:
                self.signal_adopted(job, action.sig)
            elif job.pid:
                Spawner.signal(self, {"pid": job.pid, "sig": action.sig})
        elif isinstance(action, lc.ArmKillTimer):
            self.arm(job, job.grace, lc.KillGraceExpired())
        elif isinstance(action, lc.ArmOutputGrace):
            self.arm(job, OUTPUT_CLOSE_GRACE, lc.OutputGraceExpired())
        elif isinstance(action, lc.CloseOutput):
            log(
                f"job {job.id}: output still open {OUTPUT_CLOSE_GRACE:.0f}s after exit "
                "(an escaped process holds it); closing"
            )
            self.on_output(job)
            if job.rfd >= 0:
                self.close_output(job)
        elif isinstance(action, lc.Finish):
            self.finish(job, action)
        # DiscardOutput: job.life.discarding is what record_output looks at.

    def on_exited(self, msg: dict[str, Any]) -> None:
        # After its cgroup is empty (the spawner reports the exit then): the uid is free
        # once what it left outside the cgroup is gone too.
        self.job_users.pop(msg["pid"], None)
        job = self.by_pid.pop(msg["pid"], None)
        if job is None:
            return
        self.release_uid(job.id, ran=True)
        job.exit = exit_of(msg)
        if job.rfd >= 0:
            self.on_output(job)  # what is already in the pipe belongs to the job
        self.handle(job, lc.Exited(job.exit))
        self.ending(job)

    def ending(self, job: KeptJob) -> None:
        """Tell the agent a job is moments from its end (a query then waits for it), at
        the end of this turn, unless it ended by then: its "finished" says everything (a
        quick job's exit and end of output usually come in one turn: one message less,
        and each message wakes the agent)."""
        self.endings[job.id] = job

    def on_output(self, job: KeptJob) -> None:
        for _ in range(16):  # bounded, so one chatty job cannot starve the others
            if job.rfd < 0:
                return
            try:
                data = os.read(job.rfd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as e:
                log(f"job {job.id}: reading output failed: {e}")
                data = b""
            if not data:
                self.close_output(job)
                return
            self.record_output(job, data)

    def record_output(self, job: KeptJob, data: bytes) -> None:
        if job.life.discarding:
            return
        res = job.out.write(data)
        self.dirty[job.id] = job
        if res.failure:
            self.handle(job, lc.OutputFailed(res.failure))
        elif res.cap_reached:
            self.handle(job, lc.OutputCapReached(job.out.cap, kill=job.kill_on_cap))

    def close_output(self, job: KeptJob) -> None:
        if job.rfd >= 0:
            self.sel.unregister(job.rfd)
            os.close(job.rfd)
            job.rfd = -1
        job.out.close()
        if job.out.size or job.out.truncated:
            # (An empty output has nothing to report: its "finished" says size 0.)
            self.dirty[job.id] = job
        self.handle(job, lc.OutputClosed())
        if job.exit is None:
            self.ending(job)

    def flush_output(self) -> None:
        if self.dirty:
            jobs = [[j.id, j.out.size, j.out.truncated] for j in self.dirty.values()]
            self.dirty.clear()
            self.tell({"op": "output", "jobs": jobs})
        if self.endings:
            endings, self.endings = self.endings, {}
            for job_id in endings:
                if job_id in self.jobs:
                    self.tell({"op": "ending", "job": job_id})

    def finish(self, job: KeptJob, fin: lc.Finish) -> None:
        for t in job.timers:
            t.cancelled = True
        job.timers.clear()
        # Its "finished" carries its output's size: no progress of its own before it.
        self.dirty.pop(job.id, None)
        self.jobs.pop(job.id, None)
        # (An adopted job's pid may be a new child's now: only its own entry goes.)
        for key in (job.pid, job.key):
            if key and self.by_pid.get(key) is job:
                del self.by_pid[key]
        if job.leaf is not None:
            self.job_users.pop(job.key, None)
        if self.subtree is not None:
            self.forget_job_file(job)
        msg = {
            "op": "finished",
            "job": job.id,
            "state": fin.state.name,
            "text": fin.text,
            "exit": exit_to_wire(fin.exit),
            "start_failure": fin.exit.start_failure,
            "size": job.out.size,
            "truncated": job.out.truncated,
            "persist": fin.persist,
            "record": job.record,
        }
        if fin.persist:
            self.ended[job.id] = msg
        self.tell(msg)

    # ------------------------------------------------------------ requests

    def stop(self, msg: dict[str, Any]) -> None:
        job = self.jobs.get(msg.get("job"))  # type: ignore[arg-type]
        event = STOP_EVENTS.get(msg.get("how"))  # type: ignore[arg-type]
        if job is None or event is None:
            return
        self.handle(job, event())

    def ack(self, msg: dict[str, Any]) -> None:
        ids = msg.get("jobs")
        if not isinstance(ids, list):
            return
        for job_id in ids[:100_000]:
            if isinstance(job_id, str):
                self.ended.pop(job_id, None)

    def kill_all(self) -> None:
        """At the keeper's end: nothing may run that nobody supervises."""
        for job in list(self.jobs.values()):
            with contextlib.suppress(Exception):
                if job.leaf is not None:
                    job.leaf.kill()
                elif job.pid:
                    Spawner.signal(self, {"pid": job.pid, "sig": signal.SIGKILL})

    # ------------------------------------------------------------ adoption

    def job_file(self, job_id: str) -> str:
        return os.path.join(self.output_dir, job_id + JOB_FILE)

    def write_job_file(self, job: KeptJob) -> None:
        """What a keeper that adopts this job after our death needs: one small file per
        job in a cgroup, written once (no fsync: it must outlive this process, not the
        machine, and the cgroup does not outlive a reboot either)."""
        timeout = job.life.timeout_seconds
        data = {
            "pid": job.pid,
            # Its dynamic uid: a keeper that adopts the job holds it until the job ends,
            # so that no other job is given the uid meanwhile.
            "uid": self.dynamic.get(job.id),
            # (uid, gid) of a job of another user than this keeper, not root (the
            # privileged unit's entries' users): who signals it after an adoption.
            "user": self.job_users.get(job.pid),
            "deadline": time.time() + timeout if timeout else None,
            "run": job.run,
            "record": job.record,
        }
        try:
            fd = os.open(
                self.job_file(job.id),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                os.write(fd, json.dumps(data, separators=(",", ":")).encode())
            finally:
                os.close(fd)
        except (OSError, TypeError, ValueError) as e:
            log(
                f"job {job.id}: cannot write its {JOB_FILE} file (a keeper that adopts it "
                f"will not know its timeout): {e}"
            )

    def forget_job_file(self, job: KeptJob) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.job_file(job.id))
        if job.stored:
            job.stored = False
            self.notify_fds(f"FDSTOREREMOVE=1\nFDNAME={job.id}", [])

    def read_job_file(self, job_id: str) -> dict[str, Any] | None:
        """The .keeper file of ``job_id`` (None: missing or not one; said)."""
        try:
            # The output folder is out of every job's reach (Landlock); O_NOFOLLOW and the
            # checks below still hold if that ever changes: a link or a file that is not
            # ours gives no deadline, cap or record, it is said and ignored.
            fd = os.open(self.job_file(job_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            log(f"job {job_id}: cannot read its {JOB_FILE} file: {e}")
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                got = json.loads(f.read(JOB_FILE_MAX))
            run = got["run"]
            for key in ("timeout", "cpu_seconds", "memory_max", "cap"):
                if not isinstance(run.get(key) or 0, int):
                    raise ValueError(f"run.{key}")
            float(run["grace"])
            if got.get("deadline") is not None:
                float(got["deadline"])
            if not isinstance(got.get("record"), dict) or not isinstance(got.get("pid"), int):
                raise ValueError("record or pid")
            return dict(got)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log(f"job {job_id}: its {JOB_FILE} file is not one ({e}); ignored")
            return None

    def adopt_leftovers(self, stored: dict[str, int]) -> None:
        """At start: take over the jobs a dead keeper left running in their cgroups.

        Each leaf of the subtree is a job (its name is its id): it is kept, not killed.
        Its processes are signalled only through the leaf (pidfds pinned and checked
        against cgroup.procs, or cgroup.kill), never by a pid alone; its end is its
        cgroup becoming empty; its exit status is unknown (only its dead parent could
        have reaped it) and said so. ``stored``: the pipes systemd's descriptor store
        gave back, by job id (the output goes on into the file); without one the output
        from the death on is lost, and said so. Leaves of ends a previous keeper saved
        (it stopped cleanly) are leftovers: killed and removed."""
        if self.subtree is None:
            for job_id, fd in stored.items():
                os.close(fd)
                self.notify_fds(f"FDSTOREREMOVE=1\nFDNAME={job_id}", [])
            self.remove_stale_job_files()
            return
        for leaf in self.subtree.leftovers():
            rfd = stored.pop(leaf.job_id, -1)
            try:
                self.adopt(leaf, rfd)
            except Exception:
                import traceback

                log(f"internal error adopting job {leaf.job_id}:\n{traceback.format_exc()}")
                if leaf.job_id not in self.jobs:
                    # Nothing may run that nobody supervises: killed (the agent records
                    # it LOST at its next start).
                    _kill_unadopted(leaf, rfd)
        for job_id, fd in stored.items():  # a job that is gone: its pipe goes too
            os.close(fd)
            self.notify_fds(f"FDSTOREREMOVE=1\nFDNAME={job_id}", [])
        self.remove_stale_job_files()

    def remove_stale_job_files(self) -> None:
        """The .keeper files of jobs no keeper holds (killed with their cgroup after a
        stop, or by hand): nothing will read them."""
        try:
            names = os.listdir(self.output_dir)
        except OSError:
            return
        for name in names:
            job_id = name[: -len(JOB_FILE)]
            if name.endswith(JOB_FILE) and JOB_ID.match(job_id) and job_id not in self.jobs:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.output_dir, name))

    def adopt(self, leaf: cgroups.JobCgroup, rfd: int) -> None:
        job_id = leaf.job_id
        if job_id in self.ended:
            log(f"job {job_id}: ended under the previous keeper, yet its cgroup is left: killed")
            _kill_unadopted(leaf, rfd)
            with contextlib.suppress(cgroups.CgroupError):
                leaf.remove()
            return
        meta = self.read_job_file(job_id)
        uid = meta.get("uid") if meta is not None else None
        if self.pool is not None and not (uid is None and meta is not None):
            # With dynamic users, a job's uid must be known to be held: else a new job
            # could be given the uid of a running one (and see and signal it).
            if not isinstance(uid, int) or isinstance(uid, bool) or uid not in self.pool:
                log(f"job {job_id}: its dynamic uid is unknown ({JOB_FILE} file missing or "
                    "not one); killed, as no other job may be given it unknowingly")  # fmt: skip
                _kill_unadopted(leaf, rfd)
                return
            self.pool.held.add(uid)
            self.dynamic[job_id] = uid
        notes = []
        if meta is None:
            run: dict[str, Any] = {
                "timeout": 0,
                "cpu_seconds": 0,
                "memory_max": 0,
                "note": "",
                "grace": 5.0,
                "kill_on_cap": False,
                "cap": 0,
            }
            notes.append(NO_FILE_NOTE)
            if rfd >= 0:  # no cap known: nothing more is written for it
                os.close(rfd)
                rfd = -1
        else:
            run = dict(meta["run"])
        path = os.path.join(self.output_dir, f"{job_id}.out")
        try:
            out = OutputFile.reopen(path, int(run.get("cap") or 0), self.file_owner)
        except OSError as e:
            # Not a file of ours any more (replaced by a link, a directory): nothing more
            # is written for this job, and its end says so.
            log(f"job {job_id}: cannot open its output file again: {e}")
            out = OutputFile(path, 0, self.file_owner)
            if rfd >= 0:
                os.close(rfd)
                rfd = -1
        if rfd < 0:
            notes.append(NO_PIPE_NOTE)
        if run.get("note"):
            notes.insert(0, str(run["note"]))
        run["note"] = "; ".join(notes)
        job = KeptJob(job_id, None, 0, run, out)
        job.leaf = leaf
        job.key = -next(self.adopt_keys)
        job.record = meta["record"] if meta is not None else {}
        pids = leaf.pids()
        was = meta["pid"] if meta is not None else 0
        job.pid = was if was in pids else (pids[0] if pids else 0)
        user = uids.user_of(meta.get("user") if meta is not None else None)
        if user is not None:
            self.job_users[job.key] = user  # (a negative key: never a child's pid)
        # Its life starts where the dead keeper's left it: output past the cap is
        # dropped, and a job whose pipe is gone has no more output.
        if out.truncated:
            job.life.output = lc.Output.DISCARDING
        self.jobs[job_id] = job
        self.by_pid[job.key] = job
        if rfd >= 0:
            os.set_inheritable(rfd, False)
            os.set_blocking(rfd, False)
            job.rfd = rfd
            job.stored = True
            self.sel.register(rfd, selectors.EVENT_READ, job)
        else:
            job.life.output = lc.Output.CLOSED
        deadline = meta.get("deadline") if meta is not None else None
        if deadline is not None:
            self.arm(job, max(0.0, float(deadline) - time.time()), lc.TimedOut())
        log(
            f"adopted job {job_id} from a dead keeper ({len(pids)} process(es), "
            f"{'its pipe kept' if rfd >= 0 else 'no pipe'}, "
            f"{'deadline kept' if deadline is not None else 'no deadline'})"
        )
        self.watch_adopted(job)

    def watch_adopted(self, job: KeptJob) -> None:
        """Watch an adopted job's cgroup.events (its end is the cgroup emptying); watch
        first, then look, so an end before the watch is not missed."""
        assert job.leaf is not None
        wd = -1
        try:
            if self.watcher is None:
                self.watcher = cgroups.EventWatcher()
                self.sel.register(self.watcher.fileno(), selectors.EVENT_READ, self.watcher)
            wd = self.watcher.watch(job.leaf)
        except cgroups.CgroupError as e:
            log(f"job {job.id}: {e}; its end is looked for every {ADOPTED_POLL:g} s")
        if wd >= 0:
            self.adopted[wd] = job
        else:
            self.unwatched.append(job)
        self.look_at_adopted([job])

    def leaves_fired(self, fired: list[int]) -> None:
        Spawner.leaves_fired(self, fired)
        jobs = [self.adopted[wd] for wd in fired if wd in self.adopted]
        # A watch the kernel dropped (the leaf vanished) shows up as nothing.
        jobs += [j for j in self.adopted.values() if j.leaf and not j.leaf.events_path.exists()]
        self.look_at_adopted(jobs)

    def look_at_adopted(self, jobs: list[KeptJob]) -> None:
        for job in list(jobs):
            if job.leaf is not None and job.key in self.by_pid and not job.leaf.populated():
                self.guarded(self.adopted_ended, job)

    def adopted_ended(self, job: KeptJob) -> None:
        """An adopted job's cgroup is empty: its end (status unknown), from the cgroup's
        accounting, then the lifecycle as for any exit."""
        leaf = job.leaf
        assert leaf is not None
        for wd, j in list(self.adopted.items()):
            if j is job:
                del self.adopted[wd]
                self.unwatch(wd)
        if job in self.unwatched:
            self.unwatched.remove(job)
        msg: dict[str, Any] = {
            "op": "exited",
            "pid": job.key,
            "code": None,
            "signal": None,
            "utime": 0.0,
            "stime": 0.0,
            "maxrss": 0,
            "oom": 0,
            "ended": time.time(),
            "unknown": ADOPTED_TEXT,
        }
        try:
            stats = leaf.stats(memory=self.subtree is None or "memory" in self.subtree.controllers)
            msg["utime"], msg["stime"] = stats.cpu_user_seconds, stats.cpu_system_seconds
            msg["maxrss"] = stats.memory_peak_bytes or 0
            msg["oom"] = (stats.oom_kills or 0) + (stats.oom_group_kills or 0)
        except cgroups.CgroupError as e:
            log(str(e))
        try:
            leaf.remove()
        except cgroups.CgroupError as e:
            log(str(e))
        self.on_exited(msg)

    def signal_adopted(self, job: KeptJob, sig: int) -> None:
        """Signal an adopted job: it is not this keeper's child, so never by its pid alone
        (reused meanwhile, it could be anyone's): through its cgroup."""
        assert job.leaf is not None
        leaf = job.leaf
        uid = self.dynamic.get(job.id)
        user = (uid, uid) if uid is not None else self.job_users.get(job.key)
        try:
            if sig == signal.SIGKILL:
                leaf.kill()
            elif user is not None and os.geteuid() != 0:
                # A job of its own uid, and this keeper has no CAP_KILL: a helper of the
                # job's uid signals, as the job itself could (SIGKILL above needs none).
                uids.signal_as(*user, sig, members=leaf.pids)
            else:
                signal_leaf(leaf, sig)
        except cgroups.CgroupError as e:
            log(f"job {job.id}: {e}")

    # ------------------------------------------------------------ descriptor store

    def fdstore_push(self, job: KeptJob) -> None:
        """Hand a copy of the job's pipe (read end) to systemd's descriptor store, named
        by the job id, so a keeper restarted after this one's death reads on. FDPOLL=0:
        systemd must not drop it when the job closes its end (unread output would go)."""
        if job.rfd >= 0 and self.notify_fds(f"FDSTORE=1\nFDNAME={job.id}\nFDPOLL=0", [job.rfd]):
            job.stored = True

    def notify_fds(self, state: str, fds: list[int]) -> bool:
        """sd_notify with descriptors (SCM_RIGHTS); False when it could not be sent."""
        if not self.fdstore:
            return False
        addr = os.environ.get("NOTIFY_SOCKET", "")
        if not addr:
            return False
        if addr[0] == "@":
            addr = "\0" + addr[1:]
        try:
            if self.notify_sock is None:
                self.notify_sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            self.notify_sock.sendmsg([state.encode()], anc if fds else [], 0, addr)
        except OSError as e:
            log(f"descriptor store: {e}")
            return False
        return True


def notify(state: str) -> None:
    """sd_notify(3) to the service manager, if any (a service keeper; never raises). Not
    agent.daemon.sdnotify: its logging import would double the keeper's memory."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s,
    ):
        s.sendto(state.encode(), addr)


def select_readable(fd: int) -> bool:
    """Whether ``fd`` is readable right now (for a pidfd: the process has exited)."""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(0))


def peer_gone(sock: socket.socket) -> bool:
    """Whether the attached agent's end is closed (it died, and its EOF waits unread)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _subreaper() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap_orphans(keeper: Keeper) -> None:
    """Reap adopted orphans (processes a job left, reparented to this subreaper), never
    a job's leader or a child still setting up: those the spawner reaps itself."""
    mine = set(keeper.children)
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
        for pid in pids:
            if pid in mine or _is_starting(keeper, pid):
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def _is_starting(keeper: Keeper, pid: int) -> bool:
    from agent.daemon.spawner import Starting

    return any(
        isinstance(k.data, Starting) and k.data.pid == pid for k in keeper.sel.get_map().values()
    )


USAGE = (
    "usage: python -m agent.daemon.keeper (--listen-fd N | --socket PATH) --config FILE "
    "[--output-dir DIR] [--agent-uid UID] [--cgroup-jobs DIR [--controllers LIST]] "
    "[--service 1 [--ended-file PATH]] | --resume-fd N"
)
OPTIONS = {
    "--config",
    "--listen-fd",
    "--socket",
    "--output-dir",
    "--agent-uid",
    "--cgroup-jobs",
    "--controllers",
    "--service",
    "--ended-file",
}


def parse_args(argv: list[str]) -> dict[str, str] | None:
    """``--option value`` pairs (no argparse: its import is half a megabyte of the keeper's
    memory for six options); None when they are not what :data:`USAGE` says."""
    if len(argv) % 2:
        return None
    args = dict(zip(argv[::2], argv[1::2], strict=True))
    if (
        len(args) != len(argv) // 2
        or not set(args) <= OPTIONS
        or ("--listen-fd" in args) == ("--socket" in args)
        or not ("--output-dir" in args or "--config" in args)
    ):
        return None
    for key in ("--listen-fd", "--agent-uid", "--service"):
        if key in args and not args[key].isdigit():
            return None
    return args


def main(argv: list[str]) -> int:
    """``python -m agent.daemon.keeper``: see :data:`USAGE`; CONTROLLERS is a
    comma-separated list (may be empty) of the controllers enabled for job cgroups."""
    if len(argv) == 2 and argv[0] == "--resume-fd" and argv[1].isdigit():
        return resume(int(argv[1]))
    opts = parse_args(argv)
    if opts is None:
        print(USAGE, file=sys.stderr)
        return 2
    args = types.SimpleNamespace(
        listen_fd=int(opts["--listen-fd"]) if "--listen-fd" in opts else None,
        socket=opts.get("--socket"),
        output_dir=opts.get("--output-dir"),
        agent_uid=int(opts.get("--agent-uid", os.geteuid())),
        cgroup_jobs=opts.get("--cgroup-jobs"),
        controllers=opts.get("--controllers", ""),
        service=opts.get("--service", "0") == "1",
        ended_file=opts.get("--ended-file", ""),
    )
    subtree = None
    if args.cgroup_jobs:
        subtree = cgroups.Subtree(
            Path(args.cgroup_jobs), frozenset(c for c in args.controllers.split(",") if c)
        )
    try:
        path = vspawn.choose(os.environ)
    except RuntimeError as e:
        log(str(e))
        return 2
    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
        listener.set_inheritable(False)
    else:
        listener = proto.listen_at(args.socket)
    decider = None
    config = opts.get("--config")
    if config is not None:
        why, decider = load_decider(config, subtree)
        if decider is None:
            log(why)
            return 2
        if args.output_dir is None:
            args.output_dir = str(decider.settings.output_dir)
    if decider is not None and decider.settings.dynamic_users is not None:
        why = keeper_filter(*decider.settings.dynamic_users)
        if why:
            log(why)
            return 2
    if decider is not None:
        entries = (e.confinement.capabilities for e in decider.policy.entries)
        try:
            said = capabilities.keep_only_for_jobs(entries)
        except OSError as e:
            log(f"cannot drop the capabilities no entry needs: {e}")
            return 1
        if said:
            log(said)
    _subreaper()
    keeper = Keeper(
        listener,
        agent_uid=args.agent_uid,
        output_dir=args.output_dir,
        subtree=subtree,
        path=path,
        decider=decider,
        service=args.service,
        ended_file=args.ended_file,
    )
    keeper.load_ended()
    # A service whose unit keeps a descriptor store (FileDescriptorStoreMax=, announced
    # to the keeper as $FDSTORE: systemd 254 sets it, the unit sets it for 252).
    stored = listen_fds()
    keeper.fdstore = (
        args.service
        and os.environ.get("FDSTORE", "0").isdigit()
        and (int(os.environ.get("FDSTORE", "0")) > 0)
    )
    keeper.adopt_leftovers(stored)
    return run(keeper)


def _kill_unadopted(leaf: cgroups.JobCgroup, rfd: int) -> None:
    """A dead keeper's job this keeper does not take over: its pipe closed, its cgroup
    killed."""
    if rfd >= 0:
        with contextlib.suppress(OSError):
            os.close(rfd)
    with contextlib.suppress(cgroups.CgroupError):
        leaf.kill()


def keeper_filter(lo: int, hi: int) -> str:
    """Bind this keeper (and every process it starts) to the dynamic uid range: from now
    on the kernel refuses it uid 0 and every uid and gid outside ``lo..hi`` (see
    :func:`agent.daemon.uids.keeper_filter`), so code execution in the keeper cannot
    become root or another user with the CAP_SETUID the standard unit gives it. A keeper
    that gives capabilities (root, or the privileged unit's) runs entries' fixed users
    and root jobs: no filter. It survives the re-exec of an upgrade (filters are kept
    across execve). Returns why it cannot be installed ("" when it is)."""
    if os.geteuid() == 0 or capabilities.gives_capabilities():
        return ""
    try:
        uids.install_keeper_filter(lo, hi)
    except OSError as e:
        return f"[jobs] dynamic_users: cannot bind the keeper to uids {lo}-{hi}: {e}"
    log(f"dynamic users: each job runs as a uid of its own from {lo}-{hi}")
    return ""


def listen_fds() -> dict[str, int]:
    """The descriptors systemd passed this process (sd_listen_fds(3)), by name: the pipes
    of the jobs a dead keeper left, from the unit's descriptor store. Taken out of the
    environment (a re-exec must not take them again) and closed on exec (never a job's)."""
    env = os.environ
    names = env.pop("LISTEN_FDNAMES", "").split(":")
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    got: dict[str, int] = {}
    for i in range(min(int(count), 65536)):
        fd = 3 + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        name = names[i] if i < len(names) else ""
        if not JOB_ID.match(name) or name in got:
            log(f"descriptor store: an unexpected descriptor {name[:60]!r}; closed")
            os.close(fd)
            continue
        got[name] = fd
    return got


def load_decider(config: str, subtree: cgroups.Subtree | None) -> tuple[str, Decider | None]:
    """The decider of the configuration at ``config`` ((why not, None) when it cannot be
    had: the keeper then says why and exits, or, resuming, refuses every start)."""
    try:
        loaded = load_in_child(config, subtree)
    except LoadError as e:
        return f"cannot load the configuration and policy: {e}", None
    # Said by the agent's start-up already (it checks the same files the same way).
    return "", Decider(loaded.settings, loaded.policy, config_path=config)


def resume(fd: int) -> int:
    """The keeper's new code after :func:`agent.daemon.keeperstate.reexec`: the same
    process, its jobs and descriptors, its state from the sealed memfd ``fd``."""
    from agent.daemon import keeperstate

    try:
        state = keeperstate.load(fd)
        path = vspawn.choose(os.environ)
    except (OSError, ValueError, RuntimeError) as e:
        # Nothing to go on with: the jobs are orphans now (killed by the next agent's
        # start, from their cgroups). Said as loudly as possible.
        log(f"cannot resume after re-executing: {e}")
        return 2
    listener = socket.socket(fileno=state["listener"])
    _subreaper()
    subtree = keeperstate.subtree_of(state)
    decider = None
    if state.get("config"):
        # The policy as the file says now (an upgrade may bring a new one).
        why, decider = load_decider(str(state["config"]), subtree)
        if decider is None:
            log(f"{why}: every start is refused until the keeper is restarted")
    keeper = Keeper(
        listener,
        agent_uid=state["agent_uid"],
        output_dir=state["output_dir"],
        subtree=subtree,
        path=path,
        decider=decider,
        service=bool(state.get("service", False)),
        ended_file=str(state.get("ended_file", "")),
    )
    keeperstate.restore(keeper, state)
    log(
        f"re-executed in place (pid {os.getpid()}): {len(keeper.jobs)} job(s) kept, "
        f"{len(keeper.ended)} end(s) to tell"
    )
    return run(keeper)


def run(keeper: Keeper) -> int:
    keeper.setup_signals()
    # Orphans a job leaves are this subreaper's children: reaped on SIGCHLD, through the
    # selector (a wakeup pipe), never by a wait that could take a job leader's status.
    # SIGUSR2 asks for a re-exec of the code on disk (an upgrade in place).
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGUSR2, lambda *_: None)
    if keeper.service:
        # A service is stopped by its manager (or Ctrl-C where it was started by hand):
        # its jobs are stopped, then it exits. The agent's child ignores both (the agent
        # decides when it ends).
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
    keeper.sel.register(r, selectors.EVENT_READ, _Wakeup(r, keeper))
    gc.freeze()
    if keeper.service:
        notify(f"READY=1\nSTATUS=holding {len(keeper.jobs)} job(s)\nMAINPID={os.getpid()}")
    keeper.serve()
    keeper.save_ended()
    if keeper.service:
        notify("STOPPING=1")
    return 0


class _Wakeup:
    """The signals' wakeup pipe: reap adopted orphans (SIGCHLD), note a re-exec request
    (SIGUSR2)."""

    def __init__(self, fd: int, keeper: Keeper) -> None:
        self.fd, self.keeper = fd, keeper

    def __call__(self) -> None:
        got = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(self.fd, 512):
                got += chunk
        if signal.SIGUSR2 in got:
            self.keeper.reexec_wanted = True
        if self.keeper.service and (signal.SIGTERM in got or signal.SIGINT in got):
            self.keeper.close_down()
        _reap_orphans(self.keeper)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
