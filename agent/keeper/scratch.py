"""Removing a job's scratch directory completely, whatever the job did to it.

Standard library only. A job owns its scratch directory and may leave anything there:
modes 000 on files and directories (its own scratch directory included), symlinks to
files the spawner must never touch, a tree deeper than any descriptor or recursion
limit. The walk is descriptor-based and never follows a symlink: every directory is
opened relative to its parent's descriptor with O_NOFOLLOW | O_DIRECTORY, every entry is
removed with unlinkat/rmdir relative to that descriptor, nothing is reached by a path
through the tree and nothing through "..". A symlink is an entry like any other: its
name goes, its target is never looked at.

Permissions: a directory that cannot be opened or emptied is made 0700 again. Only
directories are ever chmod'ed, only through a descriptor of the inode just checked to be
a directory (fchmod, or chmod of /proc/self/fd/N for an O_PATH descriptor:
fchmodat(AT_SYMLINK_NOFOLLOW) is not supported by Linux). That works for the job's own
user (the unprivileged deployment: the spawner and its jobs share a uid) and for root
with CAP_DAC_OVERRIDE / CAP_FOWNER (it never needs to). A root spawner without them (a
hardened unit can drop them) can neither enter nor chmod the directories of a job that
ran as another user: then, and only then, a forked child switched to the job's user
empties the tree and the spawner removes what is left (``owner``).

Not handled: files a job made immutable or append-only (that needs CAP_LINUX_IMMUTABLE,
which no job is given) and mount points (a Landlock domain forbids mount(2)).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

# Deeper directories are moved up to the top of the tree (a rename within the job's own
# directory) instead of holding one more descriptor each.
MAX_DEPTH = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DENIED = (errno.EACCES, errno.EPERM)
_MOVED = ".scratch-removal-"


def remove(path: str, owner: tuple[int, int] | None = None) -> None:
    """Remove the directory ``path`` and everything below it, never following a symlink.

    ``path`` itself must be a directory, not a symlink to one; a missing ``path`` is not
    an error. ``owner`` (uid, gid) is the user the tree belongs to: when this process is
    refused something for lack of permission and runs as another user, a child switched
    to ``owner`` empties the tree (see the module docstring), and the rest is retried.

    Raises OSError (NotADirectoryError when ``path`` is not a directory) for the first
    thing that could not be removed, its ``filename`` the path of that thing; everything
    that could be removed is removed first.
    """
    try:
        os.rmdir(path)  # the common case, an empty directory: one system call
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, *_DENIED):
            raise
    parent, name = os.path.split(os.path.normpath(path))
    # O_PATH: enough for *at() calls, and all a child switched to the job's user can
    # open of the agent's own 0711 scratch root.
    pfd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            _remove_below(pfd, name, path)
        except OSError as e:
            if e.errno not in _DENIED or owner is None or owner[0] == os.geteuid():
                raise
            try:
                _empty_as(owner, pfd, name, path)
                os.rmdir(name, dir_fd=pfd)  # the parent is ours: no need to enter
            except OSError:
                raise e from None  # what this process was refused, by name
    finally:
        os.close(pfd)


def empty(dir_fd: int, where: str = ".") -> None:
    """Remove everything inside the directory open as ``dir_fd`` (it stays, and open).

    ``where`` names the directory in error messages. Raises OSError for the first thing
    that could not be removed (``filename``: its path below ``where``), after removing
    everything else it could.
    """
    failure: OSError | None = None
    # Frames: (descriptor, path for messages, subdirectories still to visit). Each
    # frame's directory lies inside the one before; the first is the caller's.
    stack: list[tuple[int, str, list[str]]] = []
    moved = -1
    try:
        stack.append((dir_fd, where, []))
        failure = _clear_files(dir_fd, where, stack[-1][2])
        while stack:
            fd, at, subdirs = stack[-1]
            if not subdirs:
                stack.pop()
                if not stack:
                    break
                os.close(fd)
                pfd, _, _ = stack[-1]
                try:
                    _retry(os.rmdir, os.path.basename(at), pfd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    failure = failure or _named(e, at)
                continue
            name = subdirs.pop()
            sub = os.path.join(at, name)
            if len(stack) > MAX_DEPTH:
                # Up to the top of the tree under a new name; visited from there.
                top_fd, _, top_subdirs = stack[0]
                try:
                    moved = _free_name(top_fd, moved + 1)
                    _move_up(fd, name, top_fd, f"{_MOVED}{moved}")
                except FileNotFoundError:
                    continue
                except OSError as e:
                    failure = failure or _named(e, sub)
                    continue
                top_subdirs.append(f"{_MOVED}{moved}")
                continue
            try:
                child = _open_dir(fd, name, fix_parent=True)
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    # No longer a directory (it was when listed): an entry to unlink.
                    failure = failure or _unlink(fd, name, sub)
                else:
                    failure = failure or _named(e, sub)
                continue
            stack.append((child, sub, []))
            failure = _clear_files(child, sub, stack[-1][2]) or failure
    finally:
        for fd, _, _ in stack[1:]:
            os.close(fd)
    if failure is not None:
        raise failure


def _remove_below(pfd: int, name: str, path: str) -> None:
    """Empty and remove the directory ``name`` of ``pfd``; raises OSError."""
    try:
        fd = _open_dir(pfd, name, fix_parent=False)  # never chmod the scratch root
    except FileNotFoundError:
        return
    except OSError as e:
        raise _named(e, path) from None
    try:
        empty(fd, path)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=pfd)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _named(e, path) from None


def _clear_files(fd: int, at: str, subdirs: list[str]) -> OSError | None:
    """Unlink every entry of ``fd`` but directories, which go to ``subdirs``."""
    failure: OSError | None = None
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    except OSError as e:
        return _named(e, at)
    for name, is_dir in entries:
        if is_dir:
            subdirs.append(name)
        elif (err := _unlink(fd, name, os.path.join(at, name))) is not None:
            if err.errno == errno.EISDIR:  # became a directory since it was listed
                subdirs.append(name)
            else:
                failure = failure or err
    return failure


def _unlink(fd: int, name: str, path: str) -> OSError | None:
    try:
        _retry(os.unlink, name, fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        return _named(e, path)
    return None


def _retry(op: Callable[..., None], name: str, dir_fd: int) -> None:
    """``op(name, dir_fd=dir_fd)`` (unlink, rmdir); refused for lack of permission on
    ``dir_fd``'s directory (its write or search bit cleared), make that directory 0700
    and try once more."""
    try:
        op(name, dir_fd=dir_fd)
    except PermissionError:
        os.fchmod(dir_fd, 0o700)
        op(name, dir_fd=dir_fd)


def _open_dir(pfd: int, name: str, *, fix_parent: bool) -> int:
    """A descriptor of the directory ``name`` of ``pfd``, never through a symlink; if it
    lacks read or search permission for us, made 0700 first (and with ``fix_parent``,
    ``pfd``'s directory too when its search bit is what is missing). Raises OSError
    (ELOOP or ENOTDIR when ``name`` is not a directory)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=pfd)
    except PermissionError:
        if not fix_parent:
            _chmod_dir(pfd, name)
            return os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        _chmod_dir(pfd, name)
    except PermissionError:
        os.fchmod(pfd, 0o700)
        _chmod_dir(pfd, name)
    return os.open(name, _DIR_FLAGS, dir_fd=pfd)


def _chmod_dir(pfd: int, name: str) -> None:
    """Make the directory ``name`` of ``pfd`` 0700 through an O_PATH descriptor of it."""
    fd = os.open(name, _PATH_FLAGS, dir_fd=pfd)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
        # The inode this descriptor holds: /proc/self/fd/N is a link to it, not a path.
        os.chmod(f"/proc/self/fd/{fd}", 0o700)
    finally:
        os.close(fd)


def _move_up(fd: int, name: str, top_fd: int, new: str) -> None:
    """Rename the directory ``name`` of ``fd`` to ``new`` in the top directory."""
    try:
        os.rename(name, new, src_dir_fd=fd, dst_dir_fd=top_fd)
    except PermissionError:
        # Both parents need write and search; moving a directory also rewrites its
        # "..", which needs its own write bit.
        os.fchmod(fd, 0o700)
        os.fchmod(top_fd, 0o700)
        _chmod_dir(fd, name)
        os.rename(name, new, src_dir_fd=fd, dst_dir_fd=top_fd)


def _free_name(top_fd: int, n: int) -> int:
    """The first ``n`` or above whose moved-up name is not taken in the top directory."""
    while True:
        try:
            os.stat(f"{_MOVED}{n}", dir_fd=top_fd, follow_symlinks=False)
        except FileNotFoundError:
            return n
        n += 1


def _named(e: OSError, path: str) -> OSError:
    """``e`` with ``path`` as its filename (the kernel's errno kept)."""
    err = e.errno or errno.EIO
    return type(e)(err, os.strerror(err), path)


def _empty_as(owner: tuple[int, int], pfd: int, name: str, path: str) -> None:
    """Empty the directory ``name`` of ``pfd`` in a child switched to ``owner``.

    Raises OSError when the child cannot be made or could not empty it (then the
    caller's retry reports what is left).
    """
    uid, gid = owner
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            fd = _open_dir(pfd, name, fix_parent=False)
            empty(fd, path)
            code = 0
        except BaseException:  # noqa: S110 - the exit status says it; the parent retries
            pass
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise PermissionError(errno.EACCES, "could not empty it as its owner", path)
