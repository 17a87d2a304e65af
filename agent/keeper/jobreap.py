"""What the spawner reports when a job ends: the "exited" message and its accounting.

The spawner reaps each job's leader (``wait4``), and with a cgroup waits until the leaf
is empty before it accounts from it (:class:`Draining`): ``cpu.stat`` covers every
process the job ever had, ``memory.peak`` is the job's own peak. Never ``ru_maxrss``: a
forked child keeps the spawner's high-water mark across exec.

Standard library only besides the spawner's own modules: the spawner never imports grpc.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import time
from typing import Any

from agent.keeper import cgroups


class Draining:
    """A reaped job whose cgroup still has processes (being killed)."""

    __slots__ = ("cg", "msg", "wd")

    def __init__(self, cg: cgroups.JobCgroup, msg: dict[str, Any], wd: int) -> None:
        self.cg, self.msg, self.wd = cg, msg, wd


def reap(pid: int) -> dict[str, Any]:
    """Reap the job's exited leader, killing what is left of its process group first;
    its "exited" message."""
    # The leader is a zombie: its group id cannot have been reused yet,
    # so this is the last safe moment to kill what the job left behind.
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    _, status, ru = os.wait4(pid, 0)
    # The job's own end, whenever the agent gets to hear of it.
    return exit_message(pid, status, ru, time.time())


def account(cg: cgroups.JobCgroup, msg: dict[str, Any], *, memory: bool) -> None:
    """The emptied leaf's accounting into ``msg`` (``memory``: the memory controller is
    enabled); a failure is logged."""
    try:
        stats = cg.stats(memory=memory)
    except cgroups.CgroupError as e:
        print(f"agent spawner: {e}", file=sys.stderr)
    else:
        add_stats(msg, stats)


def remove_leaf(cg: cgroups.JobCgroup) -> None:
    """Remove the emptied, accounted leaf; a failure is logged."""
    try:
        cg.remove()
    except cgroups.CgroupError as e:
        print(f"agent spawner: {e}", file=sys.stderr)


def exit_message(pid: int, status: int, ru: resource.struct_rusage, ended: float) -> dict[str, Any]:
    """The "exited" message of a reaped leader (wait4's status and usage, its end time)."""
    code = os.waitstatus_to_exitcode(status)
    return {
        "op": "exited",
        "pid": pid,
        "code": code if code >= 0 else None,
        "signal": -code if code < 0 else None,
        "utime": ru.ru_utime,
        "stime": ru.ru_stime,
        # Never ru_maxrss: a forked child keeps the spawner's high-water
        # mark across exec. The job's own peak comes from its cgroup.
        "maxrss": 0,
        "oom": 0,
        "ended": ended,
    }


def add_stats(msg: dict[str, Any], stats: cgroups.Stats) -> None:
    """Account the job from its emptied leaf, into its "exited" message."""
    # cpu.stat covers every process the job ever had, not only the
    # ones wait4 saw; but without the cpu controller its user/system
    # split is tick-sampled and can fall short of wait4's exact
    # figure for the processes it did see: take the larger of each.
    msg["utime"] = max(msg["utime"], stats.cpu_user_seconds)
    msg["stime"] = max(msg["stime"], stats.cpu_system_seconds)
    msg["maxrss"] = stats.memory_peak_bytes or 0
    msg["oom"] = (stats.oom_kills or 0) + (stats.oom_group_kills or 0)
