"""Retention and recovery: what happens to jobs the agent no longer runs.

:func:`recover` (at start-up, before the first job): jobs the history still
has as RUNNING were orphaned by a dead agent; they become LOST and their
processes are killed. With job cgroups, a job's processes are exactly its
cgroup's: every job leaf left in the agent's subtree is killed as a whole
(``cgroup.kill``, which no setsid, double fork or scrubbed environment
escapes), waited for until empty and removed. Without cgroups only processes
that provably belong to them (see :mod:`agent.daemon.procfs`) or carry this
installation's instance marker are killed.

:func:`sweep` (periodically): finished jobs past ``max_age_seconds`` or
beyond the newest ``max_jobs`` are removed with their output files, and
records whose last write failed are written again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent.daemon import procfs
from agent.daemon.history import History, JobRecord
from agent.keeper.cgroups import CgroupError, Subtree
from agent.keeper.lifecycle import check_transition
from agent.vocabulary import JobState

log = logging.getLogger(__name__)

LEFTOVER_TIMEOUT = 5.0
# One retention step: batches of this many jobs (rows and output files) until the step
# has used STEP_BUDGET seconds; the rest waits for the next step, so callers are never
# held longer than about one batch past the budget (measured: tests/test_history_faults).
SWEEP_BATCH = 32
STEP_BUDGET = 0.004
LOST_TEXT = (
    "the agent stopped while this job was running; its outcome is unknown and its "
    "processes were killed at the next start"
)


@dataclass(frozen=True)
class Policy:
    """``[retention]``: 0 means no limit of that kind."""

    max_age_seconds: int
    max_jobs: int


def recover(
    history: History,
    *,
    instance: str,
    boot_id: str,
    instance_env: str,
    subtree: Subtree | None = None,
    kept: set[str] | frozenset[str] = frozenset(),
    sweep_leftovers: bool = True,
) -> list[JobRecord]:
    """Mark jobs left RUNNING by a dead agent (and not ``kept`` by the job keeper) as
    LOST and kill their processes.

    ``sweep_leftovers``: the keeper is new, so every job cgroup left in the subtree and
    every process with this installation's marker is a leftover. With a keeper that
    outlived the last agent, only the lost jobs' own cgroups and provable processes are.
    """
    lost = [r for r in history.store.running() if r.id not in kept]
    now = time.time()
    killed = 0
    if subtree is not None:
        # A job the keeper kept (it may have adopted it from its dead predecessor's
        # cgroup) is never a leftover.
        killed = kill_leftover_cgroups(
            subtree, only=None if sweep_leftovers else {r.id for r in lost}, keep=set(kept)
        )
    elif not sweep_leftovers:
        this_boot = [
            procfs.LostJob(r.id, r.pid, r.leader_start) for r in lost if r.boot_id == boot_id
        ]
        for pid in procfs.leftover_processes(this_boot, None):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    else:
        # Processes of an earlier boot are gone; their pids mean nothing now.
        this_boot = [
            procfs.LostJob(r.id, r.pid, r.leader_start) for r in lost if r.boot_id == boot_id
        ]
        marker = f"{instance_env}={instance}".encode()
        for pid in procfs.leftover_processes(this_boot, marker):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    for rec in lost:
        check_transition(rec.state, JobState.LOST)
        rec.state = JobState.LOST
        rec.end_time = now
        rec.error_text = LOST_TEXT
        with contextlib.suppress(OSError):
            rec.output_bytes = os.stat(rec.output_path).st_size
        history.save(rec)
    if lost or killed:
        log.warning(
            "recovered %d job(s) left running by a previous agent as LOST; "
            "killed %d leftover process(es)",
            len(lost),
            killed,
        )
    return lost


def kill_leftover_cgroups(
    subtree: Subtree,
    timeout: float = LEFTOVER_TIMEOUT,
    *,
    only: set[str] | None = None,
    keep: set[str] | frozenset[str] = frozenset(),
) -> int:
    """Kill every job leaf left in ``subtree`` (``only``: those of these jobs; never
    those of ``keep``), wait
    until empty, remove it.

    Returns how many processes were in them. A leaf that will not empty or
    go away is logged and left (the next start tries again).
    """
    leaves = [
        leaf
        for leaf in subtree.leftovers()
        if (only is None or leaf.job_id in only) and leaf.job_id not in keep
    ]
    killed = 0
    for leaf in leaves:
        killed += len(leaf.pids())
        try:
            leaf.kill()
        except CgroupError as e:
            log.error("leftover job cgroup: %s", e)
    deadline = time.monotonic() + timeout
    for leaf in leaves:
        while leaf.populated() and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            leaf.remove()
        except CgroupError as e:
            log.error("leftover job cgroup: %s", e)
    return killed


class Sweeper:
    """Applies retention in bounded batches (the event loop is never held long)."""

    def __init__(self, history: History, output_dir: Path, policy: Policy) -> None:
        self.history = history
        self.output_dir = output_dir
        self.policy = policy
        self.more = False  # a backlog remains after the last bounded sweep
        self._shrinking = False  # free pages remain to give back
        self._removed = 0  # by the steps of the backlog being worked off (logged at its end)

    def sweep(
        self,
        running: set[str] | frozenset[str] = frozenset(),
        now: float | None = None,
        *,
        max_batches: int = 0,
        budget: float = 0.0,
    ) -> int:
        """Apply retention; retry unsaved records. Returns the number of jobs removed.

        ``max_batches`` or ``budget`` (seconds) bound one step: ``more`` then says a
        backlog remains (rows to remove, or free pages to give back to the file system).
        """
        self.history.retry_unsaved()
        p = self.policy
        self.more = False
        if not (p.max_age_seconds or p.max_jobs):
            return 0
        removed = 0
        batches = 0
        t0 = time.monotonic()
        while True:
            victims = self.history.store.expired(
                max_age_seconds=p.max_age_seconds, max_jobs=p.max_jobs, now=now, batch=SWEEP_BATCH
            )
            victims = [(i, path) for i, path in victims if i not in running]
            if not victims:
                break
            for _, path in victims:
                self._remove_output(path)
            self.history.store.delete([i for i, _ in victims])
            removed += len(victims)
            batches += 1
            if (max_batches and batches >= max_batches) or (
                budget and time.monotonic() - t0 >= budget
            ):
                self.more = True  # the rest in the next step: callers wait one batch at most
                break
        self._removed += removed
        if self._removed and not self.more:
            log.info("retention removed %d finished job(s)", self._removed)
            self._removed = 0
        # The file shrinks too, a bounded number of pages a step, once the rows are gone.
        self._shrinking = self._shrinking or removed > 0
        if not self.more and self._shrinking:
            try:
                self._shrinking = self.history.store.vacuum_step() > 0
            except sqlite3.Error as e:
                log.warning("retention: cannot shrink the history file: %s", e)
                self._shrinking = False
            self.more = self._shrinking
        return removed

    def _remove_output(self, path: str) -> None:
        """Delete a job's output file, but only one the agent made and owns."""
        p = Path(path)
        # Only <uuid>.out directly inside our output directory, a regular
        # file (not a link) owned by our user: never anything else.
        if p.parent != self.output_dir or not p.name.endswith(".out"):
            log.warning("retention: not removing %s (outside %s)", p, self.output_dir)
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
