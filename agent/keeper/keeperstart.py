"""A start in the job keeper: the request checked, decided, spawned, answered.

The keeper decides every start (:mod:`agent.keeper.decision`): the agent sends only who
asks (the caller's identity, as the agent saw it) and what (the request): never a plan,
a user, capabilities or descriptors. The keeper answers "refused" (nothing started) or
"admitted" (with what the record needs, which it completes itself), then makes the
job's output file and pipe, hands the plan to the spawner and answers "started" once the
spawner reports the child (:meth:`Starter.on_spawned`).

:func:`start_problem` is pure: what is malformed in a start message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import selectors
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.keeper import lifecycle as lc
from agent.keeper import spawnproto as proto
from agent.keeper.decision import Decided, Decider, LoadError, request_from_wire
from agent.keeper.errors import AgentError
from agent.keeper.keeperlog import log
from agent.keeper.keptjobs import JOB_ID, READ_CHUNK, KeptJob
from agent.keeper.outputfile import OutputFile
from agent.keeper.spawnplan import plan_of

if TYPE_CHECKING:
    from agent.keeper.keeperconn import AgentLink
    from agent.keeper.keeperfiles import JobFiles
    from agent.keeper.keeperuids import UidHolds
    from agent.keeper.keptjobs import Kept
    from agent.keeper.spawner import Spawner

# A running job's record as the agent gave it: kept and handed back, never read.
RECORD_MAX = 1 << 20
# What a start may carry (a plan, a run or descriptors are the keeper's own to make).
START_KEYS = frozenset({"op", "id", "job", "request", "record", "fds"})
KEEPER_STOP = "the job keeper's stop"  # "stopped by the job keeper's stop (signal 15)"
INTERNAL_ERROR = "internal error in the job keeper (see the agent's log)"


def start_problem(msg: dict[str, Any], fds: dict[str, int], exists: Callable[[str], bool]) -> str:
    """What is malformed in a start ("" when nothing is); ``exists``: whether a job of
    that id is kept already."""
    rid, job_id, record = msg.get("id"), msg.get("job"), msg.get("record")
    if not isinstance(rid, int) or isinstance(rid, bool):
        return "malformed start: id"
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        return "malformed start: job"
    if exists(job_id):
        return f"job {job_id} exists already"
    if set(msg) - START_KEYS:
        return "malformed start: unknown keys"
    if fds:
        return "malformed start: descriptors (the keeper opens the job's files itself)"
    if not isinstance(record, dict) or len(str(record)) > RECORD_MAX:
        return "malformed start: record"
    return ""


class Starter:
    """The start path: decision, then spawn. ``closing``: the keeper's service was told
    to stop, no new start is taken (and a job spawned meanwhile is stopped)."""

    def __init__(
        self,
        spawner: Spawner,
        *,
        kept: Kept,
        link: AgentLink,
        holds: UidHolds,
        files: JobFiles,
        decider: Decider | None,
        file_owner: int,
    ) -> None:
        self.spawner, self.kept, self.link, self.holds, self.files = (
            spawner,
            kept,
            link,
            holds,
            files,
        )
        # The policy and settings every start is decided with (None: no --config, every
        # start refused).
        self.decider = decider
        self.file_owner = file_owner
        self.closing = False
        self.rids = itertools.count(1)

    def exists(self, job_id: str) -> bool:
        k = self.kept
        return job_id in k.jobs or job_id in k.ended or k.starting(job_id)

    def refuse(self, rid: Any, job_id: Any, kind: str, rule: str, message: str) -> None:
        self.link.tell(
            {
                "op": "refused",
                "id": rid,
                "job": job_id,
                "kind": kind,
                "rule": rule,
                "message": message,
            }
        )

    def started_error(self, rid: int, job_id: str, error: str, code: int) -> None:
        self.link.tell({"op": "started", "id": rid, "job": job_id, "error": error, "errno": code})

    def start(self, msg: dict[str, Any], fds: dict[str, int]) -> None:
        """A start: who asks and what (never a plan). The keeper decides it (the policy,
        the limits, the timeout), answers "refused" or "admitted", then spawns."""
        rid, job_id, record = msg.get("id"), msg.get("job"), msg.get("record")
        why = start_problem(msg, fds, self.exists)
        req = why or request_from_wire(msg.get("request"))
        if isinstance(req, str):
            self.refuse(rid, job_id, "INTERNAL", "malformed-start", req)
            return
        assert isinstance(rid, int) and isinstance(job_id, str) and isinstance(record, dict)
        decided = self.decide(rid, job_id, req)
        if decided is None:
            return
        uid = None
        if decided.spec.dynamic_user:
            uid = self.take_uid(rid, job_id, decided)
            if uid is None:
                return
        # The record is completed here, from the decision: what the next agent is
        # handed (hello) says what really runs.
        record.update(
            command=decided.executable, timeout_seconds=decided.timeout, limits=decided.limits
        )
        admitted = {
            "op": "admitted",
            "id": rid,
            "job": job_id,
            "command": decided.executable,
            "timeout": decided.timeout,
            "limits": decided.limits,
            "entry": decided.entry,
        }
        if "admitted+started" in self.link.features:
            # Said with the pid when the spawn answers at once (the vfork path), else
            # before whatever is said next: one message, one wakeup of the agent, less.
            self.link.hold(admitted)
        else:
            self.link.tell(admitted)
        try:
            self.spawn_admitted(rid, job_id, record, decided, uid)
        except Exception:
            import traceback

            log(f"internal error starting job {job_id}:\n{traceback.format_exc()}")
            if job_id not in self.kept.jobs and not self.kept.starting(job_id):
                self.holds.release(job_id, ran=True)
            if job_id not in self.kept.jobs:
                self.started_error(rid, job_id, INTERNAL_ERROR, errno.EIO)
        finally:
            self.link.flush()  # the fork path's spawn answers later

    def failed(self, msg: dict[str, Any]) -> None:
        """A start that raised before it was answered: refused, unless it runs or is in
        the spawner's hands (then "started" or its end says what happened)."""
        rid, job_id = msg.get("id"), msg.get("job")
        job = next((j for j in self.kept.by_rid.values() if j.rid == rid), None)
        if job is None and job_id not in self.kept.jobs:
            self.refuse(rid, job_id, "INTERNAL", "keeper-internal-error", INTERNAL_ERROR)

    def decide(self, rid: int, job_id: str, req: Any) -> Decided | None:
        """The decision of a well-formed start (None: refused, and said so)."""
        if self.closing:
            self.refuse(
                rid,
                job_id,
                "UNAVAILABLE",
                "keeper-stopping",
                "not started: the job keeper is stopping (its service was told to stop)",
            )
            return None
        if self.decider is None:
            self.refuse(
                rid,
                job_id,
                "FAILED_PRECONDITION",
                "no-policy",
                "not started: the job keeper has no policy (it was started without --config)",
            )
            return None
        try:
            return self.decider.decide(job_id, req)
        except AgentError as e:
            self.refuse(rid, job_id, e.kind.name, e.rule, e.message)
            return None

    def take_uid(self, rid: int, job_id: str, decided: Decided) -> int | None:
        """The dynamic uid of an admitted job (None: none free, refused and said so)."""
        uid = self.holds.take(job_id)
        if uid is not None:
            return uid
        for fd in (decided.spec.exec_fd, decided.spec.script_fd):
            if fd is not None:
                os.close(fd)
        pool = self.holds.pool
        if pool is None:
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
                f"({pool.lo}-{pool.hi}) is held by a running job",
            )
        return None

    def spawn_admitted(
        self, rid: int, job_id: str, record: dict[str, Any], decided: Decided, uid: int | None
    ) -> None:
        """The output file and pipe of an admitted job, then the spawn (as ``uid``, its
        dynamic user, when it has one)."""
        plan, roles, kid_fds = plan_of(decided.spec)
        if uid is not None:
            plan["uid"] = plan["gid"] = uid
            plan["env"]["USER"] = plan["env"]["LOGNAME"] = str(uid)
        theirs = {r: fd for r, fd in zip(roles, kid_fds, strict=True) if r != "stdout"}
        run = decided.run.to_wire()
        path = os.path.join(self.files.output_dir, f"{job_id}.out")
        out = OutputFile(path, run["cap"], self.file_owner)
        try:
            out.reserve()
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except (AgentError, OSError) as e:
            out.close()
            for fd in theirs.values():
                os.close(fd)
            self.holds.release(job_id, ran=False)
            code = getattr(e, "errno", None) or errno.EMFILE
            self.started_error(rid, job_id, proto.error_text("output", code), code)
            return
        # The child gets a blocking write end: a job must not see EAGAIN on stdout just
        # because the keeper is momentarily behind.
        os.set_blocking(w, True)
        with contextlib.suppress(OSError):
            fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, READ_CHUNK)
        job = KeptJob(job_id, rid, self.link.gen, run, out)
        job.rfd = r
        job.record = record
        theirs["stdout"] = w
        self.spawn(job, plan, theirs)

    def spawn(self, job: KeptJob, plan: dict[str, Any], theirs: dict[str, int]) -> None:
        kid = next(self.rids)
        self.kept.by_rid[kid] = job
        # The spawner's checks and spawn; its answer comes back through send(). It
        # closes the descriptors it took (and clears them); what is left is ours.
        try:
            self.spawner.spawn({"op": "spawn", "id": kid, "plan": plan}, theirs)
        except BaseException:
            if self.kept.by_rid.pop(kid, None) is not None:  # never answered: nothing runs
                os.close(job.rfd)
                job.rfd = -1
                job.out.close()
            raise
        finally:
            for fd in theirs.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def on_spawned(self, msg: dict[str, Any]) -> None:
        """The spawner's answer to a spawn: the job runs (kept from now on), or it did
        not start."""
        job = self.kept.by_rid.pop(msg["id"])
        if "pid" not in msg:
            self.not_spawned(job, msg)
            return
        job.pid = msg["pid"]
        self.kept.jobs[job.id] = job
        self.kept.by_pid[job.pid] = job
        uid = self.holds.of(job.id)
        if uid is not None:
            self.spawner.job_users[job.pid] = (uid, uid)
        self.spawner.sel.register(job.rfd, selectors.EVENT_READ, job)
        if job.life.timeout_seconds:
            self.kept.arm(job, job.life.timeout_seconds, lc.TimedOut())
        kept = self.spawner.subtree is not None  # adopted after this keeper's death
        if job.gen == self.link.gen:
            held = self.link.take_held(job.rid)
            if held is not None:
                answer = {**held, "pid": job.pid}
            else:
                answer = {"op": "started", "id": job.rid, "job": job.id, "pid": job.pid}
            if kept and self.files.pipes_told(self.link):
                answer["fds"] = ["pipe"]
                job.stored = self.link.tell(answer, [job.rfd])
            else:
                self.link.tell(answer)
        # After the answer (the StartJob waits for it, not for these): what a keeper that
        # adopts the job after this one's death needs. Written in the same turn, so the
        # window in which a kill -9 of this keeper leaves a job without them is no wider
        # than before (it was already open from the spawn to here).
        if kept:
            self.files.write(job, uid, self.spawner.job_users.get(job.pid))
            if self.files.fdstore and not job.stored:
                self.files.push(job)
        if self.closing:  # started while the service was told to stop: stopped as the rest
            self.kept.handle(job, lc.ShutdownRequested(KEEPER_STOP))

    def not_spawned(self, job: KeptJob, msg: dict[str, Any]) -> None:
        os.close(job.rfd)
        job.rfd = -1
        job.out.close()
        # A child that failed before its exec: it ran only the keeper's set-up.
        self.holds.release(job.id, ran=False)
        error = str(msg.get("error", "unknown error"))
        if job.gen == self.link.gen and self.link.sock is not None:
            self.started_error(job.rid, job.id, error, msg.get("errno", errno.EIO))
            return
        # Its agent went away meanwhile: the next one learns of it as a finished job.
        ex = lc.Exit(exit_code=None, signal=None, start_failure=error, end_time=time.time())
        self.kept.handle(job, lc.OutputClosed())  # it never had any
        self.kept.handle(job, lc.Exited(ex))

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
            answer["entries"], warnings, unheld = self.decider.reload()
            for w in unheld:
                log(w)
            answer["warnings"] = [*warnings, *unheld]
        except (LoadError, OSError) as e:
            answer["error"] = str(e)
            log(f"policy reload rejected, keeping the current policy: {e}")
        self.link.tell(answer)
