"""The agent's side of the job keeper (:mod:`agent.daemon.keeper`).

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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.daemon import spawnproto as proto
from agent.daemon.cgroups import Subtree
from agent.daemon.decision import RunSpec as RunSpec
from agent.daemon.decision import request_to_wire
from agent.daemon.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SpawnFailure,
    Unauthenticated,
    Unavailable,
)
from agent.daemon.keeperstate import KEEPER_MAIN, PACKAGE_ROOT
from agent.daemon.lifecycle import Exit
from agent.daemon.spawn import SPAWN_ENV, _interpreter, kill_job_cgroup, reap
from agent.vocabulary import JobState, Kind

if TYPE_CHECKING:
    from agent.daemon.admission import StartRequest

log = logging.getLogger(__name__)

KEEPER_SOCKET = "keeper.sock"  # in [jobs] state_dir
KEEPER_ENDED = "keeper-ended.json"  # in [jobs] state_dir: ends a stopped keeper service kept
KEEPER_DIED = "the job keeper died; the job's processes were killed"
MAX_DEATHS = 3
DEATH_WINDOW = 60.0
HELLO_WAIT = 15.0
ATTACH_TRIES = 4
CLOSE_WAIT = 5.0
PROTOCOL = 2  # agent.daemon.keeper.PROTOCOL (not imported: the keeper's module)
# How long a policy reload may take in the keeper (it reads and checks every file).
RELOAD_WAIT = 60.0
# A refusal's kind, as the keeper names it, and the error it is raised as.
REFUSALS: dict[str, type[AgentError]] = {
    cls.kind.name: cls
    for cls in (
        InvalidArgument,
        NotFound,
        PermissionDenied,
        Unauthenticated,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
    )
}


def refusal(msg: dict[str, Any]) -> AgentError:
    """The AgentError of a keeper's "refused" answer (kind, rule, message)."""
    cls = REFUSALS.get(str(msg.get("kind")), AgentError)
    err = cls(str(msg.get("message", "refused by the job keeper")), rule=str(msg.get("rule", "")))
    if cls is AgentError:
        err.kind = Kind.INTERNAL
    return err


class Stopper(Protocol):
    """Who stops an admitted job the agent will not record (the keeper's client)."""

    def stop(self, job_id: str, how: str) -> None: ...


class Admission:
    """The keeper admitted a start: what the record needs, and the start's outcome to
    await (``started``: the pid, or a SpawnFailure naming the failed step)."""

    def __init__(
        self,
        client: Stopper,
        job_id: str,
        started: asyncio.Future[int],
        msg: dict[str, Any],
    ) -> None:
        self._client, self.job_id, self.started = client, job_id, started
        self.command = str(msg["command"])
        self.timeout = int(msg["timeout"])
        self.limits = {str(k): int(v) for k, v in dict(msg["limits"]).items()}
        self.entry = str(msg["entry"])

    def abandon(self) -> None:
        """The agent will not record this job: it must not run (stopped once started)."""
        if not self.started.done():
            self.started.cancel()  # the "started" answer then stops it (not_recorded)
        else:
            self._client.stop(self.job_id, "not_recorded")


@dataclass(frozen=True)
class Finished:
    """How a job ended, as the keeper decided it."""

    job_id: str
    state: JobState
    text: str
    exit: Exit
    size: int
    truncated: bool
    persist: bool = True
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Finished:
        """Raises KeyError/TypeError/ValueError on a malformed message."""
        ex = msg["exit"]
        return cls(
            job_id=str(msg["job"]),
            state=JobState[str(msg["state"])],
            text=str(msg["text"]),
            exit=Exit(
                exit_code=_opt_int(ex["code"]),
                signal=_opt_int(ex["signal"]),
                user_cpu=float(ex["utime"]),
                system_cpu=float(ex["stime"]),
                max_rss=int(ex["maxrss"]),
                oom_kills=int(ex.get("oom", 0)),
                start_failure=str(msg.get("start_failure", "")),
                end_time=None if ex.get("ended") is None else float(ex["ended"]),
            ),
            size=int(msg["size"]),
            truncated=bool(msg["truncated"]),
            persist=bool(msg.get("persist", True)),
            record=_dict(msg.get("record")),
        )


@dataclass(frozen=True)
class Kept:
    """A job the keeper was running when this agent attached."""

    job_id: str
    pid: int
    size: int
    truncated: bool
    ending: bool
    record: dict[str, Any]


@dataclass(frozen=True)
class Hello:
    """What the keeper said when this agent attached."""

    pid: int
    spawn: str
    why: str
    jobs: list[Kept]
    ended: list[Finished]
    # True when this agent started the keeper (no keeper answered): whatever is left of
    # earlier jobs is nobody's, and start-up recovery may kill it.
    fresh: bool
    # The keeper is a service of its own (`agent keeper`), not this agent's child.
    service: bool = False
    # The keeper's user (root: it can give entries their users and capabilities).
    uid: int = -1
    # It runs jobs as any user with their entries' capabilities: root, or (the privileged
    # unit) another user holding CAP_SETUID, CAP_SETGID and CAP_SETPCAP.
    gives: bool = False
    # Where the keeper puts job cgroups (None: jobs run without); for the agent's limits.
    cgroups: Subtree | None = None


class JobSink(Protocol):
    """Where the keeper's reports about one job go (the supervisor's job mirror)."""

    def on_output(self, size: int, truncated: bool) -> None: ...
    def on_ending(self) -> None: ...
    def on_finished(self, fin: Finished) -> None: ...


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def keeper_argv(
    listen_fd: int,
    output_dir: str,
    subtree: Subtree | None,
    *,
    config: str | None = None,
    agent_uid: int | None = None,
    service: bool = False,
    ended_file: str = "",
) -> list[str]:
    """The keeper's command line (a fresh interpreter in isolated mode), listening on the
    inherited socket ``listen_fd``."""
    args = ["--listen-fd", str(listen_fd), "--output-dir", output_dir]
    if config is not None:
        # The keeper reads the policy itself, from this config file.
        args += ["--config", config]
    if subtree is not None:
        args += [
            "--cgroup-jobs",
            str(subtree.jobs),
            "--controllers",
            ",".join(sorted(subtree.controllers)),
        ]
    if agent_uid is not None:
        args += ["--agent-uid", str(agent_uid)]
    if service:
        args += ["--service", "1"]
    if ended_file:
        args += ["--ended-file", ended_file]
    return [sys.executable, "-I", "-c", KEEPER_MAIN, PACKAGE_ROOT, *args]


class KeeperClient:
    """The agent's attachment to its job keeper."""

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
        self.socket_path = socket_path
        # None: start a keeper when none answers (the agent's child). A number: the keeper
        # is a service of its own; wait that long for it, never start one.
        self._service_wait = service_wait
        self._output_dir = output_dir
        self._config_path = config_path
        self._cgroups = cgroups
        self._on_fatal = on_fatal
        self.on_unknown_finished = on_unknown_finished
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 0
        # request id -> (admitted, started, job id, sink) of a start not yet answered
        self._pending: dict[
            int, tuple[asyncio.Future[Admission], asyncio.Future[int], str, JobSink]
        ] = {}
        self._reloads: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._sinks: dict[str, JobSink] = {}
        self._pids: dict[str, int] = {}  # job id -> pid, while it runs (for a keeper's death)
        self._acks: list[str] = []
        self._deaths: list[float] = []
        self._closed = False
        self.keeper_pid: int | None = None
        self.spawn_path: str | None = None

    # ------------------------------------------------------------ attaching

    def attach(self) -> Hello:
        """Attach to the keeper, starting one if none answers; its hello."""
        for attempt in range(ATTACH_TRIES):
            fresh = False
            sock = self._connect()
            if sock is None and self._service_wait is not None:
                sock = self._wait_for_service(self._service_wait)
            elif sock is None:
                self._start_keeper()
                fresh = True
                sock = self._connect()
                if sock is None:
                    raise OSError(errno.ECONNREFUSED, "the job keeper it started does not answer")
            try:
                hello = self._read_hello(sock, fresh)
                break
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
        self._sock = sock
        self.keeper_pid = hello.pid
        self.spawn_path = hello.spawn
        log.info(
            "job keeper (pid %s): %s path (%s); %s, %d running job(s), %d finished to record",
            hello.pid,
            hello.spawn,
            hello.why,
            "started now" if fresh else "attached",
            len(hello.jobs),
            len(hello.ended),
        )
        for kept in hello.jobs:
            self._pids[kept.job_id] = kept.pid
        self._attach_reader()
        return hello

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
            self._proc = subprocess.Popen(
                keeper_argv(
                    listener.fileno(), self._output_dir, self._cgroups, config=self._config_path
                ),
                executable=_interpreter(),
                pass_fds=[listener.fileno()],
                close_fds=True,
                stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k == SPAWN_ENV},
                cwd="/",
            )
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
        if msg.get("op") != "hello" or msg.get("protocol") != PROTOCOL:
            raise OSError(errno.EPROTO, f"the job keeper speaks another protocol: {msg!r:.200}")
        where = msg.get("cgroups")
        return Hello(
            pid=int(msg["pid"]),
            spawn=str(msg["spawn"]),
            why=str(msg["why"]),
            jobs=[
                Kept(
                    job_id=str(j["job"]),
                    pid=int(j["pid"]),
                    size=int(j["size"]),
                    truncated=bool(j["truncated"]),
                    ending=bool(j["ending"]),
                    record=_dict(j["record"]),
                )
                for j in msg["jobs"]
            ],
            ended=[Finished.from_wire(f) for f in msg["ended"]],
            fresh=fresh,
            service=bool(msg.get("service", False)),
            uid=int(msg.get("uid", -1)),
            gives=bool(msg.get("gives", False)),
            cgroups=None
            if not isinstance(where, dict)
            else Subtree(Path(str(where["jobs"])), frozenset(map(str, where["controllers"]))),
        )

    def _attach_reader(self) -> None:
        if self._sock is None:
            return
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return
        # The socket stays blocking (reads are MSG_DONTWAIT): a send waits for the
        # keeper rather than failing a start because its buffer is momentarily full.
        self._loop.add_reader(self._sock.fileno(), self._readable)

    # ------------------------------------------------------------ requests

    def watch(self, job_id: str, sink: JobSink) -> None:
        """Send the reports of an adopted job (one of the hello's) to ``sink``."""
        self._sinks[job_id] = sink

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
        self._pending[rid] = (admitted, started, job_id, sink)
        try:
            return await admitted
        except asyncio.CancelledError:
            started.cancel()  # admitted or not, it must not run: see _dispatch
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
        self._reloads[rid] = fut
        try:
            proto.send(self._sock, {"op": "reload", "id": rid})
            return await asyncio.wait_for(asyncio.shield(fut), RELOAD_WAIT)
        except asyncio.TimeoutError:
            raise OSError(errno.ETIMEDOUT, "the job keeper did not answer the reload") from None
        finally:
            self._reloads.pop(rid, None)

    def stop(self, job_id: str, how: str) -> None:
        """Ask the keeper to stop a job ("stop", "shutdown", "kill", "not_recorded")."""
        self._send({"op": "stop", "job": job_id, "how": how})

    def ack(self, job_id: str) -> None:
        """The job's end is in the history: the keeper may forget it (sent in batches)."""
        if not self._acks and self._loop is not None:
            self._loop.call_soon(self._flush_acks)
        self._acks.append(job_id)
        if self._loop is None:
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
                for fd in byrole.values():
                    os.close(fd)
                self._dispatch(msg)
            except (proto.ProtocolError, ValueError, KeyError, TypeError) as e:
                log.error("bad message from the job keeper: %s", e)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        assert self._loop is not None
        op = msg["op"]
        if op == "output":
            for job_id, size, truncated in msg["jobs"]:
                sink = self._sinks.get(job_id)
                if sink is not None:
                    sink.on_output(int(size), bool(truncated))
        elif op == "ending":
            sink = self._sinks.get(msg["job"])
            if sink is not None:
                sink.on_ending()
        elif op == "admitted" or op == "refused":
            admitted, started, job_id, sink = self._pending[msg["id"]]
            if op == "refused":
                del self._pending[msg["id"]]
                if not admitted.done():
                    admitted.set_exception(refusal(msg))
                return
            if admitted.done():
                # Its start was cancelled before the answer: the job must not run unseen.
                started.cancel()
                return
            try:
                admitted.set_result(Admission(self, job_id, started, msg))
            except (KeyError, TypeError, ValueError) as e:
                # Never a hung StartJob: refused here, and the job (if it starts) stopped.
                started.cancel()
                admitted.set_exception(SpawnFailure(errno.EPROTO, f"bad admission: {e}"))
        elif op == "started":
            admitted, started, job_id, sink = self._pending.pop(msg["id"])
            pid = msg.get("pid")
            if pid is None:
                failure = SpawnFailure(int(msg.get("errno", errno.EIO)), str(msg["error"]))
                for fut in (admitted, started):
                    if not fut.done():
                        fut.set_exception(failure)
                        break
                return
            self._pids[job_id] = int(pid)
            if started.done() or not admitted.done():
                # The start was cancelled: the job must not run unseen (nor be recorded).
                self.stop(job_id, "not_recorded")
                return
            self._sinks[job_id] = sink
            started.set_result(int(pid))
        elif op == "reloaded":
            reload = self._reloads.get(msg["id"])
            if reload is not None and not reload.done():
                reload.set_result(msg)
        elif op == "finished":
            fin = Finished.from_wire(msg)
            self._pids.pop(fin.job_id, None)
            sink = self._sinks.pop(fin.job_id, None)
            # Scheduled, not called: the task awaiting this job's start (woken by the
            # answer just before) runs first.
            if sink is not None:
                self._loop.call_soon(sink.on_finished, fin)
            elif self.on_unknown_finished is not None and fin.persist:
                self._loop.call_soon(self.on_unknown_finished, fin)
        else:
            log.warning("unknown message from the job keeper: %.40s", op)

    # ------------------------------------------------------------ the keeper's death

    def _died(self) -> None:
        if self._closed or self._sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        status = self._reap_keeper(0.5)
        if self._service_wait is not None:
            # The keeper's service went (stopped, crashed): its manager stops or restarts
            # it, and its jobs with it. This agent goes too (its unit restarts it, and the
            # new agent waits for the keeper); it kills nothing of the keeper's.
            for admitted, started, _, _ in self._pending.values():
                for fut in (admitted, started):
                    if not fut.done():
                        fut.set_exception(SpawnFailure(errno.EIO, "the job keeper went away"))
                        break
            self._pending.clear()
            for reload in self._reloads.values():
                if not reload.done():
                    reload.set_exception(OSError(errno.EIO, "the job keeper went away"))
            self._sinks.clear()
            why = f"the job keeper service (pid {self.keeper_pid}) went away"
            log.error("%s; the agent exits (it attaches again when restarted)", why)
            if self._on_fatal is not None:
                self._on_fatal(why)
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
            len(self._sinks),
        )
        for admitted, started, job_id, _ in self._pending.values():
            self._kill(job_id, self._pids.pop(job_id, 0))
            for fut in (admitted, started):
                if not fut.done():
                    fut.set_exception(SpawnFailure(errno.EIO, "the job keeper died"))
                    break
        self._pending.clear()
        for reload in self._reloads.values():
            if not reload.done():
                reload.set_exception(OSError(errno.EIO, "the job keeper died"))
        if not adopt:
            self._lose(list(self._sinks))
        while self._count_death():
            try:
                hello = self.attach()
            except (OSError, ValueError, KeyError, TypeError) as e:
                # It died (or was killed) before its hello: one more death.
                log.error("the new job keeper failed: %s", e)
                self._reap_keeper(0.5)
                continue
            self._readopt(hello)
            return
        self._lose(list(self._sinks))

    def _readopt(self, hello: Hello) -> None:
        """After a new keeper's hello: the running jobs it adopted go on (their output size
        as it found it), those that ended meanwhile end, the rest are lost (killed)."""
        assert self._loop is not None
        for kept in hello.jobs:
            sink = self._sinks.get(kept.job_id)
            if sink is None:
                log.warning("job %s: a new job keeper holds it, but not this agent", kept.job_id)
                continue
            sink.on_output(kept.size, kept.truncated)
            if kept.ending:
                sink.on_ending()
        for fin in hello.ended:
            self._pids.pop(fin.job_id, None)
            sink = self._sinks.pop(fin.job_id, None)
            if sink is not None:
                self._loop.call_soon(sink.on_finished, fin)
            elif self.on_unknown_finished is not None and fin.persist:
                self._loop.call_soon(self.on_unknown_finished, fin)
        held = {k.job_id for k in hello.jobs}
        self._lose([job_id for job_id in self._sinks if job_id not in held])

    def _lose(self, job_ids: list[str]) -> None:
        """Kill these jobs of a dead keeper and end them FAILED (KEEPER_DIED)."""
        for job_id in job_ids:
            sink = self._sinks.pop(job_id)
            self._kill(job_id, self._pids.pop(job_id, 0))
            ex = Exit(exit_code=None, signal=None, lost=KEEPER_DIED, end_time=time.time())
            fin = Finished(job_id, JobState.FAILED, KEEPER_DIED, ex, size=-1, truncated=False)
            if self._loop is not None:
                self._loop.call_soon(sink.on_finished, fin)

    def _count_death(self) -> bool:
        """Count a keeper's death; False (after ``on_fatal``) once they come too often."""
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < DEATH_WINDOW] + [now]
        if len(self._deaths) <= MAX_DEATHS:
            return True
        why = (
            f"the job keeper died {len(self._deaths)} times in {DEATH_WINDOW:.0f} s; "
            "the agent cannot run jobs"
        )
        log.error("%s", why)
        self._proc = None
        if self._on_fatal is not None:
            self._on_fatal(why)
        return False

    def _kill(self, job_id: str, pid: int) -> None:
        """Kill a dead keeper's job: its process group and its cgroup (what left the group)."""
        if pid > 1:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        kill_job_cgroup(self._cgroups, job_id)

    def _reap_keeper(self, timeout: float) -> str:
        proc, self._proc = self._proc, None
        return "not this agent's child" if proc is None else reap(proc, timeout)

    # ------------------------------------------------------------ closing

    def abandon(self) -> None:
        """After a failed attach: kill a keeper this agent started (it holds nothing)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

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
        if self._proc is not None and not keep_jobs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=CLOSE_WAIT)
