"""The spawn plan: everything needed to start one job process, and its wire form.

:class:`SpawnSpec` is what the job keeper (:mod:`agent.daemon.decision` builds it from an
admitted request) and the bare spawner's client (:class:`agent.daemon.spawn.SpawnerOps`)
hand to the spawner; :func:`plan_of` is its one wire form, which the spawner checks
(:func:`agent.daemon.spawner.check_plan`) and its child carries out. Standard library
only: the keeper imports this and stays small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.daemon.landlock import LandlockSpec
    from agent.daemon.seccomp import SeccompSpec


@dataclass(frozen=True)
class SpawnSpec:
    """Everything needed to start one job process."""

    argv: Sequence[str]
    executable: str  # absolute; used unless exec_fd is given
    env: Mapping[str, str]
    cwd: str
    stdout_fd: int
    uid: int | None  # None: keep the agent's user
    gid: int | None
    umask: int
    limits: Mapping[str, int]  # rlimits, 0 = unlimited
    exec_fd: int | None = None  # fexecve this (a sealed, verified copy)
    script_fd: int | None = None  # a pinned script, fd 3 = SCRIPT_FD_PATH in argv
    cgroup_procs_fd: int | None = None  # the job's cgroup.procs: the child joins it
    # The job cgroup the spawner creates for this job: {"id": JOB_ID, and the
    # cgroups.Limits fields memory_bytes / pids / cpu_millicores that are set}.
    cgroup: Mapping[str, str | int] | None = None
    # --- confinement: Landlock, scratch directory, capabilities ---
    landlock: LandlockSpec | None = None  # complete (deny list included); None: none
    landlock_abi: int = 0  # the ABI the spec was checked against at policy load
    scratch: str | None = None  # created 0700 for the job's user, removed after it
    capabilities: Sequence[int] = ()  # what a job of a root spawner keeps (default none)
    no_new_privs: bool = True
    seccomp: SeccompSpec | None = None  # the job's seccomp filter; None: none
    # A uid of its own from the dynamic range ([jobs] dynamic_users): the keeper takes one
    # and sets uid and gid in the plan (uid and gid here are then None).
    dynamic_user: bool = False


def plan_of(spec: SpawnSpec) -> tuple[dict[str, Any], list[str], list[int]]:
    """The spawner's plan for ``spec``, with the descriptor roles and descriptors."""
    plan: dict[str, Any] = {
        "path": spec.executable,
        "argv": list(spec.argv),
        "env": dict(spec.env),
        "cwd": spec.cwd,
        "umask": spec.umask,
        "uid": spec.uid,
        "gid": spec.gid,
        "limits": {k: v for k, v in spec.limits.items() if v},
    }
    if spec.cgroup is not None:
        plan["cgroup"] = dict(spec.cgroup)
    # --- confinement ---
    if spec.landlock is not None and spec.landlock_abi >= 1:
        ll = spec.landlock
        plan["landlock"] = {
            "abi": spec.landlock_abi,
            "read_exec": list(ll.read_exec),
            "read": list(ll.read),
            "write": list(ll.write),
            "connect_tcp": None if ll.connect_tcp is None else list(ll.connect_tcp),
            "bind_tcp": None if ll.bind_tcp is None else list(ll.bind_tcp),
            "scope_signals": ll.scope_signals,
            "scope_abstract_unix": ll.scope_abstract_unix,
            "deny": list(ll.deny),
        }
    if spec.seccomp is not None:
        sc = spec.seccomp
        plan["seccomp"] = {"udp": sc.udp, "allow": sorted(sc.allow), "listen": sc.listen}
    plan["scratch"] = spec.scratch
    plan["capabilities"] = sorted(spec.capabilities)
    plan["no_new_privs"] = spec.no_new_privs
    roles, fds = ["stdout"], [spec.stdout_fd]
    for role, fd in (
        ("exec", spec.exec_fd),
        ("script", spec.script_fd),
        ("cgroup", spec.cgroup_procs_fd),
    ):
        if fd is not None:
            roles.append(role)
            fds.append(fd)
    return plan, roles, fds
