"""SIGHUP reloads [auth] too; what cannot change is logged and kept; start-up errors first."""

from __future__ import annotations

import signal
import socket
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
    """A port already in use is the first error logged, before 'shutting down' and 'stopped'."""
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
