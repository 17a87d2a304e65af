"""An agent attaching to a job keeper that was running already: it takes over the
jobs the keeper kept while no agent was attached, and records the ends it missed.
"""

from __future__ import annotations

import logging

from agent.daemon.history import JobRecord, record_from_wire
from agent.daemon.keeperwire import Finished, Hello
from agent.daemon.supervisor import Job, Supervisor
from agent.keeper.errors import Unavailable
from agent.vocabulary import JobState

log = logging.getLogger(__name__)


def adopt(sup: Supervisor, hello: Hello) -> set[str]:
    """Take over what a keeper kept while no agent was attached: mirror every job it
    still runs and record every one that ended meanwhile. Returns the ids of the jobs
    the history must not call LOST (start-up recovery then takes care of the rest).

    A job whose record never reached the history (the agent died between its insert
    and the commit) is recorded from the copy the keeper kept.
    """
    known: set[str] = set()
    for kept in hello.jobs:
        rec = sup.history.get(kept.job_id) or _recorded_copy(sup, kept.record)
        if rec is None or rec.state is not JobState.RUNNING:
            log.error("job %s: kept by the keeper but not running here; stopping it", kept.job_id)
            sup.ops.stop(kept.job_id, "kill")
            continue
        rec.pid = kept.pid
        rec.output_bytes = kept.size
        rec.output_truncated = kept.truncated
        job = Job(rec, sup)
        job.live.size = kept.size
        if kept.ending:
            job.ending = sup.loop.time()
        sup.running[rec.id] = job
        sup.ops.watch(rec.id, job)
        known.add(rec.id)
    for fin in hello.ended:
        known.add(fin.job_id)
        record_ended(sup, fin)
    if hello.jobs or hello.ended:
        log.info(
            "attached to the job keeper: %d job(s) still running, %d ended while no "
            "agent was attached",
            len(hello.jobs),
            len(hello.ended),
        )
    return known


def record_ended(sup: Supervisor, fin: Finished) -> None:
    """Record a job that ended while no agent was attached (or whose end this agent
    never saw); acknowledge it to the keeper once written."""
    rec = sup.history.get(fin.job_id) or _recorded_copy(sup, fin.record)
    if rec is None:
        log.error("job %s: ended, but its record is lost", fin.job_id)
        sup.ops.ack(fin.job_id)
        return
    if rec.state is not JobState.RUNNING:  # recorded before the agent died
        sup.ops.ack(fin.job_id)
        return
    job = Job(rec, sup)
    sup.finish(job, fin)


def _recorded_copy(sup: Supervisor, blob: dict[str, object]) -> JobRecord | None:
    """Insert the keeper's copy of a record the history does not have."""
    if not blob:
        return None
    try:
        rec = record_from_wire(dict(blob))
    except ValueError as e:
        log.error("a job record from the keeper is not one: %s", e)
        return None
    try:
        sup.history.insert_now(rec)
    except Unavailable as e:
        log.error("job %s: cannot record it: %s", rec.id, e)
        return None
    return rec
