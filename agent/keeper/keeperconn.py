"""The job keeper's socket and the one agent attached to it.

Who may attach is the kernel's word, never the peer's: a peer whose uid is the
agent's (``SO_PEERCRED``), that is neither one of this keeper's descendants (the
keeper is a child subreaper, so every process a job starts stays its descendant,
however it double-forks) nor in a job cgroup. A job, even one running as the
agent's own uid in the development mode, cannot talk to the keeper.

:class:`AgentLink` owns the listener, the attached agent's connection (its pidfd,
whether it died, whether its hello is due) and what is said on it; what the agent's
requests mean is the keeper's (:mod:`agent.keeper.keeper`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.keeper import cgroups
from agent.keeper import spawnproto as proto
from agent.keeper.keeperlog import log

LISTEN = "listen"
SEND_WAIT = 5  # seconds
# What this keeper can do besides protocol 2's messages, listed in its hello; an agent
# asks for those it understands ("features"), and only then are they used: an agent of
# an older release (attached across an upgrade of the keeper) gets what it knows.
#   admitted+started: a start that is spawned at once is answered with one "admitted"
#     that carries its pid, instead of "admitted" then "started".
#   pipe-with-start: where the agent is the keeper's descriptor store (the keeper is its
#     child: agent.daemon.pipestore), the job's pipe comes with that answer (descriptor
#     role "pipe") and the agent drops it at the job's "finished", instead of an FDSTORE
#     and an FDSTOREREMOVE datagram for each job (each woke the agent).
FEATURES = frozenset({"admitted+started", "pipe-with-start"})
SO_PEERPIDFD = 77  # Linux 6.5: a pidfd of the peer, pinned at connect()


def _peer_cgroup(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return cgroups.parse_proc_cgroup(f.read())
    except OSError:
        return None


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def descends_from(pid: int, ancestor: int) -> bool | None:
    """Whether ``pid`` is ``ancestor`` or one of its descendants (per /proc); None when a
    process on the way up cannot be read (a job may make one of its processes
    non-dumpable, which hides it: the answer must not then be "no")."""
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == ancestor:
            return True
        pid = _ppid(pid)
        if pid <= 0:
            return None
        seen += 1
    return False


def select_readable(fd: int) -> bool:
    """Whether ``fd`` is readable right now (for a pidfd: the process has exited)."""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(0))


def peer_gone(sock: socket.socket) -> bool:
    """Whether the attached agent's end is closed (it died, and its EOF waits unread)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class AgentLink:
    """The listener and the attached agent: who may attach, and what is said to it.

    ``take`` carries out one request waiting in the socket (the keeper's dispatch);
    ``running`` counts the jobs that go on when an agent detaches (for the log)."""

    def __init__(
        self,
        listener: socket.socket,
        sel: selectors.BaseSelector,
        *,
        agent_uid: int,
        subtree: cgroups.Subtree | None,
        take: Callable[[], None],
        running: Callable[[], int],
    ) -> None:
        self.listener = listener
        listener.setblocking(False)
        self.sel = sel
        sel.register(listener, selectors.EVENT_READ, LISTEN)
        self.agent_uid = agent_uid
        self.subtree = subtree
        self.take, self.running = take, running
        self.sock: socket.socket | None = None
        self.gen = 0  # attachments so far: a start is answered only on its own
        self.hello_due = False
        self.peer_pidfd = -1  # the attached agent's pidfd (-1: none, or not pinned)
        self.deaf = False  # the attached agent died: read what it sent, say nothing
        self.features: frozenset[str] = frozenset()  # what the attached agent asked for
        # A start's "admitted", held until its spawn answers (admitted+started): sent
        # with the pid, or before anything else is said.
        self.held: dict[str, Any] | None = None
        self.mounts: list[Path] = []
        with contextlib.suppress(OSError):
            self.mounts = cgroups.parse_cgroup2_mounts(Path("/proc/self/mountinfo").read_text())

    def peer_problem(self, conn: socket.socket) -> tuple[str, int]:
        """Why this peer may not attach ("" if it may): the kernel's word on who it is; and
        a pidfd of the peer (-1: none), the caller's to close."""
        pidfd = -1
        with contextlib.suppress(OSError):
            # Pinned at connect() where the kernel offers it: the pid below cannot be a
            # reused one while we look at it.
            pidfd = struct.unpack("i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        why = self._peer_problem(conn, pidfd)
        return why, pidfd

    def _peer_problem(self, conn: socket.socket, pidfd: int) -> str:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        if uid != self.agent_uid:
            return f"uid {uid} is not the agent's ({self.agent_uid})"
        if pid <= 0:
            return "no peer process"
        # Every process of a job is this keeper's descendant (a child subreaper
        # adopts what a job orphans), whatever its uid, session or environment.
        mine = descends_from(pid, os.getpid())
        if mine is None:
            # Fail closed: a peer (or an ancestor) whose /proc entry this keeper cannot
            # read (another user namespace, a non-dumpable process) cannot be checked.
            return f"pid {pid}: its process or one of its parents cannot be read"
        if mine:
            return f"pid {pid} is one of the keeper's jobs"
        if self.subtree is not None:
            where = _peer_cgroup(pid)
            if where is None:
                return f"pid {pid}: its cgroup cannot be read"
            for mount in self.mounts:
                if (mount / where.lstrip("/")).is_relative_to(self.subtree.jobs):
                    return f"pid {pid} is in a job cgroup ({where})"
        # Still the same process (the pidfd of an exited one is readable): the
        # answers above were about the peer, not about a process that reused its pid.
        if pidfd >= 0 and select_readable(pidfd):
            return f"pid {pid} exited while it was checked"
        return ""

    def on_accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        why, pidfd = self.peer_problem(conn)
        if not why and self.sock is not None:
            if self.agent_gone():
                # What the dead agent sent before it died is still carried out (a start
                # it recorded must run, a stop it asked for must happen); then it goes.
                self.drain_requests()
                self.detach("it exited")
            else:
                why = "another agent is attached"
        if why:
            log(f"refused a connection: {why}")
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)
            return
        self.attach(conn, pidfd)

    def attach(self, conn: socket.socket, pidfd: int) -> None:
        self.peer_pidfd = pidfd
        conn.setblocking(True)
        # An agent that stops reading (stopped, wedged) must not stall the jobs' keeper:
        # a send that cannot go within SEND_WAIT detaches it (it attaches again).
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_WAIT, 0))
        self.sock = conn
        self.gen += 1
        self.features, self.held = frozenset(), None
        self.sel.register(conn, selectors.EVENT_READ, None)
        # Said once no start is in the spawner's hands: every job in it is known.
        self.hello_due = True

    def detach(self, why: str) -> None:
        if self.sock is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.sock)
        self.sock.close()
        self.sock = None
        if self.peer_pidfd >= 0:
            os.close(self.peer_pidfd)
            self.peer_pidfd = -1
        self.hello_due = False
        self.deaf = False
        self.features, self.held = frozenset(), None
        log(f"the agent detached ({why}); {self.running()} job(s) go on running")

    def agent_gone(self) -> bool:
        """Whether the attached agent has exited (its end of file may wait unread behind
        requests it sent before)."""
        if self.deaf or self.sock is None or peer_gone(self.sock):
            return True
        # Requests may wait unread ahead of the end of file: the process says it.
        return self.peer_pidfd >= 0 and select_readable(self.peer_pidfd)

    def drain_requests(self, most: int = 100_000) -> None:
        """Carry out every request a dead agent left in the socket, up to its end."""
        sock = self.sock
        for _ in range(most):
            if self.sock is not sock or sock is None or not select_readable(sock.fileno()):
                return
            self.take()

    def tell(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> bool:
        """Send to the attached agent, if any (a finished job's record also waits in
        ``ended`` until acknowledged); whether it was sent (with ``fds``, copies of them).

        Nothing goes to a new agent before its hello: the hello is the whole state (each
        job's output size, whether it is ending, every unacknowledged end), and an agent
        reads its first message as the hello."""
        self.flush()
        if self.sock is None or self.deaf or self.hello_due:
            return False
        try:
            proto.send(self.sock, msg, fds)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                # The agent died. Its last requests may still wait in the socket: they are
                # read and carried out until its end of file (a start it recorded before it
                # died must run and be kept for the next agent); nothing more is said.
                self.deaf = True
                return False
            # It is alive but does not read (SEND_WAIT passed): it attaches again.
            self.detach(f"send failed: {e.strerror or e}")
            return False
        return True

    def use(self, msg: dict[str, Any]) -> None:
        """The agent's "features": those of :data:`FEATURES` it asks for are used from now
        on, for this attachment (anything else in the message is ignored)."""
        asked = msg.get("use")
        if isinstance(asked, list):
            self.features = FEATURES.intersection(f for f in asked[:16] if isinstance(f, str))

    def hold(self, msg: dict[str, Any]) -> None:
        """Say ``msg`` with the next message, or merged into it (:meth:`take_held`)."""
        self.flush()
        self.held = msg

    def take_held(self, rid: Any) -> dict[str, Any] | None:
        """The held message of start ``rid`` (None: none is held for it), no longer held."""
        held = self.held
        if held is None or held.get("id") != rid:
            return None
        self.held = None
        return held

    def flush(self) -> None:
        """Say the held message now, if one is."""
        if self.held is not None:
            held, self.held = self.held, None
            self.tell(held)

    def receive(self) -> tuple[dict[str, Any], dict[str, int]] | None:
        """One request from the agent and its descriptors by role (None: nothing to
        carry out; a bad message is said, an end of file or a failure detaches)."""
        assert self.sock is not None
        try:
            data, fds = proto.recv(self.sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except proto.ProtocolError as e:
            log(f"bad message: {e}")
            return None
        except OSError as e:
            self.detach(f"receive failed: {e.strerror or e}")
            return None
        if not data:
            self.detach("end of file")
            return None
        try:
            return proto.decode(data, fds)
        except proto.ProtocolError as e:
            log(f"bad message: {e}")
            return None

    def state(self) -> dict[str, Any] | None:
        """The attachment, for the upgrade in place (agent.keeper.keeperstate)."""
        if self.sock is None:
            return None
        return {
            "fd": self.sock.fileno(),
            "pidfd": self.peer_pidfd,
            "deaf": self.deaf,
            "hello_due": self.hello_due,
            "features": sorted(self.features),
        }

    def restore(self, agent: dict[str, Any] | None, gen: int) -> None:
        """The attachment as :meth:`state` gave it, after the upgrade's exec."""
        self.gen = gen
        if agent is None:
            return
        self.sock = socket.socket(fileno=agent["fd"])
        self.sock.setblocking(True)
        self.peer_pidfd = agent["pidfd"]
        self.deaf = agent["deaf"]
        self.hello_due = agent["hello_due"]
        # (A state saved by a keeper before features: none asked for.)
        self.features = FEATURES.intersection(agent.get("features", ()))
        self.sel.register(self.sock, selectors.EVENT_READ, None)
