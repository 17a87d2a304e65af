"""Jobs outlive their agent: the job keeper, with real agent processes.

The agent starts a job keeper (``agent.keeper.keeper``) that holds the jobs. These
tests kill the agent (``kill -9``, at chosen and at random moments, under load),
stop it with SIGTERM in the middle of a burst of starts, and stop it with
``on_shutdown = "keep"``; then they start it again on the same state and check what
the history says against what the jobs really did: the true exit status, the whole
output, no job LOST, none run twice, none left running unsupervised. Last, a job
tries to talk to the keeper itself.

Jobs wait on gate files the test creates (never on the clock), so "finished while
the agent was dead" and "still running at the restart" are facts, not guesses.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import random
import re
import shutil
import signal
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import AgentClient, AsyncAgentClient
from agent.client.model import JobStatus
from agent.daemon.keeperclient import ACK_DELAY

from helpers import (
    IS_ROOT,
    AgentFactory,
    AgentProcess,
    job_processes,
    make_safe_dir,
    policy_for,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="jobs run as nobody: needs root")

SCRIPTS = {
    # gated.sh CODE GATE: two lines; waits for GATE.1; a line; waits for GATE.2; a line;
    # exits with CODE.
    "gated.sh": """
        #!/bin/bash
        echo "one $1"
        echo "two $1"
        while [ ! -e "$2.1" ]; do sleep 0.02; done
        echo "after gate 1"
        while [ ! -e "$2.2" ]; do sleep 0.02; done
        echo "after gate 2"
        exit "$1"
        """,
    # token.sh TOKEN DIR SECONDS CODE: records one run of TOKEN in DIR/runs, prints it,
    # sleeps, exits with CODE.
    "token.sh": """
        #!/bin/bash
        echo "$1" >> "$2/runs"
        echo "token $1"
        sleep "$3"
        echo "done $1"
        exit "$4"
        """,
}

# A job that tries to attach to the keeper: connect to its socket, read one message.
PROBE = textwrap.dedent("""\
    import os, socket, sys
    path = sys.argv[1]
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        d = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
        s.connect("/proc/self/fd/%d/%s" % (d, os.path.basename(path)))
        print("CONNECTED", flush=True)
        s.settimeout(10)
        data = s.recv(1 << 16)
        print("RECEIVED %d %r" % (len(data), data[:300]), flush=True)
    except OSError as e:
        print("ERROR %s errno=%s %s" % (type(e).__name__, e.errno, e.strerror), flush=True)
    print("DONE")
    """)


@pytest.fixture(scope="module")
def kdir() -> Iterator[Path]:
    """The scripts of this module, in a folder the policy trusts."""
    d = make_safe_dir()
    for name, body in SCRIPTS.items():
        write_script(d, name, body)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def gates() -> Iterator[Path]:
    """A folder for gate files (root's, readable by the jobs' user)."""
    d = make_safe_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def runs() -> Iterator[Path]:
    """A folder the token jobs (as nobody) append their runs to (their entry's
    Landlock ``write`` path)."""
    base = make_safe_dir()
    d = base / "runs"
    d.mkdir(mode=0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(d, nobody.pw_uid, nobody.pw_gid)
    yield d
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def kpolicy(kdir: Path, runs: Path) -> str:
    """This module's scripts, sleep, token.sh writing to ``runs``, and python3 as root
    for the keeper probe."""
    return policy_for(
        kdir,
        f"""\
  - name: tokens
    command: /bin/bash
    aliases: [token]
    scripts: ["{kdir}/token.sh"]
    args: {{max_count: 4}}
    landlock: {{write: ["{runs}"]}}
  - name: keeper-probe
    command: /usr/bin/python3
    aliases: [python3]
    args: {{max_count: 4, max_length: 4096}}
    user: root
    allow_root: true
""",
    )


def output(c: AgentClient, job: str) -> bytes:
    return b"".join(c.stream(job))


def out_file(a: AgentProcess, job: str) -> bytes:
    """The job's output file as the keeper wrote it (read while no agent runs)."""
    try:
        return (a.state / "output" / f"{job}.out").read_bytes()
    except FileNotFoundError:
        return b""


def gated_output(code: int) -> bytes:
    return f"one {code}\ntwo {code}\nafter gate 1\nafter gate 2\n".encode()


def open_gate(gate: Path, n: int) -> None:
    Path(f"{gate}.{n}").touch()


def all_jobs(c: AgentClient) -> list[JobStatus]:
    return list(c.list_all(page_size=500))


# ---------------------------------------------------------------- kill -9 of the agent


def test_kill9_jobs_run_on_and_end_with_their_true_status_and_output(
    make_agent: AgentFactory, kpolicy: str, kdir: Path, gates: Path
) -> None:
    """kill -9 of the agent while two jobs run: one finishes while the agent is dead,
    the other writes output then and is still running at the restart. After it, the
    first has its true exit status and its whole output; the second is RUNNING, and
    ends later with its own. Nothing is LOST."""
    a = make_agent(kpolicy)
    c = a.client()
    gate_a, gate_b = gates / "a", gates / "b"
    job_a = c.start("bash", str(kdir / "gated.sh"), args=["3", str(gate_a)])
    job_b = c.start("bash", str(kdir / "gated.sh"), args=["5", str(gate_b)])
    for job, code in ((job_a, 3), (job_b, 5)):
        wait_for(lambda job=job, code=code: f"two {code}\n".encode() in output(c, job))
    pids_a = job_processes(job_a)
    keepers = a.keepers()
    assert pids_a and job_processes(job_b) and len(keepers) == 1, keepers

    a.kill9()
    # The agent is dead: job a ends, job b writes more, and the keeper records both.
    open_gate(gate_a, 1)
    open_gate(gate_a, 2)
    open_gate(gate_b, 1)
    wait_for(lambda: not job_processes(job_a))
    wait_for(lambda: out_file(a, job_b).endswith(b"after gate 1\n"))
    assert a.keepers() == keepers

    a.restart()
    c = a.client()
    b_now = c.query(job_b)
    assert (b_now.state, b_now.done) == ("RUNNING", False), b_now
    assert job_processes(job_b)
    st_a = c.query(job_a)
    assert (st_a.state, st_a.exit_code, st_a.done) == ("FAILED", 3, True), st_a
    assert output(c, job_a) == gated_output(3)
    assert st_a.output_bytes == len(gated_output(3))
    assert output(c, job_b) == b"one 5\ntwo 5\nafter gate 1\n"

    open_gate(gate_b, 2)
    st_b = c.wait(job_b, timeout=20)
    assert (st_b.state, st_b.exit_code) == ("FAILED", 5), st_b
    assert output(c, job_b) == gated_output(5)
    assert not job_processes(job_b)
    states = {j.job_id: j.state for j in all_jobs(c)}
    assert states == {job_a: "FAILED", job_b: "FAILED"}
    assert "LOST" not in a.log()


def test_an_end_is_acknowledged_when_no_start_follows(
    make_agent: AgentFactory, kpolicy: str
) -> None:
    """The agent acknowledges a recorded end right after its next start, or after
    ACK_DELAY when none comes: the keeper forgets it. A new agent after a kill -9 is then
    told of no end to record (a lost ack would tell it again: harmless, but the keeper
    would hold every end until an agent attached)."""
    a = make_agent(kpolicy)
    c = a.client()
    for _ in range(3):
        job = c.start("true")
        assert c.wait(job, timeout=10).state == "SUCCEEDED"
    time.sleep(ACK_DELAY + 0.5)  # no start follows the last one: the timer acks it
    a.kill9()
    a.restart()
    wait_for(lambda: "attached" in a.log().rsplit("job keeper (pid", 1)[-1])
    last = a.log().rsplit("job keeper (pid", 1)[-1]
    assert re.search(r"attached, 0 running job\(s\), 0 finished to record", last), last


def test_followers_resume_after_the_restart(
    make_agent: AgentFactory, kpolicy: str, kdir: Path, gates: Path
) -> None:
    """After kill -9 and a restart, a follower streaming a still running job from an
    offset gets the rest of its output, what it wrote while no agent ran included, up
    to its end."""
    a = make_agent(kpolicy)
    c = a.client()
    gate = gates / "g"
    job = c.start("bash", str(kdir / "gated.sh"), args=["0", str(gate)])
    wait_for(lambda: output(c, job) == b"one 0\ntwo 0\n")
    a.kill9()
    open_gate(gate, 1)
    wait_for(lambda: out_file(a, job).endswith(b"after gate 1\n"))
    a.restart()
    offset = len(b"one 0\n")
    got: dict[int, bytearray] = {0: bytearray(), 1: bytearray()}

    def follow(i: int, cl: AgentClient) -> None:
        for chunk in cl.stream(job, offset=offset, follow=True, timeout=30):
            got[i] += chunk

    threads = [threading.Thread(target=follow, args=(i, a.client())) for i in range(2)]
    for t in threads:
        t.start()
    c = a.client()
    # Both followers have what is there, and wait for more.
    wait_for(lambda: all(g.endswith(b"after gate 1\n") for g in got.values()))
    assert c.query(job).state == "RUNNING"
    open_gate(gate, 2)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert got == {i: gated_output(0)[offset:] for i in range(2)}
    st = c.wait(job, timeout=10)
    assert (st.state, st.exit_code) == ("SUCCEEDED", 0), st
    # A follower joining after the end from an offset past the restart's output.
    late = len(b"one 0\ntwo 0\nafter gate 1\n")
    assert b"".join(c.stream(job, offset=late, follow=True)) == b"after gate 2\n"


@pytest.mark.slow
def test_kill9_at_random_moments_under_load(
    make_agent: AgentFactory, kpolicy: str, kdir: Path, runs: Path
) -> None:
    """Five rounds of ~20 concurrent short and medium jobs, the agent killed -9 at a
    random moment 0-300 ms into each: after the last restart every job a client got an
    id for is in the history, done, with its true result and output; nothing is LOST;
    no job ran twice; every run is a recorded job; no job process is left."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    a = make_agent(kpolicy, jobs={"max_running": 500})
    # job id -> (token, exit code); token -> (seconds, exit code) of every job asked for
    accepted: dict[str, tuple[str, int]] = {}
    asked: dict[str, tuple[str, int]] = {}
    refused = 0
    for _ in range(5):
        specs = []
        for _ in range(20):
            token = uuid.uuid4().hex
            seconds = rng.choice(["0", "0", "0.3", "0.8", "1.5"])
            code = rng.choice([0, 0, 0, 3, 7])
            specs.append((token, seconds, code))
            asked[token] = (seconds, code)
        kill_at = rng.uniform(0.0, 0.3)
        results = asyncio.run(_burst(a, kdir, runs, specs, kill_at))
        for (token, _, code), res in zip(specs, results, strict=True):
            if isinstance(res, str):
                accepted[res] = (token, code)
            else:
                refused += 1
        assert a.proc is not None and a.proc.poll() is not None, "the killer thread ran"
        a.restart()
    why = f"seed {seed}: {len(accepted)} accepted, {refused} refused"
    assert accepted, why
    c = a.client()
    for job, (token, code) in accepted.items():
        st = c.wait(job, timeout=30)
        assert st.done, (why, st)
        want = ("SUCCEEDED", 0) if code == 0 else ("FAILED", code)
        assert (st.state, st.exit_code) == want, (why, st)
        assert output(c, job) == f"token {token}\ndone {token}\n".encode(), (why, job)
    # Starts whose answer the kill cut off are recorded too, and end like the others.
    wait_for(lambda: not [j for j in all_jobs(c) if not j.done], timeout=30)
    history = all_jobs(c)
    ran = Counter((runs / "runs").read_text().split())
    lost = [(j.job_id, j.pid, j.error_text, ran[j.args[0]]) for j in history if j.state == "LOST"]
    assert not lost, (why, lost)
    recorded = {j.args[0]: j for j in history}
    assert set(accepted) <= {j.job_id for j in history}, why
    for token, j in recorded.items():
        code = asked[token][1]
        want = ("SUCCEEDED", 0) if code == 0 else ("FAILED", code)
        assert (j.state, j.exit_code) == want, (why, j)
    assert all(n == 1 for n in ran.values()), (why, [t for t, n in ran.items() if n > 1])
    assert set(ran) == set(recorded), (why, set(ran) ^ set(recorded))
    wait_for(lambda: not any(job_processes(j.job_id) for j in history), timeout=10)
    assert not a.instance_processes()


async def _burst(
    a: AgentProcess,
    kdir: Path,
    runs: Path,
    specs: list[tuple[str, str, int]],
    kill_at: float,
) -> list[str | BaseException]:
    """Start every spec at once; a thread kills the agent ``kill_at`` s in. Each result
    is a job id or the error the client got."""
    async with AsyncAgentClient(a.addr, a.certs.tls("client"), timeout=10) as c:
        await c.list(page_size=1)  # connected: the burst is the starts only
        killer = threading.Timer(kill_at, a.kill9)
        killer.start()
        try:
            return await asyncio.gather(
                *(
                    c.start("token", str(kdir / "token.sh"), args=[t, str(runs), s, str(code)])
                    for t, s, code in specs
                ),
                return_exceptions=True,
            )
        finally:
            await asyncio.to_thread(killer.join)


# ---------------------------------------------------------------- SIGTERM in a burst


async def _sigterm_burst(a: AgentProcess, n: int, after: float) -> list[str | BaseException]:
    """``n`` concurrent starts of ``sleep 30``; SIGTERM to the agent ``after`` s in."""
    async with AsyncAgentClient(a.addr, a.certs.tls("client"), timeout=20) as c:
        await c.list(page_size=1)
        tasks = [asyncio.ensure_future(c.start("sleep", "30")) for _ in range(n)]
        await asyncio.sleep(after)
        a.signal(signal.SIGTERM)
        return await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("mode", ["stop", "keep"])
def test_sigterm_during_a_burst_of_starts_leaves_no_job_unsupervised(
    make_agent: AgentFactory, mode: str
) -> None:
    """60 concurrent starts of `sleep 30`, SIGTERM 50 ms in: the agent exits 0. With
    on_shutdown = "stop" no process of any job is left and, after a restart, every
    accepted job is done (STOPPED, or FAILED to start); with "keep" every accepted job
    runs on and is RUNNING (adopted) after the restart, and can be stopped. Never LOST."""
    a = make_agent(jobs={"max_running": 100}, daemon={"on_shutdown": mode})
    results = asyncio.run(_sigterm_burst(a, 60, 0.05))
    assert a.proc is not None and a.proc.wait(60) == 0, a.log()
    accepted = [r for r in results if isinstance(r, str)]
    refusals = Counter(repr(r)[:200] for r in results if not isinstance(r, str))
    why = f"{len(accepted)} of 60 accepted; refusals: {refusals}"
    assert accepted, why
    if mode == "stop":
        wait_for(lambda: not any(job_processes(j) for j in accepted), timeout=10)
        # Starts the client never heard of were this agent's jobs too.
        wait_for(lambda: not a.instance_processes(), timeout=10)
        wait_for(lambda: not a.keepers(), timeout=10)
    else:
        assert all(job_processes(j) for j in accepted), why
        assert len(a.keepers()) == 1
    a.restart()
    c = a.client()
    if mode == "stop":
        for j in accepted:
            st = c.query(j)
            assert st.done and st.state in ("STOPPED", "FAILED"), (why, st)
            assert st.state == "STOPPED" or st.error_text.startswith("start failed"), st
    else:
        for j in accepted:
            st = c.query(j)
            assert (st.state, st.done) == ("RUNNING", False), (why, st)
        running = [j.job_id for j in all_jobs(c) if j.state == "RUNNING"]
        assert set(accepted) <= set(running)
        for j in running:
            c.stop(j)
        for j in running:
            assert c.wait(j, timeout=20).state == "STOPPED"
        wait_for(lambda: not any(job_processes(j) for j in running), timeout=10)
    history = all_jobs(c)
    assert not [j for j in history if j.state in ("RUNNING", "LOST")], (why, history)


# ---------------------------------------------------------------- on_shutdown = "keep"


def test_keep_on_shutdown_leaves_the_job_to_the_next_agent(
    make_agent: AgentFactory, kpolicy: str, kdir: Path, gates: Path
) -> None:
    """on_shutdown = "keep": SIGTERM, the job runs on; the next agent has it RUNNING and
    it ends normally with its whole output. The agent's next stop keeps the keeper (and
    what still runs) too; the test's clean-up (AgentProcess.cleanup, which the fixture
    runs) leaves neither."""
    a = make_agent(kpolicy, daemon={"on_shutdown": "keep"})
    c = a.client()
    gate = gates / "k"
    job = c.start("bash", str(kdir / "gated.sh"), args=["0", str(gate)])
    wait_for(lambda: output(c, job) == b"one 0\ntwo 0\n")
    keepers = a.keepers()
    assert a.stop() == 0
    assert job_processes(job) and a.keepers() == keepers
    open_gate(gate, 1)
    wait_for(lambda: out_file(a, job).endswith(b"after gate 1\n"))
    a.start()
    c = a.client()
    st = c.query(job)
    assert (st.state, st.done) == ("RUNNING", False), st
    open_gate(gate, 2)
    st = c.wait(job, timeout=20)
    assert (st.state, st.exit_code) == ("SUCCEEDED", 0), st
    assert output(c, job) == gated_output(0)
    # Kept once more, with a job in it: then cleaned up as the fixture does.
    sleeper = c.start("sleep", "30")
    wait_for(lambda: job_processes(sleeper))
    assert a.stop() == 0
    assert a.keepers() == keepers and job_processes(sleeper)
    a.cleanup()
    assert not a.keepers() and not job_processes(sleeper) and not a.instance_processes()


# ---------------------------------------------------------------- a job and the keeper


def test_a_job_cannot_attach_to_the_keeper(
    make_agent: AgentFactory, kpolicy: str, kdir: Path, runs: Path
) -> None:
    """A job (as root, the agent's own uid, no capabilities) connects to the keeper's
    socket and reads: it never gets a hello. The agent's jobs go on."""
    a = make_agent(kpolicy)
    c = a.client()
    sock = a.state / "keeper.sock"
    assert sock.exists()
    job = c.start("python3", "-c", args=[PROBE, str(sock)])
    st = c.wait(job, timeout=30)
    out = output(c, job).decode(errors="replace")
    print(f"the probe job: {st.state} exit {st.exit_code}:\n{out}")
    assert "DONE" in out, out
    received = [line for line in out.splitlines() if line.startswith("RECEIVED")]
    assert "hello" not in out and all(line.startswith("RECEIVED 0 ") for line in received), out
    if "CONNECTED" in out:
        # It reached the socket: the keeper itself refused it, and said why.
        assert re.search(
            r"refused a connection: pid \d+ is (one of the keeper's jobs|in a job cgroup)",
            a.log(),
        ), a.log()
    # The agent's own attachment is untouched: jobs still start and end.
    other = c.start("token", str(kdir / "token.sh"), args=["x", str(runs), "0", "0"])
    assert c.wait(other, timeout=20).state == "SUCCEEDED"


# ---------------------------------------------------------------- the keeper's upgrade


def test_sigusr2_reexecutes_the_keeper_in_place_and_keeps_every_job(
    make_agent: AgentFactory, kpolicy: str, kdir: Path, gates: Path
) -> None:
    """SIGUSR2 to the keeper: it replaces its code with what is on disk (execve) and goes
    on as the same process with the same jobs: a job running across it ends with its
    true exit status and whole output, a timeout armed before it still fires, and new
    jobs start after it."""
    a = make_agent(kpolicy)
    c = a.client()
    gate = gates / "u"
    job = c.start("bash", str(kdir / "gated.sh"), args=["4", str(gate)])
    timed = c.start("sleep", "30", timeout_seconds=2)
    wait_for(lambda: b"two 4\n" in output(c, job))
    (keeper,) = a.keepers()
    assert int((a.state / "keeper.pid").read_text()) == keeper
    started = _start_ticks(keeper)
    os.kill(keeper, signal.SIGUSR2)
    wait_for(lambda: "re-executed in place" in a.log())
    assert a.keepers() == [keeper] and _start_ticks(keeper) == started
    assert b"--resume-fd" in Path(f"/proc/{keeper}/cmdline").read_bytes()
    open_gate(gate, 1)
    open_gate(gate, 2)
    st = c.wait(job, timeout=20)
    assert (st.state, st.exit_code) == ("FAILED", 4), st
    assert output(c, job) == gated_output(4)
    tt = c.wait(timed, timeout=20)
    assert tt.state == "TIMED_OUT", tt
    assert c.wait(c.start("echo", "after"), timeout=20).state == "SUCCEEDED"
    assert not job_processes(job) and not job_processes(timed)


def _start_ticks(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2 :].split()[19])


def test_a_start_larger_than_one_message_reaches_the_keeper(
    agent: AgentProcess, script_dir: Path
) -> None:
    """A start whose plan and record (64 arguments of 4,000 bytes: both carry them) do not
    fit one socket message travels in a memfd, whole: it runs, and its record keeps every
    argument."""
    args = [f"{i:04d}" + "x" * 3996 for i in range(64)]
    c = agent.client()
    job = c.start("bash", str(script_dir / "hello.sh"), args=args)
    st = c.wait(job, timeout=20)
    assert st.state == "SUCCEEDED", st
    assert list(st.args) == args
