"""The descriptor store of a job keeper that is this agent's child.

A keeper run as a systemd service hands each job's pipe (its read end) to systemd's
descriptor store, so that when the keeper dies the next one gets the pipes back and
reads on: no output is lost (agent.keeper.keeperfiles.JobFiles.push). A keeper the
agent started itself (the development quick start, the daemonised deployment) has no
service manager: the agent plays that part, with the same protocol, so the keeper's
code is the same. The keeper is started with ``$NOTIFY_SOCKET`` naming this store's
datagram socket and ``$FDSTORE``; it sends ``FDSTORE=1`` / ``FDNAME=<job id>`` with the
pipe, and ``FDSTOREREMOVE=1`` when the job is over. The next keeper the agent starts
gets the stored pipes (``--stored JOB=FD,...``). A keeper the agent finds already
running (the agent restarted) pushes its pipes again when the agent attaches. An agent
that asks for the keeper's "pipe-with-start" feature gets each job's pipe with its
start's answer on the keeper's socket instead (:meth:`PipeStore.keep`), and drops it at
the job's "finished" (:meth:`PipeStore.forget`): no datagram per job.

Only the keeper may store: a datagram is taken only from this agent's own uid (or root)
and, once the keeper is known, only from its pid (SO_PASSCRED), and only a job id as a
name; at most :data:`MAX_STORED` pipes are held. The store lives as long as the agent:
when the agent and its keeper both die, the pipes die too (then the output a job writes
meanwhile is lost, and the next keeper says so).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import struct

from agent.keeper import spawnproto as proto
from agent.keeper.keptjobs import JOB_ID

__all__ = ["MAX_STORED", "PipeStore"]

log = logging.getLogger(__name__)

MAX_STORED = 4096  # pipes held; the keeper is told (FDSTORE) and a further one is closed
MAX_PASSED = 3000  # pipes passed to a new keeper (its command line holds their names)
_CREDS = struct.calcsize("3i")


class PipeStore:
    """The jobs' pipes a keeper of this agent stored, by job id."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.fds: dict[str, int] = {}
        self.keeper_pid = 0  # 0: any process of this uid (until the keeper is known)

    def open(self) -> None:
        """Listen at ``path`` (once; a stale socket file left there is replaced)."""
        if self.sock is not None:
            return
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            proto.bind_long(sock, self.path)
            os.chmod(self.path, 0o600)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def env(self) -> dict[str, str]:
        """What tells a keeper to store its pipes here."""
        return {"NOTIFY_SOCKET": self.path, "FDSTORE": str(MAX_STORED)}

    def passed(self) -> tuple[list[int], str]:
        """The stored pipes for a new keeper: the descriptors and ``--stored``'s value."""
        items = list(self.fds.items())[:MAX_PASSED]
        return [fd for _, fd in items], ",".join(f"{job}={fd}" for job, fd in items)

    def drain(self) -> None:
        """Take every datagram waiting (the keeper's FDSTORE and FDSTOREREMOVE)."""
        if self.sock is None:
            return
        while True:
            fds = array.array("i")
            try:
                data, anc, _, _ = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(16 * fds.itemsize) + socket.CMSG_SPACE(_CREDS)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("keeper's descriptor store: %s", e)
                return
            creds = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    creds = struct.unpack("3i", payload[:_CREDS])
            self._take(data, list(fds), creds)

    def _take(self, data: bytes, fds: list[int], creds: tuple[int, int, int] | None) -> None:
        pid, uid = (creds[0], creds[1]) if creds is not None else (0, -1)
        mine = uid in (0, os.geteuid()) and (not self.keeper_pid or pid == self.keeper_pid)
        fields = dict(
            line.partition("=")[::2] for line in data.decode("utf-8", "replace").split("\n")
        )
        name = fields.get("FDNAME", "")
        if not mine or not JOB_ID.fullmatch(name):
            if fields.get("FDSTORE") == "1" or fields.get("FDSTOREREMOVE") == "1":
                log.warning("keeper's descriptor store: refused %r from pid %d", name[:40], pid)
            _close(fds)
            return
        if fields.get("FDSTOREREMOVE") == "1":
            _close(fds)
            self.forget(name)
            return
        if fields.get("FDSTORE") != "1" or len(fds) != 1:
            _close(fds)
            return
        self.keep(name, fds[0])

    def keep(self, name: str, fd: int) -> None:
        """Hold ``fd``, the pipe of job ``name`` (a newer copy replaces an older one:
        pushed again after this agent attached anew); closed if it cannot be held."""
        if not JOB_ID.fullmatch(name):
            log.warning("keeper's descriptor store: refused %r", name[:40])
            _close([fd])
            return
        self.forget(name)
        if len(self.fds) >= MAX_STORED:
            log.warning("keeper's descriptor store: full (%d pipes); %s not kept", MAX_STORED, name)
            _close([fd])
            return
        self.fds[name] = fd

    def forget(self, name: str) -> None:
        """Close the pipe held for job ``name``, if one is."""
        old = self.fds.pop(name, -1)
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        """Close the socket and every pipe held (the agent stops)."""
        _close(list(self.fds.values()))
        self.fds.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
