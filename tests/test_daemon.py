"""Daemon mode, sd_notify over a real datagram socket, signals and reloads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from agent.client import Unavailable

from helpers import AgentFactory, AgentProcess, job_processes, pb, wait_for


def _agent_cmd(a: AgentProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(a.config_path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


def _status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(name)


# ---------------------------------------------------------------- daemon mode


def test_daemon_mode_pidfile_second_instance_and_stale_pidfile(make_agent: AgentFactory) -> None:
    """--daemon detaches properly; a second start is refused; a stale pid file is replaced."""
    a = make_agent(start=False)
    pid_file = a.state / "agent.pid"
    r = _agent_cmd(a, "--daemon")
    assert r.returncode == 0, r.stderr
    assert "running in the background" in r.stdout
    pid = int(pid_file.read_text())
    try:
        assert _alive(pid)
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert _status_field(pid, "Umask") == "0027"
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        assert os.getsid(pid) != pid  # double fork: not a session leader, no terminal
        c = a.client()
        job = c.start("true", "")
        assert c.wait(job, timeout=10).state == "SUCCEEDED"
        log = (a.state / "agent.log").read_text()
        assert "listening on" in log
        # a second instance is refused, on the terminal
        r2 = _agent_cmd(a, "--daemon")
        assert r2.returncode == 1
        assert f"another agent is already running (pid {pid}" in r2.stderr
        # kill -9: the pid file stays, naming a dead process
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), timeout=10)
        assert int(pid_file.read_text()) == pid
        r3 = _agent_cmd(a, "--daemon")
        assert r3.returncode == 0, r3.stderr
        assert f"replacing stale pid file {pid_file} of dead process {pid}" in r3.stderr
        pid = int(pid_file.read_text())
        assert _alive(pid)
        c2 = a.client()
        assert c2.query(job).state == "SUCCEEDED"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not _alive(pid), timeout=20)
    assert not pid_file.exists()  # removed on a clean exit


def test_daemon_start_failure_is_reported_on_the_terminal(make_agent: AgentFactory) -> None:
    """A start-up error inside the daemon reaches the starting terminal; exit 1."""
    a = make_agent(start=False)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", a.port))
    blocker.listen()
    try:
        r = _agent_cmd(a, "--daemon")
    finally:
        blocker.close()
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{a.port}" in r.stderr
    assert not (a.state / "agent.pid").exists()


def test_daemon_config_error_exits_2_before_detaching(make_agent: AgentFactory) -> None:
    """--daemon with a bad config prints the one-line error on the terminal and exits 2."""
    a = make_agent(start=False)
    a.config_path.write_text(a.config_path.read_text() + "\n[nonsense]\n")
    r = _agent_cmd(a, "--daemon")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "[nonsense]" in r.stderr and "unknown section" in r.stderr
    assert not (a.state / "agent.pid").exists()


def test_daemonize_refuses_when_grpc_already_imported(
    make_agent: AgentFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """The guard: no gRPC before the fork (this test process has imported grpc)."""
    from agent.daemon.daemonize import daemonize
    from agent.keeper.config import load

    assert "grpc" in sys.modules
    a = make_agent(start=False)
    assert daemonize(load(a.config_path), lambda report: 0) == 1
    assert "grpc was imported before daemonizing" in capsys.readouterr().err


# ---------------------------------------------------------------- sd_notify


class NotifySocket:
    """A real datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def read(self, timeout: float = 10.0) -> str:
        self.sock.settimeout(timeout)
        msg = self.sock.recv(4096).decode()
        self.messages.append(msg)
        return msg

    def until(self, pred: Callable[[str], bool], timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            m = self.read(max(0.01, deadline - time.monotonic()))
            if pred(m):
                return m


def test_sd_notify_sequence(make_agent: AgentFactory, tmp_path: Path, script_dir: Path) -> None:
    """READY only once TLS is served; STATUS, RELOADING+MONOTONIC_USEC, WATCHDOG, STOPPING."""
    ns = NotifySocket(tmp_path / "notify.sock")
    a = make_agent(start=False, env={"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "400000"})
    a.start(wait=False)
    first = ns.read(timeout=30)
    assert first.startswith("READY=1")
    # at the moment READY arrives, a TLS call already succeeds
    with a.stub() as stub, pytest.raises(grpc.RpcError) as e:
        stub.QueryJob(pb.QueryJobReq(jobID="00000000-0000-4000-8000-000000000000"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "STATUS=0 jobs running; accepting jobs" in first
    ns.until(lambda m: m == "WATCHDOG=1", timeout=5)
    c = a.client()
    job = c.start("bash", str(script_dir / "sleep.sh"), args=["30"])
    ns.until(lambda m: m == "STATUS=1 job running; accepting jobs", timeout=5)
    a.signal(signal.SIGHUP)
    reloading = ns.until(lambda m: m.startswith("RELOADING=1"))
    usec = int(reloading.split("MONOTONIC_USEC=")[1])
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000
    ns.until(lambda m: m.startswith("READY=1"))
    assert c.query(job).state == "RUNNING"  # a reload drops no job
    a.signal(signal.SIGTERM)
    ns.until(lambda m: m == "STOPPING=1")
    assert a.proc is not None and a.proc.wait(30) == 0
    assert ns.messages[0] == first and sum(m.startswith("READY=1") for m in ns.messages) == 2


def test_status_line_says_a_reload_was_rejected_until_one_succeeds(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """STATUS= names what the last reload rejected; the next good reload clears it."""
    ns = NotifySocket(tmp_path / "notify.sock")
    a = make_agent(start=False, env={"NOTIFY_SOCKET": str(ns.path)})
    a.start(wait=False)
    ns.until(lambda m: m.startswith("READY=1"), timeout=30)
    good = a.policy_path.read_text()
    a.policy_path.write_text("version: 1\nentries: [\n")
    a.signal(signal.SIGHUP)
    ready = ns.until(lambda m: m.startswith("READY=1"))
    assert "STATUS=0 jobs running; accepting jobs; last reload rejected: policy (see the log)" in (
        ready
    )
    a.policy_path.write_text(good)
    a.signal(signal.SIGHUP)
    ready = ns.until(lambda m: m.startswith("READY=1"))
    assert ready.endswith("STATUS=0 jobs running; accepting jobs"), ready


# ---------------------------------------------------------------- signals


def test_sigterm_wait_mode_lets_jobs_finish_and_refuses_new_ones(
    make_agent: AgentFactory, script_dir: Path
) -> None:
    """on_shutdown = wait: running jobs finish; new ones are UNAVAILABLE; exit 0."""
    a = make_agent(daemon={"on_shutdown": "wait", "shutdown_deadline_seconds": 30})
    c = a.client()
    job = c.start("bash", str(script_dir / "count.sh"), args=["10", "0.2"])
    a.signal(signal.SIGTERM)
    wait_for(lambda: "shutting down" in a.log())
    with pytest.raises(Unavailable, match="shutting down"):
        c.start("true", "")
    assert a.proc is not None and a.proc.wait(30) == 0
    a.start()
    st = a.client().query(job)
    assert st.state == "SUCCEEDED" and st.output_bytes == len(
        "".join(f"line {i}\n" for i in range(1, 11))
    )


def test_sigterm_wait_mode_deadline_then_stops(make_agent: AgentFactory, script_dir: Path) -> None:
    """A job outliving the shutdown deadline is stopped; the agent still exits 0."""
    a = make_agent(daemon={"on_shutdown": "wait", "shutdown_deadline_seconds": 1})
    c = a.client()
    job = c.start("bash", str(script_dir / "sleep.sh"), args=["60"])
    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.proc is not None and a.proc.wait(30) == 0
    assert time.monotonic() - t0 >= 0.9
    assert not job_processes(job)
    a.start()
    assert a.client().query(job).state == "STOPPED"


def test_second_sigint_forces_exit(make_agent: AgentFactory, script_dir: Path) -> None:
    """First SIGINT starts a patient shutdown and says a second one stops the jobs now; it does."""
    a = make_agent(daemon={"on_shutdown": "wait", "shutdown_deadline_seconds": 600})
    c = a.client()
    job = c.start("bash", str(script_dir / "tree.sh"))  # ignores TERM in one child
    wait_for(lambda: b"children started" in b"".join(c.stream(job)))
    a.signal(signal.SIGINT)
    wait_for(lambda: "shutting down" in a.log())
    assert "press Ctrl-C again to stop them now" in a.log()
    time.sleep(0.3)
    assert a.proc is not None and a.proc.poll() is None  # still waiting for the job
    a.signal(signal.SIGINT)
    assert a.proc.wait(30) == 0
    assert not job_processes(job)


def test_sighup_reloads_policy_and_keeps_the_old_one_if_broken(
    agent: AgentProcess, script_dir: Path
) -> None:
    """SIGHUP: a valid new policy applies at once; a broken one is logged and ignored."""
    c = agent.client()
    running = c.start("bash", str(script_dir / "sleep.sh"), args=["30"])
    c.wait(c.start("true", ""), timeout=10)
    original = agent.policy_path.read_text()
    agent.policy_path.write_text(original.replace('aliases: ["true"]', 'aliases: ["yes"]'))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "policy reloaded" in agent.log())
    with pytest.raises(Exception, match="not in the policy"):
        c.start("true", "")
    c.wait(c.start("yes", ""), timeout=10)
    agent.policy_path.write_text("version: 1\nentries:\n  - name: [broken\n")
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "policy reload rejected" in agent.log())
    c.wait(c.start("yes", ""), timeout=10)  # the previous policy still applies
    assert c.query(running).state == "RUNNING"
    events = [
        (e["event"], e["decision"]) for e in agent.audit_lines() if e["event"] == "policy_reload"
    ]
    assert events == [("policy_reload", "ok"), ("policy_reload", "error")]
    c.stop(running)


def test_daemon_logs_to_syslog_when_configured(make_agent: AgentFactory, tmp_path: Path) -> None:
    """[logging] syslog = true: the daemon's log lines reach the syslog socket."""
    sock_path = tmp_path / "log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    a = make_agent(start=False, logging={"syslog": True, "syslog_socket": str(sock_path)})
    r = _agent_cmd(a, "--daemon")
    assert r.returncode == 0, r.stderr
    pid = int((a.state / "agent.pid").read_text())
    try:
        lines: list[str] = []
        while not any("listening on" in x for x in lines):
            lines.append(sock.recv(4096).decode())
        assert any(x.startswith("<14>agent[") for x in lines)  # user.info, tagged
        assert not (a.state / "agent.log").exists()
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid), timeout=20)
        sock.close()


def test_syslog_without_a_socket_is_refused(make_agent: AgentFactory, tmp_path: Path) -> None:
    """syslog = true with no socket at syslog_socket: one line, exit 2."""
    a = make_agent(start=False, logging={"syslog": True, "syslog_socket": str(tmp_path / "none")})
    r = _agent_cmd(a)
    assert r.returncode == 2 and "[logging] syslog_socket" in r.stderr
