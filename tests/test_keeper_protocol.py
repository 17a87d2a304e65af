"""The job keeper's protocol, spoken directly to a real keeper process.

Each test starts ``agent.keeper.keeper`` the way the agent does (a fresh isolated
interpreter with ``--config``, here listening at ``--socket`` in the test's directory)
and plays the agent over its SOCK_SEQPACKET socket with :mod:`agent.keeper.spawnproto`:
starts, stops, acknowledgements, reloads, detaching and attaching again, and messages
no agent would send. The keeper decides every start itself, from its own config file
and policy (:mod:`agent.keeper.decision`): the agent sends only who asks and what. So
these tests are also the compromised agent of issue 24: whatever it sends (commands
the policy does not have, an identity another entry is kept for, a forged plan, argv,
user or capabilities, descriptors, limits above the maxima), nothing starts but what
the policy allows some identity to start, as the user the configuration gives.
What the keeper decides on its own (the output cap, the timeout, the stop grace, the
end of a job while no agent is attached) is checked here against real processes; the
supervisor's side of the same protocol is tests/test_supervisor_unit.py.
"""

from __future__ import annotations

import copy
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import agent
from agent.keeper import spawnproto as proto
from agent.keeper.admission import StartRequest
from agent.keeper.decision import NO_CGROUP_NOTE, request_from_wire, request_to_wire
from agent.keeper.keeper import ORPHANS_RUNNING
from agent.keeper.keptjobs import JOB_ID
from agent.keeper.spawn import SPAWN_ENV

from helpers import IS_ROOT, make_safe_dir, to_toml, wait_for

PACKAGE_ROOT = str(Path(agent.__file__).resolve().parent.parent)
KEEPER_MAIN = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from agent.keeper.keeper import main; sys.exit(main(sys.argv[1:]))"
)
Msg = dict[str, Any]
# The job user the configuration gives (as root); a non-root keeper runs jobs as itself.
JOB_UID = pwd.getpwnam("nobody").pw_uid if IS_ROOT else os.geteuid()
STOP_GRACE = 0.3
OUTPUT_MAX = 1 << 20  # [limits.max] output_bytes
CAP = {"output_bytes": OUTPUT_MAX}  # the limits every job gets ([limits.default])

POLICY = """version: 1
entries:
  - name: sh
    command: /bin/sh
    aliases: [sh]
    args: {max_count: 4, max_length: 4096}
  - name: echo
    command: /bin/echo
    aliases: [echo]
  - name: "true"
    command: /bin/true
    aliases: ["true"]
  - name: "yes"
    command: /usr/bin/yes
    aliases: ["yes"]
  - name: sleep
    command: /bin/sleep
    aliases: [sleep]
    args: {max_count: 1, patterns: ['[0-9.]+']}
  - name: whoami
    command: /usr/bin/id
    aliases: [id]
    identities: [alice]
"""
# A job that connects to the keeper's own socket (as root when the keeper is root: the
# agent's own uid, which only the keeper's descendant check can refuse).
PROBE_ENTRY = """  - name: keeper-probe
    command: /usr/bin/python3
    aliases: [python3]
    args: {max_count: 8, max_length: 4096}
""" + ("    user: root\n    allow_root: true\n" if IS_ROOT else "")


def _python_cannot_run_as(uid: int) -> str:
    """Why this interpreter cannot run the keeper as ``uid`` ("" if it can): a Python
    built with a shared libpython under /root (pyenv's 3.10 here) cannot be loaded by
    another user."""
    r = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
         sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "import agent.keeper.keeper", PACKAGE_ROOT],
        capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    if r.returncode == 0:
        return ""
    first = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    return f"the test venv's Python cannot run as uid {uid}: {first}"


class Conn:
    """One connection to the keeper, as an agent: every message it got is in ``seen``."""

    def __init__(self, keeper: Keeper, sock: socket.socket) -> None:
        self.keeper, self.sock = keeper, sock
        self.seen: list[Msg] = []
        self.pipes: dict[str, int] = {}  # a job's pipe that came with its start's answer
        self.pings = 0
        sock.settimeout(10)  # a keeper that never answers fails the test, never hangs it

    def send(self, msg: Msg, fds: list[int] | tuple[int, ...] = ()) -> None:
        proto.send(self.sock, msg, fds)

    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)

    def recv(self) -> Msg | None:
        """The next message, or None once the keeper closed this connection."""
        try:
            data, fds = proto.recv(self.sock)
        except ConnectionResetError:
            return None
        if not data:
            return None
        msg, byrole = proto.decode(data, fds)
        if "pipe" in byrole:
            self.pipes[str(msg.get("job"))] = byrole.pop("pipe")
        for fd in byrole.values():
            os.close(fd)
        if msg["op"] in ("started", "admitted") and "pid" in msg:
            self.keeper.pids.add(msg["pid"])
        self.seen.append(msg)
        return msg

    def wait(self, pred: Callable[[Msg], bool]) -> Msg:
        """The first message (seen already, or next) that ``pred`` accepts."""
        for m in self.seen:
            if pred(m):
                return m
        while True:
            got = self.recv()
            assert got is not None, "the keeper closed the connection"
            if pred(got):
                return got

    def answer(self, job: str) -> Msg:
        """The keeper's first answer to a start: "admitted" or "refused"."""
        return self.wait(lambda m: m["op"] in ("admitted", "refused") and m.get("job") == job)

    def started(self, job: str) -> Msg:
        """The start's outcome: "started" (pid or error), or its refusal."""
        return self.wait(lambda m: m["op"] in ("started", "refused") and m.get("job") == job)

    def finished(self, job: str) -> Msg:
        """The job's finished report (its text without the note every job of a keeper
        without cgroups gets)."""
        fin = self.wait(lambda m: m["op"] == "finished" and m["job"] == job)
        fin["text"] = fin["text"].replace(f"; {NO_CGROUP_NOTE}", "").replace(NO_CGROUP_NOTE, "")
        return fin

    def output(self, job: str, size: int) -> None:
        """Wait for an output report of ``job`` at ``size`` bytes or more (a job that ends
        in the same turn as its output has it in its "finished" report instead)."""
        self.wait(
            lambda m: (
                (m["op"] == "output" and any(j == job and s >= size for j, s, _ in m["jobs"]))
                or (m["op"] == "finished" and m["job"] == job and m["size"] >= size)
            )
        )

    def ping(self) -> list[Msg]:
        """Every message up to the answer to a start the keeper refuses at once (its
        malformed id): all it did before has been done."""
        self.pings += 1
        rid, before = f"ping-{self.pings}", len(self.seen)
        self.send({"op": "start", "id": rid})
        answer = self.wait(lambda m: m["op"] == "refused" and m.get("id") == rid)
        assert answer["message"] == "malformed start: id"
        return self.seen[before:-1]

    def start(
        self,
        argv: list[str],
        *,
        record: Msg | None = None,
        job: str | None = None,
        **req: Any,
    ) -> str:
        job = job or str(uuid.uuid4())
        self.send(*start_message(job, argv, record=record, **req))
        return job

    def run(self, argv: list[str], **kw: Any) -> Msg:
        """Start a job and return its finished report."""
        job = self.start(argv, **kw)
        assert "pid" in self.started(job), self.started(job)
        return self.finished(job)

    def refused(self, argv: list[str], **kw: Any) -> Msg:
        """Start a job the keeper must refuse; its refusal (nothing was admitted)."""
        job = self.start(argv, **kw)
        answer = self.answer(job)
        assert answer["op"] == "refused", answer
        return answer

    def close(self) -> None:
        self.sock.close()
        for fd in self.pipes.values():
            os.close(fd)
        self.pipes.clear()


def start_message(
    job: str,
    argv: list[str],
    *,
    record: Msg | None = None,
    identity: str = "alice",
    timeout: int | None = None,
    limits: dict[str, int | None] | None = None,
    env: dict[str, str] | None = None,
    secret_args: tuple[int, ...] = (),
) -> tuple[Msg, list[int]]:
    """A start as KeeperClient.start makes it: who asks and what, never a plan."""
    req = StartRequest(
        identity=identity,
        command=argv[0],
        path=argv[1] if len(argv) > 1 else "",
        args=tuple(argv[2:]),
        env=env or {},
        timeout_seconds=timeout,
        limits=limits or {},
        secret_args=secret_args,
    )
    msg = {
        "op": "start",
        "id": 1,
        "job": job,
        "request": request_to_wire(req),
        "record": {"id": job} if record is None else record,
    }
    return msg, []


class Keeper:
    """A keeper process listening in a test's directory, with its own config and policy.

    ``sections`` override keys of its config file (as helpers.default_config does).
    """

    def __init__(
        self,
        tmp_path: Path,
        *,
        policy: str = POLICY,
        config: bool = True,
        run_as: int | None = None,
        caps: str = "+setuid,+setgid",
        cgroup_jobs: Path | None = None,
        env: dict[str, str] | None = None,
        **sections: Any,
    ) -> None:
        self.dir = tmp_path / "k"
        self.dir.mkdir(mode=0o711)
        self.path = str(self.dir / "keeper.sock")
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.log_path = tmp_path / "keeper.log"
        self.pids: set[int] = set()  # every job it said it started
        self.conns: list[Conn] = []
        # The scratch root: traversable by the job user (pytest's folders are not).
        self.safe = make_safe_dir()
        scratch = self.safe / "scratch"
        scratch.mkdir(mode=0o711)
        self.policy_path = tmp_path / "policy.yaml"
        self.policy_path.write_text(policy)
        base: dict[str, dict[str, Any]] = {
            "grpc_server": {
                "addr": "127.0.0.1:1",
                "use_tls": False,
                "allow_plaintext_loopback": True,
            },
            "auth": {"allow_anonymous": True},
            "jobs": {
                "policy_file": str(self.policy_path),
                "state_dir": str(tmp_path / "state"),
                "run_as_user": "nobody",
                "stop_grace_seconds": STOP_GRACE,
            },
            "limits": {
                "default": {"output_bytes": OUTPUT_MAX},
                "max": {"output_bytes": OUTPUT_MAX},
            },
            "cgroups": {"mode": "off"},
            "confinement": {"scratch_dir": str(scratch)},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        self.config_path = tmp_path / "config.toml"
        self.config_path.write_text(to_toml(base))
        env = {k: v for k, v in os.environ.items() if k == SPAWN_ENV} | (env or {})
        args = ["--socket", self.path, "--output-dir", str(self.out)]
        if config:
            args += ["--config", str(self.config_path)]
        prefix: list[str] = []
        if run_as is not None:
            # The standard unit's keeper: a user of its own holding CAP_SETUID and
            # CAP_SETGID as ambient capabilities (and nothing else in its bounding set);
            # the privileged unit's holds ``caps`` instead; the test, root, attaches as
            # its agent.
            why = _python_cannot_run_as(run_as)
            if why:
                pytest.skip(why)
            (tmp_path / "state").mkdir(exist_ok=True)
            for d in (self.dir, self.out, tmp_path / "state", scratch):
                os.chown(d, run_as, run_as)
            prefix = ["setpriv", f"--reuid={run_as}", f"--regid={run_as}", "--clear-groups",
                      f"--inh-caps={caps}", f"--ambient-caps={caps}",
                      f"--bounding-set=-all,{caps}", "--"]  # fmt: skip
            args += ["--agent-uid", str(os.geteuid())]
        if cgroup_jobs is not None:
            args += ["--cgroup-jobs", str(cgroup_jobs), "--controllers", ""]
        self.argv = [*prefix, sys.executable, "-I", "-c", KEEPER_MAIN, PACKAGE_ROOT, *args]
        self.env = env
        self.launch()

    def launch(self) -> None:
        """Start the keeper process (again, after the last one died: same socket, output
        folder and config; its log appended)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                cwd="/",
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect(self) -> Conn:
        def attempt() -> socket.socket | None:
            assert self.alive(), self.log()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                proto.bind_long(sock, self.path, connect=True)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                return None
            return sock

        conn = Conn(self, wait_for(attempt))
        self.conns.append(conn)
        return conn

    def attach(self) -> tuple[Conn, Msg]:
        """Connect as the agent; the connection and the keeper's hello."""
        conn = self.connect()
        hello = conn.recv()
        assert hello is not None and hello["op"] == "hello", (hello, self.log())
        return conn, hello

    def reattach(self, pred: Callable[[Msg], bool]) -> tuple[Conn, Msg]:
        """Attach again (detaching at once) until the hello is one ``pred`` accepts."""

        def attempt() -> tuple[Conn, Msg] | None:
            conn = self.connect()
            hello = conn.recv()
            if hello is not None and pred(hello):
                return conn, hello
            conn.close()
            return None

        got: tuple[Conn, Msg] = wait_for(attempt)
        return got

    def stop(self) -> None:
        for c in self.conns:
            c.close()
        if self.alive():
            try:  # "exit" kills what still runs
                conn, _ = self.attach()
                conn.send({"op": "exit"})
                self.proc.wait(timeout=5)
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait()
        for pid in self.pids:  # whatever a dead keeper left
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.safe, ignore_errors=True)


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[Keeper]:
    k = Keeper(tmp_path, policy=POLICY + PROBE_ENTRY)
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture
def make_keeper(tmp_path: Path) -> Iterator[Callable[..., Keeper]]:
    """Keepers with their own config (each in a folder of its own)."""
    made: list[Keeper] = []

    def make(**kw: Any) -> Keeper:
        d = tmp_path / f"keeper{len(made)}"
        d.mkdir()
        k = Keeper(d, **kw)
        made.append(k)
        return k

    try:
        yield make
    finally:
        for k in made:
            k.stop()


def job_file(k: Keeper, job: str) -> bytes:
    return (k.out / f"{job}.out").read_bytes()


SH = os.path.realpath("/bin/sh")

# ---------------------------------------------------------------- a job's life


def test_hello_start_output_and_finished(keeper: Keeper) -> None:
    """hello on attach; a start is admitted (the canonical program, timeout and limits
    the keeper resolved), answers started (pid), output progress, finished with the
    state, exit code and size, and the record the keeper completed; the output file
    has the bytes."""
    c, hello = keeper.attach()
    assert hello["protocol"] == 2 and hello["pid"] == keeper.proc.pid
    assert hello["spawn"] in ("vfork", "fork") and (hello["jobs"], hello["ended"]) == ([], [])
    job = c.start(["sh", "-c", "printf hello; exit 3"], record={"id": "x", "n": 1})
    admitted = c.answer(job)
    assert admitted == {
        "op": "admitted",
        "id": 1,
        "job": job,
        "command": SH,
        "timeout": 0,
        "limits": CAP,
        "entry": "sh",
    }
    started = c.started(job)
    assert isinstance(started["pid"], int) and started["pid"] > 1 and started["id"] == 1
    c.output(job, 5)
    fin = c.finished(job)
    assert (fin["state"], fin["text"], fin["exit"]["code"], fin["size"]) == (
        "FAILED",
        "exit status 3",
        3,
        5,
    )
    assert fin["record"] == {"id": "x", "n": 1, "command": SH, "timeout_seconds": 0, "limits": CAP}
    assert fin["persist"] is True and not fin["truncated"] and fin["exit"]["ended"] > 0
    assert job_file(keeper, job) == b"hello"
    ok = c.run(["echo", "hi"])
    assert (ok["state"], ok["text"], ok["exit"]["code"], ok["size"]) == ("SUCCEEDED", "", 0, 3)
    assert job_file(keeper, ok["job"]) == b"hi\n"


@pytest.mark.parametrize("path", ["vfork", "fork"])
def test_an_agent_that_asks_gets_the_admission_and_the_pid_in_one_message(
    make_keeper: Callable[..., Keeper], monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The hello lists the keeper's features; an agent that asks for admitted+started
    (anything else it asks for is ignored) gets one "admitted" with the pid where the
    spawn answers at once (the vfork path), and on the fork path, whose spawn answers
    later, "admitted" first and "started" after, as an agent that did not ask gets
    (test_hello_start_output_and_finished)."""
    monkeypatch.setenv(SPAWN_ENV, path)
    keeper = make_keeper(policy=POLICY)
    c, hello = keeper.attach()
    assert hello["features"] == ["admitted+started", "pipe-with-start"]
    assert hello["spawn"] == path
    c.send({"op": "features", "use": ["admitted+started", "no-such-thing", 7]})
    job = c.start(["echo", "hi"])
    first = c.answer(job)
    if path == "vfork":
        assert first["op"] == "admitted" and isinstance(first["pid"], int) and first["pid"] > 1
        assert first["command"].endswith("/echo")
    else:
        assert first["op"] == "admitted" and "pid" not in first
        assert "pid" in c.started(job)
    fin = c.finished(job)
    assert (fin["state"], fin["size"]) == ("SUCCEEDED", 3)
    # Nothing else came for the start: one answer (vfork), or two (fork).
    said = [m for m in c.seen if m.get("job") == job and m["op"] in ("admitted", "started")]
    assert len(said) == (1 if path == "vfork" else 2), said


def test_an_orphan_a_job_leaves_is_reaped(keeper: Keeper) -> None:
    """A job's leader ends, leaving a process behind: it is killed with the leader's group
    and, now a child of the keeper (a subreaper), reaped: no zombie stays (the keeper
    looks for exited orphans after each job's end, at most every ORPHANS_EVERY)."""
    c, _ = keeper.attach()
    fin = c.run(["sh", "-c", "sleep 300 & echo $!"])
    orphan = int(job_file(keeper, fin["job"]))

    # Killed at once; its /proc entry stays (a zombie) until its parent, the keeper, reaps.
    wait_for(lambda: not os.path.exists(f"/proc/{orphan}"), timeout=10)
    assert keeper.alive()


def test_an_orphan_that_exits_while_its_job_runs_is_reaped(keeper: Keeper) -> None:
    """A process a job left behind (its parent gone: now the keeper's child) exits while
    the job still runs and no job ends: it is reaped all the same (the keeper looks every
    ORPHANS_RUNNING while jobs run), not left a zombie until some job ends."""
    c, _ = keeper.attach()
    job = c.start(["sh", "-c", "(sleep 0.3 & echo $!); sleep 300"])
    assert "pid" in c.started(job)
    c.output(job, 2)
    orphan = int(job_file(keeper, job))
    wait_for(lambda: not os.path.exists(f"/proc/{orphan}"), timeout=3 * ORPHANS_RUNNING)
    c.send({"op": "stop", "job": job, "how": "stop"})
    assert c.finished(job)["state"] == "STOPPED"


def test_jobs_run_as_the_configured_user_with_the_configured_environment(
    keeper: Keeper,
) -> None:
    """The job's user, environment and working directory are the configuration's and
    the policy's: the agent sends none of them."""
    c, _ = keeper.attach()
    fin = c.run(["sh", "-c", 'id -u; echo "$AGENT_JOB_ID $PATH"; pwd'])
    uid, env, cwd = job_file(keeper, fin["job"]).decode().splitlines()
    assert int(uid) == JOB_UID
    assert env == f"{fin['job']} /usr/local/bin:/usr/bin:/bin"
    assert cwd == str(keeper.safe / "scratch" / fin["job"])


def test_output_cap_truncates_and_kills_or_not(make_keeper: Callable[..., Keeper]) -> None:
    """on_output_cap = "kill": truncated at the cap and FAILED naming it; "truncate":
    truncated and the job ends as it would have. The cap is the request's limit."""
    k = make_keeper()
    c, _ = k.attach()
    fin = c.run(["yes"], limits={"output_bytes": 1000})
    assert fin["state"] == "FAILED" and fin["truncated"] and fin["size"] == 1000
    assert fin["text"].startswith("the agent stopped the job: its output reached the cap"), fin
    assert job_file(k, fin["job"]) == b"y\n" * 500
    k = make_keeper(jobs={"on_output_cap": "truncate"})
    c, _ = k.attach()
    fin = c.run(["sh", "-c", "yes | head -c 5000; exit 0"], limits={"output_bytes": 1000})
    assert (fin["state"], fin["text"], fin["truncated"], fin["size"]) == (
        "SUCCEEDED",
        "",
        True,
        1000,
    )
    assert job_file(k, fin["job"]) == b"y\n" * 500


def test_timeout_stop_and_kill_after_the_grace(keeper: Keeper) -> None:
    """timeout -> TIMED_OUT; stop -> STOPPED by request; a job ignoring SIGTERM is
    killed after the configured grace; "shutdown" and "kill" say so too."""
    c, _ = keeper.attach()
    fin = c.run(["sleep", "30"], timeout=1)
    assert (fin["state"], fin["text"]) == ("TIMED_OUT", "timed out after 1 s (killed by SIGTERM)")
    assert fin["record"]["timeout_seconds"] == 1
    for how, state, text in (
        ("stop", "STOPPED", "stopped by request (killed by SIGTERM)"),
        ("shutdown", "STOPPED", "stopped by agent shutdown (killed by SIGTERM)"),
        ("kill", "FAILED", "killed by SIGKILL"),
    ):
        job = c.start(["sleep", "30"])
        c.started(job)
        c.send({"op": "stop", "job": job, "how": how})
        fin = c.finished(job)
        assert (fin["state"], fin["text"]) == (state, text)
    stubborn = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]
    job = c.start(stubborn)
    c.output(job, 6)  # the trap is set
    c.send({"op": "stop", "job": job, "how": "stop"})
    fin = c.finished(job)
    assert (fin["state"], fin["exit"]["signal"]) == ("STOPPED", signal.SIGKILL)
    assert fin["text"] == "stopped by request (killed by SIGKILL)"


def test_jobs_outlive_the_agent_and_their_ends_wait_for_an_ack(
    keeper: Keeper, tmp_path: Path
) -> None:
    """Detach with a long and a short job; the short one ends meanwhile: the next hello
    lists the long one (with its record, as the keeper completed it) and the short one's
    end, again and again until acknowledged. A job not to be recorded is never listed."""
    gate = keeper.safe / "gate"
    c, _ = keeper.attach()
    long = c.start(["sh", "-c", "echo long; exec sleep 30"], record={"id": "L", "k": [1]})
    short = c.start(
        ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done; echo short; exit 4"],
        record={"id": "S"},
    )
    unrecorded = c.start(["sleep", "30"])
    pids = {j: c.started(j)["pid"] for j in (long, short, unrecorded)}
    c.send({"op": "stop", "job": unrecorded, "how": "not_recorded"})
    assert c.finished(unrecorded)["persist"] is False
    c.output(long, 5)
    c.close()
    gate.touch()

    def lists_short(h: Msg) -> bool:
        return any(f["job"] == short for f in h["ended"])

    completed = {"command": SH, "timeout_seconds": 0, "limits": CAP}
    for _ in range(2):  # not acknowledged: told again
        c, hello = keeper.reattach(lists_short)
        (end,) = hello["ended"]
        assert (end["state"], end["exit"]["code"], end["size"]) == ("FAILED", 4, 6)
        assert end["record"] == {"id": "S", **completed} and end["text"].startswith("exit status 4")
        (kept,) = hello["jobs"]
        assert kept == {
            "job": long,
            "pid": pids[long],
            "size": 5,
            "truncated": False,
            "ending": False,
            "record": {"id": "L", "k": [1], **completed},
        }
        c.close()
    assert job_file(keeper, short) == b"short\n"
    c, _ = keeper.attach()
    c.send({"op": "ack", "jobs": [short]})
    c.ping()
    c.close()
    c, hello = keeper.attach()
    assert hello["ended"] == [] and [j["job"] for j in hello["jobs"]] == [long]
    # The adopted job is this agent's: its reports and stops work as before.
    c.send({"op": "stop", "job": long, "how": "stop"})
    assert c.finished(long)["state"] == "STOPPED"


def test_the_hello_is_the_first_message_an_agent_gets(keeper: Keeper) -> None:
    """A job writes all the time while agents attach again and again: each one's first
    message is the hello (its output report went before the hello once, and the agent
    took it for the hello)."""
    c, _ = keeper.attach()
    job = c.start(["sh", "-c", "while :; do echo x; done"])
    assert c.started(job).get("pid")
    c.output(job, 1)
    c.close()
    for _ in range(30):
        conn = keeper.connect()
        first = conn.recv()
        assert first is not None and first["op"] == "hello", first
        conn.close()
    c, _ = keeper.attach()
    c.send({"op": "stop", "job": job, "how": "stop"})
    assert c.finished(job)["state"] == "STOPPED"


def test_only_one_agent_at_a_time(keeper: Keeper) -> None:
    """A second connection while an agent is attached is closed without a hello; the
    first carries on, and once it detaches another may attach."""
    first, _ = keeper.attach()
    second = keeper.connect()
    assert second.recv() is None
    assert "refused a connection: another agent is attached" in keeper.log()
    assert first.run(["true"])["state"] == "SUCCEEDED"
    first.close()
    keeper.reattach(lambda h: True)


PROBE = textwrap.dedent("""\
    import os, socket, sys, time
    path, gate = sys.argv[1], sys.argv[2]
    while not os.path.exists(gate):
        time.sleep(0.02)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    d = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    s.connect("/proc/self/fd/%d/%s" % (d, os.path.basename(path)))
    try:
        data = s.recv(1 << 16)
    except OSError as e:
        data = repr(e).encode()
    print("RECEIVED", len(data), data[:200])
    """)


def test_a_job_cannot_talk_to_the_keeper(keeper: Keeper) -> None:
    """A job of the agent's own uid connects to the socket while no agent is attached:
    it is closed without a hello, for being one of the keeper's descendants."""
    gate = keeper.safe / "probe-gate"
    c, _ = keeper.attach()
    job = c.start(["python3", "-I", "-c", PROBE, keeper.path, str(gate)])
    pid = c.started(job).get("pid")
    assert pid, c.started(job)["message"]
    c.close()
    gate.touch()
    c, _ = keeper.reattach(lambda h: any(f["job"] == job for f in h["ended"]))
    assert job_file(keeper, job) == b"RECEIVED 0 b''\n", keeper.log()
    assert f"refused a connection: pid {pid} is one of the keeper's jobs" in keeper.log()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to connect as another user")
def test_another_uid_is_refused(keeper: Keeper) -> None:
    """A process of another uid that can reach the socket is closed without a hello."""
    keeper.connect().close()  # listening by now
    os.chmod(keeper.path, 0o666)  # past the file's mode: the keeper's own check
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.chdir(keeper.dir)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect("keeper.sock")
            os.write(w, b"got %d bytes" % len(s.recv(1 << 16)))
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read()
    os.waitpid(child, 0)
    assert said == b"got 0 bytes"
    assert "refused a connection: uid 65534 is not the agent's (0)" in keeper.log()
    keeper.attach()  # and the agent's own uid still may


# ---------------------------------------------------------------- a compromised agent


def test_a_compromised_agent_starts_only_what_the_policy_allows(
    keeper: Keeper, tmp_path: Path
) -> None:
    """Whatever the agent asks, the keeper decides: a command the policy does not have,
    arguments its entry refuses, an entry kept for another identity, limits above the
    configured maxima or the kernel's, a timeout above the maximum: each is refused
    with the error the agent would have answered (kind, rule, message), and nothing
    starts. The same entry for the identity it is kept for runs (the identity is the
    agent's word: the point is that only what the policy allows someone runs)."""
    c, _ = keeper.attach()
    marker = keeper.safe / "marker"
    cases: list[tuple[list[str], dict[str, Any], str, str, str]] = [
        (["/usr/bin/touch", str(marker)], {}, "PERMISSION_DENIED", "command-not-allowed",
         "not started: command '/usr/bin/touch' is not in the policy [command-not-allowed]"),
        (["/bin/bash", "-c", f"touch {marker}"], {}, "PERMISSION_DENIED",
         "command-not-allowed", "command '/bin/bash' is not in the policy"),
        (["sleep", f"1; touch {marker}"], {}, "PERMISSION_DENIED", "arg-pattern", ""),
        (["id"], {"identity": "mallory"}, "PERMISSION_DENIED", "command-not-allowed",
         "command 'id' is not in the policy"),
        (["echo", "x"], {"limits": {"output_bytes": OUTPUT_MAX + 1}}, "INVALID_ARGUMENT",
         "limit-above-maximum", f"above the maximum of {OUTPUT_MAX}"),
        (["echo", "x"], {"limits": {"open_files": (1 << 62)}}, "INVALID_ARGUMENT",
         "limit-above-kernel", "open_files"),
        (["echo", "x"], {"limits": {"output_bytes": -1}}, "INVALID_ARGUMENT",
         "limit-above-maximum", "must not be negative"),
        (["echo", "x"], {"secret_args": (5,)}, "INVALID_ARGUMENT", "bad-secret-index", ""),
        (["echo", "x"], {"env": {"LD_PRELOAD": "/tmp/evil.so"}}, "PERMISSION_DENIED", "", ""),
        (["echo", "x" * 5000], {}, "INVALID_ARGUMENT", "malformed-path", "longer than 4096"),
        (["echo", "x", *["a"] * 2000], {}, "INVALID_ARGUMENT", "too-many-args", ""),
        (["echo", "x"], {"env": {f"V{i}": "" for i in range(100)}}, "INVALID_ARGUMENT",
         "too-many-env", ""),
    ]  # fmt: skip
    for argv, req, kind, rule, text in cases:
        answer = c.refused(argv, **req)
        assert answer["kind"] == kind, (argv, answer)
        assert rule in answer["rule"] and text in answer["message"], (argv, answer)
    c.ping()
    assert not marker.exists() and not any(m["op"] == "started" for m in c.seen)
    # The same entries, as the policy allows them.
    ran = c.run(["id", "-u"], identity="alice")
    assert ran["state"] == "SUCCEEDED" and job_file(keeper, ran["job"]) == f"{JOB_UID}\n".encode()
    assert c.run(["sleep", "0"])["state"] == "SUCCEEDED"


def test_a_compromised_agent_cannot_hand_over_a_plan_user_or_descriptors(
    keeper: Keeper, tmp_path: Path
) -> None:
    """A start that carries what only the keeper makes (a plan with its own argv, uid,
    capabilities; a run; descriptors; keys no request has) is refused as malformed and
    starts nothing; a request's fields of the wrong type or size likewise."""
    c, _ = keeper.attach()
    marker = keeper.safe / "marker"
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    evil = os.open("/usr/bin/touch", os.O_RDONLY | os.O_CLOEXEC)
    try:
        good = start_message(str(uuid.uuid4()), ["true"])[0]
        plan = {
            "path": "/usr/bin/touch",
            "argv": ["touch", str(marker)],
            "env": {},
            "cwd": "/",
            "umask": 0,
            "uid": 0,
            "gid": 0,
            "limits": {},
            "capabilities": list(range(41)),
            "no_new_privs": False,
        }
        request = good["request"]
        forged: list[tuple[Msg, list[int], str]] = [
            ({"plan": plan}, [], "malformed start: unknown keys"),
            ({"run": {"timeout": 0, "cap": 0}}, [], "malformed start: unknown keys"),
            ({"uid": 0}, [], "malformed start: unknown keys"),
            ({"fds": ["exec"]}, [evil], "malformed start: descriptors"),
            ({"fds": ["stdout"]}, [null], "malformed start: descriptors"),
            ({"request": {**request, "uid": 0}}, [], "malformed start: request"),
            ({"request": {**request, "argv": ["/usr/bin/touch"]}}, [], "malformed start: request"),
            ({"request": {**request, "capabilities": [0]}}, [], "malformed start: request"),
            ({"request": None}, [], "malformed start: request"),
            ({"request": {**request, "identity": 7}}, [], "malformed start: request identity"),
            ({"request": {**request, "identity": "a" * 5000}}, [],
             "malformed start: request identity"),
            ({"request": {**request, "command": ["true"]}}, [], "malformed start: request command"),
            ({"request": {**request, "path": None}}, [], "malformed start: request path"),
            ({"request": {**request, "args": "x"}}, [], "malformed start: request args"),
            ({"request": {**request, "args": [1]}}, [], "malformed start: request args"),
            ({"request": {**request, "env": {"A": 1}}}, [], "malformed start: request env"),
            ({"request": {**request, "secret_args": [True]}}, [],
             "malformed start: request secret_args"),
            ({"request": {**request, "limits": {"bogus": 1}}}, [],
             "malformed start: request limits"),
            ({"request": {**request, "limits": {"open_files": 1 << 70}}}, [],
             "malformed start: request limits"),
            ({"request": {**request, "limits": {"open_files": "1"}}}, [],
             "malformed start: request limits"),
            ({"request": {**request, "timeout": -1}}, [], "malformed start: request timeout"),
            ({"request": {**request, "timeout": 1.5}}, [], "malformed start: request timeout"),
            ({"record": []}, [], "malformed start: record"),
            ({"record": {"x": "y" * (1 << 20)}}, [], "malformed start: record"),
        ]  # fmt: skip
        for i, (change, fds, why) in enumerate(forged):
            msg = {**copy.deepcopy(good), "id": 100 + i, "job": str(uuid.uuid4()), **change}
            c.send(msg, fds)
            answers = c.ping()
            said = [
                (m["op"], m.get("id"), m.get("kind"), m["message"][: len(why)]) for m in answers
            ]
            assert said == [("refused", msg["id"], "INTERNAL", why)], change
        assert not marker.exists() and not any(m["op"] == "started" for m in c.seen)
        assert c.run(["true"])["state"] == "SUCCEEDED"
    finally:
        os.close(null)
        os.close(evil)


def test_reload_reads_the_keepers_own_policy_file(keeper: Keeper) -> None:
    """ "reload" reads the policy again from the keeper's config file (the agent cannot
    hand one over): a new entry is allowed from then on, an invalid file is refused and
    the current policy stays."""
    c, _ = keeper.attach()
    assert c.refused(["/usr/bin/uname"])["rule"] == "command-not-allowed"
    keeper.policy_path.write_text(
        POLICY + "  - name: uname\n    command: /usr/bin/uname\n    aliases: [uname]\n"
    )
    c.send({"op": "reload", "id": 7, "policy": {"entries": []}})
    answer = c.wait(lambda m: m["op"] == "reloaded")
    assert (answer["id"], answer["error"], answer["entries"]) == (7, "", 7)
    assert c.run(["uname"])["state"] == "SUCCEEDED"
    keeper.policy_path.write_text("version: 1\nentries: [{name: broken}]\n")
    c.send({"op": "reload", "id": 8})
    answer = c.wait(lambda m: m["op"] == "reloaded" and m["id"] == 8)
    assert str(keeper.policy_path) in answer["error"] and answer["entries"] == 0
    assert c.run(["uname"])["state"] == "SUCCEEDED"  # the last good policy


def test_a_keeper_without_a_config_starts_nothing(make_keeper: Callable[..., Keeper]) -> None:
    """Without --config the keeper has no policy: every start is refused."""
    k = make_keeper(config=False)
    c, _ = k.attach()
    answer = c.refused(["true"])
    assert (answer["kind"], answer["rule"]) == ("FAILED_PRECONDITION", "no-policy")
    c.send({"op": "reload", "id": 3})
    assert "without --config" in c.wait(lambda m: m["op"] == "reloaded")["error"]


def test_a_keeper_whose_policy_is_invalid_does_not_start(tmp_path: Path) -> None:
    """An invalid policy at the keeper's start: it says why and exits 2."""
    k = Keeper(tmp_path, policy="version: 1\nentries: [{name: broken}]\n")
    try:
        assert k.proc.wait(timeout=30) == 2
        assert "cannot load the configuration and policy" in k.log()
        assert str(k.policy_path) in k.log()
    finally:
        k.stop()


# ---------------------------------------------------------------- hostile messages


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_hostile_messages_are_refused_or_ignored(keeper: Keeper, tmp_path: Path) -> None:
    """Malformed, unknown and oversized messages each get an error answer or are
    ignored; the keeper lives on, keeps no descriptor of theirs and starts jobs."""
    c, _ = keeper.attach()
    # The entries' Landlock rulesets the keeper keeps prepared (their descriptors).
    c.run(["true"])
    c.run(["sleep", "0"])
    c.ping()
    fds_before = _fd_count(keeper.proc.pid)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    marker = keeper.safe / "spawned"
    bystander = subprocess.Popen(["/bin/sleep", "30"])
    try:
        ignored: list[tuple[bytes | Msg, list[int]]] = [
            (b"\xff\xfe garbage", []),
            (b"{not json", []),
            (b"[1, 2]", []),
            ({"x": 1}, []),
            ({"op": 5}, []),
            ({"op": "hello"}, []),
            # The spawner's own messages: not taken from an agent of the keeper.
            ({"op": "signal", "pid": bystander.pid, "sig": 9}, []),
            (
                {
                    "op": "spawn",
                    "id": 1,
                    "plan": {
                        "path": "/usr/bin/touch",
                        "argv": ["touch", str(marker)],
                        "env": {},
                        "cwd": "/",
                        "umask": 0,
                    },
                    "fds": ["stdout"],
                },
                [null],
            ),
            ({"op": "start", "fds": ["exec"]}, [null, null]),  # roles do not match
            ({"op": "start", "fds": ["bogus"]}, [null]),
            ({"op": "start", "fds": ["exec", "exec"]}, [null, null]),
            ({"op": "start", "fds": []}, [null] * 9),  # more than MAX_FDS
            ({"op": "stop", "job": ["unhashable"], "how": "kill"}, []),
            ({"op": "stop", "job": str(uuid.uuid4()), "how": "kill"}, []),
            ({"op": "ack", "jobs": "not a list"}, []),
            ({"op": "ack", "jobs": [1, None, {}]}, []),
            ({"op": "reload"}, []),  # no id: nobody to answer
            ({"op": "features", "use": "admitted+started"}, []),  # not a list
            ({"op": "features", "use": [{"x": 1}, None, "z" * 100_000]}, []),
            ({"op": "features"}, []),
        ]
        for body, fds in ignored:
            if isinstance(body, dict):
                c.send_raw(json.dumps(body).encode(), fds)
            else:
                c.send_raw(body, fds)
            assert c.ping() == [], body
        for role, content, size in (
            ("body", b'{"op": "start"}', proto.BODY_MAX + 1),  # oversized
            ("body", b'{"op": "exit"}', 0),  # not the header's op
            ("plan", b"{not json", 0),
        ):
            memfd = os.memfd_create("hostile", os.MFD_CLOEXEC)
            os.write(memfd, content)
            if size:
                os.ftruncate(memfd, size)
            c.send_raw(json.dumps({"op": "start", "fds": [role]}).encode(), [memfd])
            os.close(memfd)
            assert c.ping() == [], role
        assert keeper.alive() and bystander.poll() is None

        dup = c.start(["sleep", "30"])
        c.started(dup)
        good = start_message(str(uuid.uuid4()), ["true"])[0]
        refusals: list[tuple[Msg, str]] = [
            ({"id": True}, "malformed start: id"),
            ({"id": None}, "malformed start: id"),
            ({"job": good["job"].upper()}, "malformed start: job"),
            ({"job": "../../etc/passwd"}, "malformed start: job"),
            ({"job": 7}, "malformed start: job"),
            ({"job": dup}, f"job {dup} exists already"),
        ]
        for i, (change, why) in enumerate(refusals):
            msg = {**copy.deepcopy(good), "id": 100 + i, "job": str(uuid.uuid4()), **change}
            c.send(msg)
            answers = c.ping()
            assert [(m["op"], m.get("id"), m.get("message")) for m in answers] == [
                ("refused", msg["id"], why)
            ], change
        c.send({"op": "stop", "job": dup, "how": "kill"})
        c.finished(dup)
        # A large record is fine: it travels in a body memfd.
        big = {"id": "big", "blob": "z" * (200 << 10)}
        assert c.run(["true"], record=big)["record"]["blob"] == big["blob"]
        c.ping()
        assert keeper.alive() and bystander.poll() is None and not marker.exists()
        assert _fd_count(keeper.proc.pid) == fds_before
    finally:
        os.close(null)
        bystander.kill()
        bystander.wait()


# Values the fuzzer puts anywhere. No timeout between about 24.8 days and 2**63: those
# are the bug test_a_timeout_of_months_does_not_kill_the_keeper shows.
POOL: list[Any] = [
    None, True, False, 0, 1, -1, 7, 0o1000, 1.5, -0.5, float("inf"), 1 << 63, -(1 << 63),
    "", "x", "/", "/bin/true", "/usr/bin/touch", "true", "sh", "A" * 5000, [],
    ["/bin/true"], [1], {}, {"a": 1}, {"PATH": 1}, {"id": "x"}, {"output_bytes": 5},
]  # fmt: skip


def _mutate(rng: random.Random, msg: Msg) -> None:
    """Drop, replace or add one key somewhere in a start message."""
    where = rng.choice(
        [msg, msg["request"] if isinstance(msg.get("request"), dict) else msg,
         msg["request"] if isinstance(msg.get("request"), dict) else msg]
    )  # fmt: skip
    if not where:
        where = msg
    action = rng.choice(["drop", "replace", "replace", "add"])
    key = rng.choice(sorted(where))
    if action == "drop":
        del where[key]
    elif action == "replace":
        where[key] = copy.deepcopy(rng.choice(POOL))
    else:
        where[rng.choice(["extra", "plan", "uid", "limits"])] = copy.deepcopy(rng.choice(POOL))


def test_fuzzed_starts_never_start_what_the_policy_does_not_allow(keeper: Keeper) -> None:
    """A few hundred seeded mutations of a valid start: the keeper survives each, and
    answers started with a pid only for a message whose job, record and request are
    well formed and whose request the policy allows (the program that ran is always
    one of the policy's)."""
    rng = random.Random(1234)
    c, _ = keeper.attach()
    sent: dict[str, Msg] = {}
    valid = start_message("", ["true"])[0]
    for i in range(300):
        msg = {**copy.deepcopy(valid), "id": 10_000 + i, "job": str(uuid.uuid4())}
        for _ in range(rng.randint(1, 3)):
            _mutate(rng, msg)
        if isinstance(msg.get("job"), str):
            sent[msg["job"]] = copy.deepcopy(msg)
        c.send(msg)
        c.ping()
        assert keeper.alive(), (msg, keeper.log())
    ran = [m for m in c.seen if m["op"] == "started" and "pid" in m]
    allowed = {os.path.realpath(p) for p in ("/bin/true", "/bin/sh", "/bin/echo")}
    for m in ran:
        msg = sent[m["job"]]
        assert isinstance(msg["id"], int) and not isinstance(msg["id"], bool), msg
        assert JOB_ID.match(msg["job"]) and isinstance(msg.get("record"), dict), msg
        assert set(msg) <= {"op", "id", "job", "request", "record"}, msg
        assert isinstance(request_from_wire(msg["request"]), StartRequest), msg
        assert c.answer(m["job"])["command"] in allowed, msg
    assert ran, "no mutation left a start valid: the fuzzer tests nothing but refusals"
    for m in ran:
        c.finished(m["job"])
    assert c.run(["true"])["state"] == "SUCCEEDED"


def test_a_timeout_of_months_does_not_kill_the_keeper(keeper: Keeper) -> None:
    """A timeout the agent admits (StartJob's is a uint32) must not take the keeper down
    with every job it holds."""
    c, _ = keeper.attach()
    job = c.start(["sleep", "30"], timeout=30 * 86400)
    assert "pid" in c.started(job)
    c.ping()
    assert keeper.alive()
    c.send({"op": "stop", "job": job, "how": "stop"})
    assert c.finished(job)["state"] == "STOPPED"


def test_an_ancestry_the_keeper_cannot_read_is_not_taken_for_the_agent() -> None:
    """descends_from answers "unknown" (None), never "not a job", for a process whose
    /proc entry (or a parent's) cannot be read: a job that hides a process of its own
    (non-dumpable, another user namespace) must not pass for the agent."""
    from agent.keeper.keeperconn import descends_from

    assert descends_from(os.getpid(), os.getpid()) is True
    assert descends_from(os.getpid(), 2**22 + 12345) is False  # walked up to pid 1
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert descends_from(gone.pid, os.getpid()) is None
