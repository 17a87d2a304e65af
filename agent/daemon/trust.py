"""The trust rule for files the agent executes: OpenSSH's StrictModes.

A program, a script, a ``#!`` interpreter and every directory above each of
them must be owned by root or the agent's own user and must not be writable
by group or others, nor set-uid or set-gid. That rule is what makes checking
a path and then executing it safe: the only users who could swap the file in
between are ones who could replace the agent itself. Used by the policy (on
every start), by start-up (the agent's own files) and by the spawner (which
re-checks what it executes).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import Protocol

from agent.daemon.errors import Kind

# deny(rule, message, kind): how a check reports one problem.
Deny = Callable[..., None]


class FileSystem(Protocol):
    """The file-system calls the decision needs (a seam for race tests)."""

    def realpath(self, path: str) -> str: ...
    def lstat(self, path: str) -> os.stat_result: ...
    def open_verified(self, path: str, st: os.stat_result) -> int: ...



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



class FileChangedError(OSError):
    """The file changed between its check and its opening."""



def check_file(path: str, fs: FileSystem, owners: frozenset[int], deny: Deny, *,
                want_exec: bool) -> os.stat_result | None:
    """StrictModes checks on a canonical path and all its parents."""
    try:
        st = fs.lstat(path)
    except FileNotFoundError:
        deny("file-missing", f"{path} does not exist", Kind.NOT_FOUND)
        return None
    except OSError as e:
        deny("file-unreadable", f"{path}: {e.strerror or type(e).__name__}",
             Kind.FAILED_PRECONDITION)
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
        deny("writable-by-others",
             f"{path} is writable by group or others (mode {mode & 0o7777:04o})")
        ok = False
    if st.st_uid not in owners:
        deny("bad-owner", f"{path} is owned by uid {st.st_uid}, not root or the agent's user")
        ok = False
    if want_exec and not mode & 0o111:
        deny("not-executable", f"{path} is not executable", Kind.FAILED_PRECONDITION)
        ok = False
    parent = os.path.dirname(path)
    while True:
        try:
            pst = fs.lstat(parent)
        except OSError as e:
            deny("parent-unreadable", f"{parent}: {e.strerror or type(e).__name__}",
                 Kind.FAILED_PRECONDITION)
            return None
        if not stat.S_ISDIR(pst.st_mode):
            deny("parent-not-directory", f"{parent} is not a directory")
            return None
        if pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            deny("parent-writable-by-others",
                 f"directory {parent} is writable by group or others "
                 f"(mode {pst.st_mode & 0o7777:04o})")
            ok = False
        if pst.st_uid not in owners:
            deny("parent-bad-owner",
                 f"directory {parent} is owned by uid {pst.st_uid}, not root or the agent's user")
            ok = False
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    return st if ok else None



def trusted_file_problems(path: str, *, want_exec: bool,
                          owners: Iterable[int] | None = None) -> list[str]:
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
