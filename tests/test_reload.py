"""SIGHUP reloads [auth] too; what cannot change is logged and kept; start-up errors first;
`agent reload` (the units' ExecReload=) fails when the agent rejected something."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.client import PermissionDenied

from helpers import AgentFactory, AgentProcess, default_config, wait_for


def _rewrite(a: AgentProcess, **sections: dict[str, object]) -> None:
    a.config_path.write_text(default_config(a.addr, a.certs, a.policy_path, a.state, **sections))


def _hup(a: AgentProcess, marker: str) -> None:
    before = a.log().count(marker)
    a.signal(signal.SIGHUP)
    wait_for(lambda: a.log().count(marker) > before)


def test_identity_removed_from_auth_is_refused_after_hup(
    make_agent: AgentFactory, script_dir: Path
) -> None:
    """Removing an identity from [auth] clients and HUP revokes it at its next call."""
    a = make_agent()
    c = a.client()
    c.list()
    _rewrite(a, auth={"clients": ["scheduler"], "admins": ["admin"]})
    _hup(a, "[auth] reloaded")
    with pytest.raises(PermissionDenied):
        c.list()  # the same connection, the next call
    assert a.client("scheduler").list() is not None
    events = [e for e in a.audit_lines() if e["event"] == "config_reload"]
    assert events and events[-1]["decision"] == "ok"


def test_identity_added_to_auth_is_allowed_after_hup(make_agent: AgentFactory) -> None:
    """An identity added to [auth] clients may call after HUP, without a restart."""
    a = make_agent(auth={"clients": ["scheduler"], "admins": ["admin"]})
    c = a.client("client")
    with pytest.raises(PermissionDenied):
        c.list()
    _rewrite(a, auth={"clients": ["client", "scheduler"], "admins": ["admin"]})
    _hup(a, "[auth] reloaded")
    c.list()


def test_unchangeable_keys_are_logged_and_kept(make_agent: AgentFactory) -> None:
    """A changed address or state directory is logged as needing a restart and not applied."""
    a = make_agent()
    cfg = a.config_path.read_text()
    other = a.addr.rsplit(":", 1)[0] + ":1"
    a.config_path.write_text(
        cfg.replace(f'"{a.addr}"', f'"{other}"').replace(
            f'"{a.state}"', f'"{a.state.parent / "elsewhere"}"'
        )
    )
    _hup(a, "policy reloaded")
    log = a.log()
    assert f"[grpc_server] addr changed to '{other}': takes effect only after a restart" in log
    assert "[jobs] state_dir changed to" in log
    a.client().list()  # still serving on the old address


def test_broken_config_on_hup_keeps_everything(make_agent: AgentFactory) -> None:
    """A config that no longer parses is rejected with one error line; the agent carries on."""
    a = make_agent()
    a.config_path.write_text("[auth\n")
    _hup(a, "configuration reload rejected")
    a.client().list()


def test_port_in_use_is_reported_first(make_agent: AgentFactory) -> None:
    """A port already in use is the first line logged (no gRPC line before it), before
    'shutting down' and 'stopped'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        a = make_agent(start=False, port=port)
        a.start(wait=False)
        assert a.proc is not None
        assert a.proc.wait(timeout=30) == 1
    log = a.log()
    assert "is another process using the port?" in log
    # The agent's line is the first: nothing of gRPC's own logging ("E1206 ... add_port.cc").
    assert (
        f"ERROR agent.daemon.server: cannot listen on 127.0.0.1:{port}: Address already in use"
        in (log.splitlines()[0])
    )
    assert "add_port" not in log
    first_error = log.index("ERROR")
    assert log.index("port?") > first_error
    assert "shutting down" not in log[:first_error]
    assert log.index("stopped") > first_error


def test_jobs_stopped_by_shutdown_say_so_in_the_audit_log(
    make_agent: AgentFactory, script_dir: Path
) -> None:
    """A job ended by the agent's shutdown is 'stopped by agent shutdown' in the audit log,
    and one stopped by StopJob is 'stopped by request'."""
    a = make_agent()
    c = a.client()
    by_op = c.start("bash", str(script_dir / "sleep.sh"), args=["30"])
    by_shutdown = c.start("bash", str(script_dir / "sleep.sh"), args=["30"])
    c.stop(by_op)
    c.wait(by_op, timeout=20)
    a.stop()
    ends = {e["job_id"]: e for e in a.audit_lines() if e["event"] == "job_end"}
    assert ends[by_shutdown]["reason"].startswith("stopped by agent shutdown")
    assert ends[by_op]["reason"].startswith("stopped by request")


# ---------------------------------------------------------------- agent reload (ExecReload=)


def _reload_cmd(a: AgentProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "reload", "--config", str(a.config_path), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(a.workdir),
    )


def test_reload_command_returns_once_a_good_policy_applies(agent: AgentProcess) -> None:
    """`agent reload` exits 0 only after the agent applied the new policy: no polling needed."""
    c = agent.client()
    original = agent.policy_path.read_text()
    agent.policy_path.write_text(original.replace('aliases: ["true"]', 'aliases: ["yes"]'))
    r = _reload_cmd(agent)
    assert r.returncode == 0, r.stderr
    assert f"the agent (pid {agent.pid}) reloaded" in r.stdout
    c.wait(c.start("yes", ""), timeout=10)  # at once: the command waited for the reload


def test_reload_command_fails_for_a_broken_policy(agent: AgentProcess) -> None:
    """A policy the agent rejects makes `agent reload` exit 1 naming it; the old one stays."""
    agent.policy_path.write_text("version: 1\nentries:\n  - name: [broken\n")
    r = _reload_cmd(agent, "--pid", str(agent.pid))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "agent reload: rejected: policy: " in r.stderr
    assert "carries on with the previous version" in r.stderr
    c = agent.client()
    c.wait(c.start("true", ""), timeout=10)  # the previous policy still applies
    assert "reload rejected (policy)" in agent.log()


def test_reload_command_fails_for_a_broken_config_and_keeps_the_policy(
    agent: AgentProcess,
) -> None:
    """A broken config fails `agent reload`; the agent logs the rejection, not 'policy reloaded'."""
    agent.config_path.write_text("[auth\n")
    r = _reload_cmd(agent, "--pid", str(agent.pid))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "agent reload: rejected: config: " in r.stderr
    wait_for(lambda: "reload rejected (config)" in agent.log())
    log = agent.log()
    assert "configuration reload rejected, keeping the current settings and policy" in log
    assert "policy reloaded" not in log
    # Without --pid the agent cannot be found through a config that does not parse.
    assert _reload_cmd(agent).returncode == 2
    agent.client().list()


def test_reload_command_fails_for_broken_certificates(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """A server certificate the agent refuses fails `agent reload` naming the certificates."""
    own = tmp_path / "own-certs"
    own.mkdir()
    a = make_agent(start=False)
    crt, key = own / "server.crt", own / "server.key"
    shutil.copy2(a.certs.crt("server"), crt)
    shutil.copy2(a.certs.key("server"), key)
    os.chmod(key, 0o600)
    _rewrite(a, grpc_server={"crt_file": str(crt), "key_file": str(key)})
    a.start()
    assert _reload_cmd(a).returncode == 0
    crt.write_bytes(a.certs.crt("client").read_bytes())  # does not match the key
    r = _reload_cmd(a)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "agent reload: rejected: certificates: " in r.stderr
    a.client().list()  # still serving the previous certificate
    shutil.copy2(a.certs.crt("server"), crt)
    assert _reload_cmd(a).returncode == 0  # fixed: the next reload succeeds


def test_reload_command_without_an_agent_fails(make_agent: AgentFactory) -> None:
    """`agent reload` with no agent running exits 1 and says so, at once."""
    a = make_agent()
    a.stop()
    r = _reload_cmd(a)
    assert r.returncode == 1
    assert "no agent is running" in r.stderr
