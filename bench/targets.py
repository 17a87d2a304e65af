"""What the bench measures against, each started and stopped here.

* :class:`Agent`: a real agent (``PYTHON -m agent run --config ...``, the
  installed package) with its own certificates, config, policy and state
  folder, for one :class:`Mode`;
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
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from bench.interp import Interpreter, env
from bench.output import note

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


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


CONFIG = """[grpc_server]
addr = "{addr}"
use_tls = true
crt_file = "tls/server.crt"
key_file = "tls/server.key"
ca_file = "tls/ca.crt"

[auth]
clients = ["client"]
admins = ["admin"]

[jobs]
policy_file = "policy.yaml"
state_dir = "state"
run_as_user = "{job_user}"
max_running = 1000
"""


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
        if k == "root":
            if not IS_ROOT:
                note("mode 'root' skipped: the bench is not running as root")
                continue
            out.append(
                Mode(
                    "root",
                    f"agent as root, jobs as {user} (user switch: setpriv)",
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
                    f"agent as {pw.pw_name}, jobs as {pw.pw_name} (no switch: vfork)",
                    pw.pw_uid,
                    pw.pw_gid,
                    pw.pw_name,
                    pw.pw_name,
                )
            )
        else:
            raise SystemExit(f"bench: unknown mode {k!r} (root, user)")
    return out


class Agent:
    """A real agent process for one mode."""

    name = "agent"

    def __init__(self, mode: Mode, base: Path, certs: Path, interp: Interpreter, head: str) -> None:
        self.mode = mode
        self.interp = interp
        self.certs = certs
        self.dir = base / mode.key
        self.dir.mkdir(mode=0o755)
        os.chmod(self.dir, 0o755)
        tls = self.dir / "tls"
        tls.mkdir(mode=0o755)
        for name, perm in (("ca.crt", 0o644), ("server.crt", 0o644), ("server.key", 0o600)):
            shutil.copyfile(certs / name, tls / name)
            os.chmod(tls / name, perm)
        state = self.dir / "state"
        state.mkdir(mode=0o700)
        if mode.agent_uid != os.geteuid():
            os.chown(tls / "server.key", mode.agent_uid, mode.agent_gid)
            os.chown(state, mode.agent_uid, mode.agent_gid)
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        policy = self.dir / "policy.yaml"
        policy.write_text(policy_text(head))
        os.chmod(policy, 0o644)
        self.config = self.dir / "config.toml"
        self.config.write_text(CONFIG.format(addr=self.addr, job_user=mode.job_user))
        os.chmod(self.config, 0o644)
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start the installed agent and wait until it serves TLS."""
        with open(self.log_path, "ab") as log:
            # cwd is the agent's own folder and PYTHONPATH carries no source
            # tree: ``-m agent`` is the package installed in the interpreter.
            self.proc = subprocess.Popen(
                [
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


class _Scheduler(pb_grpc.SchedulerServicer):
    def RegisterWorker(self, request: pb.RegisterReq, context: Any) -> pb.RegisterRes:
        return pb.RegisterRes(success=True, workerID=str(uuid.uuid4()))

    def DeregisterWorker(self, request: pb.DeregisterReq, context: Any) -> pb.DeregisterRes:
        return pb.DeregisterRes(success=True)


class StubScheduler:
    """A plaintext Scheduler that accepts every registration (for ``--peer-scheduler``)."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.server = grpc.server(ThreadPoolExecutor(2))
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
