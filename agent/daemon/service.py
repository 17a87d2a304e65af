"""The gRPC Worker service: a thin layer over the supervisor.

It converts protobuf messages to plain values (:mod:`agent.keeper.validation`
checks them), authenticates the caller from its verified certificate (read
as the scheduler reads it, :func:`agent.rpc.peer_certificate`), builds its
:class:`~agent.access.Caller` (deny by default), calls the supervisor,
answers every refusal with the status of its kind (the one table,
:data:`agent.rpc.STATUS`), and writes the audit log. It holds no job logic
and no access rule of its own.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import message as pb_message

from agent._proto import jobscheduler_pb2 as pb
from agent.access import ANONYMOUS, AccessRules, Caller
from agent.crl import RevocationChecker
from agent.daemon.audit import AuditLog
from agent.daemon.history import JobRecord
from agent.daemon.supervisor import Supervisor
from agent.keeper import validation
from agent.keeper.admission import StartRequest
from agent.keeper.errors import (
    AgentError,
    InvalidArgument,
    Kind,
    ResourceExhausted,
    Unauthenticated,
    agent_condition,
)
from agent.rpc import STATUS as STATUS  # server.py's gate answers refusals with it
from agent.rpc import abort, peer_certificate
from agent.tls import PeerCert
from agent.vocabulary import LIMITS

log = logging.getLogger(__name__)

READ_RPCS = frozenset({"QueryJob", "WaitJob", "ListJobs", "StreamJobOutput"})


class CarriedCall:
    """The context of a call carried by the scheduler's link, not by a connection of its own.

    Its caller is the identity the agent's own ``[scheduler] calls_as`` names (the
    scheduler was verified by TLS when the agent connected to it): no client
    certificate, no revocation check. :mod:`agent.daemon.link` makes these.
    """

    def __init__(self, caller: PeerCert) -> None:
        self.caller = caller


class Malformed:
    """Stands in for a request that could not be decoded."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _deserializer(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        # grpc would answer INTERNAL for an undecodable request; a caller's
        # bad bytes (for example invalid UTF-8 in a string) are its mistake:
        # INVALID_ARGUMENT.
        try:
            return cls.FromString(data)
        except pb_message.DecodeError as e:
            return Malformed(str(e).split(":")[-1].strip() or "undecodable request")

    return parse


def record_to_pb(rec: JobRecord) -> pb.QueryJobRes:
    """A job record as the QueryJob answer (original fields first)."""
    res = pb.QueryJobRes(
        done=rec.state.done,
        error=rec.state.is_error,
        errorText=rec.error_text,
        state=rec.state.value,  # type: ignore[arg-type]
        pid=rec.pid,
        jobID=rec.id,
        owner=rec.owner,
        command=rec.command,
        path=rec.path,
        args=rec.args,
        outputBytes=rec.output_bytes,
        outputTruncated=rec.output_truncated,
        timeoutSeconds=rec.timeout_seconds,
        requestKey=rec.request_key,
    )
    if rec.exit_code is not None:
        res.exitCode = rec.exit_code
    if rec.signal is not None:
        res.signal = rec.signal
    res.startTime.FromNanoseconds(int(rec.start_time * 1e9))
    if rec.end_time is not None:
        res.endTime.FromNanoseconds(int(rec.end_time * 1e9))
    if rec.state.done:
        res.rusage.userCpuSeconds = rec.user_cpu
        res.rusage.systemCpuSeconds = rec.system_cpu
        res.rusage.maxRssBytes = rec.max_rss
    return res


# How long an endStatus stream waits, after the output ended, for the job to be done.
END_STATUS_WAIT_S = 1.0

# QueryJob answers kept built (pollers ask about the same job until it is done, and
# again after); a few hundred messages of a few hundred bytes.
QUERY_REPLIES = 512


class QueryReplies:
    """QueryJob answers, built once per record state (bounded).

    Building the message costs more than the rest of a QueryJob, and a poller
    asks again and again about a job that has not changed. An answer is reused
    only while the record object and every field the answer shows that can
    change after the start (state, pid, exit, error, times, CPU, output) are what
    they were when it was built; the other fields never change. The answers are
    shared: nothing may modify them.
    """

    def __init__(self, size: int = QUERY_REPLIES) -> None:
        self.size = size
        self._replies: OrderedDict[str, tuple[tuple[Any, ...], pb.QueryJobRes]] = OrderedDict()

    def reply(self, rec: JobRecord) -> pb.QueryJobRes:
        """``record_to_pb(rec)``, from the cache while the record is as it was."""
        key = (
            id(rec),
            rec.state,
            rec.pid,
            rec.end_time,
            rec.exit_code,
            rec.signal,
            rec.error_text,
            rec.user_cpu,
            rec.system_cpu,
            rec.max_rss,
            rec.output_bytes,
            rec.output_truncated,
        )
        hit = self._replies.get(rec.id)
        if hit is not None and hit[0] == key:
            return hit[1]
        res = record_to_pb(rec)
        self._replies[rec.id] = (key, res)
        self._replies.move_to_end(rec.id)
        if len(self._replies) > self.size:
            self._replies.popitem(last=False)
        return res


T = TypeVar("T")
R = TypeVar("R", bound=pb_message.Message)  # a decoded request


class StreamSlots:
    """How many output streams are open, in total and per identity, within the limits.

    A stream whose client does not read waits (gRPC's flow control) but holds its
    buffers meanwhile (about 0.4 MB measured with 64 KiB chunks): the limits bound what
    the agent can be made to hold. ``on_change(open)`` is the metrics hook.
    """

    def __init__(
        self, total: int, per_identity: int, on_change: Callable[[int], None] | None = None
    ) -> None:
        self.total, self.per_identity = total, per_identity
        self.on_change = on_change
        self.open = 0
        self._by_identity: dict[str, int] = {}

    def acquire(self, identity: str) -> None:
        """Take a slot for ``identity``; raises ResourceExhausted when none is left."""
        mine = self._by_identity.get(identity, 0)
        if mine >= self.per_identity:
            raise ResourceExhausted(
                f"identity {identity!r} has {mine} output streams open, the limit is "
                f"{self.per_identity}; close one first",
                rule="stream-limit-identity",
            )
        if self.open >= self.total:
            raise ResourceExhausted(
                f"{self.open} output streams are open, the agent's limit is {self.total}; "
                "try again later",
                rule="stream-limit",
            )
        self._by_identity[identity] = mine + 1
        self.open += 1
        if self.on_change is not None:
            self.on_change(self.open)

    def release(self, identity: str) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        left = self._by_identity.get(identity, 0) - 1
        if left > 0:
            self._by_identity[identity] = left
        else:
            self._by_identity.pop(identity, None)
        self.open -= 1
        if self.on_change is not None:
            self.on_change(self.open)


class WorkerService:
    """Implements ``jobscheduler.Worker``."""

    def __init__(
        self,
        jobs: Supervisor,
        audit: AuditLog,
        access: AccessRules,
        *,
        log_reads: bool = False,
        revocation: RevocationChecker | None = None,
        streams: StreamSlots | None = None,
    ) -> None:
        self.jobs = jobs
        self.audit = audit
        self.access = access
        self.log_reads = log_reads
        self.revocation = revocation
        self.replies = QueryReplies()
        self.streams = streams or StreamSlots(128, 16)

    def set_access(self, access: AccessRules) -> None:
        """Decide every call from now on with ``access`` (``[auth]`` reloaded by SIGHUP)."""
        self.access = access

    # ------------------------------------------------------------ plumbing

    def identify(self, context: grpc.aio.ServicerContext) -> PeerCert:
        """The caller's verified certificate identity (and SANs), or Unauthenticated."""
        if isinstance(context, CarriedCall):
            return context.caller
        if not self.access.mtls:
            if self.access.allow_anonymous:
                return PeerCert(ANONYMOUS, False, "")
            raise Unauthenticated(
                "no client identity (the agent is not using mTLS)", rule="no-identity"
            )
        pem, peer = peer_certificate(context)
        if self.revocation is not None:
            # Every RPC, not only every handshake: a CRL loaded after the
            # connection was made still ends the next call on it.
            revoked = self.revocation.revoked(pem)
            if revoked:
                raise Unauthenticated(revoked, rule="revoked-client-cert")
        return peer

    async def _fail(
        self,
        context: grpc.aio.ServicerContext,
        rpc: str,
        identity: str,
        err: AgentError,
        **fields: Any,
    ) -> NoReturn:
        self.audit.record(
            "rpc",
            decision="deny",
            identity=identity,
            peer=context.peer(),
            rpc=rpc,
            reason=err.message,
            rule=err.rule,
            **fields,
        )
        if err.kind is Kind.INTERNAL:
            log.error("%s failed: %s", rpc, err.message)
        elif err.rule == "agent-resources":
            log.warning("%s refused: %s", rpc, err.message)  # one line, no traceback
        await abort(context, err)

    async def _run(
        self,
        rpc: str,
        request: R | Malformed,
        context: grpc.aio.ServicerContext,
        body: Callable[[Caller, R], Awaitable[T]],
        **fields: Any,
    ) -> T:
        """``body(caller, request)`` for an allowed caller and a decoded request.

        Every refusal (the caller's, the request's, ``body``'s, the agent's own
        resources running out) is audited and ends the call with its status.
        """
        identity = ""
        try:
            peer = self.identify(context)
            identity = peer.identity
            caller = self.access.caller(identity, peer.sans)
            caller.may_call()  # AccessDenied is a refusal like the others
            if isinstance(request, Malformed):
                raise InvalidArgument(
                    f"request could not be decoded: {request.reason}", rule="undecodable"
                )
            result = await body(caller, request)
        except AgentError as e:
            await self._fail(context, rpc, identity, e, **fields)
        except (OSError, MemoryError, RuntimeError) as e:
            # The agent's own resources ran out (descriptors, memory, disk, threads):
            # a status that says so and one log line, never UNKNOWN and a traceback.
            cond = agent_condition(e)
            if cond is None:
                raise
            await self._fail(context, rpc, identity, cond, **fields)
        if rpc in READ_RPCS and self.log_reads:
            self.audit.record(
                "rpc", decision="allow", identity=identity, peer=context.peer(), rpc=rpc, **fields
            )
        return result

    # ------------------------------------------------------------ RPCs

    async def StartJob(
        self, request: pb.StartJobReq | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.StartJobRes:
        rec, _, existing = await self._start("StartJob", request, context)
        return pb.StartJobRes(jobID=rec.id, requestKey=rec.request_key, existing=existing)

    async def RunJob(
        self, request: pb.StartJobReq | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.QueryJobRes:
        rec, caller, _ = await self._start("RunJob", request, context)
        if not rec.state.done:
            timeout: float | None = None
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = max(0.0, remaining - 0.05)
            rec = await self.jobs.view.wait(rec.id, caller, timeout)
        return self.replies.reply(rec)

    async def StartJobStream(
        self, request: pb.StartJobReq | Malformed, context: grpc.aio.ServicerContext
    ) -> None:
        """StartJob, then the job's output followed to its end with its status, in one
        call (the fan-out's way: one call per host). The first message carries the job id
        only; a requestKey used before streams the job of that start."""
        rec, _, _ = await self._start("StartJobStream", request, context)
        try:
            await context.write(pb.StreamJobOutputRes(jobID=rec.id))
        except Exception as e:  # the caller went away (see StreamJobOutput)
            log.debug("StartJobStream of %s ended by the client: %r", rec.id, e)
            return
        follow = pb.StreamJobOutputReq(jobID=rec.id, follow=True, endStatus=True)
        await self.StreamJobOutput(follow, context)

    async def _start(
        self, rpc: str, request: pb.StartJobReq | Malformed, context: grpc.aio.ServicerContext
    ) -> tuple[JobRecord, Caller, bool]:
        """The started job (or, with a requestKey used before, the job of that start:
        True), its caller."""
        fields = _start_fields(request)

        async def body(caller: Caller, req: pb.StartJobReq) -> tuple[JobRecord, Caller, bool]:
            # Every size bound before any other work on the request.
            validation.start_bounds(req.command, req.path, req.args, req.env, req.secretArgs)
            key = validation.request_key(req.requestKey)
            start = _start_request(req, caller.identity)
            if not key:
                return await self.jobs.start(start), caller, False
            rec, existing = await self.jobs.start_keyed(start, key)
            return rec, caller, existing

        rec, caller, existing = await self._run(rpc, request, context, body, **fields)
        _audit_start(self.audit, rpc, context.peer(), rec, caller, existing, fields.get("env"))
        return rec, caller, existing

    async def StopJob(
        self, request: pb.StopJobReq | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.StopJobRes:
        job_id = "" if isinstance(request, Malformed) else request.jobID

        async def body(caller: Caller, _: pb.StopJobReq) -> pb.StopJobRes:
            rec = self.jobs.stop(validation.job_id(job_id), caller)
            self.audit.record(
                "job_stop",
                decision="allow",
                identity=caller.identity,
                peer=context.peer(),
                rpc="StopJob",
                job_id=rec.id,
                command=rec.command,
                path=rec.path,
                state=rec.state.name,
            )
            return pb.StopJobRes()

        return await self._run("StopJob", request, context, body, job_id=job_id[:64])

    async def QueryJob(
        self, request: pb.QueryJobReq | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.QueryJobRes:
        job_id = "" if isinstance(request, Malformed) else request.jobID

        async def body(caller: Caller, _: pb.QueryJobReq) -> pb.QueryJobRes:
            return self.replies.reply(await self.jobs.view.query(validation.job_id(job_id), caller))

        return await self._run("QueryJob", request, context, body, job_id=job_id[:64])

    async def WaitJob(
        self, request: pb.WaitJobReq | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.QueryJobRes:
        job_id = "" if isinstance(request, Malformed) else request.jobID

        async def body(caller: Caller, req: pb.WaitJobReq) -> pb.QueryJobRes:
            timeout: float | None = None
            remaining = context.time_remaining()
            if remaining is not None:
                # Answer just before the caller's deadline, with the status
                # as it is, rather than letting the call fail.
                timeout = max(0.0, remaining - 0.05)
            if req.waitMillis:
                wait = req.waitMillis / 1000.0
                timeout = wait if timeout is None else min(timeout, wait)
            rec = await self.jobs.view.wait(validation.job_id(job_id), caller, timeout)
            return self.replies.reply(rec)

        return await self._run("WaitJob", request, context, body, job_id=job_id[:64])

    async def ListJobs(
        self, request: pb.ListJobsReq | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsRes:
        async def body(caller: Caller, req: pb.ListJobsReq) -> pb.ListJobsRes:
            validation.list_bounds(req.states, req.owner, req.pageToken)
            states = validation.states(req.states)
            recs, token = self.jobs.view.list_jobs(
                caller,
                states=states,
                owner=req.owner,
                page_size=req.pageSize,
                page_token=req.pageToken,
            )
            return pb.ListJobsRes(jobs=[record_to_pb(r) for r in recs], nextPageToken=token)

        return await self._run("ListJobs", request, context, body)

    async def StreamJobOutput(
        self, request: pb.StreamJobOutputReq | Malformed, context: grpc.aio.ServicerContext
    ) -> None:
        job_id = "" if isinstance(request, Malformed) else request.jobID
        chunks: list[AsyncIterator[tuple[int, bytes]]] = []
        holder: list[Caller] = []  # the caller whose slot this stream holds

        async def body(caller: Caller, req: pb.StreamJobOutputReq) -> None:
            self.streams.acquire(caller.identity)
            holder.append(caller)
            it = self.jobs.view.stream(validation.job_id(job_id), caller, req.offset, req.follow)
            # Run the access checks now (the first step of the generator),
            # so a refusal is a status, not a broken stream.
            first = await _first(it)
            chunks.append(first)

        try:
            await self._run("StreamJobOutput", request, context, body, job_id=job_id[:64])
            # context.write() rather than an async generator: a client that goes away
            # fails the write here, where it is the normal end of a stream, instead of
            # inside gRPC, which logs a traceback for each one.
            end = 0 if isinstance(request, Malformed) else request.offset
            async for offset, data in chunks[0]:
                if context.done():
                    return
                end = offset + len(data)
                try:
                    await context.write(pb.StreamJobOutputRes(data=data, offset=offset))
                except Exception as e:
                    # gRPC fails the write once the call is over (the client cancelled
                    # or went away; its own error type, ExecuteBatchError, is private):
                    # nothing left to send to, nothing to report.
                    log.debug("StreamJobOutput of %s ended by the client: %r", job_id[:64], e)
                    return
            if not isinstance(request, Malformed) and request.follow and request.endStatus:
                await self._end_status(job_id, end, holder[0], context)
        finally:
            if chunks:
                await chunks[0].aclose()  # type: ignore[attr-defined]
            if holder:
                self.streams.release(holder[0].identity)

    async def _end_status(
        self, job_id: str, end: int, caller: Caller, context: grpc.aio.ServicerContext
    ) -> None:
        """The last message of an endStatus stream: the ended job's status (saves a WaitJob).

        Sent only once the job is done (its output ends as it exits, or earlier if it
        closed its output: waited for END_STATUS_WAIT_S), at the output's end offset
        ``end``; when it is missing the caller asks WaitJob, so a failure only leaves it out.
        """
        try:
            rec = await self.jobs.view.wait(job_id, caller, END_STATUS_WAIT_S)
            if rec.state.done and not context.done():
                res = pb.StreamJobOutputRes(offset=end, status=self.replies.reply(rec))
                await context.write(res)
        except Exception as e:  # the job was pruned, or the client went away (see above)
            log.debug("StreamJobOutput of %s: no end status: %r", job_id[:64], e)


def worker_handler(service: WorkerService) -> grpc.GenericRpcHandler:
    """The Worker service as a generic handler to add to a grpc.aio server."""
    return grpc.method_handlers_generic_handler("jobscheduler.Worker", worker_methods(service))


def worker_methods(service: WorkerService) -> dict[str, grpc.RpcMethodHandler]:
    """The Worker methods by name: the listener's and the scheduler link's, the same."""
    uu = grpc.unary_unary_rpc_method_handler
    return {
        "StartJob": uu(
            service.StartJob, _deserializer(pb.StartJobReq), pb.StartJobRes.SerializeToString
        ),
        "RunJob": uu(
            service.RunJob, _deserializer(pb.StartJobReq), pb.QueryJobRes.SerializeToString
        ),
        "StopJob": uu(
            service.StopJob, _deserializer(pb.StopJobReq), pb.StopJobRes.SerializeToString
        ),
        "QueryJob": uu(
            service.QueryJob, _deserializer(pb.QueryJobReq), pb.QueryJobRes.SerializeToString
        ),
        "WaitJob": uu(
            service.WaitJob, _deserializer(pb.WaitJobReq), pb.QueryJobRes.SerializeToString
        ),
        "ListJobs": uu(
            service.ListJobs, _deserializer(pb.ListJobsReq), pb.ListJobsRes.SerializeToString
        ),
        "StreamJobOutput": grpc.unary_stream_rpc_method_handler(
            service.StreamJobOutput,
            _deserializer(pb.StreamJobOutputReq),
            pb.StreamJobOutputRes.SerializeToString,
        ),
        "StartJobStream": grpc.unary_stream_rpc_method_handler(
            service.StartJobStream,
            _deserializer(pb.StartJobReq),
            pb.StreamJobOutputRes.SerializeToString,
        ),
    }


async def _first(it: AsyncIterator[tuple[int, bytes]]) -> AsyncIterator[tuple[int, bytes]]:
    """Advance ``it`` once (raising its errors now) and return an equivalent iterator."""
    try:
        head = await it.__anext__()
    except StopAsyncIteration:

        async def empty() -> AsyncIterator[tuple[int, bytes]]:
            return
            yield  # pragma: no cover

        return empty()

    async def rest() -> AsyncIterator[tuple[int, bytes]]:
        try:
            yield head
            async for item in it:
                yield item
        finally:
            await it.aclose()  # type: ignore[attr-defined]  # the file, closed now

    return rest()


def _start_fields(request: pb.StartJobReq | Malformed) -> dict[str, Any]:
    """What the audit says of a StartJob, bounded: a refused request must not turn into a
    megabyte audit line, nor cost more than a few dozen items to describe (islice, never
    a sort or copy of the whole map)."""
    if isinstance(request, Malformed):
        return {}
    return {
        "command": request.command[:512],
        "path": request.path[:512],
        "args": _audit_args(request),
        "env": sorted(n[:128] for n in itertools.islice(request.env, 64)),
        "arg_count": len(request.args),
        "env_count": len(request.env),
    }


def _audit_start(
    audit: AuditLog,
    rpc: str,
    peer: str,
    rec: JobRecord,
    caller: Caller,
    existing: bool,
    env: list[str] | None,
) -> None:
    """The audit line of an answered start: ``job_start``, or ``job_start_repeat`` for a
    requestKey used before (nothing started: audited as what it is, not a second start)."""
    common: dict[str, Any] = {"decision": "allow", "peer": peer, "rpc": rpc, "job_id": rec.id}
    if existing:
        audit.record(
            "job_start_repeat", identity=caller.identity, request_key=rec.request_key, **common
        )
        return
    audit.record(
        "job_start",
        identity=rec.owner,
        **common,
        command=rec.command,
        path=rec.path,
        args=rec.args,
        env=env,
        pid=rec.pid,
        state=rec.state.name,
        reason=rec.error_text,
        **({"request_key": rec.request_key} if rec.request_key else {}),
    )


def _audit_args(request: pb.StartJobReq) -> list[str]:
    # Only the first 64 arguments are described, so only indexes below 64
    # matter; the set is built from a bounded slice of secretArgs.
    if len(request.secretArgs) > 1024:  # refused anyway; hide every argument
        return ["<secret>"] * min(len(request.args), 64)
    secret = {i for i in request.secretArgs if 0 <= i < 64}
    return [
        "<secret>" if i in secret else a[:256]
        for i, a in enumerate(itertools.islice(request.args, 64))
    ]


def _start_request(request: pb.StartJobReq, identity: str) -> StartRequest:
    limits: dict[str, int | None] = {}
    if request.HasField("limits"):
        for lim in LIMITS:
            if request.limits.HasField(lim.wire):
                limits[lim.name] = getattr(request.limits, lim.wire)
    return StartRequest(
        identity=identity,
        command=request.command,
        path=request.path,
        args=tuple(request.args),
        env=dict(request.env),
        timeout_seconds=request.timeoutSeconds if request.HasField("timeoutSeconds") else None,
        limits=limits,
        secret_args=tuple(request.secretArgs),
    )
