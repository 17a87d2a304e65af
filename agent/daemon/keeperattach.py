"""Finding the job keeper, or starting one, and reading its hello.

The agent's side of the keeper (:mod:`agent.daemon.keeperclient`) attaches through an
:class:`Attacher`: it connects to the keeper's socket (only a keeper of this agent's
uid, or root's), and when none answers either starts one (the development and
daemonised deployments: the keeper is then this agent's child) or waits for the
keeper's service (``[keeper] mode = "service"``). The keeper process it started is
its to reap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import time

from agent.daemon.keeperwire import Hello, hello_from_wire
from agent.daemon.pipestore import PipeStore
from agent.keeper import spawnproto as proto
from agent.keeper.cgroups import Subtree
from agent.keeper.launch import keeper_argv, start_helper
from agent.keeper.spawn import reap

HELLO_WAIT = 15.0
ATTACH_TRIES = 4


class Attacher:
    """Connects to the keeper at ``socket_path`` (starting it, or waiting for its
    service) and reads its hello; holds the keeper process it started."""

    def __init__(
        self,
        socket_path: str,
        *,
        output_dir: str,
        config_path: str | None,
        cgroups: Subtree | None,
        service_wait: float | None,
    ) -> None:
        self.socket_path = socket_path
        # None: start a keeper when none answers (the agent's child). A number: the keeper
        # is a service of its own; wait that long for it, never start one.
        self.service_wait = service_wait
        self._output_dir = output_dir
        self._config_path = config_path
        self._cgroups = cgroups
        self.proc: subprocess.Popen[bytes] | None = None
        # A keeper that is this agent's child stores its jobs' pipes here (a service's
        # keeper has systemd's descriptor store).
        self.store = PipeStore(socket_path + ".store") if service_wait is None else None

    def attach(self) -> tuple[socket.socket, Hello]:
        """The keeper's connection and its hello, starting a keeper if none answers."""
        if self.store is not None:
            self.store.open()  # before the keeper's hello: it pushes its pipes again then
        for attempt in range(ATTACH_TRIES):
            fresh = False
            sock = self._connect()
            if sock is None and self.service_wait is not None:
                sock = self._wait_for_service(self.service_wait)
            elif sock is None:
                self._start_keeper()
                fresh = True
                sock = self._connect()
                if sock is None:
                    raise OSError(errno.ECONNREFUSED, "the job keeper it started does not answer")
            try:
                return sock, self._read_hello(sock, fresh)
            except ConnectionResetError:
                # A keeper that is dying (killed: its listener closes a moment after the
                # connection this agent saw end) took the connection and dropped it.
                sock.close()
                if fresh or attempt == ATTACH_TRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
            except BaseException:
                sock.close()
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            proto.bind_long(sock, self.socket_path, connect=True)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
            sock.close()
            return None
        except OSError:
            sock.close()
            raise
        # The keeper is who we think: our own uid (or root), never another user's
        # process listening at a path we were given.
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        uid = int.from_bytes(creds[4:8], sys.byteorder)
        if uid not in (0, os.geteuid()):
            sock.close()
            raise OSError(errno.EPERM, f"{self.socket_path}: the keeper there runs as uid {uid}")
        return sock

    def _wait_for_service(self, wait: float) -> socket.socket:
        """The keeper's service, once it answers (it may be starting: systemd orders the
        units, but a keeper restarting after a crash takes a moment)."""
        deadline = time.monotonic() + wait
        while True:
            sock = self._connect()
            if sock is not None:
                return sock
            if time.monotonic() >= deadline:
                raise OSError(
                    errno.ECONNREFUSED,
                    f"no job keeper answers at {self.socket_path} after {wait:g} s "
                    '([keeper] mode = "service": is worker-agent-keeper.service running?)',
                )
            time.sleep(0.1)

    def _start_keeper(self) -> None:
        listener = proto.listen_at(self.socket_path)
        try:
            # A fresh interpreter in isolated mode (as the spawner): neither the agent's
            # environment nor its working directory changes what the keeper imports.
            # Not a new session: Ctrl-C at the agent's terminal reaches it too, and it
            # ignores it (the agent stops the jobs, then tells it to exit).
            fds: list[int] = []
            stored, env = "", {}
            if self.store is not None:
                self.store.drain()  # what the dead keeper stored last
                fds, stored = self.store.passed()
                env = self.store.env()
            argv = keeper_argv(
                listener.fileno(),
                self._output_dir,
                self._cgroups,
                config=self._config_path,
                stored=stored,
            )
            self.proc = start_helper(argv, listener.fileno(), more_fds=fds, env=env)
            if self.store is not None:
                self.store.keeper_pid = self.proc.pid
        finally:
            listener.close()

    def _read_hello(self, sock: socket.socket, fresh: bool) -> Hello:
        sock.settimeout(HELLO_WAIT)
        try:
            data, fds = proto.recv(sock)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, "the job keeper did not say hello") from None
        except ConnectionResetError:
            raise
        except proto.ProtocolError as e:
            raise OSError(errno.EPROTO, f"the job keeper's hello: {e}") from None
        finally:
            sock.settimeout(None)
        if not data:
            raise ConnectionResetError(
                errno.ECONNRESET, "the job keeper refused this agent (see its log)"
            )
        msg, byrole = proto.decode(data, fds)
        for fd in byrole.values():
            os.close(fd)
        return hello_from_wire(msg, fresh)

    def reap(self, timeout: float) -> str:
        """How the keeper this agent started ended (waiting up to ``timeout``); it is
        forgotten."""
        proc, self.proc = self.proc, None
        return "not this agent's child" if proc is None else reap(proc, timeout)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the keeper this agent started to exit."""
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)

    def disown(self) -> None:
        """Forget the keeper this agent started (not waited for at close)."""
        self.proc = None

    def abandon(self) -> None:
        """Kill the keeper this agent started (after a failed attach: it holds nothing)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
