"""The spawn plan: everything needed to start one job process, its wire form and the
one schema that form is checked against.

:class:`SpawnSpec` is what the job keeper (:mod:`agent.keeper.decision` builds it from an
admitted request) and the bare spawner's client (:class:`agent.keeper.spawn.SpawnerOps`)
hand to the spawner; :func:`plan_of` is its one wire form and :func:`check_plan` the one
schema: the sender checks its own plan with it before sending, the spawner checks what
it receives with it (a plan from anywhere else, a compromised sender included), and only
a plan that passes reaches the child that carries it out. A key the schema does not
know is refused, never ignored. Standard library only: the keeper imports this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.keeper.landlock import LandlockSpec
    from agent.keeper.seccomp import SeccompSpec


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
    # Checked on this side too: a plan the spawner would refuse is a bug here, said now.
    err = check_plan(plan, dict.fromkeys(roles, -1))
    if err:
        raise ValueError(err)
    return plan, roles, fds


# Keys of a plan's "cgroup" request (besides "id"), as cgroups.Limits fields.
CGROUP_REQUEST_KEYS = ("memory_bytes", "pids", "cpu_millicores")
# Every key a plan may have: anything else is refused (an old or new sender's field the
# spawner would not carry out must not be silently dropped).
PLAN_KEYS = frozenset(
    {
        "path", "argv", "env", "cwd", "umask", "uid", "gid", "limits", "cgroup",
        "landlock", "seccomp", "scratch", "capabilities", "no_new_privs",
    }
)  # fmt: skip
DESCRIPTOR_ROLES = frozenset({"stdout", "exec", "script", "cgroup"})


def check_plan(plan: Any, fds: dict[str, int]) -> str:
    """Why a plan is malformed ("" if it is not). Fails closed on anything unexpected.

    ``fds``: the plan's descriptors by role (only the roles matter here)."""
    if not isinstance(plan, dict):
        return "malformed plan"
    unknown = set(plan) - PLAN_KEYS
    if unknown:
        return f"malformed plan: unknown key {sorted(map(str, unknown))[0]!r}"
    if set(fds) - DESCRIPTOR_ROLES:
        return "malformed plan: an unknown descriptor role"
    argv, env = plan.get("argv"), plan.get("env")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return "malformed plan: argv"
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        return "malformed plan: env"
    if any("\0" in s for s in [*argv, *env, *env.values()]) or any("=" in k for k in env):
        return "malformed plan: NUL byte or '=' in a name"
    path = plan.get("path")
    # Only an absolute path or a verified descriptor: nothing is looked up.
    if "exec" not in fds and (not isinstance(path, str) or not path.startswith("/")):
        return "malformed plan: the program is not an absolute path"
    if "stdout" not in fds:
        return "malformed plan: no output descriptor"
    cwd, umask = plan.get("cwd"), plan.get("umask")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        return "malformed plan: cwd"
    if not isinstance(umask, int) or not 0 <= umask <= 0o777:
        return "malformed plan: umask"
    for k in ("uid", "gid"):
        v = plan.get(k)
        if v is not None and (not isinstance(v, int) or v < 0):
            return f"malformed plan: {k}"
    if not isinstance(plan.get("limits", {}), dict):
        return "malformed plan: limits"
    cg = plan.get("cgroup")
    if cg is not None:
        if "cgroup" in fds:
            return "malformed plan: a cgroup descriptor and a cgroup request"
        if not isinstance(cg, dict) or not isinstance(cg.get("id"), str):
            return "malformed plan: cgroup"
        for k, v in cg.items():
            if k != "id" and (
                k not in CGROUP_REQUEST_KEYS
                or isinstance(v, bool)
                or not isinstance(v, int)
                or v <= 0
            ):
                return f"malformed plan: cgroup {k}"
    # --- confinement ---
    scratch, caps = plan.get("scratch"), plan.get("capabilities", [])
    if scratch is not None and (
        not isinstance(scratch, str) or not scratch.startswith("/") or "\0" in scratch
    ):
        return "malformed plan: scratch"
    if not isinstance(caps, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 64 for c in caps
    ):
        return "malformed plan: capabilities"
    if not isinstance(plan.get("no_new_privs", True), bool):
        return "malformed plan: no_new_privs"
    ll = plan.get("landlock")
    if ll is not None and (not isinstance(ll, dict) or not isinstance(ll.get("abi"), int)):
        return "malformed plan: landlock"
    sc = plan.get("seccomp")
    if sc is not None and (
        not isinstance(sc, dict)
        or not isinstance(sc.get("udp"), bool)
        or not isinstance(sc.get("allow"), list)
        or any(g not in _seccomp().GROUPS for g in sc["allow"])
        or sc.get("listen") not in _seccomp().LISTEN_MODES
    ):
        return "malformed plan: seccomp"
    return ""


def _seccomp() -> Any:
    """agent.keeper.seccomp, imported when a plan has a filter (it loads libseccomp)."""
    from agent.keeper import seccomp

    return seccomp
