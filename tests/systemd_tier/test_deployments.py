# ruff: noqa: F811 - the fixtures of test_agent_systemd are imported and used by name
"""Both shipped deployments under a real systemd: what a job can and cannot do in each.

One container for the module. The agent is ``systemd/worker-agent.service`` in both
(the user worker-agent, no capability); the jobs live in its keeper's unit. First
``systemd/worker-agent-keeper.service`` (jobs as ``worker-agent``): hostile jobs try to
read the key, the history and the audit log, to write outside their scratch, to connect
to the agent's own port and to signal the agent or the keeper. Then the same container
switches to ``systemd/worker-agent-keeper-privileged.service`` (the keeper as worker-agent
with CAP_SETUID/CAP_SETGID/CAP_SETPCAP, plus CAP_NET_BIND_SERVICE from a drop-in as
docs/deployment.md says; jobs as per-entry users): a root entry with no capabilities
restarts a test service, a `nobody` entry running the same command cannot; an entry with
CAP_NET_BIND_SERVICE binds a port below 1024, the same program in an entry without it
cannot, nor can the root entry; and no job, root or not, can read the agent's key.
"""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import AgentClient

from . import nspawn
from .test_agent_systemd import (  # noqa: F401 - module fixtures, shared on purpose
    CERT_DIR,
    JOB_DIR,
    REPO,
    SYSUSERS,
    TMPFILES,
    agent_config,
    certs,
    container,
    output,
    poll,
    stream_until,
    wheelhouse,
)
from helpers import Certs, free_port, to_toml

pytestmark = pytest.mark.systemd

AGENT_UNIT = REPO / "systemd" / "worker-agent.service"
UNPRIVILEGED = REPO / "systemd" / "worker-agent-keeper.service"
PRIVILEGED = REPO / "systemd" / "worker-agent-keeper-privileged.service"
SERVICE = "worker-agent.service"
KEEPER = "worker-agent-keeper.service"
TARGET = "agent-test-target.service"
KEY = f"{CERT_DIR}/server.key"

BIND = "import socket,sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1]))); print('BOUND')"
PROBES = {
    "cat.sh": 'cat "$@"\n',
    "write.sh": 'echo written > "$1" && echo WROTE\n',
    "home.sh": 'echo x > "$HOME/f" && echo "SCRATCH $HOME"\n',
    "connect.sh": 'exec 3<>"/dev/tcp/127.0.0.1/$1" && echo CONNECTED\n',
    "kill.sh": 'kill -0 "$1" && echo SIGNALLED\n',
    "restart.sh": f"systemctl restart {TARGET} && echo RESTARTED\n",
    "whoami.sh": 'id -un; grep -E "^Cap(Eff|Bnd)" /proc/self/status\n',
    "bind.sh": f'exec python3 -c "{BIND}" "$1"\n',
    "term.sh": "trap 'echo TERMED; exit 0' TERM; echo READY; while :; do sleep 0.1; done\n",
}
# Every capability set of the job's process, one "Name: hex" line each.
CAPS = "print(''.join(l for l in open('/proc/self/status') if l.startswith('Cap')), end='')"
# What an entry's job may be given must be in the keeper's unit: the drop-in
# docs/deployment.md shows, for the entry with CAP_NET_BIND_SERVICE; and CAP_NET_RAW,
# which no entry names: the keeper drops it at its start.
NET_BIND_DROPIN = (
    "[Service]\n"
    "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_RAW\n"
    "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_RAW\n"
)
# capabilities.NAMES: CAP_SETGID 6, CAP_SETUID 7, CAP_SETPCAP 8, CAP_NET_BIND_SERVICE 10
NET_BIND = 1 << 10
KEEPER_CAPS = 1 << 6 | 1 << 7 | 1 << 8 | NET_BIND
# The seccomp layer under the real units: what the filter answers, and the status line.
FILTERED = (
    "import errno, socket\n"
    "def t(name, f):\n"
    "    try:\n"
    "        f(); print(name, 'ok')\n"
    "    except OSError as e:\n"
    "        print(name, errno.errorcode[e.errno])\n"
    "t('mptcp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262))\n"
    "t('udp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))\n"
    "t('unbound-listen', lambda: socket.socket().listen())\n"
    "s = socket.socket()\n"
    "t('bind', lambda: s.bind(('127.0.0.1', int(__import__('sys').argv[1]))))\n"
    "t('listen-after-bind', lambda: s.listen())\n"
    "st = [l.split()[1] for l in open('/proc/self/status') if l[:8] == 'Seccomp:']\n"
    "print('seccomp', st[0])\n"
)


def _probes_entry(name: str, alias: str, extra: str = "") -> str:
    return textwrap.indent(
        textwrap.dedent(f"""\
            - name: {name}
              command: /bin/bash
              aliases: [{alias}]
              scripts: ["{JOB_DIR}/*.sh"]
            """)
        + textwrap.indent(textwrap.dedent(extra), "  "),
        "  ",
    )


def _low_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on the shared loopback")


class Deployed:
    """The installed agent of one deployment."""

    def __init__(self, box: nspawn.Container, port: int, certs: Certs) -> None:
        self.box, self.port, self.certs = box, port, certs
        self.clients: list[AgentClient] = []

    def client(self) -> AgentClient:
        c = AgentClient(f"127.0.0.1:{self.port}", self.certs.tls("client"), timeout=20.0)
        self.clients.append(c)
        return c

    def run(self, command: str, *args: str) -> tuple[int | None, str]:
        """Start a job, wait for it, return its exit code and output."""
        c = self.client()
        job = c.start(command, args[0] if args else "", args=list(args[1:]))
        st = c.wait(job, timeout=30)
        assert st.done, st
        return st.exit_code, output(c, job)

    def main_pid(self, unit: str = SERVICE) -> str:
        return self.box.unit_properties(unit, "MainPID")["MainPID"]

    def close(self) -> None:
        for c in self.clients:
            c.close()


def _install(
    box: nspawn.Container,
    keeper: Path,
    config: str,
    policy: str,
    certs: Certs,
    port: int,
    dropin: str | None = None,
) -> Deployed:
    """The agent's unit and this deployment's keeper unit (installed under the keeper's
    name, as docs/deployment.md says, with ``dropin`` as its drop-in), started through
    the agent's Requires=."""
    box.systemctl("stop", SERVICE, KEEPER)
    box.copy_in(AGENT_UNIT, "/etc/systemd/system/worker-agent.service")
    box.copy_in(keeper, f"/etc/systemd/system/{KEEPER}")
    box.run(["rm", "-rf", f"/etc/systemd/system/{KEEPER}.d"], check=True)
    if dropin is not None:
        box.run(["mkdir", "-p", f"/etc/systemd/system/{KEEPER}.d"], check=True)
        box.write_file(f"/etc/systemd/system/{KEEPER}.d/caps.conf", dropin, owner="root:root")
    box.write_file("/etc/worker-agent/config.toml", config, mode=0o640, owner="root:worker-agent")
    box.write_file("/etc/worker-agent/policy.yaml", policy, mode=0o640, owner="root:worker-agent")
    box.systemctl("daemon-reload").check("daemon-reload")
    box.systemctl("reset-failed", SERVICE, KEEPER)
    result = box.systemctl("start", SERVICE)
    assert result.rc == 0, box.journal(SERVICE) + box.journal(KEEPER)
    return Deployed(box, port, certs)


@pytest.fixture(scope="module")
def installed(container: nspawn.Container, certs: Certs) -> nspawn.Container:
    """The venv, user, directories, certificates and probe scripts (both deployments)."""
    box = container
    nspawn.install_wheels(box, ["worker-agent"])
    box.copy_in(SYSUSERS, "/usr/lib/sysusers.d/worker-agent.conf")
    box.copy_in(TMPFILES, "/usr/lib/tmpfiles.d/worker-agent.conf")
    box.run(
        "systemd-sysusers worker-agent.conf && systemd-tmpfiles --create worker-agent.conf",
        check=True,
    )
    for name, body in PROBES.items():
        box.write_file(f"{JOB_DIR}/{name}", "#!/bin/bash\n" + body, mode=0o755, owner="root:root")
    box.run(["chmod", "0755", JOB_DIR], check=True)
    box.copy_in(certs.ca, f"{CERT_DIR}/ca.crt", owner="root:root", mode=0o644)
    box.copy_in(certs.crt("server"), f"{CERT_DIR}/server.crt", owner="root:root", mode=0o644)
    box.copy_in(certs.key("server"), KEY, owner="worker-agent:worker-agent", mode=0o600)
    box.write_file(
        f"/etc/systemd/system/{TARGET}",
        "[Service]\nExecStart=/bin/sleep infinity\n",
        mode=0o644,
        owner="root:root",
    )
    box.systemctl("daemon-reload").check("daemon-reload")
    box.systemctl("start", TARGET).check("start the test target")
    return box


@pytest.fixture(scope="module")
def unprivileged(installed: nspawn.Container, certs: Certs) -> Iterator[Deployed]:
    """systemd/worker-agent.service as shipped, the default confinement."""
    port = free_port()
    policy = "version: 1\nentries:\n" + _probes_entry("probe", "bash")
    policy += (
        "  - name: py\n    command: /usr/bin/python3\n    aliases: [py]\n    args: {max_count: 3}\n"
    )
    # The package's setting: each job a uid of its own (docs/deployment.md).
    config = agent_config(port).replace("[jobs]\n", "[jobs]\ndynamic_users = true\n", 1)
    d = _install(installed, UNPRIVILEGED, config, policy, certs, port)
    yield d
    d.close()


@pytest.fixture(scope="module")
def privileged(
    installed: nspawn.Container, certs: Certs, unprivileged: Deployed
) -> Iterator[tuple[Deployed, int]]:
    """systemd/worker-agent-keeper-privileged.service (with the drop-in that lets its
    binder entry have CAP_NET_BIND_SERVICE): jobs as per-entry users."""
    unprivileged.close()
    port, low = free_port(), _low_port()
    # The unprivileged config plus what docs/deployment.md adds for this deployment.
    config = to_toml({"confinement": {"scratch_dir": "/var/lib/worker-agent-scratch"}})
    config += (
        agent_config(port)
        .replace("[jobs]\n", '[jobs]\nrun_as_user = "nobody"\n', 1)
        .replace("[keeper]\n", '[keeper]\nagent_user = "worker-agent"\n', 1)
    )
    python = f"""\
          command: /usr/bin/python3
          args: {{max_count: 3}}
          user: nobody
          landlock: {{bind_tcp: [{low}]}}
    """
    policy = (
        "version: 1\nentries:\n"
        + _probes_entry(
            "restarter",
            "rootbash",
            """\
            user: root
            allow_root: true
            capabilities: []
            landlock: {read: [/run/systemd]}
            """,
        )
        + _probes_entry("nobody-probe", "bash", "landlock: {read: [/run/systemd]}\n")
        + "  - name: binder\n    aliases: [binder]\n    capabilities: [CAP_NET_BIND_SERVICE]\n"
        + textwrap.indent(textwrap.dedent(python), "    ")
        + "  - name: plain\n    aliases: [plain]\n"
        + textwrap.indent(textwrap.dedent(python), "    ")
    )
    d = _install(installed, PRIVILEGED, config, policy, certs, port, NET_BIND_DROPIN)
    yield d, low
    d.close()
    installed.systemctl("stop", SERVICE, KEEPER)


# -- the unprivileged deployment ------------------------------------------------------


@pytest.mark.parametrize(
    "secret", [KEY, "/var/lib/worker-agent/jobs.sqlite3", "/var/log/worker-agent/audit.log"]
)
def test_unprivileged_job_cannot_read_the_agents_files(unprivileged: Deployed, secret: str) -> None:
    """A job (same user as the agent) cannot read the key, the history or the audit log."""
    assert unprivileged.box.run(["test", "-s", secret]).rc == 0
    code, out = unprivileged.run("bash", f"{JOB_DIR}/cat.sh", secret)
    assert code != 0 and "Permission denied" in out, out


def test_unprivileged_job_writes_only_its_scratch(unprivileged: Deployed) -> None:
    """A job writes its scratch directory (HOME) but not /tmp or the state directory."""
    code, out = unprivileged.run("bash", f"{JOB_DIR}/home.sh")
    assert code == 0 and "SCRATCH /tmp/agent-scratch-" in out, out
    for path in ("/tmp/escape", "/var/lib/worker-agent/escape", "/var/tmp/escape"):
        code, out = unprivileged.run("bash", f"{JOB_DIR}/write.sh", path)
        assert "WROTE" not in out and "Permission denied" in out, (path, out)


def test_unprivileged_job_cannot_connect_or_signal(unprivileged: Deployed) -> None:
    """A job cannot connect to the agent's own port, nor signal the agent or the keeper
    (same user: Landlock's signal scope stops it)."""
    code, out = unprivileged.run("bash", f"{JOB_DIR}/connect.sh", str(unprivileged.port))
    assert "CONNECTED" not in out and "Permission denied" in out, out
    for unit in (SERVICE, KEEPER):
        code, out = unprivileged.run("bash", f"{JOB_DIR}/kill.sh", unprivileged.main_pid(unit))
        assert "SIGNALLED" not in out and code != 0, (unit, out)


# A job that looks for another job's command line in /proc, and says who it is.
LOOK = (
    "import os, sys\n"
    "mine = 0\n"
    "for p in os.listdir('/proc'):\n"
    "    try:\n"
    "        line = open(f'/proc/{p}/cmdline', 'rb').read()\n"
    "    except OSError:\n"
    "        continue\n"
    "    if b'MARKER-' + b'SECRET' in line:\n"
    "        print('SAW', p)\n"
    "    if p.isdigit() and int(p) == os.getpid():\n"
    "        mine += 1\n"
    "print('UID', os.getuid(), os.getgid(), 'SELF', mine)\n"
)


def test_unprivileged_jobs_have_their_own_uids_and_cannot_see_each_other(
    unprivileged: Deployed,
) -> None:
    """[jobs] dynamic_users under the shipped keeper unit: a job runs as a uid of the
    default range (60600-61099), not worker-agent; while another job runs with a secret
    in its command line, the job sees its own /proc entry but not the other's
    (ProtectProc=invisible now separates jobs); the keeper's own filter is in force."""
    c = unprivileged.client()
    other = c.start("py", "-c", args=["import time; time.sleep(30)", "MARKER-SECRET"])
    try:
        code, out = unprivileged.run("py", "-c", LOOK)
        words = out.split()
        assert code == 0 and "SAW" not in words and words[-2:] == ["SELF", "1"], out
        uid, gid = int(words[1]), int(words[2])
        assert 60600 <= uid <= 61099 and gid == uid, out
        keeper = unprivileged.box.run(
            [
                "grep",
                "-E",
                "^(Seccomp|NoNewPrivs|CapEff):",
                f"/proc/{unprivileged.main_pid(KEEPER)}/status",
            ]
        ).stdout.split()
        assert keeper == ["CapEff:", "00000000000000c0", "NoNewPrivs:", "1", "Seccomp:", "2"]
    finally:
        c.stop(other)


# A job that tries to talk to the job keeper (same user as the keeper and the agent here).
ATTACH = (
    "import socket\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
    "try:\n"
    "    s.connect('/var/lib/worker-agent/keeper.sock'); s.settimeout(5)\n"
    "    print('GOT', len(s.recv(65536)))\n"
    "except OSError as e:\n"
    "    print('REFUSED', type(e).__name__)\n"
)


def test_unprivileged_job_cannot_talk_to_the_keeper(unprivileged: Deployed) -> None:
    """A job of the keeper's and the agent's own user cannot attach to the keeper: Landlock
    keeps the state directory (and its socket) from it; and were it to connect, the keeper
    would refuse it as its own descendant, in a job cgroup (tests/test_keeper_survival.py)."""
    code, out = unprivileged.run("py", "-c", ATTACH)
    assert out.startswith("REFUSED") or out == "GOT 0\n", out
    # The agent's own attachment is untouched.
    code, out = unprivileged.run("bash", f"{JOB_DIR}/home.sh")
    assert code == 0, out


def test_unprivileged_job_is_filtered(unprivileged: Deployed) -> None:
    """Under the shipped unit the job's seccomp filter is installed: MPTCP, UDP and listen()
    (the entry has no bind_tcp) are refused with EPERM, the bind by Landlock."""
    code, out = unprivileged.run("py", "-c", FILTERED, str(free_port()))
    got = dict(line.split(" ", 1) for line in out.splitlines())
    assert code == 0 and got == {
        "mptcp": "EPERM",
        "udp": "EPERM",
        "unbound-listen": "EPERM",
        "bind": "EACCES",  # Landlock: no bind_tcp
        "listen-after-bind": "EPERM",  # seccomp: no bind_tcp, no listen()
        "seccomp": "2",
    }, out


# -- the privileged deployment ----------------------------------------------------------


def _invocation(box: nspawn.Container) -> str:
    return box.unit_properties(TARGET, "InvocationID")["InvocationID"]


def test_privileged_root_entry_restarts_a_service_and_nobody_cannot(
    privileged: tuple[Deployed, int],
) -> None:
    """A root entry without capabilities restarts the test service; a `nobody` entry
    running the same script cannot."""
    d, _ = privileged
    before = _invocation(d.box)
    code, out = d.run("bash", f"{JOB_DIR}/restart.sh")
    assert "RESTARTED" not in out and code != 0, out
    assert _invocation(d.box) == before
    code, out = d.run("rootbash", f"{JOB_DIR}/restart.sh")
    assert code == 0 and "RESTARTED" in out, out
    assert _invocation(d.box) != before


def test_privileged_capability_entry_binds_a_low_port_and_others_cannot(
    privileged: tuple[Deployed, int],
) -> None:
    """CAP_NET_BIND_SERVICE (ambient, as nobody) binds a port below 1024; the same program
    in an entry without it cannot."""
    d, low = privileged
    code, out = d.run("binder", "-c", BIND, str(low))
    assert code == 0 and "BOUND" in out, out
    code, out = d.run("plain", "-c", BIND, str(low))
    assert "BOUND" not in out and "Permission denied" in out, out


def test_privileged_capability_entry_listens_on_its_port_only_when_bound(
    privileged: tuple[Deployed, int],
) -> None:
    """An entry with bind_tcp [low] (jobs as nobody, CAP_NET_BIND_SERVICE) listens on the
    port it bound; listen() on an unbound socket is refused: the keeper checks it through
    a helper of the job's user, without CAP_SYS_PTRACE (which the unit does not give)."""
    d, low = privileged
    code, out = d.run("binder", "-c", FILTERED, str(low))
    got = dict(line.split(" ", 1) for line in out.splitlines())
    assert code == 0 and got == {
        "mptcp": "EPERM",
        "udp": "EPERM",
        "unbound-listen": "EPERM",
        "bind": "ok",
        "listen-after-bind": "ok",
        "seccomp": "2",
    }, out + "\n" + d.box.journal(KEEPER)[-3000:]


def test_privileged_no_job_reads_the_key(privileged: tuple[Deployed, int]) -> None:
    """Neither the root entry nor the nobody entry can read the agent's key or history."""
    d, _ = privileged
    for command in ("rootbash", "bash"):
        for secret in (KEY, "/var/lib/worker-agent/jobs.sqlite3"):
            code, out = d.run(command, f"{JOB_DIR}/cat.sh", secret)
            assert code != 0 and "Permission denied" in out, (command, secret, out)


def test_privileged_jobs_have_their_entrys_user_and_no_capabilities(
    privileged: tuple[Deployed, int],
) -> None:
    """The root entry's job is root with empty capability sets; the other is nobody."""
    d, _ = privileged
    code, out = d.run("rootbash", f"{JOB_DIR}/whoami.sh")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "root", out
    assert all(int(x.split()[1], 16) == 0 for x in lines[1:]), out
    code, out = d.run("bash", f"{JOB_DIR}/whoami.sh")
    assert code == 0 and out.splitlines()[0] == "nobody", out


def _caps(text: str) -> dict[str, int]:
    """{"CapEff": mask, ...} of /proc/PID/status lines."""
    lines = (line.split(":") for line in text.splitlines() if line[:3] == "Cap")
    return {k: int(v, 16) for k, v in lines}


def test_privileged_keeper_is_not_root_and_holds_only_what_its_jobs_need(
    privileged: tuple[Deployed, int],
) -> None:
    """The keeper runs as worker-agent (not root) holding CAP_SETUID, CAP_SETGID,
    CAP_SETPCAP and the drop-in's CAP_NET_BIND_SERVICE (the one capability its entries
    give), in every set, and nothing else: not the drop-in's CAP_NET_RAW, which no entry
    names (dropped at its start, bounding set included); NoNewPrivileges holds."""
    d, _ = privileged
    status = d.box.run(["cat", f"/proc/{d.main_pid(KEEPER)}/status"], check=True).stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = d.box.run(["id", "-u", "worker-agent"], check=True).stdout.strip()
    assert fields["Uid"].split() == [uid] * 4, status
    assert fields["NoNewPrivs"].strip() == "1", status
    caps = _caps(status)
    assert caps == dict.fromkeys(("CapPrm", "CapEff", "CapBnd", "CapAmb"), KEEPER_CAPS) | {
        "CapInh": KEEPER_CAPS
    }, status
    assert "dropped CAP_NET_RAW" in d.box.journal(KEEPER), d.box.journal(KEEPER)[-3000:]


def test_privileged_entry_capability_reaches_its_job_and_only_it(
    privileged: tuple[Deployed, int],
) -> None:
    """The binder entry's job (nobody) has CAP_NET_BIND_SERVICE in each set, ambient
    included, and nothing else: none of the keeper's three. The plain entry's job (same
    program, same user) has none at all, bounding set included."""
    d, _ = privileged
    code, out = d.run("binder", "-c", CAPS)
    assert code == 0 and _caps(out) == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), NET_BIND
    ), out
    code, out = d.run("plain", "-c", CAPS)
    assert code == 0 and _caps(out) == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0
    ), out


def test_privileged_root_job_cannot_gain_a_capability_its_entry_lacks(
    privileged: tuple[Deployed, int],
) -> None:
    """A root job whose entry lists no capability cannot bind a port below 1024, though
    the keeper holds CAP_NET_BIND_SERVICE: root's exec gets only its bounding set, which
    the keeper cut to the entry's (empty)."""
    d, low = privileged
    code, out = d.run("rootbash", f"{JOB_DIR}/bind.sh", str(low))
    assert code != 0 and "BOUND" not in out and "Permission denied" in out, out


def _active_again(d: Deployed, before: str) -> bool:
    keeper = d.box.unit_properties(KEEPER, "MainPID", "ActiveState")
    agent = d.box.unit_properties(SERVICE, "ActiveState")
    return (
        keeper["ActiveState"] == "active"
        and keeper["MainPID"] not in ("0", before)
        and agent["ActiveState"] == "active"
    )


def test_privileged_adopted_job_of_another_user_is_stopped_with_sigterm(
    privileged: tuple[Deployed, int],
) -> None:
    """A job of the nobody entry outlives a kill -9 of the keeper and is adopted by the
    next one; stopping it then sends SIGTERM through a helper of its user (the keeper,
    worker-agent without CAP_KILL, could not itself), so its TERM trap runs, rather than
    only the SIGKILL of cgroup.kill after the grace."""
    d, _ = privileged
    c = d.client()
    job = c.start("bash", f"{JOB_DIR}/term.sh")
    stream_until(c, job, b"READY\n")
    before = d.main_pid(KEEPER)
    d.box.run(["kill", "-9", before], check=True)
    poll("the keeper restarted and the agent active", lambda: _active_again(d, before), 60)
    c = d.client()

    def adopted() -> bool:
        try:
            return c.query(job).state == "RUNNING"
        except Exception:  # the agent is still attaching to the new keeper
            return False

    poll("the adopted job running", adopted, timeout=60, interval=0.5)
    c.stop(job)
    status = c.wait(job, timeout=30)
    assert status.done, status
    out = output(c, job)
    assert "TERMED" in out, out + "\n" + d.box.journal(KEEPER)[-3000:]
