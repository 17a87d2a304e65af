"""Signalling a running job: its process group, then every process of its cgroup leaf.

A reused pid is never hit: the group id is the leader's pid, which the spawner has not
reaped yet (so it is still the job's), and the leaf's processes are pinned with pidfds
before they are signalled. SIGKILL with a leaf is ``cgroup.kill``.

Standard library only besides the spawner's own modules: the spawner never imports grpc.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

from agent.keeper import cgroups, uids


def signal_job(
    pid: int,
    sig: int,
    cg: cgroups.JobCgroup | None,
    user: tuple[int, int] | None,
    *,
    root: bool,
) -> None:
    """Send ``sig`` to the (unreaped) job led by ``pid``: its group, and its leaf ``cg``.

    ``user`` is the (uid, gid) of a job of another uid than a non-root keeper's (its
    dynamic user), None otherwise; ``root`` whether the spawner runs as root.
    """
    if user is not None and not root:
        # A job of its own uid: this keeper has no CAP_KILL (and is not given it), so
        # a helper of the job's uid signals, as the job itself could. SIGKILL with a
        # cgroup needs none: cgroup.kill is the keeper's file.
        if sig == signal.SIGKILL and cg is not None:
            kill_leaf(cg)
            return
        uids.signal_as(*user, sig, pid, None if cg is None else cg.pids)
        return
    with contextlib.suppress(OSError):
        os.killpg(pid, sig)
    if cg is None:
        return
    if sig == signal.SIGKILL:
        kill_leaf(cg)
        return
    signal_leaf(cg, sig)


def other_user(plan: dict[str, Any] | None, root: bool) -> tuple[int, int] | None:
    """(uid, gid) of a job a non-root keeper runs as another user (an entry's user under
    the privileged unit, a dynamic one under the standard unit): it has no CAP_KILL, so a
    helper of that uid signals the job (signal_job). None otherwise."""
    uid = None if plan is None or root else plan.get("uid")
    if uid is None or uid == os.geteuid():
        return None
    gid = plan.get("gid") if plan is not None else None
    return uid, uid if gid is None else gid


def kill_leaf(cg: cgroups.JobCgroup) -> None:
    """SIGKILL to every process of the leaf (cgroup.kill); a failure is logged."""
    try:
        cg.kill()
    except cgroups.CgroupError as e:
        print(f"agent spawner: {e}", file=sys.stderr)


def signal_leaf(cg: cgroups.JobCgroup, sig: int) -> None:
    """Send ``sig`` to every process in the leaf, never to a pid reused meanwhile.

    Each pid is pinned with a pidfd first and signalled only if it is still in
    the leaf after that (a process cannot leave the leaf for a pid's new owner).
    """
    pinned: dict[int, int] = {}
    try:
        for pid in cg.pids():
            try:
                pinned[pid] = os.pidfd_open(pid)
            except OSError:
                continue
        still = set(cg.pids())
        for pid, pidfd in pinned.items():
            if pid in still:
                try:
                    signal.pidfd_send_signal(pidfd, sig)
                except OSError:
                    pass
    finally:
        for pidfd in pinned.values():
            os.close(pidfd)
