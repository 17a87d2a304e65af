"""The benchmark: a real agent with mTLS on loopback, measured beside the floor.

``python -m bench [--quick] [--out DIR] [--modes root,user] [--profile]``
(see bench/README.md). Prints one JSON line per measurement on stdout,
progress on stderr, and writes ``DIR/latest.json``, ``DIR/latest.md`` and,
for a full run, ``docs/benchmarks.md`` and ``docs/benchmarks-latency.png``.

For each agent mode it starts a fresh agent (``python -m agent run``) with
its own certificates, config, policy and state directory, measures the floor
with the same interpreter and user, then the agent. Agent modes:

* ``root``: the agent runs as root and jobs as ``--user`` (default nobody):
  every spawn switches user, so CPython forks instead of vforking.
* ``user``: the agent itself runs as ``--user`` and jobs run as that same
  user (no switch, the vfork path): the production-like configuration.

Client load comes from separate processes (``bench.load``); the CPU they
and the agent use in every measurement window is reported beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from bench import procstat
from bench.procstat import MB, percentile

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
MAX_CLIENT_PROCS = 4


# ---------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Params:
    """How much of everything to do (``--quick`` shrinks it all)."""

    floor_serial: int = 2000
    floor_concurrent: int = 3000
    floor_in_flight: int = 16
    levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    wait_levels: tuple[int, ...] = (1, 16)
    warm: float = 1.0
    duration: float = 4.0
    rpc_duration: float = 2.0
    qps_callers: int = 16
    history: int = 10_000
    running: int = 500
    stream_bytes: int = 1_000_000_000
    stream_clients: tuple[int, ...] = (1, 4)
    poll_ms: float = 1.0
    main_level: int = 16  # the in-flight level the targets talk about


FULL = Params()
QUICK = Params(floor_serial=100, floor_concurrent=200, levels=(1, 4), wait_levels=(1,),
               warm=0.1, duration=0.4, rpc_duration=0.25, qps_callers=4, history=60,
               running=10, stream_bytes=4_000_000, stream_clients=(1, 2), main_level=4)


# ---------------------------------------------------------------- output


def emit(rec: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """One JSON line on stdout per measurement."""
    records.append(rec)
    print(json.dumps(_clean(rec), separators=(",", ":")), flush=True)


def note(msg: str) -> None:
    """Progress on stderr."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return None
        return round(v, 4)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


# ---------------------------------------------------------------- set-up


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gen_certs(out: Path) -> None:
    """The project's own certificate script."""
    subprocess.run([str(ROOT / "scripts" / "gen_certs.sh"), "--out", str(out)], check=True,
                   capture_output=True)
    os.chmod(out, 0o755)  # certificates world-readable, keys stay 0600


@dataclass(frozen=True)
class Interpreter:
    """How to run Python for the agent, the floor and the clients."""

    argv: tuple[str, ...]
    pythonpath: str
    version: str
    note: str = ""


def _probe(prefix: list[str], argv: tuple[str, ...], pythonpath: str) -> str:
    code = ("import sys, grpc, os; print(sys.version.split()[0], "
            "os.path.realpath(sys.executable), sys.prefix, grpc.__version__)")
    try:
        r = subprocess.run([*prefix, *argv, "-c", code], capture_output=True, text=True,
                           timeout=60, env=_env(pythonpath, home="/"), cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    return r.stdout.strip() if r.returncode == 0 else f"error: {r.stderr.strip()[-200:]}"


def choose_interpreter(choice: str, user_prefix: list[str] | None) -> Interpreter:
    """The same interpreter for both agent modes.

    ``auto``: this venv's Python if the other user runs it identically;
    otherwise (a venv on an interpreter the other user cannot read, as with
    a pyenv Python under /root) the system Python of the same version with
    this venv's site-packages on PYTHONPATH, for both modes, so the two
    modes differ only in the user switch.
    """
    paths = sysconfig.get_paths()
    site = os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    if choice not in ("auto", "venv"):
        argv = (choice,)
        pp = f"{ROOT}{os.pathsep}{site}"
        return Interpreter(argv, pp, _probe([], argv, pp).split()[0])
    mine = _probe([], (sys.executable,), str(ROOT))
    if choice == "venv" or user_prefix is None:
        return Interpreter((sys.executable,), str(ROOT), mine.split()[0])
    theirs = _probe(user_prefix, (sys.executable,), str(ROOT))
    if theirs == mine:
        return Interpreter((sys.executable,), str(ROOT), mine.split()[0])
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    system = f"/usr/bin/python{minor}"
    pp = f"{ROOT}{os.pathsep}{site}"
    if os.path.exists(system):
        a = _probe([], (system,), pp)
        b = _probe(user_prefix, (system,), pp)
        if a == b and not a.startswith("error"):
            return Interpreter((system,), pp, a.split()[0], note=(
                f"{sys.executable} runs differently as the job user ({theirs!r} vs "
                f"{mine!r}); both agent modes, the floor and the clients use {system} "
                "with this venv's site-packages instead"))
    return Interpreter((sys.executable,), str(ROOT), mine.split()[0], note=(
        f"WARNING: the unprivileged agent runs a different Python ({theirs!r}) than the "
        f"root agent ({mine!r}); the two modes are not directly comparable"))


def _env(pythonpath: str, home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home,
            "PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1",
            **{k: v for k, v in os.environ.items() if k.startswith("AGENT_")}}


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
        return ["setpriv", f"--reuid={self.agent_uid}", f"--regid={self.agent_gid}",
                "--clear-groups", "--"]

    @property
    def home(self) -> str:
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
            out.append(Mode("root", f"agent as root, jobs as {user} (user switch: setpriv)",
                            0, 0, "root", user))
        elif k == "user":
            if IS_ROOT:
                pw = pwd.getpwnam(user)
                out.append(Mode("user", f"agent as {user}, jobs as {user} (no switch: vfork)",
                                pw.pw_uid, pw.pw_gid, user, user))
            else:
                out.append(Mode("user", f"agent as {me.pw_name}, jobs as {me.pw_name} "
                                "(no switch: vfork)", me.pw_uid, me.pw_gid, me.pw_name,
                                me.pw_name))
        else:
            raise SystemExit(f"bench: unknown mode {k!r} (root, user)")
    return out


# ---------------------------------------------------------------- the agent


class Agent:
    """A real agent process for one mode."""

    def __init__(self, mode: Mode, base: Path, certs: Path, interp: Interpreter,
                 head: str) -> None:
        self.mode = mode
        self.interp = interp
        self.dir = base / mode.key
        self.dir.mkdir(mode=0o755)
        os.chmod(self.dir, 0o755)
        tls = self.dir / "tls"
        tls.mkdir(mode=0o755)
        for name in ("ca.crt", "server.crt", "server.key"):
            shutil.copyfile(certs / name, tls / name)
        os.chmod(tls / "ca.crt", 0o644)
        os.chmod(tls / "server.crt", 0o644)
        os.chmod(tls / "server.key", 0o600)
        self.state = self.dir / "state"
        self.state.mkdir(mode=0o700)
        if mode.agent_uid != os.geteuid():
            os.chown(tls / "server.key", mode.agent_uid, mode.agent_gid)
            os.chown(self.state, mode.agent_uid, mode.agent_gid)
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        policy = self.dir / "policy.yaml"
        policy.write_text(policy_text(head))
        os.chmod(policy, 0o644)
        self.config = self.dir / "config.toml"
        self.config.write_text(f"""[grpc_server]
addr = "{self.addr}"
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
run_as_user = "{mode.job_user}"
max_running = 1000
""")
        os.chmod(self.config, 0o644)
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until it serves TLS."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.mode.prefix, *self.interp.argv, "-m", "agent", "run", "--config",
                 str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(self.dir),
                env=_env(self.interp.pythonpath, self.mode.home), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                if "listening on" in self.log():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"agent did not become ready within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not stop."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def python_of_process(self) -> str:
        """The libpython / executable the running agent really uses."""
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
            with open(f"/proc/{self.pid}/maps", encoding="ascii", errors="replace") as f:
                libs = {line.split()[-1] for line in f if "libpython" in line}
        except OSError:
            return "?"
        return exe + (f" ({', '.join(sorted(libs))})" if libs else "")


# ---------------------------------------------------------------- client processes


@dataclass
class Window:
    """CPU of the agent and the machine over a measurement window."""

    wall: float = 0.0
    agent: procstat.ProcCPU = field(default_factory=lambda: procstat.ProcCPU(0, 0))
    machine_busy: float = 0.0
    threads: dict[str, float] = field(default_factory=dict)


class Sampler:
    """Samples agent and machine CPU at the start of a window and at its end."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = 0.0

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.a0 = procstat.proc_cpu(self.pid)
        self.m0 = procstat.machine_cpu()[0]
        self.th0 = procstat.thread_cpu(self.pid)

    def end(self) -> Window:
        wall = time.monotonic() - self.t0
        a1 = procstat.proc_cpu(self.pid)
        m1 = procstat.machine_cpu()[0]
        th1 = procstat.thread_cpu(self.pid)
        threads = {k: v - self.th0.get(k, 0.0) for k, v in th1.items()}
        return Window(wall, a1 - self.a0, m1 - self.m0,
                      {k: v for k, v in threads.items() if v > 0})


def _sleep_until(t: float) -> None:
    while (d := t - time.monotonic()) > 0:
        time.sleep(min(d, 0.5))


class Bench:
    """Everything about one run: certificates, interpreter, records."""

    def __init__(self, args: argparse.Namespace, params: Params, base: Path, certs: Path,
                 interp: Interpreter) -> None:
        self.args = args
        self.p = params
        self.base = base
        self.certs = certs
        self.interp = interp
        self.records: list[dict[str, Any]] = []
        self.started = 0  # jobs started on the current agent (its history)
        self.profiles: dict[str, str] = {}  # mode -> py-spy summary (--profile)
        self.head = os.path.realpath(shutil.which("head") or "/usr/bin/head")
        self.workers: list[subprocess.Popen[str]] = []

    # ---------------------------------------------------------- helpers

    def step(self, name: str) -> bool:
        """Whether ``--steps`` asks for this step."""
        return self.args.steps == "all" or name in self.args.steps.split(",")

    def spec(self, agent: Agent, **kw: Any) -> dict[str, Any]:
        return {"addr": agent.addr, "ca": str(self.certs / "ca.crt"),
                "cert": str(self.certs / "client.crt"), "key": str(self.certs / "client.key"),
                **kw}

    def stub(self, agent: Agent, identity: str = "client") -> tuple[grpc.Channel,
                                                                   pb_grpc.WorkerStub]:
        creds = grpc.ssl_channel_credentials(
            (self.certs / "ca.crt").read_bytes(),
            (self.certs / f"{identity}.key").read_bytes(),
            (self.certs / f"{identity}.crt").read_bytes())
        ch = grpc.secure_channel(agent.addr, creds)
        return ch, pb_grpc.WorkerStub(ch)  # type: ignore[no-untyped-call]

    def spawn_workers(self, agent: Agent, specs: list[dict[str, Any]]) -> list[
            subprocess.Popen[str]]:
        procs = []
        log = open(self.base / "clients.log", "a")  # noqa: SIM115 - children own it
        try:
            for s in specs:
                p = subprocess.Popen([*self.interp.argv, "-m", "bench.load", json.dumps(s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, text=True, cwd=str(ROOT),
                                     env=_env(self.interp.pythonpath,
                                              os.environ.get("HOME", "/")))
                procs.append(p)
                self.workers.append(p)
        finally:
            log.close()
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a client process did not start (see {self.base}/"
                                   f"clients.log): {line!r}")
        return procs

    def drive(self, agent: Agent, specs: list[dict[str, Any]], *, warm: float,
              duration: float | None, extra_go: dict[str, Any] | None = None,
              before_go: Any = None) -> tuple[list[dict[str, Any]], Window, float, float]:
        """Run client processes: ready, go, sample the window, collect.

        ``duration`` None: a counted run, the window lasts until every
        client has finished. Returns (results, window, warm_at, end_at).
        """
        procs = self.spawn_workers(agent, specs)
        go = dict(extra_go or {})
        if before_go is not None:
            go.update(before_go())
        t_start = time.monotonic() + 0.1
        warm_at = t_start + warm
        limit = duration if duration is not None else 3600.0
        end_at = warm_at + limit
        go.update({"start": t_start, "warm": warm_at, "end": end_at,
                   "counted": duration is None})
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go " + json.dumps(go) + "\n")
            p.stdin.close()
            p.stdin = None  # communicate() must not touch it again
        # Read every client's output while it runs: a result larger than a
        # pipe buffer must never block a client we are waiting for.
        outputs: list[str] = [""] * len(procs)

        def reader(i: int, p: subprocess.Popen[str]) -> None:
            try:
                outputs[i], _ = p.communicate(timeout=limit + 600)
            except subprocess.TimeoutExpired:
                p.kill()
                outputs[i], _ = p.communicate()

        readers = [threading.Thread(target=reader, args=(i, p), daemon=True)
                   for i, p in enumerate(procs)]
        for r in readers:
            r.start()
        sampler = Sampler(agent.pid)
        _sleep_until(warm_at)
        sampler.begin()
        if duration is not None:
            _sleep_until(end_at)
        else:
            while any(r.is_alive() for r in readers) and time.monotonic() < end_at:
                time.sleep(0.02)
            end_at = time.monotonic()
        win = sampler.end()
        for r in readers:
            r.join(timeout=limit + 700)
        results = []
        for out in outputs:
            lines = [x for x in out.splitlines() if x.startswith("{")]
            if not lines:
                raise RuntimeError(f"a client process failed (see {self.base}/clients.log)")
            results.append(json.loads(lines[-1]))
        return results, win, warm_at, end_at

    @staticmethod
    def layout(n: int) -> list[int]:
        """Threads per client process for ``n`` concurrent callers."""
        procs = min(n, MAX_CLIENT_PROCS)
        return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]

    def cpu_fields(self, win: Window, client_cpu: float) -> dict[str, Any]:
        w = win.wall or 1e-9
        other = win.machine_busy - win.agent.self_s - win.agent.children_s - client_cpu
        return {
            "window_s": win.wall,
            "client_cpu_cores": client_cpu / w,
            "agent_cpu_cores": win.agent.self_s / w,
            "jobs_cpu_cores": win.agent.children_s / w,
            "machine_busy_cores": win.machine_busy / w,
            "other_cpu_cores": max(0.0, other / w),
        }

    # ---------------------------------------------------------- measurements

    def floor(self, mode: Mode) -> dict[str, Any]:
        """Spawn-and-reap /bin/true from Python, as the agent's user, same interpreter."""
        p = self.p
        argv = [*mode.prefix, *self.interp.argv, "-m", "bench.floor", str(p.floor_serial),
                str(p.floor_concurrent), str(p.floor_in_flight)]
        if mode.agent_uid == 0 and mode.job_user != "root":
            pw = pwd.getpwnam(mode.job_user)
            argv += [str(pw.pw_uid), str(pw.pw_gid)]
        m0 = procstat.machine_cpu()[0]
        t0 = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=str(ROOT),
                           env=_env(self.interp.pythonpath, mode.home), check=False)
        wall = time.monotonic() - t0
        busy = procstat.machine_cpu()[0] - m0
        if r.returncode != 0:
            raise RuntimeError(f"floor failed: {r.stderr[-2000:]}")
        data: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        for key, name in (("serial", "floor_serial"), ("concurrent", "floor_concurrent"),
                          ("serial_user_switch", "floor_serial_user_switch")):
            if key not in data:
                continue
            d = data[key]
            emit({"mode": mode.key, "name": name, "in_flight": d.get("in_flight", 1),
                  "jobs": d["jobs"], "jobs_per_s": d["jobs_per_s"], "p50_ms": d["p50_ms"],
                  "p90_ms": d["p90_ms"], "p99_ms": d["p99_ms"],
                  "client_cpu_cores": d["client_cpu_cores"],
                  "jobs_cpu_cores": d["jobs_cpu_s"] / d["wall_s"],
                  "machine_busy_cores_whole_floor_run": busy / wall,
                  "python": data["python"]}, self.records)
        return data

    def jobs_run(self, agent: Agent, mode: Mode, protocol: str, n: int, floor: dict[str, Any],
                 name: str, *, count: int | None = None, before_go: Any = None) -> dict[str, Any]:
        """Throughput and start-to-done latency with ``n`` jobs in flight."""
        p = self.p
        per_thread = None if count is None else -(-count // n)  # count is per thread
        specs = [self.spec(agent, kind="jobs", protocol=protocol, threads=t,
                           poll_ms=p.poll_ms, count=per_thread)
                 for t in self.layout(n)]
        results, win, warm_at, end_at = self.drive(
            agent, specs, warm=0.0 if count else p.warm,
            duration=None if count else p.duration, before_go=before_go)
        starts, dones, start_rpc, query_rpc, polls = [], [], [], [], []
        failed = 0
        errors: list[str] = []
        client_cpu = 0.0
        for r in results:
            client_cpu += r["cpu_window_s"] if (r["cpu_window_s"] is not None and not count) \
                else r["cpu_total_s"]
            for t in r["threads"]:
                starts += t["starts"]
                dones += t["dones"]
                start_rpc += t["start_rpc"]
                query_rpc += t["query_rpc"]
                polls += t["polls"]
                failed += t["failed"]
                self.started += len(t["starts"])
                errors += t["errors"]
        if count:
            span = (max(dones) - min(starts)) if dones else 0.0
            done_in = len(dones)
            sel = list(range(len(starts)))
        else:
            span = end_at - warm_at
            done_in = sum(1 for d in dones if warm_at <= d <= end_at)
            sel = [i for i, s in enumerate(starts) if warm_at <= s < end_at]
        lat = [(dones[i] - starts[i]) * 1000 for i in sel]
        srpc = [start_rpc[i] * 1000 for i in sel if i < len(start_rpc)]
        rate = done_in / span if span > 0 else 0.0
        fl = floor["serial"] if n == 1 else floor["concurrent"]
        rec = {
            "mode": mode.key, "name": name, "protocol": protocol, "in_flight": n,
            "jobs": len(lat), "jobs_per_s": rate,
            "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
            "p99_ms": percentile(lat, 99),
            "start_rpc_p50_ms": percentile(srpc, 50), "start_rpc_p99_ms": percentile(srpc, 99),
            "query_rpc_p50_ms": percentile([x * 1000 for x in query_rpc], 50),
            "polls_per_job": (sum(polls) / len(polls)) if polls else 0.0,
            "floor": "serial" if n == 1 else f"concurrent{fl.get('in_flight', '')}",
            "throughput_vs_floor": rate / fl["jobs_per_s"] if fl["jobs_per_s"] else None,
            "p50_vs_floor": percentile(lat, 50) / fl["p50_ms"] if fl["p50_ms"] else None,
            "p50_vs_floor_serial": percentile(lat, 50) / floor["serial"]["p50_ms"],
            "failed": failed, "errors": errors[:5],
            "client_procs": len(specs), "client_threads": n,
            **self.cpu_fields(win, client_cpu),
        }
        if name == "jobs_original" and n == p.main_level:
            total = sum(win.threads.values()) or 1e-9
            rec["agent_threads_cpu_share"] = {k: v / total for k, v in
                                              sorted(win.threads.items(), key=lambda x: -x[1])}
        emit(rec, self.records)
        return rec

    def rpc_latency(self, agent: Agent, mode: Mode, job_id: str, name: str) -> None:
        """Serial QueryJob latency (one caller)."""
        results, win, warm_at, end_at = self.drive(
            agent, [self.spec(agent, kind="query", job_id=job_id, threads=1)],
            warm=min(0.3, self.p.warm), duration=self.p.rpc_duration)
        self._query_record(mode, name, results, win, 1, warm_at, end_at)

    def query_qps(self, agent: Agent, mode: Mode, job_id: str) -> None:
        """QueryJob calls per second with several concurrent callers."""
        specs = [self.spec(agent, kind="query", job_id=job_id, threads=t)
                 for t in self.layout(self.p.qps_callers)]
        results, win, warm_at, end_at = self.drive(agent, specs, warm=self.p.warm,
                                                   duration=self.p.duration)
        self._query_record(mode, "query_qps", results, win, self.p.qps_callers, warm_at,
                           end_at)

    def _query_record(self, mode: Mode, name: str, results: list[dict[str, Any]], win: Window,
                      callers: int, warm_at: float, end_at: float) -> None:
        lat: list[float] = []
        errors: list[str] = []
        cpu = 0.0
        for r in results:
            cpu += r["cpu_window_s"] or 0.0
            for t in r["threads"]:
                errors += t["errors"]
                lat += [x * 1000 for a, x in zip(t["at"], t["lat"], strict=True)
                        if warm_at <= a and a + x <= end_at]
        span = end_at - warm_at
        emit({"mode": mode.key, "name": name, "callers": callers, "calls": len(lat),
              "calls_per_s": len(lat) / span if span > 0 else 0.0,
              "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
              "p99_ms": percentile(lat, 99), "errors": errors[:5],
              **self.cpu_fields(win, cpu)}, self.records)

    def history_count(self, agent: Agent) -> int:
        """Jobs in the history (ListJobs as the admin identity)."""
        ch, stub = self.stub(agent, "admin")
        n = 0
        token = ""
        try:
            for _ in range(1000):
                res = stub.ListJobs(pb.ListJobsReq(pageSize=1000, pageToken=token), timeout=60)
                n += len(res.jobs)
                token = res.nextPageToken
                if not token:
                    break
        finally:
            ch.close()
        return n

    def running_jobs(self, agent: Agent, mode: Mode, base_rss: float) -> None:
        """RSS with many jobs running at once (``sleep 60``), then stop them all."""
        n = self.p.running
        ch, stub = self.stub(agent)
        ids: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()

        def start(_: int) -> None:
            try:
                r = stub.StartJob(pb.StartJobReq(command="/bin/sleep", path="60"), timeout=60)
                with lock:
                    ids.append(r.jobID)
            except grpc.RpcError as e:
                with lock:
                    errors.append(f"{e.code().name}: {e.details()}")

        try:
            sampler = Sampler(agent.pid)
            sampler.begin()
            t0 = time.monotonic()
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(start, range(n)))
            t_start = time.monotonic() - t0
            win_start = sampler.end()
            time.sleep(0.5)
            kids = len(procstat.children_of(agent.pid))
            mem = procstat.rss_mb(agent.pid)
            fds = len(os.listdir(f"/proc/{agent.pid}/fd"))
            t1 = time.monotonic()
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(lambda i: stub.StopJob(pb.StopJobReq(jobID=i), timeout=60), ids))
                done = list(ex.map(lambda i: stub.WaitJob(
                    pb.WaitJobReq(jobID=i, waitMillis=60_000), timeout=70).done, ids))
            t_stop = time.monotonic() - t1
        finally:
            ch.close()
        time.sleep(0.3)
        after = procstat.rss_mb(agent.pid)
        emit({"mode": mode.key, "name": "rss_running", "running": len(ids), "children_seen": kids,
              "agent_fds": fds, "rss_mb": mem["rss_mb"], "anon_mb": mem["anon_mb"],
              "rss_before_mb": base_rss, "above_before_mb": mem["rss_mb"] - base_rss,
              "kb_per_running_job": (mem["rss_mb"] - base_rss) * MB / 1024 / max(1, len(ids)),
              "start_all_s": t_start, "starts_per_s": len(ids) / t_start if t_start else 0,
              "stop_and_wait_all_s": t_stop, "all_done": all(done) and len(done) == len(ids),
              "rss_after_stop_mb": after["rss_mb"], "errors": errors[:5],
              **self.cpu_fields(win_start, 0.0)}, self.records)

    def stream(self, agent: Agent, mode: Mode, clients: int) -> None:
        """MB/s to ``clients`` followers of a job writing ``stream_bytes``."""
        nbytes = self.p.stream_bytes
        ch, stub = self.stub(agent)
        job: dict[str, str] = {}

        def start_job() -> dict[str, Any]:
            r = stub.StartJob(pb.StartJobReq(command=self.head, path="-c",
                                             args=[str(nbytes), "/dev/zero"]), timeout=30)
            job["id"] = r.jobID
            return {"job_id": r.jobID}

        try:
            specs = [self.spec(agent, kind="stream", threads=1, timeout=600)
                     for _ in range(clients)]
            results, win, _, _ = self.drive(agent, specs, warm=0.0, duration=None,
                                            before_go=start_job)
            final = stub.WaitJob(pb.WaitJobReq(jobID=job["id"], waitMillis=60_000), timeout=70)
        finally:
            ch.close()
        per = []
        errors: list[str] = []
        cpu = 0.0
        ok = True
        t_first = min(t["t0"] for r in results for t in r["threads"])
        t_last = max(t["t1"] for r in results for t in r["threads"])
        for r in results:
            cpu += r["cpu_total_s"]
            for t in r["threads"]:
                el = t["t1"] - t["t0"]
                per.append(t["bytes"] / el / MB if el > 0 else 0.0)
                ok = ok and t["bytes"] == nbytes and not t["errors"]
                errors += t["errors"]
        total = sum(t["bytes"] for r in results for t in r["threads"])
        job_s = (final.endTime.ToNanoseconds() - final.startTime.ToNanoseconds()) / 1e9
        emit({"mode": mode.key, "name": "stream", "clients": clients, "bytes_per_client": nbytes,
              "verified": ok and final.outputBytes == nbytes and final.done and not final.error,
              "job_output_bytes": final.outputBytes,
              "mb_per_s_per_client_min": min(per), "mb_per_s_per_client_mean": sum(per) / len(per),
              "mb_per_s_aggregate": total / (t_last - t_first) / MB,
              "job_write_s": job_s, "job_write_mb_per_s": nbytes / job_s / MB if job_s else 0,
              "errors": errors[:5], **self.cpu_fields(win, cpu)}, self.records)

    def profile(self, agent: Agent, mode: Mode, floor: dict[str, Any]) -> None:
        """py-spy on the agent under the main original-protocol load (a separate run)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(spy):
            note("--profile: py-spy not found (pip install py-spy); skipped")
            return
        out = Path(self.args.out) / f"profile-{mode.key}.txt"
        dur = self.p.warm + self.p.duration
        cmd = [spy, "record", "--pid", str(agent.pid), "--format", "raw",
               "--duration", str(max(1, round(dur))), "--idle", "-o", str(out)]
        # --native needs to stop the process for each sample; without it
        # py-spy reads the interpreter's memory without pausing it.
        cmd += ["--native", "--rate", "100"] if self.args.native else \
            ["--nonblocking", "--rate", "250"]
        procs: list[subprocess.Popen[str]] = []

        def start_spy() -> dict[str, Any]:
            # Started once the clients are connected, so it samples the load.
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
            time.sleep(0.3)
            return {}

        try:
            self.jobs_run(agent, mode, "original", self.args.profile_level or self.p.main_level,
                          floor, "profiled_original", before_go=start_spy)
        finally:
            err = ""
            for sp in procs:
                try:
                    _, err = sp.communicate(timeout=dur + 30)
                except subprocess.TimeoutExpired:
                    sp.kill()
                    _, err = sp.communicate()
        spy_p = procs[0]
        if spy_p.returncode != 0:
            note(f"py-spy failed: {err.strip()[-500:]}")
            return
        from bench.profile_summary import summarize

        summary = summarize(out.read_text())
        (Path(self.args.out) / f"profile-{mode.key}.summary.txt").write_text(summary)
        self.profiles[mode.key] = summary
        note(f"profile of the agent ({mode.key}) in {out}; summary:\n{summary}")

    # ---------------------------------------------------------- one mode

    def run_mode(self, mode: Mode, head: str) -> dict[str, Any]:
        p = self.p
        note(f"mode {mode.key}: {mode.label}")
        floor = self.floor(mode)
        agent = Agent(mode, self.base, self.certs, self.interp, head)
        info: dict[str, Any] = {"label": mode.label, "agent_user": mode.agent_user,
                                "job_user": mode.job_user}
        try:
            agent.start()
            self.started = 0
            info["agent_python"] = agent.python_of_process()
            time.sleep(1.0)
            idle = procstat.rss_mb(agent.pid)
            emit({"mode": mode.key, "name": "rss_idle", **idle}, self.records)

            ch, stub = self.stub(agent)
            try:
                running = stub.StartJob(pb.StartJobReq(command="/bin/sleep", path="600"),
                                        timeout=30).jobID
                finished = stub.StartJob(pb.StartJobReq(command="/bin/true"), timeout=30).jobID
                stub.WaitJob(pb.WaitJobReq(jobID=finished, waitMillis=10_000), timeout=15)
                self.started += 2
                if self.step("rpc"):
                    note("QueryJob latency")
                    self.rpc_latency(agent, mode, running, "query_rpc_running_job")
                    self.rpc_latency(agent, mode, finished, "query_rpc_finished_job")
                stub.StopJob(pb.StopJobReq(jobID=running), timeout=30)
                stub.WaitJob(pb.WaitJobReq(jobID=running, waitMillis=30_000), timeout=35)
            finally:
                ch.close()

            for n in p.levels if self.step("levels") else ():
                note(f"original protocol, {n} in flight")
                self.jobs_run(agent, mode, "original", n, floor, "jobs_original")
            for n in p.wait_levels if self.step("wait") else ():
                note(f"WaitJob, {n} in flight")
                self.jobs_run(agent, mode, "wait", n, floor, "jobs_wait")
                note(f"RunJob, {n} in flight")
                self.jobs_run(agent, mode, "run", n, floor, "jobs_run")
            if self.step("qps"):
                note(f"QueryJob calls/s, {p.qps_callers} callers")
                # A fresh one: the sweep above ran enough jobs for retention
                # to have removed the first.
                ch, stub = self.stub(agent)
                try:
                    fresh = stub.RunJob(pb.StartJobReq(command="/bin/true"), timeout=30).jobID
                finally:
                    ch.close()
                self.query_qps(agent, mode, fresh)

            if self.args.profile:
                self.profile(agent, mode, floor)
            if self.step("history"):
                # Count from our own bookkeeping: listing 10,000 jobs through
                # the API before measuring would inflate the agent's heap.
                have = self.started
                growth = [(have, procstat.rss_mb(agent.pid)["rss_mb"])]
                if have < p.history:
                    note(f"history: {have} jobs, running {p.history - have} more")
                    # In chunks, with RSS after each: growth that levels off
                    # (caches, allocator) is not growth per job.
                    chunks = 4
                    left = p.history - have
                    for i in range(chunks):
                        n = left // chunks + (1 if i < left % chunks else 0)
                        if n:
                            self.jobs_run(agent, mode, "wait", min(16, max(1, p.main_level)),
                                          floor, "history_fill", count=n)
                            growth.append((self.started, procstat.rss_mb(agent.pid)["rss_mb"]))
                time.sleep(0.5)
                hist = procstat.rss_mb(agent.pid)
                retained = self.history_count(agent)
                emit({"mode": mode.key, "name": "rss_history", "retained_jobs": retained,
                      "jobs_run": self.started, **hist,
                      "above_idle_mb": hist["rss_mb"] - idle["rss_mb"],
                      "rss_mb_by_jobs_run": growth}, self.records)
                note("restart with the full history")
                agent.stop()
                agent.start()
                time.sleep(1.0)
                rest = procstat.rss_mb(agent.pid)
                emit({"mode": mode.key, "name": "rss_idle_with_history",
                      "retained_jobs": self.history_count(agent), **rest}, self.records)

            if self.step("running"):
                note(f"{p.running} jobs running at once")
                self.running_jobs(agent, mode, procstat.rss_mb(agent.pid)["rss_mb"])

            for c in p.stream_clients if self.step("stream") else ():
                note(f"streaming {p.stream_bytes / MB:.0f} MB to {c} client(s)")
                self.stream(agent, mode, c)
            info["agent_exit"] = agent.stop()
        finally:
            agent.stop()
            for w in self.workers:
                if w.poll() is None:
                    w.kill()
                    w.wait(5)
            self.workers.clear()
        info["floor"] = floor
        return info


# ---------------------------------------------------------------- targets


def targets(records: list[dict[str, Any]], mode: str, p: Params) -> list[dict[str, Any]]:
    """The issue's targets, each computed from this run's figures."""

    def find(name: str, **kw: Any) -> dict[str, Any] | None:
        for r in records:
            if r["mode"] == mode and r["name"] == name and all(r.get(k) == v
                                                              for k, v in kw.items()):
                return r
        return None

    out = []

    def add(target: str, value: float | None, limit: float | None, ok: bool | None,
            shown: str) -> None:
        out.append({"mode": mode, "target": target, "value": value, "limit": limit,
                    "pass": ok, "shown": shown})

    fs = find("floor_serial")
    fc = find("floor_concurrent")
    lvl = p.main_level
    o16 = find("jobs_original", in_flight=lvl)
    if o16 and fc:
        r = o16["jobs_per_s"] / fc["jobs_per_s"]
        add(f"throughput, {lvl} in flight, original protocol >= 0.4x floor", r, 0.4, r >= 0.4,
            f"{o16['jobs_per_s']:.0f}/s vs floor {fc['jobs_per_s']:.0f}/s = {r:.2f}x")
    o1 = find("jobs_original", in_flight=1)
    if o1 and fs:
        r = o1["p50_ms"] / fs["p50_ms"]
        add("start-to-done p50, 1 in flight, 1 ms polling <= 3x floor", r, 3.0, r <= 3.0,
            f"{o1['p50_ms']:.2f} ms vs floor {fs['p50_ms']:.2f} ms = {r:.2f}x")
    waits = [w for w in (find("jobs_wait", in_flight=1), find("jobs_run", in_flight=1)) if w]
    if waits and fs:
        w1 = min(waits, key=lambda w: w["p50_ms"])
        how = "RunJob" if w1["protocol"] == "run" else "StartJob + WaitJob"
        r = w1["p50_ms"] / fs["p50_ms"]
        add("start-to-done p50, 1 in flight, faster wait <= 2x floor", r, 2.0, r <= 2.0,
            f"{w1['p50_ms']:.2f} ms ({how}) vs floor {fs['p50_ms']:.2f} ms = {r:.2f}x")
    idle = find("rss_idle")
    if idle:
        v = idle["rss_mb"]
        add("idle RSS <= 40 MB", v, 40.0, v <= 40.0, f"{v:.1f} MB")
    hist = find("rss_history")
    if hist and idle:
        d = hist["rss_mb"] - idle["rss_mb"]
        add(f"RSS after {p.history} retained jobs <= idle + 10 MB", d, 10.0,
            d <= 10.0 and hist["retained_jobs"] >= p.history,
            f"{hist['rss_mb']:.1f} MB = idle + {d:.1f} MB ({hist['retained_jobs']} retained)")
    s1 = find("stream", clients=1)
    if s1:
        v = s1["mb_per_s_per_client_min"]
        add("streaming to one client >= 200 MB/s", v, 200.0, v >= 200.0 and s1["verified"],
            f"{v:.0f} MB/s" + ("" if s1["verified"] else " (byte count NOT verified)"))
    return out


# ---------------------------------------------------------------- main


def machine_info(interp: Interpreter) -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import google.protobuf

    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python_bench": platform.python_version(), "python_agent": interp.version,
            "python_agent_argv": list(interp.argv), "interpreter_note": interp.note,
            "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
            "loadavg_start": procstat.load_average()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts: a smoke run in seconds")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"),
                    help="results folder (latest.json, latest.md)")
    ap.add_argument("--modes", default="root,user",
                    help="agent modes to measure: root (agent root, jobs switch user), user "
                         "(agent and jobs one unprivileged user); default both")
    ap.add_argument("--user", default="nobody", help="the unprivileged user (default nobody)")
    ap.add_argument("--python", default="auto",
                    help="interpreter for agent, floor and clients: auto, venv or a path")
    ap.add_argument("--duration", type=float, help="seconds per throughput point")
    ap.add_argument("--levels", help="jobs in flight to sweep, e.g. 1,2,4,8,16,32")
    ap.add_argument("--docs", dest="docs", action="store_true", default=None,
                    help="write docs/benchmarks.md and the plot (default for a full run)")
    ap.add_argument("--no-docs", dest="docs", action="store_false")
    ap.add_argument("--profile", action="store_true",
                    help="also run py-spy on the agent under the main original-protocol load")
    ap.add_argument("--native", action="store_true", help="with --profile: native frames too")
    ap.add_argument("--profile-level", type=int, help="jobs in flight while profiling "
                    "(default 16)")
    ap.add_argument("--history", type=int, help="jobs to run before the retained-history RSS "
                    "(default 10000)")
    ap.add_argument("--steps", default="all",
                    help="comma list of rpc,levels,wait,qps,history,running,stream (default all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit status 0 unless something failed to run."""
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the agents (in their own sessions) are
    # stopped and the temporary folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = QUICK if args.quick else FULL
    if args.duration:
        p = Params(**{**p.__dict__, "duration": args.duration})
    if args.history:
        p = Params(**{**p.__dict__, "history": args.history})
    if args.levels:
        lv = tuple(int(x) for x in args.levels.split(","))
        p = Params(**{**p.__dict__, "levels": lv})
    modes = make_modes([m.strip() for m in args.modes.split(",") if m.strip()], args.user)
    if not modes:
        note("nothing to measure")
        return 2
    docs = (not args.quick) if args.docs is None else args.docs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = os.path.realpath(shutil.which("head") or "/usr/bin/head")
    user_prefix = next((m.prefix for m in modes if m.prefix), None)
    interp = choose_interpreter(args.python, user_prefix)
    if interp.note:
        note(interp.note)
    base = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    os.chmod(base, 0o755)
    certs = base / "certs"
    gen_certs(certs)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "quick": args.quick,
            "params": {k: v for k, v in p.__dict__.items()}, "machine": machine_info(interp),
            "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    bench = Bench(args, p, base, certs, interp)
    infos: dict[str, Any] = {}
    status = 0
    t0 = time.monotonic()
    try:
        for m in modes:
            try:
                infos[m.key] = bench.run_mode(m, head)
            except Exception as e:  # report and carry on with the next mode
                status = 1
                note(f"mode {m.key} failed: {type(e).__name__}: {e}")
                infos[m.key] = {"label": m.label, "error": f"{type(e).__name__}: {e}"}
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            note(f"kept {base}")
    meta["elapsed_s"] = time.monotonic() - t0
    meta["machine"]["loadavg_end"] = procstat.load_average()
    tg = [t for m in modes for t in targets(bench.records, m.key, p)]
    for t in tg:
        emit({"mode": t["mode"], "name": "target", "target": t["target"], "value": t["value"],
              "limit": t["limit"], "pass": t["pass"]}, [])
    result = {"meta": meta, "modes": infos, "records": bench.records, "targets": tg,
              "profiles": bench.profiles}
    (out / "latest.json").write_text(json.dumps(_clean(result), indent=1) + "\n")
    from bench import report

    (out / "latest.md").write_text(report.markdown(result))
    if docs:
        docs_dir = ROOT / "docs"
        docs_dir.mkdir(exist_ok=True)
        plot = report.plot(result, docs_dir / "benchmarks-latency.png")
        (docs_dir / "benchmarks.md").write_text(report.docs_page(result, plot is not None))
    else:
        report.plot(result, out / "latency.png")
    note(f"done in {meta['elapsed_s']:.0f}s; results in {out}/latest.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
