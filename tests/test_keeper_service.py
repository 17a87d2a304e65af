"""The job keeper as a service of its own (``agent keeper``, ``[keeper] mode = "service"``).

Real processes: ``python -m agent keeper`` started as a service manager would (with a
``NOTIFY_SOCKET`` the test reads), and real agents that attach to it. Stopping the
agent leaves the jobs running; restarting it finds them; SIGUSR2 re-executes the keeper
in place (the package upgrade's reload); stopping the keeper stops the jobs (grace, then
the cgroup) and records how they ended. The systemd units themselves are exercised in the
systemd tier (tests/systemd_tier/test_package.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import AgentClient, PermissionDenied
from agent.keeper.keeperservice import after_stop

from helpers import (
    IS_ROOT,
    AgentFactory,
    AgentProcess,
    job_processes,
    make_safe_dir,
    policy_for,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="jobs run as nobody: needs root")

GATED = """
    #!/bin/bash
    echo "one $1"
    while [ ! -e "$2.1" ]; do sleep 0.02; done
    echo "after gate 1"
    while [ ! -e "$2.2" ]; do sleep 0.02; done
    echo "after gate 2"
    exit "$1"
    """


@pytest.fixture(scope="module")
def sdir() -> Iterator[Path]:
    d = make_safe_dir()
    write_script(d, "gated.sh", GATED)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def gates() -> Iterator[Path]:
    d = make_safe_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Notify:
    """A service manager's notification socket: what the keeper says (READY=1, ...)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.said: list[str] = []

    def read(self) -> list[str]:
        with contextlib.suppress(TimeoutError, BlockingIOError):
            while True:
                self.said.append(self.sock.recv(4096).decode())
        return self.said

    def saw(self, text: str) -> bool:
        return any(text in m for m in self.read())

    def close(self) -> None:
        self.sock.close()


class KeeperService:
    """``python -m agent keeper --config CONFIG`` as a service: its own session, its log."""

    def __init__(self, agent: AgentProcess, notify: Notify) -> None:
        self.agent = agent
        self.notify = notify
        self.log_path = agent.workdir / "keeper.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KeeperService:
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify.path))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "keeper", "--config", str(self.agent.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.agent.workdir),
                start_new_session=True,
            )
        # The agent's clean-up finds (and kills) it by its process group.
        self.agent.pgids.append(self.proc.pid)
        wait_for(lambda: self.notify.saw("READY=1") or self.proc.poll() is not None, 20)
        assert self.proc.poll() is None, self.log()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _service_agent(make_agent: AgentFactory, policy: str, **kw: object) -> AgentProcess:
    return make_agent(
        policy,
        start=False,
        daemon={"on_shutdown": "keep"},
        keeper={"mode": "service", "wait_seconds": 20},
        **kw,
    )


def _start_ticks(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2 :].split()[19])


def _reloaded(said: list[str]) -> bool:
    """RELOADING=1, then READY=1: the manager saw a reload begin and end."""
    first = next((i for i, m in enumerate(said) if m.startswith("RELOADING=1")), None)
    return first is not None and any(m.startswith("READY=1") for m in said[first:])


def output(c: AgentClient, job: str) -> bytes:
    return b"".join(c.stream(job))


def test_jobs_outlive_the_agent_and_the_keeper_reexecutes_in_place(
    make_agent: AgentFactory, sdir: Path, gates: Path, tmp_path: Path
) -> None:
    """The agent stops (SIGTERM) and starts again: the job runs on, found RUNNING. SIGUSR2
    to the keeper: RELOADING=1, the same process with new code, READY=1; the job ends
    with its true status and whole output. SIGTERM to the keeper: its jobs are stopped
    and their ends recorded; it exits 0 and tells its manager STOPPING=1."""
    a = _service_agent(make_agent, policy_for(sdir))
    notify = Notify(tmp_path / "notify")
    keeper = KeeperService(a, notify).start()
    a.start()
    assert f"job keeper (pid {keeper.pid})" in a.log() and "attached" in a.log()
    c = a.client()
    gate = gates / "g"
    job = c.start("bash", str(sdir / "gated.sh"), args=["3", str(gate)])
    wait_for(lambda: output(c, job) == b"one 3\n")
    assert a.stop() == 0
    assert job_processes(job), "stopping the agent must leave the job running"
    assert keeper.proc is not None and keeper.proc.poll() is None
    Path(f"{gate}.1").touch()
    wait_for(lambda: (a.state / "output" / f"{job}.out").read_bytes().endswith(b"gate 1\n"))
    a.start()
    c = a.client()
    assert c.query(job).state == "RUNNING"
    started = _start_ticks(keeper.pid)
    os.kill(keeper.pid, signal.SIGUSR2)
    wait_for(lambda: "re-executed in place" in keeper.log(), 20)
    wait_for(lambda: _reloaded(notify.read()))
    assert _start_ticks(keeper.pid) == started
    Path(f"{gate}.2").touch()
    st = c.wait(job, timeout=20)
    assert (st.state, st.exit_code) == ("FAILED", 3), st
    assert output(c, job) == b"one 3\nafter gate 1\nafter gate 2\n"
    # Stopping the keeper's service stops its jobs, and the agent records how.
    sleeper = c.start("sleep", "60")
    wait_for(lambda: job_processes(sleeper))
    keeper.proc.send_signal(signal.SIGTERM)
    assert keeper.proc.wait(30) == 0, keeper.log()
    assert not job_processes(sleeper)
    assert notify.saw("STOPPING=1")
    # The agent goes with its keeper (its manager restarts it; it waits for the keeper).
    assert a.proc is not None
    assert a.proc.wait(20) == 1
    assert "job keeper service" in a.log() and "went away" in a.log()
    keeper.start()
    a.start()
    st = a.client().query(sleeper)
    assert st.state == "STOPPED", st
    assert "stopped by the job keeper's stop" in st.error_text, st
    notify.close()


def test_a_keeper_stopped_after_its_agent_keeps_the_ends_for_the_next(
    make_agent: AgentFactory, sdir: Path, tmp_path: Path
) -> None:
    """systemd stops the agent before the keeper it requires: the keeper stops its jobs
    with no agent to tell, keeps their ends in the state directory, and the next keeper
    hands them to the next agent: the history says STOPPED, not LOST."""
    a = _service_agent(make_agent, policy_for(sdir))
    keeper = KeeperService(a, Notify(tmp_path / "notify")).start()
    a.start()
    c = a.client()
    job = c.start("sleep", "60")
    wait_for(lambda: job_processes(job))
    assert a.stop() == 0
    assert keeper.proc is not None
    keeper.proc.send_signal(signal.SIGTERM)
    assert keeper.proc.wait(30) == 0, keeper.log()
    assert not job_processes(job)
    assert (a.state / "keeper-ended.json").exists(), keeper.log()
    keeper.start()
    a.start()
    st = a.client().query(job)
    assert (st.state, st.signal) == ("STOPPED", 15), st
    assert "stopped by the job keeper's stop" in st.error_text, st
    assert not (a.state / "keeper-ended.json").exists()
    assert "LOST" not in a.log()


def test_an_agent_start_makes_a_running_keeper_read_its_policy_again(
    make_agent: AgentFactory, sdir: Path, tmp_path: Path
) -> None:
    """The keeper service loaded the policy when it started; an operator edits the file and
    starts (or restarts) the agent: the keeper decides with the file as it is now, as the
    agent's start-up checked it (never with a policy the agent hands it)."""
    a = _service_agent(make_agent, policy_for(sdir))
    KeeperService(a, Notify(tmp_path / "notify")).start()
    a.start()
    c = a.client()
    with pytest.raises(PermissionDenied, match="'date' is not in the policy"):
        c.start("date")
    assert a.stop() == 0
    extra = "  - name: date\n    command: /bin/date\n    aliases: [date]\n"
    a.policy_path.write_text(policy_for(sdir, extra))
    a.start()
    c = a.client()
    assert c.wait(c.start("date"), timeout=20).state == "SUCCEEDED"


def test_an_agent_waits_for_the_keeper_service_and_says_so(
    make_agent: AgentFactory, sdir: Path
) -> None:
    """No keeper answers: the agent never starts one of its own (it would hold the jobs in
    the agent's unit); after [keeper] wait_seconds it fails, naming the service."""
    a = make_agent(
        policy_for(sdir),
        start=False,
        daemon={"on_shutdown": "keep"},
        keeper={"mode": "service", "wait_seconds": 0.5},
    )
    with pytest.raises(RuntimeError, match="no job keeper answers"):
        a.start()
    assert not a.keepers()


def test_a_second_keeper_on_the_same_state_is_refused(
    make_agent: AgentFactory, sdir: Path, tmp_path: Path
) -> None:
    a = _service_agent(make_agent, policy_for(sdir))
    KeeperService(a, Notify(tmp_path / "notify")).start()
    r = subprocess.run(
        [sys.executable, "-m", "agent", "keeper", "--config", str(a.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1 and "a job keeper already listens at" in r.stderr, r


def test_the_service_mode_refuses_a_shutdown_that_would_stop_jobs(tmp_path: Path) -> None:
    """[keeper] mode = "service" with on_shutdown = "stop": a clear error, not an agent
    that stops the keeper's jobs whenever it restarts."""
    from agent.configfile import ConfigError
    from agent.keeper import config

    text = (
        "[grpc_server]\nuse_tls = false\nallow_plaintext_loopback = true\n"
        "[auth]\nallow_anonymous = true\n"
        '[jobs]\npolicy_file = "policy.yaml"\n'
        '[keeper]\nmode = "service"\n[daemon]\non_shutdown = "stop"\n'
    )
    with pytest.raises(ConfigError, match=r"\[daemon\] on_shutdown.*keep"):
        config.parse(text, tmp_path / "c.toml")
    assert config.parse(text.replace('"stop"', '"keep"'), tmp_path / "c.toml").keeper.mode == (
        "service"
    )


@pytest.mark.parametrize("result", ["signal", "exit-code", "core-dump", "watchdog"])
def test_after_a_crash_the_units_stop_post_kills_no_job(
    result: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`agent keeper --after-stop` (the unit's ExecStopPost=) after a keeper that died
    rather than was stopped: its jobs are left for the restarted keeper to adopt, and it
    says so (the kill after a stop is the systemd tier's, in a unit's own cgroup)."""
    env = {"SERVICE_RESULT": result, "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}
    assert after_stop(env) == 0
    err = capsys.readouterr().err
    assert f"result {result!r}" in err and "left running for the next keeper to adopt" in err
