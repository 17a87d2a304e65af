"""Linux capabilities of a job: names, and the system calls the spawner's child makes.

Standard library only (the spawner imports it). Pure half: :data:`NAMES` and
:func:`parse_names`. Kernel half (ctypes, run only in the spawner's forked child while
it is still root): :func:`apply`, in this order, which is the only one that works:

1. ``PR_CAPBSET_DROP`` of every capability not wanted: needs CAP_SETPCAP, so before
   the uid changes. Nothing the job later execs (a set-uid root binary, a file with
   capabilities) can ever get a dropped capability back.
2. ``PR_SET_KEEPCAPS`` when the job keeps capabilities but runs as another user:
   otherwise setresuid() away from root clears the permitted set.
3. ``setresuid`` (done by the caller, :mod:`agent.keeper.spawner`).
4. ``capset``: effective = permitted = inheritable = the wanted set, nothing more.
5. ``PR_CAP_AMBIENT_RAISE`` of each wanted capability for a non-root user: ambient
   capabilities are the only ones a non-root process keeps across execve of a plain
   file. A root job needs none: at exec, root's permitted set becomes its bounding set.
6. ``PR_SET_NO_NEW_PRIVS`` (set by Landlock's restrict(), or here when Landlock is
   not enforced) unless the entry says ``no_new_privs: false``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
from collections.abc import Iterable

# include/uapi/linux/capability.h
NAMES: dict[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26,
    "CAP_MKNOD": 27,
    "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}
# Capabilities that make every other confinement moot (load a module, ptrace the agent,
# mount over the Landlock rules, change uids at will): refused in a policy.
FORBIDDEN = frozenset(
    {
        "CAP_SYS_ADMIN",
        "CAP_SYS_MODULE",
        "CAP_SYS_PTRACE",
        "CAP_SYS_RAWIO",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETFCAP",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_MAC_ADMIN",
        "CAP_MAC_OVERRIDE",
        "CAP_BPF",
        "CAP_SYS_BOOT",
        "CAP_LINUX_IMMUTABLE",
    }
)

_PR_CAPBSET_READ, _PR_CAPBSET_DROP = 23, 24
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 47, 2
_VERSION_3 = 0x20080522


def parse_names(raw: Iterable[str]) -> tuple[list[int], list[str]]:
    """Capability numbers for names like ``CAP_NET_BIND_SERVICE`` (or ``net_bind_service``),
    and one problem text per unknown or forbidden name."""
    numbers: list[int] = []
    problems: list[str] = []
    for name in raw:
        full = name.upper() if name.upper().startswith("CAP_") else "CAP_" + name.upper()
        if full not in NAMES:
            problems.append(f"unknown capability {name!r}")
        elif full in FORBIDDEN:
            problems.append(f"{full} is refused: it would let the job undo its confinement")
        else:
            numbers.append(NAMES[full])
    return sorted(set(numbers)), problems


class CapError(OSError):
    """A failed capability system call; ``step`` names it."""

    def __init__(self, err: int, step: str) -> None:
        super().__init__(err, f"{step}: {errno.errorcode.get(err, err)}")
        self.step = step


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_L = ctypes.c_ulong


def _prctl(step: str, *args: int) -> int:
    ret: int = _libc.prctl(*(_L(a) for a in args))
    if ret < 0:
        raise CapError(ctypes.get_errno(), step)
    return ret


def last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(NAMES.values())


def drop_bounding(keep: Iterable[int], top: int) -> None:
    """Step 1: drop every capability but ``keep`` from the bounding set (needs CAP_SETPCAP)."""
    kept = set(keep)
    for cap in range(top + 1):
        if cap not in kept:
            _prctl(f"prctl(PR_CAPBSET_DROP, {cap})", _PR_CAPBSET_DROP, cap, 0, 0, 0)


def keep_caps() -> None:
    """Step 2: keep the permitted set across the coming setresuid() away from root."""
    _prctl("prctl(PR_SET_KEEPCAPS)", _PR_SET_KEEPCAPS, 1, 0, 0, 0)


def _capset(caps: Iterable[int]) -> None:
    """capset(2): exactly ``caps`` effective, permitted and inheritable (the kernel then
    clears every ambient capability not in both)."""
    masks = [0, 0]
    for cap in caps:
        masks[cap // 32] |= 1 << (cap % 32)
    head = _Header(_VERSION_3, 0)
    data = (_Data * 2)(*(_Data(m, m, m) for m in masks))
    if _libc.capset(ctypes.byref(head), data) < 0:
        raise CapError(ctypes.get_errno(), "capset")


def set_caps(caps: Iterable[int], *, ambient: bool) -> None:
    """Steps 4 and 5: exactly ``caps`` effective, permitted and inheritable (and ambient)."""
    wanted = sorted(set(caps))
    _capset(wanted)
    if ambient:
        for cap in wanted:
            step = f"prctl(PR_CAP_AMBIENT_RAISE, {cap})"
            _prctl(step, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0)


def no_new_privs() -> None:
    """Step 6: nothing the job execs may gain privileges (set-uid, file capabilities)."""
    _prctl("prctl(PR_SET_NO_NEW_PRIVS)", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


_CAP_SETGID, _CAP_SETUID = 6, 7


@functools.cache
def held() -> tuple[bool, bool]:
    """This process's own capabilities, read once (they do not change in the keeper's
    life): (whether it holds any, permitted or ambient; whether it may switch users:
    CAP_SETUID and CAP_SETGID effective). Both False when /proc cannot say."""
    try:
        with open("/proc/self/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f if b":" in line)
        prm = int(fields[b"CapPrm"].strip(), 16)
        amb = int(fields.get(b"CapAmb", b"0").strip(), 16)
        eff = int(fields[b"CapEff"].strip(), 16)
    except (OSError, KeyError, ValueError):
        return False, False
    switch = 1 << _CAP_SETUID | 1 << _CAP_SETGID
    return bool(prm or amb), eff & switch == switch


_CAP_SETPCAP = 8


@functools.cache
def gives_capabilities() -> bool:
    """Whether this process may run a job as any user with any capability it holds
    itself: root, or a keeper of another user holding CAP_SETUID, CAP_SETGID and
    CAP_SETPCAP effective (the privileged unit: User=worker-agent with these as ambient
    capabilities, plus what its entries give their jobs). Read once, as :func:`held`.

    Such a keeper sets a job up as root does (:mod:`agent.keeper.spawner`, the order
    in this module's docstring): drop the bounding set, switch ids (between two
    non-zero uids, or to 0, the permitted set stays), then capset the entry's set,
    which also clears every ambient capability of the keeper's the entry does not name.
    """
    import os

    if os.geteuid() == 0:
        return True
    need = 1 << _CAP_SETUID | 1 << _CAP_SETGID | 1 << _CAP_SETPCAP
    return _own_set(b"CapEff") & need == need


def _own_set(field: bytes) -> int:
    """One of this process's capability sets as a mask, read now (``CapPrm``,
    ``CapEff``...; 0 when /proc cannot say)."""
    try:
        with open("/proc/self/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f if b":" in line)
        return int(fields[field].strip(), 16)
    except (OSError, KeyError, ValueError):
        return 0


def narrow_to(keep: Iterable[int], top: int) -> list[int]:
    """Drop every capability but ``keep`` from this process's bounding, permitted,
    effective, inheritable (and so ambient) sets, for good: the privileged unit's keeper
    keeps what setting jobs up needs plus the union of its entries' capabilities, and
    nothing a wider drop-in gave it. Returns the capabilities it held and dropped.
    Needs CAP_SETPCAP (for the bounding set); raises CapError."""
    kept = set(keep)
    prm = _own_set(b"CapPrm")
    dropped = [cap for cap in range(top + 1) if cap not in kept and prm >> cap & 1]
    for cap in range(top + 1):
        if cap not in kept and _prctl("prctl(PR_CAPBSET_READ)", _PR_CAPBSET_READ, cap, 0, 0, 0):
            _prctl(f"prctl(PR_CAPBSET_DROP, {cap})", _PR_CAPBSET_DROP, cap, 0, 0, 0)
    _capset(cap for cap in range(top + 1) if cap in kept and prm >> cap & 1)
    return dropped


SWITCH = frozenset({_CAP_SETUID, _CAP_SETGID, _CAP_SETPCAP})  # what setting jobs up needs


def keep_only_for_jobs(entries: Iterable[Iterable[int]]) -> str:
    """In a keeper of another user that gives capabilities (the privileged unit's), at
    its start: keep what setting jobs up needs and the union of ``entries`` (each policy
    entry's capabilities), drop everything else (:func:`narrow_to`). Returns the line
    to log ("" for a root keeper or one that gives none); raises CapError.

    A capability an entry added by a later policy reload is then not the keeper's
    (:func:`not_held` says which): that entry's starts are refused until the keeper is
    restarted (:meth:`agent.keeper.decision.Decider.check_held`)."""
    import os

    if os.geteuid() == 0 or not gives_capabilities():
        return ""
    keep = set(SWITCH).union(*entries)
    dropped = narrow_to(keep, last_cap())
    kept = names_of(sorted(keep))
    gone = names_of(dropped) or "none"
    return f"capabilities: kept {kept} (job set-up and the entries' union); dropped {gone}"


def not_held(caps: Iterable[int]) -> list[int]:
    """Those of ``caps`` this process does not hold (its permitted set, read now), so
    cannot give a job: capset(2) would refuse them (EPERM)."""
    prm = _own_set(b"CapPrm")
    return [cap for cap in sorted(set(caps)) if not prm >> cap & 1]


def names_of(caps: Iterable[int]) -> str:
    """``CAP_X CAP_Y`` for capability numbers (a number the table does not name as is)."""
    names = {v: k for k, v in NAMES.items()}
    return " ".join(names.get(c, str(c)) for c in caps)


_PR_CAP_AMBIENT_CLEAR_ALL = 4


def drop_all() -> None:
    """Drop every capability (ambient, effective, permitted, inheritable): a job of a
    non-root keeper that holds some (CAP_SETUID, CAP_SETGID, CAP_CHOWN, given as ambient
    capabilities by its unit) must not inherit them (ambient ones survive execve)."""
    _prctl("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    set_caps((), ambient=False)


_KEYCTL_JOIN_SESSION_KEYRING = 1
_NR_KEYCTL = {"x86_64": 250, "aarch64": 219}


def new_session_keyring() -> None:
    """Join a new anonymous session keyring (the caller's uid owns it): a job switched to
    its own user must not possess the keeper's session keyring, which every job would
    inherit, and through it each other's keys."""
    import os

    nr = _NR_KEYCTL.get(os.uname().machine)
    if nr is None:
        return  # not x86-64 or arm64: this fork-path fallback cannot name keyctl (the C path can)
    if _libc.syscall(ctypes.c_long(nr), ctypes.c_long(_KEYCTL_JOIN_SESSION_KEYRING), None) < 0:
        err = ctypes.get_errno()
        # Refused to this process (a container's filter: systemd-nspawn refuses keyctl),
        # so refused to the job too: there is no keyring to share.
        if err not in (errno.ENOSYS, errno.EPERM):
            raise CapError(err, "keyctl(KEYCTL_JOIN_SESSION_KEYRING)")
