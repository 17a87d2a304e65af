"""The job keeper taking over the jobs a dead keeper left running (kill -9, a crash).

The jobs run on in their cgroup leaves, and the next keeper *adopts* them at its start
(:meth:`Adoption.adopt_leftovers`): the leaf is the job (its name the job id, its
processes signalled only through it, its end the leaf emptying), what the dead keeper
knew of it (deadline, cap, grace, record, dynamic uid) is the job's record, written at
its start in the keeper's journal (``<output_dir>/keeper.journal``; a keeper of the
previous release wrote ``<job id>.keeper`` instead: :mod:`agent.keeper.keeperfiles`),
and its output pipe comes back from systemd's descriptor store where there is one. Only
the exit status is lost (only the dead parent could reap it), and the job's end says
so: LOST, "exit status unknown: the keeper restarted". Without cgroups nothing can find
them again.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.keeper import cgroups, uids
from agent.keeper import lifecycle as lc
from agent.keeper.keeperlog import guarded, log
from agent.keeper.keptjobs import KeptJob
from agent.keeper.outputfile import OutputFile
from agent.keeper.spawner import signal_leaf

if TYPE_CHECKING:
    from agent.keeper.keeperfiles import JobFiles
    from agent.keeper.keeperuids import UidHolds
    from agent.keeper.keptjobs import Kept
    from agent.keeper.spawner import Spawner

# The end of a job adopted from a dead keeper's cgroup: seen (the cgroup emptied), but
# not its exit status, which only the dead keeper (its parent) could have read.
ADOPTED_TEXT = "exit status unknown: the keeper restarted"
NO_PIPE_NOTE = "its output after the keeper's death was lost (its pipe died with the keeper)"
NO_FILE_NOTE = "its timeout and output cap were lost with the keeper (no record of the job)"
ADOPTED_POLL = 1.0  # seconds: how often adopted jobs are looked at without inotify
# What a job adopted without its record runs with: no timeout, cap or grace known.
UNKNOWN_RUN: dict[str, Any] = {
    "timeout": 0,
    "cpu_seconds": 0,
    "memory_max": 0,
    "note": "",
    "grace": 5.0,
    "kill_on_cap": False,
    "cap": 0,
}


def kill_unadopted(leaf: cgroups.JobCgroup, rfd: int) -> None:
    """A dead keeper's job this keeper does not take over: its pipe closed, its cgroup
    killed."""
    if rfd >= 0:
        with contextlib.suppress(OSError):
            os.close(rfd)
    with contextlib.suppress(cgroups.CgroupError):
        leaf.kill()


def adopted_exit(key: int) -> dict[str, Any]:
    """The spawner-like "exited" report of an adopted job whose cgroup emptied (its
    accounting filled in from the cgroup where it can be)."""
    return {
        "op": "exited",
        "pid": key,
        "code": None,
        "signal": None,
        "utime": 0.0,
        "stime": 0.0,
        "maxrss": 0,
        "oom": 0,
        "ended": time.time(),
        "unknown": ADOPTED_TEXT,
    }


class Adoption:
    """The jobs adopted from a dead keeper: taking them over, watching their cgroups for
    their end, signalling them through their cgroups. ``exited`` takes the end of an
    adopted job as a spawner "exited" report (the keeper's, as for any job)."""

    def __init__(
        self,
        spawner: Spawner,
        *,
        kept: Kept,
        holds: UidHolds,
        files: JobFiles,
        file_owner: int,
        exited: Callable[[dict[str, Any]], None],
    ) -> None:
        self.spawner, self.kept, self.holds, self.files = spawner, kept, holds, files
        self.file_owner = file_owner
        self.exited = exited
        # Jobs adopted from a dead keeper's cgroups, by inotify watch (-1: unwatched).
        self.adopted: dict[int, KeptJob] = {}
        self.unwatched: list[KeptJob] = []
        self.adopt_keys = itertools.count(1)

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
        subtree = self.spawner.subtree
        for leaf in subtree.leftovers() if subtree is not None else []:
            rfd = stored.pop(leaf.job_id, -1)
            try:
                self.adopt(leaf, rfd)
            except Exception:
                import traceback

                log(f"internal error adopting job {leaf.job_id}:\n{traceback.format_exc()}")
                if leaf.job_id not in self.kept.jobs:
                    # Nothing may run that nobody supervises: killed (the agent records
                    # it LOST at its next start).
                    kill_unadopted(leaf, rfd)
        self.files.drop(stored)  # a job that is gone: its pipe goes too
        self.files.remove_stale(self.kept.jobs)

    def adopt(self, leaf: cgroups.JobCgroup, rfd: int) -> None:
        job_id = leaf.job_id
        if job_id in self.kept.ended:
            log(f"job {job_id}: ended under the previous keeper, yet its cgroup is left: killed")
            kill_unadopted(leaf, rfd)
            with contextlib.suppress(cgroups.CgroupError):
                leaf.remove()
            return
        meta = self.files.read(job_id)
        if not self.hold_uid(job_id, meta):
            kill_unadopted(leaf, rfd)
            return
        job, rfd = self.kept_job(job_id, meta, rfd)
        job.leaf = leaf
        job.key = -next(self.adopt_keys)
        job.record = meta["record"] if meta is not None else {}
        pids = leaf.pids()
        was = meta["pid"] if meta is not None else 0
        job.pid = was if was in pids else (pids[0] if pids else 0)
        user = uids.user_of(meta.get("user") if meta is not None else None)
        if user is not None:
            self.spawner.job_users[job.key] = user  # (a negative key: never a child's pid)
        # Its life starts where the dead keeper's left it: output past the cap is
        # dropped, and a job whose pipe is gone has no more output.
        if job.out.truncated:
            job.life.output = lc.Output.DISCARDING
        self.kept.jobs[job_id] = job
        self.kept.by_pid[job.key] = job
        if rfd >= 0:
            os.set_inheritable(rfd, False)
            os.set_blocking(rfd, False)
            job.rfd = rfd
            job.stored = True
            self.spawner.sel.register(rfd, selectors.EVENT_READ, job)
        else:
            job.life.output = lc.Output.CLOSED
        deadline = meta.get("deadline") if meta is not None else None
        if deadline is not None:
            self.kept.arm(job, max(0.0, float(deadline) - time.time()), lc.TimedOut())
        log(
            f"adopted job {job_id} from a dead keeper ({len(pids)} process(es), "
            f"{'its pipe kept' if rfd >= 0 else 'no pipe'}, "
            f"{'deadline kept' if deadline is not None else 'no deadline'})"
        )
        self.watch(job)

    def hold_uid(self, job_id: str, meta: dict[str, Any] | None) -> bool:
        """Hold the adopted job's dynamic uid; False when it has to be killed instead."""
        uid = meta.get("uid") if meta is not None else None
        if self.holds.pool is None or (uid is None and meta is not None):
            return True
        # With dynamic users, a job's uid must be known to be held: else a new job
        # could be given the uid of a running one (and see and signal it).
        if not isinstance(uid, int) or isinstance(uid, bool) or uid not in self.holds.pool:
            log(f"job {job_id}: its dynamic uid is unknown (its record missing or not "
                "one); killed, as no other job may be given it unknowingly")  # fmt: skip
            return False
        self.holds.hold(job_id, uid)
        return True

    def kept_job(self, job_id: str, meta: dict[str, Any] | None, rfd: int) -> tuple[KeptJob, int]:
        """The adopted job as a KeptJob with its output file open again, and its pipe
        (-1: none, or nothing more can be written for it); its note says what was lost."""
        notes = []
        if meta is None:
            run = dict(UNKNOWN_RUN)
            notes.append(NO_FILE_NOTE)
            if rfd >= 0:  # no cap known: nothing more is written for it
                os.close(rfd)
                rfd = -1
        else:
            run = dict(meta["run"])
        path = os.path.join(self.files.output_dir, f"{job_id}.out")
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
        return KeptJob(job_id, None, 0, run, out), rfd

    # ------------------------------------------------------------ watching

    def watch(self, job: KeptJob) -> None:
        """Watch an adopted job's cgroup.events (its end is the cgroup emptying); watch
        first, then look, so an end before the watch is not missed."""
        assert job.leaf is not None
        sp = self.spawner
        wd = -1
        try:
            if sp.watcher is None:
                sp.watcher = cgroups.EventWatcher()
                sp.sel.register(sp.watcher.fileno(), selectors.EVENT_READ, sp.watcher)
            wd = sp.watcher.watch(job.leaf)
        except cgroups.CgroupError as e:
            log(f"job {job.id}: {e}; its end is looked for every {ADOPTED_POLL:g} s")
        if wd >= 0:
            self.adopted[wd] = job
        else:
            self.unwatched.append(job)
        self.look_at([job])

    def fired(self, fired: list[int]) -> None:
        """The watches whose cgroup.events changed (inotify watch descriptors)."""
        jobs = [self.adopted[wd] for wd in fired if wd in self.adopted]
        # A watch the kernel dropped (the leaf vanished) shows up as nothing.
        jobs += [j for j in self.adopted.values() if j.leaf and not j.leaf.events_path.exists()]
        self.look_at(jobs)

    def look_at(self, jobs: list[KeptJob]) -> None:
        for job in list(jobs):
            if job.leaf is not None and job.key in self.kept.by_pid and not job.leaf.populated():
                guarded(self.adopted_ended, job)

    def adopted_ended(self, job: KeptJob) -> None:
        """An adopted job's cgroup is empty: its end (status unknown), from the cgroup's
        accounting, then the lifecycle as for any exit."""
        leaf = job.leaf
        assert leaf is not None
        for wd, j in list(self.adopted.items()):
            if j is job:
                del self.adopted[wd]
                self.spawner.unwatch(wd)
        if job in self.unwatched:
            self.unwatched.remove(job)
        msg = adopted_exit(job.key)
        subtree = self.spawner.subtree
        try:
            stats = leaf.stats(memory=subtree is None or "memory" in subtree.controllers)
            msg["utime"], msg["stime"] = stats.cpu_user_seconds, stats.cpu_system_seconds
            msg["maxrss"] = stats.memory_peak_bytes or 0
            msg["oom"] = (stats.oom_kills or 0) + (stats.oom_group_kills or 0)
        except cgroups.CgroupError as e:
            log(str(e))
        self.exited(msg)
        try:  # after the end is told, as for a job of this keeper's (cgroup_done)
            leaf.remove()
        except cgroups.CgroupError as e:
            log(str(e))

    def signal(self, job: KeptJob, sig: int) -> None:
        """Signal an adopted job: it is not this keeper's child, so never by its pid alone
        (reused meanwhile, it could be anyone's): through its cgroup."""
        assert job.leaf is not None
        leaf = job.leaf
        uid = self.holds.of(job.id)
        user = (uid, uid) if uid is not None else self.spawner.job_users.get(job.key)
        try:
            if sig == signal.SIGKILL:
                leaf.kill()
            elif user is not None and os.geteuid() != 0:
                # A job of another uid, and this keeper has no CAP_KILL: a helper of the
                # job's uid signals, as the job itself could (SIGKILL above needs none).
                uids.signal_as(*user, sig, members=leaf.pids)
            else:
                signal_leaf(leaf, sig)
        except cgroups.CgroupError as e:
            log(f"job {job.id}: {e}")
