"""Identities, deny-by-default authorization, job ownership and the audit log."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import grpc
import pytest

from agent.client import AgentClient, PermissionDenied, TLSFiles

import certfactory as cf
from helpers import AgentProcess, pb, wait_for


def _identity_client(
    agent: AgentProcess, tmp_path: Path, cn: str | None, san: list[str] | None = None
) -> AgentClient:
    ca = cf.load_issuer(agent.certs.ca, agent.certs.key("ca"))
    cert, key = cf.make_leaf(ca, cn, san=san)
    crt, keyp = cf.write_pair(tmp_path, cn or "nocn", cert, key)
    return AgentClient(agent.addr, TLSFiles(agent.certs.ca, crt, keyp))


def test_unlisted_identity_is_denied_everything(agent: AgentProcess, tmp_path: Path) -> None:
    """A valid certificate whose identity is not configured: PERMISSION_DENIED on every RPC."""
    c = _identity_client(agent, tmp_path, "stranger")
    job_id = "00000000-0000-4000-8000-000000000000"
    for call in (
        lambda: c.start("true", ""),
        lambda: c.query(job_id),
        lambda: c.stop(job_id),
        lambda: c.list(),
        lambda: list(c.stream(job_id)),
        lambda: c.wait(job_id),
    ):
        with pytest.raises(PermissionDenied, match="stranger"):
            call()
    c.close()
    denials = [a for a in agent.audit_lines() if a.get("rule") == "identity-not-allowed"]
    assert len(denials) == 6 and all(a["identity"] == "stranger" for a in denials)
    assert not agent.output_files()


def test_identity_from_san_when_no_common_name(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Without a CN the first subjectAltName is the identity."""
    a = make_agent(auth={"clients": ["worker-7.example"], "admins": ["admin"]})
    c = _identity_client(a, tmp_path, None, san=["worker-7.example"])
    job = c.start("true", "")
    assert c.wait(job, timeout=10).owner == "worker-7.example"
    c.close()


def test_owners_see_only_their_jobs_admin_sees_all(agent: AgentProcess, script_dir: Path) -> None:
    """Two identities cannot see or stop each other's jobs; the admin can."""
    alice, bob, admin = agent.client("client"), agent.client("scheduler"), agent.client("admin")
    ja = alice.start("bash", str(script_dir / "sleep.sh"), args=["30"])
    jb = bob.start("bash", str(script_dir / "sleep.sh"), args=["30"])
    assert alice.query(ja).owner == "client" and bob.query(jb).owner == "scheduler"
    for who, other in ((alice, jb), (bob, ja)):
        with pytest.raises(PermissionDenied, match="another identity"):
            who.query(other)
        with pytest.raises(PermissionDenied, match="another identity"):
            who.stop(other)
        with pytest.raises(PermissionDenied, match="another identity"):
            who.wait(other, timeout=0.1)
        with pytest.raises(PermissionDenied, match="another identity"):
            list(who.stream(other))
    assert [j.job_id for j in alice.list()[0]] == [ja]
    assert [j.job_id for j in bob.list()[0]] == [jb]
    with pytest.raises(PermissionDenied):
        alice.list(owner="scheduler")
    assert alice.query(ja).state == bob.query(jb).state == "RUNNING"
    assert {j.job_id for j in admin.list()[0]} == {ja, jb}
    assert [j.job_id for j in admin.list(owner="scheduler")[0]] == [jb]
    admin.stop(ja)
    admin.stop(jb)
    assert alice.wait(ja, timeout=10).state == "STOPPED"
    assert bob.wait(jb, timeout=10).state == "STOPPED"
    stops = [a for a in agent.audit_lines() if a["event"] == "job_stop"]
    assert {(s["identity"], s["job_id"]) for s in stops} == {("admin", ja), ("admin", jb)}


def test_audit_log_lines_have_the_fields_and_no_secrets(
    agent: AgentProcess, script_dir: Path
) -> None:
    """JSON per decision/action; secret args and env values never written anywhere."""
    c = agent.client()
    job = c.start(
        "bash", str(script_dir / "hello.sh"), args=["visible", "hunter2-secret"], secret_args=[1]
    )
    st = c.wait(job, timeout=10)
    assert st.args == ("visible", "<secret>")
    with pytest.raises(PermissionDenied):
        c.start("bash", str(script_dir / "hello.sh"), env={"TOKEN": "envsecret-value"})
    with pytest.raises(PermissionDenied):
        c.start("/bin/sh", "-c", args=["id"])
    lines = (agent.state / "audit.log").read_text().splitlines()
    entries = [json.loads(x) for x in lines]
    start = next(e for e in entries if e["event"] == "job_start")
    for k in ("time", "identity", "peer", "rpc", "job_id", "command", "path", "decision"):
        assert start[k], k
    assert start["identity"] == "client" and start["peer"].startswith("ipv4:127.0.0.1:")
    assert start["args"] == ["visible", "<secret>"]
    end = next(e for e in entries if e["event"] == "job_end")
    assert end["job_id"] == job and end["state"] == "SUCCEEDED"
    deny = [e for e in entries if e["decision"] == "deny"]
    assert {d["rule"] for d in deny} >= {"env-not-allowed", "command-not-allowed"}
    env_deny = next(d for d in deny if d["rule"] == "env-not-allowed")
    assert env_deny["env"] == ["TOKEN"] and env_deny["reason"]
    raw = (agent.state / "audit.log").read_bytes()
    assert b"hunter2-secret" not in raw and b"envsecret-value" not in raw
    # nor in the history database (WAL included) or the agent's log
    for f in agent.state.glob("jobs.sqlite3*"):
        assert b"hunter2-secret" not in f.read_bytes()
    assert "hunter2-secret" not in agent.log()
    # but the job itself did get the real value
    assert b"".join(c.stream(job)) == b"hello visible hunter2-secret\n"


def test_audit_log_is_private_and_append_only_across_restarts(agent: AgentProcess) -> None:
    """Mode 0600, and a restart appends rather than truncating."""
    p = agent.state / "audit.log"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    c = agent.client()
    job = c.start("true", "")
    c.wait(job, timeout=10)
    before = p.read_bytes()
    agent.stop()
    agent.start()
    wait_for(lambda: len(p.read_bytes()) > len(before))
    assert p.read_bytes().startswith(before)
    events = [json.loads(x)["event"] for x in p.read_text().splitlines()]
    assert events.count("agent_start") == 2 and "agent_stop" in events


def test_audit_location_is_configurable(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """[audit] file puts the log where the operator wants it."""
    target = tmp_path / "audit-elsewhere"
    target.mkdir(mode=0o700)
    a = make_agent(audit={"file": str(target / "agent-audit.jsonl")})
    c = a.client()
    c.wait(c.start("true", ""), timeout=10)
    assert (target / "agent-audit.jsonl").exists()
    assert not (a.state / "audit.log").exists()


def test_undecodable_request_is_invalid_argument_and_audited(agent: AgentProcess) -> None:
    """Invalid UTF-8 in a string field: INVALID_ARGUMENT (not INTERNAL), logged as a denial."""
    with grpc.secure_channel(agent.addr, agent.certs.creds("client")) as ch:
        call = ch.unary_unary(
            "/jobscheduler.Worker/StartJob",
            request_serializer=lambda b: b,
            response_deserializer=pb.StartJobRes.FromString,
        )
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x0a\x03\xff\xfe\xfd", timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any(a.get("rule") == "undecodable" for a in agent.audit_lines())
    assert os.path.exists(agent.state)


def test_audit_line_of_a_huge_refused_request_stays_small(agent: AgentProcess) -> None:
    """A refused request with thousands of env names writes a bounded audit line."""
    c = agent.client()
    env = {f"VAR_{i}": "x" for i in range(60)}
    env.update({f"NAME_{i}_{'y' * 200}": "z" for i in range(3)})
    with pytest.raises(PermissionDenied):
        c.start("true", "", env=env)
    line = [e for e in agent.audit_lines() if e.get("rule") == "env-not-allowed"][-1]
    assert line["env_count"] == 63 and len(line["env"]) <= 64
    assert all(len(n) <= 128 for n in line["env"])
    assert len(json.dumps(line)) < 16_000
