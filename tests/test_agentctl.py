"""agentctl: in-process main(argv) and the real command end to end."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

import agent as agent_pkg
from agent._proto import jobscheduler_pb2 as pb
from agent.client import JobStatus, cli
from agent.client.cli import main
from agent.client.text import job_table

from helpers import AgentProcess, Certs, wait_for


def flags(agent: AgentProcess, identity: str = "client") -> list[str]:
    c = agent.certs
    return [
        "--addr",
        agent.addr,
        "--ca",
        str(c.ca),
        "--cert",
        str(c.crt(identity)),
        "--key",
        str(c.key(identity)),
    ]


def test_start_wait_prints_output_and_state(
    agent: AgentProcess, script_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """start --wait streams the output and exits 0 only on success."""
    assert (
        main([*flags(agent), "start", "--wait", "bash", str(script_dir / "hello.sh"), "-x", "--y"])
        == 0
    )
    out, err = capfd.readouterr()
    assert out == "hello -x --y\n"
    assert "SUCCEEDED" in err
    assert main([*flags(agent), "start", "--wait", "bash", str(script_dir / "fail.sh"), "5"]) == 1
    out, err = capfd.readouterr()
    assert "FAILED (exit status 5)" in err


def test_status_stop_logs_list(
    agent: AgentProcess, script_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The other commands, with --json where offered."""
    assert main([*flags(agent), "start", "bash", str(script_dir / "sleep.sh"), "30"]) == 0
    job = capfd.readouterr().out.strip()
    assert main([*flags(agent), "status", "--json", job]) == 0
    st = json.loads(capfd.readouterr().out)
    assert st["state"] == "RUNNING" and st["job_id"] == job
    # Stop only once the script has written its line (a start is now fast enough for
    # the stop to arrive before bash has run its first command).
    c = agent.client()
    wait_for(lambda: b"".join(c.stream(job, follow=False)) == b"started\n")
    assert main([*flags(agent), "stop", job]) == 0
    assert main([*flags(agent), "wait", job, "--timeout", "10"]) == 1
    assert "STOPPED" in capfd.readouterr().out
    assert main([*flags(agent), "logs", job]) == 0
    assert capfd.readouterr().out == "started\n"
    assert main([*flags(agent), "list"]) == 0
    assert job in capfd.readouterr().out


def test_errors_are_plain_words_and_exit_codes(
    agent: AgentProcess, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Refusals exit 1 with the agent's reason; usage errors exit 2."""
    assert main([*flags(agent), "start", "/bin/sh", "-c", "id"]) == 1
    assert "permission denied" in capfd.readouterr().err
    assert main([*flags(agent), "status", "00000000-0000-4000-8000-000000000000"]) == 1
    assert "not found" in capfd.readouterr().err
    assert main(["--config", str(tmp_path / "none.toml"), "list"]) == 2
    assert "no such file" in capfd.readouterr().err
    assert main([*flags(agent), "start", "--limit", "bogus", "true"]) == 2


def test_other_identity_cannot_see_job_admin_can(
    agent: AgentProcess, script_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Jobs belong to their starter; admins see all."""
    assert main([*flags(agent), "start", "bash", str(script_dir / "sleep.sh"), "30"]) == 0
    job = capfd.readouterr().out.strip()
    assert main([*flags(agent, "scheduler"), "status", job]) == 1
    assert "permission denied" in capfd.readouterr().err
    assert main([*flags(agent, "admin"), "stop", job]) == 0


def test_real_agentctl_command_with_config_file(
    agent: AgentProcess, script_dir: Path, tmp_path: Path
) -> None:
    """The installed-style command reads agentctl.toml relative to itself."""
    c = agent.certs
    conf = tmp_path / "agentctl.toml"
    conf.write_text(
        f'[agentctl]\naddr = "{agent.addr}"\nca_file = "{c.ca}"\n'
        f'crt_file = "{c.crt("client")}"\nkey_file = "{c.key("client")}"\n'
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.client.cli",
            "--config",
            str(conf),
            "start",
            "--wait",
            "bash",
            str(script_dir / "count.sh"),
            "3",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "line 1\nline 2\nline 3\n"


# ---------------------------------------------------------------- small CLI promises


def test_version_prints_program_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    """agentctl --version prints 'agentctl <agent.__version__>' and exits 0."""
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"agentctl {agent_pkg.__version__}"


def test_start_without_path_runs_the_executable(
    agent: AgentProcess, capfd: pytest.CaptureFixture[str]
) -> None:
    """`agentctl start true` is accepted: PATH is optional, as the usage says."""
    assert main([*flags(agent), "start", "--wait", "true"]) == 0
    assert "SUCCEEDED" in capfd.readouterr().err


def test_start_usage_names_path_optional(capsys: pytest.CaptureFixture[str]) -> None:
    """start's usage shows PATH as optional and a missing COMMAND is the only complaint."""
    with pytest.raises(SystemExit) as e:
        main(["start"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "COMMAND [PATH [ARGS...]]" in err
    assert err.strip().endswith("the following arguments are required: COMMAND")


def _garbage_server() -> tuple[socket.socket, threading.Event]:
    """A TCP port that answers every connection with bytes that are not TLS."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"this is not TLS\r\n" * 8)

    threading.Thread(target=serve, daemon=True).start()
    return srv, done


@pytest.mark.parametrize("user_setting", [None, "INFO"])
def test_grpc_core_logs_stay_out_of_agentctl_output(certs: Certs, user_setting: str | None) -> None:
    """gRPC's C-core log lines never reach agentctl's output, unless the user asks."""
    srv, done = _garbage_server()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    if user_setting:
        env["GRPC_VERBOSITY"] = user_setting
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.client.cli",
                "--call-timeout",
                "2",
                "--addr",
                f"127.0.0.1:{srv.getsockname()[1]}",
                "--ca",
                str(certs.ca),
                "--cert",
                str(certs.crt("client")),
                "--key",
                str(certs.key("client")),
                "list",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        done.set()
        srv.close()
    assert r.returncode == 1
    core = [line for line in (r.stdout + r.stderr).splitlines() if re.match(r"^[IWEF]\d{4} ", line)]
    if user_setting is None:
        assert r.stderr.startswith("agentctl: ") and core == [], r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr
    else:
        assert core, "with GRPC_VERBOSITY set by the user, grpc's own logs are kept"


def test_list_has_a_header_and_shows_arguments(
    agent: AgentProcess, script_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """agentctl list prints a header row, then each job with its arguments."""
    assert (
        main([*flags(agent), "start", "--wait", "bash", str(script_dir / "hello.sh"), "a b"]) == 0
    )
    capfd.readouterr()
    assert main([*flags(agent), "list"]) == 0
    out = capfd.readouterr().out.splitlines()
    assert out[0].split() == ["JOB", "ID", "STATE", "STARTED", "OWNER", "COMMAND"]
    assert out[1].endswith(f"{script_dir / 'hello.sh'} 'a b'")


def test_wait_timeout_has_its_own_message_and_status(
    agent: AgentProcess, script_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """wait --timeout running out says so and exits 3; the job keeps running."""
    assert main([*flags(agent), "start", "bash", str(script_dir / "sleep.sh"), "30"]) == 0
    job = capfd.readouterr().out.strip()
    assert main([*flags(agent), "wait", job, "--timeout", "0.5"]) == 3
    err = capfd.readouterr().err
    assert f"timed out after 0.5 s: job {job} is still RUNNING" in err
    assert agent.client().query(job).state == "RUNNING"
    agent.client().stop(job)


def test_bash_completion(capsys: pytest.CaptureFixture[str]) -> None:
    """agentctl completion bash prints a completion function covering every command."""
    assert main(["completion", "bash"]) == 0
    out = capsys.readouterr().out
    assert "complete -o default -F _agentctl agentctl" in out
    for word in ("start", "list", "wait", "logs", "--follow", "--secret-arg", "SUCCEEDED"):
        assert word in out
    r = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_config_search_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """--config, $AGENTCTL_CONFIG, ./agentctl.toml, then ~/.config/agentctl/config.toml."""
    home = tmp_path / "home"
    (home / ".config" / "agentctl").mkdir(parents=True)
    user_cfg = home / ".config" / "agentctl" / "config.toml"
    user_cfg.write_text('[agentctl]\naddr = "127.0.0.1:1"\nbogus = 1\n')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("AGENTCTL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.config_candidates()[1] == user_cfg
    assert cli.config_candidates()[2] == Path("/etc/worker-agent/agentctl.toml")
    # the user file is found (and its unknown key reported)
    assert main(["list"]) == 2
    assert f"{user_cfg}: [agentctl] unknown key(s): bogus" in capfd.readouterr().err
    # ./agentctl.toml comes first
    (tmp_path / "agentctl.toml").write_text("[agentctl]\nnope = 1\n")
    assert main(["list"]) == 2
    assert "agentctl.toml: [agentctl] unknown key(s): nope" in capfd.readouterr().err
    # $AGENTCTL_CONFIG before that, --config before everything
    env_cfg = tmp_path / "env.toml"
    env_cfg.write_text("[agentctl]\nenvkey = 1\n")
    monkeypatch.setenv("AGENTCTL_CONFIG", str(env_cfg))
    assert main(["list"]) == 2
    assert "envkey" in capfd.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml"), "list"]) == 2
    assert "missing.toml: no such file" in capfd.readouterr().err


def test_start_usage_says_path_is_optional(capsys: pytest.CaptureFixture[str]) -> None:
    """A bare start names only COMMAND as required; PATH [ARGS...] is shown as optional."""
    with pytest.raises(SystemExit):
        main(["start"])
    err = capsys.readouterr().err
    assert "required: COMMAND" in err
    assert "PATH" not in err.split("error:")[1]


def _job(owner: str, *args: str) -> JobStatus:
    return JobStatus.from_pb(
        pb.QueryJobRes(
            jobID=str(uuid.uuid4()),
            state=pb.RUNNING,
            owner=owner,
            command="bash",
            path="/opt/jobs/run.sh",
            args=list(args),
        )
    )


def test_list_columns_stay_aligned_whatever_the_owner() -> None:
    """agentctl list: every column starts at the same place on every line, long owners too."""
    long_owner = "spiffe://fleet.example.org/ns/production/sa/nightly-backup-runner"
    rows = [_job("client", "a b"), _job(long_owner), _job("bad\nname\t", "x")]
    lines = job_table(rows).splitlines()
    assert len(lines) == 1 + len(rows)  # a control character does not break a line
    header = lines[0]
    for title in ("STATE", "STARTED", "OWNER", "COMMAND"):
        assert {line[header.index(title) - 2 : header.index(title)] for line in lines} == {"  "}
    command_at = header.index("COMMAND")
    assert [line[command_at:] for line in lines[1:]] == [
        "bash /opt/jobs/run.sh 'a b'",
        "bash /opt/jobs/run.sh",
        "bash /opt/jobs/run.sh x",
    ]
    assert long_owner in lines[2] and "bad\\nname\\t" in lines[3]


def test_console_collects_garbage_during_the_call_and_exits_with_its_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The agentctl command: the collector is back on for the call; exit status is main's."""
    seen: list[bool] = []

    def fake_run(args: Any) -> int:
        print("table")
        seen.append(gc.isenabled())
        return 7

    class Exited(Exception):
        pass

    def fake_exit(status: int) -> None:
        raise Exited(status)

    monkeypatch.setattr(sys, "argv", ["agentctl", "--addr", "127.0.0.1:1", "list"])
    monkeypatch.setattr(cli, "run", fake_run)
    monkeypatch.setattr(os, "_exit", fake_exit)
    try:
        with pytest.raises(Exited) as e:
            cli.console()
    finally:
        gc.unfreeze()
        gc.enable()
    assert e.value.args == (7,)
    assert seen == [True]
    assert capsys.readouterr().out == "table\n"


def test_real_agentctl_script_prints_everything_before_it_exits(
    agent: AgentProcess, capfd: pytest.CaptureFixture[str]
) -> None:
    """The installed agentctl's output through a pipe is complete, its status main's."""
    script = Path(sys.executable).with_name("agentctl")
    job = agent.client().start("true", "")
    agent.client().wait(job, timeout=10)
    r = subprocess.run(
        [str(script), *flags(agent), "list", "--json"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert job in [j["job_id"] for j in json.loads(r.stdout)]
    r = subprocess.run(
        [str(script), *flags(agent), "status", "00000000-0000-4000-8000-000000000000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and r.stderr.startswith("agentctl: not found"), r.stderr


def test_help_is_as_wide_as_the_terminal_says(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--help wraps where argparse's own default would (found without importing shutil)."""
    import shutil

    for columns in ("50", "120", "0", "junk", None):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", columns)
        assert cli._columns() == shutil.get_terminal_size().columns, columns
    monkeypatch.setenv("COLUMNS", "50")
    with pytest.raises(SystemExit):
        main(["list", "--help"])
    out = capsys.readouterr().out
    assert "  -h, --help            show this help message\n" in out
