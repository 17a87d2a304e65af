"""The wire format between the agent and its job spawner (:mod:`agent.keeper.spawner`).

Standard library only, and nothing heavy: the spawner imports this module
and must stay small (no asyncio, no grpc, no yaml).

The channel is a ``socketpair(AF_UNIX, SOCK_SEQPACKET)``: one message per
``sendmsg``, never split or merged, with descriptors attached by
SCM_RIGHTS. A message is a JSON object; its ``op`` says what it is.

Agent -> spawner::

    {"op": "spawn", "id": N, "plan": {...}, "fds": ["stdout", "exec", ...]}
        descriptors attached in the order of "fds"; when the plan is large
        the first descriptor is a memfd holding it ("fds" starts with
        "plan") and the message has no "plan" key.
    {"op": "signal", "pid": P, "sig": S}     (no answer: fire and forget)
    {"op": "exit"}                            (also: end of file)

Spawner -> agent::

    {"op": "hello", "spawn": "vfork" | "fork", "why": TEXT}
        the first message: which spawn path this spawner uses (see
        agent.keeper.vspawn) and why; the agent logs it.
    {"op": "spawned", "id": N, "pid": P}      the program was executed
    {"op": "spawned", "id": N, "error": "execve: Exec format error (ENOEXEC)"}
    {"op": "exited", "pid": P, "code": C | null, "signal": S | null,
     "utime": s, "stime": s, "maxrss": bytes, "oom": N, "ended": T}
        with a job cgroup, sent once the leaf is empty and removed: CPU from
        its cpu.stat, maxrss its memory.peak (0: unknown; never ru_maxrss),
        oom the oom_kill + oom_group_kill of its memory.events. ended: the
        wall-clock time of the reap (the job's end time, however late the
        agent reads this).

A plan is fully resolved (no PATH lookup, no defaults left to the spawner):
``path`` (or an ``exec`` descriptor), ``argv``, ``env``, ``cwd``, ``umask``,
``uid``/``gid`` (null: no switch), ``limits`` (rlimit name -> value,
only non-zero ones) and optionally ``cgroup``: ``{"id": JOB_ID,
"memory_bytes": N, "pids": N, "cpu_millicores": N}`` (limits optional), the
job cgroup the spawner creates, joins the child to, kills and removes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

# A header above this size moves its plan into a memfd: a SOCK_SEQPACKET
# message must fit the socket buffer in one piece, and argv plus environment
# may reach several MiB.
INLINE_MAX = 64 * 1024
RECV_MAX = INLINE_MAX + 4096
MAX_FDS = 8
# Computed once: each is a few microseconds per message (an enum's __or__, a call).
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)
# The largest message carried in a memfd: a hello listing every running job with its
# record, or a start whose arguments fill a gRPC message (4 MiB by default).
BODY_MAX = 64 << 20
# "pipe": a job's pipe (read end) in the keeper's answer to its start, for the agent's
# descriptor store (the "pipe-with-start" feature, agent.keeper.keeperconn).
FD_ROLES = ("plan", "body", "stdout", "exec", "script", "cgroup", "pipe")


class ProtocolError(Exception):
    """A malformed message on the spawner channel."""


def error_text(step: str, code: int) -> str:
    """``execve: Exec format error (ENOEXEC)``: a step and the errno that failed it."""
    name = errno.errorcode.get(code, "")
    text = os.strerror(code)
    return f"{step}: {text} ({name})" if name else f"{step}: {text}"


def send(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message (and descriptors); large plans travel in a memfd."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    memfd = -1
    if len(data) > INLINE_MAX:
        # The plan alone (a spawn whose other keys are small), or the whole message (the
        # keeper's hello with its jobs, a start with a large record): the header keeps
        # "op" and the roles, and always fits.
        rest = {k: v for k, v in msg.items() if k != "plan"}
        small = len(json.dumps(rest, separators=(",", ":"))) <= INLINE_MAX // 2
        role = "plan" if "plan" in msg and small else "body"
        memfd = os.memfd_create(f"agent-{role}", os.MFD_CLOEXEC)
        try:
            inner = msg["plan"] if role == "plan" else {k: v for k, v in msg.items() if k != "fds"}
            body = json.dumps(inner, separators=(",", ":")).encode()
            view = memoryview(body)
            while view:
                view = view[os.write(memfd, view) :]
            head = {k: v for k, v in msg.items() if k == "op" or (role == "plan" and k != "plan")}
            head["fds"] = [role, *msg.get("fds", [])]
            data = json.dumps(head, separators=(",", ":")).encode()
            fds = [memfd, *fds]
        except BaseException:
            os.close(memfd)
            raise
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.send(data)
    finally:
        if memfd >= 0:
            os.close(memfd)


def recv(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int]]:
    """One message and its descriptors (``socket.recv_fds`` ignores its flags)."""
    data, anc, msg_flags, _ = sock.recvmsg(RECV_MAX, _ANC_SPACE, flags)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(
                int.from_bytes(payload[i : i + 4], sys.byteorder, signed=True)
                for i in range(0, usable, 4)
            )
    if msg_flags & _TRUNCATED:
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError("message or descriptors truncated")
    return data, fds


def decode(data: bytes, fds: list[int]) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse one received message; returns it and its descriptors by role.

    Raises ProtocolError (after closing every received descriptor) when the
    message is not what the protocol allows.
    """
    try:
        msg = json.loads(data)
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise ProtocolError("not a message object")
        roles = msg.get("fds", [])
        if (
            not isinstance(roles, list)
            or len(roles) != len(fds)
            or any(r not in FD_ROLES for r in roles)
            or len(set(roles)) != len(roles)
        ):
            raise ProtocolError(f"descriptor roles {roles!r} do not match {len(fds)} fds")
        byrole = dict(zip(roles, fds, strict=True))
        if "plan" in byrole:
            memfd = byrole.pop("plan")
            try:
                size = os.fstat(memfd).st_size
                msg["plan"] = json.loads(os.pread(memfd, size, 0))
            finally:
                os.close(memfd)
        if "body" in byrole:
            memfd = byrole.pop("body")
            try:
                size = os.fstat(memfd).st_size
                if size > BODY_MAX:
                    raise ProtocolError(f"a message of {size} bytes (at most {BODY_MAX})")
                body = json.loads(os.pread(memfd, size, 0))
            finally:
                os.close(memfd)
            if not isinstance(body, dict) or body.get("op") != msg["op"]:
                raise ProtocolError("a message body that does not match its header")
            body["fds"] = [r for r in roles if r != "body"]
            msg = body
        return msg, byrole
    except (ValueError, OSError) as e:
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError(str(e)) from None
    except ProtocolError:
        for fd in fds:
            _close_quietly(fd)
        raise


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def listen_at(path: str) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at ``path`` (a stale one replaced), 0600."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            bind_long(sock, path)
        finally:
            os.umask(old)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_long(sock: socket.socket, path: str, *, connect: bool = False) -> None:
    """bind() or connect() to a path longer than sun_path allows (108 bytes), through
    an O_PATH descriptor of its directory."""
    if len(os.fsencode(path)) < 100:
        (sock.connect if connect else sock.bind)(path)
        return
    dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"
        (sock.connect if connect else sock.bind)(short)
    finally:
        os.close(dirfd)
