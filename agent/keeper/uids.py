"""Dynamic users: each job its own uid from a reserved range.

As systemd's ``DynamicUser=``: a job whose policy entry names no ``user:`` runs as a uid
(and the gid of the same number) taken from ``[jobs] dynamic_uid_min..dynamic_uid_max``
when it starts and given back when it has ended, that is once its cgroup is empty and
what the uid left behind is gone (:func:`reclaim`). No ``/etc/passwd`` entry is needed:
the kernel knows uids, not names.

Three parts:

* :class:`Pool`, pure: which uids are taken; a free one is handed out round-robin, so a
  released uid is reused as late as possible.
* :func:`keeper_filter` and :func:`install_keeper_filter`: the seccomp filter the keeper
  puts on itself, so that even code execution in the keeper cannot take uid 0 or any
  uid or gid outside the range (the kernel refuses, not the keeper's own checks).
* :func:`as_user`: a short-lived child of the keeper that becomes a job's uid to do
  what only that uid may do without CAP_KILL: signal the job's processes, and at its
  end kill whatever the uid still runs and remove its System V IPC objects, POSIX
  message queues and shared memory files, and clear its keyrings (as systemd's
  ``RemoveIPC=``), so the next job given the uid inherits nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.keeper import capabilities, seccomp, vspawn

# ---------------------------------------------------------------- the pool


@dataclass
class Pool:
    """The uids ``lo..hi`` (both included) and which of them jobs hold."""

    lo: int
    hi: int
    held: set[int] = field(default_factory=set)
    _next: int = -1

    def __post_init__(self) -> None:
        if not 0 < self.lo <= self.hi < 0xFFFFFFFF:
            raise ValueError(f"bad dynamic uid range {self.lo}-{self.hi}")
        self._next = self.lo

    def take(self) -> int | None:
        """A free uid, now held; None when every uid of the range is held."""
        size = self.hi - self.lo + 1
        if len(self.held) >= size:
            return None
        uid = self._next
        while uid in self.held:
            uid = self.lo if uid >= self.hi else uid + 1
        self.held.add(uid)
        self._next = self.lo if uid >= self.hi else uid + 1
        return uid

    def release(self, uid: int) -> None:
        """Give ``uid`` back (after :func:`reclaim`): it may be handed out again."""
        self.held.discard(uid)

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.lo <= uid <= self.hi


# ---------------------------------------------------------------- the keeper's filter

# The calls that change a process's ids, and which arguments are ids (libseccomp's
# names; one missing on an architecture is skipped: chown and lchown on arm64).
ID_CALLS: dict[str, tuple[int, ...]] = {
    "setuid": (0,),
    "setgid": (0,),
    "setreuid": (0, 1),
    "setregid": (0, 1),
    "setresuid": (0, 1, 2),
    "setresgid": (0, 1, 2),
    "setfsuid": (0,),
    "setfsgid": (0,),
    "setuid32": (0,),
    "setgid32": (0,),
    "setreuid32": (0, 1),
    "setregid32": (0, 1),
    "setresuid32": (0, 1, 2),
    "setresgid32": (0, 1, 2),
    "setfsuid32": (0,),
    "setfsgid32": (0,),
    # Files: the keeper hands each job's scratch directory to the job's uid.
    "chown": (1, 2),
    "lchown": (1, 2),
    "fchown": (1, 2),
    "fchownat": (2, 3),
    "chown32": (1, 2),
    "lchown32": (1, 2),
    "fchown32": (1, 2),
}
# setgroups(size, list): only size 0 (a job gets no supplementary groups).
GROUP_CALLS = ("setgroups", "setgroups32")
_LD_ABS, _JEQ, _JGE, _JGT, _RET = 0x20, 0x15, 0x35, 0x25, 0x06
_NO_ID = 0xFFFFFFFF  # (uid_t) -1: "leave this id as it is"
_X32_BIT = 0x40000000
_AUDIT_ARCH_X86_64 = 0xC000003E

Insn = tuple[int, int | str, int | str, int]


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` in struct seccomp_data."""
    return 16 + 8 * index + (0 if sys.byteorder == "little" else 4)


def keeper_filter(lo: int, hi: int, arch: int, numbers: dict[str, int]) -> bytes:
    """The BPF program (struct sock_filter[]) that lets the id calls of ``numbers`` (name
    -> this architecture's number) through only with ids in ``lo..hi`` or -1, and
    setgroups only with size 0; everything else passes. Pure: the caller resolves
    ``arch`` and ``numbers``.

    Why each id is compared on its low 32 bits: uid_t is 32 bits and the kernel reads
    only those, so a value 0x1_0000_0000 is uid 0 to the kernel; the filter sees the same
    32 bits. Why not libseccomp's rules (agent.keeper.seccomp): "in a range or -1" is
    three comparisons of one argument, and libseccomp allows one per argument and rule.
    A call of another ABI (i386, x32) is refused outright, as systemd's
    SystemCallArchitectures=native does: its numbers differ and are not checked here.
    """
    deny = seccomp.errno_action(errno.EPERM)
    prog: list[Insn] = [(_LD_ABS, 0, 0, 4), (_JEQ, 0, "deny", arch), (_LD_ABS, 0, 0, 0)]
    if arch == _AUDIT_ARCH_X86_64:
        prog.append((_JGE, "deny", 0, _X32_BIT))
    blocks: list[Insn] = []
    for name, nr in sorted(numbers.items(), key=lambda kv: kv[1]):
        if nr < 0:
            continue
        label = f"sc_{name}"
        prog.append((_JEQ, label, 0, nr))
        blocks.append((-1, label, 0, 0))  # a label
        if name in GROUP_CALLS:
            blocks += [(_LD_ABS, 0, 0, _arg_low(0)), (_JEQ, "allow", "deny", 0)]
            continue
        for i, arg in enumerate(ID_CALLS[name]):
            nxt = f"{label}_{i + 1}"
            blocks += [
                (_LD_ABS, 0, 0, _arg_low(arg)),
                (_JEQ, nxt, 0, _NO_ID),
                (_JGE, 0, "deny", lo),
                (_JGT, "deny", nxt, hi),
                (-1, nxt, 0, 0),
            ]
        blocks.append((_JEQ, "allow", "allow", 0))  # the block's end: allowed
    prog += [(-1, "allow", 0, 0), (_RET, 0, 0, seccomp.ACT_ALLOW)]
    prog += blocks
    prog += [(-1, "allow", 0, 0), (_RET, 0, 0, seccomp.ACT_ALLOW)]
    prog += [(-1, "deny", 0, 0), (_RET, 0, 0, deny)]
    return _assemble(prog)


def _assemble(prog: list[Insn]) -> bytes:
    """Resolve labels (code -1; a label used twice: its first definition after the
    jump) into forward jump offsets."""
    out: list[tuple[int, int | str, int | str, int]] = []
    labels: dict[str, list[int]] = {}
    for code, a, b, k in prog:
        if code == -1:
            assert isinstance(a, str)
            labels.setdefault(a, []).append(len(out))
        else:
            out.append((code, a, b, k))

    def offset(i: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        at = next(p for p in labels[target] if p > i)
        if at - i - 1 > 255:
            raise ValueError("keeper filter: a jump too far")
        return at - i - 1

    return b"".join(
        struct.pack("=HBBI", code, offset(i, a), offset(i, b), k & 0xFFFFFFFF)
        for i, (code, a, b, k) in enumerate(out)
    )


_PR_SET_NO_NEW_PRIVS = 38


def install_keeper_filter(lo: int, hi: int) -> None:
    """Put :func:`keeper_filter` on the calling process (and so on every process it
    starts from now on), after no_new_privs (which the filter needs, and which keeps a
    set-uid root program from giving the keeper uid 0 anyway). Irreversible. Raises
    SeccompError when libseccomp (for the numbers) or the kernel cannot do it."""
    arch = seccomp.native_arch()
    names = (*ID_CALLS, *GROUP_CALLS)
    numbers = {name: seccomp.syscall_number(name) for name in names}
    program = keeper_filter(lo, hi, arch, numbers)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
        err = ctypes.get_errno()
        raise seccomp.SeccompError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    seccomp.install_program(program)


# ---------------------------------------------------------------- acting as a job's uid


def user_of(raw: object) -> tuple[int, int] | None:
    """(uid, gid) from a job file's ``user`` ([uid, gid], as JSON keeps a tuple); None
    for anything else (no such entry, an older keeper's file, a damaged one)."""
    if (
        isinstance(raw, list)
        and len(raw) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 0xFFFFFFFF for x in raw)
    ):
        return raw[0], raw[1]
    return None


def as_user(uid: int, gid: int, work: Callable[[], object], keep: tuple[int, ...] = ()) -> bool:
    """Run ``work`` in a child of this process switched to ``uid``/``gid`` with no
    groups and no capabilities; True when it ran to the end. The child closes every
    descriptor but ``keep`` first: nothing of the keeper's stays in a process of a
    job's uid (and after the switch the kernel makes it non-dumpable, so a job of that
    uid cannot ptrace it)."""
    pid = start_as_user(uid, gid, work, keep)
    if pid is None:
        return False
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def start_as_user(
    uid: int, gid: int, work: Callable[[], object], keep: tuple[int, ...] = ()
) -> int | None:
    """:func:`as_user` without the wait: the helper's pid (its exit status 0 when ``work``
    ran to the end; the caller reaps it), or None when it could not be forked."""
    try:
        pid = os.fork()
    except OSError as e:
        print(f"agent keeper: cannot fork a helper for uid {uid}: {e}", file=sys.stderr)
        return None
    if pid == 0:  # pragma: no cover - the helper's own process
        code = 1
        try:
            lo = 3
            for fd in sorted(k for k in keep if k >= 3):
                os.closerange(lo, fd)
                lo = fd + 1
            os.closerange(lo, os.sysconf("SC_OPEN_MAX"))
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if os.geteuid() != 0:
                # A keeper with CAP_SETUID keeps it across a switch between two non-zero
                # uids: dropped, so the helper holds nothing the job does not.
                capabilities.set_caps((), ambient=False)
            work()
            code = 0
        except BaseException as e:
            with contextlib.suppress(BaseException):
                print(f"agent keeper: helper as uid {uid}: {e}", file=sys.stderr)
        finally:
            os._exit(code)
    return pid


def signal_as(
    uid: int,
    gid: int,
    sig: int,
    group: int = 0,
    members: Callable[[], list[int]] | None = None,
) -> bool:
    """Send ``sig`` as ``uid`` (a helper, :func:`as_user`) to the process group ``group``
    (when not 0) and to every process ``members`` lists (a job's cgroup leaf:
    ``JobCgroup.pids``), never to a pid reused meanwhile; True when the helper ran.

    The members are read and pinned with pidfds here, in the keeper, and signalled only
    if still listed after that (a process cannot leave the leaf for a pid's new owner);
    the helper gets the pidfds: it could not read the leaf itself (the keeper's cgroup
    directories are 0700) and needs no /proc.
    """
    pinned: dict[int, int] = {}
    try:
        if members is not None:
            for pid in members():
                with contextlib.suppress(OSError):
                    pinned[pid] = os.pidfd_open(pid)
            still = set(members())
            for pid in [p for p in pinned if p not in still]:
                os.close(pinned.pop(pid))
        fds = tuple(pinned.values())

        def work() -> None:
            if group > 0:
                with contextlib.suppress(OSError):
                    os.killpg(group, sig)
            for fd in fds:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, sig)

        return as_user(uid, gid, work, keep=fds)
    finally:
        for fd in pinned.values():
            os.close(fd)


def kill_everything(uid: int) -> None:
    """Kill every process of ``uid``, the caller's uid (the caller excepted): kill(-1) as a
    user with no CAP_KILL reaches exactly the processes whose real or saved uid is the
    caller's. Its answer says nothing (0 as soon as one process was looked at), so /proc
    says when none is left (zombies aside: they hold nothing); repeated, because a
    process forking meanwhile may be missed by one round. With a job cgroup (the
    deployments' way) nothing is left by then: a job cannot leave its cgroup."""
    for _ in range(200):
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)
        if not live_processes(uid):
            return
        time.sleep(0.005)
    raise OSError(errno.EBUSY, "processes of the uid are still being created")


def live_processes(uid: int) -> list[int]:
    """The pids /proc shows owned by ``uid`` that are not zombies (the caller's excepted)."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X"):
            found.append(int(name))
    return found


_libc = ctypes.CDLL(None, use_errno=True)
_IPC_RMID = 0
# (the *_INFO command that answers the highest index, the *_STAT_ANY command: Linux 4.17)
_IPC_KINDS = {"shm": (14, 15), "msg": (12, 13), "sem": (19, 20)}


def _ipc_ctl(kind: str, ident: int, cmd: int, buf: ctypes.Array[ctypes.c_char] | None) -> int:
    if kind == "shm":
        return int(_libc.shmctl(ident, cmd, buf))
    if kind == "msg":
        return int(_libc.msgctl(ident, cmd, buf))
    return int(_libc.semctl(ident, 0, cmd, buf))


def remove_ipc(uid: int) -> int:
    """Remove every System V IPC object ``uid`` owns or created in this IPC namespace
    (the caller runs as ``uid``: IPC_RMID needs no privilege then). Returns how many."""
    removed = 0
    for kind, (info, stat_any) in _IPC_KINDS.items():
        buf = ctypes.create_string_buffer(512)
        top = _ipc_ctl(kind, 0, info, buf)
        for index in range(top + 1):
            ident = _ipc_ctl(kind, index, stat_any, buf)
            if ident < 0:
                continue
            # struct ipc_perm starts every *id_ds: key, uid, gid, cuid, cgid.
            _key, owner, _gid, creator = struct.unpack_from("=iIII", buf.raw)
            if uid in (owner, creator) and _ipc_ctl(kind, ident, _IPC_RMID, None) == 0:
                removed += 1
    return removed


def remove_files(uid: int, directory: str) -> int:
    """Unlink what ``uid`` owns directly in ``directory`` (POSIX message queues in
    /dev/mqueue, shared memory in /dev/shm: both sticky, so the owner may). Returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_uid == uid and not entry.is_dir(
                follow_symlinks=False
            ):
                os.unlink(entry.path)
                removed += 1
    return removed


_KEYCTL_GET_KEYRING_ID, _KEYCTL_CLEAR = 0, 7
_KEY_SPEC_USER_KEYRING, _KEY_SPEC_USER_SESSION_KEYRING = -4, -5


def clear_keyrings() -> None:
    """Empty the caller's user and user-session keyrings: they belong to the uid, not to
    a process, and outlive every process of it."""
    nr = seccomp.syscall_number("keyctl")
    if nr < 0:
        return
    for spec in (_KEY_SPEC_USER_KEYRING, _KEY_SPEC_USER_SESSION_KEYRING):
        ring = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(_KEYCTL_GET_KEYRING_ID),
                             ctypes.c_long(spec), ctypes.c_long(0))  # fmt: skip
        if ring >= 0:
            _libc.syscall(ctypes.c_long(nr), ctypes.c_long(_KEYCTL_CLEAR), ctypes.c_long(ring))


def reclaim_work(uid: int, *, contained: bool = False) -> Callable[[], None]:
    """What :func:`as_user` does at a job's end, before ``uid`` goes back to the pool.

    ``contained``: the job ran in a cgroup leaf that is empty now. Every process of the
    uid was in it (the uid is this job's alone, and a job cannot leave its leaf), so none
    is left: one kill as a safeguard, without the /proc scan that proves it (a stat of
    every process on the host, most of the cleanup's cost on a busy one).
    """

    def work() -> None:
        if contained:
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)
        else:
            kill_everything(uid)
        remove_ipc(uid)
        remove_files(uid, "/dev/mqueue")
        remove_files(uid, "/dev/shm")
        clear_keyrings()

    return work


def reclaim(uid: int, *, contained: bool = False) -> bool:
    """Everything of ``uid`` gone (see :func:`reclaim_work`); True when it all ran."""
    return as_user(uid, uid, reclaim_work(uid, contained=contained))


def reclaim_contained(module: Any, uid: int) -> bool:
    """:func:`reclaim` with ``contained``, done by the C extension's child (``module``:
    agent.keeper._vspawn): the same steps with the uid's rights, without forking the
    keeper (about 0.1 ms instead of several, most of them copy-on-write faults). True
    when it all ran; the child is reaped here."""
    try:
        pid, error, _ = vspawn.reclaim(module, uid, drop_caps=os.geteuid() != 0)
    except OSError as e:
        print(f"agent keeper: cannot start the clean-up of uid {uid}: {e}", file=sys.stderr)
        return False
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return False
    if error:
        print(f"agent keeper: clean-up as uid {uid}: {error}", file=sys.stderr)
        return False
    return os.waitstatus_to_exitcode(status) == 0


def start_reclaim(uid: int, *, contained: bool = False) -> int | None:
    """:func:`reclaim` without the wait: the helper's pid (exit status 0 when it all ran),
    or None when it could not be started."""
    return start_as_user(uid, uid, reclaim_work(uid, contained=contained))
