"""The job keeper: the process that holds the jobs, so that they outlive the agent.

It grows out of the job spawner (:mod:`agent.keeper.spawner`, whose spawning,
reaping, cgroups, Landlock and seccomp it inherits) and adds what a job needs
while nobody faces the network for it:

* **its output**: the keeper makes each job's pipe, reads it and records it in
  the job's output file (:mod:`agent.keeper.outputfile`: the cap truncates, a
  write error fails the job), and tells the agent how far each file got;
* **its lifecycle**: the pure :class:`agent.keeper.lifecycle.Life` of each job
  runs here, with its timers: the timeout, the grace between SIGTERM and
  SIGKILL, the output cap's kill, the end of the output after the exit. So a
  job times out, is capped and ends with its true status whether or not an
  agent is attached;
* **its end**: each finished job's record (state, end text, exit status, CPU,
  output size) is kept until the agent says it is durably in the history
  (``ack``); an agent that died before that is told again when one attaches.

Its own death (kill -9, a crash): the jobs run on in their cgroup leaves, and the next
keeper adopts them at its start (:mod:`agent.keeper.keeperadopt`); only their exit
status is lost, and their end says so.

The agent faces the network and keeps the history; it attaches to the keeper's
socket (``SOCK_SEQPACKET``, the protocol of :mod:`agent.keeper.spawnproto`),
and when it goes (restart, crash, kill -9, upgrade) the jobs run on. The next
agent attaches and gets a ``hello`` listing every running job (with the record
the first agent gave it, as the keeper completed it, so a start the agent never
managed to commit is still recorded) and every finished one not yet acknowledged.

Who may attach is the kernel's word, never the peer's (:mod:`agent.keeper.keeperconn`):
a job, even one running as the agent's own uid, cannot talk to the keeper.

The keeper decides every start (:mod:`agent.keeper.decision`): it loads the
configuration and the policy itself (``--config``: the agent's own config file, read
in a loader process; again on ``reload``), and the agent sends only who asks (the
caller's identity, as the agent saw it) and what (the request): never a plan, a user,
capabilities or descriptors. So code execution in the agent can start only what the
policy allows some identity to start. What only the agent knows stays there: who may
call StartJob, whether it accepts jobs, ``max_running``, the history.

The keeper is the spawner wired to its parts, each in a module of its own:
:mod:`agent.keeper.keeperconn` (the socket, who may attach, what is said to the agent),
:mod:`agent.keeper.keptjobs` (each job's output, timers and lifecycle, and the ends not
yet acknowledged), :mod:`agent.keeper.keeperstart` (a start: decision, then spawn),
:mod:`agent.keeper.keeperadopt` (a dead keeper's jobs), :mod:`agent.keeper.keeperfiles`
(what is left for the next keeper), :mod:`agent.keeper.keeperuids` (the dynamic uids
held) and :mod:`agent.keeper.keeperstate` (the upgrade in place). This module wires
them, runs the loop and is the keeper's entry point.

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

# First, before anything imports dataclasses (see there).
import agent.keeper.deferred  # noqa: F401

# isort: split
import contextlib
import gc
import os
import selectors
import signal
import socket
import sys
import time
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.keeper import capabilities, cgroups, uids, vspawn
from agent.keeper import lifecycle as lc
from agent.keeper import spawnproto as proto
from agent.keeper.decision import Decider, LoadError, load_in_child
from agent.keeper.keeperadopt import Adoption
from agent.keeper.keeperconn import FEATURES, LISTEN, AgentLink
from agent.keeper.keeperfiles import JobFiles, listen_fds, load_ends, save_ends, stored_fds
from agent.keeper.keeperlog import guarded, log, notify, notify_address
from agent.keeper.keeperstart import KEEPER_STOP, Starter
from agent.keeper.keeperuids import Reclaim, UidHolds
from agent.keeper.keptjobs import Kept, KeptJob, exit_of
from agent.keeper.spawner import Spawner

PROTOCOL = 2  # 2: the keeper decides (requests, not plans)
PR_SET_CHILD_SUBREAPER = 36
MAX_SLEEP = 3600.0  # seconds: the longest the loop waits at once
# A stopping service keeper, its jobs ended: how long it waits for the agent's acks.
CLOSE_LINGER = 5.0
ORPHANS_EVERY = 0.1  # seconds: the shortest time between two looks for exited orphans
ORPHANS_AGAIN = 0.5  # seconds: the next look, while a look found orphans still alive
ORPHANS_RUNNING = 5.0  # seconds: the next look, while jobs run (orphans come and go)


class Keeper(Spawner):
    """The keeper: the spawner wired to its parts (the agent's link, the kept jobs, the
    start path, the adoption of a dead keeper's jobs, what is left for the next keeper)
    and the loop that drives them."""

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
        # Where a keeper that exits with ends the agent has not recorded leaves them for
        # the next keeper (a service stopped after its agent: systemd stops the agent
        # first). "": nowhere (the agent's child: it ends only when the agent says so).
        self.ended_file = ended_file
        # A service of its own (`agent keeper`): SIGTERM stops its jobs, then it exits.
        # Otherwise (the agent's child) only the agent's "exit" ends it.
        self.service = service
        self.linger_until = 0.0  # after the last job: how long to wait for the acks
        self.reexec_wanted = False  # SIGUSR2: replace the code in place when quiet
        # Adopted orphans (processes a job left, reparented to this subreaper) are looked
        # for after each job's end, at most every ORPHANS_EVERY (a look reads /proc), and
        # while any are alive or jobs run (see serve). Not on SIGCHLD: nearly every one is
        # a job leader's, reaped through its pidfd, and each cost a signal and a turn.
        self.orphans_at = 0.0  # monotonic time of the next look (0: none due)
        self.orphans_last = 0.0
        # Output files are the agent's to read and remove: a root keeper serving another
        # user's agent (the privileged deployment) hands each to that user.
        file_owner = agent_uid if os.geteuid() == 0 and agent_uid != 0 else -1
        self.link = AgentLink(
            listener,
            self.sel,
            agent_uid=agent_uid,
            subtree=subtree,
            take=self.on_socket,
            running=lambda: len(self.kept.jobs),
        )
        self.kept = Kept(self.sel, tell=self.link.tell, signal=self.signal_job, forget=self.forget)
        # systemd's descriptor store holds each job's pipe for the next keeper (a service
        # whose unit sets FileDescriptorStoreMax= and FDSTORE=, see main()); the journal's
        # rewrite keeps the records of the running jobs, these.
        self.files = JobFiles(output_dir, self.kept.jobs, agent_store=not service)
        # [jobs] dynamic_users: the uids jobs hold (the range read at the keeper's start:
        # its own seccomp filter allows that range and no other, see main()).
        dyn = decider.settings.dynamic_users if decider is not None else None
        self.holds = UidHolds(
            uids.Pool(*dyn) if dyn is not None else None,
            watch=lambda fd, r: self.sel.register(fd, selectors.EVENT_READ, r),
            unwatch=self.sel.unregister,
            fast=self.launcher.module,
        )
        # Leaders whose cgroup leaf was seen empty: their uid's cleanup needs no /proc scan.
        self.emptied: set[int] = set()
        kept, holds, files = self.kept, self.holds, self.files
        self.starter = Starter(
            self,
            kept=kept,
            link=self.link,
            holds=holds,
            files=files,
            decider=decider,
            file_owner=file_owner,
        )
        self.adoption = Adoption(
            self, kept=kept, holds=holds, files=files, file_owner=file_owner, exited=self.on_exited
        )

    # ------------------------------------------------------------ the loop

    def serve(self) -> None:
        """Run until told to exit (the agent's ``exit``, or SIGTERM to a service once its
        jobs have ended); agents come and go."""
        while self.running:
            asked = self.take_ready(self.sel.select(self.sleep_time()))
            self.kept.run_timers()
            if self.adoption.unwatched:
                self.adoption.look_at(self.adoption.unwatched)
            if asked and self.running and self.link.sock is not None:
                self.on_socket()
            self.kept.flush_output()
            if self.link.hello_due and not self.kept.by_rid and self.link.sock is not None:
                self.hello()
            if self.reexec_wanted and not self.starter.closing:
                self.maybe_reexec()
            if self.starter.closing:
                self.check_closed()
            if self.orphans_at and time.monotonic() >= self.orphans_at:
                self.orphans_at = 0.0
                self.orphans_last = now = time.monotonic()
                if _reap_orphans(self):
                    self.orphans_at = now + ORPHANS_AGAIN
            if not self.orphans_at and self.kept.jobs:
                self.orphans_at = self.orphans_last + ORPHANS_RUNNING
            if self.files.rewrite_due and time.monotonic() >= self.files.rewrite_due:
                self.files.compact()  # ended jobs' records out of the journal
        self.kill_all()

    def sleep_time(self) -> float | None:
        timeout = None
        due = self.kept.next_timer()
        if due is not None:
            # At most an hour: epoll refuses a timeout above INT_MAX ms (24.8 days,
            # OverflowError), and a job's timeout may be a uint32 of seconds.
            timeout = min(MAX_SLEEP, max(0.0, due - time.monotonic()))
        if self.starter.closing or self.adoption.unwatched:
            timeout = min(timeout if timeout is not None else 1.0, 1.0)
        for at in (self.orphans_at, self.files.rewrite_due):
            if at:
                due = max(0.0, at - time.monotonic())
                timeout = due if timeout is None else min(timeout, due)
        return timeout

    def look_for_orphans(self) -> None:
        """Reap exited orphans now, or ORPHANS_EVERY after the last look (a job ended: what
        it left was killed with it)."""
        due = max(time.monotonic(), self.orphans_last + ORPHANS_EVERY)
        if not self.orphans_at or due < self.orphans_at:
            self.orphans_at = due

    def take_ready(self, ready: Iterable[tuple[selectors.SelectorKey, int]]) -> bool:
        """Handle the ready descriptors; whether the agent has sent a request (taken
        after the timers, one per turn)."""
        asked = False
        for key, _ in ready:
            what = key.data
            if what is None:
                asked = True
            elif what == LISTEN:
                self.link.on_accept()
            elif isinstance(what, KeptJob):
                guarded(self.kept.on_output, what)
            elif isinstance(what, _Wakeup):
                guarded(what)
            elif isinstance(what, Reclaim):
                guarded(self.holds.reclaimed, what)
            else:
                self.dispatch(what)
            if not self.running:
                break
        return asked

    def on_socket(self) -> None:
        """Take one request from the agent."""
        got = self.link.receive()
        if got is None:
            return
        msg, byrole = got
        op = msg["op"]
        try:
            if op == "start":
                self.starter.start(msg, byrole)
            elif op == "stop":
                self.kept.stop(msg)
            elif op == "ack":
                self.kept.ack(msg)
            elif op == "reload":
                self.starter.reload(msg)
            elif op == "features":
                self.link.use(msg)
            elif op == "exit":
                self.running = False
            else:
                log(f"bad message: unknown op {op[:40]!r}")
        except Exception:
            import traceback

            log(f"internal error in {op}:\n{traceback.format_exc()}")
            if op == "start":
                self.starter.failed(msg)
        for fd in byrole.values():
            with contextlib.suppress(OSError):  # start() may have closed them already
                os.close(fd)

    def hello(self) -> None:
        self.link.hello_due = False
        if self.files.fdstore and not self.service:
            # The agent whose child this keeper is keeps the pipes (agent.daemon.pipestore);
            # an agent that attaches anew (it restarted) has none of them yet.
            for job in self.kept.jobs.values():
                self.files.push(job)
        self.link.tell(
            {
                "op": "hello",
                "protocol": PROTOCOL,
                "features": sorted(FEATURES),  # what the agent may ask for (keeperconn)
                "pid": os.getpid(),
                "uid": os.geteuid(),  # what the agent's policy check needs to know
                # Root or not, whether it runs jobs as any user with capabilities (the
                # privileged unit's keeper is worker-agent with CAP_SETUID/SETGID/SETPCAP).
                "gives": self.gives,
                "spawn": self.path,
                "why": self.path_why,
                "jobs": self.kept.hello_jobs(),
                "ended": list(self.kept.ended.values()),
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

    def maybe_reexec(self) -> None:
        """Re-execute the code on disk once quiet (see agent.keeper.keeperstate)."""
        from agent.keeper import keeperstate

        if not keeperstate.quiet(self):
            return  # again after the next turn
        self.reexec_wanted = False
        self.holds.finish()  # no cleanup half done across the exec
        log(f"re-executing in place with {len(self.kept.jobs)} job(s)")
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
        if self.starter.closing:
            return
        self.starter.closing = True
        jobs = self.kept.jobs
        log(f"stopping: {len(jobs)} running job(s) are stopped, then the keeper exits")
        notify(f"STOPPING=1\nSTATUS=stopping {len(jobs)} job(s)")
        for job in list(jobs.values()):
            guarded(self.kept.handle, job, lc.ShutdownRequested(KEEPER_STOP))

    def check_closed(self) -> None:
        """Once every job has ended: exit when the agent has recorded their ends, or a
        few seconds later (an agent that does not answer must not hold the stop)."""
        if self.kept.jobs or self.kept.by_rid:
            return
        now = time.monotonic()
        if not self.linger_until:
            self.linger_until = now + CLOSE_LINGER
        ended, link = self.kept.ended, self.link
        if not ended or link.sock is None or link.deaf or now >= self.linger_until:
            if ended:
                log(f"exiting with {len(ended)} end(s) the agent has not recorded")
            self.running = False

    # ------------------------------------------------------------ the spawner's side

    def send(self, msg: dict[str, Any]) -> None:
        """The spawner's reports, taken here instead of going to a socket."""
        op = msg.get("op")
        if op == "spawned":
            guarded(self.starter.on_spawned, msg)
        elif op == "exited":
            guarded(self.on_exited, msg)

    def on_exited(self, msg: dict[str, Any]) -> None:
        # After its cgroup is empty (the spawner reports the exit then): the end is told
        # at once; the uid is free once what it left outside the cgroup is gone too (a
        # helper beside the loop, see keeperuids: until then no job is given the uid).
        pid = msg["pid"]
        self.look_for_orphans()
        self.job_users.pop(pid, None)
        contained = pid in self.emptied
        self.emptied.discard(pid)
        job = self.kept.by_pid.pop(pid, None)
        if job is None:
            return
        self.kept.exited(job, exit_of(msg))
        self.holds.release(job.id, ran=True, contained=contained)

    def cgroup_done(
        self, pid: int, cg: cgroups.JobCgroup, msg: dict[str, Any], *, emptied: bool
    ) -> None:
        # Also reached when the leaf could not be killed or watched: only a leaf seen
        # empty spares the uid's cleanup its /proc scan.
        if emptied:
            self.emptied.add(pid)
        Spawner.cgroup_done(self, pid, cg, msg, emptied=emptied)

    def leaves_fired(self, fired: list[int]) -> None:
        Spawner.leaves_fired(self, fired)
        self.adoption.fired(fired)

    def signal_job(self, job: KeptJob, sig: int) -> None:
        if job.leaf is not None:
            self.adoption.signal(job, sig)
        elif job.pid:
            Spawner.signal(self, {"pid": job.pid, "sig": sig})

    def forget(self, job: KeptJob) -> None:
        """A finished job: what was kept for its adoption goes."""
        if job.leaf is not None:
            self.job_users.pop(job.key, None)  # an adopted job's user
        if self.subtree is not None:
            # Its "finished" was just told: an agent that is the store drops the pipe then.
            self.files.forget(job, dropped=self.files.pipes_told(self.link))

    def kill_all(self) -> None:
        """At the keeper's end: nothing may run that nobody supervises."""
        for job in list(self.kept.jobs.values()):
            with contextlib.suppress(Exception):
                if job.leaf is not None:
                    job.leaf.kill()
                elif job.pid:
                    Spawner.signal(self, {"pid": job.pid, "sig": signal.SIGKILL})


def _subreaper() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap_orphans(keeper: Keeper) -> bool:
    """Reap adopted orphans (processes a job left, reparented to this subreaper), never
    a job's leader or a child still setting up: those the spawner reaps itself. Whether
    one is still alive."""
    mine = set(keeper.children) | set(keeper.holds.reclaiming)  # the cleanups: their own
    alive = False
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
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
                alive = os.waitpid(pid, os.WNOHANG)[0] == 0 or alive
    return alive


def _is_starting(keeper: Keeper, pid: int) -> bool:
    from agent.keeper.spawner import Starting

    return any(
        isinstance(k.data, Starting) and k.data.pid == pid for k in keeper.sel.get_map().values()
    )


USAGE = (
    "usage: python -m agent.keeper.keeper (--listen-fd N | --socket PATH) --config FILE "
    "[--output-dir DIR] [--agent-uid UID] [--cgroup-jobs DIR [--controllers LIST]] "
    "[--service 1 [--ended-file PATH]] [--stored JOB=FD,...] | --resume-fd N"
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
    "--stored",
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


def options(opts: dict[str, str]) -> types.SimpleNamespace:
    """What :func:`parse_args` found, typed."""
    cgroup_jobs, controllers = opts.get("--cgroup-jobs"), opts.get("--controllers", "")
    return types.SimpleNamespace(
        listen_fd=int(opts["--listen-fd"]) if "--listen-fd" in opts else None,
        socket=opts.get("--socket"),
        config=opts.get("--config"),
        output_dir=opts.get("--output-dir"),
        agent_uid=int(opts.get("--agent-uid", os.geteuid())),
        subtree=cgroups.Subtree(
            Path(cgroup_jobs), frozenset(c for c in controllers.split(",") if c)
        )
        if cgroup_jobs
        else None,
        service=opts.get("--service", "0") == "1",
        ended_file=opts.get("--ended-file", ""),
        stored=opts.get("--stored", ""),
    )


def main(argv: list[str]) -> int:
    """``python -m agent.keeper.keeper``: see :data:`USAGE`; CONTROLLERS is a
    comma-separated list (may be empty) of the controllers enabled for job cgroups."""
    if len(argv) == 2 and argv[0] == "--resume-fd" and argv[1].isdigit():
        return resume(int(argv[1]))
    opts = parse_args(argv)
    if opts is None:
        print(USAGE, file=sys.stderr)
        return 2
    args = options(opts)
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
    if args.config is not None:
        why, decider = load_decider(args.config, args.subtree)
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
        for w in decider.check_held():
            log(w)
    _subreaper()
    keeper = Keeper(
        listener,
        agent_uid=args.agent_uid,
        output_dir=args.output_dir,
        subtree=args.subtree,
        path=path,
        decider=decider,
        service=args.service,
        ended_file=args.ended_file,
    )
    keeper.kept.ended.update(load_ends(args.ended_file))
    # A descriptor store: a service's unit keeps one (FileDescriptorStoreMax=, announced
    # to the keeper as $FDSTORE: systemd 254 sets it, the unit sets it for 252); the agent
    # whose child this keeper is keeps one too (agent.daemon.pipestore: $NOTIFY_SOCKET is
    # its socket, and it passes what it kept as --stored).
    stored = listen_fds() or stored_fds(args.stored)
    fdstore = os.environ.get("FDSTORE", "0")
    keeper.files.fdstore = fdstore.isdigit() and int(fdstore) > 0 and bool(notify_address())
    keeper.adoption.adopt_leftovers(stored)
    return run(keeper)


def keeper_filter(lo: int, hi: int) -> str:
    """Bind this keeper (and every process it starts) to the dynamic uid range: from now
    on the kernel refuses it uid 0 and every uid and gid outside ``lo..hi`` (see
    :func:`agent.keeper.uids.keeper_filter`), so code execution in the keeper cannot
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
    """The keeper's new code after :func:`agent.keeper.keeperstate.reexec`: the same
    process, its jobs and descriptors, its state from the sealed memfd ``fd``."""
    from agent.keeper import keeperstate

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
        else:
            # Its capabilities are still those its start kept (see check_held).
            for w in decider.check_held():
                log(w)
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
        f"re-executed in place (pid {os.getpid()}): {len(keeper.kept.jobs)} job(s) kept, "
        f"{len(keeper.kept.ended)} end(s) to tell"
    )
    return run(keeper)


def run(keeper: Keeper) -> int:
    keeper.setup_signals()
    # Orphans a job leaves are this subreaper's children: reaped by the loop after a job's
    # end (Keeper.look_for_orphans), never by a wait that could take a job leader's
    # status. SIGCHLD keeps its default (nothing is delivered). SIGUSR2 asks for a
    # re-exec of the code on disk (an upgrade in place), through the selector.
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
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
        notify(f"READY=1\nSTATUS=holding {len(keeper.kept.jobs)} job(s)\nMAINPID={os.getpid()}")
    keeper.serve()
    keeper.holds.finish()
    save_ends(keeper.ended_file, keeper.kept.ended)
    if keeper.service:
        notify("STOPPING=1")
    return 0


class _Wakeup:
    """The signals' wakeup pipe: note a re-exec request (SIGUSR2), stop a service
    (SIGTERM, SIGINT)."""

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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
