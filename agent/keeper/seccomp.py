"""seccomp filters for job processes: libseccomp through ctypes, standard library only.

Landlock confines what a job may reach by path and TCP port; it does not cover every way
out (measured on Linux 6.18, ABI 7): a multipath-TCP socket connects and binds past the
TCP rules, listen() on an unbound socket takes an ephemeral port with no bind check, UDP
and other socket families have no Landlock right, and namespaces, io_uring, keyrings,
System V IPC and the like are kernel interfaces Landlock does not know. This module
closes those with a seccomp filter derived from the job's policy entry.

Three halves:

* Pure planning: a :class:`SeccompSpec` (the entry's ``udp``, ``syscalls: {allow}`` and
  its listen mode, from ``landlock: bind_tcp``) becomes a list of :class:`Rule`
  (:func:`plan_rules`): default ALLOW, and refusals by syscall and argument. Every
  refusal is an errno (EPERM; EAFNOSUPPORT for a socket family; ENOSYS for clone3),
  never a kill, so programs fall back the way they do on a kernel without the feature.
* Compiling: :func:`compile_filter` hands the rules to libseccomp (``libseccomp.so.2``,
  the library systemd, runc and podman use) and exports the BPF program as bytes. It
  runs once per entry in the job spawner, never in a job's child. Why ctypes and not the
  spawner's C extension or a binding: the extension is optional (the spawner's Python
  fork path must enforce the same box without a compiler), Debian's python3-seccomp
  binds only Debian's own interpreter, and libseccomp is needed only at prepare time,
  so a thin binding of seven functions is the smallest dependable bridge.
* Installing: the child (the Python fork path here, :func:`install`; the C vfork path
  in ``_vspawn.c``) makes one system call, ``seccomp(SECCOMP_SET_MODE_FILTER, ...)``,
  last before execve, after no_new_privs and Landlock. The filter binds the job and
  everything it execs or forks.

listen() on a socket that is not bound cannot be told apart by a filter (it sees
registers, not sockets): for an entry whose ``bind_tcp`` lists ports the filter hands
each listen() to the spawner (SECCOMP_RET_USER_NOTIF), which looks at the socket and
either performs the listen() on it or refuses (see :class:`ListenGuard`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.keeper import capabilities

# Actions (include/uapi/linux/seccomp.h).
ACT_ALLOW = 0x7FFF0000
ACT_NOTIFY = 0x7FC00000
_ACT_ERRNO = 0x00050000
# Comparison operators (seccomp.h of libseccomp: enum scmp_compare).
_NE, _EQ, _GT, _MASKED_EQ = 1, 4, 6, 7
_SOCK_TYPE_MASK = 0xF
_IPPROTO_TCP, _IPPROTO_UDP = 6, 17

# Address families allowed by default; AF_NETLINK with the `netlink` group.
_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK = 1, 2, 10, 16
_AF_MAX = 64  # families above every real one are refused by one GT comparison

# Namespace flags of clone() and unshare() (include/uapi/linux/sched.h). CLONE_NEWTIME
# (0x80) is valid for unshare only: in clone() that bit belongs to the exit signal.
_CLONE_NS_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)
_CLONE_NEWTIME = 0x00000080

# Groups an entry may allow with `syscalls: {allow: [...]}`: refused (EPERM) otherwise.
# `namespaces` and `netlink` are argument rules as well (see plan_rules).
GROUPS: dict[str, tuple[str, ...]] = {
    "namespaces": ("setns",),
    "mount": (
        "mount",
        "umount",
        "umount2",
        "pivot_root",
        "open_tree",
        "move_mount",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "mount_setattr",
    ),
    "bpf": ("bpf",),
    "perf_event": ("perf_event_open",),
    "userfaultfd": ("userfaultfd",),
    # A way around the socket rules: io_uring's own socket and connect operations.
    "io_uring": ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    "keyring": ("keyctl", "add_key", "request_key"),
    # Their objects outlive the job (they belong to the IPC namespace, not the process).
    "sysv_ipc": (
        "shmget",
        "shmat",
        "shmdt",
        "shmctl",
        "msgget",
        "msgsnd",
        "msgrcv",
        "msgctl",
        "semget",
        "semop",
        "semtimedop",
        "semctl",
        "ipc",
    ),
    "ptrace": ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd"),
    # POSIX message queues: like System V IPC, they outlive the job (/dev/mqueue).
    "mqueue": (
        "mq_open",
        "mq_unlink",
        "mq_timedsend",
        "mq_timedreceive",
        "mq_notify",
        "mq_getsetattr",
    ),
    # Setting the clock needs CAP_SYS_TIME, which an entry may be given.
    "clock": ("settimeofday", "clock_settime", "stime"),
    "netlink": (),
}
# Refused whatever the entry says: only capabilities the policy never grants
# (capabilities.FORBIDDEN: SYS_MODULE, SYS_BOOT, SYS_ADMIN, SYS_RAWIO, DAC_READ_SEARCH)
# make them do anything, so a refusal here is defence in depth that costs nobody.
ALWAYS: tuple[str, ...] = (
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "iopl",
    "ioperm",
    "open_by_handle_at",
    "lookup_dcookie",
    # CAP_SYS_PACCT is not forbidden, but acct() switches process accounting on for the
    # whole host, writing to a file of the job's choosing: never a job's business.
    "acct",
)
LISTEN_MODES = ("none", "bound", "any")
LISTEN_CHECKS = 50  # listen() checks the spawner makes for a job each second (see ListenGuard)


def errno_action(err: int) -> int:
    """The filter action that fails a call with ``err``."""
    return _ACT_ERRNO | (err & 0xFFFF)


class SeccompError(OSError):
    """libseccomp or the kernel refused; str() names the step."""


@dataclass(frozen=True)
class SeccompSpec:
    """What an entry's jobs may do beyond the default box (see the module docstring).

    ``listen``: "none" refuses listen() (an entry without bind_tcp), "bound" lets the
    spawner check that the socket is bound (bind_tcp lists ports), "any" allows it
    (bind_tcp: any, where binding any port is allowed anyway).
    """

    udp: bool = False
    allow: tuple[str, ...] = ()
    listen: str = "none"


@dataclass(frozen=True)
class Rule:
    """Apply ``action`` to ``syscall`` when every comparison holds.

    Comparisons are (argument index, operator, datum A, datum B) as in libseccomp's
    ``scmp_arg_cmp``; at most one per argument (libseccomp refuses more).
    """

    syscall: str
    action: int
    args: tuple[tuple[int, int, int, int], ...] = ()


def _eq(arg: int, value: int) -> tuple[int, int, int, int]:
    return (arg, _EQ, value, 0)


def _refuse_all_but(arg: int, allowed: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Comparisons that together match every value of ``arg`` but ``allowed``.

    libseccomp allows one comparison per argument and rule, so "not in a set" is one rule
    per refused value below the largest allowed one and one GT for everything above.
    Comparisons are on all 64 bits: a value with high bits set never equals an allowed one.
    """
    hi = max(allowed)
    out = [_eq(arg, v) for v in range(0, hi) if v not in allowed]
    out.append((arg, _GT, hi, 0))
    return out


def plan_rules(spec: SeccompSpec) -> list[Rule]:
    """The rules of an entry's filter (default ALLOW). Raises ValueError on an unknown
    group or listen mode (the policy validates both first)."""
    unknown = [g for g in spec.allow if g not in GROUPS]
    if unknown or spec.listen not in LISTEN_MODES:
        raise ValueError(f"unknown seccomp group(s) or listen mode: {unknown or spec.listen}")
    eperm, rules = errno_action(errno.EPERM), []
    rules += [Rule(name, eperm) for name in ALWAYS]
    for group, names in GROUPS.items():
        if group not in spec.allow:
            rules += [Rule(name, eperm) for name in names]
    if "namespaces" not in spec.allow:
        for flag in _CLONE_NS_FLAGS:
            rules.append(Rule("clone", eperm, ((0, _MASKED_EQ, flag, flag),)))
        for flag in (*_CLONE_NS_FLAGS, _CLONE_NEWTIME):
            rules.append(Rule("unshare", eperm, ((0, _MASKED_EQ, flag, flag),)))
        # clone3 passes its flags in memory, which a filter cannot read. ENOSYS, not
        # EPERM: glibc (threads, posix_spawn) then falls back to clone(), checked above.
        rules.append(Rule("clone3", errno_action(errno.ENOSYS)))
    # socket(family, type, protocol): families first (EAFNOSUPPORT), then, for the IP
    # families, types and protocols (EPERM): stream with 0/TCP, datagram with 0/UDP.
    families = [_AF_UNIX, _AF_INET, _AF_INET6] + ([_AF_NETLINK] if "netlink" in spec.allow else [])
    noafs = errno_action(errno.EAFNOSUPPORT)
    for cmp in _refuse_all_but(0, families):
        rules.append(Rule("socket", noafs, (cmp,)))
    types = {socket.SOCK_STREAM: _IPPROTO_TCP}
    if spec.udp:
        types[socket.SOCK_DGRAM] = _IPPROTO_UDP
    for family in (_AF_INET, _AF_INET6):
        for t in range(_SOCK_TYPE_MASK + 1):
            if t not in types:
                rules.append(
                    Rule("socket", eperm, (_eq(0, family), (1, _MASKED_EQ, _SOCK_TYPE_MASK, t)))
                )
        for t, proto in types.items():
            kind = (1, _MASKED_EQ, _SOCK_TYPE_MASK, t)
            for cmp in _refuse_all_but(2, [0, proto]):
                rules.append(Rule("socket", eperm, (_eq(0, family), kind, cmp)))
    if spec.listen == "none":
        rules.append(Rule("listen", eperm))
    elif spec.listen == "bound":
        rules.append(Rule("listen", ACT_NOTIFY))
    return rules


# ---------------------------------------------------------------- libseccomp


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


_SCMP_FLTATR_ACT_BADARCH = 2
_SCMP_FLTATR_CTL_NNP = 3
_SCMP_FLTATR_CTL_OPTIMIZE = 8
_NR_ERROR = -1  # __NR_SCMP_ERROR: no such syscall on this architecture
LIBRARY = "libseccomp.so.2"


@functools.cache
def _lib() -> ctypes.CDLL:
    """libseccomp, loaded once; raises SeccompError when it cannot be loaded."""
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as e:
        raise SeccompError(errno.ENOENT, f"{LIBRARY} cannot be loaded ({e})") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    return lib


def library_version() -> str:
    """libseccomp's version ("2.5.4"); raises SeccompError when it cannot be loaded."""
    v = _lib().seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def syscall_number(name: str) -> int:
    """The native number of ``name``, -1 when this architecture has none."""
    nr: int = _lib().seccomp_syscall_resolve_name(name.encode())
    return nr if nr >= 0 else _NR_ERROR


def compile_filter(rules: Sequence[Rule]) -> bytes:
    """The BPF program (struct sock_filter[]) of ``rules`` on a default-ALLOW filter for
    the native architecture. Syscalls of other architectures (x32, i386 on x86-64) get
    EPERM. Rules for syscalls this architecture lacks are skipped. Raises SeccompError."""
    lib = _lib()
    ctx = lib.seccomp_init(ACT_ALLOW)
    if not ctx:
        raise SeccompError(errno.ENOMEM, "seccomp_init failed")
    try:

        def check(rc: int, step: str) -> None:
            if rc < 0:
                raise SeccompError(-rc, f"{step}: {os.strerror(-rc)}")

        # A foreign architecture's call is refused, not killed (the default kills).
        check(
            lib.seccomp_attr_set(ctx, _SCMP_FLTATR_ACT_BADARCH, errno_action(errno.EPERM)),
            "seccomp_attr_set(ACT_BADARCH)",
        )
        # no_new_privs is the child's to set (Landlock's step sets it before); the
        # exported program never sets anything.
        check(lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_NNP, 0), "seccomp_attr_set(CTL_NNP)")
        # A binary tree of syscall numbers: the calls the filter does not name (almost
        # all) pass after a few comparisons. Older libseccomp lacks it: then linear.
        lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_OPTIMIZE, 2)
        for rule in rules:
            nr = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
            if nr < 0:
                continue  # not on this architecture (umount, stime, ipc on x86-64)
            cmps = (_ArgCmp * max(1, len(rule.args)))(*(_ArgCmp(*a) for a in rule.args))
            check(
                lib.seccomp_rule_add_array(ctx, rule.action, nr, len(rule.args), cmps),
                f"seccomp_rule_add {rule.syscall}",
            )
        r, w = os.pipe()
        try:
            rc = lib.seccomp_export_bpf(ctx, w)
            os.close(w)
            w = -1
            check(rc, "seccomp_export_bpf")
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    finally:
        lib.seccomp_release(ctx)
    program = b"".join(chunks)
    if not program or len(program) % 8:
        raise SeccompError(errno.EINVAL, "seccomp_export_bpf: no program")
    return program


# ---------------------------------------------------------------- the kernel

_PR_GET_SECCOMP = 21
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_GET_ACTION_AVAIL = 2
NEW_LISTENER = 1 << 3  # SECCOMP_FILTER_FLAG_NEW_LISTENER
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_L = ctypes.c_long


def _seccomp_nr() -> int:
    nr = syscall_number("seccomp")
    if nr < 0:
        raise SeccompError(errno.ENOSYS, "the seccomp system call is unknown here")
    return nr


def unavailable(listen_check: bool = False) -> str:
    """Why filters cannot be enforced here ("" when they can): libseccomp missing, or a
    kernel without seccomp filters (or, with ``listen_check``, without user notification)."""
    try:
        library_version()
        nr = _seccomp_nr()
    except SeccompError as e:
        return e.strerror or str(e)
    if _libc.prctl(_L(_PR_GET_SECCOMP), _L(0), _L(0), _L(0), _L(0)) < 0:
        return f"the kernel has no seccomp ({os.strerror(ctypes.get_errno())})"
    for action, what in ((_ACT_ERRNO, "SECCOMP_RET_ERRNO"), (ACT_NOTIFY, "SECCOMP_RET_USER_NOTIF")):
        if action == ACT_NOTIFY and not listen_check:
            continue
        act = ctypes.c_uint32(action)
        if _libc.syscall(_L(nr), _L(_SECCOMP_GET_ACTION_AVAIL), _L(0), ctypes.byref(act)) < 0:
            return f"the kernel's seccomp lacks {what} ({os.strerror(ctypes.get_errno())})"
    return ""


def fprog(program: bytes) -> tuple[ctypes.Array[ctypes.c_char], ctypes.Structure]:
    """struct sock_fprog for ``program``, and the buffer it points to (keep both alive)."""

    class _SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    return buf, _SockFprog(len(program) // 8, ctypes.addressof(buf))


@dataclass
class Filter:
    """A compiled filter and what the child needs to install it (built in the spawner)."""

    program: bytes
    listen_guard: bool  # installed with a user-notification listener (listen "bound")
    seccomp_nr: int

    def __post_init__(self) -> None:
        self._buf, self._fprog = fprog(self.program)

    def install(self) -> int:
        """Install the filter on the calling process (the forked child, last before
        execve, after no_new_privs). Returns the listener descriptor (close-on-exec)
        when the filter has one, else -1. Raises SeccompError."""
        flags = NEW_LISTENER if self.listen_guard else 0
        ret: int = _libc.syscall(
            _L(self.seccomp_nr), _L(_SECCOMP_SET_MODE_FILTER), _L(flags), ctypes.byref(self._fprog)
        )
        if ret < 0:
            err = ctypes.get_errno()
            raise SeccompError(err, f"seccomp(SET_MODE_FILTER): {os.strerror(err)}")
        return ret if self.listen_guard else -1


def native_arch() -> int:
    """This architecture's AUDIT_ARCH_* value, as a filter sees it in seccomp_data.arch
    (libseccomp's SCMP_ARCH_NATIVE token is that value). Raises SeccompError."""
    lib = _lib()
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    return int(lib.seccomp_arch_native())


def install_program(program: bytes) -> None:
    """Install a BPF program on the calling process (no_new_privs already set). Raises
    SeccompError."""
    Filter(program, False, _seccomp_nr()).install()


def prepare(spec: SeccompSpec) -> Filter:
    """Plan and compile an entry's filter (in the spawner, once per entry). Raises
    SeccompError when libseccomp or the kernel cannot do it."""
    program = compile_filter(plan_rules(spec))
    return Filter(program, spec.listen == "bound", _seccomp_nr())


# ---------------------------------------------------------------- listen() checks

# struct seccomp_notif: id u64, pid u32, flags u32, data {nr i32, arch u32, ip u64,
# args u64[6]}; struct seccomp_notif_resp: id u64, val s64, error s32, flags u32.
_NOTIF = struct.Struct("=QIIiIQ6Q")
_RESP = struct.Struct("=QqiI")
_IOCTL_NOTIF_RECV = 0xC0502100
_IOCTL_NOTIF_SEND = 0xC0182101
_IOCTL_NOTIF_ID_VALID = 0x40082102
_NR_PIDFD_OPEN, _NR_PIDFD_GETFD = 434, 438  # the generic table: the same on every arch


class ListenGuard:
    """The spawner's side of a job's listen() checks (one per job with listen "bound").

    The filter stops each listen() of the job (and of every process it starts) and the
    kernel queues it on ``fd``. :meth:`handle` takes the socket from the job
    (pidfd_getfd: the same open socket, not a copy of its state), and if it is bound —
    a unix socket with an address, or an IP socket with a port — performs the listen()
    on it with the job's backlog and answers with the result; an unbound one is refused
    with EPERM. Doing the listen() here rather than answering "continue" leaves no
    window in which the job could swap another socket under the same descriptor number.

    pidfd_getfd is ptrace-checked. A spawner of the job's own user passes; a root
    spawner whose job runs as another user would need CAP_SYS_PTRACE, which the
    privileged unit does not give it: it forks a helper that becomes the job's user
    (with the job's capabilities, so it holds every capability the job does) and takes
    the socket as that user. listen() calls are rare (a server's start), so the fork is.
    """

    def __init__(
        self, fd: int, uid: int | None = None, gid: int | None = None, caps: Sequence[int] = ()
    ) -> None:
        self.fd = fd
        self._window = 0.0  # start of the current second of checks
        self._checks = 0  # checks made in it
        self.uid = os.geteuid() if uid is None else uid
        self.gid = self.uid if gid is None else gid  # the spawner's default (switch_user)
        self.caps = tuple(caps)

    def handle(self) -> None:
        """Answer one queued listen(); never raises (a vanished job is nothing to do)."""
        if self.fd < 0:
            # Closed since the selector reported it: the job's exit came first in the same
            # turn (measured: fcntl.ioctl(-1) raises ValueError, which killed the spawner).
            return
        buf = bytearray(_NOTIF.size)
        try:
            fcntl.ioctl(self.fd, _IOCTL_NOTIF_RECV, buf, True)
        except OSError:
            return  # the job died meanwhile (ENOENT), or a spurious wake-up
        notif_id, pid, _flags, _nr, _arch, _ip, sock_fd, backlog, *_ = _NOTIF.unpack(buf)
        # A check costs the spawner a few system calls (a fork for another user's job):
        # a job that calls listen() in a loop gets EPERM past LISTEN_CHECKS a second
        # instead of holding up every other job's start.
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._checks = now, 0
        self._checks += 1
        if self._checks > LISTEN_CHECKS:
            err = errno.EPERM
        else:
            err, why = self._decide(notif_id, pid, sock_fd, backlog)
            if why:  # the check itself failed (not the refusal of an unbound socket)
                print(f"agent spawner: listen() of pid {pid} refused: {why}", file=sys.stderr)
        resp = _RESP.pack(notif_id, 0 if not err else -1, -err if err else 0, 0)
        try:
            fcntl.ioctl(self.fd, _IOCTL_NOTIF_SEND, bytearray(resp))
        except OSError:
            pass  # the job died or was interrupted: its call is gone

    def _decide(self, notif_id: int, pid: int, sock_fd: int, backlog: int) -> tuple[int, str]:
        """(0, "") when the listen() was done, else the errno to answer with and, when the
        check itself failed (rather than finding an unbound socket), why."""
        pidfd = _pidfd_of_thread(pid)
        if pidfd < 0:
            return errno.EPERM, f"pidfd_open: {_errname(ctypes.get_errno())}"
        try:
            try:
                # The pid may have been reused between the notification and pidfd_open:
                # the notification is still pending only while its caller lives.
                fcntl.ioctl(self.fd, _IOCTL_NOTIF_ID_VALID, struct.pack("=Q", notif_id))
            except OSError:
                return errno.EPERM, ""  # the caller is gone: nobody to answer
            if self.uid == os.geteuid():
                return _take_and_listen(pidfd, sock_fd, backlog)
            return self._as_job_user(pidfd, sock_fd, backlog)
        finally:
            os.close(pidfd)

    def _as_job_user(self, pidfd: int, sock_fd: int, backlog: int) -> tuple[int, str]:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            child = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            return errno.EPERM, f"fork: {_errname(e.errno)}"
        if child == 0:  # pragma: no cover - the helper's own process
            code, why = errno.EPERM, "the helper failed"
            try:
                # Nothing of the spawner's stays in a process of the job's user.
                keep = sorted((pidfd, w))
                os.closerange(0, keep[0])
                os.closerange(keep[0] + 1, keep[1])
                os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
                os.setgroups([])
                os.setresgid(self.gid, self.gid, self.gid)
                if self.caps:
                    capabilities.keep_caps()
                os.setresuid(self.uid, self.uid, self.uid)
                # Exactly the job's capabilities: a keeper of another user (the privileged
                # unit) keeps its own across the switch, and root all of them into uid 0.
                capabilities.set_caps(self.caps, ambient=False)
                code, why = _take_and_listen(pidfd, sock_fd, backlog)
            except BaseException as e:
                why = f"the helper as uid {self.uid}: {e}"
            finally:
                try:
                    os.write(w, f"{code}\0{why}".encode()[:512])
                finally:
                    os._exit(0)
        os.close(w)
        try:
            data = os.read(r, 512)
        except OSError:
            data = b""
        finally:
            os.close(r)
            os.waitpid(child, 0)
        code_text, _, why_text = data.decode("utf-8", "replace").partition("\0")
        try:
            return int(code_text), why_text
        except ValueError:
            return errno.EPERM, "the helper died"

    def close(self) -> None:
        """Close the listener: a later listen() of the job's processes then fails (ENOSYS)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_PIDFD_THREAD = os.O_EXCL  # include/uapi/linux/pidfd.h (Linux 6.9)


def _pidfd_of_thread(tid: int) -> int:
    """A pidfd for the thread that called listen() (the notification names a thread id,
    which pidfd_open refuses unless it leads its process); -1 on failure.

    Linux 6.9+ opens the thread itself (PIDFD_THREAD). Before, its process: the thread's
    Tgid, read while the notification is pending (checked by the caller afterwards), so
    the thread is alive and its id cannot have been reused meanwhile.
    """
    fd: int = _libc.syscall(_L(_NR_PIDFD_OPEN), _L(tid), _L(_PIDFD_THREAD))
    if fd >= 0 or ctypes.get_errno() != errno.EINVAL:
        return fd
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            tgid = next(int(line.split()[1]) for line in f if line.startswith(b"Tgid:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return -1
    fd = _libc.syscall(_L(_NR_PIDFD_OPEN), _L(tgid), _L(0))
    return fd


def _errname(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))


def _take_and_listen(pidfd: int, sock_fd: int, backlog: int) -> tuple[int, str]:
    """Take the job's descriptor and listen() on it if it is a bound socket: (0, "") or
    (errno, why the check failed; "" for the plain refusals: unbound, not a socket)."""
    got = _libc.syscall(_L(_NR_PIDFD_GETFD), _L(pidfd), _L(sock_fd & 0xFFFFFFFF), _L(0))
    if got < 0:
        err = ctypes.get_errno()
        if err == errno.EBADF:
            return errno.EBADF, ""  # the job named no descriptor: its own mistake
        return errno.EPERM, f"pidfd_getfd as uid {os.geteuid()}: {_errname(err)}"
    try:
        sock = socket.socket(fileno=os.dup(got))
    except OSError as e:
        if e.errno == errno.ENOTSOCK:
            return errno.ENOTSOCK, ""
        return errno.EPERM, f"the socket: {_errname(e.errno)}"
    finally:
        os.close(got)
    with sock:
        try:
            name = sock.getsockname()
        except OSError as e:
            return errno.EPERM, f"getsockname: {_errname(e.errno)}"
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            bound = name[1] != 0
        elif sock.family == socket.AF_UNIX:
            bound = bool(name)  # "" for an unbound socket: listen() would autobind
        else:
            bound = False
        if not bound:
            return errno.EPERM, ""  # the refusal this check exists for
        # The job's backlog as the kernel reads it (an int).
        value = backlog & 0xFFFFFFFF
        value = value - (1 << 32) if value >= 1 << 31 else value
        if value < 0:  # listen() reads a negative backlog as "as large as allowed"
            value = socket.SOMAXCONN
        try:
            sock.listen(value)
        except OSError as e:
            return e.errno or errno.EPERM, ""  # what listen() itself answers
    return 0, ""
