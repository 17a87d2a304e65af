"""Landlock confinement for job processes: standard library only, system calls via ctypes.

Two halves. Pure planning, no I/O beyond the injectable directory listing: a LandlockSpec
becomes PathRules (plan_rules: deny by hole punching), and the kernel features it needs
(required_abi, degrade, handled_access). Kernel half: prepare() runs once in the spawner,
opens every rule's path (O_PATH) and builds a shared ruleset; Ruleset.restrict() runs in
the forked child right before execve, sets no_new_privs and enforces either that ruleset
or, with per-job paths, a fresh one built from the prepared descriptors. Landlock only
restricts the calling thread and what it execs, so restrict() must run in the
single-threaded child, after everything the child still has to open itself (cgroup
files, /dev/null) and after the user and capability switch (the spawner's order).

Measured here (Linux 6.18, ABI 7, Python 3.11, shared 2-core machine, medians of one
run of 400 forks each; read_exec /usr /lib /lib64 /bin /sbin /etc, write /dev/null, one
TCP port). With no denied path inside a granted tree (7 rules): plan_rules 250 us,
prepare 60 us, restrict() in the child 65 us with the shared ruleset, 175 us with one
scratch dir. Denying /etc/worker-agent hole-punches /etc into 139 rules: plan 600 us,
prepare 800 us, restrict 92 us shared, 370 us with a scratch dir (~1.5 us a rule). For
scale: fork + _exit + waitpid costs the spawner ~800 us, and the first ctypes call in a
fresh child alone ~65 us (copy-on-write faults). Rule count is the lever: keep the
agent's own files out of the trees jobs are granted (e.g. not under /etc) where possible.

Per-job scratch directories: jobs share a uid (an entry's always, most
often all of them), so only their rules keep one job out of another's directory. The
spawner denies the scratch root in every spec (hole punching: a grant of /tmp never
covers /tmp/agent-scratch-UID) and passes the job's own directory to restrict() as an
O_PATH descriptor, so each child builds one flat ruleset: the prepared rules plus its own
directory. A shared first layer cannot do this: it would have to grant the whole scratch
root (every job's directory), and a second layer only takes rights away. Measured (Linux
6.18, 2 shared cores busy with other work, configurations interleaved job by job, medians
of 3x300, two runs; the default entry's spec, 15 rules, or with the shipped unit's deny
list inside /etc, 148): fork path, child CPU of fork + restrict + _exit: no Landlock
1160-1260 us; over that, the shared ruleset +100-150, a per-job ruleset +190-230 at 15
rules and +510-530 at 148. vfork path, wall time of building the op list + clone ..
execve of /bin/true: shared 230-280 us, per-job 250-310 at 15 rules; 320-330 and 580-610
at 148: of the difference, about half is the spawner building the op list (~0.7 us a
rule), the rest the child's landlock_add_rule calls (~1 us a rule). The per-job cost
grows with the rule count again: keep granted trees free of denied paths.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

# include/uapi/linux/landlock.h
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

# The only rights a rule on a non-directory may carry (else EINVAL).
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ = FS_READ_FILE | FS_READ_DIR
READ_EXEC = READ | FS_EXECUTE
# Never EXECUTE: a job that could write and then run a file would escape the whitelist.
# Never MAKE_CHAR/MAKE_BLOCK or IOCTL_DEV: jobs have no business with device nodes.
WRITE = (
    READ | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG
    | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE
)  # fmt: skip

# Generic syscall table: the same numbers on x86_64, aarch64 and every other arch but alpha.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_PR_SET_NO_NEW_PRIVS = 38
# Paths the spawner cannot resolve for its child: realpath() would name the spawner's pid.
_CHILD_RESOLVED = ("/proc/self", "/proc/thread-self")

# feature -> (ABI that brings it, what is not enforced without it)
FEATURES: dict[str, tuple[int, str]] = {
    "fs": (1, "no filesystem confinement at all (Landlock unavailable)"),
    "refer": (2, "renaming or linking files across directories is refused outright"),
    "truncate": (3, "truncate(2) is not restricted: any file the job's user may write"),
    "tcp_connect": (4, "outgoing TCP connections are not restricted"),
    "tcp_bind": (4, "binding TCP ports is not restricted"),
    "ioctl_dev": (5, "ioctl(2) on device files is not restricted"),
    "scope_signals": (6, "signals to processes outside the job are not restricted"),
    "scope_abstract_unix": (6, "abstract unix sockets outside the job are reachable"),
}


class LandlockError(ValueError):
    """A spec that cannot be planned or prepared; str() lists every problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class LandlockStepError(OSError):
    """A failed system call; errno is the kernel's, step names the call and its object."""

    def __init__(self, err: int, step: str) -> None:
        super().__init__(err, f"{step}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")
        self.step = step


@dataclass(frozen=True)
class LandlockSpec:
    """What a job may reach. Ports None: not restricted; (): none at all."""

    read_exec: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    connect_tcp: tuple[int, ...] | None = ()
    bind_tcp: tuple[int, ...] | None = ()
    scope_signals: bool = True
    scope_abstract_unix: bool = True
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class PathRule:
    """Grant `access` (FS_* bits, any ABI) beneath `path`; masked per ABI and file type."""

    path: str
    access: int


class Child(NamedTuple):
    name: str
    is_dir: bool
    is_symlink: bool


def scan_children(path: str) -> list[Child]:
    """List a directory without following symlinks (the real listdir of plan_rules)."""
    with os.scandir(path) as it:
        return [Child(e.name, e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it]


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _child_resolved(path: str) -> bool:
    return any(_within(path, c) for c in _CHILD_RESOLVED)


def _check_path(path: str, what: str, problems: list[str]) -> bool:
    if "\0" in path or not os.path.isabs(path):
        problems.append(f"{what} path {path!r} is not an absolute path")
        return False
    return True


def plan_rules(
    spec: LandlockSpec,
    listdir: Callable[[str], Sequence[Child]] = scan_children,
    resolve: Callable[[str], str] = os.path.realpath,
    max_rules: int = 1000,
) -> list[PathRule]:
    """Turn the spec's allowed paths into rules that never cover a denied path.

    Landlock only grants, so an allowed directory containing a denied path is replaced by
    its children minus the branch leading to the denied path, recursively; an allowed path
    equal to or inside a denied one is dropped. Raises LandlockError listing every problem.
    """
    problems: list[str] = []
    deny: list[str] = []
    for p in spec.deny:
        if _check_path(p, "deny", problems):
            # Both spellings: the target holds the secret, the literal path may be created.
            deny += {os.path.normpath(p), resolve(p)}
    for port in (spec.connect_tcp or ()) + (spec.bind_tcp or ()):
        if not 0 <= port <= 65535:
            problems.append(f"TCP port {port} is out of range")
    grants: dict[str, int] = {}

    def expand(path: str, access: int) -> None:
        if any(_within(path, d) for d in deny):
            return
        inside = [d for d in deny if _within(d, path)]
        if not inside:
            grants[path] = grants.get(path, 0) | access
            return
        try:
            children = listdir(path)
        except NotADirectoryError:  # a file: the denied path below it cannot exist
            grants[path] = grants.get(path, 0) | access
            return
        except FileNotFoundError:
            return
        except OSError as e:
            problems.append(f"cannot list {path} to keep {inside[0]} out: {e.strerror}")
            return
        for child in children:
            # A symlink needs no rule: Landlock checks the inode it resolves to against that
            # inode's own hierarchy. Granting the link (O_PATH follows it) would grant its
            # target, which may lie outside this tree or hold a denied path.
            if not child.is_symlink:
                expand(os.path.join(path, child.name), access)

    for paths, access in ((spec.read_exec, READ_EXEC), (spec.read, READ), (spec.write, WRITE)):
        for p in paths:
            if not _check_path(p, "allowed", problems):
                continue
            norm = os.path.normpath(p)
            if _child_resolved(norm):
                grants[norm] = grants.get(norm, 0) | access
            else:
                expand(resolve(p), access)
    if len(grants) > max_rules:
        problems.append(f"{len(grants)} rules after keeping denied paths out (limit {max_rules})")
    if problems:
        raise LandlockError(problems)
    return [PathRule(p, a) for p, a in sorted(grants.items())]


def required_abi(spec: LandlockSpec) -> tuple[int, list[str]]:
    """The lowest ABI that enforces all of the spec, and the FEATURES it needs."""
    paths = spec.read_exec + spec.read + spec.write
    wanted = {
        "fs": True,
        "refer": bool(spec.write),
        "truncate": True,  # without it truncate(2) reaches every file of the job's user
        "tcp_connect": spec.connect_tcp is not None,
        "tcp_bind": spec.bind_tcp is not None,
        "ioctl_dev": any(
            _within(q, "/dev") or _within("/dev", q) for q in map(os.path.normpath, paths)
        ),
        "scope_signals": spec.scope_signals,
        "scope_abstract_unix": spec.scope_abstract_unix,
    }
    names = [n for n in FEATURES if wanted[n]]
    return max(FEATURES[n][0] for n in names), names


def degrade(spec: LandlockSpec, abi: int) -> tuple[LandlockSpec, list[str]]:
    """Best effort: the spec without what `abi` cannot enforce, and one text per loss."""
    lost = [n for n in required_abi(spec)[1] if FEATURES[n][0] > abi]
    kept = replace(
        spec,
        connect_tcp=None if "tcp_connect" in lost else spec.connect_tcp,
        bind_tcp=None if "tcp_bind" in lost else spec.bind_tcp,
        scope_signals=spec.scope_signals and "scope_signals" not in lost,
        scope_abstract_unix=spec.scope_abstract_unix and "scope_abstract_unix" not in lost,
    )
    return kept, [
        f"{n} (Landlock ABI {FEATURES[n][0]}, kernel has {abi}): {FEATURES[n][1]}" for n in lost
    ]


def handled_access(abi: int) -> tuple[int, int, int]:
    """(fs, net, scoped) masks of everything `abi` can deny; unknown future bits excluded."""
    if abi < 1:
        return 0, 0, 0
    fs = (FS_MAKE_SYM << 1) - 1
    fs |= FS_REFER if abi >= 2 else 0
    fs |= FS_TRUNCATE if abi >= 3 else 0
    fs |= FS_IOCTL_DEV if abi >= 5 else 0
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    return fs, net, scoped


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_L = ctypes.c_long  # syscall() is variadic and reads longs: never pass a bare Python int


def _sys(step: str, nr: int | None, *args: object) -> int:
    """syscall(nr, *args), or prctl(*args) when nr is None; raises LandlockStepError.

    Ints go as C longs: syscall() and prctl() are variadic and read longs.
    """
    call_args = [_L(a) if isinstance(a, int) else a for a in args]
    ret: int = _libc.prctl(*call_args) if nr is None else _libc.syscall(_L(nr), *call_args)
    if ret < 0:
        raise LandlockStepError(ctypes.get_errno(), step)
    return ret


@functools.cache
def abi_version() -> int:
    """The kernel's Landlock ABI, 0 when unsupported or disabled (cached)."""
    try:
        return _sys("landlock_create_ruleset", _SYS_CREATE_RULESET, None, 0, _CREATE_VERSION)
    except OSError:  # ENOSYS, EOPNOTSUPP, or a seccomp filter: fail closed as unsupported
        return 0


def effective_abi(cap: int | None) -> int:
    """The ABI to plan for: the kernel's, lowered to `cap` (configuration, tests)."""
    return abi_version() if cap is None else min(abi_version(), cap)


def _open_path(path: str, follow: bool) -> tuple[int, bool, str]:
    """O_PATH descriptor of `path`, whether it is a directory, and the path it really is.

    The real path is read back from /proc/self/fd, so checks on it hold for the inode the
    rule lands on. With follow=False `path` must be canonical and unchanged: a component
    swapped for a symlink since planning is refused. Raises LandlockStepError.
    """
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise LandlockStepError(e.errno or errno.EIO, f"open {path}") from e
    try:
        mode = os.fstat(fd).st_mode
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            raise LandlockStepError(e.errno or errno.EIO, "readlink /proc/self/fd") from e
        if not follow and (stat.S_ISLNK(mode) or real != path):
            raise LandlockStepError(errno.ELOOP, f"open {path}: now resolves to {real}")
    except BaseException:
        os.close(fd)
        raise
    return fd, stat.S_ISDIR(mode), real


class Ruleset:
    """Descriptors, masks and a ruleset shared by every job of one spec; see prepare()."""

    def __init__(self, abi: int, spec: LandlockSpec, rules: Sequence[PathRule]) -> None:
        fs, net, scoped = handled_access(abi)
        # Handle (deny by default) only what the spec restricts: None ports = unrestricted.
        net &= (NET_CONNECT_TCP if spec.connect_tcp is not None else 0) | (
            NET_BIND_TCP if spec.bind_tcp is not None else 0
        )
        scoped &= (SCOPE_SIGNAL if spec.scope_signals else 0) | (
            SCOPE_ABSTRACT_UNIX_SOCKET if spec.scope_abstract_unix else 0
        )
        self.abi, self._fs = abi, fs
        self._attr = _RulesetAttr(fs, net, scoped)
        self._attr_size = 8 if abi < 4 else 16 if abi < 6 else 24  # what this ABI knows
        self._deny = tuple(os.path.realpath(d) for d in spec.deny) + spec.deny
        self._deferred = [(r.path, r.access) for r in rules if _child_resolved(r.path)]
        ports = dict.fromkeys(spec.connect_tcp or (), NET_CONNECT_TCP)
        for port in spec.bind_tcp or ():
            ports[port] = ports.get(port, 0) | NET_BIND_TCP
        self._ports = [_NetPortAttr(a, p) for p, a in sorted(ports.items())]
        self.skipped: list[str] = []  # rules whose path vanished or changed, for the log
        self._fds: list[int] = []
        self._shared = -1
        # Built here once so the child's loop is only system calls (~1.5 us a rule there).
        # Each rule's attribute as bytes: what ctypes passes by pointer in the fork path's
        # child and what the C vfork child (agent.keeper.vspawn) is handed as is, and the
        # C child's "add" steps (child_program) ready made, as one block: every job of the
        # entry adds the same rules, so the spawner turns them into ops once (vspawn).
        self._rules: list[tuple[int, bytes, str]] = []  # (rule type, attr, name)
        self._adds: tuple[object, ...] = ("adds", (), ())
        try:
            for rule in rules:
                if not _child_resolved(rule.path) and (attr := self._open_rule(rule)):
                    self._rules.append((_RULE_PATH_BENEATH, bytes(attr), rule.path))
            for port_attr in self._ports:
                name = f"tcp port {port_attr.port}"
                self._rules.append((_RULE_NET_PORT, bytes(port_attr), name))
            self._adds = (
                "adds",
                tuple(f"landlock_add_rule {n}" for _, _, n in self._rules),
                tuple((k, raw) for k, raw, _ in self._rules),
            )
            if not self._deferred:
                self._shared = self._build()
        except BaseException:
            self.close()
            raise

    def _open_rule(self, rule: PathRule) -> _PathBeneathAttr | None:
        try:
            fd, is_dir, _real = _open_path(rule.path, follow=False)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise  # not a vanished or swapped path: say so rather than grant less
            self.skipped.append(str(e))
            return None
        self._fds.append(fd)
        attr = _PathBeneathAttr(self._mask(rule.access, is_dir), fd)
        return attr if attr.allowed_access else None  # an empty grant is ENOMSG

    def _mask(self, access: int, is_dir: bool) -> int:
        return access & self._fs & (-1 if is_dir else FILE_RIGHTS)

    def _build(
        self, extra: Sequence[tuple[str, int, bool]] = (), dir_fds: Sequence[int] = ()
    ) -> int:
        """A new ruleset fd with the prepared rules plus `extra` (path, access, per-job)
        and WRITE beneath each of `dir_fds`."""
        attr = ctypes.byref(self._attr)
        rfd = _sys("landlock_create_ruleset", _SYS_CREATE_RULESET, attr, self._attr_size, 0)
        try:
            call, nr, zero, fd_arg = _libc.syscall, _L(_SYS_ADD_RULE), _L(0), _L(rfd)
            kinds = {k: _L(k) for k in (_RULE_PATH_BENEATH, _RULE_NET_PORT)}
            for kind, raw, name in self._rules:
                if call(nr, fd_arg, kinds[kind], raw, zero) < 0:
                    raise LandlockStepError(ctypes.get_errno(), f"landlock_add_rule {name}")
            for path, access, per_job in extra:
                self._add_opened(rfd, path, access, per_job)
            for dfd in dir_fds:
                beneath = _PathBeneathAttr(self._mask(WRITE, True), dfd)
                step = f"landlock_add_rule write directory fd {dfd}"
                _sys(step, _SYS_ADD_RULE, rfd, _RULE_PATH_BENEATH, ctypes.byref(beneath), 0)
        except BaseException:
            os.close(rfd)
            raise
        return rfd

    def _add_opened(self, rfd: int, path: str, access: int, per_job: bool) -> None:
        fd, is_dir, real = _open_path(path, follow=True)  # realpath() costs ~90 us here
        try:
            hit = [d for d in self._deny if _within(real, d) or _within(d, real)]
            if per_job and hit:  # per-job paths bypass plan_rules: keep denied paths out
                raise LandlockStepError(errno.EPERM, f"extra write path {path}: covers {hit[0]}")
            attr = _PathBeneathAttr(self._mask(access, is_dir), fd)
            step = f"landlock_add_rule {path}"
            _sys(step, _SYS_ADD_RULE, rfd, _RULE_PATH_BENEATH, ctypes.byref(attr), 0)
        finally:
            os.close(fd)

    def restrict(
        self,
        extra_write_paths: Sequence[str] = (),
        *,
        extra_write_dirs: Sequence[int] = (),
        no_new_privs: bool = True,
    ) -> None:
        """Confine the calling process (the forked child, just before execve).

        ``extra_write_dirs`` are O_PATH descriptors of directories the caller made itself
        and checked against the deny list (the spawner's scratch directories), granted
        read and write beneath: they skip the ~90 us of opening and resolving a path in
        the child.

        ``no_new_privs=False`` only works while the caller has CAP_SYS_ADMIN: the kernel
        refuses it otherwise (the spawner never asks for it). Raises LandlockStepError (an
        OSError) naming the failed step; the process must then not exec the job. Once it
        returns, the domain cannot be lifted.
        """
        # Without per-job paths every child enforces the one ruleset built in prepare():
        # landlock_restrict_self copies it into the new domain, and nobody adds to it
        # afterwards (it is close-on-exec, so no job ever holds it). With per-job paths
        # each child builds its own: a ruleset shared across fork is one kernel object, so
        # a child adding its scratch dir would grant it to every later job, and a second
        # stacked layer can only take rights away, never add the scratch dir: a shared
        # first layer would have to grant the whole scratch root, and with it every other
        # job's directory (one uid for all jobs: only the rules keep them apart).
        extra = [(p, a, False) for p, a in self._deferred]
        extra += [(p, WRITE, True) for p in extra_write_paths]
        rfd = self._build(extra, extra_write_dirs) if extra or extra_write_dirs else self._shared
        try:
            # Required by landlock_restrict_self without CAP_SYS_ADMIN; it also keeps a
            # set-uid program from regaining what the domain takes away.
            if no_new_privs:
                _sys("prctl(PR_SET_NO_NEW_PRIVS)", None, _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            _sys("landlock_restrict_self", _SYS_RESTRICT_SELF, rfd, 0)
        finally:
            if rfd != self._shared:
                os.close(rfd)

    def child_program(self, extra_write_dirs: Sequence[int] = ()) -> list[tuple[object, ...]]:
        """What restrict(extra_write_dirs=...) does, as data for the C vfork child.

        The same system calls in the same order with the same step names (the caller
        prefixes "landlock: "), everything built here, in the spawner, so the child only
        makes system calls (agent.keeper.vspawn turns this into its op list). Items:
        ("nnp", step), ("create", step, attr, size), ("add", step, rule type, attr),
        ("adds", steps, ((rule type, attr), ...)): the prepared rules, the same object for
        every job of this spec,
        ("open_add", (open, "", readlink, add steps), path, dir mask, file mask),
        ("restrict", step, fd or -1 for the one just created), ("close",).
        """
        nnp = ("nnp", "prctl(PR_SET_NO_NEW_PRIVS)")
        beneath = _RULE_PATH_BENEATH
        if not self._deferred and not extra_write_dirs:
            return [nnp, ("restrict", "landlock_restrict_self", self._shared)]
        # A fresh ruleset per child (never add to the shared one: see restrict()).
        prog: list[tuple[object, ...]] = [
            ("create", "landlock_create_ruleset", bytes(self._attr), self._attr_size),
            self._adds,
        ]
        for path, access in self._deferred:
            # Resolved in the child: /proc/self names the job, not the spawner. No deny
            # check, as in _add_opened(per_job=False): these rules went through plan_rules.
            names = (f"open {path}", "", "readlink /proc/self/fd", f"landlock_add_rule {path}")
            prog.append(
                ("open_add", names, path, self._mask(access, True), self._mask(access, False))
            )
        for dfd in extra_write_dirs:
            w = bytes(_PathBeneathAttr(self._mask(WRITE, True), dfd))
            prog.append(("add", f"landlock_add_rule write directory fd {dfd}", beneath, w))
        prog += [nnp, ("restrict", "landlock_restrict_self", -1), ("close",)]
        return prog

    def descriptors(self) -> list[int]:
        """The descriptors restrict() still needs: the forked child must not close them
        (all are close-on-exec, so the job never inherits one)."""
        return [fd for fd in [*self._fds, self._shared] if fd >= 0]

    def close(self) -> None:
        """Close the prepared descriptors (in the spawner, when the spec is retired)."""
        for fd in [*self._fds, self._shared]:
            if fd >= 0:
                os.close(fd)
        self._fds, self._rules, self._shared = [], [], -1
        self._adds = ("adds", (), ())


def prepare(rules: Sequence[PathRule], spec: LandlockSpec, abi: int) -> Ruleset:
    """Open every rule's path once, in the spawner; `spec` supplies ports, scopes and deny.

    A job's own directory (its scratch directory) is not a rule: the spawner passes its
    descriptor to restrict() (``extra_write_dirs``) and each child then builds one flat
    ruleset of its own. The scratch root must already be in ``spec.deny`` when the rules
    are planned, so no rule covers another job's directory (see spawner.Spawner.ruleset).

    Raises LandlockError when `abi` is 0 or cannot express the spec's network or scope
    restrictions (degrade() first for best effort). Paths that vanished or changed since
    planning are skipped and listed in Ruleset.skipped.
    """
    needs = [n for n in required_abi(spec)[1] if n.startswith(("tcp", "scope"))]
    missing = [n for n in needs if FEATURES[n][0] > abi]
    if abi < 1 or missing:
        names = ", ".join(missing or ["fs"])
        raise LandlockError([f"Landlock ABI {abi} cannot enforce {names}"])
    return Ruleset(abi, spec, rules)
