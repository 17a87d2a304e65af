"""Making the job's process: the C vfork path or the Python fork path (the spawner's half).

Two ways to run the child's set-up (:mod:`agent.keeper.spawner` says when each is used):

* :meth:`Launcher.vfork`: ``clone(CLONE_VM | CLONE_VFORK)`` through the C extension
  (:mod:`agent.keeper.vspawn`). The spawner sleeps until the child has exec'd or failed,
  so the answer is known at once.
* :meth:`Launcher.fork`: ``os.fork()`` and :func:`agent.keeper.childsetup.child`. The
  answer comes later, from the close-on-exec error pipe (:class:`Starting`): end of file
  without data is a successful exec, else ``step\\0errno`` (:func:`report_error`).

Standard library only besides the spawner's own modules: the spawner never imports grpc.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
from typing import Any

from agent.keeper import cgroups, childsetup, vspawn
from agent.keeper import spawnproto as proto
from agent.keeper.jobplace import Place


def take_listener(sock: socket.socket) -> int:
    """The listener a child sent before its exec (the spawner's side); -1 if none came."""
    try:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1, socket.MSG_DONTWAIT)
    except OSError:
        return -1
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds[0] if fds else -1


def report_error(report: bytes) -> tuple[str, int]:
    """The error text and errno of a fork child's ``step\\0errno`` report."""
    step, _, number = report.decode("utf-8", "replace").partition("\0")
    try:
        num = int(number)
    except ValueError:
        num = errno.EIO
    return proto.error_text(step, num), num


class Starting:
    """A forked child whose exec is not yet known to have succeeded."""

    __slots__ = ("cg", "fd", "notify", "pid", "plan", "report", "rid", "scratch")

    def __init__(
        self,
        pid: int,
        rid: Any,
        fd: int,
        cg: cgroups.JobCgroup | None = None,
        scratch: str | None = None,
    ) -> None:
        self.pid, self.rid, self.fd, self.cg = pid, rid, fd, cg
        self.report = b""
        self.scratch = scratch
        self.notify: socket.socket | None = None  # where the child sends its listener
        self.plan: dict[str, Any] = {}

    def take_listener(self) -> int:
        """Once the pipe is at its end: the listener the child sent (-1 if none, or if the
        child failed); closes the socket it came over."""
        if self.notify is None:
            return -1
        listener = -1 if self.report else take_listener(self.notify)
        self.notify.close()
        return listener


@dataclasses.dataclass
class Launcher:
    """Starts children: what every child's set-up needs besides its plan and place."""

    reset: list[int]  # signals whose disposition the child sets back to the default
    root: bool  # sets jobs up as root does: root, or a keeper that gives capabilities
    last_cap: int  # the highest capability number the kernel knows
    module: Any = None  # agent.keeper._vspawn (the vfork path), or None (the fork path)

    def fork(self, rid: Any, plan: dict[str, Any], fds: dict[str, int], place: Place) -> Starting:
        """Fork the child (childsetup.child sets up and execs); the spawner's copies of the
        descriptors are closed. Raises OSError when no child could be made."""
        r = w = -1
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
        except OSError:
            # No child: the spawner's copies of every descriptor go now (the caller
            # undoes the place itself).
            place.close_descriptors()
            _close_all(fds)
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
            raise
        if pid == 0:
            childsetup.child(
                plan,
                fds,
                w,
                self.reset,
                place.confine,
                self.root,
                self.last_cap,
                place.scratch_fd,
                place.filt,
                place.child_notify_fd(),
            )
        os.close(w)
        st = Starting(pid, rid, r, place.cg, place.scratch)
        st.notify = place.close_descriptors(keep_notify=True)
        st.plan = plan  # started(): its listen() checks, and its user for signals
        _close_all(fds)
        return st

    def vfork(
        self, plan: dict[str, Any], fds: dict[str, int], place: Place
    ) -> tuple[int, str, int, int]:
        """Start the child on the C path and wait for its exec: (pid, "", 0, listener) once
        the job runs, else (pid or 0, error text, errno, -1); a pid with an error is a
        child that exited 127 and still has to be reaped. The spawner's copies of the
        descriptors are closed."""
        listener = -1
        try:
            pid, error, code = vspawn.spawn(
                self.module,
                plan,
                fds,
                self.reset,
                place.confine,
                self.root,
                self.last_cap,
                place.scratch_fd,
                childsetup.RLIMIT_RESOURCES,
                place.filt,
                place.child_notify_fd(),
            )
            if place.notify is not None and not error:
                listener = take_listener(place.notify[0])
        except OSError as e:
            pid, code = 0, e.errno or errno.EIO
            error = proto.error_text("fork", code)
        except (ValueError, TypeError, OverflowError) as e:
            # Arrays the extension refuses (none a checked plan makes): no child, and
            # the spawner carries on.
            pid, code = 0, errno.EINVAL
            error = f"setup: {e}"
        finally:
            place.close_descriptors()
            _close_all(fds)
        return pid, error, code, listener


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()
