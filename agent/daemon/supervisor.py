"""The supervisor: the imperative shell around each job's pure lifecycle.

Runs entirely on the asyncio event loop's thread. It owns what the pure
code may not touch: descriptors (the output pipe, the output file), timers,
the process operations (:class:`~agent.daemon.spawn.ProcessOps`) and the
history. Every observation becomes an event for
:class:`~agent.daemon.lifecycle.Life`; every action it returns is carried
out in :meth:`Supervisor._apply`. Running jobs live in memory (a few hundred
bytes each plus their descriptors); finished jobs live only in the history.

A job's path::

    start(): admission -> output pipe -> ops.spawn -> RUNNING (recorded)
    pipe readable: OutputFile.write -> followers woken; cap / failure events
    ops on_exit: Exited(exit)          pipe EOF: OutputClosed
    Finish action -> history, waiters, audit
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent.access import AccessDenied, Caller
from agent.daemon import admission, procfs, validation
from agent.daemon import lifecycle as lc
from agent.daemon import policy as policy_mod
from agent.daemon.cgroups import Subtree
from agent.daemon.errors import (
    AgentError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
    agent_condition,
)
from agent.daemon.history import History, JobRecord
from agent.daemon.output import LiveOutput, OutputFile, describe_oserror, stream_file
from agent.daemon.spawn import ProcessOps, SpawnSpec
from agent.vocabulary import CGROUP_LIMITS as VOCABULARY_CGROUP_LIMITS
from agent.vocabulary import JobState

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
# After the main process exits, how long to wait for the output pipe to
# close (processes that escaped the group may hold it open).
OUTPUT_CLOSE_GRACE = 2.0
# A job whose output has just closed (or whose exit just came in) is moments
# from done: the spawner's report, or the pipe's end, is on its way. A query
# then waits for it up to ENDING_WAIT rather than answering "running" and
# costing an original-protocol client one more poll interval and call; only
# within ENDING_WINDOW of that moment, so a job that closes its output and
# goes on running is answered at once after that.
ENDING_WAIT = 0.005
ENDING_WINDOW = 0.05
INSTANCE_ENV = "AGENT_INSTANCE"
BOOT_ID = procfs.boot_id()


@dataclass(frozen=True)
class JobUser:
    """Who jobs run as."""

    uid: int | None  # None: the agent's own user (no switch)
    gid: int | None
    name: str
    home: str


@dataclass(frozen=True)
class Settings:
    """What the supervisor needs from the configuration (no defaults: config has them)."""

    output_dir: Path
    instance: str  # marks every job's environment, see Recovery
    user: JobUser
    umask: int
    stop_grace: float
    on_output_cap: str
    path_env: str
    rules: admission.Rules
    # The agent's job cgroup subtree; None: jobs run without a cgroup.
    cgroups: Subtree | None = None
    cpu_millicores: int = 0  # [cgroups] cpu_millicores: cpu.max of every job

    # Each job's scratch directory (cwd, HOME, TMPDIR) is created below this; None: none.
    scratch_dir: Path | None = None


# Limits enforced by the job's cgroup -> (cgroups.Limits field, controller).
# Never by an rlimit: RLIMIT_NPROC counts every process of the job's user and
# RLIMIT_AS is address space per process, neither is one job's.
# The limits a cgroup enforces (agent.vocabulary says which and with what controller):
# name -> (the cgroups.Limits field that sets its file, the controller).
_LIMITS_FIELD = {"memory.max": "memory_bytes", "pids.max": "pids"}
CGROUP_LIMITS: dict[str, tuple[str, str]] = {
    name: (_LIMITS_FIELD[control], controller)
    for name, (control, controller) in VOCABULARY_CGROUP_LIMITS.items()
}
NO_CGROUP_NOTE = "ran without a job cgroup: its stop was not escape-proof"


def cgroup_limits(
    limits: Mapping[str, int], cpu_millicores: int, subtree: Subtree | None
) -> dict[str, int]:
    """The cgroup limits of a job (``cgroups.Limits`` fields), or FailedPrecondition.

    A limit whose controller is not enabled for job cgroups (or that needs a
    cgroup where jobs run without one) is refused, never silently unenforced.
    """
    out: dict[str, int] = {}
    wanted: list[tuple[str, str, str]] = [
        (name, field_name, controller)
        for name, (field_name, controller) in CGROUP_LIMITS.items()
        if limits.get(name)
    ]
    if cpu_millicores:
        wanted.append(("[cgroups] cpu_millicores", "cpu_millicores", "cpu"))
    for name, field_name, controller in wanted:
        if subtree is None:
            raise FailedPrecondition(
                f"{name} needs the {controller} controller of a job cgroup, and jobs run "
                "without a cgroup on this agent",
                rule="missing-cgroup-controller",
            )
        if controller not in subtree.controllers:
            raise FailedPrecondition(
                f"{name} needs the {controller} controller, which is not available for "
                f"job cgroups here ({subtree.jobs}), so the limit cannot be enforced",
                rule="missing-cgroup-controller",
            )
        out[field_name] = cpu_millicores if field_name == "cpu_millicores" else limits[name]
    return out


class Job:
    """A running job: its record, its lifecycle, and the handles that drive it."""

    def __init__(
        self, record: JobRecord, life: lc.Life, out: OutputFile, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.record = record
        self.life = life
        self.out = out
        self.live = LiveOutput()
        self.pipe_fd: int | None = None
        self.timers: list[asyncio.TimerHandle] = []
        self.done: asyncio.Future[JobRecord] = loop.create_future()
        self.ending: float | None = None  # loop time of its output's end or its exit

    @property
    def id(self) -> str:
        return self.record.id


class Supervisor:
    """Owns every running job of this agent."""

    def __init__(
        self,
        settings: Settings,
        history: History,
        policy: policy_mod.Policy,
        ops: ProcessOps,
        *,
        on_change: Callable[[], None] | None = None,
        on_finish: Callable[[JobRecord], None] | None = None,
    ) -> None:
        self.settings = settings
        self.history = history
        self.policy = policy
        self.ops = ops
        self.running: dict[str, Job] = {}
        self.accepting = True
        self._starting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_change = on_change or (lambda: None)
        self._on_finish = on_finish or (lambda rec: None)
        self._base_env = {
            "PATH": settings.path_env,
            "HOME": settings.user.home,
            "USER": settings.user.name,
            "LOGNAME": settings.user.name,
            "LANG": "C.UTF-8",
            INSTANCE_ENV: settings.instance,
        }

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.history.attach(self._loop)
        return self._loop

    def stop_accepting(self) -> None:
        """Refuse every new start from now on (UNAVAILABLE): the agent is stopping."""
        self.accepting = False

    def set_policy(self, policy: policy_mod.Policy) -> None:
        """Use ``policy`` for every start from now on (running jobs are unaffected)."""
        self.policy = policy

    # ------------------------------------------------------------ start

    async def start(self, req: admission.StartRequest) -> JobRecord:
        """Start a job or raise an AgentError saying why not.

        Returns the job's record once it is durably recorded: RUNNING, or
        FAILED when the program could not be started (the original protocol
        reports start failures through QueryJob, so such a job gets an id
        like any other).
        """
        admitted = admission.admit(
            req,
            self.settings.rules,
            self.policy,
            busy=len(self.running) + self._starting,
            accepting=self.accepting,
        )
        # The slot is taken before the first await, so concurrent starts can
        # never exceed max_running.
        self._starting += 1
        try:
            # After admission (malformed requests and policy denials first).
            cg_limits = cgroup_limits(
                admitted.limits, self.settings.cpu_millicores, self.settings.cgroups
            )
            return await self._spawn(req, admitted, cg_limits)
        finally:
            self._starting -= 1
            admitted.plan.close()  # the sealed copies (exec_fd, script_fd) are the child's now

    async def _spawn(
        self, req: admission.StartRequest, admitted: admission.Admitted, cg_limits: dict[str, int]
    ) -> JobRecord:
        plan, limits = admitted.plan, admitted.limits
        job_id = str(uuid.uuid4())
        out_path = str(self.settings.output_dir / f"{job_id}.out")
        record = JobRecord(
            id=job_id,
            owner=req.identity,
            command=plan.executable,
            path=req.path,
            args=policy_mod.redact_args(req.args, req.secret_args),
            state=JobState.RUNNING,
            start_time=time.time(),
            output_path=out_path,
            timeout_seconds=admitted.timeout,
            limits={k: v for k, v in limits.items() if v},
            boot_id=BOOT_ID,
        )
        env = dict(self._base_env)
        env.update(plan.env)
        env[procfs.JOB_ID_ENV] = job_id
        # The job's descriptors are taken before anything starts: an agent out of them
        # refuses the start (RESOURCE_EXHAUSTED, its own condition), nothing half-way.
        out = OutputFile(out_path, limits.get("output_bytes", 0))
        out.reserve()
        try:
            rfd, wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            out.close()
            raise agent_condition(e) or e from None
        # The child gets a blocking write end: a job must not see EAGAIN on
        # stdout just because the agent is momentarily behind.
        os.set_blocking(wfd, True)
        with contextlib.suppress(OSError):
            fcntl.fcntl(rfd, fcntl.F_SETPIPE_SZ, READ_CHUNK)
        s = self.settings
        # --- confinement (issue 14): the entry's user, Landlock and scratch directory ---
        conf = plan.confinement
        uid, gid = s.user.uid, s.user.gid
        if conf is not None and conf.uid is not None:
            uid, gid = conf.uid, conf.gid
            env["USER"] = env["LOGNAME"] = conf.user or str(conf.uid)
        scratch = str(s.scratch_dir / job_id) if s.scratch_dir is not None else None
        if scratch is not None:
            env["HOME"] = env["TMPDIR"] = scratch
        spec = SpawnSpec(
            argv=plan.argv,
            executable=plan.executable,
            env=env,
            cwd=plan.cwd or scratch or "/",
            stdout_fd=wfd,
            uid=uid,
            gid=gid,
            umask=s.umask,
            limits={
                k: v for k, v in limits.items() if k != "output_bytes" and k not in CGROUP_LIMITS
            },
            exec_fd=plan.exec_fd,
            script_fd=plan.script_fd,
            cgroup={"id": job_id, **cg_limits} if s.cgroups is not None else None,
            landlock=conf.landlock if conf is not None else None,
            landlock_abi=conf.abi if conf is not None else 0,
            scratch=scratch,
            capabilities=conf.capabilities if conf is not None else (),
            no_new_privs=conf.no_new_privs if conf is not None else True,
            seccomp=conf.seccomp if conf is not None else None,
        )
        life = lc.Life(
            timeout_seconds=admitted.timeout,
            cpu_seconds=limits.get("cpu_seconds", 0),
            memory_max=cg_limits.get("memory_bytes", 0),
            note="" if s.cgroups is not None else NO_CGROUP_NOTE,
        )
        job = Job(record, life, out, self.loop)
        # Recorded before it is started: the insert is made now and its commit
        # runs while the spawner sets the job up, not after (one spawner round
        # trip less before StartJob is answered, issue 17). Until then the
        # row's pid is 0; an agent that dies meanwhile leaves a RUNNING record
        # that the next start recovers like any other (LOST, and whatever of
        # the job exists killed through its cgroup or its instance marker).
        try:
            committed = self.history.insert_new(record)
        except Unavailable:
            os.close(rfd)
            os.close(wfd)
            out.close()
            raise
        try:
            pid = await self.ops.spawn(spec, lambda ex: self._exited(job, ex))
        except OSError as e:
            os.close(rfd)
            out.close()
            _mark_not_started(record, describe_oserror(e))
            await self.history.committed(committed)
            await self.history.record_change(record)
            self._on_finish(record)
            cond = _spawner_condition(e)
            if cond is not None:
                # The job spawner ran out (descriptors, memory, processes): the agent's
                # condition, answered as such; the record says the job never started.
                raise cond from None  # logged once, with the RPC, by the service
            log.info("job %s could not start: %s", job_id, record.error_text)
            return record
        except BaseException as e:
            # The caller went away mid-start (the spawner kills a job whose
            # start nobody awaits), or a bug: the row inserted above must not
            # stay RUNNING.
            os.close(rfd)
            out.close()
            cancelled = isinstance(e, asyncio.CancelledError)
            _mark_not_started(record, "the start was cancelled" if cancelled else "internal error")
            self.history.save(record)
            self._on_finish(record)
            raise
        finally:
            os.close(wfd)
        record.pid = pid
        job.pipe_fd = rfd
        self.running[job_id] = job
        self.loop.add_reader(rfd, self._on_output, job)
        if admitted.timeout:
            job.timers.append(
                self.loop.call_later(admitted.timeout, self._handle, job, lc.TimedOut())
            )
        # The leader's start time (for crash recovery) is read a moment
        # later: right after exec, reading /proc/PID/stat waits for the
        # child's exec to finish.
        job.timers.append(self.loop.call_later(0.02, self._read_leader_start, job))
        try:
            await self.history.committed(committed)
        except Unavailable:
            # Never leave a job running that the history does not know.
            self._handle(job, lc.NotRecorded())
            raise
        self._on_change()
        return record

    def _read_leader_start(self, job: Job) -> None:
        if not job.life.running or job.done.done():
            return
        st = procfs.read_stat(job.record.pid)
        if st is not None and st.pgid == job.record.pid:
            job.record.leader_start = st.start_ticks
            self.history.save(job.record)

    # ------------------------------------------------------------ events and actions

    def _handle(self, job: Job, event: lc.Event) -> None:
        for action in job.life.handle(event):
            self._apply(job, action)

    def _apply(self, job: Job, action: lc.Action) -> None:
        if isinstance(action, lc.Signal):
            self.ops.signal(job.record.pid, action.sig)
        elif isinstance(action, lc.ArmKillTimer):
            job.timers.append(
                self.loop.call_later(
                    self.settings.stop_grace, self._handle, job, lc.KillGraceExpired()
                )
            )
        elif isinstance(action, lc.ArmOutputGrace):
            job.timers.append(
                self.loop.call_later(OUTPUT_CLOSE_GRACE, self._handle, job, lc.OutputGraceExpired())
            )
        elif isinstance(action, lc.CloseOutput):
            log.info(
                "job %s: output still open %.0fs after exit (an escaped process holds it); closing",
                job.id,
                OUTPUT_CLOSE_GRACE,
            )
            self._on_output(job)
            if not job.live.closed:
                self._close_output(job)
        elif isinstance(action, lc.DiscardOutput):
            pass  # job.life.discarding is what _record_output looks at
        elif isinstance(action, lc.Finish):
            self._finish(job, action)

    def _exited(self, job: Job, ex: lc.Exit) -> None:
        if job.ending is None:
            job.ending = self.loop.time()
        if not job.live.closed:
            self._on_output(job)  # what is already in the pipe belongs to the job
        self._handle(job, lc.Exited(ex))

    def _on_output(self, job: Job) -> None:
        fd = job.pipe_fd
        if fd is None:
            return
        for _ in range(16):  # bounded, so one chatty job cannot starve the loop
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("job %s: reading output failed: %s", job.id, e)
                data = b""
            if not data:
                self._close_output(job)
                return
            self._record_output(job, data)

    def _record_output(self, job: Job, data: bytes) -> None:
        if job.life.discarding:
            return
        res = job.out.write(data)
        job.record.output_bytes = job.live.size = job.out.size
        job.record.output_truncated = job.out.truncated
        job.live.followers.wake()
        if res.failure:
            self._handle(job, lc.OutputFailed(res.failure))
        elif res.cap_reached:
            self._handle(
                job, lc.OutputCapReached(job.out.cap, kill=self.settings.on_output_cap == "kill")
            )

    def _close_output(self, job: Job) -> None:
        if job.ending is None:
            job.ending = self.loop.time()
        if job.pipe_fd is not None:
            self.loop.remove_reader(job.pipe_fd)
            os.close(job.pipe_fd)
            job.pipe_fd = None
        job.out.close()
        job.live.closed = True
        job.live.followers.wake()
        self._handle(job, lc.OutputClosed())

    def _finish(self, job: Job, fin: lc.Finish) -> None:
        for t in job.timers:
            t.cancel()
        job.timers.clear()
        rec, ex = job.record, fin.exit
        log.debug("job %s: %s -> %s", rec.id, rec.state.name, fin.state.name)
        rec.state = fin.state
        # The spawner's time of the reap: a stopped or busy agent hears of an exit late.
        rec.end_time = ex.end_time if ex.end_time is not None else time.time()
        rec.exit_code = ex.exit_code
        rec.signal = ex.signal
        rec.error_text = fin.text
        rec.user_cpu, rec.system_cpu, rec.max_rss = ex.user_cpu, ex.system_cpu, ex.max_rss
        self.running.pop(rec.id, None)
        if fin.persist:
            self.history.save(rec)
        job.done.set_result(rec)
        job.live.followers.wake()
        self._on_change()
        self._on_finish(rec)

    # ------------------------------------------------------------ stop

    def stop(self, job_id: str, caller: Caller) -> JobRecord:
        """Stop a job (SIGTERM, SIGKILL after the grace). A finished job is fine."""
        job = self.running.get(job_id)
        if job is None:
            return self.get(job_id, caller)
        _check(lambda: caller.may_stop(job_id, job.record.owner))
        self._handle(job, lc.StopRequested())
        return job.record

    def stop_all(self, *, force: bool = False) -> None:
        """Stop every running job because the agent shuts down (``force``: SIGKILL now)."""
        for job in list(self.running.values()):
            self._handle(job, lc.ShutdownRequested())
            if force:
                self._handle(job, lc.KillGraceExpired())

    # ------------------------------------------------------------ query

    def get(self, job_id: str, caller: Caller) -> JobRecord:
        """A job's record, if the caller may see it."""
        job = self.running.get(job_id)
        rec = job.record if job is not None else self.history.get(job_id)
        if rec is None:
            raise NotFound(f"no job with id {job_id}", rule="unknown-job")
        _check(lambda: caller.may_see(job_id, rec.owner))
        return rec

    async def query(self, job_id: str, caller: Caller) -> JobRecord:
        """A job's record, once done if it is ending right now (see ENDING_WAIT)."""
        job = self.running.get(job_id)
        ending = job.ending if job is not None else None
        if ending is not None and self.loop.time() - ending <= ENDING_WINDOW:
            return await self.wait(job_id, caller, ENDING_WAIT)
        return self.get(job_id, caller)

    async def wait(self, job_id: str, caller: Caller, timeout: float | None) -> JobRecord:
        """The record once the job is done, or as it is when ``timeout`` passes."""
        rec = self.get(job_id, caller)
        job = self.running.get(job_id)
        if job is None or rec.state.done:
            return rec
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(asyncio.shield(job.done), timeout)
        return job.record

    def list_jobs(
        self,
        caller: Caller,
        *,
        states: Sequence[JobState] = (),
        owner: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        """Jobs the caller may see, newest first; returns (jobs, next token)."""
        who = _check(lambda: caller.list_owner(owner))
        size = validation.page_size(page_size)
        before = validation.decode_page_token(page_token) if page_token else None
        # A row can be behind the job: RUNNING on disk while the job is running (its live
        # record is newer) or already ended but not yet written (history.unsaved, while
        # the disk is full). Each row is answered with the newest record, as QueryJob
        # does, and the state filter applies to that: with a filter, RUNNING rows are
        # read too, since any of them may have ended.
        fetch = tuple(states)
        if fetch and JobState.RUNNING not in fetch:
            fetch += (JobState.RUNNING,)
        out: list[JobRecord] = []
        last_seq = 0  # of the row of the last record on this page: the next page's token
        more = False
        while True:
            rows = self.history.store.list_jobs(
                states=fetch, owner=who, before_seq=before, limit=size + 1
            )
            for row in rows:
                rec = self._newest(row)
                if states and rec.state not in states:
                    continue
                if len(out) == size:
                    more = True
                    break
                out.append(rec)
                last_seq = row.seq
            if more or len(rows) <= size:
                break
            before = rows[-1].seq
        token = validation.encode_page_token(last_seq) if more and out else ""
        return out, token

    def _newest(self, row: JobRecord) -> JobRecord:
        """The newest record of a job whose row is ``row`` (see list_jobs)."""
        job = self.running.get(row.id)
        if job is not None:
            return job.record
        return self.history.unsaved.get(row.id) or row

    async def stream(
        self, job_id: str, caller: Caller, offset: int, follow: bool
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (offset, data) chunks of a job's output from ``offset``."""
        rec = self.get(job_id, caller)
        validation.stream_offset(offset)

        def live() -> LiveOutput | None:
            job = self.running.get(job_id)
            return job.live if job is not None else None

        async for chunk in stream_file(
            rec.output_path, job_id, offset, follow, rec.output_bytes, live
        ):
            yield chunk

    # ------------------------------------------------------------ shutdown

    async def shutdown(self, *, mode: str, deadline: float) -> None:
        """Stop taking jobs; wait for or stop the running ones; return when all ended."""
        self.stop_accepting()
        jobs = list(self.running.values())
        if not jobs:
            return
        if mode == "wait" and deadline > 0:
            log.info("waiting up to %.0f s for %d running job(s)", deadline, len(jobs))
            await asyncio.wait([j.done for j in jobs], timeout=deadline)
        self.stop_all()
        pending = [j.done for j in self.running.values()]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.stop_grace + OUTPUT_CLOSE_GRACE + 5)

    def close(self) -> None:
        """Release the process operations and the history (after :meth:`shutdown`)."""
        self.ops.close()
        self.history.close()


T = TypeVar("T")


def _spawner_condition(e: OSError) -> AgentError | None:
    """The agent's-condition refusal for a start the job spawner could not make for want
    of its own resources (descriptors anywhere; memory or processes at its fork), None
    when the job itself failed to start (its set-up or its execve)."""
    reason = getattr(e, "reason", "")
    if e.errno in (errno.EMFILE, errno.ENFILE) or (
        e.errno in (errno.ENOMEM, errno.EAGAIN) and reason.startswith("fork")
    ):
        return agent_condition(OSError(e.errno, os.strerror(e.errno or 0)))
    return None


def _mark_not_started(record: JobRecord, why: str) -> None:
    """Mark a job that never ran: FAILED at its start time, "start failed: <why>"."""
    record.state = JobState.FAILED
    record.end_time = record.start_time
    record.error_text = f"start failed: {why}"


def _check(rule: Callable[[], T]) -> T:
    """Run an access rule, turning its refusal into the daemon's PermissionDenied."""
    try:
        return rule()
    except AccessDenied as e:
        raise PermissionDenied(e.message, rule=e.rule) from None


def instance_id(state_dir: Path) -> str:
    """A stable id for an agent installation (its canonical state directory)."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
