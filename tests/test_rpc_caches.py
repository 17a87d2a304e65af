"""The per-RPC and per-job caches: each one still stops the attack it must stop.

Identity and revocation caches are keyed by the client certificate's exact
PEM bytes; the history serves recently finished jobs from memory; the metrics
wrapper is built once per method. None of them may answer something the
uncached code would not.
"""

from __future__ import annotations

import asyncio
import resource
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509 as cx509

from agent import tls
from agent.crl import RevocationChecker
from agent.daemon.history import RECENT, JobRecord, Store
from agent.daemon.metrics import AgentMetrics, RpcMetricsInterceptor
from agent.daemon.service import QueryReplies, record_to_pb
from agent.keeper import admission
from agent.keeper import policy as policy_mod
from agent.keeper.errors import InvalidArgument
from agent.vocabulary import JobState

import certfactory as cf
from helpers import Certs

# The bound of both certificate caches (agent/tls.py, agent/crl.py).
PEER_CACHE_BOUND = 4097


def _issuer(certs: Certs) -> cf.Issuer:
    return cf.load_issuer(certs.ca, certs.dir / "ca.key")


def _leaf(issuer: cf.Issuer, cn: str, **kw: Any) -> cx509.Certificate:
    cert, _ = cf.make_leaf(issuer, cn, **kw)
    return cert


# ---------------------------------------------------------------- revocation


def test_certificate_revoked_after_it_was_cached_is_refused(certs: Certs, tmp_path: Path) -> None:
    """A certificate accepted (and cached) before its revocation is refused once the CRL reloads."""
    issuer = _issuer(certs)
    cert = _leaf(issuer, "client")
    crl = tmp_path / "ca.crl"
    crl.write_bytes(cf.make_crl(issuer, []))
    chk = RevocationChecker((crl,), certs.ca)
    pem = cf.pem(cert)
    assert chk.revoked(pem) == ""
    assert chk.revoked(pem) == ""  # served from the cache now
    time.sleep(0.01)  # a new mtime for the reloaded file
    crl.write_bytes(cf.make_crl(issuer, [cert.serial_number]))
    assert chk.check()
    assert "revoked" in chk.revoked(pem)
    # And the same bytes again (a cache hit) stay refused.
    assert "revoked" in chk.revoked(bytes(pem))


def test_same_cn_different_serials_are_distinct_revocation_entries(
    certs: Certs, tmp_path: Path
) -> None:
    """Two certificates with the same CN: revoking one's serial leaves the other accepted."""
    issuer = _issuer(certs)
    good, bad = _leaf(issuer, "client"), _leaf(issuer, "client")
    assert good.serial_number != bad.serial_number
    crl = tmp_path / "ca.crl"
    crl.write_bytes(cf.make_crl(issuer, [bad.serial_number]))
    chk = RevocationChecker((crl,), certs.ca)
    for _ in range(2):  # the second round is answered from the cache
        assert chk.revoked(cf.pem(good)) == ""
        assert "revoked" in chk.revoked(cf.pem(bad))


def test_revocation_cache_is_bounded_against_a_flood(certs: Certs, tmp_path: Path) -> None:
    """Thousands of distinct certificates never grow the revocation cache past its bound."""
    issuer = _issuer(certs)
    crl = tmp_path / "ca.crl"
    target = _leaf(issuer, "victim")
    crl.write_bytes(cf.make_crl(issuer, [target.serial_number]))
    chk = RevocationChecker((crl,), certs.ca)
    base = cf.pem(_leaf(issuer, "flood"))
    for i in range(PEER_CACHE_BOUND + 200):
        # Distinct bytes, the same certificate: each is its own cache key.
        chk.revoked(base + b"\n" * (i + 1))
        assert len(chk._peers) <= PEER_CACHE_BOUND
    assert "revoked" in chk.revoked(cf.pem(target))


# ---------------------------------------------------------------- identity


def test_same_cn_different_keys_are_distinct_identity_entries(certs: Certs) -> None:
    """A cached good certificate for CN=client does not vouch for another CN=client certificate."""
    issuer = _issuer(certs)
    good = cf.pem(_leaf(issuer, "client"))
    no_eku = cf.pem(_leaf(issuer, "client", no_eku=True))
    assert tls.identity_from_cert(good).problem == ""
    assert tls.identity_from_cert(good).identity == "client"
    peer = tls.identity_from_cert(no_eku)
    assert peer.identity == "client" and "clientAuth" in peer.problem


def test_identity_cache_is_bounded_against_a_flood(certs: Certs) -> None:
    """Thousands of distinct client certificates never grow the identity cache past its bound."""
    base = cf.pem(_leaf(_issuer(certs), "flood"))
    for i in range(PEER_CACHE_BOUND + 200):
        assert tls.identity_from_cert(base + b"\n" * (i + 1)).identity == "flood"
        assert len(tls._peer_cache) <= PEER_CACHE_BOUND


# ---------------------------------------------------------------- history


def _rec(state: JobState = JobState.RUNNING) -> JobRecord:
    now = time.time()
    return JobRecord(
        id=str(uuid.uuid4()),
        owner="alice",
        command="/bin/true",
        path="",
        args=["a", "<secret>"],
        state=state,
        start_time=now,
        output_path="/nonexistent/x.out",
        end_time=None if state is JobState.RUNNING else now,
        exit_code=None if state is JobState.RUNNING else 0,
        limits={"cpu_seconds": 3},
        pid=1234,
    )


def _finish(rec: JobRecord) -> None:
    rec.state = JobState.SUCCEEDED
    rec.end_time = time.time()
    rec.exit_code = 0
    rec.user_cpu = 0.001
    rec.output_bytes = 7


def test_recent_records_equal_what_the_database_holds(tmp_path: Path) -> None:
    """A finished job answered from memory equals the same job read back from the file."""
    store = Store(tmp_path / "h.db")
    rec = _rec()
    store.insert(rec)
    store.commit()
    _finish(rec)
    store.update(rec)
    store.commit()
    other = Store(tmp_path / "h.db")  # another connection: no cache, the file itself
    assert store.get(rec.id) == other.get(rec.id) == rec
    other.close()
    store.close()


def test_retention_delete_is_not_undone_by_the_cache(tmp_path: Path) -> None:
    """A finished job removed by retention is gone for QueryJob, even right after it was read."""
    store = Store(tmp_path / "h.db")
    rec = _rec()
    store.insert(rec)
    _finish(rec)
    store.update(rec)
    store.commit()
    assert store.get(rec.id) is not None
    store.delete([rec.id])
    assert store.get(rec.id) is None
    store.close()


def test_rolled_back_write_is_not_served_from_memory(tmp_path: Path) -> None:
    """An update lost to a rollback (failed commit) is not answered from the cache."""
    store = Store(tmp_path / "h.db")
    rec = _rec()
    store.insert(rec)
    store.commit()
    _finish(rec)
    store.update(rec)
    store.rollback()
    got = store.get(rec.id)
    assert got is not None and got.state is JobState.RUNNING
    failed = _rec(JobState.FAILED)
    store.insert(failed)
    store.rollback()
    assert store.get(failed.id) is None
    store.close()


def test_recent_cache_is_bounded_and_keeps_only_finished_jobs(tmp_path: Path) -> None:
    """Many finished jobs keep at most RECENT in memory; a running job never enters it."""
    store = Store(tmp_path / "h.db")
    running = _rec()
    store.insert(running)
    ids = []
    for _ in range(RECENT + 50):
        r = _rec(JobState.SUCCEEDED)
        store.insert(r)
        ids.append(r.id)
    store.commit()
    assert len(store._recent) <= RECENT
    assert running.id not in store._recent
    assert all(store.get(i) is not None for i in ids)  # older ones come from the file
    assert len(store._recent) <= RECENT
    store.close()


# ---------------------------------------------------------------- metrics wrapper


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _Ctx:
    def code(self) -> None:
        return None


def test_cached_metrics_wrapper_still_gates_every_call() -> None:
    """The wrapper built once per method runs the access gate on every call, not only the first."""
    import grpc

    calls: list[str] = []
    allowed = {"ok": True}

    async def gate(method: str, context: Any) -> None:
        calls.append(method)
        if not allowed["ok"]:
            raise PermissionError("denied")

    async def inner(request: Any, context: Any) -> str:
        return "answer"

    handler = grpc.unary_unary_rpc_method_handler(inner)
    other = grpc.unary_unary_rpc_method_handler(inner)
    ic = RpcMetricsInterceptor(AgentMetrics(), gate=gate)
    method = "/grpc.health.v1.Health/Check"

    async def run() -> None:
        async def found(d: Any) -> Any:
            return handler

        async def found_other(d: Any) -> Any:
            return other

        w1 = await ic.intercept_service(found, _Details(method))
        w2 = await ic.intercept_service(found, _Details(method))
        assert w1 is w2  # built once
        assert await w1.unary_unary(b"", _Ctx()) == "answer"
        allowed["ok"] = False
        with pytest.raises(PermissionError):
            await w2.unary_unary(b"", _Ctx())
        # Another handler object for the same method gets its own wrapper.
        w3 = await ic.intercept_service(found_other, _Details(method))
        assert w3 is not w1 and w3.unary_unary is not w1.unary_unary

    asyncio.run(run())
    assert calls == [method, method]


# ---------------------------------------------------------------- admission


def test_kernel_limits_still_checked_when_a_limit_is_set() -> None:
    """Skipping getrlimit for limit-less jobs does not skip the check when a limit is asked for."""
    rules = admission.Rules(
        max_running=10, default_timeout=0, max_timeout=0, default_limits={}, max_limits={}
    )
    pol = policy_mod.Policy(entries=())
    req = admission.StartRequest(
        identity="alice", command="/bin/true", path="", limits={"cpu_seconds": (1 << 64) - 2}
    )
    with pytest.raises(InvalidArgument) as e:
        admission.admit(req, rules, pol, busy=0, accepting=True)
    assert e.value.rule == "limit-above-kernel"


def test_only_the_limits_asked_for_are_read_and_each_is_checked() -> None:
    """The hard limits are read for the limits set only, and every one of them is still
    held against its own: one above the agent's hard open-files limit is refused by name,
    beside the agent's own output cap, which has no rlimit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-files limit to go above")
    assert set(admission.kernel_hard_limits(["open_files", "output_bytes"])) == {"open_files"}
    assert admission.kernel_hard_limits(["open_files"])["open_files"] == hard
    rules = admission.Rules(
        max_running=10, default_timeout=0, max_timeout=0, default_limits={}, max_limits={}
    )
    req = admission.StartRequest(
        identity="alice",
        command="/bin/true",
        path="",
        limits={"open_files": hard + 1, "output_bytes": 1 << 30},
    )
    with pytest.raises(InvalidArgument) as e:
        admission.admit(req, rules, policy_mod.Policy(entries=()), busy=0, accepting=True)
    assert e.value.rule == "limit-above-kernel"
    assert f"open_files = {hard + 1} is above the agent's own hard limit" in e.value.message


# ------------------------------------------------------------ QueryJob answers


def test_cached_reply_equals_a_fresh_build_and_follows_every_change() -> None:
    """A cached QueryJob answer equals record_to_pb, running or finished, and any change
    to the record (pid, output, state, end time, exit, CPU, error) gives a fresh one."""
    replies = QueryReplies()
    rec = _rec()
    running = replies.reply(rec)
    assert running == record_to_pb(rec) and not running.done
    assert replies.reply(rec) is running  # the next poll of an unchanged job
    rec.pid = 4321
    assert replies.reply(rec).pid == 4321
    rec.output_bytes = 3
    assert replies.reply(rec).outputBytes == 3
    _finish(rec)
    first = replies.reply(rec)
    assert first == record_to_pb(rec) and first.done
    assert replies.reply(rec) is first  # reused while nothing changed
    changes: list[tuple[str, object]] = [
        ("exit_code", 3),
        ("error_text", "exited with code 3"),
        ("output_bytes", 99),
        ("system_cpu", 0.5),
        ("state", JobState.FAILED),
    ]
    for name, value in changes:
        setattr(rec, name, value)
        again = replies.reply(rec)
        assert again == record_to_pb(rec) and again is not first
        first = again
    # Another object for the same job (read back from the file) is built afresh too.
    copy = JobRecord(**{f: getattr(rec, f) for f in rec.__dataclass_fields__})
    copy.output_bytes = 5
    assert replies.reply(copy).outputBytes == 5


def test_query_replies_are_bounded() -> None:
    """The answer cache keeps at most its size of jobs, oldest out first."""
    replies = QueryReplies(size=8)
    recs = []
    for _ in range(20):
        rec = _rec()
        _finish(rec)
        recs.append(rec)
        replies.reply(rec)
    assert len(replies._replies) == 8
    assert set(replies._replies) == {r.id for r in recs[-8:]}


def test_label_children_are_the_metrics_own_and_bounded() -> None:
    """LabelChildren hands out exactly metric.labels(...) and keeps at most its bound."""
    from prometheus_client import CollectorRegistry, Counter

    from agent.daemon.metrics import LabelChildren

    c = Counter("t_total", "test", ["state", "entry"], registry=CollectorRegistry())
    kids = LabelChildren(c, bound=4)
    assert kids.get("SUCCEEDED", "true") is c.labels(state="SUCCEEDED", entry="true")
    kids.get("SUCCEEDED", "true").inc()
    assert c.labels(state="SUCCEEDED", entry="true")._value.get() == 1
    for i in range(10):
        assert kids.get("FAILED", f"e{i}") is c.labels(state="FAILED", entry=f"e{i}")
    assert len(kids._children) <= 4


def test_streaming_request_calls_are_counted_behind_the_separate_gate() -> None:
    """With the access gate its own interceptor, a bidirectional call (reflection) is still
    counted by the metrics, as when the metrics ran the gate themselves."""
    import grpc

    async def items(request: Any, context: Any) -> Any:
        yield "item"

    metrics = AgentMetrics()
    ic = RpcMetricsInterceptor(metrics)
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

    async def run() -> list[Any]:
        async def found(d: Any) -> Any:
            return grpc.stream_stream_rpc_method_handler(items)

        wrapped = await ic.intercept_service(found, _Details(method))
        return [x async for x in wrapped.stream_stream(iter(()), _Ctx())]

    assert asyncio.run(run()) == ["item"]
    assert (
        metrics.registry.get_sample_value("agent_rpcs_total", {"method": method, "code": "OK"})
        == 1.0
    )
