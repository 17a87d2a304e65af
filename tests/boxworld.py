"""The two deployments of the box suite (tests/test_box.py), each a real agent.

* ``root``: the agent runs as root, jobs as ``nobody`` by default; entries with their own
  user (root without capabilities, ``nobody`` with CAP_NET_BIND_SERVICE).
* ``user``: the agent runs as a system user of its own, made for the run, jobs as that
  user, in a cgroup2 subtree delegated to it (directory and ``cgroup.procs``,
  ``cgroup.subtree_control``, ``cgroup.threads`` chowned, as systemd's ``Delegate=yes``
  does), started inside a leaf of it. The user cannot run the test venv's interpreter
  (pyenv under /root, mode 0700), so it runs the system Python of the same version with
  the venv's site-packages on PYTHONPATH, as bench/targets.py does.

Jobs are ``boxprobe.py`` attacks (tests/box_probes) run by whitelisted ``/usr/bin/python3``
entries, one entry per policy knob, and a small C program for foreign system call ABIs.
Everything stays on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.client import AgentClient
from agent.client.model import JobStatus
from agent.keeper import policy, policyfile

from helpers import AgentProcess, Certs, free_port, make_safe_dir

PROBES = Path(__file__).resolve().parent / "box_probes"
PYTHON = "/usr/bin/python3"  # the whitelisted job interpreter: Debian's, root-owned
# The entry key `syscalls: {allow: [...]}` names these groups.
GROUPS = (
    "namespaces",
    "mount",
    "sysv_ipc",
    "keyring",
    "io_uring",
    "bpf",
    "perf_event",
    "userfaultfd",
    "ptrace",
    "netlink",
    "mqueue",
    "clock",
)
JOB_TIMEOUT = 60.0


def seccomp_keys() -> bool:
    """Whether the policy knows the seccomp layer's entry keys (``udp``, ``syscalls``)."""
    text = json.dumps(
        {
            "version": 1,
            "entries": [
                {
                    "name": "probe",
                    "command": "/bin/true",
                    "udp": True,
                    "syscalls": {"allow": ["namespaces"]},
                }
            ],
        }
    )
    try:
        policyfile.parse(text, "<probe>")
    except policy.PolicyError:
        return False
    return True


# ------------------------------------------------------------------ results


def matches(got: str | None, want: str) -> bool:
    """``want``: ``ok``; ``EPERM`` or ``EPERM|ENOSYS`` (refused with one of these);
    ``!EPERM`` (not refused by a filter: a success or the kernel's own errno)."""
    if got is None:
        return False
    kind, _, detail = got.partition(" ")
    if want == "ok":
        return kind == "ok"
    if want.startswith("!"):
        return kind == "ok" or (kind == "errno" and detail not in want[1:].split("|"))
    return kind == "errno" and detail in want.split("|")


@dataclass(frozen=True)
class Outcome:
    """A finished probe job: its status, output and one result per attack."""

    entry: str
    status: JobStatus
    output: str
    results: dict[str, str] = field(default_factory=dict)

    def detail(self, spec: str) -> str:
        """What an attack that worked reported (``ok DETAIL``)."""
        got = self.results.get(spec, "")
        assert got.startswith("ok "), f"{spec}: {got or 'no result'}\n{self.output}"
        return got[3:]

    def check(self, expected: Mapping[str, str]) -> None:
        """Every attack as expected, the job alive to the end (DONE, exit 0); all
        mismatches reported at once."""
        problems = [
            f"{spec}: expected {want}, got {self.results.get(spec, 'no result')}"
            for spec, want in expected.items()
            if not matches(self.results.get(spec), want)
        ]
        if "DONE" not in self.output.splitlines() or self.status.exit_code != 0:
            problems.append(
                f"the probe did not finish: exit {self.status.exit_code}, "
                f"signal {self.status.signal}, {self.status.error_text!r}"
            )
        assert not problems, (
            f"entry {self.entry!r}:\n  " + "\n  ".join(problems) + f"\n--- output:\n{self.output}"
        )


def parse_results(output: str) -> dict[str, str]:
    """``RESULT <spec> <result...>`` lines -> {spec: result}."""
    out = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            _, spec, result = line.split(" ", 2)
            out[spec] = result
    return out


# ------------------------------------------------------------------ the deployment


@dataclass(frozen=True)
class Ports:
    """Loopback ports named in the policy (listeners owned by the test)."""

    connect: int  # a listener the `net` entry may connect to
    other: int  # a listener nobody may connect to
    bind: int  # free; the `net` entry may bind it
    bind_other: int  # free; nobody may bind it
    low: int  # free, below 1024; the `capbind` entry may bind it (root deployment)
    low_other: int  # free, below 1024 (80 when free); nobody may bind it


@dataclass
class Deployment:
    """A running agent, its probes, and the client that starts them."""

    kind: str  # root | user
    spawn: str  # vfork | fork
    agent: AgentProcess
    client: AgentClient
    probe: Path
    foreign: Path | None
    spool: Path  # parent of the scratch root
    scratch_root: Path
    ports: Ports
    udp_sink: socket.socket
    seccomp: bool

    @property
    def default_entries(self) -> list[str]:
        """Entries with the default box: as the job user, and (root) as root without caps."""
        return ["box", "rootbox"] if self.kind == "root" else ["box"]

    def run(self, entry: str, *specs: str, inline: bool = False) -> Outcome:
        """Run the probe with ``specs`` in ``entry``; wait for it to end."""
        args = ["--inline", *specs] if inline else list(specs)
        st = self.client.run(entry, str(self.probe), args=args, timeout=JOB_TIMEOUT)
        return self.outcome(entry, st)

    def outcome(self, entry: str, st: JobStatus) -> Outcome:
        """The outcome of a job that has ended."""
        assert st.done, f"job {st.job_id} still running after {JOB_TIMEOUT}s"
        out = b"".join(self.client.stream(st.job_id)).decode(errors="replace")
        if "keeper died" in st.error_text:
            # Never expected: the agent's log (the keeper's stderr) says why it died.
            out += "\n--- agent log:\n" + self.agent.log()[-6000:]
        return Outcome(entry, st, out, parse_results(out))

    def start(self, entry: str, *specs: str) -> str:
        """Start the probe and return its job id at once."""
        return self.client.start(entry, str(self.probe), args=list(specs))

    def wait_line(self, job: str, prefix: str, timeout: float = 20.0) -> str:
        """The first output line of a running job that starts with ``prefix``."""
        buf = b""
        for chunk in self.client.stream(job, follow=True, timeout=timeout):
            buf += chunk
            for line in buf.decode(errors="replace").splitlines(keepends=True):
                if line.startswith(prefix) and line.endswith("\n"):
                    return line.strip()
        raise AssertionError(f"job {job} ended without a {prefix!r} line:\n{buf.decode()}")

    def end(self, job: str) -> JobStatus:
        """Stop a job and wait until it is done."""
        self.client.stop(job)
        return self.client.wait(job, timeout=30)


def entries(d: Path, kind: str, ports: Ports, spool: Path, seccomp: bool) -> list[dict[str, Any]]:
    """The policy: one entry per knob, all running the probe (``box`` is the default box)."""

    def probe(name: str, **keys: Any) -> dict[str, Any]:
        return {
            "name": name,
            "command": PYTHON,
            "aliases": [name],
            "scripts": [f"{d}/*.py"],
            "args": {"max_count": 200},
            **keys,
        }

    out = [
        probe("box"),
        probe("net", landlock={"connect_tcp": [ports.connect], "bind_tcp": [ports.bind]}),
        probe("snoop", landlock={"read": [str(spool)]}),
    ]
    if seccomp:
        out.append(probe("udp", udp=True))
        out.append(probe("wide", udp=True, syscalls={"allow": list(GROUPS)}))
        for g in GROUPS:
            # Mounting needs a user and mount namespace of the job's own first.
            allow = ["namespaces", g] if g == "mount" else [g]
            out.append(probe(f"grp-{g}", syscalls={"allow": allow}))
    if kind == "root":
        caps = {"user": "nobody", "capabilities": ["CAP_NET_BIND_SERVICE"]}
        out.append(probe("rootbox", user="root", allow_root=True))
        out.append(probe("capbind", landlock={"bind_tcp": [ports.low]}, **caps))
        out.append(probe("capnobind", **caps))
        out.append(probe("pacct", user="nobody", capabilities=["CAP_SYS_PACCT"]))
    if (d / "foreign").exists():
        out.append(
            {
                "name": "foreign",
                "command": str(d / "foreign"),
                "aliases": ["foreign"],
                "args": {"max_count": 0},
            }
        )
    return out


def _free_low_ports() -> tuple[int, int]:
    """Two free TCP ports below 1024 on 127.0.0.1, the second 80 when free."""
    free = []
    for port in (80, *range(700, 1000)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        free.append(port)
        if len(free) == 2:
            return free[1], free[0]
    raise RuntimeError("no two free ports below 1024")


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def compile_foreign(d: Path) -> Path | None:
    """The C probe for foreign ABIs, built into ``d`` (None without gcc or off x86_64)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = d / "foreign"
    subprocess.run(
        [gcc, "-O2", "-Wall", "-o", str(out), str(PROBES / "foreign.c")],
        check=True,
        capture_output=True,
    )
    os.chmod(out, 0o755)
    return out


# ------------------------------------------------------------------ cgroups and users


def cgroup2_root() -> Path | None:
    """This process's own cgroup in the cgroup2 hierarchy, None without one."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mounts = [ln.split()[4] for ln in f if " - cgroup2 " in ln]
        own = next(
            ln.split(":", 2)[2].strip()
            for ln in Path("/proc/self/cgroup").read_text().splitlines()
            if ln.startswith("0::")
        )
    except (OSError, StopIteration):
        return None
    if not mounts or own.startswith("/.."):
        return None
    return Path(mounts[0]) / own.lstrip("/")


def remove_cgroups(top: Path) -> None:
    """rmdir ``top`` and everything below it, deepest first (only empty ones go)."""
    for parent, dirs, _ in os.walk(top, topdown=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(parent, name))
    with contextlib.suppress(OSError):
        os.rmdir(top)


def delegate(top: Path, uid: int, gid: int) -> tuple[Path, Path]:
    """Delegate ``top`` to ``uid`` as systemd would; (the agent's [cgroups] path, its leaf).

    Moving a job into its leaf needs write access to ``cgroup.procs`` of the common
    ancestor of the agent's and the job's cgroups, here ``top``.
    """
    for sub in ("agent", "jobs"):
        os.mkdir(top / sub, 0o755)
    for f in (top, top / "cgroup.procs", top / "cgroup.subtree_control", top / "cgroup.threads"):
        os.chown(f, uid, gid)
    jobs = top / "jobs"
    for f in (jobs, jobs / "cgroup.procs", jobs / "cgroup.subtree_control"):
        os.chown(f, uid, gid)
    return jobs, top / "agent"


@contextlib.contextmanager
def system_user() -> Iterator[pwd.struct_passwd]:
    """A system user of this run's own (no home, no shell), deleted at the end."""
    name = f"boxag{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def become(pw: pwd.struct_passwd) -> list[str]:
    """Command prefix that runs a program as ``pw`` (for starting the agent only)."""
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]


def user_python(pw: pwd.struct_passwd, spawn: str) -> tuple[str, str] | str:
    """(interpreter, PYTHONPATH) that ``pw`` can run the installed agent with, or why not."""
    python = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    if not os.path.exists(python):
        return f"{python} is missing (the test venv's Python is not readable by other users)"
    paths = sysconfig.get_paths()
    site = os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    mods = "agent.keeper.spawner, grpc" + (", agent.keeper._vspawn" if spawn == "vfork" else "")
    r = subprocess.run(
        [*become(pw), python, "-c", f"import {mods}"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": site, "PYTHONSAFEPATH": "1"},
        cwd="/",
        timeout=60,
    )
    if r.returncode != 0:
        return f"{pw.pw_name} cannot import {mods} with {python}: {r.stderr.strip()[-300:]}"
    return python, site


# ------------------------------------------------------------------ bring-up


@contextlib.contextmanager
def deployment(
    kind: str, spawn: str, certs: Certs, user: pwd.struct_passwd | None
) -> Iterator[Deployment]:
    """Start the ``kind`` deployment's agent on ``spawn``; stop it and remove its files,
    cgroups and listeners at the end. ``user``: the agent's user (``user`` kind)."""
    cg_parent = cgroup2_root()
    if cg_parent is None:
        raise RuntimeError("no cgroup2 hierarchy")
    seccomp = seccomp_keys()
    with contextlib.ExitStack() as stack:
        base = make_safe_dir()
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        probes = base / "probes"
        probes.mkdir(mode=0o755)
        shutil.copyfile(PROBES / "boxprobe.py", probes / "boxprobe.py")
        os.chmod(probes / "boxprobe.py", 0o644)
        foreign = compile_foreign(probes)
        spool = base / "spool"
        spool.mkdir(mode=0o755)
        (spool / "public.txt").write_text("public\n")
        os.chmod(spool / "public.txt", 0o644)
        scratch = spool / "scratch"
        scratch.mkdir(mode=0o711)
        listeners = [_listener(), _listener()]
        for s in listeners:
            stack.callback(s.close)
        low, low_other = _free_low_ports() if kind == "root" else (0, 0)
        ports = Ports(
            connect=listeners[0].getsockname()[1],
            other=listeners[1].getsockname()[1],
            bind=free_port(),
            bind_other=free_port(),
            low=low,
            low_other=low_other,
        )
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stack.callback(sink.close)
        sink.bind(("127.0.0.1", 0))
        cg = cg_parent / f"agent-box-{os.getpid()}-{kind}-{spawn}"
        os.mkdir(cg, 0o755)
        stack.callback(remove_cgroups, cg)
        policy_text = json.dumps(
            {"version": 1, "entries": entries(probes, kind, ports, spool, seccomp)}, indent=1
        )
        workdir = base / "agent"
        env = {"WORKER_AGENT_SPAWN": spawn}
        command: list[str] | None = None
        cgroups: dict[str, Any] = {"mode": "required", "path": str(cg)}
        jobs: dict[str, Any] = {}
        agent_certs = certs
        if kind == "user":
            assert user is not None
            found = user_python(user, spawn)
            if isinstance(found, str):
                raise LookupError(found)
            python, site = found
            uid, gid = user.pw_uid, user.pw_gid
            os.chown(scratch, uid, gid)
            agent_certs = _copy_certs(certs, base / "tls", uid, gid)
            jobs_cg, leaf = delegate(cg, uid, gid)
            cgroups["path"] = str(jobs_cg)
            jobs["run_as_user"] = ""  # jobs run as the agent's own user
            env.update({"PYTHONPATH": site, "HOME": str(workdir)})
            command = [
                "/bin/sh",
                "-c",
                'echo 0 > "$0" && exec "$@"',
                str(leaf / "cgroup.procs"),
                *become(user),
                python,
                "-m",
                "agent",
                "run",
                "--config",
                str(workdir / "config.toml"),
            ]
        agent = AgentProcess(
            workdir,
            agent_certs,
            policy_text,
            env=env,
            confinement={"scratch_dir": str(scratch)},
            cgroups=cgroups,
            jobs=jobs,
        )
        if kind == "user":
            assert user is not None
            os.chmod(workdir, 0o755)
            for f in (agent.config_path, agent.policy_path):
                os.chmod(f, 0o644)
            agent.state.mkdir(mode=0o700)
            os.chown(agent.state, user.pw_uid, user.pw_gid)
        stack.callback(agent.stop)
        agent.start(command=command)
        yield Deployment(
            kind=kind,
            spawn=spawn,
            agent=agent,
            client=agent.client(timeout=30),
            probe=probes / "boxprobe.py",
            foreign=foreign,
            spool=spool,
            scratch_root=scratch,
            ports=ports,
            udp_sink=sink,
            seccomp=seccomp,
        )


def _copy_certs(certs: Certs, dest: Path, uid: int, gid: int) -> Certs:
    """The certificates where the agent's user reaches them; the server key its own."""
    dest.mkdir(mode=0o755)
    for src in certs.dir.iterdir():
        shutil.copyfile(src, dest / src.name)
        os.chmod(dest / src.name, 0o600 if src.suffix == ".key" else 0o644)
    os.chown(dest / "server.key", uid, gid)
    return Certs(dest)
