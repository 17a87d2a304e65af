"""agentctl: in-process main(argv) and the real command end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.client.cli import main

from helpers import AgentProcess


def flags(agent: AgentProcess, identity: str = "client") -> list[str]:
    c = agent.certs
    return ["--addr", agent.addr, "--ca", str(c.ca), "--cert", str(c.crt(identity)),
            "--key", str(c.key(identity))]


def test_start_wait_prints_output_and_state(agent: AgentProcess, script_dir: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    """start --wait streams the output and exits 0 only on success."""
    assert main([*flags(agent), "start", "--wait", "bash", str(script_dir / "hello.sh"),
                 "-x", "--y"]) == 0
    out, err = capfd.readouterr()
    assert out == "hello -x --y\n"
    assert "SUCCEEDED" in err
    assert main([*flags(agent), "start", "--wait", "bash", str(script_dir / "fail.sh"),
                 "5"]) == 1
    out, err = capfd.readouterr()
    assert "FAILED (exit status 5)" in err


def test_status_stop_logs_list(agent: AgentProcess, script_dir: Path,
                               capfd: pytest.CaptureFixture[str]) -> None:
    """The other commands, with --json where offered."""
    assert main([*flags(agent), "start", "bash", str(script_dir / "sleep.sh"), "30"]) == 0
    job = capfd.readouterr().out.strip()
    assert main([*flags(agent), "status", "--json", job]) == 0
    st = json.loads(capfd.readouterr().out)
    assert st["state"] == "RUNNING" and st["job_id"] == job
    assert main([*flags(agent), "stop", job]) == 0
    assert main([*flags(agent), "wait", job, "--timeout", "10"]) == 1
    assert "STOPPED" in capfd.readouterr().out
    assert main([*flags(agent), "logs", job]) == 0
    assert capfd.readouterr().out == "started\n"
    assert main([*flags(agent), "list"]) == 0
    assert job in capfd.readouterr().out


def test_errors_are_plain_words_and_exit_codes(agent: AgentProcess, tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    """Refusals exit 1 with the agent's reason; usage errors exit 2."""
    assert main([*flags(agent), "start", "/bin/sh", "-c", "id"]) == 1
    assert "permission denied" in capfd.readouterr().err
    assert main([*flags(agent), "status", "00000000-0000-4000-8000-000000000000"]) == 1
    assert "not found" in capfd.readouterr().err
    assert main(["--config", str(tmp_path / "none.toml"), "list"]) == 2
    assert "no such file" in capfd.readouterr().err
    assert main([*flags(agent), "start", "--limit", "bogus", "true"]) == 2


def test_other_identity_cannot_see_job_admin_can(agent: AgentProcess, script_dir: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """Jobs belong to their starter; admins see all."""
    assert main([*flags(agent), "start", "bash", str(script_dir / "sleep.sh"), "30"]) == 0
    job = capfd.readouterr().out.strip()
    assert main([*flags(agent, "scheduler"), "status", job]) == 1
    assert "permission denied" in capfd.readouterr().err
    assert main([*flags(agent, "admin"), "stop", job]) == 0


def test_real_agentctl_command_with_config_file(agent: AgentProcess, script_dir: Path,
                                                tmp_path: Path) -> None:
    """The installed-style command reads agentctl.toml relative to itself."""
    c = agent.certs
    conf = tmp_path / "agentctl.toml"
    conf.write_text(f'[agentctl]\naddr = "{agent.addr}"\nca_file = "{c.ca}"\n'
                    f'crt_file = "{c.crt("client")}"\nkey_file = "{c.key("client")}"\n')
    r = subprocess.run([sys.executable, "-m", "agent.client.cli", "--config", str(conf),
                        "start", "--wait", "bash", str(script_dir / "count.sh"), "3", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "line 1\nline 2\nline 3\n"
