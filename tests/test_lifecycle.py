"""Jobs an operator can trust: streaming, listing, timeouts, limits, caps, history."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent.client import AsyncAgentClient, InvalidArgument, ResourceExhausted
from agent.client.cli import main as agentctl

from helpers import (
    IS_ROOT,
    JOB_CGROUPS,
    AgentFactory,
    AgentProcess,
    job_processes,
    pb,
    policy_for,
    wait_for,
    write_script,
)

# ---------------------------------------------------------------- streaming


def test_three_followers_get_every_byte_in_order_from_the_start(
    agent: AgentProcess, script_dir: Path
) -> None:
    """Three clients follow one job live; each gets the whole output, in order."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "count.sh"), args=["60", "0.02"])
    wait_for(lambda: c.query(job).output_bytes > 0)  # join after the job began writing
    results: dict[int, tuple[bytes, float, float]] = {}

    def follow(i: int) -> None:
        cl = agent.client()
        got = bytearray()
        first = 0.0
        for chunk in cl.stream(job, follow=True):
            if not got:
                first = time.monotonic()
            got += chunk
        results[i] = (bytes(got), first, time.monotonic())

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    st = c.wait(job, timeout=30)
    assert st.state == "SUCCEEDED"
    expected = "".join(f"line {i}\n" for i in range(1, 61)).encode()
    assert (agent.state / "output" / f"{job}.out").read_bytes() == expected
    for data, first, last in results.values():
        assert data == expected
        assert last - first > 0.3  # they really followed along, not read at the end


def test_stream_offsets_and_finished_jobs(
    agent: AgentProcess, script_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Any offset works, for finished jobs too; agentctl logs --offset / -f use it."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "count.sh"), args=["5", "0"])
    c.wait(job, timeout=10)
    full = b"".join(c.stream(job))
    assert full == b"line 1\nline 2\nline 3\nline 4\nline 5\n"
    assert b"".join(c.stream(job, offset=7)) == full[7:]
    assert b"".join(c.stream(job, offset=10_000)) == b""
    assert b"".join(c.stream(job, follow=True)) == full  # follow on a finished job ends
    c2 = agent.certs
    flags = [
        "--addr",
        agent.addr,
        "--ca",
        str(c2.ca),
        "--cert",
        str(c2.crt("client")),
        "--key",
        str(c2.key("client")),
    ]
    assert agentctl([*flags, "logs", "--offset", "14", job]) == 0
    assert capfd.readouterr().out == full[14:].decode()
    job2 = c.start("bash", str(script_dir / "count.sh"), args=["3", "0.2"])
    assert agentctl([*flags, "logs", "-f", job2]) == 0
    assert capfd.readouterr().out == "line 1\nline 2\nline 3\n"


def test_slow_reader_blocks_neither_the_job_nor_other_readers(
    agent: AgentProcess, script_dir: Path
) -> None:
    """A reader that stalls does not stall the job (output goes to disk) or a fast reader."""
    c = agent.client()
    size = 30_000_000
    job = c.start(
        "bash", str(script_dir / "spew.sh"), args=[str(size)], limits={"output_bytes": 100_000_000}
    )
    with agent.stub() as stub:
        slow = stub.StreamJobOutput(pb.StreamJobOutputReq(jobID=job, follow=True), timeout=60)
        first = next(slow)  # read one chunk, then stall
        fast = sum(len(chunk) for chunk in agent.client().stream(job, follow=True))
        st = c.wait(job, timeout=30)
        assert st.state == "SUCCEEDED" and st.output_bytes == size
        assert fast == size
        rest = sum(len(m.data) for m in slow)
        assert len(first.data) + rest == size


# ---------------------------------------------------------------- listing


def test_list_filters_and_pages(agent: AgentProcess, script_dir: Path) -> None:
    """ListJobs: newest first, state filter, pages that neither skip nor repeat."""
    c = agent.client()
    done = [c.start("true", "") for _ in range(5)]
    for j in done:
        c.wait(j, timeout=10)
    running = [c.start("bash", str(script_dir / "sleep.sh"), args=["30"]) for _ in range(2)]
    jobs, token = c.list()
    assert [j.job_id for j in jobs] == (done + running)[::-1] and token == ""
    assert {j.job_id for j in c.list(states=["RUNNING"])[0]} == set(running)
    assert {j.job_id for j in c.list(states=["SUCCEEDED"])[0]} == set(done)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = c.list(page_size=3, page_token=token)
        seen += [j.job_id for j in page]
        pages += 1
        if not token:
            break
    assert seen == (done + running)[::-1] and pages == 3
    with pytest.raises(InvalidArgument):
        c.list(page_token="garbage")
    with pytest.raises(InvalidArgument):
        c.list(page_size=5000)
    for j in running:
        c.stop(j)


def test_agentctl_list(agent: AgentProcess, capfd: pytest.CaptureFixture[str]) -> None:
    """agentctl list shows jobs with their state."""
    c = agent.client()
    job = c.start("true", "")
    c.wait(job, timeout=10)
    cc = agent.certs
    assert (
        agentctl(
            [
                "--addr",
                agent.addr,
                "--ca",
                str(cc.ca),
                "--cert",
                str(cc.crt("client")),
                "--key",
                str(cc.key("client")),
                "list",
                "--state",
                "SUCCEEDED",
            ]
        )
        == 0
    )
    out = capfd.readouterr().out
    assert job in out and "SUCCEEDED" in out


# ---------------------------------------------------------------- timeouts


def test_timeout_terms_then_kills(agent: AgentProcess, script_dir: Path) -> None:
    """On expiry: SIGTERM to the group, SIGKILL after the grace; state TIMED_OUT."""
    c = agent.client()
    polite = c.start("bash", str(script_dir / "trapterm.sh"), timeout_seconds=1)
    stubborn = c.start("bash", str(script_dir / "tree.sh"), timeout_seconds=1)
    p = c.wait(polite, timeout=15)
    assert p.state == "TIMED_OUT" and p.error and p.timeout_seconds == 1
    assert p.error_text.startswith("timed out after 1 s")
    assert b"got TERM" in b"".join(c.stream(polite))
    s = c.wait(stubborn, timeout=15)
    assert s.state == "TIMED_OUT"
    assert (s.end_time - s.start_time).total_seconds() >= 1  # type: ignore[operator]
    wait_for(lambda: not job_processes(stubborn), timeout=5)


def test_timeout_default_and_maximum(make_agent: AgentFactory, script_dir: Path) -> None:
    """The configured default applies; a request above the maximum is INVALID_ARGUMENT."""
    a = make_agent(jobs={"default_timeout_seconds": 1, "max_timeout_seconds": 5})
    c = a.client()
    job = c.start("bash", str(script_dir / "sleep.sh"), args=["30"])
    st = c.wait(job, timeout=15)
    assert st.state == "TIMED_OUT" and st.timeout_seconds == 1
    with pytest.raises(InvalidArgument, match="above the maximum of 5"):
        c.start("true", "", timeout_seconds=6)
    with pytest.raises(InvalidArgument, match="above the maximum"):
        c.start("true", "", timeout_seconds=0)  # "no timeout" is above any maximum


# ---------------------------------------------------------------- limits


LIMIT_SCRIPTS = {
    "busy.sh": "#!/bin/bash\nwhile :; do :; done\n",
    "limits.sh": "#!/bin/bash\necho nofile=$(ulimit -n) nproc=$(ulimit -u) as=$(ulimit -v)\n",
    "forker.sh": "#!/bin/bash\nfor i in $(seq 1 40); do sleep 5 & done\nkill $(jobs -p)\n",
    "alloc.py": "import sys\ntry:\n    x = bytearray(600 * 1024 * 1024)\nexcept MemoryError:\n"
    "    print('MemoryError'); sys.exit(3)\nprint('allocated')\n",
}


@pytest.fixture(scope="module")
def limit_dir(script_dir: Path) -> Path:
    d = script_dir / "limits"
    d.mkdir(mode=0o755, exist_ok=True)
    for name, body in LIMIT_SCRIPTS.items():
        write_script(d, name, body)
    return d


def _limits_policy(script_dir: Path, limit_dir: Path) -> str:
    return policy_for(
        script_dir,
        f"""
  - name: limit-scripts
    command: /bin/bash
    aliases: [bash]
    scripts: ["{limit_dir}/*.sh"]
  - name: python
    command: /usr/bin/python3
    aliases: [python3]
    scripts: ["{limit_dir}/*.py"]
""",
    )


def test_resource_limits_apply(make_agent: AgentFactory, script_dir: Path, limit_dir: Path) -> None:
    """CPU and open-files rlimits reach the job; memory and processes go to its cgroup."""
    a = make_agent(
        _limits_policy(script_dir, limit_dir),
        limits={
            "max": {
                "cpu_seconds": 60,
                "open_files": 4096,
                "output_bytes": 1 << 30,
            },
            "default": {
                "cpu_seconds": 30,
                "open_files": 1024,
                "output_bytes": 1 << 20,
            },
        },
    )
    c = a.client()
    cpu = c.start("bash", str(limit_dir / "busy.sh"), limits={"cpu_seconds": 1})
    st = c.wait(cpu, timeout=30)
    assert st.state == "FAILED" and st.signal == signal.SIGXCPU
    assert "CPU time limit of 1 s" in st.error_text
    # The job's CPU is accounted (wait4 / cpu.stat). Not >= 1 s: under heavy load the
    # figures have been seen at 0.87-0.89 s for a job the kernel stopped at 1 s.
    assert st.user_cpu + st.system_cpu >= 0.5
    job = c.start("bash", str(limit_dir / "limits.sh"), limits={"open_files": 77})
    assert c.wait(job, timeout=10).state == "SUCCEEDED"
    # memory_bytes is memory.max of the job's cgroup, never RLIMIT_AS
    out = b"".join(c.stream(job))
    assert b"nofile=77 " in out and b" as=unlimited" in out
    # (memory and process limits through the cgroup: tests/test_cgroup_jobs.py)
    with pytest.raises(InvalidArgument, match="cpu_seconds = 61 is above the maximum of 60"):
        c.start("true", "", limits={"cpu_seconds": 61})
    with pytest.raises(InvalidArgument, match="open_files"):
        c.start("true", "", limits={"open_files": 0})  # unlimited is above any maximum


def test_output_cap_kill(agent: AgentProcess, script_dir: Path) -> None:
    """Default on_output_cap = kill: exactly cap bytes kept, job stopped, flagged."""
    c = agent.client()
    job = c.start(
        "bash", str(script_dir / "spew.sh"), args=["50000000"], limits={"output_bytes": 100_000}
    )
    st = c.wait(job, timeout=20)
    assert st.state == "FAILED" and st.output_truncated and st.output_bytes == 100_000
    assert "output reached the cap of 100000 bytes" in st.error_text
    assert (agent.state / "output" / f"{job}.out").stat().st_size == 100_000


def test_output_cap_truncate(make_agent: AgentFactory, script_dir: Path) -> None:
    """on_output_cap = truncate: recording stops at the cap, the job runs to its end."""
    a = make_agent(jobs={"on_output_cap": "truncate"})
    c = a.client()
    job = c.start(
        "bash", str(script_dir / "spew.sh"), args=["3000000"], limits={"output_bytes": 1000}
    )
    st = c.wait(job, timeout=20)
    assert st.state == "SUCCEEDED" and st.output_truncated and st.output_bytes == 1000
    assert len(b"".join(c.stream(job))) == 1000


@pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")
def test_full_disk_fails_that_job_and_agent_keeps_serving(
    make_agent: AgentFactory, tmp_path: Path, script_dir: Path
) -> None:
    """Output on a full file system: the job fails clearly; other jobs and calls work."""
    disk = tmp_path / "small"
    disk.mkdir(mode=0o700)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()}")
    try:
        a = make_agent(jobs={"output_dir": str(disk)})
        c = a.client()
        job = c.start(
            "bash",
            str(script_dir / "spew.sh"),
            args=["5000000"],
            limits={"output_bytes": 100_000_000},
        )
        st = c.wait(job, timeout=20)
        assert st.state == "FAILED"
        assert "No space left on device" in st.error_text
        ok = c.start("true", "")
        assert c.wait(ok, timeout=10).state == "SUCCEEDED"
        assert c.query(job).state == "FAILED"
        a.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ---------------------------------------------------------------- concurrency cap


def test_concurrency_cap_is_resource_exhausted(make_agent: AgentFactory, script_dir: Path) -> None:
    """Over max_running, StartJob is RESOURCE_EXHAUSTED; a slot frees when a job ends."""
    a = make_agent(jobs={"max_running": 3})
    c = a.client()
    jobs = [c.start("bash", str(script_dir / "sleep.sh"), args=["30"]) for _ in range(3)]
    with pytest.raises(ResourceExhausted, match="the limit is 3"):
        c.start("true", "")
    c.stop(jobs[0])
    c.wait(jobs[0], timeout=10)
    c.wait(c.start("true", ""), timeout=10)
    for j in jobs[1:]:
        c.stop(j)


# ---------------------------------------------------------------- durable history


def test_kill9_restart_keeps_history_adopts_running_jobs(
    agent: AgentProcess, script_dir: Path
) -> None:
    """After kill -9 of the agent and a restart: finished jobs and their output are there,
    and the job that was running runs on in the job keeper: the new agent has it RUNNING
    (adopted, not LOST), and it stops as any job does."""
    c = agent.client()
    finished = {}
    for code in ("0", "4"):
        j = c.start("bash", str(script_dir / "fail.sh"), args=[code])
        finished[j] = c.wait(j, timeout=10)
    hello = c.start("bash", str(script_dir / "hello.sh"), args=["persisted"])
    finished[hello] = c.wait(hello, timeout=10)
    running = c.start("bash", str(script_dir / "tree.sh"))
    wait_for(lambda: b"children started" in b"".join(c.stream(running)))
    wait_for(lambda: len(job_processes(running)) >= 4)
    pids = set(job_processes(running))
    agent.kill9()
    agent.start()
    c = agent.client()
    for j, before in finished.items():
        after = c.query(j)
        assert (after.state, after.exit_code, after.output_bytes) == (
            before.state,
            before.exit_code,
            before.output_bytes,
        )
    assert b"".join(c.stream(hello)) == b"hello persisted\n"
    st = c.query(running)
    assert (st.state, st.done) == ("RUNNING", False), st
    assert set(job_processes(running)) == pids, "the restart killed nothing of it"
    assert "recovered" not in agent.log()
    c.stop(running)
    st = c.wait(running, timeout=20)
    assert st.state == "STOPPED", st
    assert b"children started" in b"".join(c.stream(running))
    wait_for(lambda: not job_processes(running), timeout=5)


def test_kill9_of_agent_and_keeper_adopts_or_reports_lost(
    agent: AgentProcess, script_dir: Path
) -> None:
    """When the job keeper dies with the agent (both killed -9), a job that was running
    runs on in its cgroup and the next start's keeper adopts it (RUNNING; a stop ends
    it, its exit status said unknown); without job cgroups it is LOST at the next start
    and no process of it survives. Either way its output so far is kept and finished
    jobs are still there."""
    c = agent.client()
    done = c.start("bash", str(script_dir / "fail.sh"), args=["4"])
    before = c.wait(done, timeout=10)
    running = c.start("bash", str(script_dir / "tree.sh"))
    wait_for(lambda: b"children started" in b"".join(c.stream(running)))
    wait_for(lambda: len(job_processes(running)) >= 4)
    agent.kill9()
    assert agent.kill_keepers(), "the agent had a job keeper"
    assert job_processes(running), "the job outlives its agent and keeper"
    agent.start()
    c = agent.client()
    after = c.query(done)
    assert (after.state, after.exit_code, after.output_bytes) == (
        before.state,
        before.exit_code,
        before.output_bytes,
    )
    assert b"children started" in b"".join(c.stream(running))
    if JOB_CGROUPS:
        assert c.query(running).state == "RUNNING"
        assert len(job_processes(running)) >= 4, "the restart killed nothing of it"
        c.stop(running)
        st = c.wait(running, timeout=20)
        assert st.state == "STOPPED" and "exit status unknown" in st.error_text, st
        wait_for(lambda: not job_processes(running), timeout=5)
        return
    lost = c.query(running)
    assert lost.state == "LOST" and lost.done and lost.error
    assert "agent stopped while this job was running" in lost.error_text
    wait_for(lambda: not job_processes(running), timeout=5)
    assert "recovered 1 job(s)" in agent.log()


def test_graceful_stop_stops_jobs_and_history_says_so(
    agent: AgentProcess, script_dir: Path
) -> None:
    """SIGTERM: jobs are stopped (on_shutdown = stop), exit 0, STOPPED after restart."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "trapterm.sh"))
    wait_for(lambda: b"ready" in b"".join(c.stream(job)))
    assert agent.stop() == 0
    assert not job_processes(job)
    agent.start()
    st = agent.client().query(job)
    assert st.state == "STOPPED"


# ---------------------------------------------------------------- retention


def test_retention_by_count_and_age_removes_records_and_output(
    make_agent: AgentFactory, script_dir: Path
) -> None:
    """Beyond max_jobs the oldest finished jobs go, with their output files."""
    a = make_agent(retention={"max_jobs": 4, "max_age_seconds": 0, "sweep_seconds": 0.2})
    c = a.client()
    jobs = []
    for _ in range(8):
        j = c.start("bash", str(script_dir / "hello.sh"))
        c.wait(j, timeout=10)
        jobs.append(j)
    wait_for(lambda: len(c.list()[0]) == 4, timeout=5)
    assert [j.job_id for j in c.list()[0]] == jobs[4:][::-1]
    assert a.output_files() == {f"{j}.out" for j in jobs[4:]}
    b = make_agent(retention={"max_jobs": 0, "max_age_seconds": 1, "sweep_seconds": 0.2})
    c2 = b.client()
    old = c2.start("true", "")
    c2.wait(old, timeout=10)
    running = c2.start("bash", str(script_dir / "sleep.sh"), args=["30"])
    wait_for(lambda: [j.job_id for j in c2.list()[0]] == [running], timeout=10)
    assert b.output_files() == {f"{running}.out"}
    c2.stop(running)


def test_retention_never_touches_files_it_does_not_own(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """Tampered history rows pointing elsewhere, at links or at others' files: left alone."""
    a = make_agent(retention={"max_jobs": 0, "max_age_seconds": 1, "sweep_seconds": 0.2})
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = a.state / "output"
    link_id, foreign_id = str(uuid.uuid4()), str(uuid.uuid4())
    (out / f"{link_id}.out").symlink_to(victim)
    foreign = out / f"{foreign_id}.out"
    foreign.write_text("someone else's")
    if IS_ROOT:
        os.chown(foreign, 65534, 65534)
    db = sqlite3.connect(a.state / "jobs.sqlite3", timeout=10)
    for jid, path in (
        (str(uuid.uuid4()), str(victim)),
        (link_id, str(out / f"{link_id}.out")),
        (foreign_id, str(foreign)),
    ):
        db.execute(
            "INSERT INTO jobs (id, owner, command, path, args, state, start_time, "
            "end_time, output_path) VALUES (?, 'client', '/bin/true', '', '[]', 2, 1, 1, ?)",
            (jid, path),
        )
    db.commit()
    wait_for(lambda: db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0, timeout=10)
    db.close()
    assert victim.read_text() == "precious"
    assert (out / f"{link_id}.out").is_symlink()
    if IS_ROOT:
        assert foreign.exists()


# ---------------------------------------------------------------- scale


@pytest.mark.slow
def test_thousand_short_jobs_and_two_hundred_concurrent(
    make_agent: AgentFactory, script_dir: Path
) -> None:
    """1,000 short jobs complete without errors, and 200 jobs run at once, each stopped
    cleanly by request (they run until stopped: no assumption on how fast 200 start)."""
    a = make_agent(jobs={"max_running": 250})
    certs = a.certs

    async def run() -> tuple[list[str], list[str]]:
        async with AsyncAgentClient(a.addr, certs.tls("client"), timeout=60) as c:
            sem = asyncio.Semaphore(32)

            async def one() -> str:
                async with sem:
                    job = await c.start("true", "")
                    return (await c.wait(job, timeout=60)).state

            short = await asyncio.gather(*(one() for _ in range(1000)))
            # They run until stopped: on a loaded machine 200 starts can take longer than
            # any short sleep (2 s, then 10 s, ended some before the last had started).
            jobs = await asyncio.gather(*(c.start("sleep", "3600") for _ in range(200)))
            running = (await c.list(states=["RUNNING"], page_size=1000))[0]
            if len(running) != 200:
                ids = {r.job_id for r in running}
                others = [await c.query(j) for j in jobs if j not in ids]
                said = [f"{st.state}: {st.error_text}" for st in others]
                # The machine refusing a process (a container's pids or memory limit) is
                # not the agent's fault, and says so in the job's end; anything else is.
                if all(re.search(r"\((EAGAIN|ENOMEM)\)", t) for t in said):
                    pytest.skip(f"the machine refused {len(said)} of 200 processes: {said[:3]}")
                raise AssertionError(f"{len(said)} of 200 not running: {said[:5]}")
            await asyncio.gather(*(c.stop(j) for j in jobs))
            finals = await asyncio.gather(*(c.wait(j, timeout=60) for j in jobs))
            return list(short), [f.state for f in finals]

    short, concurrent = asyncio.run(run())
    assert short == ["SUCCEEDED"] * 1000
    assert concurrent == ["STOPPED"] * 200
    assert a.proc is not None and a.proc.poll() is None
