"""The dynamic uids the job keeper's jobs hold ([jobs] dynamic_users): which job holds
which uid, taken at its start (or its adoption) and given back at its end, once a helper
of that uid has removed what the uid left (:func:`agent.keeper.uids.reclaim`).

A job whose cgroup leaf was seen empty (the deployments' way) is cleaned up by the C
extension's child (:func:`agent.keeper.uids.reclaim_contained`: a vfork child that becomes
the uid, makes the system calls and exits; 0.26 ms measured), in the loop, before the
uid is released. Otherwise (no job cgroups, or the fork path) a forked helper does it
(3.1 ms measured, most of it copy-on-write faults of the forked keeper) beside the
keeper's loop, not in it: its end is watched through a pidfd in the keeper's selector
(:class:`Reclaim`), so a job's end is reported at once and the other jobs are not held
up by the cleanup. Until the helper has ended well, the uid stays held: no job is given
it meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from agent.keeper import uids
from agent.keeper.keeperlog import log


class Reclaim:
    """A uid's cleanup helper that is running (the keeper's selector watches its pidfd)."""

    __slots__ = ("job_id", "pid", "pidfd", "uid")

    def __init__(self, job_id: str, uid: int, pid: int, pidfd: int) -> None:
        self.job_id, self.uid, self.pid, self.pidfd = job_id, uid, pid, pidfd


class UidHolds:
    """Job id -> its dynamic uid, until released, from ``pool`` (None: dynamic users were
    off at the keeper's start; the range is read once: the keeper's own seccomp filter
    allows that range and no other, see agent.keeper.keeper.main).

    ``watch(fd, reclaim)`` / ``unwatch(fd)``: add a cleanup helper's pidfd to the keeper's
    selector and take it out (without them, each cleanup is waited for at once).
    """

    def __init__(
        self,
        pool: uids.Pool | None,
        watch: Callable[[int, Reclaim], object] | None = None,
        unwatch: Callable[[int], object] | None = None,
        fast: Any = None,
    ) -> None:
        self.pool = pool
        self.watch, self.unwatch = watch, unwatch
        # agent.keeper._vspawn (None: not built, or the fork path chosen): a contained
        # job's cleanup is then its C child's, done before release() returns.
        self.fast = fast
        self.dynamic: dict[str, int] = {}  # job id -> its dynamic uid, until released
        self.reclaiming: dict[int, Reclaim] = {}  # helper pid -> its cleanup

    def take(self, job_id: str) -> int | None:
        """A free uid for the job (None: no pool, or every uid is held)."""
        if self.pool is None:
            return None
        uid = self.pool.take()
        if uid is None and self.reclaiming:
            # Every uid is held, some only by a cleanup still running: waited for (a few
            # ms) rather than refusing a start that a moment later would have had one.
            self.finish()
            uid = self.pool.take()
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

    def release(self, job_id: str, *, ran: bool, contained: bool = False) -> None:
        """Give a job's dynamic uid back; when a process of it ran, only after everything
        that uid still has is gone (uids.reclaim: its processes, IPC objects, message
        queues, shared memory, keyrings), so the next job given the uid inherits nothing.
        ``contained``: the job's cgroup leaf is empty (no /proc scan needed, see
        uids.reclaim_work). A uid whose cleanup failed is never handed out again by this
        keeper (logged)."""
        uid = self.dynamic.pop(job_id, None)
        if uid is None or self.pool is None:
            return
        if not ran:
            self.pool.release(uid)
            return
        if contained and self.fast is not None:
            if uids.reclaim_contained(self.fast, uid):
                self.pool.release(uid)
            else:
                log(f"job {job_id}: uid {uid} could not be cleaned up; it stays out of use")
            return
        pid = uids.start_reclaim(uid, contained=contained)
        if pid is None:
            log(f"job {job_id}: uid {uid} could not be cleaned up; it stays out of use")
            return
        pidfd = -1
        if self.watch is not None:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                pidfd = -1
        r = Reclaim(job_id, uid, pid, pidfd)
        if pidfd < 0:
            self.reclaimed(r)  # nothing to watch it with: waited for now
            return
        self.reclaiming[pid] = r
        assert self.watch is not None
        self.watch(pidfd, r)

    def reclaimed(self, r: Reclaim) -> None:
        """A cleanup helper ended (its pidfd is readable): reaped, and its uid back in the
        pool if it did everything."""
        self.reclaiming.pop(r.pid, None)
        if r.pidfd >= 0:
            if self.unwatch is not None:
                self.unwatch(r.pidfd)
            os.close(r.pidfd)
        try:
            _, status = os.waitpid(r.pid, 0)
            ok = os.waitstatus_to_exitcode(status) == 0
        except ChildProcessError:
            ok = False
        if not ok:
            log(f"job {r.job_id}: uid {r.uid} could not be cleaned up; it stays out of use")
        elif self.pool is not None:
            self.pool.release(r.uid)

    def finish(self) -> None:
        """Wait for every cleanup still running (before the keeper re-executes or exits:
        its uids are then free or out of use, nothing in between)."""
        for r in list(self.reclaiming.values()):
            self.reclaimed(r)
