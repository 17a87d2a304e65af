"""What the bench measures against, each started and stopped here.

* :class:`Agent`: a real agent (``PYTHON -m agent run --config ...``, the
  installed package) with its own certificates, config, policy and state
  folder, for one :class:`Mode`: the bench's own configuration (``root``,
  ``user``) or the repository's ``config.toml`` as shipped (``shipped``),
  each with its jobs in per-job cgroups below a :class:`BenchCgroup`;
* :class:`Peer`: a worker speaking the original protocol, already running
  (``--peer-addr``) or started and stopped by the bench (``--peer-cmd``),
  with :class:`StubScheduler` for a peer that must register first (the
  original worker exits when it cannot);
* :class:`BareServer`: a grpcio server that only answers an empty unary
  method (``bench.bare``), the cost of a call with no work behind it.

Every target offers ``name``, ``addr``, ``pid`` (None when unknown) and
``client_spec()``: how a client process connects to it. The floor needs no
server; it is a workload (``bench.workloads.floor``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.keeper import landlock
from bench.interp import Interpreter, env
from bench.output import note

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
SHIPPED = ROOT / "config.toml"  # the repository's configuration, as shipped


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gen_certs(out: Path) -> None:
    """The project's own certificate script."""
    subprocess.run(
        [str(ROOT / "scripts" / "gen_certs.sh"), "--out", str(out)], check=True, capture_output=True
    )
    os.chmod(out, 0o755)  # certificates world-readable, keys stay 0600


def mtls_spec(addr: str, certs: Path, identity: str = "client") -> dict[str, Any]:
    """Client spec for a server that wants our client certificate."""
    return {
        "addr": addr,
        "tls": "mtls",
        "ca": str(certs / "ca.crt"),
        "cert": str(certs / f"{identity}.crt"),
        "key": str(certs / f"{identity}.key"),
    }


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM, wait; SIGKILL if it does not stop. The exit status, None if killed."""
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


def _wait_port(
    proc: subprocess.Popen[bytes] | None,
    addr: str,
    timeout: float,
    log: Path | None,
    ready: str = "",
) -> None:
    """Until ``addr`` accepts TCP (and ``ready`` is in the log); raise if the process dies."""
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + timeout

    def text() -> str:
        return log.read_text(errors="replace") if log and log.exists() else ""

    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{addr}: server exited with {proc.returncode}:\n{text()}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.2):
            if not ready or ready in text():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{addr}: not ready within {timeout}s:\n{text()}")


def policy_text(head: str) -> str:
    """/bin/true, /bin/sleep N and ``head -c N /dev/zero`` (the streaming writer)."""
    return f"""version: 1
entries:
  - name: "true"
    command: /bin/true
    args: {{max_count: 0}}
  - name: sleep
    command: /bin/sleep
    args: {{max_count: 1, patterns: ['[0-9]{{1,4}}']}}
  - name: writer
    command: {head}
    args: {{max_count: 3, patterns: ['-c', '[0-9]{{1,12}}', '/dev/zero']}}
"""


def config_of(mode: Mode, addr: str, cgroup: Path | None, metrics_port: int) -> dict[str, Any]:
    """The agent's configuration for ``mode``, as a TOML document (nested dicts).

    ``root`` and ``user``: the defaults except ``max_running = 1000`` (no
    resource limits). ``shipped``: the repository's config.toml parsed as it is,
    with only what the bench must change: the listener, the certificate paths,
    the policy and state folder, a free loopback metrics port, and the cgroup
    path when the shipped ``auto`` finds no subtree (``cgroup`` given).
    With ``cgroup`` the bench's own configurations require job cgroups there.
    """
    tls = {"crt_file": "tls/server.crt", "key_file": "tls/server.key", "ca_file": "tls/ca.crt"}
    if mode.key == "shipped":
        doc: dict[str, Any] = tomllib.loads(SHIPPED.read_text())
        doc.setdefault("grpc_server", {}).update({"addr": addr, "use_tls": True, **tls})
        sch = doc.setdefault("scheduler", {})
        # Not registering; its client identity only has to exist.
        sch.update({"register": False, "ca_file": "tls/ca.crt"})
        sch.update({k: f"tls/agent.{k[:3]}" for k in ("crt_file", "key_file") if k in sch})
        doc.setdefault("jobs", {}).update({"policy_file": "policy.yaml", "state_dir": "state"})
        if doc.get("metrics", {}).get("enabled"):
            doc["metrics"]["addr"] = f"127.0.0.1:{metrics_port}"
        if cgroup is not None:
            doc.setdefault("cgroups", {})["path"] = str(cgroup)
        return doc
    doc = {
        "grpc_server": {"addr": addr, "use_tls": True, **tls},
        "auth": {"clients": ["client"], "admins": ["admin"]},
        "jobs": {
            "policy_file": "policy.yaml",
            "state_dir": "state",
            "run_as_user": mode.job_user,
            "max_running": 1000,
        },
    }
    if cgroup is not None:
        doc["cgroups"] = {"mode": "required", "path": str(cgroup)}
    return doc


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def toml_text(doc: dict[str, Any], prefix: str = "") -> str:
    """``doc`` as TOML: scalars first, then one ``[table]`` per nested dict."""
    head = [f"{k} = {_toml_value(v)}\n" for k, v in doc.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]\n"] if prefix and head else []) + head
    for k, v in doc.items():
        if isinstance(v, dict):
            out.append("\n" + toml_text(v, f"{prefix}.{k}" if prefix else k))
    return "".join(out)


@dataclass
class Mode:
    """One agent configuration under test."""

    key: str
    label: str
    agent_uid: int
    agent_gid: int
    agent_user: str
    job_user: str

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a program as the agent's user."""
        if self.agent_uid == os.geteuid():
            return []
        return [
            "setpriv",
            f"--reuid={self.agent_uid}",
            f"--regid={self.agent_gid}",
            "--clear-groups",
            "--",
        ]

    @property
    def home(self) -> str:
        """HOME for processes run as the agent's user."""
        return "/" if self.agent_uid != os.geteuid() else os.environ.get("HOME", "/")


def make_modes(keys: list[str], user: str) -> list[Mode]:
    """The requested modes that this process can run."""
    me = pwd.getpwuid(os.geteuid())
    out = []
    for k in keys:
        if k in ("root", "shipped") and not IS_ROOT:
            note(f"mode {k!r} skipped: the bench is not running as root")
            continue
        if k == "root":
            out.append(
                Mode(
                    "root",
                    f"agent as root, jobs as {user} (the spawner switches user)",
                    0,
                    0,
                    "root",
                    user,
                )
            )
        elif k == "user":
            pw = pwd.getpwnam(user) if IS_ROOT else me
            out.append(
                Mode(
                    "user",
                    f"agent as {pw.pw_name}, jobs as {pw.pw_name} (no user switch)",
                    pw.pw_uid,
                    pw.pw_gid,
                    pw.pw_name,
                    pw.pw_name,
                )
            )
        elif k == "shipped":
            shipped = tomllib.loads(SHIPPED.read_text())
            job_user = shipped.get("jobs", {}).get("run_as_user", "nobody")
            out.append(
                Mode(
                    "shipped",
                    f"config.toml as shipped (agent as root, jobs as {job_user})",
                    0,
                    0,
                    "root",
                    job_user,
                )
            )
        else:
            raise SystemExit(f"bench: unknown mode {k!r} (root, user, shipped)")
    return out


class BenchCgroup:
    """A cgroup v2 the bench makes below its own, one child per agent mode; removed at the end.

    ``root``/``shipped``: the agent makes its subtree ``<mode>/<instance>``
    itself. ``user`` (an unprivileged agent): ``<mode>`` is delegated to the
    agent's user the way systemd delegates a unit's cgroup (the directory and
    its ``cgroup.procs``, ``cgroup.subtree_control`` and ``cgroup.threads``
    chowned), the agent is started inside ``<mode>/agent`` and its jobs live
    below ``<mode>/jobs``: moving a job into its leaf needs write access to the
    ``cgroup.procs`` of the common ancestor, here ``<mode>``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkdir(path, 0o755)

    @staticmethod
    def make() -> BenchCgroup | None:
        """Below the bench's own cgroup in the cgroup2 mount; None when that cannot be had."""
        if not IS_ROOT:
            return None
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
        base = Path(mounts[0]) / own.lstrip("/")
        try:
            return BenchCgroup(base / f"agent-bench-{os.getpid()}")
        except OSError as e:
            note(f"no bench cgroup below {base}: {e.strerror}; jobs run as cgroups auto decides")
            return None

    def for_mode(self, mode: Mode, name: str = "") -> tuple[Path, Path | None]:
        """(the ``[cgroups] path`` of ``mode``'s agent, the leaf the agent must start in);
        ``name``: the cgroup's own name when one mode has several agents (default the
        mode's key)."""
        d = self.path / (name or mode.key)
        os.mkdir(d, 0o755)
        if mode.agent_uid == 0:
            return d, None
        for sub in ("agent", "jobs"):
            os.mkdir(d / sub, 0o755)
        for f in (d, d / "cgroup.procs", d / "cgroup.subtree_control", d / "cgroup.threads"):
            os.chown(f, mode.agent_uid, mode.agent_gid)
        for f in (d / "jobs", d / "jobs" / "cgroup.procs", d / "jobs" / "cgroup.subtree_control"):
            os.chown(f, mode.agent_uid, mode.agent_gid)
        return d / "jobs", d / "agent"

    def remove(self) -> None:
        """rmdir every cgroup below (deepest first) and itself; only empty ones go."""
        for top, dirs, _ in os.walk(self.path, topdown=False):
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(top, d))
        try:
            os.rmdir(self.path)
        except OSError as e:
            note(f"bench cgroup {self.path} not removed: {e.strerror}")


class Agent:
    """A real agent process for one mode.

    ``variant`` and ``overrides``: a second agent of the same mode whose configuration
    differs only by ``overrides`` (``{section: {key: value}}``, set over the mode's own),
    in its own folder and cgroup named ``MODE-VARIANT`` (the ``seccomp`` step's agent
    with ``[confinement] seccomp = false``).
    """

    name = "agent"

    def __init__(
        self,
        mode: Mode,
        base: Path,
        certs: Path,
        interp: Interpreter,
        head: str,
        cgroup: BenchCgroup | None = None,
        variant: str = "",
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.mode = mode
        self.interp = interp
        self.certs = certs
        self.cgroup = cgroup
        self.variant = variant
        self.overrides = overrides or {}
        self.key = f"{mode.key}-{variant}" if variant else mode.key
        self.dir = base / self.key
        self.dir.mkdir(mode=0o755)
        os.chmod(self.dir, 0o755)
        tls = self.dir / "tls"
        tls.mkdir(mode=0o755)
        for name, perm in (
            ("ca.crt", 0o644),
            ("server.crt", 0o644),
            ("server.key", 0o600),
            ("agent.crt", 0o644),
            ("agent.key", 0o600),
        ):
            shutil.copyfile(certs / name, tls / name)
            os.chmod(tls / name, perm)
        state = self.dir / "state"
        state.mkdir(mode=0o700)
        if mode.agent_uid != os.geteuid():
            for key in ("server.key", "agent.key"):
                os.chown(tls / key, mode.agent_uid, mode.agent_gid)
            os.chown(state, mode.agent_uid, mode.agent_gid)
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        policy = self.dir / "policy.yaml"
        policy.write_text(policy_text(head))
        os.chmod(policy, 0o644)
        self.config = self.dir / "config.toml"
        self.leaf: Path | None = None
        self.cgroup_path: Path | None = None
        # The shipped configuration keeps its own [cgroups] (auto) unless that
        # finds no subtree (see start); the bench's own require one.
        if cgroup is not None and mode.key != "shipped":
            self.cgroup_path, self.leaf = cgroup.for_mode(mode, self.key)
        self.metrics_port = free_port()
        self.write_config()
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        """config.toml for this mode (see :func:`config_of`)."""
        doc = config_of(self.mode, self.addr, self.cgroup_path, self.metrics_port)
        for section, values in self.overrides.items():
            doc.setdefault(section, {}).update(values)
        self.doc = doc
        self.config.write_text(toml_text(doc))
        os.chmod(self.config, 0o644)

    def start(self, timeout: float = 30.0) -> None:
        """Start the installed agent and wait until it serves TLS.

        A shipped configuration whose ``[cgroups] mode = "auto"`` finds no
        subtree is restarted once with the bench's cgroup as its path.
        """
        self._start(timeout)
        if (
            self.mode.key == "shipped"
            and self.cgroup is not None
            and self.cgroup_path is None
            and "jobs run without cgroups" in self.log_path.read_text(errors="replace")
        ):
            note("shipped config: cgroups auto found no subtree; restarting with the bench's")
            self.stop()
            self.cgroup_path, self.leaf = self.cgroup.for_mode(self.mode, self.key)
            self.write_config()
            self._start(timeout)

    def _start(self, timeout: float) -> None:
        # An unprivileged agent starts in its delegated leaf: a root shell
        # joins it, then execs the user switch and the agent.
        join = (
            ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(self.leaf / "cgroup.procs")]
            if self.leaf is not None
            else []
        )
        with open(self.log_path, "ab") as log:
            # cwd is the agent's own folder and PYTHONPATH carries no source
            # tree: ``-m agent`` is the package installed in the interpreter.
            self.proc = subprocess.Popen(
                [
                    *join,
                    *self.mode.prefix,
                    *self.interp.argv,
                    "-m",
                    "agent",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.dir),
                env=env(self.interp.sitepath, self.mode.home),
                start_new_session=True,
            )
        _wait_port(self.proc, self.addr, timeout, self.log_path, ready="listening on")

    def box(self) -> dict[str, Any]:
        """Which parts of the job box are in force: read from /proc of a running job.

        A ``sleep 30`` job: its cgroup (a leaf of its own below the agent's
        subtree?), user, cwd (the scratch directory), no_new_privs and open-file
        limit; Landlock from the kernel's ABI and the config's ``[confinement]``
        (``required``, the default, refuses to start an entry it cannot enforce;
        ``best_effort`` warnings are looked for in agent.log).
        """
        ch, stub = self.stub()
        out: dict[str, Any] = {}
        try:
            job = stub.StartJob(pb.StartJobReq(command="/bin/sleep", path="30"), timeout=30).jobID
            try:
                deadline = time.monotonic() + 10
                pid = 0
                while time.monotonic() < deadline:
                    pid = stub.QueryJob(pb.QueryJobReq(jobID=job), timeout=10).pid
                    with contextlib.suppress(OSError):
                        if pid and os.readlink(f"/proc/{pid}/exe").endswith("sleep"):
                            break
                    time.sleep(0.02)
                out.update(_proc_box(pid, self.pid, job))
            finally:
                stub.StopJob(pb.StopJobReq(jobID=job), timeout=30)
                stub.WaitJob(pb.WaitJobReq(jobID=job, waitMillis=30_000), timeout=35)
        finally:
            ch.close()
        conf = self.doc.get("confinement", {})
        log = self.log_path.read_text(errors="replace")
        abi = landlock.effective_abi(conf.get("max_abi") if conf.get("max_abi", -1) >= 0 else None)
        out["landlock_abi"] = abi
        out["landlock"] = (
            "off (kernel has none)"
            if abi == 0
            else f"ABI {abi}, {conf.get('landlock', 'required')}"
            + (", some rules NOT enforced" if "best effort, not enforced" in log else "")
        )
        out["seccomp_config"] = conf.get("seccomp", True)
        out["cgroups_config"] = dict(self.doc.get("cgroups", {"mode": "auto"}))
        out["limits_config"] = self.doc.get("limits", {})
        out["metrics"] = bool(self.doc.get("metrics", {}).get("enabled"))
        return out

    @property
    def pid(self) -> int:
        """The agent's process id (it must be running)."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not stop."""
        return _stop(self.proc, timeout)

    def client_spec(self, identity: str = "client") -> dict[str, Any]:
        """mTLS with the client (or admin) certificate."""
        return {**mtls_spec(self.addr, self.certs, identity), "warmup": "list"}

    def stub(self, identity: str = "client") -> tuple[grpc.Channel, pb_grpc.WorkerStub]:
        """A channel and stub in this process (for set-up calls, not for load)."""
        creds = grpc.ssl_channel_credentials(
            (self.certs / "ca.crt").read_bytes(),
            (self.certs / f"{identity}.key").read_bytes(),
            (self.certs / f"{identity}.crt").read_bytes(),
        )
        ch = grpc.secure_channel(self.addr, creds)
        return ch, pb_grpc.WorkerStub(ch)  # type: ignore[no-untyped-call]

    def python_of_process(self) -> str:
        """The libpython / executable the running agent really uses."""
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
            with open(f"/proc/{self.pid}/maps", encoding="ascii", errors="replace") as f:
                libs = {line.split()[-1] for line in f if "libpython" in line}
        except OSError:
            return "?"
        return exe + (f" ({', '.join(sorted(libs))})" if libs else "")


def _proc_box(pid: int, agent_pid: int, job_id: str) -> dict[str, Any]:
    """The box of a running job, as /proc shows it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cg = Path(f"/proc/{pid}/cgroup").read_text()
        agent_cg = Path(f"/proc/{agent_pid}/cgroup").read_text()
        agent_status = Path(f"/proc/{agent_pid}/status").read_text()
        cwd = os.readlink(f"/proc/{pid}/cwd")
        limits = Path(f"/proc/{pid}/limits").read_text()
    except OSError as e:
        return {"error": f"job {pid}: {e.strerror}"}

    def unified(text: str) -> str:
        return next((ln[3:] for ln in text.splitlines() if ln.startswith("0::")), "?")

    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    nnp = re.search(r"^NoNewPrivs:\s+(\d)", status, re.M)
    nofile = re.search(r"^Max open files\s+(\S+)", limits, re.M)

    def filters(text: str) -> int:
        """How many seccomp filters bind a process (0 unless in filter mode, 2)."""
        mode = re.search(r"^Seccomp:\s+(\d)", text, re.M)
        n = re.search(r"^Seccomp_filters:\s+(\d+)", text, re.M)
        return int(n.group(1)) if mode and n and mode.group(1) == "2" else 0

    job_cg = unified(cg)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return {
        # Its own leaf, named by the job id, not the agent's cgroup.
        "cgroup_per_job": job_cg.rstrip("/").endswith(job_id) and job_cg != unified(agent_cg),
        "job_cgroup": job_cg,
        "job_user": user,
        "job_uid": uid,
        "scratch_dir": cwd,
        "no_new_privs": bool(nnp and nnp.group(1) == "1"),
        # The filters the box added: the job's beyond those binding the agent itself.
        "seccomp_filters": filters(status) - filters(agent_status),
        "open_files_limit": nofile.group(1) if nofile else None,
    }


class _Scheduler(pb_grpc.SchedulerServicer):
    def RegisterWorker(self, request: pb.RegisterReq, context: Any) -> pb.RegisterRes:
        return pb.RegisterRes(success=True, workerID=str(uuid.uuid4()))

    def DeregisterWorker(self, request: pb.DeregisterReq, context: Any) -> pb.DeregisterRes:
        return pb.DeregisterRes(success=True)


class StubScheduler:
    """A plaintext Scheduler that accepts every registration (for ``--peer-scheduler``)."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        # No SO_REUSEPORT: with another listener on the port (a stale stub, a real
        # scheduler) the worker would register with either at random; fail instead.
        self.server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_SchedulerServicer_to_server(  # type: ignore[no-untyped-call]
            _Scheduler(), self.server
        )
        if not self.server.add_insecure_port(addr):
            raise RuntimeError(f"--peer-scheduler: cannot listen on {addr}")
        self.server.start()

    def stop(self) -> None:
        """Stop serving at once."""
        self.server.stop(0)


class Peer:
    """A worker speaking the original protocol: given by address, or started here."""

    name = "peer"

    def __init__(
        self, addr: str, cmd: str | None, cwd: Path, ca: str | None, pid: int | None
    ) -> None:
        self.addr = addr
        self.cmd = cmd
        self.cwd = cwd
        self.ca = ca
        self.log_path = cwd / "peer.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._pid = pid

    @property
    def pid(self) -> int | None:
        """The peer's process id if the bench started it or was told it."""
        return self.proc.pid if self.proc is not None else self._pid

    def start(self, timeout: float = 30.0) -> None:
        """Start ``--peer-cmd`` (if any) and wait until its address accepts connections."""
        if self.cmd:
            self.cwd.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    shlex.split(self.cmd),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=str(self.cwd),
                    start_new_session=True,
                )
        _wait_port(self.proc, self.addr, timeout, self.log_path if self.cmd else None)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop what the bench started (a peer given by address is left alone)."""
        return _stop(self.proc, timeout)

    def client_spec(self) -> dict[str, Any]:
        """Plaintext, or TLS verified with ``--peer-ca`` (the original has no client auth)."""
        tls = {"tls": "tls", "ca": self.ca} if self.ca else {"tls": "plain"}
        return {"addr": self.addr, **tls, "warmup": "query"}

    def describe(self) -> dict[str, Any]:
        """What the results say about the peer."""
        return {
            "addr": self.addr,
            "cmd": self.cmd,
            "cwd": str(self.cwd) if self.cmd else None,
            "tls": bool(self.ca),
            "pid_known": self.pid is not None,
        }


class BareServer:
    """``bench.bare``: a grpcio server (aio, or sync on a thread pool) with one empty method."""

    def __init__(
        self,
        flavor: str,
        base: Path,
        certs: Path,
        interp: Interpreter,
        pythonpath: str,
        threads: int,
    ) -> None:
        self.name = f"bare_{flavor}"
        self.certs = certs
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log_path = base / f"{self.name}.log"
        spec = {
            "flavor": flavor,
            "addr": self.addr,
            "threads": threads,
            "ca": str(certs / "ca.crt"),
            "cert": str(certs / "server.crt"),
            "key": str(certs / "server.key"),
        }
        self.argv = [*interp.argv, "-m", "bench.bare", json.dumps(spec)]
        self.env = env(pythonpath, os.environ.get("HOME", "/"))
        self.cwd = str(base)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's process id (it must be running)."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait for its ``ready`` line."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        _wait_port(self.proc, self.addr, timeout, self.log_path, ready="ready")

    def stop(self) -> int | None:
        """SIGTERM, wait."""
        return _stop(self.proc, 10.0)

    def client_spec(self) -> dict[str, Any]:
        """mTLS with the same certificates as the agent."""
        return {**mtls_spec(self.addr, self.certs), "warmup": "unary"}
