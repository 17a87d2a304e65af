"""Self-test of the systemd tier: the container harness, and the unit that holds the jobs
(systemd/worker-agent-keeper.service) under it.

One container is booted for the whole module; the stand-in (standin_agent.py) is
installed in it as /opt/worker-agent/bin/agent, run by the keeper's unit as its
``agent keeper``, and driven over loopback TCP from this (host) process, which shares
the container's network: what its "jobs" may do is what the unit lets the real keeper's
jobs do. The tests are ordered: the unit tests run the service through its life cycle.
The agent's own unit (systemd/worker-agent.service) runs the real agent in
test_agent_systemd.py; here it is only verified and rated.
"""

from __future__ import annotations

import json
import shlex
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import nspawn
from .conftest import Timings

pytestmark = pytest.mark.systemd

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
UNIT = REPO / "systemd" / "worker-agent-keeper.service"
AGENT_UNIT = REPO / "systemd" / "worker-agent.service"
SERVICE = "worker-agent-keeper.service"
SYSUSERS = REPO / "systemd" / "worker-agent.sysusers"
TMPFILES = REPO / "systemd" / "worker-agent.tmpfiles"
WHEELS = ("grpcio", "pyyaml")
READY_DELAY = 2.0
MAX_EXPOSURE = 2.0
# The agent faces the network and holds no job and no privilege.
MAX_AGENT_EXPOSURE = 1.5


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory, timings: Timings) -> Path:
    """Wheels built on the host for the container's Python."""
    started = time.monotonic()
    path = nspawn.build_wheelhouse(WHEELS, tmp_path_factory.mktemp("wheelhouse"))
    timings.add("build_wheelhouse", started)
    return path


@pytest.fixture(scope="module")
def container(rootfs: Path, wheelhouse: Path, timings: Timings) -> Iterator[nspawn.Container]:
    """One booted container for the module, with the wheelhouse bound read-only."""
    started = time.monotonic()
    with nspawn.Container(rootfs, binds=[nspawn.Bind(wheelhouse, "/wheelhouse")]) as box:
        timings.add("boot", started)
        yield box
        started = time.monotonic()
    timings.add("poweroff_and_cleanup", started)
    assert box.returncode == 0, box.console_tail()
    assert not box.killed


def free_port() -> int:
    """Return a TCP port free on loopback right now (host and container share it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Agent:
    """The installed stand-in agent: how to reach it and how to drive its unit."""

    box: nspawn.Container
    port: int

    def ask(self, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Send one JSON request to the stand-in over loopback TCP and return its reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply: dict[str, Any] = json.loads(sock.makefile("rb").readline())
        assert "error" not in reply, reply
        return reply

    def job(self, *argv: str) -> dict[str, Any]:
        """Run argv as a job of the agent (own session, scratch cwd) and return rc/stdout/stderr."""
        return self.ask({"op": "spawn", "argv": list(argv)})

    def state(self, *names: str) -> dict[str, str]:
        """Return ``systemctl show`` properties of worker-agent.service."""
        return self.box.unit_properties(SERVICE, *names)

    def start(self) -> None:
        """Start the unit (clearing a failed state first) and wait until it is active."""
        self.box.systemctl("reset-failed", SERVICE)
        self.box.systemctl("start", SERVICE).check("systemctl start agent")
        assert self.state()["ActiveState"] == "active"


@pytest.fixture(scope="module")
def agent(container: nspawn.Container, timings: Timings) -> Agent:
    """Install the unit as a package would, with the stand-in as its binary."""
    box = container
    started = time.monotonic()
    nspawn.install_wheels(box, WHEELS)
    timings.add("install_wheels", started)
    started = time.monotonic()
    standin = (HERE / "standin_agent.py").read_text().split("\n", 1)[1]
    # Like the real console script: the venv's python, so /opt/worker-agent must stay executable.
    box.write_file(
        "/opt/worker-agent/bin/agent", "#!/opt/worker-agent/bin/python3\n" + standin, mode=0o755
    )
    box.copy_in(UNIT, f"/etc/systemd/system/{SERVICE}")
    box.copy_in(SYSUSERS, "/usr/lib/sysusers.d/worker-agent.conf")
    box.copy_in(TMPFILES, "/usr/lib/tmpfiles.d/worker-agent.conf")
    box.run(
        "systemd-sysusers worker-agent.conf && systemd-tmpfiles --create worker-agent.conf",
        check=True,
    )
    port = free_port()
    config = (
        f'[grpc_server]\naddr = "127.0.0.1:{port}"\n'
        f"[standin]\nready_delay = {READY_DELAY}\nstop_grace = 5\n"
    )
    box.write_file("/etc/worker-agent/config.toml", config, mode=0o640, owner="root:worker-agent")
    box.systemctl("daemon-reload").check("daemon-reload")
    timings.add("install_agent", started)
    return Agent(box, port)


# -- the unit file, on the host ---------------------------------------------------


@pytest.mark.parametrize("unit", [UNIT, AGENT_UNIT], ids=lambda u: u.name)
def test_unit_verifies_on_host(unit: Path) -> None:
    """systemd-analyze verify accepts the units (binary stubbed in a private mount namespace)."""
    if nspawn.skip_reason():
        pytest.skip(nspawn.skip_reason() or "")
    result = nspawn.verify_unit(unit)
    assert result.rc == 0, result
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize(
    ("unit", "most"),
    [(UNIT, MAX_EXPOSURE), (AGENT_UNIT, MAX_AGENT_EXPOSURE)],
    ids=["keeper", "agent"],
)
def test_unit_security_exposure_is_low(unit: Path, most: float) -> None:
    """systemd-analyze security --offline rates the keeper's unit at most 2.0, the
    agent's (no job, no capability) at most 1.5."""
    if nspawn.skip_reason():
        pytest.skip(nspawn.skip_reason() or "")
    exposure, report = nspawn.security_exposure(unit)
    print(report)
    assert exposure <= most, report


# -- the harness ------------------------------------------------------------------


def test_container_runs_systemd_as_pid1(container: nspawn.Container) -> None:
    """The container's PID 1 is systemd and it has finished booting."""
    assert container.run(["readlink", "/proc/1/exe"]).stdout.strip() == "/usr/lib/systemd/systemd"
    state = container.run(["systemctl", "is-system-running"]).stdout.strip()
    assert state in nspawn.BOOTED_STATES
    assert "bookworm" in container.read_file("/etc/os-release").decode()


def test_run_returns_rc_output_and_honours_user(container: nspawn.Container) -> None:
    """run() gives (rc, stdout, stderr), feeds stdin, and switches user without PAM."""
    assert container.run("echo out; echo err >&2; exit 3") == (3, "out\n", "err\n")
    assert container.run(["cat"], input="piped").stdout == "piped"
    assert container.run(["id", "-un"], user="nobody").stdout.strip() == "nobody"
    assert container.run(["pwd"], cwd="/usr").stdout.strip() == "/usr"
    with pytest.raises(nspawn.ContainerError):
        container.run(["false"], check=True)


def test_systemd_run_runs_a_sandboxed_unit(container: nspawn.Container) -> None:
    """systemd_run() runs a transient unit of the container's systemd, in its own cgroup."""
    result = container.systemd_run(
        ["sh", "-c", "id -un; cat /proc/self/cgroup; touch /usr/x"],
        user="nobody",
        properties={"ProtectSystem": "strict"},
    )
    assert result.stdout.startswith("nobody\n"), result
    assert ".service" in result.stdout
    assert result.rc != 0


def test_copy_in_file_and_directory(container: nspawn.Container, tmp_path: Path) -> None:
    """copy_in() copies trees and files, creating parents, setting owner and mode."""
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "a.txt").write_text("alpha")
    (tmp_path / "single").write_text("beta")
    container.copy_in(tmp_path / "tree", "/srv/deep/tree", owner="nobody")
    container.copy_in(tmp_path / "single", "/srv/deep/renamed", mode=0o600)
    assert container.read_file("/srv/deep/tree/sub/a.txt") == b"alpha"
    listing = container.run(
        ["stat", "-c", "%U %a", "/srv/deep/tree/sub/a.txt", "/srv/deep/renamed"]
    )
    assert listing.stdout.split("\n")[:2] == ["nobody 644", "root 600"]


def test_cached_rootfs_stays_pristine(container: nspawn.Container, rootfs: Path) -> None:
    """Writes inside the container never reach the cached rootfs."""
    container.write_file("/etc/pristine-probe", "x")
    assert container.read_file("/etc/pristine-probe") == b"x"
    assert not (rootfs / "etc" / "pristine-probe").exists()


def test_bind_is_read_only(container: nspawn.Container, wheelhouse: Path) -> None:
    """A Bind is visible in the container and read-only there."""
    names = container.run(["ls", "/wheelhouse"]).stdout.split()
    assert sorted(names) == sorted(p.name for p in wheelhouse.iterdir())
    assert container.run(["touch", "/wheelhouse/x"]).rc != 0


def leftovers(box: nspawn.Container) -> list[str]:
    """Return the temporary dirs, mounts and cgroups a container left on the host."""
    token = box.console_log.parent.name
    found = [str(p) for p in Path(box.console_log.parent.parent).glob(token)]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{token}")]
    with open("/proc/self/mountinfo") as fh:
        found += [line for line in fh if token in line]
    return found


def test_hung_poweroff_is_killed_without_leftovers(rootfs: Path) -> None:
    """When power-off overruns stop_timeout the container is killed, and nothing is left."""
    box = nspawn.Container(rootfs, stop_timeout=0.01)
    box.start()
    leader = box.leader_pid
    box.stop()
    assert box.killed
    assert not Path(f"/proc/{leader}").exists()
    assert leftovers(box) == []


def test_failed_boot_raises_and_cleans_up(rootfs: Path) -> None:
    """A container that does not boot in time raises ContainerError and leaves nothing."""
    box = nspawn.Container(rootfs, boot_timeout=0.01)
    with pytest.raises(nspawn.ContainerError):
        box.start()
    assert leftovers(box) == []


def test_wheels_install_without_an_index(agent: Agent) -> None:
    """Host-built cp311 wheels install into a venv in the container with --no-index."""
    probe = "import grpc, yaml; print(grpc.__version__, yaml.__version__)"
    result = agent.box.run(["/opt/worker-agent/bin/python", "-c", probe], check=True)
    assert len(result.stdout.split()) == 2


# -- the unit, under the container's systemd ----------------------------------------


def test_unit_verifies_in_container(agent: Agent) -> None:
    """Verify passes where /opt/worker-agent/bin/agent really exists."""
    result = agent.box.run(
        ["systemd-analyze", "verify", "--man=no", f"/etc/systemd/system/{SERVICE}"]
    )
    assert (result.rc, result.stderr) == (0, ""), result


def test_active_only_after_ready(agent: Agent) -> None:
    """The unit stays activating until READY=1, then is active (Type=notify)."""
    agent.box.systemctl("start", "--no-block", SERVICE).check("start")
    assert agent.state()["ActiveState"] == "activating"
    state = agent.box.wait_unit(SERVICE, ["active", "failed"], timeout=30)
    assert state["ActiveState"] == "active", state
    status = agent.ask({"op": "status"})
    times = agent.state("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    started = int(times["ExecMainStartTimestampMonotonic"])
    active = int(times["ActiveEnterTimestampMonotonic"])
    # Same kernel, same CLOCK_MONOTONIC on both sides of the notify socket.
    assert started + READY_DELAY * 1e6 <= status["ready_usec"] <= active


def test_keeper_identity_and_directories(agent: Agent) -> None:
    """The keeper runs as user worker-agent with its directories (no log directory: the
    audit log is the agent's; no watchdog: it serves no network)."""
    status = agent.ask({"op": "status"})
    uid = int(agent.box.run(["id", "-u", "worker-agent"], check=True).stdout)
    assert (status["uid"], status["gid"]) == (uid, uid)
    assert status["state_directory"] == "/var/lib/worker-agent"
    assert status["logs_directory"] is None
    assert status["configuration_directory"] == "/etc/worker-agent"
    assert status["watchdog_usec"] is None
    modes = agent.box.run(
        [
            "stat",
            "-c",
            "%n %U %G %a",
            "/etc/worker-agent",
            "/var/lib/worker-agent",
        ]
    )
    assert modes.stdout.splitlines() == [
        "/etc/worker-agent root worker-agent 750",
        "/var/lib/worker-agent worker-agent worker-agent 750",
    ]


def test_reload_sends_sighup_and_stays_active(agent: Agent) -> None:
    """Reload reaches the agent (RELOADING=1 ... READY=1) and the unit stays active."""
    agent.box.systemctl("reload", SERVICE).check("reload")
    # systemd 252 ends the reload job when `kill -HUP` exits, not when the agent
    # has reloaded (that needs Type=notify-reload, systemd >= 253): poll.
    deadline = time.monotonic() + 10
    while agent.ask({"op": "status"})["reloads"] < 1:
        assert time.monotonic() < deadline, "SIGHUP never reached the agent"
        time.sleep(0.05)
    state = agent.box.wait_unit(SERVICE, ["active"], timeout=10)
    assert state["SubState"] == "running"
    assert agent.state("ReloadResult") == {"ReloadResult": "success"}


@pytest.mark.parametrize(
    "path",
    [
        "/etc/probe",
        "/usr/probe",
        "/usr/local/bin/probe",
        "/opt/worker-agent/probe",
        "/var/probe",
        "/var/cache/probe",
        "/root/probe",
        "/home/probe",
        "/run/probe",
        "/srv/probe",
    ],
)
def test_jobs_cannot_write_outside_state_and_tmp(agent: Agent, path: str) -> None:
    """A job can create files only in /var/lib/worker-agent and /tmp (the unit's part;
    Landlock narrows it to the job's scratch)."""
    result = agent.job("bash", "-c", f"echo x > {shlex.quote(path)}")
    assert result["rc"] != 0, result
    assert agent.box.run(["test", "-e", path]).rc != 0


@pytest.mark.parametrize(
    "path", ["$SCRATCH/out", "/var/lib/worker-agent/out", "/tmp/out", "/var/tmp/out"]
)
def test_jobs_can_write_scratch_and_tmp(agent: Agent, path: str) -> None:
    """A job can write its scratch directory, the state directory and the private /tmp."""
    result = agent.job("bash", "-c", f'echo x > "{path}" && cat "{path}"')
    assert (result["rc"], result["stdout"]) == (0, "x\n"), result


def test_jobs_run_bash_python_and_coreutils(agent: Agent) -> None:
    """Jobs can run bash, python3, /bin/true and /bin/sleep."""
    assert agent.job("bash", "-c", 'echo "$BASH_VERSION"')["stdout"].startswith("5.")
    assert agent.job("python3", "-c", "print(6 * 7)")["stdout"] == "42\n"
    assert agent.job("/bin/true")["rc"] == 0
    assert agent.job("/bin/sleep", "0.1")["rc"] == 0


def test_jobs_prlimit_lowers_but_cannot_raise(agent: Agent) -> None:
    """Prlimit can lower a job's limits; raising the hard limit is refused."""
    lowered = agent.job(
        "prlimit", "--nofile=64:64", "--nproc=100", "--", "bash", "-c", "ulimit -n; ulimit -u"
    )
    assert lowered["stdout"].split() == ["64", "100"], lowered
    raised = agent.job("prlimit", "--nofile=1048576:1048576", "--", "true")
    assert raised["rc"] != 0, raised
    assert "Operation not permitted" in raised["stderr"], raised


def test_jobs_lead_their_own_session(agent: Agent) -> None:
    """Setsid works: a job is the leader of its own session and process group."""
    probe = "import os; p = os.getpid(); print(os.getsid(0) == p, os.getpgid(0) == p)"
    assert agent.job("python3", "-c", probe)["stdout"] == "True True\n"


@pytest.mark.parametrize(
    "directory", ["/tmp", "/var/tmp", "/dev/shm", "$SCRATCH", "/var/lib/worker-agent"]
)
def test_jobs_cannot_exec_files_they_wrote(agent: Agent, directory: str) -> None:
    """A binary copied to a writable place cannot be executed (NoExecPaths=)."""
    result = agent.job("bash", "-c", f'cp /bin/true "{directory}/t" && "{directory}/t"')
    assert result["rc"] == 126, result
    assert "Permission denied" in result["stderr"], result


def test_jobs_have_no_privileges(agent: Agent) -> None:
    """What the keeper unit gives a process it runs: no capability but CAP_SETUID and
    CAP_SETGID (ambient, for dynamic users), no_new_privs, and no unshare or setuid(0).

    The stand-in runs its children as they are, so they hold exactly what the unit
    gives; the real keeper drops even those in every job (tests/systemd_tier/
    test_agent_systemd.py checks real jobs: no capability in any set), and with
    no_new_privs nothing a job executes can take them back (docs/security.md)."""
    status = agent.job("cat", "/proc/self/status")["stdout"]
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    setuid_setgid = (1 << 7) | (1 << 6)
    for name in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert int(fields[name], 16) & ~setuid_setgid == 0, (name, fields[name])
    assert int(fields["CapInh"], 16) & ~setuid_setgid == 0, fields["CapInh"]
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    assert agent.job("unshare", "--user", "true")["rc"] != 0
    assert agent.job("python3", "-c", "import os; os.setuid(0)")["rc"] != 0


def test_jobs_see_only_their_own_processes(agent: Agent) -> None:
    """ProtectProc=invisible: a job cannot see PID 1 or other users' processes."""
    result = agent.job("bash", "-c", "test -e /proc/1 && echo visible || echo hidden")
    assert result["stdout"] == "hidden\n"


def test_grpc_and_ctypes_work_under_memory_deny_write_execute(agent: Agent) -> None:
    """Grpcio serves and ctypes callbacks run under MemoryDenyWriteExecute=, ProcSubset=pid."""
    probe = (
        "import ctypes, grpc\n"
        "from concurrent import futures\n"
        "server = grpc.server(futures.ThreadPoolExecutor(2))\n"
        "port = server.add_insecure_port('127.0.0.1:0')\n"
        "server.start(); server.stop(0)\n"
        "callback = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)\n"
        "print(port > 0, callback())\n"
    )
    result = agent.job("/opt/worker-agent/bin/python", "-c", probe)
    assert result["stdout"] == "True 7\n", result


def test_landlock_is_available_to_jobs(agent: Agent) -> None:
    """Landlock syscalls pass the unit's filter (the agent may confine jobs further with it)."""
    probe = (
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.syscall(444, None, 0, 1))  # landlock_create_ruleset: ABI version\n"
    )
    result = agent.job("python3", "-c", probe)
    assert int(result["stdout"]) >= 1, result


def test_agent_can_kill_its_own_job_group(agent: Agent) -> None:
    """kill(2) of a job's process group works from the agent."""
    job = agent.ask({"op": "spawn_bg", "argv": ["sleep", "300"]})
    assert job["pgid"] == job["pid"]
    assert agent.ask({"op": "kill", "pid": job["pid"], "signal": 15})["returncode"] == -15


def test_stop_ends_inactive_and_reaps_jobs(agent: Agent) -> None:
    """SIGTERM: the agent stops its jobs and exits 0, the unit ends inactive, not failed."""
    agent.ask({"op": "spawn_bg", "argv": ["bash", "-c", "sleep 300 & sleep 301; wait"]})
    assert agent.box.run(["pgrep", "-u", "worker-agent", "sleep"]).rc == 0
    agent.box.systemctl("stop", SERVICE).check("stop")
    assert agent.state() == {"ActiveState": "inactive", "SubState": "dead", "Result": "success"}
    assert agent.box.run(["pgrep", "-u", "worker-agent"]).rc == 1


def test_crash_is_restarted(agent: Agent) -> None:
    """A killed agent is restarted (Restart=on-failure) after RestartSec."""
    agent.start()
    agent.box.systemctl("kill", "--signal=KILL", SERVICE).check("kill")
    state = agent.box.wait_unit(SERVICE, ["activating", "failed"], timeout=10)
    assert state["SubState"] == "auto-restart", state
    agent.box.wait_unit(SERVICE, ["active", "failed"], timeout=30)
    assert agent.state("ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "1"}


def test_exit_status_2_is_not_restarted(agent: Agent) -> None:
    """Exit 2 (invalid configuration) fails the unit without a restart loop."""
    with pytest.raises((ConnectionError, json.JSONDecodeError)):
        agent.ask({"op": "exit", "code": 2}, timeout=5)
    state = agent.box.wait_unit(SERVICE, ["failed", "inactive"], timeout=10)
    assert (state["SubState"], state["Result"]) == ("failed", "exit-code"), state


def test_ip_address_deny_is_enforced(agent: Agent) -> None:
    """IPAddressDeny=any holds: with the allow list narrowed to 127.0.0.1, 127.0.0.2 is refused."""
    dropin = f"/run/systemd/system/{SERVICE}.d/narrow.conf"
    agent.box.write_file(dropin, "[Service]\nIPAddressAllow=\nIPAddressAllow=127.0.0.1\n")
    agent.box.systemctl("daemon-reload").check("daemon-reload")
    try:
        agent.start()
        probe = (
            "import socket\n"
            "for host in ('127.0.0.1', '127.0.0.2'):\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "    try: s.sendto(b'x', (host, 9)); print(host, 'sent')\n"
            "    except PermissionError: print(host, 'denied')\n"
        )
        assert agent.job("python3", "-c", probe)["stdout"] == "127.0.0.1 sent\n127.0.0.2 denied\n"
    finally:
        agent.box.systemctl("stop", SERVICE)
        agent.box.run(["rm", "-f", dropin])
        agent.box.systemctl("daemon-reload")
