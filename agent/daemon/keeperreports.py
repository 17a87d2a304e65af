"""What the agent has in the job keeper's hands, and the keeper's reports sent to it.

The starts waiting for the keeper's answer, the policy reloads waiting for theirs, and
each running job's sink (the supervisor's mirror of the job) and pid. The keeper's
messages (:meth:`Outstanding.dispatch`) answer the first two and report on the jobs;
when the keeper dies, what waits fails (:meth:`Outstanding.fail_waiting`), the jobs a
new keeper holds go on (:meth:`Outstanding.readopt`) and the others are killed and end
FAILED (:meth:`Outstanding.lose`). The socket and the keeper's death are
:mod:`agent.daemon.keeperclient`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from agent.daemon.keeperwire import Admission, Finished, Hello, Kept, Stopper, refusal
from agent.keeper.cgroups import Subtree
from agent.keeper.errors import SpawnFailure
from agent.keeper.lifecycle import Exit
from agent.keeper.spawn import kill_job_cgroup
from agent.vocabulary import JobState

# Its log lines are the keeper client's, as before this module was split from it.
log = logging.getLogger("agent.daemon.keeperclient")

KEEPER_DIED = "the job keeper died; the job's processes were killed"


class JobSink(Protocol):
    """Where the keeper's reports about one job go (the supervisor's job mirror)."""

    def on_output(self, size: int, truncated: bool) -> None: ...
    def on_ending(self) -> None: ...
    def on_finished(self, fin: Finished) -> None: ...


class Outstanding:
    """The starts, reloads and running jobs this agent has in the keeper's hands."""

    def __init__(
        self,
        stopper: Stopper,
        cgroups: Subtree | None,
        on_unknown_finished: Callable[[Finished], None] | None,
    ) -> None:
        self._stopper = stopper  # who stops a job the agent will not record
        self._cgroups = cgroups
        self.on_unknown_finished = on_unknown_finished
        # Reports on a job are scheduled on this loop (set once the agent reads reports).
        self.loop: asyncio.AbstractEventLoop | None = None
        # request id -> (admitted, started, job id, sink) of a start not yet answered
        self._starts: dict[
            int, tuple[asyncio.Future[Admission], asyncio.Future[int], str, JobSink]
        ] = {}
        self._reloads: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.sinks: dict[str, JobSink] = {}
        self.pids: dict[str, int] = {}  # job id -> pid, while it runs (for a keeper's death)
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "output": self._output,
            "ending": self._ending,
            "refused": self._refused,
            "admitted": self._admitted,
            "started": self._started,
            "reloaded": self._reloaded,
            "finished": lambda msg: self.end(Finished.from_wire(msg)),
        }

    # ------------------------------------------------------------ what waits

    def add_start(
        self,
        rid: int,
        admitted: asyncio.Future[Admission],
        started: asyncio.Future[int],
        job_id: str,
        sink: JobSink,
    ) -> None:
        """Start ``rid`` (job ``job_id``, reports to ``sink``) waits for the keeper."""
        self._starts[rid] = (admitted, started, job_id, sink)

    def add_reload(self, rid: int, fut: asyncio.Future[dict[str, Any]]) -> None:
        self._reloads[rid] = fut

    def drop_reload(self, rid: int) -> None:
        self._reloads.pop(rid, None)

    def kept(self, jobs: Iterable[Kept]) -> None:
        """The keeper's hello lists these jobs running (their pids, for its death)."""
        for kept in jobs:
            self.pids[kept.job_id] = kept.pid

    # ------------------------------------------------------------ the keeper's reports

    def dispatch(self, msg: dict[str, Any]) -> None:
        """One message of the keeper's. Raises KeyError/TypeError/ValueError when it is
        malformed."""
        op = msg["op"]
        handler = self._handlers.get(op)
        if handler is None:
            log.warning("unknown message from the job keeper: %.40s", op)
        else:
            handler(msg)

    def _output(self, msg: dict[str, Any]) -> None:
        for job_id, size, truncated in msg["jobs"]:
            sink = self.sinks.get(job_id)
            if sink is not None:
                sink.on_output(int(size), bool(truncated))

    def _ending(self, msg: dict[str, Any]) -> None:
        sink = self.sinks.get(msg["job"])
        if sink is not None:
            sink.on_ending()

    def _refused(self, msg: dict[str, Any]) -> None:
        admitted, _, _, _ = self._starts.pop(msg["id"])
        if not admitted.done():
            admitted.set_exception(refusal(msg))

    def _admitted(self, msg: dict[str, Any]) -> None:
        admitted, started, job_id, _ = self._starts[msg["id"]]
        if admitted.done():
            # Its start was cancelled before the answer: the job must not run unseen.
            started.cancel()
        else:
            try:
                admitted.set_result(Admission(self._stopper, job_id, started, msg))
            except (KeyError, TypeError, ValueError) as e:
                # Never a hung StartJob: refused here, and the job (if it starts) stopped.
                started.cancel()
                admitted.set_exception(SpawnFailure(errno.EPROTO, f"bad admission: {e}"))
        if "pid" in msg:
            # admitted+started: the start's answer came with its admission.
            self._started(msg)

    def _started(self, msg: dict[str, Any]) -> None:
        admitted, started, job_id, sink = self._starts.pop(msg["id"])
        pid = msg.get("pid")
        if pid is None:
            failure = SpawnFailure(int(msg.get("errno", errno.EIO)), str(msg["error"]))
            _fail_first(admitted, started, failure)
            return
        self.pids[job_id] = int(pid)
        if started.done() or not admitted.done():
            # The start was cancelled: the job must not run unseen (nor be recorded).
            self._stopper.stop(job_id, "not_recorded")
            return
        self.sinks[job_id] = sink
        started.set_result(int(pid))

    def _reloaded(self, msg: dict[str, Any]) -> None:
        reload = self._reloads.get(msg["id"])
        if reload is not None and not reload.done():
            reload.set_result(msg)

    def end(self, fin: Finished) -> None:
        """A job ended: to its sink, or (one the agent does not hold) to be recorded."""
        assert self.loop is not None
        self.pids.pop(fin.job_id, None)
        sink = self.sinks.pop(fin.job_id, None)
        # Scheduled, not called: the task awaiting this job's start (woken by the
        # answer just before) runs first.
        if sink is not None:
            self.loop.call_soon(sink.on_finished, fin)
        elif self.on_unknown_finished is not None and fin.persist:
            self.loop.call_soon(self.on_unknown_finished, fin)

    # ------------------------------------------------------------ the keeper's death

    def fail_waiting(self, why: str, *, kill: bool) -> None:
        """Every start and reload waiting for an answer fails (``why``); ``kill``: the
        processes of those starts are killed too (the agent never learnt their pids)."""
        for admitted, started, job_id, _ in self._starts.values():
            if kill:
                self._kill(job_id, self.pids.pop(job_id, 0))
            _fail_first(admitted, started, SpawnFailure(errno.EIO, why))
        self._starts.clear()
        for reload in self._reloads.values():
            if not reload.done():
                reload.set_exception(OSError(errno.EIO, why))

    def readopt(self, hello: Hello) -> None:
        """After a new keeper's hello: the running jobs it adopted go on (their output size
        as it found it), those that ended meanwhile end, the rest are lost (killed)."""
        assert self.loop is not None
        for kept in hello.jobs:
            sink = self.sinks.get(kept.job_id)
            if sink is None:
                log.warning("job %s: a new job keeper holds it, but not this agent", kept.job_id)
                continue
            sink.on_output(kept.size, kept.truncated)
            if kept.ending:
                sink.on_ending()
        for fin in hello.ended:
            self.end(fin)
        held = {k.job_id for k in hello.jobs}
        self.lose([job_id for job_id in self.sinks if job_id not in held])

    def lose(self, job_ids: list[str] | None = None) -> None:
        """Kill these jobs of a dead keeper (None: every running one) and end them FAILED
        (KEEPER_DIED)."""
        for job_id in list(self.sinks) if job_ids is None else job_ids:
            sink = self.sinks.pop(job_id)
            self._kill(job_id, self.pids.pop(job_id, 0))
            ex = Exit(exit_code=None, signal=None, lost=KEEPER_DIED, end_time=time.time())
            fin = Finished(job_id, JobState.FAILED, KEEPER_DIED, ex, size=-1, truncated=False)
            if self.loop is not None:
                self.loop.call_soon(sink.on_finished, fin)

    def _kill(self, job_id: str, pid: int) -> None:
        """Kill a dead keeper's job: its process group and its cgroup (what left the group)."""
        if pid > 1:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        kill_job_cgroup(self._cgroups, job_id)


def _fail_first(
    admitted: asyncio.Future[Admission], started: asyncio.Future[int], exc: BaseException
) -> None:
    """A start failed: its admission if that is still awaited, else its start."""
    for fut in (admitted, started):
        if not fut.done():
            fut.set_exception(exc)
            break
