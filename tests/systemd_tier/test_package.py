"""The Debian package under a real systemd: install, certificates, job, upgrade, revoke, purge.

The steps of docs/deployment.md, in order, in one booted Debian 12 container:
``scripts/build_deb.sh`` on the host (and ``--version`` for the upgrade),
``apt-get install ./worker-agent_*.deb`` inside (no network: the container has
no package lists), per-host certificates from ``agent pki issue`` with an
openssl CA, a job from the host over mTLS, ``agentctl`` with an operator's
certificate, an upgrade to the package of a later version with a job running (it runs
on and ends with its true exit code and whole output), revocation by CRL
and reload, remove and purge. The tests depend on each other's order (one life
cycle).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import agent
from agent.client import AgentClient, TLSFiles, Unauthenticated

from . import nspawn
from .conftest import Timings
from helpers import free_port

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
SERVICE = "worker-agent.service"
KEEPER = "worker-agent-keeper.service"
GATE_SCRIPT = "/usr/local/lib/upgrade-jobs/gate.sh"
HOST = "agent-test.agents.example.com"
CERTS = "/etc/worker-agent/certs"
CONFIG = "/etc/worker-agent/config.toml"
UPGRADE_VERSION = f"{agent.__version__}+rebuild1"

# What docs/deployment.md tells the operator to change in the packaged config.
POLICY = """\
version: 1
entries:
  - name: echo
    command: /bin/echo
    aliases: [echo]
    args: {max_count: 8, max_length: 256}
  - name: gate
    command: /bin/bash
    aliases: [bash]
    scripts: ["/usr/local/lib/upgrade-jobs/gate.sh"]
"""
# A job that outlives the upgrade: a line, a wait for its gate, a line, exit 7.
GATE = """#!/bin/bash
echo before
while [ ! -e /run/upgrade-gate ]; do sleep 0.1; done
echo after
exit 7
"""


def _run(argv: list[str], **kw: object) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{argv}: {r.stdout}{r.stderr}"
    return str(r.stdout)


@dataclass
class Operator:
    """The operator's side on the host: CA, issued files, the packages."""

    dir: Path
    deb: Path
    upgrade: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca"

    def openssl_ca(self, *args: str) -> None:
        _run(["openssl", "ca", "-config", str(self.ca / "ca.cnf"), *args])


def _make_ca(d: Path) -> None:
    """An openssl CA with a database, so that it can revoke and publish CRLs."""
    d.mkdir(parents=True)
    _run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-days", "3650",
         "-subj", "/CN=Fleet CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    )  # fmt: skip
    (d / "index.txt").write_text("")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text(
        f"[ca]\ndefault_ca = ca\n[ca]\ndatabase = {d}/index.txt\ncrlnumber = {d}/crlnumber\n"
        f"certificate = {d}/ca.crt\nprivate_key = {d}/ca.key\ndefault_md = sha256\n"
        "default_crl_days = 30\n"
    )


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory, rootfs: Path, timings: Timings) -> Operator:
    """Build the package (scripts/build_deb.sh), a CA, and the host's certificates."""
    started = time.monotonic()
    d = tmp_path_factory.mktemp("operator")
    dist = d / "dist"
    build = [str(REPO / "scripts" / "build_deb.sh"), "--out", str(dist)]
    deb = Path(_run(build).strip())
    timings.add("build_deb", started)
    # docs/deployment.md, "Build the package": the later version an upgrade installs.
    upgrade = Path(_run([*build, "--version", UPGRADE_VERSION]).strip())
    assert upgrade.name == f"worker-agent_{UPGRADE_VERSION}_{deb.name.rsplit('_', 1)[1]}"
    _make_ca(d / "ca")
    agent = [sys.executable, "-m", "agent", "pki", "issue"]
    ca = ["--ca-cert", str(d / "ca" / "ca.crt"), "--ca-key", str(d / "ca" / "ca.key")]
    # docs/deployment.md, "Issue the host's certificates".
    _run([*agent, *ca, "--host", HOST, "--ip", "127.0.0.1", "--trust-domain", "example.com",
          "--out", str(d / HOST)])  # fmt: skip
    # The scheduler's client certificate (the caller of every agent).
    _run([*agent, *ca, "--host", "scheduler.example.com", "--role", "scheduler",
          "--kind", "client", "--trust-domain", "example.com",
          "--out", str(d / "scheduler")])  # fmt: skip
    # An operator's client certificate, for agentctl.
    _run([*agent, *ca, "--host", "alice", "--role", "operator", "--kind", "client",
          "--trust-domain", "example.com", "--out", str(d / "alice")])  # fmt: skip
    return Operator(d, deb, upgrade)


@pytest.fixture(scope="module")
def box(rootfs: Path, operator: Operator, timings: Timings) -> Iterator[nspawn.Container]:
    started = time.monotonic()
    binds = [nspawn.Bind(operator.deb.parent, "/pkg")]
    with nspawn.Container(rootfs, binds=binds) as b:
        timings.add("boot", started)
        yield b
    assert b.returncode == 0, b.console_tail()


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


def _client(operator: Operator, port: int) -> AgentClient:
    s = operator.dir / "scheduler"
    return AgentClient(
        f"127.0.0.1:{port}",
        TLSFiles(ca=s / "ca.crt", cert=s / "client.crt", key=s / "client.key"),
        timeout=20.0,
    )


def test_install_creates_user_unit_and_conffiles_but_does_not_start(
    box: nspawn.Container, operator: Operator, timings: Timings
) -> None:
    """apt installs offline; the unit is enabled, waits for certificates and says so."""
    started = time.monotonic()
    r = box.run(["apt-get", "install", "-y", f"/pkg/{operator.deb.name}"], timeout=300)
    timings.add("apt_install", started)
    assert r.rc == 0, r.stdout + r.stderr
    assert box.run(["id", "-u", "worker-agent"]).rc == 0
    assert box.systemctl("is-enabled", SERVICE).stdout.strip() == "enabled"
    assert box.systemctl("is-enabled", KEEPER).stdout.strip() == "enabled"
    props = box.unit_properties(SERVICE, "ActiveState", "ConditionResult")
    assert props == {"ActiveState": "inactive", "ConditionResult": "no"}, props
    status = box.systemctl("status", SERVICE).stdout
    assert "start condition failed" in status, status
    assert f"ConditionPathExists={CERTS}/" in status and "was not met" in status, status
    conffiles = box.run(["dpkg-query", "-W", "-f=${Conffiles}", "worker-agent"]).stdout
    for f in (CONFIG, "/etc/worker-agent/policy.yaml", "/etc/logrotate.d/worker-agent"):
        assert f in conffiles
    assert "entries: []" in box.read_file("/etc/worker-agent/policy.yaml").decode()
    assert box.run(["test", "-f", "/usr/share/man/man8/worker-agent.8.gz"]).rc == 0
    assert "check-config" in box.run(["worker-agent", "--help"], check=True).stdout
    stat = box.run(["stat", "-c", "%U:%G %a", CONFIG, "/var/lib/worker-agent"]).stdout
    assert stat.split("\n")[:2] == ["root:worker-agent 640", "worker-agent:worker-agent 750"]


def test_per_host_certificates_start_the_agent_and_a_job_runs(
    box: nspawn.Container, operator: Operator, port: int
) -> None:
    """With the host's pki-issued certificates in place the agent starts; a job runs over mTLS."""
    host = operator.dir / HOST
    for name in ("server.crt", "server.key", "ca.crt"):
        box.copy_in(host / name, f"{CERTS}/{name}")
    operator.openssl_ca("-gencrl", "-out", str(operator.dir / "ca.crl"))
    box.copy_in(operator.dir / "ca.crl", f"{CERTS}/ca.crl", mode=0o644)
    # docs/deployment.md, "Configure": the tmpfiles rule gives the key to the agent.
    box.run("systemd-tmpfiles --create worker-agent.conf", check=True)
    box.run(
        f'sed -i -e \'s/^addr = "0.0.0.0:50051"/addr = "127.0.0.1:{port}"/\' '
        "-e 's|^clients = .*|clients = [\"spiffe://example.com/scheduler/\"]|' "
        "-e 's|^admins = .*|admins = [\"spiffe://example.com/operator/\"]|' "
        "-e 's|^crl_files = .*|crl_files = [\"certs/ca.crl\"]|' " + CONFIG,
        check=True,
    )
    box.write_file("/etc/worker-agent/policy.yaml", POLICY, mode=0o640, owner="root:worker-agent")
    box.write_file(GATE_SCRIPT, GATE, mode=0o755, owner="root:root")
    box.run(["chmod", "0755", "/usr/local/lib/upgrade-jobs"], check=True)
    check = box.run(["worker-agent", "check-config"], user="worker-agent")
    assert check.rc == 0, check.stdout + check.stderr
    box.systemctl("start", SERVICE).check("start")
    assert box.unit_properties(SERVICE)["ActiveState"] == "active", box.journal(SERVICE)
    with _client(operator, port) as c:
        st = c.wait(c.start("echo", "hello fleet"), timeout=20)
        assert st.state == "SUCCEEDED", st
        assert st.owner == "scheduler.example.com"
        box.write_file("/root/first-job", st.job_id)


def _agentctl(operator: Operator, *args: str) -> subprocess.CompletedProcess[str]:
    """agentctl on the operator's side, with the operator's certificate (docs, step 6)."""
    alice = operator.dir / "alice"
    return subprocess.run(
        [str(Path(sys.executable).parent / "agentctl"), "--ca", str(alice / "ca.crt"),
         "--cert", str(alice / "client.crt"), "--key", str(alice / "client.key"),
         "--call-timeout", "10", *args],
        capture_output=True, text=True, timeout=60, cwd=operator.dir,
        env={"PATH": "/usr/bin:/bin", "HOME": str(operator.dir)},
    )  # fmt: skip


def test_agentctl_calls_the_host_with_an_operators_certificate(
    box: nspawn.Container, operator: Operator, port: int
) -> None:
    """agentctl with the operator's certificate (an admin) lists every job; --server-name
    names the host when the address is not in its certificate."""
    job = box.read_file("/root/first-job").decode()
    by_ip = _agentctl(operator, "--addr", f"127.0.0.1:{port}", "list")
    assert by_ip.returncode == 0, by_ip.stderr
    assert job in by_ip.stdout and "scheduler.example.com" in by_ip.stdout
    tunnel = ["--addr", f"localhost:{port}"]
    refused = _agentctl(operator, *tunnel, "list")
    assert refused.returncode == 1, refused
    named = _agentctl(operator, *tunnel, "--server-name", HOST, "status", job)
    assert named.returncode == 0, named.stderr
    assert "SUCCEEDED" in named.stdout


def test_upgrade_keeps_configuration_history_and_running_jobs(
    box: nspawn.Container, operator: Operator, port: int
) -> None:
    """Installing a rebuilt package restarts the agent with the same config, certs and
    history, and re-executes the keeper in place: a job running across the upgrade runs
    on and ends with its true exit code and its whole output."""
    before = hashlib.sha256(box.read_file(CONFIG)).hexdigest()
    job = box.read_file("/root/first-job").decode()
    with _client(operator, port) as c:
        running = c.start("bash", GATE_SCRIPT)
        seen = b""
        for chunk in c.stream(running, follow=True, timeout=20):
            seen += chunk
            if b"before\n" in seen:
                break
    keeper = box.unit_properties(KEEPER, "MainPID", "InvocationID")
    agent_pid = box.unit_properties(SERVICE, "MainPID")["MainPID"]
    r = box.run(["apt-get", "install", "-y", f"/pkg/{operator.upgrade.name}"], timeout=300)
    assert r.rc == 0, r.stdout + r.stderr
    # The same keeper process, running the new code; a new agent.
    assert box.unit_properties(KEEPER, "MainPID", "InvocationID") == keeper
    cmdline = box.read_file(f"/proc/{keeper['MainPID']}/cmdline")
    assert b"--resume-fd" in cmdline, cmdline
    box.wait_unit(SERVICE, ["active"], timeout=30)
    assert box.unit_properties(SERVICE, "MainPID")["MainPID"] != agent_pid
    version = box.run(["dpkg-query", "-W", "-f=${Version}", "worker-agent"]).stdout
    assert version == UPGRADE_VERSION
    assert box.run(["worker-agent", "--version"]).stdout.strip() == f"agent {UPGRADE_VERSION}"
    assert hashlib.sha256(box.read_file(CONFIG)).hexdigest() == before
    box.wait_unit(SERVICE, ["active"], timeout=30)
    with _client(operator, port) as c:
        assert c.query(job).state == "SUCCEEDED"  # history survived
        assert c.query(running).state == "RUNNING"
        box.run(["touch", "/run/upgrade-gate"], check=True)
        st = c.wait(running, timeout=30)
        assert (st.state, st.exit_code) == ("FAILED", 7), st
        assert b"".join(c.stream(running)) == b"before\nafter\n"


def test_revoked_client_is_refused_after_reload(
    box: nspawn.Container, operator: Operator, port: int
) -> None:
    """Revoking the scheduler's certificate in the CRL and reloading refuses it: UNAUTHENTICATED."""
    operator.openssl_ca("-revoke", str(operator.dir / "scheduler" / "client.crt"))
    operator.openssl_ca("-gencrl", "-out", str(operator.dir / "ca.crl"))
    box.copy_in(operator.dir / "ca.crl", f"{CERTS}/ca.crl", mode=0o644)
    box.systemctl("reload", SERVICE).check("reload")
    deadline = time.monotonic() + 20
    while True:
        with _client(operator, port) as c:
            try:
                c.list()
            except Unauthenticated as e:
                assert "revoked" in str(e)
                break
        assert time.monotonic() < deadline, "the revoked client was still accepted"
        time.sleep(0.2)
    audit = box.read_file("/var/log/worker-agent/audit.log").decode()
    assert "revoked-client-cert" in audit


def test_remove_keeps_state_and_purge_removes_it(box: nspawn.Container) -> None:
    """remove stops the agent and keeps config and history; purge deletes them."""
    r = box.run(["apt-get", "remove", "-y", "worker-agent"], timeout=120)
    assert r.rc == 0, r.stdout + r.stderr
    assert box.unit_properties(SERVICE)["ActiveState"] == "inactive"
    assert box.unit_properties(KEEPER)["ActiveState"] == "inactive"
    kept = box.run(["ls", CONFIG, f"{CERTS}/server.key", "/var/lib/worker-agent/jobs.sqlite3"])
    assert kept.rc == 0, kept.stderr
    assert box.run(["test", "-e", "/opt/worker-agent"]).rc == 1
    r = box.run(["apt-get", "purge", "-y", "worker-agent"], timeout=120)
    assert r.rc == 0, r.stdout + r.stderr
    for path in ("/etc/worker-agent", "/var/lib/worker-agent", "/var/log/worker-agent"):
        assert box.run(["test", "-e", path]).rc == 1, path
