"""The job manager: starts, tracks, stops, times out and records jobs.

Runs entirely on the asyncio event loop's thread. Running jobs live in
memory (a few hundred bytes each plus their descriptors); finished jobs live
only in the SQLite history, so memory does not grow with the number of jobs
ever run.

A job's life (see ``agent.states`` for the table)::

    start(): policy -> output file + pipe -> spawn -> pidfd watch -> RUNNING
    pipe readable: copy output to the file, wake followers, enforce the cap
    pidfd readable: kill leftovers in the group, wait4 -> exit status/rusage
    pipe EOF (or a short grace after exit) -> final state -> history

Stopping (StopJob, timeout, output cap, disk full, shutdown) sends SIGTERM
to the whole process group and SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent import policy as policy_mod
from agent import procfs
from agent.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from agent.spawn import (
    Exit,
    ProcessOps,
    RealProcessOps,
    SpawnSpec,
    describe_exit,
    describe_oserror,
)
from agent.states import JobState, check_transition, final_state
from agent.store import JobRecord, Store

log = logging.getLogger(__name__)

LIMIT_NAMES = ("cpu_seconds", "memory_bytes", "open_files", "processes", "output_bytes")
READ_CHUNK = 1 << 20
# After the main process exits, how long to wait for the output pipe to
# close (processes that escaped the group may hold it open).
OUTPUT_CLOSE_GRACE = 2.0
STREAM_CHUNK = 256 * 1024
# No output file can be this large; a larger offset would overflow pread's
# off_t (OverflowError, or EINVAL near 2**63) instead of being refused.
MAX_STREAM_OFFSET = 1 << 62
INSTANCE_ENV = "AGENT_INSTANCE"


@dataclass(frozen=True)
class JobUser:
    """Who jobs run as."""

    uid: int | None  # None: the agent's own user (no switch)
    gid: int | None
    name: str
    home: str


@dataclass(frozen=True)
class Settings:
    """What the job manager needs from the configuration."""

    output_dir: Path
    instance: str  # marks every job's environment, see recover()
    user: JobUser
    umask: int = 0o077
    stop_grace: float = 5.0
    max_running: int = 64
    default_timeout: int = 0
    max_timeout: int = 0
    default_limits: Mapping[str, int] = field(default_factory=dict)
    max_limits: Mapping[str, int] = field(default_factory=dict)
    on_output_cap: str = "kill"
    prlimit: str = "/usr/bin/prlimit"
    setpriv: str = "/usr/bin/setpriv"
    path_env: str = "/usr/local/bin:/usr/bin:/bin"
    retention_max_age: int = 0
    retention_max_jobs: int = 0
    admins: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StartRequest:
    """A StartJob request as plain data."""

    identity: str
    command: str
    path: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: int | None = None
    limits: Mapping[str, int | None] = field(default_factory=dict)
    secret_args: tuple[int, ...] = ()


def resolve_limits(requested: Mapping[str, int | None], defaults: Mapping[str, int],
                   maxima: Mapping[str, int]) -> dict[str, int]:
    """Per-job limits from a request, the defaults and the maxima (0 = none).

    Raises InvalidArgument naming every limit above its maximum.
    """
    out: dict[str, int] = {}
    problems: list[str] = []
    for name in LIMIT_NAMES:
        want = requested.get(name)
        mx = maxima.get(name, 0)
        value = defaults.get(name, 0) if want is None else want
        if want is not None and want < 0:
            problems.append(f"{name} must not be negative")
        elif mx and (value == 0 or value > mx):
            problems.append(f"{name} = {value or 'unlimited'} is above the maximum of {mx}")
        out[name] = value
    if problems:
        raise InvalidArgument("limits: " + "; ".join(problems), rule="limit-above-maximum")
    return out


def resolve_timeout(requested: int | None, default: int, maximum: int) -> int:
    """Timeout in seconds (0 = none); InvalidArgument above the maximum."""
    value = default if requested is None else requested
    if maximum and (value == 0 or value > maximum):
        raise InvalidArgument(
            f"timeoutSeconds = {value or 'none'} is above the maximum of {maximum}",
            rule="timeout-above-maximum")
    return value


class Job:
    """A running job's record plus the handles that drive it."""

    def __init__(self, record: JobRecord, *, pgid: int, limits: Mapping[str, int],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.record = record
        self.pgid = pgid
        self.limits = dict(limits)
        self.pidfd: int | None = None
        self.pipe_fd: int | None = None
        self.out_fd: int | None = None
        self.exit: Exit | None = None
        self.output_closed = False
        self.stop_requested = False
        self.timed_out = False
        self.kill_reason = ""  # set when the agent itself ends the job
        self.discarding = False  # output cap reached or output unwritable
        self.terminating = False
        self.timers: list[asyncio.TimerHandle] = []
        self.done: asyncio.Future[JobRecord] = loop.create_future()
        self._output_waiters: list[asyncio.Future[None]] = []
        self.loop = loop

    @property
    def id(self) -> str:
        return self.record.id

    def wake_output_waiters(self) -> None:
        waiters, self._output_waiters = self._output_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait_output(self, offset: int) -> None:
        """Return once output beyond ``offset`` exists or the output closed."""
        if self.record.output_bytes > offset or self.output_closed:
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self._output_waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._output_waiters:
                self._output_waiters.remove(fut)


class JobManager:
    """Owns every job of this agent."""

    def __init__(self, settings: Settings, store: Store, policy: policy_mod.Policy, *,
                 ops: ProcessOps | None = None,
                 on_change: Callable[[], None] | None = None,
                 on_finish: Callable[[JobRecord], None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.policy = policy
        self.ops: ProcessOps = ops or RealProcessOps()
        self.running: dict[str, Job] = {}
        self.accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsaved: dict[str, JobRecord] = {}
        self._starting = 0
        self.sweep_more = False
        self._commit_future: asyncio.Future[None] | None = None
        self._batch: list[JobRecord] = []
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
        return self._loop

    # ------------------------------------------------------------ start

    async def start(self, req: StartRequest) -> JobRecord:
        """Start a job or raise an AgentError saying why not.

        Returns the job's record once it is durably recorded: RUNNING, or
        FAILED when the program could not be executed (the original protocol
        reports start failures through QueryJob, so such a job gets an id
        like any other).
        """
        if not self.accepting:
            raise Unavailable("the agent is shutting down and accepts no new jobs",
                              rule="shutting-down")
        busy = len(self.running) + self._starting
        if busy >= self.settings.max_running:
            raise ResourceExhausted(
                f"{busy} jobs are running, the limit is "
                f"{self.settings.max_running}; try again when one has finished",
                rule="max-running")
        for i in req.secret_args:
            if not 0 <= i < len(req.args):
                raise InvalidArgument(f"secretArgs: index {i} is not an argument index",
                                      rule="bad-secret-index")
        limits = resolve_limits(req.limits, self.settings.default_limits,
                                self.settings.max_limits)
        timeout = resolve_timeout(req.timeout_seconds, self.settings.default_timeout,
                                  self.settings.max_timeout)
        decision = policy_mod.decide(
            self.policy,
            policy_mod.JobRequest(command=req.command, path=req.path, args=req.args,
                                  env=req.env, identity=req.identity))
        if not decision.allowed:
            raise decision.error()
        plan = decision.plan
        assert plan is not None
        # The slot is taken before the first await, so concurrent starts can
        # never exceed max_running.
        self._starting += 1
        try:
            return await self._spawn(req, plan, limits, timeout)
        finally:
            self._starting -= 1
            if plan.exec_fd is not None:
                os.close(plan.exec_fd)

    async def _spawn(self, req: StartRequest, plan: policy_mod.Plan, limits: dict[str, int],
                     timeout: int) -> JobRecord:
        job_id = str(uuid.uuid4())
        # Created at the first byte of output (see _record_output): a job
        # that writes nothing costs no file.
        out_path = self.settings.output_dir / f"{job_id}.out"
        record = JobRecord(
            id=job_id, owner=req.identity, command=plan.executable, path=req.path,
            args=policy_mod.redact_args(req.args, req.secret_args), state=JobState.RUNNING,
            start_time=time.time(), output_path=str(out_path), timeout_seconds=timeout,
            limits={k: v for k, v in limits.items() if v}, boot_id=_BOOT_ID)
        env = dict(self._base_env)
        env.update(plan.env)
        env[procfs.JOB_ID_ENV] = job_id
        rfd, wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # The child gets a blocking write end: a job must not see EAGAIN on
        # stdout just because the agent is momentarily behind.
        os.set_blocking(wfd, True)
        with contextlib.suppress(OSError):
            fcntl.fcntl(rfd, fcntl.F_SETPIPE_SZ, READ_CHUNK)
        spec = SpawnSpec(
            argv=plan.argv, executable=plan.executable, env=env, cwd=plan.cwd or "/",
            stdout_fd=wfd, uid=self.settings.user.uid, gid=self.settings.user.gid,
            umask=self.settings.umask,
            limits={k: v for k, v in limits.items() if k != "output_bytes"},
            prlimit=self.settings.prlimit, setpriv=self.settings.setpriv,
            exec_fd=plan.exec_fd)
        try:
            # On the loop thread: without a user switch Popen uses vfork and
            # blocks for about 0.1 ms; handing it to a thread costs more in
            # GIL and wake-up latency than it saves (measured, bench/).
            pid = self.ops.spawn(spec)
        except OSError as e:
            os.close(rfd)
            record.state = JobState.FAILED
            record.end_time = record.start_time
            record.error_text = f"start failed: {describe_oserror(e)}"
            await self._record_new(record)
            log.info("job %s could not start: %s", job_id, record.error_text)
            self._on_finish(record)
            return record
        finally:
            os.close(wfd)
        record.pid = pid
        job = Job(record, pgid=pid, limits=limits, loop=self.loop)
        job.pipe_fd = rfd
        job.pidfd = self.ops.pidfd_open(pid)
        self.running[job_id] = job
        self._watch(job)
        if timeout:
            job.timers.append(self.loop.call_later(timeout, self._on_timeout, job))
        # The leader's start time (for crash recovery) is read a moment
        # later: right after exec, reading /proc/PID/stat waits for the
        # child's exec to finish.
        job.timers.append(self.loop.call_later(0.02, self._read_leader_start, job))
        try:
            await self._record_new(record)
        except Unavailable:
            # Never leave a job running that the history does not know.
            job.kill_reason = "not recorded"
            self.ops.kill_group(pid, signal.SIGKILL)
            raise
        self._on_change()
        return record

    def _read_leader_start(self, job: Job) -> None:
        if job.exit is not None or job.done.done():
            return
        st = procfs.read_stat(job.record.pid)
        if st is not None and st.pgid == job.pgid:
            job.record.leader_start = st.start_ticks
            self._save(job.record)

    async def _record_new(self, record: JobRecord) -> None:
        """Insert a job and wait for the (shared) commit: durable before we answer."""
        try:
            self.store.insert(record)
            await self._commit_soon()
        except sqlite3.Error as e:
            raise Unavailable(f"the job history cannot be written ({e}); the job was not "
                              "started", rule="history-write-failed") from None

    def _commit_soon(self) -> asyncio.Future[None]:
        """Group commit: every change made in this loop iteration, in one COMMIT."""
        if self._commit_future is None:
            self._commit_future = self.loop.create_future()
            self.loop.call_soon(self._do_commit)
        return self._commit_future

    def _do_commit(self) -> None:
        fut, self._commit_future = self._commit_future, None
        batch, self._batch = self._batch, []
        assert fut is not None
        try:
            self.store.commit()
        except sqlite3.Error as e:
            log.error("cannot commit the job history (%s); will retry", e)
            with contextlib.suppress(sqlite3.Error):
                self.store.rollback()
            for rec in batch:
                self._unsaved[rec.id] = rec
            fut.set_exception(e)
            fut.exception()  # retrieved: updates are retried, starts were told
            return
        for rec in batch:
            self._unsaved.pop(rec.id, None)
        fut.set_result(None)

    def _watch(self, job: Job) -> None:
        assert job.pidfd is not None and job.pipe_fd is not None
        self.loop.add_reader(job.pidfd, self._on_exit, job)
        self.loop.add_reader(job.pipe_fd, self._on_output, job)

    # ------------------------------------------------------------ output

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
        if job.discarding:
            return
        rec = job.record
        if job.out_fd is None:
            try:
                job.out_fd = os.open(rec.output_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as e:
                job.discarding = True
                self._terminate(job, f"its output file could not be created: "
                                     f"{describe_oserror(e)}")
                return
        cap = job.limits.get("output_bytes", 0)
        if cap and rec.output_bytes + len(data) > cap:
            data = data[: cap - rec.output_bytes]
            job.discarding = True
            rec.output_truncated = True
        view = memoryview(data)
        try:
            while view:
                n = os.write(job.out_fd, view)
                view = view[n:]
                rec.output_bytes += n
        except OSError as e:
            # Disk full (or quota, or I/O error): this job fails, clearly;
            # the agent and every other job carry on.
            job.discarding = True
            self._terminate(job, f"its output could not be written: {describe_oserror(e)}")
        job.wake_output_waiters()
        if rec.output_truncated and not job.terminating and self.settings.on_output_cap == "kill":
            self._terminate(job, f"its output reached the cap of {cap} bytes")

    def _close_output(self, job: Job) -> None:
        if job.pipe_fd is not None:
            self.loop.remove_reader(job.pipe_fd)
            os.close(job.pipe_fd)
            job.pipe_fd = None
        if job.out_fd is not None:
            os.close(job.out_fd)
            job.out_fd = None
        job.output_closed = True
        job.wake_output_waiters()
        if job.exit is not None:
            self._finish(job)

    # ------------------------------------------------------------ exit

    def _on_exit(self, job: Job) -> None:
        assert job.pidfd is not None
        # The leader is a zombie now, so its pid (the group id) cannot be
        # reused yet: this is the last moment signalling the group is safe.
        # A job is its process group; what it leaves behind is killed.
        self.ops.kill_group(job.pgid, signal.SIGKILL)
        ended = self.ops.reap(job.record.pid)
        if ended is None:  # not actually exited (should not happen with a pidfd)
            return
        self.loop.remove_reader(job.pidfd)
        os.close(job.pidfd)
        job.pidfd = None
        job.exit = ended
        if job.output_closed:
            self._finish(job)
        else:
            self._on_output(job)
            if not job.output_closed:
                job.timers.append(self.loop.call_later(OUTPUT_CLOSE_GRACE, self._force_close, job))

    def _force_close(self, job: Job) -> None:
        if not job.output_closed:
            log.info("job %s: output still open %.0fs after exit (an escaped process holds "
                     "it); closing", job.id, OUTPUT_CLOSE_GRACE)
            self._on_output(job)
            if not job.output_closed:
                self._close_output(job)

    def _finish(self, job: Job) -> None:
        if job.done.done():
            return
        for t in job.timers:
            t.cancel()
        job.timers.clear()
        ex = job.exit
        assert ex is not None
        rec = job.record
        target = final_state(exit_code=ex.exit_code, signal=ex.signal,
                             stop_requested=job.stop_requested, timed_out=job.timed_out)
        how = describe_exit(ex.exit_code, ex.signal)
        if job.timed_out:
            text = f"timed out after {rec.timeout_seconds} s ({how})"
        elif job.stop_requested:
            text = f"stopped by request ({how})"
        elif job.kill_reason:
            target = JobState.FAILED
            text = f"the agent stopped the job: {job.kill_reason} ({how})"
        elif target is JobState.SUCCEEDED:
            text = ""
        else:
            text = how
            if ex.signal == signal.SIGXCPU:
                text += f" (CPU time limit of {job.limits.get('cpu_seconds')} s reached)"
            text = _trampoline_exec_failure(rec, ex) or text
        self._transition(rec, target)
        rec.end_time = time.time()
        rec.exit_code = ex.exit_code
        rec.signal = ex.signal
        rec.error_text = text
        rec.user_cpu, rec.system_cpu, rec.max_rss = ex.user_cpu, ex.system_cpu, ex.max_rss
        self.running.pop(rec.id, None)
        if job.kill_reason != "not recorded":
            self._save(rec)
        job.done.set_result(rec)
        job.wake_output_waiters()
        self._on_change()
        self._on_finish(rec)

    @staticmethod
    def _transition(rec: JobRecord, target: JobState) -> None:
        check_transition(rec.state, target)
        log.debug("job %s: %s -> %s", rec.id, rec.state.name, target.name)
        rec.state = target

    def _save(self, rec: JobRecord) -> None:
        try:
            self.store.update(rec)
        except sqlite3.Error as e:
            log.error("job %s: cannot write its final state to the history (%s); will retry",
                      rec.id, e)
            self._unsaved[rec.id] = rec
            return
        self._batch.append(rec)
        if self._loop is not None:
            self._commit_soon()
        else:  # outside the loop (recovery at start-up): commit now
            try:
                self.store.commit()
                self._batch.clear()
                self._unsaved.pop(rec.id, None)
            except sqlite3.Error as e:
                log.error("cannot commit the job history (%s); will retry", e)
                self._unsaved[rec.id] = rec

    # ------------------------------------------------------------ stop / timeout

    def _terminate(self, job: Job, reason: str) -> None:
        """SIGTERM the job's group now, SIGKILL it after the grace period."""
        if not job.kill_reason and not job.stop_requested and not job.timed_out:
            job.kill_reason = reason
        if job.terminating or job.exit is not None:
            return
        job.terminating = True
        self.ops.kill_group(job.pgid, signal.SIGTERM)
        job.timers.append(self.loop.call_later(self.settings.stop_grace, self._kill, job))

    def _kill(self, job: Job) -> None:
        if job.exit is None:
            self.ops.kill_group(job.pgid, signal.SIGKILL)

    def _on_timeout(self, job: Job) -> None:
        if job.exit is None and not job.stop_requested:
            job.timed_out = True
            log.info("job %s timed out after %d s", job.id, job.record.timeout_seconds)
            self._terminate(job, "timeout")

    def stop(self, job_id: str, identity: str) -> JobRecord:
        """Stop a job (SIGTERM, SIGKILL after the grace). A finished job is fine."""
        job = self.running.get(job_id)
        if job is None:
            return self.get(job_id, identity)
        self._authorize(job.record, identity)
        if job.exit is None and not job.timed_out:
            job.stop_requested = True
            job.kill_reason = ""
            self._terminate(job, "stop")
        return job.record

    # ------------------------------------------------------------ query

    def _authorize(self, rec: JobRecord, identity: str) -> None:
        if rec.owner != identity and identity not in self.settings.admins:
            raise PermissionDenied(f"job {rec.id} belongs to another identity",
                                   rule="not-job-owner")

    def _lookup(self, job_id: str) -> JobRecord:
        job = self.running.get(job_id)
        if job is not None:
            return job.record
        rec = self._unsaved.get(job_id) or self.store.get(job_id)
        if rec is None:
            raise NotFound(f"no job with id {job_id}", rule="unknown-job")
        return rec

    def get(self, job_id: str, identity: str) -> JobRecord:
        """A job's record, if the caller may see it."""
        rec = self._lookup(job_id)
        self._authorize(rec, identity)
        return rec

    async def wait(self, job_id: str, identity: str, timeout: float | None) -> JobRecord:
        """The record once the job is done, or as it is when ``timeout`` passes."""
        rec = self.get(job_id, identity)
        job = self.running.get(job_id)
        if job is None or rec.state.done:
            return rec
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(asyncio.shield(job.done), timeout)
        return job.record

    def list_jobs(self, identity: str, *, states: Sequence[JobState] = (), owner: str = "",
             page_size: int = 100, page_token: str = "") -> tuple[list[JobRecord], str]:
        """Jobs the caller may see, newest first; returns (jobs, next token)."""
        admin = identity in self.settings.admins
        if owner and owner != identity and not admin:
            raise PermissionDenied("only an admin may list another identity's jobs",
                                   rule="list-other-owner")
        if not admin:
            owner = identity
        if page_size > 1000:
            raise InvalidArgument("pageSize must be at most 1000", rule="page-size")
        size = page_size or 100
        before = _decode_token(page_token) if page_token else None
        recs = self.store.list_jobs(states=states, owner=owner or None, before_seq=before,
                               limit=size + 1)
        more = len(recs) > size
        recs = recs[:size]
        out = [self.running[r.id].record if r.id in self.running else r for r in recs]
        return out, (_encode_token(recs[-1].seq) if more and recs else "")

    # ------------------------------------------------------------ output streaming

    async def stream(self, job_id: str, identity: str, offset: int,
                     follow: bool) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (offset, data) chunks of a job's output from ``offset``.

        Reads from the output file, never from the job: readers do not slow
        the job or each other, and each one may start anywhere.
        """
        rec = self.get(job_id, identity)
        if not 0 <= offset <= MAX_STREAM_OFFSET:
            raise InvalidArgument(f"offset must be at most {MAX_STREAM_OFFSET}",
                                  rule="bad-offset")
        fd = -1
        try:
            pos = offset
            while True:
                if fd < 0:
                    try:
                        fd = os.open(rec.output_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    except FileNotFoundError:
                        # No file: the job has written nothing yet (the file is
                        # made at its first byte), or retention removed it.
                        job = self.running.get(job_id)
                        if job is None or job.output_closed:
                            if rec.output_bytes:
                                raise FailedPrecondition(
                                    f"the output of job {job_id} is no longer available",
                                    rule="output-missing") from None
                            return
                        if not follow:
                            return
                        await job.wait_output(0)
                        continue
                data = os.pread(fd, STREAM_CHUNK, pos)
                if data:
                    yield pos, data
                    pos += len(data)
                    continue
                # No await since the read: if the output is closed now, the
                # read above saw the final end of the file.
                job = self.running.get(job_id)
                if not follow or job is None or job.output_closed:
                    return
                await job.wait_output(pos)
        finally:
            if fd >= 0:
                os.close(fd)

    # ------------------------------------------------------------ recovery / retention

    def recover(self) -> list[JobRecord]:
        """Mark jobs left RUNNING by a dead agent as LOST and kill their processes.

        Must run before the first start(). Only processes that provably
        belong to those jobs (see ``agent.procfs``) or carry this agent's
        instance marker are signalled.
        """
        lost = self.store.running()
        now = time.time()
        # Processes of an earlier boot are gone; their pids mean nothing now.
        this_boot = [procfs.LostJob(r.id, r.pid, r.leader_start) for r in lost
                     if r.boot_id == _BOOT_ID]
        marker = f"{INSTANCE_ENV}={self.settings.instance}".encode()
        killed = 0
        for pid in procfs.leftover_processes(this_boot, marker):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        for rec in lost:
            self._transition(rec, JobState.LOST)
            rec.end_time = now
            rec.error_text = ("the agent stopped while this job was running; its outcome is "
                              "unknown and its processes were killed at the next start")
            with contextlib.suppress(OSError):
                rec.output_bytes = os.stat(rec.output_path).st_size
            self._save(rec)
        if lost or killed:
            log.warning("recovered %d job(s) left running by a previous agent as LOST; "
                        "killed %d leftover process(es)", len(lost), killed)
        return lost

    def sweep(self, now: float | None = None, *, max_batches: int = 0) -> int:
        """Apply retention; retry unsaved records. Returns jobs removed.

        With ``max_batches`` it stops after that many batches of 500 and
        sets ``sweep_more`` (so the event loop is never held for long).
        """
        for rec in list(self._unsaved.values()):
            self._save(rec)
        s = self.settings
        self.sweep_more = False
        if not (s.retention_max_age or s.retention_max_jobs):
            return 0
        removed = 0
        batches = 0
        while True:
            if max_batches and batches >= max_batches:
                self.sweep_more = True
                break
            batches += 1
            victims = self.store.expired(max_age_seconds=s.retention_max_age,
                                         max_jobs=s.retention_max_jobs, now=now)
            victims = [(i, p) for i, p in victims if i not in self.running]
            if not victims:
                break
            for _, path in victims:
                self._remove_output(path)
            self.store.delete([i for i, _ in victims])
            removed += len(victims)
        if removed:
            log.info("retention removed %d finished job(s)", removed)
        return removed

    def _remove_output(self, path: str) -> None:
        """Delete a job's output file, but only one the agent made and owns."""
        p = Path(path)
        out_dir = self.settings.output_dir
        # Only <uuid>.out directly inside our output directory, a regular
        # file (not a link) owned by our user: never anything else.
        if p.parent != out_dir or not p.name.endswith(".out"):
            log.warning("retention: not removing %s (outside %s)", p, out_dir)
            return
        try:
            uuid.UUID(p.name[:-4])
            st = os.lstat(p)
        except (ValueError, FileNotFoundError):
            return
        if not (st.st_mode & 0o170000 == 0o100000 and st.st_uid == os.geteuid()):
            log.warning("retention: not removing %s (not a regular file of ours)", p)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)

    # ------------------------------------------------------------ shutdown

    async def shutdown(self, *, mode: str, deadline: float) -> None:
        """Stop taking jobs; wait for or stop the running ones; return when all ended."""
        self.accepting = False
        jobs = list(self.running.values())
        if not jobs:
            return
        if mode == "wait" and deadline > 0:
            log.info("waiting up to %.0f s for %d running job(s)", deadline, len(jobs))
            await asyncio.wait([j.done for j in jobs], timeout=deadline)
        for job in list(self.running.values()):
            if job.exit is None:
                job.stop_requested = True
                self._terminate(job, "agent shutdown")
        pending = [j.done for j in self.running.values()]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.stop_grace + OUTPUT_CLOSE_GRACE + 5)


_BOOT_ID = procfs.boot_id()


def _trampoline_exec_failure(rec: JobRecord, ex: Exit) -> str:
    """Recognise setpriv's or prlimit's report that it could not execute the program."""
    if ex.exit_code not in (126, 127):
        return ""
    try:
        with open(rec.output_path, "rb") as f:
            head = f.read(512).decode("utf-8", "replace")
    except OSError:
        return ""
    for tool in ("setpriv", "prlimit"):
        if head.startswith(f"{tool}: failed to execute"):
            return "start failed: " + head.splitlines()[0].split(": ", 2)[-1]
    return ""


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        tag, _, num = raw.partition(":")
        # At most 18 ASCII digits: a sequence number SQLite can hold (a
        # longer one would raise OverflowError in the query, not be refused).
        if tag != "v1" or not (num.isascii() and num.isdigit()) or len(num) > 18:
            raise ValueError
        return int(num)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("pageToken is not one this agent issued",
                              rule="bad-page-token") from None


def instance_id(state_dir: Path) -> str:
    """A stable id for an agent installation (its canonical state directory)."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
