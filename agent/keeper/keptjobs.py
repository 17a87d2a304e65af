"""The jobs the keeper holds, each with its output file, its timers and its lifecycle.

The pure :class:`agent.keeper.lifecycle.Life` of each job runs here, with its timers:
the timeout, the grace between SIGTERM and SIGKILL, the output cap's kill, the end of
the output after the exit. So a job times out, is capped and ends with its true status
whether or not an agent is attached. Each finished job's record (state, end text, exit
status, CPU, output size) is kept until the agent says it is durably in the history
(``ack``); an agent that died before that is told again when one attaches.

:class:`Kept` owns the tables of jobs and the timers; what it cannot do itself (say
something to the agent, signal a job, forget what was kept for a job's adoption) it is
given by the keeper that wires it.
"""

from __future__ import annotations

import heapq
import itertools
import os
import re
import selectors
import time
from collections.abc import Callable
from typing import Any

from agent.keeper import cgroups
from agent.keeper import lifecycle as lc
from agent.keeper.keeperlog import guarded, log
from agent.keeper.outputfile import OutputFile

READ_CHUNK = 1 << 20
# After the main process exits, how long to wait for the output pipe to close
# (processes that escaped the group may hold it open).
OUTPUT_CLOSE_GRACE = 2.0
JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STOP_EVENTS: dict[str, Callable[[], lc.Event]] = {
    "stop": lc.StopRequested,
    "shutdown": lc.ShutdownRequested,
    "kill": lc.KillGraceExpired,
    "not_recorded": lc.NotRecorded,
}


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


def finished_message(job: KeptJob, fin: lc.Finish) -> dict[str, Any]:
    """The "finished" the agent is told (and, when it persists, kept until its ack)."""
    return {
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


class Kept:
    """The kept jobs (by id, by pid, by spawn request), their timers, their output's
    progress, and the ends not yet acknowledged.

    ``tell`` says a message to the attached agent (if any); ``signal`` signals a job
    (its process, or its cgroup when adopted); ``forget`` drops what was kept for the
    job's adoption once it has finished."""

    def __init__(
        self,
        sel: selectors.BaseSelector,
        *,
        tell: Callable[[dict[str, Any]], object],
        signal: Callable[[KeptJob, int], None],
        forget: Callable[[KeptJob], None],
    ) -> None:
        self.sel = sel
        self.tell, self.signal, self.forget = tell, signal, forget
        self.jobs: dict[str, KeptJob] = {}  # started (pid known) and not finished
        self.by_pid: dict[int, KeptJob] = {}
        self.by_rid: dict[int, KeptJob] = {}  # handed to the spawner, not yet answered
        self.ended: dict[str, dict[str, Any]] = {}  # finished, not yet acknowledged
        self.heap: list[tuple[float, int, Timer]] = []
        self.seq = itertools.count()
        self.dirty: dict[str, KeptJob] = {}  # output progress not yet told
        self.endings: dict[str, KeptJob] = {}  # "ending" not yet told (end of the turn)

    def starting(self, job_id: str) -> bool:
        return any(j.id == job_id for j in self.by_rid.values())

    # ------------------------------------------------------------ timers

    def arm(self, job: KeptJob, delay: float, event: lc.Event) -> None:
        t = Timer(job, event)
        job.timers.append(t)
        heapq.heappush(self.heap, (time.monotonic() + delay, next(self.seq), t))

    def run_timers(self) -> None:
        now = time.monotonic()
        while self.heap and self.heap[0][0] <= now:
            _, _, t = heapq.heappop(self.heap)
            if not t.cancelled:
                guarded(self.handle, t.job, t.event)

    def next_timer(self) -> float | None:
        """When the next timer is due (time.monotonic()), None when none is."""
        return self.heap[0][0] if self.heap else None

    # ------------------------------------------------------------ a job's life

    def handle(self, job: KeptJob, event: lc.Event) -> None:
        for action in job.life.handle(event):
            self.apply(job, action)

    def apply(self, job: KeptJob, action: lc.Action) -> None:
        if isinstance(action, lc.Signal):
            self.signal(job, action.sig)
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

    def exited(self, job: KeptJob, ex: lc.Exit) -> None:
        """The job's process (or its adopted cgroup) has ended."""
        job.exit = ex
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
        msg = finished_message(job, fin)
        if fin.persist:
            self.ended[job.id] = msg
        self.tell(msg)
        # After the end is told (a waiting query is answered sooner): a keeper killed
        # in between leaves a stored pipe of a job whose leaf is gone (and perhaps its
        # .keeper file); the next keeper closes the one and removes the other.
        self.forget(job)

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

    def hello_jobs(self) -> list[dict[str, Any]]:
        """Every running job as the hello lists it (its progress is then told)."""
        self.dirty.clear()
        return [
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
