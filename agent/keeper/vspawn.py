"""The job spawner's vfork path: a plan turned into what the C child (``_vspawn.c``) runs.

The spawner (:mod:`agent.keeper.spawner`) starts each job either with ``os.fork()`` and
the Python child set-up (``childsetup.child``), or, when the C extension
``agent.keeper._vspawn`` is importable, with ``clone(CLONE_VM | CLONE_VFORK)`` and the
same set-up done by C code that makes only system calls. This module is the bridge: it
builds, in the spawner and before the clone, every array the C child needs (argv and
envp as bytes, the descriptors, the op lists with their arguments) and the name of
every step, so that a failing step is reported with exactly the text the fork path
gives (``setrlimit RLIMIT_NOFILE: Operation not permitted (EPERM)``).

The op lists follow ``childsetup.child`` and ``childsetup.switch_user`` line by line, and
:meth:`agent.keeper.landlock.Ruleset.child_program` follows ``Ruleset.restrict``;
a change to one must be made to the other (tests/test_vspawn.py compares the two paths'
jobs for the same plans).

``WORKER_AGENT_SPAWN`` in the spawner's environment (the agent passes its own on)
chooses: ``fork`` the Python path, ``vfork`` the C path or refuse to start, unset (or
``auto``) the C path when it is built, else fork.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections.abc import Sequence
from typing import Any

from agent.keeper import capabilities as caps_mod
from agent.keeper import landlock, seccomp
from agent.keeper import spawnproto as proto

# agent/keeper/_vspawn.c
OP_SETSID = 1
OP_CGROUP_JOIN = 2
OP_SETRLIMIT = 3
OP_UMASK = 4
OP_CHDIR = 5
OP_SETGROUPS0 = 6
OP_SETRESGID = 7
OP_SETRESUID = 8
OP_PRCTL = 9
OP_CAPSET = 10
OP_FAIL = 11
OP_LL_CREATE = 12
OP_LL_ADD = 13
OP_LL_OPEN_ADD = 14
OP_LL_RESTRICT = 15
OP_LL_CLOSE = 16
OP_SECCOMP = 17
OP_NEW_SESSION_KEYRING = 18
# The C child's fixed steps (negative codes), in childsetup.child's words.
FIXED_STEPS = {
    -1: "setup",
    -2: "signals",
    -3: "open /dev/null",
    -4: "dup2",
    -5: "close descriptors",
    -6: "execve",
}
ENV_VAR = "WORKER_AGENT_SPAWN"
LANDLOCK_BLOCKS = 64  # named rule blocks kept (the spawner keeps as many prepared specs)
_PR_SET_KEEPCAPS, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 8, 24, 47, 2
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT_CLEAR_ALL = 4
# A job switched to another user gets a session keyring of its own: the keeper's (the
# unit's private one) is possessed by every process that inherits it, so jobs of
# different uids would share its keys (childsetup.switch_user, capabilities.new_session_keyring).
KEYRING_STEP = "keyctl(KEYCTL_JOIN_SESSION_KEYRING)"
_CAP_VERSION_3 = 0x20080522

Op = tuple[int, int, int, int, int, "bytes | None"]


def choose(env: dict[str, str] | os._Environ[str]) -> tuple[str, str, Any]:
    """(path, why, module): "vfork" with the C module, or "fork" and None.

    Raises RuntimeError when ``vfork`` is required and the module cannot be had.
    """
    want = env.get(ENV_VAR, "auto") or "auto"
    if want not in ("auto", "fork", "vfork"):
        raise RuntimeError(f"{ENV_VAR}={want!r}: expected fork, vfork or auto")
    if want == "fork":
        return "fork", f"{ENV_VAR}=fork", None
    try:
        from agent.keeper import _vspawn  # type: ignore[attr-defined]
    except ImportError as e:
        if want == "vfork":
            raise RuntimeError(f"{ENV_VAR}=vfork but agent.keeper._vspawn: {e}") from None
        return "fork", f"agent.keeper._vspawn is not available ({e})", None
    return "vfork", "agent.keeper._vspawn", _vspawn


class Steps:
    """Step names by index, as the C child reports them."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        i = self._index.get(name)
        if i is None:
            i = self._index[name] = len(self.names)
            self.names.append(name)
        return i

    def name(self, code: int) -> str:
        if code < 0:
            return FIXED_STEPS.get(code, "setup")
        return self.names[code] if code < len(self.names) else "setup"


def user_ops(plan: dict[str, Any], root: bool, last_cap: int, steps: Steps, euid: int) -> list[Op]:
    """childsetup.switch_user as ops (see agent.keeper.capabilities for the order)."""
    uid, gid = plan.get("uid"), plan.get("gid")
    caps: list[int] = plan.get("capabilities", [])
    switch = steps("user switch")
    if not root:
        holds, switcher = caps_mod.held()
        out: list[Op] = []
        if uid is not None and uid != euid:
            # childsetup.switch_user: a keeper with CAP_SETUID/CAP_SETGID switches, an
            # unprivileged one can only "switch" to itself.
            if not switcher:
                return [(OP_FAIL, switch, errno.EPERM, 0, 0, None)]
            gid = uid if gid is None else gid
            out += [
                (OP_SETGROUPS0, switch, 0, 0, 0, None),
                (OP_SETRESGID, switch, gid, 0, 0, None),
                (OP_SETRESUID, switch, uid, 0, 0, None),
                (OP_NEW_SESSION_KEYRING, steps(KEYRING_STEP), 0, 0, 0, None),
            ]
        if holds:
            # None of the keeper's capabilities for the job (ambient ones survive execve).
            step = steps("prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
            out.append((OP_PRCTL, step, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, None))
            data = struct.pack("=Ii6I", _CAP_VERSION_3, 0, *([0] * 6))
            out.append((OP_CAPSET, steps("capset"), 0, 0, 0, data))
        return out
    ops: list[Op] = []
    # ``root``: a root keeper, or one of another user that gives capabilities.
    target = euid if uid is None else uid
    if uid is not None:
        gid = uid if gid is None else gid
        # Groups first, then the gid, then the uid: after setresuid the process could
        # no longer drop the others.
        ops += [(OP_SETGROUPS0, switch, 0, 0, 0, None), (OP_SETRESGID, switch, gid, 0, 0, None)]
    if caps and target != 0:
        ops.append((OP_PRCTL, steps("prctl(PR_SET_KEEPCAPS)"), _PR_SET_KEEPCAPS, 1, 0, None))
    # Before setresuid: dropping from the bounding set needs CAP_SETPCAP.
    kept = frozenset(caps)
    drops, names = _bounding_drops(kept, last_cap)
    first = len(steps.names)
    steps.names.extend(names)  # named once per set, numbered per job (as "adds" below)
    ops.extend(
        [(OP_PRCTL, first + i, _PR_CAPBSET_DROP, cap, 0, None) for i, cap in enumerate(drops)]
    )
    if uid is not None:
        ops.append((OP_SETRESUID, switch, uid, 0, 0, None))
        if uid != euid:
            ops.append((OP_NEW_SESSION_KEYRING, steps(KEYRING_STEP), 0, 0, 0, None))
    if target == 0 or caps or euid != 0:
        # Root keeps its full permitted set across setresuid(0), a keeper of another
        # user its own (ambient ones would survive execve): cut it to the entry's.
        wanted = sorted(kept)
        masks = [0, 0]
        for cap in wanted:
            masks[cap // 32] |= 1 << (cap % 32)
        data = struct.pack("=Ii6I", _CAP_VERSION_3, 0, *(m for m in masks for _ in range(3)))
        ops.append((OP_CAPSET, steps("capset"), 0, 0, 0, data))
        if target != 0:
            for cap in wanted:
                step = steps(f"prctl(PR_CAP_AMBIENT_RAISE, {cap})")
                ops.append((OP_PRCTL, step, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, None))
    return ops


@functools.lru_cache(maxsize=LANDLOCK_BLOCKS)
def _bounding_drops(kept: frozenset[int], last_cap: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The capabilities a job keeping ``kept`` drops from its bounding set, and the name of
    each drop's step (built once per set: about 40 of them for every job otherwise)."""
    drops = tuple(cap for cap in range(last_cap + 1) if cap not in kept)
    return drops, tuple(f"prctl(PR_CAPBSET_DROP, {cap})" for cap in drops)


@functools.lru_cache(maxsize=LANDLOCK_BLOCKS)
def _prefixed(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"landlock: {n}" for n in names)


def landlock_ops(program: Sequence[tuple[Any, ...]], steps: Steps) -> list[Op]:
    """Ruleset.child_program() as ops; each step is named "landlock: <step>"."""
    ops: list[Op] = []
    for item in program:
        kind = item[0]
        if kind == "nnp":
            ops.append((OP_PRCTL, steps(f"landlock: {item[1]}"), _PR_SET_NO_NEW_PRIVS, 1, 0, None))
        elif kind == "create":
            _, name, attr, size = item
            ops.append((OP_LL_CREATE, steps(f"landlock: {name}"), size, 0, 0, attr))
        elif kind == "add":
            _, name, rule_type, attr = item
            ops.append((OP_LL_ADD, steps(f"landlock: {name}"), rule_type, 0, 0, attr))
        elif kind == "adds":
            # An entry's prepared rules (one block per spec): named once, then only
            # numbered per job (about 0.7 us a rule saved on every start).
            _, names, rules = item
            first = len(steps.names)
            steps.names.extend(_prefixed(names))
            ops.extend(
                [(OP_LL_ADD, first + i, kind_, 0, 0, attr) for i, (kind_, attr) in enumerate(rules)]
            )
        elif kind == "open_add":
            _, names, path, dir_mask, file_mask = item
            # Four consecutive steps: open, fstat (the bare "landlock"), readlink, add.
            first = len(steps.names)
            for n in names:
                steps.names.append(f"landlock: {n}" if n else "landlock")
            ops.append((OP_LL_OPEN_ADD, first, dir_mask, file_mask, 0, os.fsencode(path)))
        elif kind == "restrict":
            _, name, fd = item
            ops.append((OP_LL_RESTRICT, steps(f"landlock: {name}"), fd, 0, 0, None))
        elif kind == "close":
            ops.append((OP_LL_CLOSE, steps("landlock"), 0, 0, 0, None))
        else:
            raise ValueError(f"unknown Landlock child step {kind!r}")
    return ops


def build(
    plan: dict[str, Any],
    fds: dict[str, int],
    reset: Sequence[int],
    confine: landlock.Ruleset | None,
    root: bool,
    last_cap: int,
    scratch_fd: int,
    rlimits: dict[str, tuple[int, str, int]],
    filt: seccomp.Filter | None = None,
    notify_sock: int = -1,
) -> tuple[tuple[Any, ...], Steps]:
    """The arguments of ``_vspawn.spawn`` for a checked plan, and the step names.

    The same steps, in the same order, as childsetup.child.
    """
    steps = Steps()
    pre: list[Op] = [(OP_SETSID, steps("setsid"), 0, 0, 0, None)]
    if "cgroup" in fds:
        pre.append((OP_CGROUP_JOIN, steps("cgroup join"), 0, 0, 0, None))
    last = pre[-1][1]
    for name, value in sorted(plan.get("limits", {}).items()):
        res, rname, extra = rlimits[name]
        last = steps(f"setrlimit {rname}")
        pre.append((OP_SETRLIMIT, last, res, value, value + extra, None))
    pre.append((OP_UMASK, last, plan["umask"], 0, 0, None))  # umask() cannot fail
    pre.append((OP_CHDIR, steps("chdir"), 0, 0, 0, os.fsencode(plan["cwd"])))
    # A keeper holding capabilities (the standard unit's CAP_SETUID/CAP_SETGID) drops them
    # in every job, whether or not it switches the job's user.
    if plan.get("uid") is not None or root or caps_mod.held()[0]:
        pre += user_ops(plan, root, last_cap, steps, os.geteuid())
    confine_ops: list[Op] = []
    keep: set[int] = set()
    if confine is not None:
        keep.update(confine.descriptors())
        if scratch_fd >= 0:
            keep.add(scratch_fd)
        dirs = [scratch_fd] if scratch_fd >= 0 else []
        confine_ops = landlock_ops(confine.child_program(extra_write_dirs=dirs), steps)
    elif plan.get("no_new_privs", True) or filt is not None:
        step = steps("prctl(PR_SET_NO_NEW_PRIVS)")  # caps_mod.no_new_privs()'s step
        confine_ops = [(OP_PRCTL, step, _PR_SET_NO_NEW_PRIVS, 1, 0, None)]
    if filt is not None:
        # Last before execve, after no_new_privs (which the kernel requires of a process
        # without CAP_SYS_ADMIN): childsetup.child's order.
        flags = seccomp.NEW_LISTENER if filt.listen_guard else 0
        sock = notify_sock if filt.listen_guard else -1
        if sock >= 0:
            keep.add(sock)
        op = (OP_SECCOMP, steps("seccomp"), filt.seccomp_nr, flags, sock, filt.program)
        confine_ops.append(op)
    path = None if "exec" in fds else os.fsencode(plan["path"])
    argv = [os.fsencode(a) for a in plan["argv"]]
    envp = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in plan["env"].items()]
    roles = tuple(fds.get(r, -1) for r in ("stdout", "exec", "script", "cgroup"))
    first = sorted(keep | {fd for fd in roles if fd >= 0})
    args = (path, argv, envp, roles, sorted(keep), first, pre, confine_ops, list(reset))
    return args, steps


def spawn(
    module: Any,
    plan: dict[str, Any],
    fds: dict[str, int],
    reset: Sequence[int],
    confine: landlock.Ruleset | None,
    root: bool,
    last_cap: int,
    scratch_fd: int,
    rlimits: dict[str, tuple[int, str, int]],
    filt: seccomp.Filter | None = None,
    notify_sock: int = -1,
) -> tuple[int, str, int]:
    """Start the job; (pid, "", 0) once it runs, or (pid or 0, error text, errno).

    A pid with an error is a child that exited 127 and still has to be reaped.
    Raises OSError when no child could be made (the "fork" step).
    """
    if plan["argv"][0] == "":
        # os.execve refuses an empty argv[0] (ValueError, EINVAL in the fork path's
        # child): the same answer, without a child.
        return 0, proto.error_text("execve", errno.EINVAL), errno.EINVAL
    args, steps = build(
        plan, fds, reset, confine, root, last_cap, scratch_fd, rlimits, filt, notify_sock
    )
    pid, code, num = module.spawn(*args)
    if code is None:
        return pid, "", 0
    return pid, proto.error_text(steps.name(code), num or errno.EIO), num or errno.EIO


def reclaim(module: Any, uid: int, drop_caps: bool) -> tuple[int, str, int]:
    """The clean-up after a dynamic user whose job's cgroup leaf is empty
    (:func:`agent.keeper.uids.reclaim_work` with ``contained``) in a C child: (pid, "",
    0) when it ran, else (pid, error text, errno); the child has exited either way and
    is the caller's to reap. ``drop_caps``: a keeper that is not root drops the
    capabilities it keeps across the switch (uids.start_as_user's order). Raises OSError
    when no child could be made."""
    steps = Steps()
    switch = steps("user switch")
    ops: list[Op] = [
        (OP_SETGROUPS0, switch, 0, 0, 0, None),
        (OP_SETRESGID, switch, uid, 0, 0, None),
        (OP_SETRESUID, switch, uid, 0, 0, None),
    ]
    if drop_caps:
        data = struct.pack("=Ii6I", _CAP_VERSION_3, 0, *([0] * 6))
        ops.append((OP_CAPSET, steps("capset"), 0, 0, 0, data))
    pid, code, num = module.reclaim(uid, ops)
    if code is None:
        return pid, "", 0
    return pid, proto.error_text(steps.name(code), num or errno.EIO), num or errno.EIO
