"""The agent's side of the job keeper (:mod:`agent.keeper.keeper`).

The agent attaches to the keeper's socket at start-up, starting a keeper when none
answers (the development and daemonised deployments: that keeper then belongs to
this agent session, in its process group, so Ctrl-C in a terminal reaches both).
It hands each start over (the caller's identity, the request and the job's history
record); the keeper decides it (the policy, the limits, the timeout) and answers with a
refusal or with what the record needs, then spawns; from then on the agent only
mirrors the job: the keeper reports how far the
output got, when the job is ending and how it finished; the supervisor
(:mod:`agent.daemon.supervisor`) records that, wakes followers and acknowledges
each finished job once the history has it, so that the keeper can forget it.

When the agent goes away, nothing of this is lost: the keeper runs the jobs on, and
the next agent's :meth:`KeeperClient.attach` gets a :class:`Hello` with every job
still running and every finished one not yet acknowledged.

When the keeper itself dies (end of file on the socket while attached): every job
it was running is killed (``killpg`` SIGKILL from the agent where permitted, and
``cgroup.kill`` of its cgroup) and ends FAILED with :data:`KEEPER_DIED`; starts
waiting for an answer fail; a new keeper is started and new jobs work. More than
:data:`MAX_DEATHS` deaths in :data:`DEATH_WINDOW` seconds and the agent gives up
(``on_fatal``).

The parts: :mod:`agent.daemon.keeperattach` finds the keeper (or starts one) and reads
its hello; :mod:`agent.daemon.keeperreports` holds what waits for the keeper's answers
and the running jobs, and sends each report where it belongs;
:mod:`agent.daemon.keeperwire` reads the keeper's messages into values. This module
holds the connection: the requests, the reading of the reports, the keeper's death.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.daemon.keeperattach import Attacher
from agent.daemon.keeperreports import KEEPER_DIED as KEEPER_DIED
from agent.daemon.keeperreports import JobSink, Outstanding
from agent.daemon.keeperwire import STORE_ONLY, USED, Admission, Finished, Hello
from agent.keeper import spawnproto as proto
from agent.keeper.cgroups import Subtree
from agent.keeper.decision import RunSpec as RunSpec
from agent.keeper.decision import request_to_wire
from agent.keeper.errors import SpawnFailure
from agent.keeper.spawn import Deaths, stop_reading

if TYPE_CHECKING:
    from agent.keeper.admission import StartRequest

log = logging.getLogger(__name__)

MAX_DEATHS = 3
DEATH_WINDOW = 60.0
CLOSE_WAIT = 5.0
# How long a policy reload may take in the keeper (it reads and checks every file).
RELOAD_WAIT = 60.0
# Acknowledgements go right after the next start (the keeper reads them in the same
# wakeup, after that start's spawn: one job at a time, an ack of its own was a wakeup of
# the keeper per job), or after this long when no start comes. Until then the keeper
# holds the ends (and tells them again to an agent that attaches anew: a late ack loses
# nothing); held longer, under load, they cost it memory it keeps.
ACK_DELAY = 0.05  # seconds
ACK_BATCH = 512  # ... or until this many wait


class KeeperClient:
    """The agent's attachment to its job keeper: the socket, the requests sent on it and
    the reports read from it (to :class:`~agent.daemon.keeperreports.Outstanding`), and
    the keeper's death."""

    def __init__(
        self,
        socket_path: str,
        *,
        output_dir: str,
        config_path: str | None = None,
        cgroups: Subtree | None = None,
        on_fatal: Callable[[str], None] | None = None,
        on_unknown_finished: Callable[[Finished], None] | None = None,
        service_wait: float | None = None,
    ) -> None:
        # service_wait None: start a keeper when none answers (the agent's child). A
        # number: the keeper is a service of its own; wait that long for it.
        self._attacher = Attacher(
            socket_path,
            output_dir=output_dir,
            config_path=config_path,
            cgroups=cgroups,
            service_wait=service_wait,
        )
        self._cgroups = cgroups
        self._on_fatal = on_fatal
        self._out = Outstanding(self, cgroups, on_unknown_finished)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 0
        self._acks: list[str] = []
        self._deaths = Deaths(MAX_DEATHS, DEATH_WINDOW)
        self._closed = False
        self.keeper_pid: int | None = None
        self.spawn_path: str | None = None

    @property
    def socket_path(self) -> str:
        """Where the keeper listens."""
        return self._attacher.socket_path

    @property
    def on_unknown_finished(self) -> Callable[[Finished], None] | None:
        """Where a finished job this agent does not hold goes (to be recorded)."""
        return self._out.on_unknown_finished

    @on_unknown_finished.setter
    def on_unknown_finished(self, call: Callable[[Finished], None] | None) -> None:
        self._out.on_unknown_finished = call

    # ------------------------------------------------------------ attaching

    def attach(self) -> Hello:
        """Attach to the keeper, starting one if none answers; its hello."""
        self._sock, hello = self._attacher.attach()
        self.keeper_pid = hello.pid
        store = self._attacher.store
        if store is not None:
            store.keeper_pid = hello.pid
            for fin in hello.ended:  # over: nothing more can come from their pipes
                store.forget(fin.job_id)
        self.spawn_path = hello.spawn
        log.info(
            "job keeper (pid %s): %s path (%s); %s, %d running job(s), %d finished to record",
            hello.pid,
            hello.spawn,
            hello.why,
            "started now" if hello.fresh else "attached",
            len(hello.jobs),
            len(hello.ended),
        )
        self._out.kept(hello.jobs)
        # Before any start: the keeper's features this agent understands (a keeper of an
        # older release lists none and is asked for none).
        use = sorted(USED & hello.features - (STORE_ONLY if store is None else frozenset()))
        if use:
            proto.send(self._sock, {"op": "features", "use": use})
        self._attach_reader()
        return hello

    def _attach_reader(self) -> None:
        if self._sock is None:
            return
        if self._loop is None:
            try:
                self._loop = self._out.loop = asyncio.get_running_loop()
            except RuntimeError:
                return
        # The socket stays blocking (reads are MSG_DONTWAIT): a send waits for the
        # keeper rather than failing a start because its buffer is momentarily full.
        self._loop.add_reader(self._sock.fileno(), self._readable)
        store = self._attacher.store
        if store is not None and store.sock is not None:
            self._loop.add_reader(store.sock.fileno(), store.drain)  # again: a no-op

    # ------------------------------------------------------------ requests

    def watch(self, job_id: str, sink: JobSink) -> None:
        """Send the reports of an adopted job (one of the hello's) to ``sink``."""
        self._out.sinks[job_id] = sink

    async def start(
        self, job_id: str, req: StartRequest, record: dict[str, Any], sink: JobSink
    ) -> Admission:
        """Ask the keeper to start ``req`` as job ``job_id``: it decides (the policy, the
        limits, the timeout) and spawns. Returns its :class:`Admission` (then await
        ``started`` for the pid), or raises the keeper's refusal as an AgentError, or
        SpawnFailure when the keeper cannot be asked."""
        if self._loop is None:
            self._attach_reader()
        if self._sock is None:
            raise SpawnFailure(errno.EIO, "the job keeper is not running")
        loop = asyncio.get_running_loop()
        self._next_id += 1
        rid = self._next_id
        admitted: asyncio.Future[Admission] = loop.create_future()
        started: asyncio.Future[int] = loop.create_future()
        msg = {
            "op": "start",
            "id": rid,
            "job": job_id,
            "request": request_to_wire(req),
            "record": record,
        }
        try:
            proto.send(self._sock, msg)
        except OSError as e:
            code = e.errno or errno.EIO
            if code in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self._died()
                raise SpawnFailure(code, "the job keeper died") from None
            raise SpawnFailure(code, proto.error_text("sending the start", code)) from None
        self._flush_acks()
        self._out.add_start(rid, admitted, started, job_id, sink)
        try:
            return await admitted
        except asyncio.CancelledError:
            started.cancel()  # admitted or not, it must not run: see Outstanding
            raise

    async def reload(self) -> dict[str, Any]:
        """Make the keeper read the policy again from its own config file; its answer:
        ``{"error": TEXT ("" if accepted), "entries": N, "warnings": [...]}``. Raises
        OSError when the keeper cannot be asked or does not answer."""
        if self._sock is None:
            raise OSError(errno.EIO, "the job keeper is not running")
        loop = asyncio.get_running_loop()
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._out.add_reload(rid, fut)
        try:
            proto.send(self._sock, {"op": "reload", "id": rid})
            return await asyncio.wait_for(asyncio.shield(fut), RELOAD_WAIT)
        except asyncio.TimeoutError:
            raise OSError(errno.ETIMEDOUT, "the job keeper did not answer the reload") from None
        finally:
            self._out.drop_reload(rid)

    def stop(self, job_id: str, how: str) -> None:
        """Ask the keeper to stop a job ("stop", "shutdown", "kill", "not_recorded")."""
        self._send({"op": "stop", "job": job_id, "how": how})

    def ack(self, job_id: str) -> None:
        """The job's end is in the history: the keeper may forget it (sent in batches)."""
        if not self._acks and self._loop is not None:
            self._loop.call_later(ACK_DELAY, self._flush_acks)
        self._acks.append(job_id)
        if self._loop is None or len(self._acks) >= ACK_BATCH:
            self._flush_acks()

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks:
            self._send({"op": "ack", "jobs": acks})

    def _send(self, msg: dict[str, Any]) -> None:
        if self._sock is None:
            return
        try:
            proto.send(self._sock, msg)
        except OSError:
            pass  # the reader sees the end of file

    # ------------------------------------------------------------ reports

    def _readable(self) -> None:
        while self._sock is not None:
            try:
                data, fds = proto.recv(self._sock, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except proto.ProtocolError as e:
                log.error("bad message from the job keeper: %s", e)
                continue
            except OSError:
                data, fds = b"", []
            if not data:
                self._died()
                return
            try:
                msg, byrole = proto.decode(data, fds)
                self._keep_pipe(msg, byrole.pop("pipe", -1))
                for fd in byrole.values():
                    os.close(fd)
                self._out.dispatch(msg)
                if msg["op"] == "finished" and self._attacher.store is not None:
                    self._attacher.store.forget(str(msg["job"]))
            except (proto.ProtocolError, ValueError, KeyError, TypeError) as e:
                log.error("bad message from the job keeper: %s", e)

    def _keep_pipe(self, msg: dict[str, Any], fd: int) -> None:
        """A job's pipe that came with its start's answer ("pipe-with-start"): into the
        store, as if the keeper had pushed it (anything else with a pipe: closed)."""
        if fd < 0:
            return
        store = self._attacher.store
        if store is None or msg["op"] not in ("admitted", "started"):
            os.close(fd)
            return
        store.keep(str(msg.get("job", "")), fd)

    # ------------------------------------------------------------ the keeper's death

    def _died(self) -> None:
        if self._closed or self._sock is None:
            return
        stop_reading(self._loop, self._sock)
        self._sock = None
        status = self._attacher.reap(0.5)
        if self._attacher.service_wait is not None:
            self._service_went()
            return
        # With job cgroups the next keeper adopts the running jobs from their leaves (its
        # hello lists them; their ends come as usual, their exit status said unknown).
        # Without, nothing could find them again: they are killed, as a start still in
        # the dead keeper's hands always is (the agent never learnt its pid).
        adopt = self._cgroups is not None
        log.error(
            "the job keeper (pid %s) died (%s); %s its %d running job(s)",
            self.keeper_pid,
            status,
            "a new keeper adopts" if adopt else "killing",
            len(self._out.sinks),
        )
        self._out.fail_waiting("the job keeper died", kill=True)
        if not adopt:
            self._out.lose()
        while self._count_death():
            try:
                hello = self.attach()
            except (OSError, ValueError, KeyError, TypeError) as e:
                # It died (or was killed) before its hello: one more death.
                log.error("the new job keeper failed: %s", e)
                self._attacher.reap(0.5)
                continue
            self._out.readopt(hello)
            return
        self._out.lose()

    def _service_went(self) -> None:
        """The keeper's service went (stopped, crashed): its manager stops or restarts it,
        and its jobs with it. This agent goes too (its unit restarts it, and the new agent
        waits for the keeper); it kills nothing of the keeper's."""
        self._out.fail_waiting("the job keeper went away", kill=False)
        self._out.sinks.clear()
        why = f"the job keeper service (pid {self.keeper_pid}) went away"
        log.error("%s; the agent exits (it attaches again when restarted)", why)
        if self._on_fatal is not None:
            self._on_fatal(why)

    def _count_death(self) -> bool:
        """Count a keeper's death; False (after ``on_fatal``) once they come too often."""
        if self._deaths.count(time.monotonic()):
            return True
        why = (
            f"the job keeper died {self._deaths.recent} times in {DEATH_WINDOW:.0f} s; "
            "the agent cannot run jobs"
        )
        log.error("%s", why)
        self._attacher.disown()
        if self._on_fatal is not None:
            self._on_fatal(why)
        return False

    # ------------------------------------------------------------ closing

    def abandon(self) -> None:
        """After a failed attach: kill a keeper this agent started (it holds nothing)."""
        self._attacher.abandon()

    def close(self, *, keep_jobs: bool = False) -> None:
        """Detach. ``keep_jobs``: the keeper runs on with whatever still runs; otherwise it
        is told to exit (killing anything left) and waited for."""
        self._closed = True
        self._flush_acks()
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(self._sock.fileno())
            if not keep_jobs:
                with contextlib.suppress(OSError):
                    proto.send(self._sock, {"op": "exit"})
            self._sock.close()
            self._sock = None
        if not keep_jobs:
            self._attacher.wait(CLOSE_WAIT)
        store = self._attacher.store
        if store is not None:
            if self._loop is not None and store.sock is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(store.sock.fileno())
            store.close()
