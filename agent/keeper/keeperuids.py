"""The dynamic uids the job keeper's jobs hold ([jobs] dynamic_users): which job holds
which uid, taken at its start (or its adoption) and given back at its end."""

from __future__ import annotations

from agent.keeper import uids
from agent.keeper.keeperlog import log


class UidHolds:
    """Job id -> its dynamic uid, until released, from ``pool`` (None: dynamic users were
    off at the keeper's start; the range is read once: the keeper's own seccomp filter
    allows that range and no other, see agent.keeper.keeper.main)."""

    def __init__(self, pool: uids.Pool | None) -> None:
        self.pool = pool
        self.dynamic: dict[str, int] = {}  # job id -> its dynamic uid, until released

    def take(self, job_id: str) -> int | None:
        """A free uid for the job (None: no pool, or every uid is held)."""
        uid = self.pool.take() if self.pool is not None else None
        if uid is not None:
            self.dynamic[job_id] = uid
        return uid

    def hold(self, job_id: str, uid: int) -> None:
        """The job holds ``uid`` already (adopted, or kept across the upgrade): whatever
        the range is now, no other job is given it."""
        self.dynamic[job_id] = uid
        if self.pool is not None:
            self.pool.held.add(uid)

    def of(self, job_id: str) -> int | None:
        return self.dynamic.get(job_id)

    def release(self, job_id: str, *, ran: bool) -> None:
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
