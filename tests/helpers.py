"""Test helpers: real agent processes, certificates, safe script folders.

Nothing here mocks gRPC, TLS or the kernel: an :class:`AgentProcess` is the
real ``python -m agent run`` on a free loopback port with certificates made
by ``scripts/gen_certs.sh``, and clients talk to it over real mTLS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.client import AgentClient, TLSFiles
from agent.keeper import cgroups

ROOT = Path(__file__).resolve().parent.parent


IS_ROOT = os.geteuid() == 0
# The agent's default job cgroups (root and a cgroup2 mount): a dead keeper's jobs are
# adopted by the next keeper; without, they are killed and recorded as lost.
JOB_CGROUPS = IS_ROOT and bool(
    cgroups.parse_cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
)


def vspawn_expected() -> bool:
    """Whether the spawner's C path must be there: it is built, or a compiler could have."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("agent.keeper._vspawn") is not None:
        return True
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Certs:
    """Paths of a generated certificate set."""

    dir: Path

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def tls(self, name: str) -> TLSFiles:
        return TLSFiles(ca=self.ca, cert=self.crt(name), key=self.key(name))

    def creds(self, name: str | None) -> grpc.ChannelCredentials:
        ca = self.ca.read_bytes()
        if name is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.ssl_channel_credentials(
            ca, self.key(name).read_bytes(), self.crt(name).read_bytes()
        )


def gen_certs(out: Path, *extra: str) -> Certs:
    """Run the project's certificate script into ``out``."""
    subprocess.run(
        [str(ROOT / "scripts" / "gen_certs.sh"), "--out", str(out), *extra],
        check=True,
        capture_output=True,
    )
    return Certs(out)


def make_safe_dir(base: Path | None = None) -> Path:
    """A folder that passes the StrictModes check (no group/other-writable parent).

    pytest's tmp folders live under /tmp (world-writable), where the policy
    rightly refuses scripts, so scripts go under /var/lib (as root) or the
    user's cache folder.
    """
    if base is None:
        base = Path("/var/lib/agent-tests") if IS_ROOT else Path.home() / ".cache" / "agent-tests"
    base.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.chmod(base, 0o755)
    d = base / uuid.uuid4().hex[:12]
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


def write_script(folder: Path, name: str, body: str, mode: int = 0o755) -> Path:
    """Write a script file with the given mode."""
    p = folder / name
    p.write_text(textwrap.dedent(body).lstrip())
    os.chmod(p, mode)
    return p


def default_config(
    addr: str, certs: Certs, policy: Path, state: Path, **sections: dict[str, Any]
) -> str:
    """A config.toml for a test agent; ``sections`` override keys."""
    base: dict[str, dict[str, Any]] = {
        "grpc_server": {
            "addr": addr,
            "use_tls": True,
            "crt_file": str(certs.crt("server")),
            "key_file": str(certs.key("server")),
            "ca_file": str(certs.ca),
        },
        "auth": {"clients": ["client", "scheduler"], "admins": ["admin"]},
        "jobs": {
            "policy_file": str(policy),
            "state_dir": str(state),
            "run_as_user": "nobody",
            "stop_grace_seconds": 2.0,
        },
        "retention": {"sweep_seconds": 3600.0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return to_toml(base)


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """Minimal TOML writer for config tables (nested one level for limits)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'

    for name, table in data.items():
        if table is None:
            continue
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in scalars.items()]
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append(f"[{name}.{k}]")
                lines += [f"{kk} = {value(vv)}" for kk, vv in v.items()]
        lines.append("")
    return "\n".join(lines)


class AgentProcess:
    """A real agent process with its own config, state and port."""

    def __init__(
        self,
        workdir: Path,
        certs: Certs,
        policy_text: str,
        *,
        config_text: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        **sections: dict[str, Any],
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o700)
        self.certs = certs
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.state = workdir / "state"
        self.policy_path = workdir / "policy.yaml"
        self.policy_path.write_text(policy_text)
        self.config_path = workdir / "config.toml"
        self.config_path.write_text(
            config_text
            if config_text is not None
            else default_config(self.addr, certs, self.policy_path, self.state, **sections)
        )
        self.log_path = workdir / "agent.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[AgentClient] = []
        # The process group of every start (the first pid of each): the job keeper an
        # agent starts stays in it, and outlives the agent.
        self.pgids: list[int] = []

    # ------------------------------------------------------------ lifecycle

    def start(
        self, *, wait: bool = True, timeout: float = 20.0, command: list[str] | None = None
    ) -> AgentProcess:
        """Start the process; wait until it answers TLS on its port.

        ``command`` replaces ``python -m agent run --config CONFIG`` (a wrapper
        around the agent, for instance).
        """
        env = dict(os.environ)
        env.update(self.env)
        self._ready_count = self.log().count("listening on")
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the child owning it
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(self.workdir),
            start_new_session=True,
        )
        log.close()
        self.pgids.append(self.proc.pid)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until the port accepts connections and the process lives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                if self.log().count("listening on") > getattr(self, "_ready_count", 0):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"agent did not become ready:\n{self.log()}")

    def log(self) -> str:
        """The agent's stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill9(self) -> None:
        """SIGKILL the agent (not its job keeper, nor its jobs)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> AgentProcess:
        """Start again with the same config and state."""
        return self.start()

    def keepers(self) -> list[int]:
        """Pids of the job keepers this agent left or made (alive, not zombies): a keeper
        lives in the process group of the start that made it, whoever its parent is now,
        and names this agent's output folder on its command line (which finds the keeper
        of a --daemon agent too)."""
        groups = set(self.pgids)
        mine = b"\0--output-dir\0" + os.fsencode(str(self._dirs()[1])) + b"\0"
        out = []
        for pid, pgid in _process_groups():
            if not is_spawner(pid) or _is_zombie(pid):
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = b"\0" + f.read()
            except OSError:
                continue
            if pgid in groups or mine in cmdline:
                out.append(pid)
        return out

    def kill_keepers(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL the job keeper(s) (not the agent, nor the jobs); returns their pids
        once they are gone."""
        pids = self.keepers()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(p in pids for p in self.keepers()), timeout)
        return pids

    @property
    def instance(self) -> str:
        """The instance marker of this agent's jobs (``AGENT_INSTANCE``)."""
        from agent.keeper.jobsettings import instance_id

        return instance_id(self._dirs()[0])

    def _dirs(self) -> tuple[Path, Path]:
        """[jobs] state_dir and the output folder, as the config file says."""
        return _jobs_dirs_of(self.config_path, self.state)

    def instance_processes(self) -> list[int]:
        """Pids whose environment carries this agent's ``AGENT_INSTANCE`` marker (its
        jobs and whatever they started without clearing their environment)."""
        return processes_with(f"AGENT_INSTANCE={self.instance}".encode())

    def cleanup(self, timeout: float = 10.0) -> None:
        """After the agent exited: kill what it may have left on purpose or by a crash
        (on_shutdown = "keep", kill -9, a failed start): its job keepers (see
        :meth:`keepers`), then every process carrying its jobs' instance marker. Nothing
        else is signalled."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.kill_keepers(timeout)
        marked = self.instance_processes()
        for pid in marked:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not set(marked) & set(self.instance_processes()), timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # ------------------------------------------------------------ clients

    def client(self, identity: str = "client", **kw: Any) -> AgentClient:
        """A library client with the given certificate identity."""
        c = AgentClient(self.addr, self.certs.tls(identity), **kw)
        self._clients.append(c)
        return c

    def stub(
        self, identity: str | None = "client"
    ) -> contextlib.AbstractContextManager[pb_grpc.WorkerStub]:
        """A raw gRPC stub (context manager closes the channel)."""
        return _stub(self.addr, self.certs, identity)

    def audit_lines(self) -> list[dict[str, Any]]:
        """The audit log, parsed."""
        import json

        p = self.state / "audit.log"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def output_files(self) -> set[str]:
        """Names of job output files (not the keeper's journal of its running jobs, nor a
        previous release's <job id>.keeper: see agent.keeper.keeperfiles)."""
        d = self.state / "output"
        keepers = (".keeper", ".journal", ".tmp")
        return {p.name for p in d.iterdir() if p.suffix not in keepers} if d.exists() else set()


@contextlib.contextmanager
def _stub(addr: str, certs: Certs, identity: str | None) -> Iterator[pb_grpc.WorkerStub]:
    ch = grpc.secure_channel(addr, certs.creds(identity))
    try:
        yield pb_grpc.WorkerStub(ch)
    finally:
        ch.close()


def job_processes(job_id: str) -> list[int]:
    """Pids whose environment carries AGENT_JOB_ID=job_id."""
    return processes_with(f"AGENT_JOB_ID={job_id}".encode())


def processes_with(marker: bytes) -> list[int]:
    """Pids whose environment has the entry ``marker`` (``NAME=value``)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    out.append(int(name))
        except OSError:
            continue
    return out


def _process_groups() -> Iterator[tuple[int, int]]:
    """(pid, pgid) of every process (from /proc)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            yield int(name), int(data[data.rfind(b")") + 2 :].split()[2])
        except (OSError, ValueError, IndexError):
            continue


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rfind(b")") + 2 :][:1] in (b"Z", b"X")


def _jobs_dirs_of(config: Path, default: Path) -> tuple[Path, Path]:
    """([jobs] state_dir, output folder) of a config file (``default`` and its "output"
    if it cannot be read)."""
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
    try:
        with open(config, "rb") as f:
            jobs = tomllib.load(f)["jobs"]
        state = Path(jobs["state_dir"])
        return state, Path(jobs.get("output_dir") or state / "output")
    except (OSError, KeyError, TypeError, ValueError):
        return default, default / "output"


class FakeClock:
    """A clock for pure code that takes one (``clock=``): it reads ``t``, tests move it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def cgroup2_mount() -> Path | None:
    """This machine's cgroup2 mount, as the agent chooses it (None: none, or unreadable)."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    return cgroups.choose_cgroup2_mount(cgroups.parse_cgroup2_mounts(text))


@contextlib.contextmanager
def job_subtree(name: str) -> Iterator[Path]:
    """A job cgroup subtree of the test's own in the cgroup2 mount, named ``name``-<random>
    (whatever is left in it is killed and removed after)."""
    mount = cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    top = mount / f"{name}-{uuid.uuid4().hex[:12]}"
    top.mkdir()
    try:
        yield top
    finally:
        for leaf in cgroups.Subtree(top).leftovers():
            leaf.kill()
            leaf.remove()
        os.rmdir(top)


def wait_for(pred: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``pred`` until truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def is_spawner(pid: int) -> bool:
    """True if ``pid`` is an agent's job keeper (or a bare job spawner) process (False once
    it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"agent.keeper.spawner" in cmdline or b"agent.keeper.keeper" in cmdline


def job_children(agent_pid: int) -> list[int]:
    """The agent's job processes: children of its spawner (and any other child of the agent)."""
    out = []
    for child in children_of(agent_pid):
        out += children_of(child) if is_spawner(child) else [child]
    return out


def children_of(pid: int) -> list[int]:
    """Direct children of a process (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rfind(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(name))
    return out


__all__ = [
    "IS_ROOT",
    "ROOT",
    "AgentProcess",
    "Certs",
    "children_of",
    "default_config",
    "free_port",
    "gen_certs",
    "job_processes",
    "make_safe_dir",
    "pb",
    "pb_grpc",
    "processes_with",
    "to_toml",
    "wait_for",
    "write_script",
]


class SchedulerProcess:
    """A real reference scheduler process (``agent-scheduler serve``)."""

    def __init__(
        self,
        workdir: Path,
        certs: Certs,
        *,
        workers: list[str] | None = None,
        users: list[str] | None = None,
        heartbeat: int = 1,
        expire: float = 3.0,
        port: int | None = None,
        host: str = "127.0.0.1",
        store: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.port = port or free_port()
        self.addr = f"{host}:{self.port}"
        self.config_path = workdir / "scheduler.toml"
        self.config_path.write_text(
            to_toml(
                {
                    "server": {
                        "addr": self.addr,
                        "crt_file": str(certs.crt("scheduler")),
                        "key_file": str(certs.key("scheduler")),
                        "ca_file": str(certs.ca),
                    },
                    "auth": {
                        "workers": workers if workers is not None else ["agent"],
                        "users": users if users is not None else ["admin"],
                    },
                    "registry": {"heartbeat_seconds": heartbeat, "expire_seconds": expire},
                    "agents": {
                        "crt_file": str(certs.crt("scheduler")),
                        "key_file": str(certs.key("scheduler")),
                        "ca_file": str(certs.ca),
                        "call_timeout_seconds": 2.0,
                    },
                    **({"store": store} if store else {}),
                }
            )
        )
        self.log_path = workdir / "scheduler.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "agent.scheduler.cli",
            "serve",
            "--config",
            str(self.config_path),
        ]

    def start(self, timeout: float = 20.0) -> SchedulerProcess:
        before = self.log().count("scheduler listening")
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        wait_for(
            lambda: (
                self.log().count("scheduler listening") > before or self.proc.poll() is not None
            ),
            timeout,
        )
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(
        self, *args: str, identity: str = "admin", timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the user CLI against this scheduler."""
        c = self.certs
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.scheduler.cli",
                "--addr",
                self.addr,
                "--ca",
                str(c.ca),
                "--cert",
                str(c.crt(identity)),
                "--key",
                str(c.key(identity)),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def registration_section(
    sched_addr: str, certs: Certs, advertise: str = "", **extra: Any
) -> dict[str, Any]:
    """A [scheduler] table that registers the agent with ``sched_addr``."""
    d: dict[str, Any] = {
        "addr": sched_addr,
        "register": True,
        "crt_file": str(certs.crt("agent")),
        "key_file": str(certs.key("agent")),
        "ca_file": str(certs.ca),
        "heartbeat_seconds": 1.0,
        "retry_initial_seconds": 0.2,
        "retry_max_seconds": 1.0,
        "call_timeout_seconds": 2.0,
    }
    if advertise:
        d["advertise_addr"] = advertise
    d.update(extra)
    return d


def policy_for(script_dir: Path, extra: str = "") -> str:
    """A policy allowing bash scripts from script_dir plus a few executables."""
    return f"""
version: 1
entries:
  - name: test-scripts
    command: /bin/bash
    aliases: [bash]
    scripts: ["{script_dir}/*.sh"]
    args: {{max_count: 64, max_length: 4096}}
  - name: "true"
    command: /bin/true
    aliases: ["true"]
  - name: sleep
    command: /bin/sleep
    aliases: [sleep]
    args: {{max_count: 1, patterns: ['[0-9.]+']}}
  - name: echo
    command: /bin/echo
    aliases: [echo]
{extra}
"""


# make_agent(**config overrides) -> a started AgentProcess (see conftest.py).
AgentFactory = Callable[..., AgentProcess]


def spawn_spec(argv: list[str], **kw: Any) -> Any:
    """A SpawnSpec of ``argv`` for the spawner tests: no user switch, umask 077, no limits,
    output to nowhere (``stdout_fd=-1``) unless ``kw`` says otherwise."""
    from agent.keeper.spawn import SpawnSpec

    base: dict[str, Any] = {
        "executable": argv[0],
        "env": {"PATH": "/usr/bin:/bin"},
        "cwd": "/",
        "stdout_fd": -1,
        "uid": None,
        "gid": None,
        "umask": 0o077,
        "limits": {},
    }
    base.update(kw)
    return SpawnSpec(argv=argv, **base)


def read_to_end(fd: int) -> bytes:
    """Everything readable from ``fd`` until end of file (the caller closes it)."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def spawn_and_read(ops: Any, spec: Any, timeout: float) -> tuple[int, Any, bytes]:
    """Spawn ``spec`` through ``ops`` with an output pipe; (pid, Exit, its whole output)."""
    import asyncio
    import dataclasses

    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            pid = await ops.spawn(dataclasses.replace(spec, stdout_fd=w), done.set_result)
        finally:
            os.close(w)
        ex = await asyncio.wait_for(done, timeout)
        return pid, ex, read_to_end(r)
    finally:
        os.close(r)
