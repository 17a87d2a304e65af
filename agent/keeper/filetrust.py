"""The trust rule for files the agent executes: OpenSSH's StrictModes.

A program, a script, a ``#!`` interpreter and every directory above each of
them must be owned by root or the agent's own user and must not be writable
by group or others, nor set-uid or set-gid; one refinement: a sticky
directory owned by one of them (``/tmp``) is a safe ancestor of an entry
owned by one of them (see :func:`sticky_ancestor_ok`). That rule is what makes checking
a path and then executing it safe: the only users who could swap the file in
between are ones who could replace the agent itself. Used by the policy (on
every start), by start-up (the agent's own files) and by the spawner (which
re-checks what it executes).
"""

from __future__ import annotations

import _thread
import fcntl
import os
import stat
from collections.abc import Callable, Iterable
from typing import Protocol

from agent.keeper.errors import Kind

# deny(rule, message, kind): how a check reports one problem.
Deny = Callable[..., None]

# Where a job finds its sealed (pinned) script: the spawner dup2()s the
# plan's script_fd to descriptor 3, and the interpreter is given this path
# instead of the script's, so it reads the verified bytes, not the file on
# disk. The spawner (agent.keeper.spawn) defines the same value.
SCRIPT_FD = 3
SCRIPT_FD_PATH = f"/proc/self/fd/{SCRIPT_FD}"

# The kernel reads at most this much of a file to find its #! line
# (BINPRM_BUF_SIZE); a longer line is refused rather than guessed at.
BINPRM_BUF_SIZE = 256
ELF_MAGIC = b"\x7fELF"


class FileSystem(Protocol):
    """The file-system calls the decision needs (a seam for race tests)."""

    def realpath(self, path: str) -> str: ...
    def lstat(self, path: str) -> os.stat_result: ...
    def open_verified(self, path: str, st: os.stat_result) -> int: ...
    def readlink(self, path: str) -> str: ...


class RealFileSystem:
    """The real file system."""

    def realpath(self, path: str) -> str:
        """Canonical path; raise FileNotFoundError if any part is missing."""
        return os.path.realpath(path, strict=True)

    def lstat(self, path: str) -> os.stat_result:
        """``os.lstat``."""
        return os.lstat(path)

    def open_verified(self, path: str, st: os.stat_result) -> int:
        """Open ``path`` read-only and check it is the file ``st`` described."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
                raise FileChangedError(path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def readlink(self, path: str) -> str:
        """``os.readlink``."""
        return os.readlink(path)


class FileChangedError(OSError):
    """The file changed between its check and its opening."""


def check_file(
    path: str, fs: FileSystem, owners: frozenset[int], deny: Deny, *, want_exec: bool
) -> os.stat_result | None:
    """StrictModes checks on a canonical path and all its parents."""
    try:
        st = fs.lstat(path)
    except FileNotFoundError:
        deny("file-missing", f"{path} does not exist", Kind.NOT_FOUND)
        return None
    except OSError as e:
        deny(
            "file-unreadable", f"{path}: {e.strerror or type(e).__name__}", Kind.FAILED_PRECONDITION
        )
        return None
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        deny("not-regular-file", f"{path} is {file_kind(mode)}, not a regular file")
        return None
    ok = True
    if mode & (stat.S_ISUID | stat.S_ISGID):
        deny("setuid-setgid", f"{path} is set-uid or set-gid")
        ok = False
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        deny(
            "writable-by-others",
            f"{path} is writable by group or others (mode {mode & 0o7777:04o})",
        )
        ok = False
    if st.st_uid not in owners:
        deny("bad-owner", f"{path} is owned by uid {st.st_uid}, not root or the agent's user")
        ok = False
    if want_exec and not mode & 0o111:
        deny("not-executable", f"{path} is not executable", Kind.FAILED_PRECONDITION)
        ok = False
    parent = os.path.dirname(path)
    # The owner of the entry below ``parent`` on the path (see sticky_ancestor_ok).
    child_uid = st.st_uid
    while True:
        checked = _check_directory(parent, fs, owners, deny, child_uid)
        if checked is None:
            return None
        pst, dir_ok = checked
        ok = ok and dir_ok
        if parent == "/":
            break
        child_uid = pst.st_uid
        parent = os.path.dirname(parent)
    return st if ok else None


def sticky_ancestor_ok(dst: os.stat_result, child_uid: int, owners: frozenset[int]) -> bool:
    """True if a group/world-writable directory is still a safe ancestor.

    A sticky directory (``/tmp``, mode 1777) owned by a trusted user lets
    others create entries in it, but only an entry's owner, the directory's
    owner and root may rename or remove an entry (the kernel's sticky rule).
    So when the entry the path goes through is itself owned by a trusted
    user, nobody outside the trusted set can swap it between the check and
    the exec: the same reasoning careful path checkers apply. Anything else
    (not sticky, an untrusted directory owner, an entry owned by someone
    else) stays refused.
    """
    return bool(dst.st_mode & stat.S_ISVTX) and dst.st_uid in owners and child_uid in owners


def trusted_file_problems(
    path: str, *, want_exec: bool, owners: Iterable[int] | None = None
) -> list[str]:
    """Why the StrictModes rule refuses ``path`` (canonicalised first); [] if it passes."""
    problems: list[str] = []

    def collect(rule: str, msg: str, kind: Kind = Kind.PERMISSION_DENIED) -> None:
        problems.append(msg)

    allowed = frozenset(owners) if owners is not None else frozenset({0, os.geteuid()})
    try:
        canonical = os.path.realpath(path, strict=True)
    except OSError as e:
        return [f"{path}: {e.strerror or 'cannot resolve'}"]
    check_file(canonical, RealFileSystem(), allowed, collect, want_exec=want_exec)
    return problems


def file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def resolve_trusted(path: str, fs: FileSystem, owners: frozenset[int], deny: Deny) -> str | None:
    """Canonicalise ``path`` checking every directory the lookup searches.

    ``realpath`` alone is not enough for a path the *kernel* will resolve
    again later (a ``#!`` interpreter): a symbolic link in a directory that
    someone else can write could be re-pointed between the check and the
    exec. So every directory searched while resolving, including the ones
    a link leads through, must pass the directory half of the trust rule;
    links themselves cannot be changed, only replaced in their directory.
    """
    if not path.startswith("/"):
        raise ValueError(f"resolve_trusted needs an absolute path, got {path!r}")
    pending = [p for p in reversed(path.split("/")) if p]
    cur = "/"
    hops = 0
    searched: set[str] = set()
    while pending:
        name = pending.pop()
        if name == ".":
            continue
        if name == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, name)
        try:
            st = fs.lstat(nxt)
        except FileNotFoundError:
            if cur not in searched and not _directory_ok(cur, fs, owners, deny, None):
                return None
            deny("file-missing", f"{nxt} does not exist", Kind.NOT_FOUND)
            return None
        except OSError as e:
            if cur not in searched and not _directory_ok(cur, fs, owners, deny, None):
                return None
            deny(
                "file-unreadable",
                f"{nxt}: {e.strerror or type(e).__name__}",
                Kind.FAILED_PRECONDITION,
            )
            return None
        # The directory is checked with the entry the lookup takes from it
        # (a sticky directory is safe only above an entry of a trusted owner).
        if cur not in searched:
            searched.add(cur)
            if not _directory_ok(cur, fs, owners, deny, st.st_uid):
                return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:  # the kernel's own limit (ELOOP)
                deny(
                    "file-unreadable",
                    f"{path}: too many levels of symbolic links",
                    Kind.FAILED_PRECONDITION,
                )
                return None
            target = fs.readlink(nxt)
            if target.startswith("/"):
                cur = "/"
            pending.extend(p for p in reversed(target.split("/")) if p)
            continue
        cur = nxt
    return cur


def _directory_ok(
    d: str, fs: FileSystem, owners: frozenset[int], deny: Deny, child_uid: int | None
) -> bool:
    """The directory half of the trust rule for ``d``; every problem is reported."""
    checked = _check_directory(d, fs, owners, deny, child_uid)
    return checked is not None and checked[1]


def _check_directory(
    d: str, fs: FileSystem, owners: frozenset[int], deny: Deny, child_uid: int | None
) -> tuple[os.stat_result, bool] | None:
    """(its stat, whether it passed) for directory ``d``; None if it cannot be checked.

    ``child_uid``: the owner of the entry below ``d`` on the path (None: unknown,
    then a sticky directory gets no benefit of the doubt).
    """
    try:
        st = fs.lstat(d)
    except OSError as e:
        deny(
            "parent-unreadable", f"{d}: {e.strerror or type(e).__name__}", Kind.FAILED_PRECONDITION
        )
        return None
    if not stat.S_ISDIR(st.st_mode):
        deny("parent-not-directory", f"{d} is not a directory")
        return None
    ok = True
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (
        child_uid is None or not sticky_ancestor_ok(st, child_uid, owners)
    ):
        deny(
            "parent-writable-by-others",
            f"directory {d} is writable by group or others (mode {st.st_mode & 0o7777:04o})",
        )
        ok = False
    if st.st_uid not in owners:
        deny(
            "parent-bad-owner",
            f"directory {d} is owned by uid {st.st_uid}, not root or the agent's user",
        )
        ok = False
    return st, ok


# ---------------------------------------------------------------- sealed copies
#
# A pin is a promise about bytes, and a path or even an open descriptor of
# the file does not keep it: whoever may write the inode (the agent's own
# user, root) can rewrite it between hashing and exec, and the job then runs
# what was never hashed. A sealed memfd cannot change at all once sealed
# (F_SEAL_WRITE/GROW/SHRINK, and F_SEAL_SEAL so no seal can be removed), so a
# digest computed on the copy is a digest of exactly what runs.

_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
# Linux 6.3+: say explicitly whether the copy may be executed (with neither
# flag the kernel logs a warning, and vm.memfd_noexec may refuse exec).
_MFD_EXEC = getattr(os, "MFD_EXEC", 0x10)
_MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x08)
_CACHE_MAX = 256

_sealed: dict[tuple[int, int, int, int, int, str, bool], int] = {}
_sealed_lock = _thread.allocate_lock()  # threading.Lock, without threading's import


class DigestMismatch(Exception):
    """The copy's SHA-256 is not the pinned one."""


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _memfd(name: str, executable: bool) -> int:
    base = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    extra = _MFD_EXEC if executable else _MFD_NOEXEC_SEAL
    try:
        return os.memfd_create(name, base | extra)
    except OSError as e:
        if e.errno != 22:  # EINVAL: a kernel before 6.3 without these flags
            raise
        return os.memfd_create(name, base)


def _copy_and_seal(src: int, name: str, executable: bool) -> tuple[int, str]:
    """A sealed memfd holding the bytes of ``src``, and the SHA-256 of the copy."""
    fd = _memfd(name, executable)
    try:
        offset = 0
        while True:
            chunk = os.pread(src, 1 << 20, offset)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            offset += len(chunk)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        # Hash the sealed copy itself, never the source: the source may
        # have changed while it was being copied. hashlib only here: it loads
        # libcrypto (3.7 MB of the job keeper's memory), which only pins need.
        import hashlib

        h = hashlib.sha256()
        pos = 0
        while True:
            chunk = os.pread(fd, 1 << 20, pos)
            if not chunk:
                break
            h.update(chunk)
            pos += len(chunk)
        return fd, h.hexdigest()
    except BaseException:
        os.close(fd)
        raise


def sealed_copy(src: int, pins: Iterable[str], *, name: str, executable: bool) -> int:
    """A new descriptor of a sealed copy of ``src`` whose SHA-256 is one of ``pins``.

    The caller owns (and closes) the returned descriptor. Copies are cached
    by the source's identity (device, inode, size, mtime, ctime) and pin,
    so an unchanged file is copied once; reuse is safe because a sealed
    copy holds exactly the bytes that were verified. Raises DigestMismatch
    when the copy does not match, OSError when the file cannot be read.
    """
    wanted = frozenset(pins)
    before = os.fstat(src)
    ident = _identity(before)
    with _sealed_lock:
        for pin in wanted:
            hit = _sealed.get((*ident, pin, executable))
            if hit is not None:
                return os.dup(hit)
    fd, digest = _copy_and_seal(src, name, executable)
    if digest not in wanted:
        os.close(fd)
        raise DigestMismatch(digest)
    # Cache only when the file did not change while it was copied, so the
    # key describes the file the copy was taken from.
    if _identity(os.fstat(src)) == ident:
        with _sealed_lock:
            if len(_sealed) >= _CACHE_MAX:
                for old in _sealed.values():
                    os.close(old)
                _sealed.clear()
            key = (*ident, digest, executable)
            if key in _sealed:
                os.close(fd)
                fd = _sealed[key]
            else:
                _sealed[key] = fd
            return os.dup(fd)
    return fd


def read_head(fd: int) -> bytes:
    """The first BINPRM_BUF_SIZE bytes of an open file (what the kernel looks at)."""
    return os.pread(fd, BINPRM_BUF_SIZE, 0)
