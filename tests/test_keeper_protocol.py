"""The job keeper's protocol, spoken directly to a real keeper process.

Each test starts ``agent.daemon.keeper`` the way the agent does (a fresh isolated
interpreter, here listening at ``--socket`` in the test's directory) and plays the agent
over its SOCK_SEQPACKET socket with :mod:`agent.daemon.spawnproto`: starts, stops,
acknowledgements, detaching and attaching again, and messages no agent would send.
What the keeper decides on its own (the output cap, the timeout, the stop grace, the
end of a job while no agent is attached) is checked here against real processes; the
supervisor's side of the same protocol is tests/test_supervisor_unit.py.
"""

from __future__ import annotations

import copy
import json
import os
import random
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
from agent.daemon import spawnproto as proto
from agent.daemon.keeper import JOB_ID, check_run
from agent.daemon.keeperclient import RunSpec
from agent.daemon.spawn import SPAWN_ENV, plan_of
from agent.daemon.spawner import check_plan

from helpers import IS_ROOT, spawn_spec, wait_for

PACKAGE_ROOT = str(Path(agent.__file__).resolve().parent.parent)
KEEPER_MAIN = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from agent.daemon.keeper import main; sys.exit(main(sys.argv[1:]))"
)
RUN = RunSpec(timeout=0, cpu_seconds=0, memory_max=0, note="", cap=0, kill_on_cap=True, grace=5)
Msg = dict[str, Any]


class Conn:
    """One connection to the keeper, as an agent: every message it got is in ``seen``."""

    def __init__(self, keeper: Keeper, sock: socket.socket) -> None:
        self.keeper, self.sock = keeper, sock
        self.seen: list[Msg] = []
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
        for fd in byrole.values():
            os.close(fd)
        if msg["op"] == "started" and "pid" in msg:
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

    def started(self, job: str) -> Msg:
        return self.wait(lambda m: m["op"] == "started" and m.get("job") == job)

    def finished(self, job: str) -> Msg:
        return self.wait(lambda m: m["op"] == "finished" and m["job"] == job)

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
        answer = self.wait(lambda m: m["op"] == "started" and m.get("id") == rid)
        assert answer["error"] == "malformed start: id"
        return self.seen[before:-1]

    def start(
        self,
        argv: list[str],
        *,
        run: RunSpec = RUN,
        record: Msg | None = None,
        job: str | None = None,
        **spec: Any,
    ) -> str:
        job = job or str(uuid.uuid4())
        self.send(*start_message(job, argv, run=run, record=record, **spec))
        return job

    def run(self, argv: list[str], **kw: Any) -> Msg:
        """Start a job and return its finished report."""
        job = self.start(argv, **kw)
        assert "pid" in self.started(job), self.started(job)
        return self.finished(job)

    def close(self) -> None:
        self.sock.close()


def start_message(
    job: str, argv: list[str], *, run: RunSpec = RUN, record: Msg | None = None, **spec: Any
) -> tuple[Msg, list[int]]:
    """A start as KeeperClient.start makes it (the keeper makes the output pipe)."""
    plan, roles, fds = plan_of(spawn_spec(argv, **spec))
    keep = [(r, fd) for r, fd in zip(roles, fds, strict=True) if r != "stdout"]
    msg = {
        "op": "start",
        "id": 1,
        "job": job,
        "plan": plan,
        "run": run.to_wire(),
        "record": {"id": job} if record is None else record,
        "fds": [r for r, _ in keep],
    }
    return msg, [fd for _, fd in keep]


class Keeper:
    """A keeper process listening in a test's directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "k"
        self.dir.mkdir(mode=0o711)
        self.path = str(self.dir / "keeper.sock")
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.log_path = tmp_path / "keeper.log"
        self.pids: set[int] = set()  # every job it said it started
        self.conns: list[Conn] = []
        env = {k: v for k, v in os.environ.items() if k == SPAWN_ENV}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", KEEPER_MAIN, PACKAGE_ROOT, "--socket", self.path,
                 "--output-dir", str(self.out)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/",
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


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[Keeper]:
    k = Keeper(tmp_path)
    try:
        yield k
    finally:
        k.stop()


def job_file(k: Keeper, job: str) -> bytes:
    return (k.out / f"{job}.out").read_bytes()


# ---------------------------------------------------------------- a job's life


def test_hello_start_output_and_finished(keeper: Keeper) -> None:
    """hello on attach; a start answers started (pid), output progress, finished with
    the state, exit code and size; the output file has the bytes."""
    c, hello = keeper.attach()
    assert hello["protocol"] == 1 and hello["pid"] == keeper.proc.pid
    assert hello["spawn"] in ("vfork", "fork") and (hello["jobs"], hello["ended"]) == ([], [])
    job = c.start(["/bin/sh", "-c", "printf hello; exit 3"], record={"id": "x", "n": 1})
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
    assert fin["record"] == {"id": "x", "n": 1} and fin["persist"] is True
    assert not fin["truncated"] and fin["exit"]["ended"] > 0
    assert job_file(keeper, job) == b"hello"
    ok = c.run(["/bin/echo", "hi"])
    assert (ok["state"], ok["text"], ok["exit"]["code"], ok["size"]) == ("SUCCEEDED", "", 0, 3)
    assert job_file(keeper, ok["job"]) == b"hi\n"
    # A start the job cannot make is answered with the step that failed, and no job.
    job = c.start(["/nonexistent/program"])
    assert c.started(job)["error"] == "execve: No such file or directory (ENOENT)"


def test_output_cap_truncates_and_kills_or_not(keeper: Keeper) -> None:
    """kill_on_cap: truncated at the cap and FAILED naming it; without: truncated and
    the job ends as it would have."""
    c, _ = keeper.attach()
    capped = RunSpec(0, 0, 0, "", 1000, True, 5)
    fin = c.run(["/usr/bin/yes"], run=capped)
    assert fin["state"] == "FAILED" and fin["truncated"] and fin["size"] == 1000
    assert fin["text"].startswith("the agent stopped the job: its output reached the cap"), fin
    assert job_file(keeper, fin["job"]) == b"y\n" * 500
    kept = RunSpec(0, 0, 0, "", 1000, False, 5)
    fin = c.run(["/bin/sh", "-c", "head -c 5000 /dev/zero; exit 0"], run=kept)
    assert (fin["state"], fin["text"], fin["truncated"], fin["size"]) == (
        "SUCCEEDED",
        "",
        True,
        1000,
    )
    assert job_file(keeper, fin["job"]) == b"\0" * 1000


def test_timeout_stop_and_kill_after_the_grace(keeper: Keeper) -> None:
    """timeout -> TIMED_OUT; stop -> STOPPED by request; a job ignoring SIGTERM is
    killed after its grace; "shutdown" and "kill" say so too."""
    c, _ = keeper.attach()
    fin = c.run(["/bin/sleep", "30"], run=RunSpec(1, 0, 0, "", 0, True, 5))
    assert (fin["state"], fin["text"]) == ("TIMED_OUT", "timed out after 1 s (killed by SIGTERM)")
    for how, state, text in (
        ("stop", "STOPPED", "stopped by request (killed by SIGTERM)"),
        ("shutdown", "STOPPED", "stopped by agent shutdown (killed by SIGTERM)"),
        ("kill", "FAILED", "killed by SIGKILL"),
    ):
        job = c.start(["/bin/sleep", "30"])
        c.started(job)
        c.send({"op": "stop", "job": job, "how": how})
        fin = c.finished(job)
        assert (fin["state"], fin["text"]) == (state, text)
    stubborn = ["/bin/sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]
    job = c.start(stubborn, run=RunSpec(0, 0, 0, "", 0, True, 0.2))
    c.output(job, 6)  # the trap is set
    c.send({"op": "stop", "job": job, "how": "stop"})
    fin = c.finished(job)
    assert (fin["state"], fin["exit"]["signal"]) == ("STOPPED", signal.SIGKILL)
    assert fin["text"] == "stopped by request (killed by SIGKILL)"


def test_jobs_outlive_the_agent_and_their_ends_wait_for_an_ack(
    keeper: Keeper, tmp_path: Path
) -> None:
    """Detach with a long and a short job; the short one ends meanwhile: the next hello
    lists the long one (with its record) and the short one's end, again and again
    until acknowledged. A job not to be recorded is never listed."""
    gate = tmp_path / "gate"
    c, _ = keeper.attach()
    long = c.start(["/bin/sh", "-c", "echo long; exec sleep 30"], record={"id": "L", "k": [1]})
    short = c.start(
        ["/bin/sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done; echo short; exit 4"],
        record={"id": "S"},
    )
    unrecorded = c.start(["/bin/sleep", "30"])
    pids = {j: c.started(j)["pid"] for j in (long, short, unrecorded)}
    c.send({"op": "stop", "job": unrecorded, "how": "not_recorded"})
    assert c.finished(unrecorded)["persist"] is False
    c.output(long, 5)
    c.close()
    gate.touch()

    def lists_short(h: Msg) -> bool:
        return any(f["job"] == short for f in h["ended"])

    for _ in range(2):  # not acknowledged: told again
        c, hello = keeper.reattach(lists_short)
        (end,) = hello["ended"]
        assert (end["state"], end["exit"]["code"], end["size"]) == ("FAILED", 4, 6)
        assert end["record"] == {"id": "S"} and end["text"] == "exit status 4"
        (kept,) = hello["jobs"]
        assert kept == {
            "job": long,
            "pid": pids[long],
            "size": 5,
            "truncated": False,
            "ending": False,
            "record": {"id": "L", "k": [1]},
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


def test_only_one_agent_at_a_time(keeper: Keeper) -> None:
    """A second connection while an agent is attached is closed without a hello; the
    first carries on, and once it detaches another may attach."""
    first, _ = keeper.attach()
    second = keeper.connect()
    assert second.recv() is None
    assert "refused a connection: another agent is attached" in keeper.log()
    assert first.run(["/bin/true"])["state"] == "SUCCEEDED"
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


def test_a_job_cannot_talk_to_the_keeper(keeper: Keeper, tmp_path: Path) -> None:
    """A job of the agent's own uid connects to the socket while no agent is attached:
    it is closed without a hello, for being one of the keeper's descendants."""
    gate = tmp_path / "probe-gate"
    c, _ = keeper.attach()
    job = c.start([sys.executable, "-I", "-c", PROBE, keeper.path, str(gate)])
    pid = c.started(job)["pid"]
    c.close()
    gate.touch()
    c, _ = keeper.reattach(lambda h: any(f["job"] == job for f in h["ended"]))
    assert job_file(keeper, job) == b"RECEIVED 0 b''\n"
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


# ---------------------------------------------------------------- hostile messages


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_hostile_messages_are_refused_or_ignored(keeper: Keeper, tmp_path: Path) -> None:
    """Malformed, unknown and oversized messages each get an error answer or are
    ignored; the keeper lives on, keeps no descriptor of theirs and starts jobs."""
    c, _ = keeper.attach()
    c.ping()
    fds_before = _fd_count(keeper.proc.pid)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    marker = tmp_path / "spawned"
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
                    "plan": plan_of(spawn_spec(["/bin/touch", str(marker)]))[0],
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

        dup = c.start(["/bin/sleep", "30"])
        c.started(dup)
        good = start_message(str(uuid.uuid4()), ["/bin/true"])[0]
        run = good["run"]
        refusals: list[tuple[Msg, str]] = [
            ({"id": True}, "malformed start: id"),
            ({"id": None}, "malformed start: id"),
            ({"job": good["job"].upper()}, "malformed start: job"),
            ({"job": "../../etc/passwd"}, "malformed start: job"),
            ({"job": 7}, "malformed start: job"),
            ({"job": dup}, f"job {dup} exists already"),
            ({"record": []}, "malformed start: record"),
            ({"record": {"x": "y" * (1 << 20)}}, "malformed start: record"),
            ({"run": None}, "malformed start: run"),
            ({"run": {**run, "extra": 1}}, "malformed start: run"),
            ({"run": {k: v for k, v in run.items() if k != "grace"}}, "malformed start: run"),
            ({"plan": None}, "malformed plan"),
            ({"plan": {**good["plan"], "argv": []}}, "malformed plan: argv"),
            (
                {"plan": {**good["plan"], "path": "true"}},
                "malformed plan: the program is not an absolute path",
            ),
            (
                {"fds": ["stdout"], "_fds": [null]},
                "malformed start: the keeper makes the job's output pipe",
            ),
        ]
        for key, bad in (
            ("timeout", -1), ("timeout", True), ("timeout", 1.5), ("timeout", "1"),
            ("timeout", 1 << 63), ("cpu_seconds", -5), ("cpu_seconds", False),
            ("memory_max", None), ("cap", -1), ("cap", True), ("kill_on_cap", 1),
            ("kill_on_cap", "yes"), ("grace", -0.1), ("grace", True), ("grace", 86401),
            ("grace", float("nan")), ("note", 3), ("note", "n" * 5000),
        ):  # fmt: skip
            refusals.append(({"run": {**run, key: bad}}, f"malformed start: run {key}"))
        for i, (change, why) in enumerate(refusals):
            msg = {**copy.deepcopy(good), "id": 100 + i, "job": str(uuid.uuid4()), **change}
            fds = msg.pop("_fds", [])
            c.send(msg, fds)
            answers = c.ping()
            assert [(m["op"], m.get("id"), m.get("error")) for m in answers] == [
                ("started", msg["id"], why)
            ], change
        c.send({"op": "stop", "job": dup, "how": "kill"})
        c.finished(dup)
        # A large record is fine: it travels in a body memfd.
        big = {"id": "big", "blob": "z" * (200 << 10)}
        assert c.run(["/bin/true"], record=big)["record"] == big
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
    "", "x", "/", "/bin/true", "A" * 5000, [], ["/bin/true"], [1], {}, {"a": 1},
    {"PATH": 1}, {"id": "x"},
]  # fmt: skip


def _mutate(rng: random.Random, msg: Msg) -> None:
    """Drop, replace or add one key somewhere in a start message."""
    where = rng.choice(
        [msg, msg, msg["run"] if isinstance(msg.get("run"), dict) else msg,
         msg["plan"] if isinstance(msg.get("plan"), dict) else msg]
    )  # fmt: skip
    action = rng.choice(["drop", "replace", "replace", "add"])
    key = rng.choice(sorted(where))
    if action == "drop":
        del where[key]
    elif action == "replace":
        where[key] = copy.deepcopy(rng.choice(POOL))
    else:
        where[rng.choice(["extra", "op2", "uid", "limits"])] = copy.deepcopy(rng.choice(POOL))


def test_fuzzed_starts_never_start_a_malformed_job(keeper: Keeper) -> None:
    """A few hundred seeded mutations of a valid start: the keeper survives each, and
    answers started with a pid only for a message whose job, record, run and plan are
    well formed."""
    rng = random.Random(1234)
    c, _ = keeper.attach()
    sent: dict[str, Msg] = {}
    valid = start_message("", ["/bin/true"])[0]
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
    for m in ran:
        msg = sent[m["job"]]
        roles = msg.get("fds", [])
        assert isinstance(msg["id"], int) and not isinstance(msg["id"], bool), msg
        assert JOB_ID.match(msg["job"]) and isinstance(msg.get("record", {}), dict), msg
        assert check_run(msg.get("run")) == "", msg
        assert check_plan(msg.get("plan"), dict.fromkeys([*roles, "stdout"], 0)) == "", msg
    assert ran, "no mutation left a start valid: the fuzzer tests nothing but refusals"
    for m in ran:
        c.finished(m["job"])
    assert c.run(["/bin/true"])["state"] == "SUCCEEDED"


def test_a_timeout_of_months_does_not_kill_the_keeper(keeper: Keeper) -> None:
    """A timeout the agent admits (StartJob's is a uint32) must not take the keeper down
    with every job it holds."""
    c, _ = keeper.attach()
    job = c.start(["/bin/sleep", "30"], run=RunSpec(30 * 86400, 0, 0, "", 0, True, 5))
    assert "pid" in c.started(job)
    c.ping()
    assert keeper.alive()
    c.send({"op": "stop", "job": job, "how": "stop"})
    assert c.finished(job)["state"] == "STOPPED"


def test_an_ancestry_the_keeper_cannot_read_is_not_taken_for_the_agent() -> None:
    """descends_from answers "unknown" (None), never "not a job", for a process whose
    /proc entry (or a parent's) cannot be read: a job that hides a process of its own
    (non-dumpable, another user namespace) must not pass for the agent."""
    from agent.daemon.keeper import descends_from

    assert descends_from(os.getpid(), os.getpid()) is True
    assert descends_from(os.getpid(), 2**22 + 12345) is False  # walked up to pid 1
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert descends_from(gone.pid, os.getpid()) is None
