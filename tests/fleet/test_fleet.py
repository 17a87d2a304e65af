"""A fleet on one machine: a scheduler and agents on separate hosts (netns).

Every host is a network namespace with its own address; every agent has its
own certificate for its own address and its own worker identity; the
scheduler runs on a host of its own. Everything the test does goes through
the command-line tools, run inside the hosts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns import Fleet, available
from helpers import ROOT, Certs, default_config, gen_certs, policy_for, to_toml

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

SCHED_PORT = 50001
AGENT_PORT = 50000
WORKERS = ["w1", "w2", "w3"]


def _host_certs(base: Certs, out: Path, ip: str, agent_name: str) -> Certs:
    """Certificates for one host, signed by the fleet's CA, for its own address."""
    out.mkdir(mode=0o700)
    for f in ("ca.crt", "ca.key"):
        shutil.copy(base.dir / f, out / f)
    os.chmod(out / "ca.key", 0o600)
    subprocess.run(
        [
            str(ROOT / "scripts" / "gen_certs.sh"),
            "--out",
            str(out),
            "--host",
            ip,
            "--agent-name",
            agent_name,
        ],
        check=True,
        capture_output=True,
    )
    (out / "ca.key").unlink()  # hosts never need the CA's key
    return Certs(out)


class Host:
    """A process of ours inside a fleet host."""

    def __init__(self, fleet: Fleet, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log_path = log
        with open(log, "ab") as f:
            self.proc = fleet.popen(name, argv, stdout=f, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    ok, why = available()
    if not ok:
        pytest.skip(why)
    with Fleet(["sched", *WORKERS, "w4"]) as f:
        yield f


def test_fleet_registration_dispatch_cut_and_heal(
    fleet: Fleet, tmp_path: Path, script_dir: Path
) -> None:
    """Agents on three hosts register with a scheduler on a fourth, run jobs,
    are noticed when cut off (calls fail fast), and come back with their history."""
    base = gen_certs(tmp_path / "base")
    sched_ip = fleet.addr("sched")
    sched_certs = _host_certs(base, tmp_path / "sched-certs", sched_ip, "unused")
    admin = [
        "--ca",
        str(base.ca),
        "--cert",
        str(base.crt("admin")),
        "--key",
        str(base.key("admin")),
    ]

    def sched_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return fleet.run(
            "sched",
            [
                sys.executable,
                "-m",
                "agent.scheduler.cli",
                "--addr",
                f"{sched_ip}:{SCHED_PORT}",
                "--call-timeout",
                "8",
                *admin,
                *args,
            ],
            timeout=timeout,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def workers() -> dict[str, dict[str, str]]:
        r = sched_cli("workers", "--json")
        assert r.returncode == 0, r.stderr
        return {w["address"].split(":")[0]: w for w in json.loads(r.stdout)}

    # ---- agents first, on their own hosts; the scheduler is not up yet
    agents: dict[str, Host] = {}
    for i, host in enumerate([*WORKERS, "w4"], 1):
        ip = fleet.addr(host)
        name = "evil-worker" if host == "w4" else f"worker-{i}"
        certs = _host_certs(base, tmp_path / f"{host}-certs", ip, name)
        work = tmp_path / host
        work.mkdir(mode=0o700)
        policy = work / "policy.yaml"
        policy.write_text(policy_for(script_dir))
        cfg = work / "config.toml"
        text = default_config(f"{ip}:{AGENT_PORT}", certs, policy, work / "state")
        text += "\n" + to_toml(
            {
                "scheduler": {
                    "addr": f"{sched_ip}:{SCHED_PORT}",
                    "register": True,
                    "advertise_addr": f"{ip}:{AGENT_PORT}",
                    "crt_file": str(certs.crt("agent")),
                    "key_file": str(certs.key("agent")),
                    "ca_file": str(certs.ca),
                    "heartbeat_seconds": 1.0,
                    "retry_initial_seconds": 0.2,
                    "retry_max_seconds": 2.0,
                    "call_timeout_seconds": 2.0,
                }
            }
        )
        cfg.write_text(text)
        agents[host] = Host(
            fleet,
            host,
            [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
            work / "agent.log",
        )
    for host, a in agents.items():
        _wait(lambda a=a: "listening on" in a.log(), 30, f"agent on {host}")
        _wait(lambda a=a: "cannot register" in a.log(), 30, f"{host} retrying")
    # an agent serves although its scheduler is down: a direct call from another host
    direct = fleet.run(
        "sched",
        [
            sys.executable,
            "-m",
            "agent.client.cli",
            "--addr",
            f"{fleet.addr('w1')}:{AGENT_PORT}",
            "--ca",
            str(base.ca),
            "--cert",
            str(base.crt("client")),
            "--key",
            str(base.key("client")),
            "start",
            "--wait",
            "echo",
            "up",
        ],
        timeout=60,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert direct.returncode == 0 and direct.stdout == "up\n", direct.stderr

    # ---- the scheduler comes up on its own host
    sched_cfg = tmp_path / "scheduler.toml"
    sched_cfg.write_text(
        to_toml(
            {
                "server": {
                    "addr": f"{sched_ip}:{SCHED_PORT}",
                    "crt_file": str(sched_certs.crt("scheduler")),
                    "key_file": str(sched_certs.key("scheduler")),
                    "ca_file": str(base.ca),
                },
                "auth": {"workers": ["worker-1", "worker-2", "worker-3"], "users": ["admin"]},
                "registry": {"heartbeat_seconds": 1, "expire_seconds": 3.0},
                "agents": {
                    "crt_file": str(sched_certs.crt("scheduler")),
                    "key_file": str(sched_certs.key("scheduler")),
                    "ca_file": str(base.ca),
                    "call_timeout_seconds": 2.0,
                },
            }
        )
    )
    sched = Host(
        fleet,
        "sched",
        [sys.executable, "-m", "agent.scheduler.cli", "serve", "--config", str(sched_cfg)],
        tmp_path / "scheduler.log",
    )
    _wait(lambda: "scheduler listening" in sched.log(), 30, "scheduler")
    _wait(lambda: len(workers()) == 3, 30, "three registrations")
    registered = workers()
    for i, host in enumerate(WORKERS, 1):
        w = registered[fleet.addr(host)]
        assert w["identity"] == f"worker-{i}"
        assert w["address"] == f"{fleet.addr(host)}:{AGENT_PORT}"
    # the worker whose identity the scheduler does not allow is refused
    assert fleet.addr("w4") not in registered
    _wait(lambda: "registration refused" in agents["w4"].log(), 10, "w4 refused")
    assert "evil-worker" in sched.log()

    # ---- a job on every worker, through the scheduler's CLI
    finished: dict[str, str] = {}
    for host in WORKERS:
        wid = registered[fleet.addr(host)]["worker_id"]
        r = sched_cli("run", "--worker", wid, "--wait", "echo", f"hello-{host}")
        assert r.returncode == 0, r.stderr
        assert "SUCCEEDED" in r.stderr
        finished[host] = r.stdout.strip()

    # ---- cut w2 off the network
    w2 = registered[fleet.addr("w2")]["worker_id"]
    fleet.cut("w2")
    t0 = time.monotonic()
    r = sched_cli("status", "--worker", w2, finished["w2"])
    elapsed = time.monotonic() - t0
    assert r.returncode == 1
    assert "deadline exceeded" in r.stderr or "unavailable" in r.stderr, r.stderr
    assert elapsed < 8, f"a call to a cut worker took {elapsed:.1f} s"
    # direct calls from another host fail fast too, with the client's deadline
    t0 = time.monotonic()
    d = fleet.run(
        "sched",
        [
            sys.executable,
            "-m",
            "agent.client.cli",
            "--call-timeout",
            "2",
            "--addr",
            f"{fleet.addr('w2')}:{AGENT_PORT}",
            "--ca",
            str(base.ca),
            "--cert",
            str(base.crt("client")),
            "--key",
            str(base.key("client")),
            "list",
        ],
        timeout=60,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert d.returncode == 1 and ("deadline exceeded" in d.stderr or "unavailable" in d.stderr)
    assert time.monotonic() - t0 < 8
    # the scheduler notices: w2 stops renewing and is forgotten
    _wait(lambda: fleet.addr("w2") not in workers(), 20, "the scheduler to forget w2")
    assert "stopped renewing" in sched.log()
    r = sched_cli("status", "--worker", w2, finished["w2"])
    assert r.returncode == 1 and "not registered: last heard from" in r.stderr
    # the others keep working meanwhile
    w1 = registered[fleet.addr("w1")]["worker_id"]
    assert sched_cli("run", "--worker", w1, "--wait", "true").returncode == 0

    # ---- the link returns: w2 registers again, same id, history intact
    fleet.restore("w2")
    _wait(lambda: fleet.addr("w2") in workers(), 30, "w2 to register again")
    assert workers()[fleet.addr("w2")]["worker_id"] == w2
    r = sched_cli("status", "--worker", w2, "--json", finished["w2"])
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["state"] == "SUCCEEDED" and st["path"] == "hello-w2"
    assert "registering again" in agents["w2"].log() or "reachable again" in agents["w2"].log()

    # ---- a fan-out over every allowed identity; w2 is cut while its job runs
    r = sched_cli(
        "run", "--select", "id:worker-*", "--detach", "--", "bash", f"{script_dir}/sleep.sh", "4"
    )
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()

    def hosts() -> dict[str, dict[str, object]]:
        shown = sched_cli("run-show", "--json", run_id)
        assert shown.returncode == 0, shown.stderr
        return {h["address"].split(":")[0]: h for h in json.loads(shown.stdout)["hosts"]}

    assert len(hosts()) == 3
    _wait(lambda: hosts()[fleet.addr("w2")]["state"] == "RUNNING", 20, "w2's job to run")
    fleet.cut("w2")
    f = sched_cli("run-follow", run_id, timeout=120)
    fleet.restore("w2")
    assert f.returncode == 3, f.stderr
    assert "ok 2 failed 0 not-started 0 unreachable 1" in f.stderr
    final = hosts()
    assert final[fleet.addr("w2")]["state"] == "UNREACHABLE"
    assert "lost after start" in str(final[fleet.addr("w2")]["error"])
    assert final[fleet.addr("w1")]["state"] == final[fleet.addr("w3")]["state"] == "SUCCEEDED"
    assert f"[{fleet.addr('w1')}:{AGENT_PORT}] finished" in f.stdout
    _wait(lambda: fleet.addr("w2") in workers(), 30, "w2 to register again after the run")

    # ---- shutdown: agents deregister
    agents["w3"].proc.terminate()
    assert agents["w3"].proc.wait(30) == 0
    _wait(lambda: fleet.addr("w3") not in workers(), 10, "w3 to deregister")
    for a in agents.values():
        if a.proc.poll() is None:
            a.proc.terminate()
            a.proc.wait(30)
    sched.proc.terminate()
    sched.proc.wait(30)
