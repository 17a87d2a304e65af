"""Reading /proc: process start times, boot id, and leftover job processes.

Used at start-up to find the processes of jobs that were running when the
agent died, without ever signalling an unrelated process: a process is only
treated as a job's when that can be proven (its environment carries the
job's ``AGENT_JOB_ID`` marker, or its process group's leader is still the
very process the agent started, same pid and same start time).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

JOB_ID_ENV = "AGENT_JOB_ID"


def boot_id() -> str:
    """The kernel's boot id ('' if unavailable).

    Under the systemd unit ``ProcSubset=pid`` hides /proc/sys, so the unit
    passes the id in ``AGENT_BOOT_ID`` (the ``%b`` specifier).
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        env = os.environ.get("AGENT_BOOT_ID", "").strip()
        return _dashed(env) if env else ""


def _dashed(hex_id: str) -> str:
    """systemd's %b has no dashes; /proc's boot_id has them: use /proc's form."""
    h = hex_id.replace("-", "").lower()
    if len(h) != 32:
        return hex_id
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat we use."""

    pid: int
    pgid: int
    start_ticks: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/PID/stat (None if the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain ') ', so
    # split after the last one.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return ProcStat(pid=pid, pgid=int(rest[2]), start_ticks=int(rest[19]))
    except (IndexError, ValueError):
        return None


def _environ(pid: int) -> set[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return set(f.read().split(b"\0"))
    except OSError:
        return set()


def all_pids() -> Iterator[int]:
    """Every pid currently in /proc."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


@dataclass(frozen=True)
class LostJob:
    """A job recorded as running by an agent that is gone."""

    job_id: str
    pgid: int
    leader_start: int  # /proc starttime ticks of the group leader, 0 if unknown


def leftover_processes(jobs: Iterable[LostJob], instance_marker: bytes | None) -> list[int]:
    """Pids that provably belong to one of ``jobs`` or carry ``instance_marker`` (None:
    only the jobs' own).

    One pass over /proc (see the module docstring for what counts as proof).
    """
    markers = {instance_marker} if instance_marker else set()
    groups: set[int] = set()
    for j in jobs:
        markers.add(f"{JOB_ID_ENV}={j.job_id}".encode())
        leader = read_stat(j.pgid) if j.pgid > 1 else None
        if (
            leader is not None
            and j.leader_start != 0
            and leader.pgid == j.pgid
            and leader.start_ticks == j.leader_start
        ):
            groups.add(j.pgid)
    out: list[int] = []
    me = os.getpid()
    for pid in all_pids():
        if pid == me:
            continue
        st = read_stat(pid)
        if st is None:
            continue
        if st.pgid in groups or _environ(pid) & markers:
            out.append(pid)
    return out
