"""The agent's side of the worker link (Scheduler.Link): heartbeats and calls on one stream.

A real agent registers with a small scheduler written here (a grpc.aio server with mTLS
and the test certificates, RegisterWorker/Heartbeat/Link as docs/fleet.md describes the
protocol), which watches what comes up the link and sends Worker calls down it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_config import BASE as CONFIG_BASE

from agent._proto import jobscheduler_pb2 as pb
from agent.access import AccessRules, identity_problem, identity_sans
from agent.configfile import ConfigError
from agent.keeper.config import parse

from helpers import AgentProcess, Certs, free_port, policy_for, registration_section, wait_for

AgentFactory = Callable[..., AgentProcess]

OK, CANCELLED, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 1, 3, 4
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED = 7, 8, 12


class FakeScheduler:
    """A scheduler on its own event loop in a thread: registration, Heartbeat and (with
    ``link``) Link, recording what the agent sends and letting the test send calls."""

    def __init__(self, certs: Certs, *, link: bool = True) -> None:
        self.certs = certs
        self.link = link
        self.addr = f"127.0.0.1:{free_port()}"
        self.registrations: list[str] = []  # worker ids given out
        self.deregistrations: list[str] = []
        self.known: set[str] = set()
        self.hellos: list[pb.LinkHello] = []
        self.link_heartbeats = 0
        self.unary_heartbeats = 0
        self.link_attempts = 0
        self.link_identities: list[str] = []
        self.refuse_hello: grpc.StatusCode | None = None
        self.silent = False  # heartbeats on the link go unanswered
        self._context: Any = None  # the open link's
        self._lock: asyncio.Lock | None = None
        self._replies: dict[int, asyncio.Queue[pb.LinkReply]] = {}
        self._next_id = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self._on_loop(self._start())

    def _on_loop(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> grpc.aio.Server:
        self._lock = asyncio.Lock()
        methods = {
            "RegisterWorker": grpc.unary_unary_rpc_method_handler(
                self._register, pb.RegisterReq.FromString, pb.RegisterRes.SerializeToString
            ),
            "DeregisterWorker": grpc.unary_unary_rpc_method_handler(
                self._deregister, pb.DeregisterReq.FromString, pb.DeregisterRes.SerializeToString
            ),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(
                self._heartbeat, pb.HeartbeatReq.FromString, pb.HeartbeatRes.SerializeToString
            ),
        }
        if self.link:
            methods["Link"] = grpc.stream_stream_rpc_method_handler(
                self._link, pb.LinkUp.FromString, pb.LinkDown.SerializeToString
            )
        server = grpc.aio.server(
            handlers=[
                grpc.method_handlers_generic_handler("jobscheduler.Scheduler", methods),
                _Unknown(self),
            ]
        )
        c = self.certs
        creds = grpc.ssl_server_credentials(
            [(c.key("scheduler").read_bytes(), c.crt("scheduler").read_bytes())],
            root_certificates=c.ca.read_bytes(),
            require_client_auth=True,
        )
        server.add_secure_port(self.addr, creds)
        await server.start()
        return server

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._on_loop(self._server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    # ------------------------------------------------------------ the service

    async def _register(self, req: pb.RegisterReq, ctx: Any) -> pb.RegisterRes:
        wid = str(uuid.uuid4())
        self.registrations.append(wid)
        self.known.add(wid)
        return pb.RegisterRes(success=True, workerID=wid)

    async def _deregister(self, req: pb.DeregisterReq, ctx: Any) -> pb.DeregisterRes:
        self.deregistrations.append(req.workerID)
        self.known.discard(req.workerID)
        return pb.DeregisterRes(success=True)

    async def _heartbeat(self, req: pb.HeartbeatReq, ctx: Any) -> pb.HeartbeatRes:
        self.unary_heartbeats += 1
        return pb.HeartbeatRes(known=req.workerID in self.known)

    async def _link(self, requests: Any, ctx: Any) -> None:
        self.link_attempts += 1
        first = await ctx.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message is the hello")
        if self.refuse_hello is not None:
            code, self.refuse_hello = self.refuse_hello, None
            await ctx.abort(code, "not registered: register again")
        if first.hello.workerID not in self.known:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, "not registered: register again")
        self.hellos.append(first.hello)
        self.link_identities.append(ctx.auth_context()["x509_common_name"][0].decode())
        self._context = ctx
        while True:
            up = await ctx.read()
            if up is grpc.aio.EOF:
                return
            kind = up.WhichOneof("kind")
            if kind == "heartbeat" and self.silent:
                continue
            if kind == "heartbeat":
                self.link_heartbeats += 1
                known = up.heartbeat.workerID in self.known
                await self._send(pb.LinkDown(heartbeat=pb.HeartbeatRes(known=known)))
            elif kind == "reply":
                await self._replies[up.reply.callID].put(up.reply)

    async def _send(self, down: pb.LinkDown) -> None:
        assert self._lock is not None
        async with self._lock:
            await self._context.write(down)

    # ------------------------------------------------------------ the test's side

    def send_call(self, method: str, request: bytes, timeout_ms: int = 0) -> int:
        """Send a call down the open link; returns its id."""
        self._next_id += 1
        call_id = self._next_id

        async def go() -> None:
            self._replies[call_id] = asyncio.Queue()
            call = pb.LinkCall(
                callID=call_id, method=method, request=request, timeoutMillis=timeout_ms
            )
            await self._send(pb.LinkDown(call=call))

        self._on_loop(go())
        return call_id

    def replies(self, call_id: int, timeout: float = 20.0) -> list[pb.LinkReply]:
        """Every reply of call ``call_id``, up to and including its last."""

        async def collect() -> list[pb.LinkReply]:
            out: list[pb.LinkReply] = []
            while not out or not out[-1].last:
                out.append(await self._replies[call_id].get())
            return out

        return self._on_loop(asyncio.wait_for(collect(), timeout), timeout + 5)  # type: ignore[no-any-return]

    def call(self, method: str, request: bytes, timeout_ms: int = 0) -> list[pb.LinkReply]:
        return self.replies(self.send_call(method, request, timeout_ms))

    def cancel(self, call_id: int) -> None:
        self._on_loop(self._send(pb.LinkDown(cancel=pb.LinkCancel(callID=call_id))))

    def end_link(self, code: grpc.StatusCode) -> None:
        """End the open link with ``code`` (as a scheduler going away would)."""

        async def go() -> None:
            self._context.set_code(code)
            self._context.set_details("going away")
            await self._context.abort(code, "going away")

        with contextlib.suppress(Exception):
            self._on_loop(go())


class _Unknown(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Counts calls of methods the scheduler does not have (gRPC answers UNIMPLEMENTED)."""

    def __init__(self, sched: FakeScheduler) -> None:
        self.sched = sched

    def service(self, details: Any) -> None:
        if details.method.endswith("/Link"):
            self.sched.link_attempts += 1
        return None


@pytest.fixture
def sched(certs: Certs) -> Iterator[FakeScheduler]:
    s = FakeScheduler(certs)
    yield s
    s.stop()


def _linked_agent(
    make_agent: AgentFactory, sched: FakeScheduler, certs: Certs, **extra: Any
) -> AgentProcess:
    policy = extra.pop("policy", None)
    a = make_agent(
        policy, scheduler=registration_section(sched.addr, certs, heartbeat_seconds=0.3, **extra)
    )
    wait_for(lambda: sched.hellos and sched.link_heartbeats >= 1, timeout=20)
    return a


def _start(sched: FakeScheduler, command: str, path: str, *args: str) -> str:
    req = pb.StartJobReq(command=command, path=path, args=args)
    [reply] = sched.call("StartJob", req.SerializeToString())
    assert (reply.code, reply.details, reply.last) == (OK, "", True)
    return pb.StartJobRes.FromString(reply.response).jobID


# ---------------------------------------------------------------- heartbeats


def test_heartbeats_travel_on_the_link_and_shutdown_deregisters(
    make_agent: AgentFactory, sched: FakeScheduler, certs: Certs
) -> None:
    """After RegisterWorker: the hello, then heartbeats on the link, no Heartbeat calls."""
    a = _linked_agent(make_agent, sched, certs)
    wait_for(lambda: sched.link_heartbeats >= 3, timeout=20)
    [hello] = sched.hellos
    assert hello.workerID == sched.registrations[0]
    assert (hello.acceptsCalls, hello.maxCalls) == (False, 0)  # calls_as is not set
    assert sched.link_identities == ["agent"]  # on the registration's mTLS connection
    assert sched.unary_heartbeats == 0 and len(sched.registrations) == 1
    assert "heartbeats go over the link to scheduler" in a.log()
    a.stop()
    assert sched.deregistrations == sched.registrations


def test_an_unknown_worker_registers_again_and_links_again(
    make_agent: AgentFactory, sched: FakeScheduler, certs: Certs
) -> None:
    """known = false on the link: register again, reopen; a hello refused NOT_FOUND too."""
    _linked_agent(make_agent, sched, certs)
    sched.known.clear()  # the scheduler forgot the worker
    wait_for(lambda: len(sched.hellos) == 2, timeout=20)
    assert len(sched.registrations) == 2
    assert sched.hellos[1].workerID == sched.registrations[1]
    # A link that breaks is a failed heartbeat: opened again, the worker known still.
    sched.end_link(grpc.StatusCode.UNAVAILABLE)
    wait_for(lambda: len(sched.hellos) == 3, timeout=20)
    assert len(sched.registrations) == 2
    # A hello refused NOT_FOUND (the scheduler lost the registration): register again.
    sched.refuse_hello = grpc.StatusCode.NOT_FOUND
    sched.end_link(grpc.StatusCode.UNAVAILABLE)
    wait_for(lambda: len(sched.hellos) == 4, timeout=20)
    assert len(sched.registrations) == 3
    assert sched.unary_heartbeats == 0


def test_a_silent_link_is_a_failed_heartbeat(
    make_agent: AgentFactory, sched: FakeScheduler, certs: Certs
) -> None:
    """Heartbeats unanswered within call_timeout_seconds: the link is closed and reopened."""
    a = _linked_agent(make_agent, sched, certs)
    sched.silent = True
    wait_for(lambda: "heartbeat not answered within 2 s" in a.log(), timeout=20)
    sched.silent = False
    wait_for(lambda: len(sched.hellos) == 2, timeout=20)
    assert len(sched.registrations) == 1 and sched.unary_heartbeats == 0
    wait_for(lambda: "reachable again" in a.log(), timeout=20)


def test_a_scheduler_without_link_gets_heartbeat_calls(
    make_agent: AgentFactory, certs: Certs
) -> None:
    """Link UNIMPLEMENTED: the unary Heartbeat as before, said once, not retried."""
    s = FakeScheduler(certs, link=False)
    try:
        a = make_agent(scheduler=registration_section(s.addr, certs, heartbeat_seconds=0.3))
        wait_for(lambda: s.unary_heartbeats >= 4, timeout=20)
        assert len(s.registrations) == 1 and s.link_attempts >= 1
        assert a.log().count("has no Link: heartbeats as calls") == 1
        # Heartbeats as calls, never a try of Link with each: more tries only with a new
        # registration. (A try that breaks, a timeout on a loaded machine, is tried again:
        # the scheduler was not reached; one answered UNIMPLEMENTED is not.)
        tries, regs, beats = s.link_attempts, len(s.registrations), s.unary_heartbeats
        wait_for(lambda: s.unary_heartbeats >= beats + 4, timeout=20)
        assert s.link_attempts - tries == len(s.registrations) - regs == 0
        # It forgets the worker: registered again, Link tried once more, then calls again.
        s.known.clear()
        wait_for(lambda: len(s.registrations) >= 2 and s.unary_heartbeats >= beats + 8, timeout=20)
        wait_for(lambda: s.link_attempts >= len(s.registrations), timeout=20)
        tries, regs, beats = s.link_attempts, len(s.registrations), s.unary_heartbeats
        wait_for(lambda: s.unary_heartbeats >= beats + 4, timeout=20)
        assert s.link_attempts - tries <= len(s.registrations) - regs
        assert a.log().count("has no Link") == 1
    finally:
        s.stop()


def test_link_false_keeps_heartbeat_calls(
    make_agent: AgentFactory, sched: FakeScheduler, certs: Certs
) -> None:
    """[scheduler] link = false: no Link at all, Heartbeat calls."""
    make_agent(scheduler=registration_section(sched.addr, certs, heartbeat_seconds=0.3, link=False))
    wait_for(lambda: sched.unary_heartbeats >= 3, timeout=20)
    assert sched.link_attempts == 0 and sched.hellos == []


# ---------------------------------------------------------------- calls


def test_a_job_over_the_link(
    make_agent: AgentFactory, sched: FakeScheduler, certs: Certs, script_dir: Path
) -> None:
    """StartJob, then StreamJobOutput to the job's end with its status, as calls_as."""
    a = _linked_agent(make_agent, sched, certs, calls_as="scheduler")
    assert (sched.hellos[0].acceptsCalls, sched.hellos[0].maxCalls) == (True, 256)
    job = _start(sched, "bash", f"{script_dir}/hello.sh", "over", "link")
    req = pb.StreamJobOutputReq(jobID=job, follow=True, endStatus=True)
    replies = sched.call("StreamJobOutput", req.SerializeToString())
    *messages, end = replies
    assert (end.last, end.code, end.response) == (True, OK, b"")
    chunks = [pb.StreamJobOutputRes.FromString(r.response) for r in messages]
    assert b"".join(c.data for c in chunks) == b"hello over link\n"
    assert chunks[-1].HasField("status") and chunks[-1].status.state == pb.SUCCEEDED
    assert chunks[-1].status.owner == "scheduler"
    # The same job, seen directly by the scheduler's own certificate: one identity.
    assert a.client("scheduler").query(job).state == "SUCCEEDED"
    starts = [e for e in a.audit_lines() if e.get("event") == "job_start"]
    assert [(e["identity"], e["peer"], e["job_id"]) for e in starts] == [
        ("scheduler", f"link:{sched.addr}", job)
    ]


def test_refusals_are_the_services(
    make_agent: AgentFactory, sched: FakeScheduler, certs: Certs, script_dir: Path
) -> None:
    """The policy, bad bytes, an unknown method: each answered as a direct call is."""
    policy = policy_for(
        script_dir,
        "  - name: clients-only\n    command: /bin/true\n    aliases: [mine]\n"
        "    identities: [client]\n",
    )
    a = _linked_agent(make_agent, sched, certs, calls_as="scheduler", policy=policy)
    req = pb.StartJobReq(command="mine", path="")
    [refused] = sched.call("StartJob", req.SerializeToString())
    with a.stub("scheduler") as stub, pytest.raises(grpc.RpcError) as direct:
        stub.StartJob(req, timeout=10)
    assert direct.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (refused.last, refused.code, refused.details) == (
        True,
        PERMISSION_DENIED,
        direct.value.details(),
    )
    [garbage] = sched.call("QueryJob", b"\xff\xff\xff\xff")
    assert garbage.code == INVALID_ARGUMENT and "could not be decoded" in garbage.details
    [unknown] = sched.call("Frobnicate", b"")
    assert unknown.code == UNIMPLEMENTED and unknown.last
    denials = [e for e in a.audit_lines() if e.get("peer") == f"link:{sched.addr}"]
    assert [(e["decision"], e["identity"], e["rpc"]) for e in denials] == [
        ("deny", "scheduler", "StartJob"),
        ("deny", "scheduler", "QueryJob"),
    ]


def test_without_calls_as_calls_are_refused(
    make_agent: AgentFactory, sched: FakeScheduler, certs: Certs
) -> None:
    """calls_as empty: a call sent anyway is PERMISSION_DENIED and nothing runs."""
    a = _linked_agent(make_agent, sched, certs)
    [reply] = sched.call("StartJob", pb.StartJobReq(command="true", path="").SerializeToString())
    assert (reply.last, reply.code) == (True, PERMISSION_DENIED)
    assert "calls_as" in reply.details
    assert a.client("admin").list() == ([], "")
    [deny] = [e for e in a.audit_lines() if e.get("rule") == "link-calls-not-accepted"]
    assert (deny["peer"], deny["rpc"], deny["decision"]) == (
        f"link:{sched.addr}",
        "StartJob",
        "deny",
    )


def test_cancel_and_deadline(make_agent: AgentFactory, sched: FakeScheduler, certs: Certs) -> None:
    """LinkCancel ends a call; timeoutMillis is the call's deadline, as a direct call's."""
    a = _linked_agent(make_agent, sched, certs, calls_as="scheduler")
    job = _start(sched, "sleep", "30")
    follow = pb.StreamJobOutputReq(jobID=job, follow=True).SerializeToString()
    call_id = sched.send_call("StreamJobOutput", follow)
    sched.cancel(call_id)
    assert sched.replies(call_id)[-1].code == CANCELLED
    # A follower past its deadline is cancelled with DEADLINE_EXCEEDED ...
    [late] = sched.call("StreamJobOutput", follow, timeout_ms=300)
    assert (late.last, late.code) == (True, DEADLINE_EXCEEDED)
    # ... and WaitJob answers just before it, with the job as it is (time_remaining).
    wait = pb.WaitJobReq(jobID=job).SerializeToString()
    [status] = sched.call("WaitJob", wait, timeout_ms=300)
    assert status.code == OK and pb.QueryJobRes.FromString(status.response).state == pb.RUNNING
    # The cancelled and expired streams gave their slots back: 16 more fit per identity.
    ids = [sched.send_call("StreamJobOutput", follow) for _ in range(16)]
    for i in ids:
        sched.cancel(i)
        assert sched.replies(i)[-1].code == CANCELLED
    # At most maxCalls at once: one more is refused at once, the others run on.
    long_wait = pb.WaitJobReq(jobID=job, waitMillis=60_000).SerializeToString()
    waits = [sched.send_call("WaitJob", long_wait) for _ in range(sched.hellos[0].maxCalls)]
    [busy] = sched.call("WaitJob", long_wait)
    assert busy.code == RESOURCE_EXHAUSTED and "256" in busy.details
    for i in waits:
        sched.cancel(i)
    assert {sched.replies(i)[-1].code for i in waits} == {CANCELLED}
    a.client("scheduler").stop(job)


# ---------------------------------------------------------------- configuration


BASE = CONFIG_BASE + '[scheduler]\nregister = true\naddr = "127.0.0.1:50001"\n'


def test_calls_as_needs_tls_and_one_identity() -> None:
    """calls_as with use_tls = false, or a pattern, is a config error naming the key."""
    f = Path("/etc/agent/config.toml")
    plain = BASE + 'use_tls = false\nallow_plaintext_loopback = true\ncalls_as = "scheduler"\n'
    with pytest.raises(ConfigError, match=r"\[scheduler\] calls_as: needs use_tls = true"):
        parse(plain, f)
    tls = BASE + 'crt_file = "a.crt"\nkey_file = "a.key"\nca_file = "ca.crt"\n'
    for bad in ("*.example.com", "spiffe://example.com/sched/", " scheduler"):
        with pytest.raises(ConfigError, match=r"\[scheduler\] calls_as"):
            parse(tls + f'calls_as = "{bad}"\n', f)
    cfg = parse(tls + 'calls_as = "scheduler"\n', f)
    assert (cfg.scheduler.calls_as, cfg.scheduler.link) == ("scheduler", True)
    assert parse(tls, f).scheduler.calls_as == ""


def test_calls_as_identity_matches_patterns_as_a_certificate_would() -> None:
    """A SPIFFE ID matches a prefix entry, a DNS name a wildcard; patterns are no identity."""
    rules = AccessRules(clients=frozenset({"spiffe://example.com/sched/", "*.example.com"}))
    for name in ("spiffe://example.com/sched/a", "s1.example.com"):
        assert identity_problem(name) == ""
        assert rules.allows(name, identity_sans(name))
    assert not rules.allows("scheduler", identity_sans("scheduler"))
    assert identity_problem("*.example.com") and identity_problem("spiffe://Bad/x")


def test_link_context_is_what_the_service_reads() -> None:
    """LinkContext: the calls_as caller for identify(), a deadline, abort() as a status."""
    from agent.daemon.link import LinkAbort, LinkContext
    from agent.daemon.service import WorkerService
    from agent.tls import PeerCert

    sent: list[pb.LinkUp] = []

    async def send(up: pb.LinkUp) -> None:
        sent.append(up)

    async def run() -> None:
        caller = PeerCert("scheduler", True, "", ())
        ctx = LinkContext(caller, 7, "link:h:1", 10.0, send)
        service = WorkerService.__new__(WorkerService)
        service.access = AccessRules(clients=frozenset({"scheduler"}))
        service.revocation = None
        assert service.identify(ctx) is caller  # no certificate asked for
        assert ctx.peer() == "link:h:1" and 9.0 < (ctx.time_remaining() or 0) <= 10.0
        assert LinkContext(caller, 8, "p", None, send).time_remaining() is None
        await ctx.write(pb.StreamJobOutputRes(data=b"x"))
        with pytest.raises(LinkAbort) as e:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, "no job")
        assert (e.value.code, e.value.details) == (grpc.StatusCode.NOT_FOUND, "no job")
        await ctx.end(grpc.StatusCode.NOT_FOUND, "no job")
        assert ctx.done()
        with pytest.raises(LinkAbort):
            await ctx.write(pb.StreamJobOutputRes(data=b"y"))
        await ctx.end()  # once only

    asyncio.run(run())
    assert [(u.reply.callID, u.reply.last, u.reply.code) for u in sent] == [
        (7, False, 0),
        (7, True, 5),
    ]
    assert pb.StreamJobOutputRes.FromString(sent[0].reply.response).data == b"x"
