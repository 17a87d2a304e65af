"""The job box over real gRPC: Landlock from the policy, per-entry users, capabilities.

Every test starts a real agent (root here, jobs as `nobody` unless an entry says
otherwise) whose jobs try what a hostile job would: read the agent's key or history,
write outside their scratch directory, connect where their entry does not allow,
signal the agent, escape through a symlink or a bind mount of their own. A root job
with no capabilities is used where the kernel's user checks alone would let it through
(root owns the key), so what stops it is the confinement under test.
"""

from __future__ import annotations

import os
import shutil
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentClient
from agent.client.model import JobStatus
from agent.daemon import startup
from agent.keeper import capabilities, config, landlock, policy
from agent.keeper.config import Config

from helpers import AgentFactory, AgentProcess, Certs, default_config, make_safe_dir, write_script

# Every test here runs on the C vfork spawn path and on the Python fork fallback.
pytestmark = [
    pytest.mark.skipif(
        landlock.abi_version() < 6 or os.geteuid() != 0,
        reason="needs root and Landlock ABI 6 (scoped signals)",
    ),
    pytest.mark.usefixtures("spawn_path"),
]

PROBES = {
    "cat.sh": 'cat "$@"\n',
    "write.sh": 'echo written > "$1" && echo WROTE\n',
    "connect.sh": 'exec 3<>"/dev/tcp/127.0.0.1/$1" && echo CONNECTED\n',
    "kill.sh": 'kill -0 "$1" && echo SIGNALLED\n',
    "symlink.sh": 'ln -s "$1" "$HOME/link" && cat "$HOME/link"\n',
    "bind.sh": 'unshare -Urm sh -c "mount --bind $1 $HOME && echo MOUNTED"\n',
    "whoami.sh": ('id -u; pwd; echo "HOME=$HOME"; grep -E "^Cap(Eff|Bnd|Amb)" /proc/self/status\n'),
    "touchhome.sh": 'echo x > "$HOME/f" && echo SCRATCH-OK\n',
    "holdhome.sh": 'echo "$HOME"; sleep 5\n',
    "ls.sh": 'ls -a "$1" && echo LISTED\n',
    "note.sh": (
        'echo "note of $$" > "$HOME/note"; chmod 644 "$HOME/note"; echo "$HOME/note"; sleep 10\n'
    ),
    "ownnote.sh": 'echo mine > "$HOME/own" && cat "$HOME/own" && echo OWN-OK\n',
    "mess.sh": (
        'echo "$HOME"; cd "$HOME" || exit 1\n'
        "mkdir -p a/b/c d && echo x > a/b/c/f && echo y > a/f && echo z > d/f || exit 1\n"
        'ln -s "$1" a/b/to-file && ln -s "$2" d/to-dir || exit 1\n'
        "chmod 000 a/b/c/f a/b/c a/b a/f a d/f d . && echo MESSED\n"
    ),
}


@pytest.fixture(scope="module")
def probe_dir() -> Iterator[Path]:
    """Probe scripts in a folder the policy trusts."""
    d = make_safe_dir()
    for name, body in PROBES.items():
        write_script(d, name, "#!/bin/bash\n" + body)
    yield d


def entries(probe_dir: Path, extra: str = "") -> str:
    """A policy: probes as `nobody`, as root without capabilities, and a few more."""
    return textwrap.dedent(f"""\
        version: 1
        entries:
          - name: probe
            command: /bin/bash
            aliases: [bash]
            scripts: ["{probe_dir}/*.sh"]
          - name: rootprobe
            command: /bin/bash
            aliases: [rootbash]
            scripts: ["{probe_dir}/*.sh"]
            user: root
            allow_root: true
        """) + textwrap.indent(textwrap.dedent(extra), "  ")


def run(c: AgentClient, command: str, script: Path, *args: str) -> tuple[JobStatus, str]:
    job = c.start(command, str(script), args=list(args))
    st = c.wait(job, timeout=20)
    assert st.done, st
    return st, b"".join(c.stream(job)).decode(errors="replace")


@pytest.fixture
def box(make_agent: AgentFactory, probe_dir: Path) -> AgentProcess:
    """An agent whose probes may read the whole folder of its own files (the deny list
    must still win) and connect to nothing."""
    a = make_agent(entries(probe_dir))
    return a


def test_job_cannot_read_the_agents_key_even_as_root(box: AgentProcess, probe_dir: Path) -> None:
    """A root job without capabilities (root owns the key) cannot read the TLS key."""
    key = box.certs.key("server")
    assert key.read_bytes()  # readable to root outside the box
    st, out = run(box.client(), "rootbash", probe_dir / "cat.sh", str(key))
    assert st.exit_code != 0 and "PRIVATE KEY" not in out
    assert "Permission denied" in out


def test_read_grant_never_covers_the_agents_files(
    make_agent: AgentFactory, probe_dir: Path, tmp_path: Path, certs: Certs
) -> None:
    """An entry granted read on a tree holding the key, config and history gets the
    rest of the tree, never those (hole punching around the deny list)."""
    other = tmp_path / "public.txt"
    other.write_text("public\n")
    a = make_agent(
        entries(
            probe_dir,
            f"""\
            - name: wide
              command: /bin/bash
              aliases: [widebash]
              scripts: ["{probe_dir}/*.sh"]
              user: root
              allow_root: true
              landlock: {{read: ["{tmp_path}", "{certs.dir}"]}}
            """,
        )
    )
    c = a.client()
    st, out = run(c, "widebash", probe_dir / "cat.sh", str(other))
    assert st.exit_code == 0 and out == "public\n"
    for secret in (a.certs.key("server"), a.state / "jobs.sqlite3", a.config_path, a.policy_path):
        assert secret.exists()
        st, out = run(c, "widebash", probe_dir / "cat.sh", str(secret))
        assert st.exit_code != 0 and "Permission denied" in out, (secret, out)
    st, out = run(c, "widebash", probe_dir / "cat.sh", str(a.state / "audit.log"))
    assert st.exit_code != 0 and "Permission denied" in out


def test_job_cannot_read_other_jobs_output(box: AgentProcess, probe_dir: Path) -> None:
    """A job cannot read another job's output file (the state directory is denied)."""
    c = box.client()
    first = c.start("bash", str(probe_dir / "whoami.sh"))
    c.wait(first, timeout=20)
    out_file = box.state / "output" / f"{first}.out"
    assert out_file.exists()
    st, out = run(c, "rootbash", probe_dir / "cat.sh", str(out_file))
    assert st.exit_code != 0 and "Permission denied" in out


def test_job_writes_only_its_scratch(box: AgentProcess, probe_dir: Path, tmp_path: Path) -> None:
    """A job writes its scratch directory (HOME), nothing else, not even /tmp."""
    c = box.client()
    st, out = run(c, "bash", probe_dir / "touchhome.sh")
    assert st.exit_code == 0 and "SCRATCH-OK" in out
    target = Path("/tmp") / f"agent-escape-{os.getpid()}"
    st, out = run(c, "rootbash", probe_dir / "write.sh", str(target))
    assert "WROTE" not in out and not target.exists()
    st, out = run(c, "rootbash", probe_dir / "write.sh", str(probe_dir / "x.sh"))
    assert "WROTE" not in out and not (probe_dir / "x.sh").exists()


def test_scratch_is_cwd_home_private_and_removed(box: AgentProcess, probe_dir: Path) -> None:
    """The scratch directory is the job's cwd and HOME, 0700 for its user, gone after."""
    c = box.client()
    _st, out = run(c, "bash", probe_dir / "whoami.sh")
    lines = out.splitlines()
    uid, cwd = int(lines[0]), lines[1]
    assert lines[2] == f"HOME={cwd}" and Path(cwd).parent == Path("/tmp/agent-scratch-0")
    assert uid == 65534 and not Path(cwd).exists()


def test_connect_only_to_allowed_ports(make_agent: AgentFactory, probe_dir: Path) -> None:
    """A job connects to the TCP ports its entry lists and to no other."""
    allowed, other = socket.socket(), socket.socket()
    for s in (allowed, other):
        s.bind(("127.0.0.1", 0))
        s.listen()
    pa, po = allowed.getsockname()[1], other.getsockname()[1]
    a = make_agent(
        entries(
            probe_dir,
            f"""\
            - name: net
              command: /bin/bash
              aliases: [netbash]
              scripts: ["{probe_dir}/*.sh"]
              landlock: {{connect_tcp: [{pa}]}}
            """,
        )
    )
    c = a.client()
    st, out = run(c, "netbash", probe_dir / "connect.sh", str(pa))
    assert st.exit_code == 0 and "CONNECTED" in out
    st, out = run(c, "netbash", probe_dir / "connect.sh", str(po))
    assert "CONNECTED" not in out and "Permission denied" in out
    st, out = run(c, "bash", probe_dir / "connect.sh", str(pa))  # default: no TCP at all
    assert "CONNECTED" not in out
    allowed.close()
    other.close()


def test_job_cannot_signal_the_agent(box: AgentProcess, probe_dir: Path) -> None:
    """A root job (same uid as the agent) cannot signal the agent: Landlock's scope."""
    st, out = run(box.client(), "rootbash", probe_dir / "kill.sh", str(box.pid))
    assert "SIGNALLED" not in out and st.exit_code != 0
    assert box.proc is not None and box.proc.poll() is None


def test_symlink_does_not_escape(box: AgentProcess, probe_dir: Path) -> None:
    """A symlink the job makes in its scratch to the key leads to a denied inode."""
    _st, out = run(box.client(), "rootbash", probe_dir / "symlink.sh", str(box.certs.key("server")))
    assert "PRIVATE KEY" not in out and "Permission denied" in out


def test_bind_mount_does_not_escape(box: AgentProcess, probe_dir: Path) -> None:
    """A job cannot bind-mount anything into reach, not even in a user and mount
    namespace of its own (without the box, `nobody` can)."""
    st, out = run(box.client(), "bash", probe_dir / "bind.sh", "/usr")
    assert "MOUNTED" not in out and st.exit_code != 0


def test_root_job_has_no_capabilities_by_default(box: AgentProcess, probe_dir: Path) -> None:
    """A root job without a capability list has empty effective and bounding sets."""
    _st, out = run(box.client(), "rootbash", probe_dir / "whoami.sh")
    assert out.splitlines()[0] == "0"
    caps = dict(line.split(":\t") for line in out.splitlines() if line.startswith("Cap"))
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapBnd"], 16) == 0


BIND = (
    "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); print('BOUND')"
)


def _low_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def test_capability_entry_binds_a_low_port_and_others_cannot(
    make_agent: AgentFactory, probe_dir: Path
) -> None:
    """An entry with CAP_NET_BIND_SERVICE binds a port below 1024 (as nobody, ambient);
    the same program in an entry without it cannot."""
    port = _low_port()
    common = f"""\
          command: /usr/bin/python3
          args: {{max_count: 3}}
          user: nobody
          landlock: {{bind_tcp: [{port}]}}
    """
    a = make_agent(
        entries(
            probe_dir,
            "- name: binder\n  aliases: [binder]\n  capabilities: [CAP_NET_BIND_SERVICE]\n"
            + textwrap.indent(textwrap.dedent(common), "  ")
            + "- name: plain\n  aliases: [plain]\n"
            + textwrap.indent(textwrap.dedent(common), "  "),
        )
    )
    c = a.client()
    st, out = run_exec(c, "binder", "-c", BIND, str(port))
    assert st.exit_code == 0 and "BOUND" in out, out
    st, out = run_exec(c, "plain", "-c", BIND, str(port))
    assert "BOUND" not in out and "Permission denied" in out


def run_exec(c: AgentClient, command: str, path: str, *args: str) -> tuple[JobStatus, str]:
    job = c.start(command, path, args=list(args))
    st = c.wait(job, timeout=20)
    return st, b"".join(c.stream(job)).decode(errors="replace")


def test_entry_needing_a_newer_abi_is_refused(make_agent: AgentFactory, probe_dir: Path) -> None:
    """Capped at ABI 5 (no scoping), the agent refuses to start: one line, the entry."""
    a = make_agent(entries(probe_dir), start=False, confinement={"max_abi": 5})
    a.start(wait=False)
    assert a.proc is not None and a.proc.wait(20) == 2
    line = a.log().strip().splitlines()[-1]
    assert "entry 'probe'" in line and "scope_signals" in line and "ABI 5" in line


def test_no_landlock_kernel_is_refused(make_agent: AgentFactory, probe_dir: Path) -> None:
    """As if the kernel had no Landlock at all: refused, naming the entry."""
    a = make_agent(entries(probe_dir), start=False, confinement={"max_abi": 0})
    a.start(wait=False)
    assert a.proc is not None and a.proc.wait(20) == 2
    assert "entry 'probe': needs Landlock" in a.log()


def test_best_effort_runs_and_logs_what_is_lost(make_agent: AgentFactory, probe_dir: Path) -> None:
    """best_effort on ABI 5: jobs run with the filesystem rules, the log names the loss,
    and the key stays unreadable."""
    a = make_agent(entries(probe_dir), confinement={"max_abi": 5, "landlock": "best_effort"})
    assert "best effort, not enforced: scope_signals" in a.log()
    _st, out = run(a.client(), "rootbash", probe_dir / "cat.sh", str(a.certs.key("server")))
    assert "PRIVATE KEY" not in out
    _st, out = run(a.client(), "rootbash", probe_dir / "kill.sh", str(a.pid))
    assert "SIGNALLED" in out  # what the log said is not enforced


def test_entry_inside_the_agents_files_is_refused(
    make_agent: AgentFactory, probe_dir: Path, tmp_path: Path
) -> None:
    """An entry granting write on the agent's state directory is refused at load."""
    a = make_agent(
        entries(
            probe_dir,
            f"""\
            - name: greedy
              command: /bin/true
              landlock: {{write: ["{tmp_path}/agent0/state"]}}
            """,
        ),
        start=False,
    )
    a.start(wait=False)
    assert a.proc is not None and a.proc.wait(20) == 2
    assert "entry 'greedy': landlock: write:" in a.log()


# --- policy load: the confinement checks, in process -----------------------------------


def _loaded(tmp_path: Path, certs: Certs, policy_text: str, **confinement: Any) -> Config:
    pol = tmp_path / "policy.yaml"
    pol.write_text(policy_text)
    text = default_config("127.0.0.1:1", certs, pol, tmp_path / "state", confinement=confinement)
    return config.parse(text, tmp_path / "config.toml")


def test_old_kernel_refusal_is_one_line_per_entry(
    tmp_path: Path, certs: Certs, probe_dir: Path
) -> None:
    """ABI 3 (Debian 12's 6.1): refused with one line naming the entry and what is missing;
    an entry that relaxes what ABI 3 lacks loads."""
    relaxed = """\
        - name: relaxed
          command: /bin/true
          landlock: {connect_tcp: any, bind_tcp: any, scope_signals: false,
                     scope_abstract_unix: false, defaults: false}
        """
    cfg = _loaded(tmp_path, certs, entries(probe_dir), max_abi=3)
    with pytest.raises(policy.PolicyError) as e:
        startup.load_policy(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "entry 'probe': needs Landlock ABI 6" in msg
    assert "tcp_connect" in msg and "scope_signals" in msg and "kernel has ABI 3" in msg
    cfg = _loaded(
        tmp_path,
        certs,
        "version: 1\nentries:\n" + textwrap.indent(textwrap.dedent(relaxed), "  "),
        max_abi=3,
    )
    pol, warnings = startup.load_policy(cfg)
    assert pol.entries[0].confinement.abi == 3 and not warnings


def test_best_effort_degrades_and_says_what(tmp_path: Path, certs: Certs, probe_dir: Path) -> None:
    """best_effort at ABI 3: each entry loads without what ABI 3 cannot do, one warning
    per entry naming it; at ABI 0 the entries carry no Landlock at all."""
    cfg = _loaded(tmp_path, certs, entries(probe_dir), max_abi=3, landlock="best_effort")
    pol, warnings = startup.load_policy(cfg)
    spec = pol.entries[0].confinement.landlock
    assert spec is not None and spec.connect_tcp is None and not spec.scope_signals
    assert len(warnings) == 2 and "entry 'probe': best effort, not enforced" in warnings[0]
    cfg = _loaded(tmp_path, certs, entries(probe_dir), max_abi=0, landlock="best_effort")
    pol, warnings = startup.load_policy(cfg)
    assert all(e.confinement.landlock is None for e in pol.entries)
    assert "no filesystem confinement at all" in warnings[0]


def test_grant_inside_the_scratch_root_is_refused(tmp_path: Path, certs: Certs) -> None:
    """A grant inside [confinement] scratch_dir is refused at load, one line; a grant of
    its parent loads (the spawner keeps the root itself out of its rules)."""
    parent = make_safe_dir()  # not in the config directory (tmp_path), which is denied
    root = parent / "scratch"
    for grant, refused in ((root / "some-job", True), (root, True), (parent, False)):
        text = f"""\
            version: 1
            entries:
              - name: nosy
                command: /bin/true
                landlock: {{read: ["{grant}"]}}
            """
        cfg = _loaded(tmp_path, certs, textwrap.dedent(text), scratch_dir=str(root))
        if not refused:
            startup.load_policy(cfg)
            continue
        with pytest.raises(policy.PolicyError) as e:
            startup.load_policy(cfg)
        assert "\n" not in str(e.value) and "entry 'nosy': landlock: read:" in str(e.value)
        assert "inside [confinement] scratch_dir" in str(e.value)
    parent.rmdir()


def test_deny_list_names_the_agents_files(tmp_path: Path, certs: Certs, probe_dir: Path) -> None:
    """Keys, config directory, state, output, audit log and pid file are on the deny list."""
    cfg = _loaded(tmp_path, certs, entries(probe_dir))
    deny = startup.deny_paths(cfg)
    for p in (tmp_path, tmp_path / "state", tmp_path / "state" / "audit.log", certs.key("server")):
        assert str(p) in deny


def test_unprivileged_agent_refuses_other_users_and_capabilities(
    tmp_path: Path, certs: Certs, probe_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not root: an entry naming another user, or capabilities, is refused at load."""
    cfg = _loaded(tmp_path, certs, entries(probe_dir))
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(
        policy.PolicyError, match="entry 'rootprobe': user: the job keeper does not run as root"
    ):
        startup.load_policy(cfg)


def test_an_agent_of_a_root_keeper_service_takes_the_entries_users_and_capabilities(
    tmp_path: Path, certs: Certs, probe_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The privileged deployment: the agent is not root, its keeper service is ([keeper]
    agent_user set). The agent's check takes the entries the root keeper can give (the
    keeper checks them against its own uid, and the agent the keeper's uid from its
    hello); without agent_user they are refused as for any unprivileged keeper."""
    pol = tmp_path / "policy.yaml"
    pol.write_text(entries(probe_dir))
    text = default_config(
        "127.0.0.1:1",
        certs,
        pol,
        tmp_path / "state",
        keeper={"mode": "service", "agent_user": "nobody"},
        daemon={"on_shutdown": "keep"},
    )
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    cfg = config.parse(text, tmp_path / "config.toml")
    loaded, _ = startup.load_policy(cfg)
    assert any(e.confinement.uid == 0 for e in loaded.entries)
    cfg = config.parse(text.replace('agent_user = "nobody"\n', ""), tmp_path / "config.toml")
    with pytest.raises(policy.PolicyError, match="the job keeper does not run as root"):
        startup.load_policy(cfg)


def test_capability_names() -> None:
    """Names parse with or without CAP_, any case; unknown and undoing ones are refused."""
    assert capabilities.parse_names(["net_bind_service", "CAP_KILL"]) == ([5, 10], [])
    nums, problems = capabilities.parse_names(["CAP_SYS_PTRACE", "CAP_NOPE"])
    assert nums == [] and len(problems) == 2


def test_scripts_inside_the_config_directory_run_and_nothing_else_there_is_readable(
    certs: Certs,
) -> None:
    """A development layout (config.toml next to the job scripts): the entry's scripts
    run, but the config file, the policy and the other files there stay unreadable."""
    work = make_safe_dir() / "checkout"
    scripts = work / "examples"
    scripts.mkdir(parents=True)
    os.chmod(scripts, 0o755)
    write_script(scripts, "cat.sh", "#!/bin/bash\n" + PROBES["cat.sh"])
    (work / "notes.txt").write_text("operator notes\n")
    policy_text = textwrap.dedent(f"""\
        version: 1
        entries:
          - name: dev
            command: /bin/bash
            aliases: [rootbash]
            scripts: ["{scripts}/*.sh"]
            user: root
            allow_root: true
        """)
    a = AgentProcess(work, certs, policy_text)
    try:
        a.start()
        c = a.client()
        st, out = run(c, "rootbash", scripts / "cat.sh", str(scripts / "cat.sh"))
        assert st.exit_code == 0 and "cat" in out
        for secret in (a.config_path, a.policy_path, work / "notes.txt"):
            st, out = run(c, "rootbash", scripts / "cat.sh", str(secret))
            assert st.exit_code != 0 and "Permission denied" in out, (secret, out)
    finally:
        a.stop()
        shutil.rmtree(work.parent, ignore_errors=True)


def test_job_cannot_write_another_jobs_scratch(box: AgentProcess, probe_dir: Path) -> None:
    """Two jobs of the same user: one cannot write into the other's scratch directory
    (the user's own 0700 directory: only the per-job Landlock rules stop it)."""
    c = box.client()
    holder = c.start("bash", str(probe_dir / "holdhome.sh"))
    home = b""
    for chunk in c.stream(holder, follow=True, timeout=10):
        home += chunk
        if home.endswith(b"\n"):
            break
    target = Path(home.decode().strip()) / "intruder"
    _st, out = run(c, "bash", probe_dir / "write.sh", str(target))
    assert "WROTE" not in out and "Permission denied" in out, out
    assert not target.exists()
    c.stop(holder)


def _first_line(c: AgentClient, job: str) -> str:
    out = b""
    for chunk in c.stream(job, follow=True, timeout=10):
        out += chunk
        if out.endswith(b"\n"):
            break
    return out.decode().strip()


def test_job_reaches_only_its_own_scratch_directory(
    make_agent: AgentFactory, probe_dir: Path
) -> None:
    """Even granted read on the scratch root's parent, a job cannot list the scratch
    root (a root job: the root's owner, so only Landlock stops it) nor read a 0644 file
    in another running job's directory (both jobs nobody: only Landlock stops it); it
    reads and writes its own, and the rest of the parent stays readable."""
    base = make_safe_dir()
    (base / "public.txt").write_text("public\n")
    root = base / "scratch"
    peek = f"""\
        command: /bin/bash
        scripts: ["{probe_dir}/*.sh"]
        landlock: {{read: ["{base}"]}}
    """
    a = make_agent(
        entries(
            probe_dir,
            "- name: peek\n  aliases: [peek]\n"
            + textwrap.indent(textwrap.dedent(peek), "  ")
            + "- name: rootpeek\n  aliases: [rootpeek]\n  user: root\n  allow_root: true\n"
            + textwrap.indent(textwrap.dedent(peek), "  "),
        ),
        confinement={"scratch_dir": str(root)},
    )
    c = a.client()
    try:
        st, out = run(c, "peek", probe_dir / "cat.sh", str(base / "public.txt"))
        assert st.exit_code == 0 and out == "public\n"  # the grant itself works
        st, out = run(c, "peek", probe_dir / "ownnote.sh")
        assert st.exit_code == 0 and "mine\nOWN-OK" in out, out
        holder = c.start("peek", str(probe_dir / "note.sh"))
        note = Path(_first_line(c, holder))
        assert note.parent.parent == root and note.read_text().startswith("note of")
        assert note.stat().st_mode & 0o777 == 0o644 and note.stat().st_uid == 65534
        st, out = run(c, "peek", probe_dir / "cat.sh", str(note))
        assert st.exit_code != 0 and "note of" not in out and "Permission denied" in out, out
        st, out = run(c, "peek", probe_dir / "ls.sh", str(note.parent))
        assert "LISTED" not in out and "note" not in out, out
        for who in ("peek", "rootpeek"):
            st, out = run(c, who, probe_dir / "ls.sh", str(root))
            assert "LISTED" not in out and note.parent.name not in out, (who, out)
            assert "Permission denied" in out, out
        c.stop(holder)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_scratch_is_removed_whatever_the_job_did_to_it(box: AgentProcess, probe_dir: Path) -> None:
    """A job (nobody) that leaves nested files and directories, all mode 000 (its scratch
    directory too), and symlinks to a file and a directory outside: its scratch
    directory is gone once it has ended, and what the links named is untouched."""
    outside = make_safe_dir()
    try:
        (outside / "dir").mkdir()
        (outside / "dir" / "kept").write_text("kept\n")
        (outside / "file").write_text("file\n")
        st, out = run(
            box.client(), "bash", probe_dir / "mess.sh", str(outside / "file"), str(outside / "dir")
        )
        assert st.exit_code == 0 and "MESSED" in out, out
        home = Path(out.splitlines()[0])
        assert home.parent == Path("/tmp/agent-scratch-0")
        assert not home.exists() and not home.is_symlink()
        assert (outside / "file").read_text() == "file\n"
        assert (outside / "dir" / "kept").read_text() == "kept\n"
        assert "not removed" not in box.log()
    finally:
        shutil.rmtree(outside, ignore_errors=True)
