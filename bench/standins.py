"""Stand-in workers: many fake agents in one asyncio process, for measuring a scheduler.

``python -m bench.standins --count N --scheduler HOST:PORT --certs DIR`` runs
N stand-ins. Each listens on an address of its own (127.0.0.1, consecutive
ports from ``--port-base``, below the kernel's ephemeral range so they never
collide with outgoing connections), serves the agent's ``Worker`` service
with mTLS (the ``server`` certificate of ``scripts/gen_certs.sh``, clients
verified against its CA), and registers with the scheduler as the agent
does: RegisterWorker over its own mTLS channel (identity ``agent``, so the
scheduler's ``[auth] workers`` accepts it), Heartbeat at the interval the
scheduler answers, RegisterWorker again when a heartbeat says ``known`` is
false, backoff with jitter while the scheduler is down. By default each keeps
a Link open after registering, with heartbeats on it, and answers the Worker
calls the scheduler sends down it (an agent with ``[scheduler] calls_as``);
``--no-link`` keeps the older way (Heartbeat calls, the scheduler connects to
each stand-in's port).

Every job is trivial and answered at once: StartJob gives a new job id of a
job that has already succeeded (exit 0, output ``ok\\n``); QueryJob, WaitJob,
StreamJobOutput and StopJob answer for it like an agent whose job ended. One
gRPC server listens on all the process's ports (a server per stand-in would
cost a completion queue each); the answers do not depend on the port.

The process prints ``ready N`` on stdout once every port listens, and
``registered N`` each time the count of registered stand-ins reaches N
(stderr carries problems). It runs until SIGTERM/SIGINT, then deregisters
nothing (like an agent that is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.channel import (
    keepalive_options,
    merge_options,
    reconnecting_channel_options,
    server_keepalive_options,
)

OUTPUT = b"ok\n"
# The agent's options for its link to the scheduler, but for two that a few
# thousand stand-ins sharing two CPUs cannot afford (one agent per host can):
# a connect deadline of 20 s instead of 0.5 s (a starved process misses it and
# retries, feeding the storm it measures) and keepalive pings every 30 s
# instead of 5 (late pongs of a starved process read as dead links).
LINK_OPTIONS = merge_options(
    reconnecting_channel_options(),
    [("grpc.min_reconnect_backoff_ms", 20_000), *keepalive_options(30.0, 20.0)],
)
RAMP_S = 0.002  # between first registrations in one process (not the storm: a start-up)
MAX_JOBS = 100_000  # job ids remembered per process; the oldest are forgotten past it


class UnknownJob(Exception):
    """No such job (NOT_FOUND)."""


class StandInWorker(pb_grpc.WorkerServicer):
    """The ``Worker`` service of every stand-in of a process: each job has already succeeded.

    The same answers serve direct calls and calls carried by a link (:meth:`answer`).
    """

    def __init__(self) -> None:
        """No jobs yet."""
        self.jobs: dict[str, pb.StartJobReq] = {}
        self.started = 0

    def _status(self, job_id: str) -> pb.QueryJobRes:
        req = self.jobs.get(job_id)
        if req is None:
            raise UnknownJob(f"no job {job_id}")
        return pb.QueryJobRes(
            done=True,
            state=pb.SUCCEEDED,
            exitCode=0,
            jobID=job_id,
            command=req.command,
            path=req.path,
            outputBytes=len(OUTPUT),
        )

    def _start(self, request: pb.StartJobReq) -> pb.StartJobRes:
        job_id = str(uuid.uuid4())
        if len(self.jobs) >= MAX_JOBS:
            del self.jobs[next(iter(self.jobs))]
        self.jobs[job_id] = request
        self.started += 1
        return pb.StartJobRes(jobID=job_id)

    def _output(self, request: pb.StreamJobOutputReq) -> list[pb.StreamJobOutputRes]:
        status = self._status(request.jobID)
        out = []
        if request.offset < len(OUTPUT):
            out.append(pb.StreamJobOutputRes(data=OUTPUT[request.offset :], offset=request.offset))
        if request.follow and request.endStatus:  # the agent's last message then
            end = max(request.offset, len(OUTPUT))
            out.append(pb.StreamJobOutputRes(offset=end, status=status))
        return out

    def _start_stream(self, request: pb.StartJobReq) -> list[pb.StreamJobOutputRes]:
        """StartJobStream's messages: the new job's id, its one line, its status."""
        job_id = self._start(request).jobID
        follow = pb.StreamJobOutputReq(jobID=job_id, follow=True, endStatus=True)
        return [pb.StreamJobOutputRes(jobID=job_id), *self._output(follow)]

    async def _known(self, job_id: str, context: Any) -> None:
        if job_id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id}")

    async def StartJob(self, request: pb.StartJobReq, context: Any) -> pb.StartJobRes:
        """A new job id; the job has already ended."""
        return self._start(request)

    async def StopJob(self, request: pb.StopJobReq, context: Any) -> pb.StopJobRes:
        """Nothing to stop."""
        await self._known(request.jobID, context)
        return pb.StopJobRes()

    async def QueryJob(self, request: pb.QueryJobReq, context: Any) -> pb.QueryJobRes:
        """Done, succeeded."""
        await self._known(request.jobID, context)
        return self._status(request.jobID)

    async def WaitJob(self, request: pb.WaitJobReq, context: Any) -> pb.QueryJobRes:
        """Done at once."""
        await self._known(request.jobID, context)
        return self._status(request.jobID)

    async def StreamJobOutput(self, request: pb.StreamJobOutputReq, context: Any) -> Any:
        """The job's one line from ``offset``, then the end (the job is over)."""
        await self._known(request.jobID, context)
        for msg in self._output(request):
            yield msg

    async def StartJobStream(self, request: pb.StartJobReq, context: Any) -> Any:
        """A new job id, then the job's one line and its end."""
        for msg in self._start_stream(request):
            yield msg

    def answer(self, call: pb.LinkCall) -> list[pb.LinkReply]:
        """The replies to a call carried by a link, as an agent sends them."""
        cid = call.callID
        try:
            if call.method == "StartJob":
                res: Any = self._start(pb.StartJobReq.FromString(call.request))
            elif call.method in ("QueryJob", "WaitJob"):
                res = self._status(pb.QueryJobReq.FromString(call.request).jobID)
            elif call.method == "StopJob":
                self._status(pb.StopJobReq.FromString(call.request).jobID)
                res = pb.StopJobRes()
            elif call.method == "ListJobs":
                res = pb.ListJobsRes()
            elif call.method in ("StreamJobOutput", "StartJobStream"):
                if call.method == "StartJobStream":
                    msgs = self._start_stream(pb.StartJobReq.FromString(call.request))
                else:
                    msgs = self._output(pb.StreamJobOutputReq.FromString(call.request))
                return [
                    *(pb.LinkReply(callID=cid, response=m.SerializeToString()) for m in msgs),
                    pb.LinkReply(callID=cid, last=True),
                ]
            else:
                code = grpc.StatusCode.UNIMPLEMENTED.value[0]
                return [pb.LinkReply(callID=cid, last=True, code=code, details=call.method)]
        except UnknownJob as e:
            code = grpc.StatusCode.NOT_FOUND.value[0]
            return [pb.LinkReply(callID=cid, last=True, code=code, details=str(e))]
        return [pb.LinkReply(callID=cid, response=res.SerializeToString(), last=True)]


class Registrar:
    """Registers one stand-in and keeps it registered (the agent's protocol).

    With ``link``, the stand-in keeps a Link open after registering (as an
    agent with ``[scheduler] calls_as`` does): heartbeats go up it, and it
    answers the Worker calls that come down it; without, Heartbeat calls.
    """

    def __init__(
        self,
        address: str,
        channel: grpc.aio.Channel,
        counter: Counter,
        worker: StandInWorker,
        link: bool,
    ) -> None:
        """Register ``address`` over ``channel``; ``counter`` counts who is registered."""
        self.address = address
        self.stub = pb_grpc.SchedulerStub(channel)
        self.counter = counter
        self.worker = worker
        self.link = link
        self.worker_id = ""
        self.registered = False

    def _set(self, registered: bool) -> None:
        if registered != self.registered:
            self.registered = registered
            self.counter.change(1 if registered else -1)

    async def run(self, labels: dict[str, str]) -> None:
        """Forever: register (with backoff), heartbeat, register again when forgotten."""
        delay = 0.2
        while True:
            try:
                res = await self.stub.RegisterWorker(
                    pb.RegisterReq(address=self.address, labels=labels), timeout=10
                )
            except grpc.aio.AioRpcError:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.2
            self.worker_id = res.workerID
            self._set(True)
            interval = float(res.heartbeatSeconds or 5)
            if self.link:
                await self._keep_linked(interval)
            else:
                await self._keep_alive(interval)
            self._set(False)

    async def _keep_alive(self, interval: float) -> None:
        # The first heartbeat at a random point of the interval: N stand-ins
        # started together would otherwise beat in lockstep (real agents drift).
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            try:
                res = await self.stub.Heartbeat(
                    pb.HeartbeatReq(workerID=self.worker_id), timeout=10
                )
            except grpc.aio.AioRpcError:
                await asyncio.sleep(random.uniform(0.5, 1.0) * min(interval, 2.0))
                continue
            if not res.known:
                return
            await asyncio.sleep(interval)

    async def _keep_linked(self, interval: float) -> None:
        """Keep the link open until the registration must be made again."""
        while True:
            end = await self._linked(interval)
            if end == "register":
                return
            if end == "unimplemented":  # a scheduler without links
                await self._keep_alive(interval)
                return
            await asyncio.sleep(random.uniform(0.5, 1.0) * min(interval, 2.0))

    async def _linked(self, interval: float) -> str:
        """One link, to its end: why it ended (register, unimplemented, broken)."""
        up: asyncio.Queue[pb.LinkUp | None] = asyncio.Queue()
        up.put_nowait(
            pb.LinkUp(hello=pb.LinkHello(workerID=self.worker_id, acceptsCalls=True, maxCalls=16))
        )

        async def ups() -> AsyncIterator[pb.LinkUp]:
            while (msg := await up.get()) is not None:
                yield msg

        async def beat() -> None:
            await asyncio.sleep(random.uniform(0, interval))
            while True:
                up.put_nowait(pb.LinkUp(heartbeat=pb.HeartbeatReq(workerID=self.worker_id)))
                await asyncio.sleep(interval)

        call = self.stub.Link(ups())
        beats = asyncio.ensure_future(beat())
        try:
            async for down in call:
                kind = down.WhichOneof("kind")
                if kind == "heartbeat" and not down.heartbeat.known:
                    return "register"
                if kind == "call":
                    for r in self.worker.answer(down.call):
                        up.put_nowait(pb.LinkUp(reply=r))
                # cancel: every answer went at once, nothing to cancel
            return "broken"
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "register"
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return "unimplemented"
            return "broken"
        finally:
            beats.cancel()
            up.put_nowait(None)  # the request stream ends (its reader is not left waiting)
            call.cancel()


class Counter:
    """How many stand-ins are registered; prints each new total."""

    def __init__(self) -> None:
        """Zero."""
        self.n = 0

    def change(self, d: int) -> None:
        """Add ``d`` and say so."""
        self.n += d
        print(f"registered {self.n}", flush=True)


def raise_fd_limit(want: int) -> None:
    """Raise RLIMIT_NOFILE to ``want`` if allowed (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(args: argparse.Namespace) -> None:
    """Serve and register ``args.count`` stand-ins until SIGTERM/SIGINT."""
    certs = Path(args.certs)
    ca = (certs / "ca.crt").read_bytes()
    server_creds = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.crt").read_bytes())],
        root_certificates=ca,
        require_client_auth=True,
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *server_keepalive_options()])
    servicer = StandInWorker()
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    addresses: list[str] = []
    port = args.port_base
    while len(addresses) < args.count:
        if port > 32767:
            raise SystemExit(f"standins: no free ports left below 32768 (from {args.port_base})")
        addr = f"127.0.0.1:{port}"
        port += 1
        try:
            server.add_secure_port(addr, server_creds)
        except RuntimeError:
            continue  # taken by someone else: the next one
        addresses.append(addr)
    await server.start()
    print(f"ready {len(addresses)}", flush=True)
    client_creds = grpc.ssl_channel_credentials(
        ca, (certs / "agent.key").read_bytes(), (certs / "agent.crt").read_bytes()
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counter = Counter()
    channels = []
    tasks = []
    labels = {"bench": "standin"}
    for addr in addresses:
        # One connection per stand-in, as each agent has its own.
        ch = grpc.aio.secure_channel(args.scheduler, client_creds, LINK_OPTIONS)
        channels.append(ch)
        reg = Registrar(addr, ch, counter, servicer, not args.no_link)
        tasks.append(asyncio.ensure_future(reg.run(labels)))
        await asyncio.sleep(RAMP_S)
        if stop.is_set():
            break
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in channels))
    await server.stop(grace=None)
    print(f"jobs {servicer.started}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.standins``: see the module doc."""
    ap = argparse.ArgumentParser(prog="python -m bench.standins")
    ap.add_argument("--count", type=int, required=True, help="stand-ins in this process")
    ap.add_argument("--scheduler", required=True, help="HOST:PORT of the scheduler")
    ap.add_argument("--certs", required=True, help="a folder made by scripts/gen_certs.sh")
    ap.add_argument("--port-base", type=int, default=12000, help="first port to try")
    ap.add_argument(
        "--no-link", action="store_true", help="Heartbeat calls, no Link (the older agent)"
    )
    args = ap.parse_args(argv)
    raise_fd_limit(4 * args.count + 1024)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
