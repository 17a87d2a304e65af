"""The real agent under a real systemd: systemd/worker-agent.service and
systemd/worker-agent-keeper.service exactly as shipped.

One container is booted for the whole module (see nspawn.py).  The project is
built into a wheel on the host, installed into /opt/worker-agent inside, the units
(the agent's and its job keeper's), their sysusers and tmpfiles snippets are applied,
and /etc/worker-agent holds a config, a policy and certificates made by
scripts/gen_certs.sh.  The test process drives systemd with systemctl inside the
container and talks to the agent over mTLS from the host (the container shares the
host's loopback).

The jobs live in the keeper's unit: restarting the agent keeps them, reloading the
keeper re-executes it in place and keeps them, stopping the keeper stops them (and,
through Requires=, the agent).

The tests are written in life-cycle order (start, job, reload, stop, sandbox);
each one starts the unit again if it needs it, so any of them also runs alone.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import socket
import ssl
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentClient
from agent.client.errors import FailedPrecondition

from . import nspawn
from .conftest import Timings
from helpers import Certs, free_port, gen_certs, to_toml

pytestmark = pytest.mark.systemd

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
UNIT = REPO / "systemd" / "worker-agent.service"
KEEPER_UNIT = REPO / "systemd" / "worker-agent-keeper.service"
KEEPER = "worker-agent-keeper.service"
SYSUSERS = REPO / "systemd" / "worker-agent.sysusers"
TMPFILES = REPO / "systemd" / "worker-agent.tmpfiles"
SERVICE = "worker-agent.service"
JOB_DIR = "/usr/local/lib/agent-jobs"
CERT_DIR = "/etc/worker-agent/certs"
STOP_GRACE = 2.0
OPEN_FILES = 1024

# Job scripts, installed root:root 0755 in JOB_DIR (under /usr: executable and
# read-only under the unit's ExecPaths=/ProtectSystem=).
SCRIPTS = {
    "count.sh": """\
        #!/bin/bash
        echo "hello $*"
        for i in 1 2 3; do echo "line $i"; sleep 0.2; done
        """,
    "gate.sh": """\
        #!/bin/bash
        # Runs until the test opens its gate (a file in /run, read-only to the unit).
        echo started
        for ((i = 0; i < 600; i++)); do
            if test -e "/run/agent-gates/$1"; then echo finished; exit 0; fi
            sleep 0.1
        done
        echo "gate $1 never opened"
        exit 1
        """,
    "tick.sh": """\
        #!/bin/bash
        # A line every 0.1 s until the test opens its gate: a gap would show.
        i=0
        while ! test -e "/run/agent-gates/$1"; do i=$((i + 1)); echo "tick $i"; sleep 0.1; done
        echo "done after $i"
        """,
    "trapterm.sh": """\
        #!/bin/bash
        trap 'echo got TERM; exit 0' TERM
        echo ready
        while true; do sleep 0.1; done
        """,
    "ignoreterm.sh": """\
        #!/bin/bash
        trap '' TERM
        echo ready
        while true; do sleep 0.1; done
        """,
    "write.sh": """\
        #!/bin/bash
        f="$1/agent-probe-$$"
        if echo probe > "$f"; then rm -f "$f"; echo "wrote $1"; exit 0; fi
        echo "cannot write $1"
        exit 3
        """,
    "escape.sh": """\
        #!/bin/bash
        # Leaves its session and group, scrubs its environment, renames itself
        # and ignores TERM: only its cgroup still holds it.
        ( setsid env -i /bin/bash -c 'trap "" TERM HUP; echo "pid $$"; exec -a x sleep 1000' & )
        sleep 0.2
        echo ready
        sleep 1000
        """,
    "cgroup.sh": """\
        #!/bin/bash
        cat /proc/self/cgroup
        """,
    "probe.sh": """\
        #!/bin/bash
        echo "user=$(id -un)"
        grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
        echo "nofile=$(ulimit -n)"
        if test -e /proc/1; then echo "pid1=visible"; else echo "pid1=hidden"; fi
        """,
}

POLICY = f"""\
version: 1
entries:
  - name: test-scripts
    command: /bin/bash
    aliases: [bash]
    scripts: ["{JOB_DIR}/*.sh"]
    args: {{max_count: 8, max_length: 256}}
  - name: "true"
    command: /bin/true
    aliases: ["true"]
    args: {{max_count: 0}}
  - name: sleep
    command: /bin/sleep
    aliases: [sleep]
    args: {{max_count: 1, patterns: ['[0-9]{{1,3}}(\\.[0-9]{{1,3}})?']}}
"""


def agent_config(port: int) -> str:
    """/etc/worker-agent/config.toml: mTLS on loopback, state and audit where the unit puts them."""
    return to_toml(
        {
            "grpc_server": {
                "addr": f"127.0.0.1:{port}",
                "use_tls": True,
                "crt_file": f"{CERT_DIR}/server.crt",
                "key_file": f"{CERT_DIR}/server.key",
                "ca_file": f"{CERT_DIR}/ca.crt",
            },
            "auth": {"clients": ["client"], "admins": ["admin"]},
            "jobs": {
                "policy_file": "/etc/worker-agent/policy.yaml",
                "state_dir": "/var/lib/worker-agent",
                "stop_grace_seconds": STOP_GRACE,
                "max_running": 16,
            },
            "limits": {"default": {"open_files": OPEN_FILES}},
            # The package's setting: no job cgroup, no start.
            "cgroups": {"mode": "required"},
            "audit": {"file": "/var/log/worker-agent/audit.log"},
            "retention": {"sweep_seconds": 3600.0},
            # The package's settings: the jobs are the keeper service's.
            "keeper": {"mode": "service"},
            "daemon": {"on_shutdown": "keep"},
        }
    )


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory, rootfs: Path, timings: Timings) -> Path:
    """Wheels of the project (from a clean copy of its sources) and its dependencies."""
    started = time.monotonic()
    src = tmp_path_factory.mktemp("src")
    # A copy, so that the build neither writes build/ or *.egg-info into the work
    # tree nor packs whatever stale build/ directory lies there.
    shutil.copy2(REPO / "pyproject.toml", src)
    shutil.copy2(REPO / "README.md", src)
    shutil.copytree(
        REPO / "agent", src / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    path = nspawn.build_wheelhouse([str(src)], tmp_path_factory.mktemp("wheelhouse"))
    timings.add("build_wheelhouse", started)
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """CA, server and client certificates made by scripts/gen_certs.sh on the host."""
    return gen_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Certs:
    """A second server certificate (new key, new serial) from the same CA."""
    out = tmp_path_factory.mktemp("rotated")
    for name in ("ca.crt", "ca.key"):
        shutil.copy2(certs.dir / name, out / name)
    new = gen_certs(out)  # keeps the CA, makes every leaf anew
    assert new.crt("server").read_bytes() != certs.crt("server").read_bytes()
    return new


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


@dataclass
class Agent:
    """The installed agent: how to reach it over mTLS and how to drive its unit."""

    box: nspawn.Container
    port: int
    certs: Certs
    clients: list[AgentClient] = field(default_factory=list)

    @property
    def addr(self) -> str:
        """host:port of the agent, reachable from the host."""
        return f"127.0.0.1:{self.port}"

    def client(self, identity: str = "client") -> AgentClient:
        """A new library client (its own channel, so its own TLS connection)."""
        c = AgentClient(self.addr, self.certs.tls(identity), timeout=20.0)
        self.clients.append(c)
        return c

    def close_clients(self) -> None:
        """Close every channel opened by client()."""
        for c in self.clients:
            c.close()
        self.clients.clear()

    def state(self, *names: str) -> dict[str, str]:
        """``systemctl show`` properties of the unit."""
        return self.box.unit_properties(SERVICE, *names)

    def keeper(self, *names: str) -> dict[str, str]:
        """``systemctl show`` properties of the keeper's unit."""
        return self.box.unit_properties(KEEPER, *names)

    def ensure_active(self) -> None:
        """Start the unit (and the keeper it requires) unless it is active (clearing a
        failed state first)."""
        if self.state()["ActiveState"] == "active":
            return
        self.box.systemctl("reset-failed", SERVICE, KEEPER)
        self.box.systemctl("start", SERVICE).check("systemctl start agent")
        assert self.state()["ActiveState"] == "active", self.box.journal(SERVICE)

    def journal(self, invocation: str | None = None, unit: str = SERVICE) -> list[dict[str, Any]]:
        """Journal entries of the unit (from systemd and from the agent), oldest first."""
        out = self.box.run(["journalctl", "--no-pager", "-o", "json", "-u", unit]).stdout
        entries = []
        for line in out.splitlines():
            entry = json.loads(line)
            msg = entry.get("MESSAGE", "")
            if isinstance(msg, list):  # non-UTF-8 messages come as byte arrays
                entry["MESSAGE"] = bytes(msg).decode(errors="replace")
            inv = entry.get("INVOCATION_ID") or entry.get("_SYSTEMD_INVOCATION_ID")
            if invocation is None or inv == invocation:
                entries.append(entry)
        return entries

    def messages(self, invocation: str | None = None, unit: str = SERVICE) -> list[str]:
        """Journal MESSAGE texts of the unit (of one invocation if given)."""
        return [e["MESSAGE"] for e in self.journal(invocation, unit)]

    def audit(self) -> list[dict[str, Any]]:
        """The agent's audit log, parsed."""
        text = self.box.read_file("/var/log/worker-agent/audit.log").decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def agent(container: nspawn.Container, certs: Certs, timings: Timings) -> Iterator[Agent]:
    """Install the agent as a package would: venv, unit, user, directories, config, certs."""
    box = container
    started = time.monotonic()
    nspawn.install_wheels(box, ["worker-agent"])
    timings.add("install_wheels", started)
    started = time.monotonic()
    box.copy_in(UNIT, "/etc/systemd/system/worker-agent.service")
    box.copy_in(KEEPER_UNIT, f"/etc/systemd/system/{KEEPER}")
    box.copy_in(SYSUSERS, "/usr/lib/sysusers.d/worker-agent.conf")
    box.copy_in(TMPFILES, "/usr/lib/tmpfiles.d/worker-agent.conf")
    box.run(
        "systemd-sysusers worker-agent.conf && systemd-tmpfiles --create worker-agent.conf",
        check=True,
    )
    for name, body in SCRIPTS.items():
        box.write_file(f"{JOB_DIR}/{name}", textwrap.dedent(body), mode=0o755, owner="root:root")
    box.run(["chmod", "0755", JOB_DIR], check=True)
    port = free_port()
    box.write_file(
        "/etc/worker-agent/config.toml", agent_config(port), mode=0o640, owner="root:worker-agent"
    )
    box.write_file("/etc/worker-agent/policy.yaml", POLICY, mode=0o640, owner="root:worker-agent")
    box.copy_in(certs.ca, f"{CERT_DIR}/ca.crt", owner="root:root", mode=0o644)
    box.copy_in(certs.crt("server"), f"{CERT_DIR}/server.crt", owner="root:root", mode=0o644)
    box.copy_in(
        certs.key("server"), f"{CERT_DIR}/server.key", owner="worker-agent:worker-agent", mode=0o600
    )
    box.systemctl("daemon-reload").check("daemon-reload")
    timings.add("install_agent", started)
    installed = Agent(box, port, certs)
    yield installed
    installed.close_clients()


@pytest.fixture
def running(agent: Agent) -> Iterator[Agent]:
    """The agent, active; the test's client channels are closed afterwards."""
    agent.ensure_active()
    yield agent
    agent.close_clients()


# -- helpers -------------------------------------------------------------------------


def poll(what: str, fn: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Call ``fn`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def served_fingerprint(port: int, certs: Certs) -> str:
    """SHA-256 of the server certificate presented on a NEW mTLS connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.crt("client")), str(certs.key("client")))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(crt: Path) -> str:
    """SHA-256 of a PEM certificate file's DER form."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(crt.read_text())).hexdigest()


def stream_until(client: AgentClient, job_id: str, needle: bytes, timeout: float = 20.0) -> bytes:
    """Follow a job's output until ``needle`` appears; return what was read."""
    seen = b""
    for chunk in client.stream(job_id, follow=True, timeout=timeout):
        seen += chunk
        if needle in seen:
            return seen
    raise AssertionError(f"{needle!r} not in the output of {job_id}: {seen!r}")


def output(client: AgentClient, job_id: str) -> str:
    """A finished job's whole output."""
    return b"".join(client.stream(job_id)).decode()


def utc_usec(text: str) -> datetime.datetime:
    """Parse ``systemctl show --timestamp=us+utc`` (``Thu 2024-05-02 10:11:12.123456 UTC``)."""
    return datetime.datetime.strptime(text.split(" ", 1)[1], "%Y-%m-%d %H:%M:%S.%f UTC").replace(
        tzinfo=datetime.timezone.utc
    )


# -- 1. start-up: active only after READY ----------------------------------------------


def test_unit_verifies_with_the_real_binary(agent: Agent) -> None:
    """systemd-analyze verify accepts the installed units, /opt/worker-agent/bin/agent being
    real."""
    for unit in (SERVICE, KEEPER):
        result = agent.box.run(
            ["systemd-analyze", "verify", "--man=no", f"/etc/systemd/system/{unit}"]
        )
        assert result.rc == 0, result
        assert unit not in result.stderr, result.stderr


def test_active_only_after_ready(agent: Agent, timings: Timings) -> None:
    """activating -> active once the listener serves; start returns only then; STATUS shows."""
    box = agent.box
    if agent.state()["ActiveState"] != "inactive":
        box.systemctl("stop", SERVICE).check("stop")
    box.systemctl("reset-failed", SERVICE)

    result: dict[str, Any] = {}

    def start() -> None:
        t0 = time.monotonic()
        result["start"] = box.systemctl("start", SERVICE)
        result["took"] = time.monotonic() - t0

    states: list[str] = []
    thread = threading.Thread(target=start)
    thread.start()
    while thread.is_alive():
        state = box.unit_properties(SERVICE, "ActiveState")["ActiveState"]
        if not states or states[-1] != state:
            states.append(state)
        time.sleep(0.02)
    thread.join()
    assert result["start"].rc == 0, (
        result["start"],
        agent.messages(unit=KEEPER)[-30:],
        agent.messages()[-30:],
    )
    # `systemctl start` returned: a single, immediate mTLS handshake must succeed.
    fingerprint = served_fingerprint(agent.port, agent.certs)
    timings.steps["agent_start"] = round(result["took"], 3)
    assert fingerprint == file_fingerprint(agent.certs.crt("server"))
    assert states[0] in ("inactive", "activating") and "activating" in states, states
    assert "failed" not in states, states
    assert agent.state()["ActiveState"] == "active"

    props = agent.state(
        "InvocationID",
        "ActiveEnterTimestamp",
        "ExecMainStartTimestamp",
        "StatusText",
        "MainPID",
        "NotifyAccess",
        "Type",
    )
    invocation = props["InvocationID"]
    assert (props["Type"], props["NotifyAccess"]) == ("notify", "main")

    # The journal: the agent's "listening on" line comes before systemd's "Started".
    def ordered() -> list[str] | None:
        msgs = agent.messages(invocation)
        listening = [i for i, m in enumerate(msgs) if "listening on" in m]
        started = [i for i, m in enumerate(msgs) if m.startswith("Started ")]
        return msgs if listening and started else None

    msgs = poll("'listening on' and 'Started' in the journal", ordered)
    first_listening = next(i for i, m in enumerate(msgs) if "listening on" in m)
    first_started = next(i for i, m in enumerate(msgs) if m.startswith("Started "))
    assert first_listening < first_started, msgs
    assert f"listening on 127.0.0.1:{agent.port} (mTLS)" in msgs[first_listening]

    # The same order by clock: the agent wrote its agent_start audit record (after
    # binding, before READY=1) between ExecMainStart and ActiveEnter.
    show = box.systemctl(
        "show", "--timestamp=us+utc", "-p", "ActiveEnterTimestamp,ExecMainStartTimestamp", SERVICE
    ).check("show")
    stamps = dict(line.split("=", 1) for line in show.stdout.splitlines() if "=" in line)
    main_start = utc_usec(stamps["ExecMainStartTimestamp"])
    active_enter = utc_usec(stamps["ActiveEnterTimestamp"])
    starts = [
        a
        for a in agent.audit()
        if a["event"] == "agent_start" and a.get("pid") == int(props["MainPID"])
    ]
    assert len(starts) == 1, starts
    audit_start = datetime.datetime.fromisoformat(starts[0]["time"])
    assert main_start <= audit_start <= active_enter, (main_start, audit_start, active_enter)
    timings.steps["exec_to_ready"] = round((active_enter - main_start).total_seconds(), 3)

    # STATUS= from the agent, and its first WATCHDOG=1 (sent as the main loop starts).
    assert props["StatusText"] == "0 jobs running; accepting jobs", props
    poll(
        "a first WATCHDOG=1",
        lambda: (
            agent.state("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] not in ("", "0")
        ),
        timeout=10,
    )


# -- 2. a job over mTLS from the host ----------------------------------------------------


def test_job_runs_over_mtls_from_the_host(running: Agent) -> None:
    """A host client starts a job over mTLS, follows its output live, and sees SUCCEEDED."""
    client = running.client()
    job = client.start("bash", f"{JOB_DIR}/count.sh", args=["from the host"])
    chunks = list(client.stream(job, follow=True, timeout=30))
    status = client.wait(job, timeout=30)
    assert b"".join(chunks).decode() == "hello from the host\nline 1\nline 2\nline 3\n"
    assert (status.state, status.exit_code, status.owner) == ("SUCCEEDED", 0, "client")
    assert status.command == "/usr/bin/bash"
    true_job = client.start("true")
    assert client.wait(true_job, timeout=30).state == "SUCCEEDED"
    events = [(a["event"], a.get("job_id")) for a in running.audit()]
    assert ("job_end", job) in events


# -- 3. reload: rotated certificates, running job untouched -------------------------------


def test_reload_serves_rotated_certificate_and_keeps_jobs(
    running: Agent, rotated: Certs, timings: Timings
) -> None:
    """systemctl reload: new connections get the new certificate; a running job completes."""
    box, certs = running.box, running.certs
    before = running.state("MainPID", "InvocationID")
    old_fp = file_fingerprint(certs.crt("server"))
    new_fp = file_fingerprint(rotated.crt("server"))
    assert served_fingerprint(running.port, certs) == old_fp

    client = running.client()
    job = client.start("bash", f"{JOB_DIR}/gate.sh", args=["reload"])
    stream_until(client, job, b"started\n")
    poll(
        "StatusText with the running job",
        lambda: running.state("StatusText")["StatusText"] == "1 job running; accepting jobs",
    )

    # Replace the files (key first; a mismatched pair in between is rejected and
    # retried by the agent), with no new connection before the reload.
    box.copy_in(
        rotated.key("server"),
        f"{CERT_DIR}/server.key",
        owner="worker-agent:worker-agent",
        mode=0o600,
    )
    box.copy_in(rotated.crt("server"), f"{CERT_DIR}/server.crt", owner="root:root", mode=0o644)
    started = time.monotonic()
    box.systemctl("reload", SERVICE).check("systemctl reload agent")

    # ExecReload= (`agent reload`) returned once the agent had reloaded; its log
    # lines reach the journal asynchronously: poll for them.
    def reload_logged() -> list[str] | None:
        msgs = running.messages(before["InvocationID"])
        done = any("certificates reloaded" in m for m in msgs) and any(
            "policy reloaded" in m for m in msgs
        )
        return msgs if done else None

    msgs = poll("the agent's reload in the journal", reload_logged)
    poll(
        "the new certificate on a new connection",
        lambda: served_fingerprint(running.port, certs) == new_fp,
    )
    timings.add("reload_effective", started)
    reloading = next(i for i, m in enumerate(msgs) if "reloading (SIGHUP)" in m)
    reloaded = next(i for i, m in enumerate(msgs) if "certificates reloaded" in m)
    assert reloading < reloaded, msgs
    assert new_fp[:16] in msgs[reloaded]

    after = running.state("MainPID", "InvocationID", "ActiveState", "SubState", "ReloadResult")
    assert after == {
        **before,
        "ActiveState": "active",
        "SubState": "running",
        "ReloadResult": "success",
    }, after
    # The connection made before the rotation still works; so does a new one.
    assert client.query(job).state == "RUNNING"
    box.run("mkdir -p /run/agent-gates && touch /run/agent-gates/reload", check=True)
    status = client.wait(job, timeout=30)
    assert (status.state, status.exit_code) == ("SUCCEEDED", 0)
    assert output(client, job) == "started\nfinished\n"
    assert running.client().query(job).state == "SUCCEEDED"
    rotations = [a for a in running.audit() if a["event"] == "certificate_rotation"]
    assert rotations and rotations[-1]["fingerprint"].startswith(new_fp[:16])


def test_reload_fails_for_a_rejected_policy_and_succeeds_for_a_good_one(running: Agent) -> None:
    """systemctl reload exits non-zero when the agent rejects the policy, and STATUS says so."""
    box = running.box
    policy = "/etc/worker-agent/policy.yaml"
    before = running.state("MainPID", "InvocationID")
    client = running.client()
    box.write_file(policy, "version: 1\nentries: [", mode=0o640, owner="root:worker-agent")
    try:
        result = box.systemctl("reload", SERVICE)
        assert result.rc != 0, result
        after = running.state("MainPID", "InvocationID", "ActiveState", "SubState", "ReloadResult")
        assert after["ReloadResult"] != "success", after
        assert after == {**before, "ActiveState": "active", "SubState": "running",
                         "ReloadResult": after["ReloadResult"]}  # fmt: skip
        status = running.state("StatusText")["StatusText"]
        assert status.endswith("; last reload rejected: policy (see the log)"), status
        poll(
            "ExecReload='s reason in the journal",
            lambda: any(
                m.startswith("agent reload: rejected: policy: ")
                for m in running.messages(before["InvocationID"])
            ),
        )
        assert client.wait(client.start("true"), timeout=30).state == "SUCCEEDED"  # old policy
    finally:
        box.write_file(policy, POLICY, mode=0o640, owner="root:worker-agent")
    box.systemctl("reload", SERVICE).check("systemctl reload with the good policy")
    after = running.state("MainPID", "ReloadResult", "StatusText")
    assert (after["MainPID"], after["ReloadResult"]) == (before["MainPID"], "success"), after
    assert after["StatusText"].endswith("running; accepting jobs"), after  # no "rejected"


# -- 4. stop: jobs stopped gracefully, unit inactive/success, history kept ------------------


def _open_gate(box: nspawn.Container, name: str) -> None:
    box.run(f"mkdir -p /run/agent-gates && touch /run/agent-gates/{name}", check=True)


def test_restarting_the_agent_keeps_running_jobs(running: Agent) -> None:
    """systemctl restart worker-agent: a new agent process, the same keeper; the job runs
    on and ends with its true status and its whole output."""
    box = running.box
    client = running.client()
    job = client.start("bash", f"{JOB_DIR}/gate.sh", args=["restart"])
    stream_until(client, job, b"started\n")
    agent_pid, keeper_pid = running.state("MainPID")["MainPID"], running.keeper("MainPID")
    running.close_clients()
    box.systemctl("restart", SERVICE).check("systemctl restart agent")
    assert running.state("MainPID")["MainPID"] != agent_pid
    assert running.keeper("MainPID") == keeper_pid
    client = running.client()
    assert client.query(job).state == "RUNNING"
    _open_gate(box, "restart")
    status = client.wait(job, timeout=30)
    assert (status.state, status.exit_code) == ("SUCCEEDED", 0), status
    assert output(client, job) == "started\nfinished\n"


def test_reloading_the_keeper_reexecutes_it_in_place_and_keeps_jobs(running: Agent) -> None:
    """systemctl reload worker-agent-keeper (what the package's upgrade does): the keeper
    re-executes its code as the same process, the job runs on and ends normally."""
    box = running.box
    client = running.client()
    job = client.start("bash", f"{JOB_DIR}/gate.sh", args=["rexec"])
    stream_until(client, job, b"started\n")
    before = running.keeper("MainPID", "InvocationID")
    box.systemctl("reload", KEEPER).check("systemctl reload keeper")
    poll(
        "the keeper's re-exec in the journal",
        lambda: any(
            "re-executed in place" in m for m in running.messages(before["InvocationID"], KEEPER)
        ),
    )
    after = running.keeper("MainPID", "InvocationID", "ActiveState", "ReloadResult")
    assert after == {**before, "ActiveState": "active", "ReloadResult": "success"}, after
    assert client.query(job).state == "RUNNING"
    _open_gate(box, "rexec")
    status = client.wait(job, timeout=30)
    assert (status.state, status.exit_code) == ("SUCCEEDED", 0), status
    assert output(client, job) == "started\nfinished\n"


def test_a_killed_keeper_is_restarted_and_adopts_its_running_job(running: Agent) -> None:
    """kill -9 of the keeper's main process: under KillMode=process systemd kills nothing
    else, the job runs on in its cgroup leaf, systemd restarts the keeper, which adopts
    it with its pipe from the descriptor store: every line written while no keeper ran
    is in the output file, and the end is reported honestly (LOST, exit status unknown:
    the keeper restarted). The ExecStopPost after the crash killed nothing."""
    box = running.box
    client = running.client()
    job = client.start("bash", f"{JOB_DIR}/tick.sh", args=["adopt"])
    stream_until(client, job, b"tick 3\n")
    before = running.keeper("MainPID", "InvocationID", "NRestarts")
    job_pids = box.run(["pgrep", "-f", "tick.sh adopt"]).stdout.split()
    assert job_pids, "the job's process"
    running.close_clients()
    box.run(["kill", "-9", before["MainPID"]], check=True)
    after = poll(
        "the keeper restarted by systemd",
        lambda: (
            p
            if (p := running.keeper("MainPID", "ActiveState", "NRestarts"))["ActiveState"]
            == "active"
            and p["MainPID"] not in ("0", before["MainPID"])
            else None
        ),
        timeout=60,
    )
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert box.run(["kill", "-0", *job_pids]).rc == 0, "the job outlived the keeper"
    poll("the agent active again", lambda: running.state()["ActiveState"] == "active", 60)
    client = running.client()
    st = poll("the job queried", lambda: _query(client, job), timeout=60)
    assert st.state == "RUNNING", st
    msgs = running.messages(unit=KEEPER)
    assert any(f"adopted job {job}" in m and "its pipe kept" in m for m in msgs), msgs
    assert any("left running for the next keeper to adopt" in m for m in msgs), msgs
    _open_gate(box, "adopt")
    status = client.wait(job, timeout=30)
    assert status.state == "LOST", status
    assert status.error_text == "exit status unknown: the keeper restarted", status
    lines = output(client, job).splitlines()
    n = len(lines) - 1
    assert lines == [f"tick {i}" for i in range(1, n + 1)] + [f"done after {n}"], lines
    assert box.run(["pgrep", "-f", "tick.sh adopt"]).rc == 1


def test_a_stop_that_times_out_still_stops_the_jobs(running: Agent) -> None:
    """KillMode=process leaves the jobs when the keeper is SIGKILLed at the end of
    TimeoutStopSec= (here 1 s, shorter than the jobs' stop grace: a TERM-ignoring job is
    still running then); the unit's ExecStopPost (SERVICE_RESULT=timeout: a stop, not a
    crash) kills their cgroups, so stopping the unit still stops every job."""
    box = running.box
    dropin = f"/run/systemd/system/{KEEPER}.d/short-stop.conf"
    box.write_file(dropin, "[Service]\nTimeoutStopSec=1\n")
    box.systemctl("daemon-reload").check("daemon-reload")
    try:
        running.ensure_active()
        client = running.client()
        job = client.start("bash", f"{JOB_DIR}/ignoreterm.sh")
        stream_until(client, job, b"ready\n")
        running.close_clients()
        box.systemctl("stop", KEEPER)
        assert running.keeper("ActiveState")["ActiveState"] in ("inactive", "failed")
        assert box.run(["pgrep", "-f", "ignoreterm.sh"]).rc == 1
        poll(
            "the ExecStopPost's kill in the journal",
            lambda: any(
                "stopped (timeout): killed 1 job cgroup(s) the keeper left" in m
                for m in running.messages(unit=KEEPER)
            ),
            timeout=10,
        )
    finally:
        box.run(["rm", "-f", dropin])
        box.systemctl("daemon-reload")
        box.systemctl("reset-failed", SERVICE, KEEPER)


def _query(client: AgentClient, job: str) -> Any:
    try:
        return client.query(job)
    except Exception:  # the agent is still starting
        return None


def test_stopping_the_keeper_ends_jobs_gracefully_and_history_survives(
    running: Agent, timings: Timings
) -> None:
    """systemctl stop worker-agent-keeper: the agent stops first (Requires=), then the
    keeper TERMs its jobs, KILLs after the grace, keeps their ends and exits 0; the next
    agent records them STOPPED (none LOST)."""
    box = running.box
    invocation = running.keeper("InvocationID")["InvocationID"]
    client = running.client()
    polite = client.start("bash", f"{JOB_DIR}/trapterm.sh")
    stubborn = client.start("bash", f"{JOB_DIR}/ignoreterm.sh")
    for job in (polite, stubborn):
        stream_until(client, job, b"ready\n")  # the traps are set
    running.close_clients()

    started = time.monotonic()
    box.systemctl("stop", KEEPER).check("systemctl stop keeper")
    took = timings.add("keeper_stop_with_jobs", started)
    # (systemd 252 clears ExecMainCode/ExecMainStatus once the unit is inactive.)
    for state in (running.keeper("ActiveState", "SubState", "Result"), running.state(
            "ActiveState", "SubState", "Result")):  # fmt: skip
        assert state == {"ActiveState": "inactive", "SubState": "dead", "Result": "success"}
    assert took >= STOP_GRACE  # the TERM-ignoring job was only KILLed after the grace
    leftovers = box.run(["pgrep", "-a", "-u", "worker-agent"])
    assert leftovers.rc == 1, leftovers.stdout
    msgs = running.messages(invocation, KEEPER)
    assert any("stopping: 2 running job(s)" in m for m in msgs), msgs
    assert any("kept 2 end(s) the agent has not recorded" in m for m in msgs), msgs
    assert "worker-agent-keeper.service: Deactivated successfully." in msgs, msgs
    # Nothing was left for the ExecStopPost's kill: the keeper ended its jobs.
    assert not [m for m in msgs if "Killing process" in m or "remains running" in m], msgs

    started = time.monotonic()
    running.ensure_active()
    timings.add("agent_and_keeper_start", started)
    new_msgs = running.messages(running.state("InvocationID")["InvocationID"])
    assert not [m for m in new_msgs if "LOST" in m], new_msgs
    client = running.client()
    first = client.query(polite)
    assert (first.state, first.exit_code, first.signal) == ("STOPPED", 0, None), first
    text = output(client, polite)
    assert text.startswith("ready\n") and text.endswith("got TERM\n"), text
    second = client.query(stubborn)
    assert (second.state, second.exit_code, second.signal) == ("STOPPED", None, 9), second
    assert "stopped by the job keeper's stop" in second.error_text, second
    listed = {s.job_id: s.state for s in client.list_all(states=["STOPPED"])}
    assert listed.get(polite) == listed.get(stubborn) == "STOPPED"


# -- 5. the sandbox, seen from a job ----------------------------------------------------


DENIED = ("/etc", "/usr", JOB_DIR, "/opt/worker-agent", "/home", "/root", "/var", "/srv", "/run")
# Writable under the unit, but not to a job: Landlock keeps it to its scratch directory
# (tests/systemd_tier/test_deployments.py checks that one).
CONFINED = ("/tmp", "/var/tmp", "/var/lib/worker-agent")
ALLOWED: tuple[str, ...] = ()


def test_jobs_write_only_where_the_unit_allows(running: Agent) -> None:
    """A job cannot write to /etc, /usr, /opt/worker-agent, /home..., nor /tmp or the state."""
    client = running.client()
    jobs = {
        path: client.start("bash", f"{JOB_DIR}/write.sh", args=[path])
        for path in (*DENIED, *CONFINED, *ALLOWED)
    }
    results = {
        path: (client.wait(job, timeout=30), output(client, job)) for path, job in jobs.items()
    }
    for path in (*DENIED, *CONFINED):
        status, text = results[path]
        assert (status.state, status.exit_code) == ("FAILED", 3), (path, status, text)
        assert "Read-only file system" in text or "Permission denied" in text, (path, text)
    for path in ALLOWED:
        status, text = results[path]
        assert (status.state, status.exit_code) == ("SUCCEEDED", 0), (path, status, text)
        assert text == f"wrote {path}\n"
    assert "Read-only file system" in results["/etc"][1]
    assert "Permission denied" in results["/home"][1]


KEEPER_CAPS = 1 << 6 | 1 << 7  # CAP_SETGID, CAP_SETUID


def test_jobs_run_as_agent_without_privileges(running: Agent) -> None:
    """A job runs as user agent: no capabilities, NoNewPrivs=1, seccomp, limits, no PID 1."""
    client = running.client()
    job = client.start("bash", f"{JOB_DIR}/probe.sh")
    status = client.wait(job, timeout=30)
    assert status.state == "SUCCEEDED", status
    fields = {}
    for line in output(client, job).splitlines():
        key, _, value = line.replace(":", "=", 1).partition("=")
        fields[key] = value.strip()
    assert fields["user"] == "worker-agent"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields)
    # The keeper unit's bounding set (CAP_SETUID, CAP_SETGID, for dynamic users): the job
    # holds neither, and no_new_privs keeps any exec from giving them back.
    assert int(fields["CapBnd"], 16) == KEEPER_CAPS, fields
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    assert fields["nofile"] == str(OPEN_FILES)  # [limits.default] via prlimit
    assert fields["pid1"] == "hidden"
    # The agent and the keeper: same user; the agent has no capability, the keeper only
    # CAP_SETUID and CAP_SETGID (ambient), for dynamic users.
    agent_pid, keeper_pid = (
        running.state("MainPID")["MainPID"],
        running.keeper("MainPID")["MainPID"],
    )
    for pid, caps in ((agent_pid, 0), (keeper_pid, KEEPER_CAPS)):
        text = running.box.run(["cat", f"/proc/{pid}/status"]).check("status").stdout
        own = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        assert int(own["CapEff"].strip(), 16) == caps
        assert int(own["CapBnd"].strip(), 16) == caps
        assert int(own["CapAmb"].strip(), 16) == caps
        assert own["NoNewPrivs"].strip() == "1"
        user = running.box.run(["ps", "-o", "user=", "-p", pid]).check("ps").stdout.strip()
        assert user == "worker-agent"


# -- 6. job cgroups under the shipped unit (Delegate=yes) -----------------------------------


def _escapee(client: AgentClient, job: str) -> int:
    seen = stream_until(client, job, b"ready\n")
    return int(next(ln for ln in seen.decode().splitlines() if ln.startswith("pid ")).split()[1])


def _still_running_in(box: nspawn.Container, pid: int, within: float = 10.0) -> str:
    """ "" once ``pid`` is gone from the container (or a zombie), else its status.

    Polled for up to ``within`` seconds: the job's end is reported when its cgroup is
    empty, and the kernel takes a dying process out of its cgroup (cgroup_exit) before
    it becomes a zombie (exit_notify); under load a killed escapee was seen in that
    window. A process that really survived (it ignores SIGTERM and sleeps) is still
    there after the whole wait, and its status says where it is.
    """
    probe = f"test -d /proc/{pid} && ! grep -q '^State:[[:space:]]*Z' /proc/{pid}/status"
    deadline = time.monotonic() + within
    while box.run(["sh", "-c", probe]).rc == 0:
        if time.monotonic() > deadline:
            status = box.run(["sh", "-c", f"cat /proc/{pid}/status /proc/{pid}/cgroup"])
            return status.stdout or "(gone while read)"
        time.sleep(0.2)
    return ""


def _v2(text: str) -> str:
    return next(ln[3:] for ln in text.splitlines() if ln.startswith("0::"))


def _unit_cgroup(box: nspawn.Container) -> str:
    """The unit's cgroup directory in the container (cgroup2: hybrid or unified)."""
    mounts = box.run(["cat", "/proc/self/mounts"]).check("mounts").stdout.splitlines()
    mount = next(m.split()[1] for m in mounts if m.split()[2] == "cgroup2")
    return f"{mount}/system.slice/{KEEPER}"


def test_jobs_run_in_a_delegated_cgroup_leaf(running: Agent) -> None:
    """Delegate=yes on the keeper's unit: the keeper sits in <unit>/supervisor, each job in
    <unit>/jobs/<id>; the agent's unit holds the agent alone."""
    client = running.client()
    job = client.start("bash", f"{JOB_DIR}/cgroup.sh")
    assert client.wait(job, timeout=30).state == "SUCCEEDED"
    assert _v2(output(client, job)) == f"/system.slice/{KEEPER}/jobs/{job}"
    pid = running.keeper("MainPID")["MainPID"]
    own = running.box.run(["cat", f"/proc/{pid}/cgroup"]).check("cgroup").stdout
    assert _v2(own) == f"/system.slice/{KEEPER}/supervisor", own
    pid = running.state("MainPID")["MainPID"]
    own = running.box.run(["cat", f"/proc/{pid}/cgroup"]).check("cgroup").stdout
    assert _v2(own) == f"/system.slice/{SERVICE}", own
    # The leaf is removed once the job is done.
    assert running.box.run(["test", "-e", f"{_unit_cgroup(running.box)}/jobs/{job}"]).rc != 0


def test_escaped_child_is_gone_after_stop_timeout_and_systemctl_stop(running: Agent) -> None:
    """A setsid'd, double-forked, env -i, renamed, TERM-ignoring child: gone every way."""
    box = running.box
    client = running.client()
    job = client.start("bash", f"{JOB_DIR}/escape.sh")
    pid = _escapee(client, job)
    client.stop(job)
    assert client.wait(job, timeout=30).state == "STOPPED"
    assert not (left := _still_running_in(box, pid)), left
    job = client.start("bash", f"{JOB_DIR}/escape.sh", timeout_seconds=2)
    pid = _escapee(client, job)
    assert client.wait(job, timeout=30).state == "TIMED_OUT"
    assert not (left := _still_running_in(box, pid)), left
    job = client.start("bash", f"{JOB_DIR}/escape.sh")
    pid = _escapee(client, job)
    running.close_clients()
    box.systemctl("stop", KEEPER).check("systemctl stop keeper")
    assert not (left := _still_running_in(box, pid)), left
    running.ensure_active()
    assert running.client().query(job).state == "STOPPED"


def test_limits_needing_missing_controllers_are_refused(running: Agent) -> None:
    """Where the container lacks a controller, its limit is FAILED_PRECONDITION naming it."""
    control = f"{_unit_cgroup(running.box)}/jobs/cgroup.subtree_control"
    controllers = set(running.box.run(["cat", control]).check("controllers").stdout.split())
    client = running.client()
    cases = (("memory_bytes", "memory", 64 << 20), ("processes", "pids", 50))
    for name, controller, value in cases:
        if controller in controllers:
            job = client.start("true", limits={name: value})
            assert client.wait(job, timeout=30).state == "SUCCEEDED"
            continue
        with pytest.raises(FailedPrecondition, match=f"{name} needs the {controller} controller"):
            client.start("true", limits={name: value})


# -- journald priorities -----------------------------------------------------------------


def test_journalctl_priority_filter_shows_only_the_agents_errors(running: Agent) -> None:
    """The agent's lines carry syslog priorities: journalctl -p err shows its errors only."""
    box = running.box
    inv = running.state("InvocationID")["InvocationID"]
    box.write_file(
        "/etc/worker-agent/policy.yaml",
        "version: 1\nentries: [",
        mode=0o640,
        owner="root:worker-agent",
    )
    try:
        assert box.systemctl("reload", SERVICE).rc != 0  # rejected: the reload fails
        poll(
            "the rejected reload in the journal",
            lambda: any("policy reload rejected" in m for m in running.messages(inv)),
        )
    finally:
        box.write_file(
            "/etc/worker-agent/policy.yaml", POLICY, mode=0o640, owner="root:worker-agent"
        )
        box.systemctl("reload", SERVICE).check("systemctl reload agent")
    errors = box.run(
        [
            "journalctl",
            "--no-pager",
            "-o",
            "cat",
            "-p",
            "err",
            "-u",
            SERVICE,
            f"_SYSTEMD_INVOCATION_ID={inv}",
        ]
    ).stdout
    assert "policy reload rejected" in errors, errors
    assert "listening on" not in errors and "reloading (SIGHUP)" not in errors, errors
    assert not any(line.startswith("<") for line in errors.splitlines()), errors
    info = box.run(
        [
            "journalctl",
            "--no-pager",
            "-o",
            "cat",
            "-p",
            "info",
            "-u",
            SERVICE,
            f"_SYSTEMD_INVOCATION_ID={inv}",
        ]
    ).stdout
    assert "reloading (SIGHUP)" in info, info
