"""The job spawner: real processes, through SpawnerOps in-process and through a real agent."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent
from agent.client import FailedPrecondition
from agent.daemon.keeperclient import KEEPER_DIED
from agent.keeper import landlock
from agent.keeper.keeperadopt import ADOPTED_TEXT
from agent.keeper.lifecycle import Exit
from agent.keeper.spawn import SCRIPT_FD_PATH, SpawnerOps, SpawnFailure, SpawnSpec

from helpers import (
    IS_ROOT,
    JOB_CGROUPS,
    AgentFactory,
    AgentProcess,
    children_of,
    is_spawner,
    job_processes,
    make_safe_dir,
    spawn_and_read,
    spawn_spec,
    wait_for,
)

# Every test here runs on the C vfork spawn path and on the Python fork fallback.
pytestmark = pytest.mark.usefixtures("spawn_path")

ENOEXEC = "start failed: execve: Exec format error (ENOEXEC)"


# ---------------------------------------------------------------- in-process harness


def _spec(argv: list[str], **kw: Any) -> SpawnSpec:
    spec: SpawnSpec = spawn_spec(argv, **kw)
    return spec


async def _run(ops: SpawnerOps, spec: SpawnSpec, timeout: float = 10) -> tuple[int, Exit, bytes]:
    """Spawn with an output pipe; return (pid, exit, output)."""
    pid, ex, out = await spawn_and_read(ops, spec, timeout)
    return pid, ex, out


def run_ops(coro_fn: Any) -> Any:
    """Run ``coro_fn(ops)`` on a fresh loop with a fresh spawner, then close it."""

    async def main() -> Any:
        ops = SpawnerOps()
        try:
            return await coro_fn(ops)
        finally:
            ops.close()

    return asyncio.run(main())


def test_exit_status_signal_and_rusage() -> None:
    """Exit code, killing signal and CPU time come back from wait4; no peak RSS but a cgroup's."""

    async def go(ops: SpawnerOps) -> None:
        _, ex, out = await _run(ops, _spec(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]))
        assert (ex.exit_code, ex.signal, out) == (3, None, b"out\nerr\n")
        _, ex, _ = await _run(ops, _spec(["/bin/sh", "-c", "kill -TERM $$"]))
        assert (ex.exit_code, ex.signal) == (None, signal.SIGTERM)
        _, ex, _ = await _run(
            ops, _spec(["/bin/sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
        )
        # No cgroup here: the job's own peak is unknown, and the spawner's is never reported.
        assert ex.exit_code == 0 and ex.user_cpu + ex.system_cpu > 0.01 and ex.max_rss == 0

    run_ops(go)


def test_session_group_environment_stdin_and_descriptors() -> None:
    """The job leads its session and group, sees only its env, /dev/null and fds 0-2."""

    async def go(ops: SpawnerOps) -> None:
        pid, ex, out = await _run(
            ops,
            _spec(
                [
                    "/bin/sh",
                    "-c",
                    # No pipeline or $(...) around the ls: the shell would hold
                    # that pipe's other end while ls looks at its descriptors.
                    'cut -d" " -f5,6 /proc/$$/stat; echo fds; ls /proc/$$/fd; echo end; '
                    "readlink /proc/$$/fd/0; env",
                ],
                env={"ONLY": "this", "PATH": "/usr/bin:/bin"},
            ),
        )
        assert ex.exit_code == 0, out
        lines = out.decode().splitlines()
        assert lines[0] == f"{pid} {pid}"  # pgid, sid
        fds = lines[lines.index("fds") + 1 : lines.index("end")]
        assert sorted(fds, key=int) == ["0", "1", "2"]
        rest = lines[lines.index("end") + 1 :]
        assert rest[0] == "/dev/null"
        assert set(line.split("=", 1)[0] for line in rest[1:]) <= {"ONLY", "PATH", "PWD"}

    run_ops(go)


def test_script_fd_is_fd_3_and_exec_fd_runs_the_sealed_copy(tmp_path: Path) -> None:
    """script_fd lands on fd 3 (SCRIPT_FD_PATH); exec_fd is fexecve'd, #! scripts too."""
    script = tmp_path / "s.sh"
    script.write_text('echo "script $1"; ls /proc/$$/fd | sort -n | tr "\\n" " "\n')
    hashbang = tmp_path / "h.sh"
    hashbang.write_text("#!/bin/sh\necho fexecve ok\n")
    os.chmod(hashbang, 0o755)

    async def go(ops: SpawnerOps) -> None:
        sfd = os.open(script, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _, ex, out = await _run(ops, _spec(["/bin/sh", SCRIPT_FD_PATH, "x"], script_fd=sfd))
        finally:
            os.close(sfd)
        assert ex.exit_code == 0 and out.decode().startswith("script x\n"), out
        assert set(out.decode().split()[2:]) >= {"0", "1", "2", "3"}
        for path, want in ((hashbang, b"fexecve ok\n"), (Path("/bin/echo"), b"")):
            efd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # executable names a file that must NOT run: the descriptor wins
                _, ex, out = await _run(
                    ops, _spec([str(path)], executable="/bin/false", exec_fd=efd)
                )
            finally:
                os.close(efd)
            assert (ex.exit_code, out) == (0, want if want else b"\n")

    run_ops(go)


def test_setup_failures_name_the_step_and_errno(tmp_path: Path) -> None:
    """A limit the kernel refuses, a missing cwd or program: the step and errno, no job."""

    async def go(ops: SpawnerOps) -> None:
        cases = [
            (
                _spec(["/bin/true"], limits={"open_files": (1 << 30) + 1}),
                "setrlimit RLIMIT_NOFILE: Operation not permitted (EPERM)",
            ),
            (
                _spec(["/bin/true"], cwd=str(tmp_path / "missing")),
                "chdir: No such file or directory (ENOENT)",
            ),
            (_spec([str(tmp_path / "nope")]), "execve: No such file or directory (ENOENT)"),
        ]
        for spec, want in cases:
            with pytest.raises(SpawnFailure) as info:
                await _run(ops, spec)
            assert str(info.value) == want
        # A malformed plan never leaves the sender (the spawner's check of what it gets
        # is the same schema: tests/test_spawnplan.py, tests/test_keeper_protocol.py).
        with pytest.raises(ValueError, match="malformed plan: the program is not an absolute"):
            await _run(ops, _spec(["true"]))
        _, ex, _ = await _run(ops, _spec(["/bin/true"]))  # the spawner carries on
        assert ex.exit_code == 0

    run_ops(go)


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_user_switch_drops_groups() -> None:
    """As root: uid and gid become the job user's, no supplementary groups remain."""

    async def go(ops: SpawnerOps) -> None:
        os.setgroups([0, 4])  # the agent's groups must not leak into the job
        _, _, out = await _run(
            ops,
            _spec(
                ["/bin/grep", "-E", "^(Uid|Gid|Groups):", "/proc/self/status"], uid=65534, gid=65534
            ),
        )
        fields = {
            line.split(":")[0]: line.split(":", 1)[1].split() for line in out.decode().splitlines()
        }
        assert fields == {"Uid": ["65534"] * 4, "Gid": ["65534"] * 4, "Groups": []}, out

    run_ops(go)


def test_leftovers_are_killed_and_nothing_is_left_unreaped() -> None:
    """What the job leaves in its group dies with the leader; no zombie stays."""

    async def go(ops: SpawnerOps) -> None:
        _, _, out = await _run(ops, _spec(["/bin/sh", "-c", "sleep 300 & echo $!"]))
        orphan = int(out)
        wait_for(lambda: not os.path.exists(f"/proc/{orphan}") or _state(orphan) == "Z", timeout=5)
        spawner = ops.spawner_pid
        assert spawner is not None
        assert not children_of(spawner)

    run_ops(go)


def test_an_exit_is_reported_before_the_starts_queued_behind_it() -> None:
    """A job that ends while starts are queued is reported between them, not after them all.

    Each start holds the spawner while its child sets up and execs; when it
    drained every queued request before looking at exits, an original-protocol
    client polled QueryJob for a job long gone (issue 17).
    """

    async def go(ops: SpawnerOps) -> None:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[Exit] = loop.create_future()
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        victim = await ops.spawn(_spec(["/bin/sleep", "1000"], stdout_fd=null), ended.set_result)
        wire: list[tuple[str, int]] = []
        dispatch = ops._dispatch

        def record(msg: dict[str, Any]) -> None:
            wire.append((msg["op"], msg.get("pid", -1)))
            dispatch(msg)

        ops._dispatch = record  # type: ignore[method-assign]
        n = 40
        spawner = ops.spawner_pid
        assert spawner is not None
        # The spawner is held while the kill and a queue of starts are sent,
        # so it finds them all waiting when it goes on.
        os.kill(spawner, signal.SIGSTOP)
        try:
            ops.signal(victim, signal.SIGKILL)
            starts = [
                asyncio.ensure_future(
                    ops.spawn(_spec(["/bin/true"], stdout_fd=null), lambda ex: None)
                )
                for _ in range(n)
            ]
            await asyncio.sleep(0)  # each start sends its request before its first await
        finally:
            os.kill(spawner, signal.SIGCONT)
        try:
            await asyncio.wait_for(asyncio.gather(*starts), 30)
        finally:
            os.close(null)
        await asyncio.wait_for(ended, 10)
        spawned = [i for i, (op, _) in enumerate(wire) if op == "spawned"]
        assert len(spawned) == n
        at = wire.index(("exited", victim))
        # Reported after at most a few starts (the kill takes a moment), long before the last.
        assert at < spawned[n // 2], wire

    run_ops(go)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_spawner_is_small_and_never_imports_grpc() -> None:
    """The spawner process maps no grpc library and stays small."""

    async def go(ops: SpawnerOps) -> None:
        await _run(ops, _spec(["/bin/true"]))
        pid = ops.spawner_pid
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "grpc" not in maps and "_asyncio" not in maps and "yaml" not in maps
        rss = next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        assert rss < 40_000  # kB; about 12 MB measured

    run_ops(go)


# ---------------------------------------------------------------- through a real agent


SENTINELS = {
    "elf-magic-then-shell": b"\x7fELF\necho ran >> MARKER\n",
    "fake-elf-header": b"\x7fELF\x02\x01\x01"
    + b"\0" * 9
    + b"\x02\0\x3e\0"
    + b"\0" * 44
    + b"\necho ran >> MARKER\n",
    "hashbang-to-text": b"#!INTERP\necho ran >> MARKER\n",
    "no-magic": b"echo ran >> MARKER\n",
}


@pytest.fixture(scope="module")
def sentinel_dir() -> Iterator[Path]:
    d = make_safe_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("limits", [{}, {"open_files": 64}], ids=["no-limits", "open-files"])
@pytest.mark.parametrize("kind", sorted(SENTINELS))
def test_sentinel_programs_never_run_through_a_shell(
    make_agent: AgentFactory, sentinel_dir: Path, kind: str, limits: dict[str, int]
) -> None:
    """Files the kernel refuses never run under a shell: the policy refuses what it can see
    (no magic, a #! naming a text file), the spawner's execve refuses the rest (ENOEXEC)."""
    tag = f"{kind}-{len(limits)}"
    marker = sentinel_dir / f"marker-{tag}"
    marker.write_text("")
    interp = sentinel_dir / f"interp-{tag}"  # a text file with no #! of its own
    interp.write_text(f"echo ran >> {marker}\n")
    os.chmod(interp, 0o755)
    prog = sentinel_dir / f"prog-{tag}"
    prog.write_bytes(
        SENTINELS[kind]
        .replace(b"MARKER", str(marker).encode())
        .replace(b"INTERP", str(interp).encode())
    )
    os.chmod(prog, 0o755)
    a = make_agent(
        f"version: 1\nentries:\n  - name: s\n    command: {prog}\n",
        limits={"max": {"open_files": 4096}, "default": {"open_files": 1024}},
    )
    c = a.client()
    try:
        st = c.wait(c.start(str(prog), "", limits=limits), timeout=10)
    except FailedPrecondition as e:  # the policy's format check came first
        assert "not-executable-format" in str(e) or "interpreter-not-elf" in str(e), e
        assert kind in ("hashbang-to-text", "no-magic"), kind
    else:
        assert (st.state, st.error_text) == ("FAILED", ENOEXEC)
    time.sleep(0.1)
    assert marker.read_text() == ""


def test_end_time_is_the_jobs_own_even_when_the_agent_hears_late(
    agent: AgentProcess, script_dir: Path
) -> None:
    """A job that exits while the agent is stopped (SIGSTOP) ends at its own time, taken by
    the spawner at the reap, not when the agent resumes and hears of it."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "sleep.sh"), args=["0.3"])
    started = time.time()
    agent.signal(signal.SIGSTOP)
    try:
        time.sleep(2.5)  # the job ends about 2 s before the agent can see it
    finally:
        agent.signal(signal.SIGCONT)
    st = c.wait(job, timeout=10)
    assert st.state == "SUCCEEDED", st
    assert st.end_time is not None and st.start_time is not None
    end, start = st.end_time.timestamp(), st.start_time.timestamp()
    assert end - started < 2.0 and end >= start, (start, end, started)


def _spawner_of(agent: AgentProcess) -> int:
    for pid in children_of(agent.pid):
        if is_spawner(pid):
            return pid
    raise AssertionError("no spawner process")


def test_keeper_death_a_new_keeper_takes_over_its_jobs(
    agent: AgentProcess, script_dir: Path
) -> None:
    """kill -9 of the job keeper (the agent's child): the agent starts a new one, which
    adopts the running job from its cgroup (RUNNING; a stop ends it through the cgroup,
    its exit status said unknown); without job cgroups the job ends FAILED saying so (it
    had started: not "start failed"). New jobs work."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "tree.sh"))
    wait_for(lambda: b"children started" in b"".join(c.stream(job)))
    first = _spawner_of(agent)
    os.kill(first, signal.SIGKILL)
    if JOB_CGROUPS:
        wait_for(lambda: _try_spawner(agent) not in (None, first))
        assert c.query(job).state == "RUNNING"
        assert len(job_processes(job)) >= 4, "nothing of it was killed"
        c.stop(job)
        st = c.wait(job, timeout=20)
        assert st.state == "STOPPED" and "exit status unknown" in st.error_text, st
    else:
        st = c.wait(job, timeout=10)
        assert (st.state, st.error_text) == ("FAILED", KEEPER_DIED)
    wait_for(lambda: not job_processes(job), timeout=5)
    assert c.wait(c.start("echo", "again"), timeout=10).state == "SUCCEEDED"
    assert _spawner_of(agent) != first
    assert "the job keeper (pid" in agent.log()


@pytest.mark.skipif(not JOB_CGROUPS, reason="needs job cgroups (root and a cgroup2 mount)")
def test_a_job_writing_across_the_keepers_death_loses_no_output(
    agent: AgentProcess, script_dir: Path
) -> None:
    """The agent keeps its child keeper's pipes (agent.daemon.pipestore, the part systemd's
    descriptor store plays for a service): the keeper is killed while a job writes, the
    next keeper gets the job's pipe back and reads on. Every line is there; the job is
    reported LOST only for its exit status, which only the dead keeper could have known."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "count.sh"), args=["60", "0.05"])
    wait_for(lambda: c.query(job).output_bytes > 0)
    os.kill(_spawner_of(agent), signal.SIGKILL)
    st = c.wait(job, timeout=30)
    assert st.state == "LOST", st
    assert st.error_text == ADOPTED_TEXT, st
    out = b"".join(c.stream(job)).decode()
    assert out.splitlines() == [f"line {i}" for i in range(1, 61)], out
    wait_for(lambda: not job_processes(job), timeout=5)


@pytest.mark.skipif(not JOB_CGROUPS, reason="needs job cgroups (root and a cgroup2 mount)")
def test_an_agent_restarted_gets_the_pipes_of_the_keeper_it_finds(
    agent: AgentProcess, script_dir: Path
) -> None:
    """kill -9 of the agent (its keeper runs on), a new agent attaches to that keeper and
    gets every pipe pushed again; then the keeper is killed: still no line lost."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "count.sh"), args=["200", "0.05"])
    wait_for(lambda: c.query(job).output_bytes > 0)
    keepers = agent.keepers()
    assert len(keepers) == 1
    agent.kill9()
    agent.restart()
    c = agent.client()
    wait_for(lambda: "attached" in agent.log().rsplit("job keeper (pid", 1)[-1])
    assert c.query(job).state == "RUNNING"
    os.kill(keepers[0], signal.SIGKILL)
    st = c.wait(job, timeout=60)
    assert (st.state, st.error_text) == ("LOST", ADOPTED_TEXT), st
    out = b"".join(c.stream(job)).decode()
    assert out.splitlines() == [f"line {i}" for i in range(1, 201)], out[-300:]
    wait_for(lambda: not job_processes(job), timeout=5)


@pytest.mark.skipif(not JOB_CGROUPS, reason="needs job cgroups (root and a cgroup2 mount)")
def test_the_agents_pipe_store_takes_only_job_pipes_from_its_keeper(
    agent: AgentProcess,
) -> None:
    """Another process (of the same uid: this test) writing to the store's socket is
    refused once the keeper is known: nothing it sends is kept."""
    import array
    import socket as so

    from agent.keeper.launch import KEEPER_SOCKET

    path = str(agent._dirs()[0] / KEEPER_SOCKET) + ".store"
    r, w = os.pipe()
    try:
        with so.socket(so.AF_UNIX, so.SOCK_DGRAM) as s:
            fds = array.array("i", [r])
            msg = b"FDSTORE=1\nFDNAME=00000000-0000-4000-8000-000000000000\nFDPOLL=0"
            s.sendmsg([msg], [(so.SOL_SOCKET, so.SCM_RIGHTS, fds.tobytes())], 0, path)
        wait_for(lambda: "refused" in agent.log() and "descriptor store" in agent.log())
    finally:
        os.close(r)
        os.close(w)


def test_spawner_dying_too_often_stops_the_agent(agent: AgentProcess) -> None:
    """More than three spawner deaths in a minute: the agent logs it and exits non-zero."""
    for i in range(4):
        pid = wait_for(lambda: _try_spawner(agent))
        os.kill(pid, signal.SIGKILL)
        if i < 3:
            wait_for(lambda p=pid: _try_spawner(agent) not in (None, p))
    assert agent.proc is not None
    assert agent.proc.wait(timeout=20) == 1
    assert "died 4 times" in agent.log()


def _try_spawner(agent: AgentProcess) -> int | None:
    try:
        return _spawner_of(agent)
    except AssertionError:
        return None


def test_the_keeper_is_small_and_never_imports_grpc(agent: AgentProcess) -> None:
    """The job keeper (the spawner grown into the process that holds the jobs) maps no
    grpc, asyncio or yaml library and stays small."""
    c = agent.client()
    assert c.wait(c.start("true"), timeout=10).state == "SUCCEEDED"
    pid = _spawner_of(agent)
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "grpc" not in maps and "_asyncio" not in maps and "yaml" not in maps
    assert b"agent.keeper.keeper" in Path(f"/proc/{pid}/cmdline").read_bytes()
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    assert rss < 40_000  # kB


def test_no_zombies_and_the_spawner_ends_with_the_agent(agent: AgentProcess) -> None:
    """After jobs end nothing is left unreaped; after the agent stops, so is its spawner."""
    c = agent.client()
    for j in [c.start("true") for _ in range(8)]:
        assert c.wait(j, timeout=10).state == "SUCCEEDED"
    spawner = _spawner_of(agent)
    assert [p for p in children_of(spawner)] == []
    assert [p for p in children_of(agent.pid) if _state(p) == "Z"] == []
    assert agent.stop() == 0
    wait_for(lambda: not os.path.exists(f"/proc/{spawner}") or _state(spawner) == "Z", timeout=5)


_UNPRIVILEGED = """
import asyncio, json, os, sys
sys.path.insert(0, sys.argv[1])
from agent.keeper.spawn import SpawnerOps, SpawnSpec

async def main():
    ops = SpawnerOps()
    out = {}
    for prog in sys.argv[2:]:
        for limits in ({}, {"open_files": 64}):
            spec = SpawnSpec(argv=[prog], executable=prog, env={}, cwd="/", stdout_fd=1,
                             uid=None, gid=None, umask=0o077, limits=limits)
            try:
                await ops.spawn(spec, lambda ex: None)
                out[f"{prog} {len(limits)}"] = "started"
            except OSError as e:
                out[f"{prog} {len(limits)}"] = str(e)
    ops.close()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become nobody")
def test_sentinels_fail_with_enoexec_when_unprivileged(sentinel_dir: Path, spawn_path: str) -> None:
    """A spawner running as nobody refuses the same sentinel files with ENOEXEC."""
    root = str(Path(agent.__file__).resolve().parent.parent)
    become = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    python = next(
        (
            p
            for p in (sys.executable, "/usr/bin/python3")
            if subprocess.run(
                [*become, p, "-I", "-c", f"import sys; sys.path.insert(0, {root!r}); import agent"],
                capture_output=True,
            ).returncode
            == 0
        ),
        None,
    )
    if python is None:
        pytest.skip("no interpreter that nobody can run with this package")
    if spawn_path == "vfork" and subprocess.run(
        [*become, python, "-I", "-c", f"import sys; sys.path.insert(0, {root!r}); "
         "import agent.keeper._vspawn"],
        capture_output=True,
    ).returncode:  # fmt: skip
        # e.g. the 3.10 run: nobody cannot run pyenv's python, and /usr/bin/python3 is 3.11
        pytest.skip("the interpreter nobody can run cannot load this build's extension")
    marker = sentinel_dir / "marker-unprivileged"
    marker.write_text("")
    os.chmod(marker, 0o666)
    interp = sentinel_dir / "interp-unprivileged"
    interp.write_text(f"echo ran >> {marker}\n")
    os.chmod(interp, 0o755)
    progs = []
    for kind, body in sorted(SENTINELS.items()):
        prog = sentinel_dir / f"unpriv-{kind}"
        prog.write_bytes(
            body.replace(b"MARKER", str(marker).encode()).replace(b"INTERP", str(interp).encode())
        )
        os.chmod(prog, 0o755)
        progs.append(str(prog))
    res = subprocess.run(
        [*become, python, "-I", "-c", _UNPRIVILEGED, root, *progs],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert res.returncode == 0, res.stderr
    outcome = json.loads(res.stdout.splitlines()[-1])
    assert len(outcome) == 8
    assert set(outcome.values()) == {"execve: Exec format error (ENOEXEC)"}, outcome
    assert marker.read_text() == ""


# A job that leaves its scratch directory as hostile as it can (every mode 000, its
# scratch directory too, links to a file and a directory outside), through a spawner
# started directly in a fresh interpreter so the spawner's own privileges can be chosen.
_SCRATCH_JOB = """
import asyncio, json, os, sys
sys.path.insert(0, sys.argv[1])
from agent.keeper import landlock
from agent.keeper.spawn import SpawnerOps, SpawnSpec

MESS = (
    'cd "$HOME" && mkdir -p a/b/c d && echo x > a/b/c/f && echo y > a/f && '
    'ln -s "$1" a/b/to-file && ln -s "$2" d/to-dir && chmod 000 a/b/c/f a/b/c a/b a/f a d .'
)

async def main():
    root, outside, uid = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    scratch = os.path.join(root, "job")
    null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
    spec = SpawnSpec(
        argv=["/bin/sh", "-c", MESS, "sh", outside + "/file", outside + "/dir"],
        executable="/bin/sh", env={"PATH": "/usr/bin:/bin", "HOME": scratch}, cwd=scratch,
        stdout_fd=null, uid=uid, gid=uid, umask=0o077, limits={},
        landlock=landlock.LandlockSpec(read_exec=("/usr", "/bin", "/lib", "/lib64"),
                                       write=("/dev/null",)),
        landlock_abi=landlock.abi_version(), scratch=scratch,
    )
    ops = SpawnerOps()
    done = asyncio.get_running_loop().create_future()
    await ops.spawn(spec, done.set_result)
    ex = await asyncio.wait_for(done, 20)
    ops.close()
    print(json.dumps({"exit": ex.exit_code, "left": os.path.lexists(scratch)}))

asyncio.run(main())
"""
# What a hardened unit may drop (the job's chdir into its scratch directory, as root
# before the user switch, still needs CAP_DAC_READ_SEARCH).
_NO_DAC = "-dac_override,-fowner"


def _python_for(become: list[str], root: str, vfork: bool) -> str | None:
    """An interpreter that can import this package (and its extension) as ``become``."""
    need = "import agent.keeper._vspawn" if vfork else "import agent"
    for python in (sys.executable, "/usr/bin/python3"):
        probe = f"import sys; sys.path.insert(0, {root!r}); {need}"
        if subprocess.run([*become, python, "-I", "-c", probe], capture_output=True).returncode:
            continue
        return python
    return None


@pytest.mark.skipif(not IS_ROOT, reason="needs root to choose the spawner's user")
@pytest.mark.parametrize("who", ["same-uid", "root-without-dac-override"])
def test_scratch_is_removed_whatever_the_job_did_to_it(spawn_path: str, who: str) -> None:
    """Nested 000 files and directories, a 000 scratch directory and symlinks out: all
    removed when the job ends, what the links name untouched. same-uid: an unprivileged
    spawner (nobody) and its job (nobody) make it accessible again; root without
    CAP_DAC_OVERRIDE/CAP_FOWNER (a hardened unit), its job nobody: removed as nobody."""
    if landlock.abi_version() < 6:
        pytest.skip("needs Landlock ABI 6")
    if who == "same-uid":
        become = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        job_uid = None
    else:
        become = ["setpriv", f"--bounding-set={_NO_DAC}", f"--inh-caps={_NO_DAC}", "--"]
        job_uid = 65534
    pkg = str(Path(agent.__file__).resolve().parent.parent)
    python = _python_for(become, pkg, spawn_path == "vfork")
    if python is None:
        pytest.skip("no interpreter that can run this package's spawner as that user")
    base = Path(tempfile.mkdtemp(prefix="scratch-spawner-"))
    try:
        os.chmod(base, 0o755)
        root, outside = base / "root", base / "outside"
        root.mkdir(mode=0o711)
        (outside / "dir").mkdir(parents=True)
        (outside / "dir" / "kept").write_text("kept\n")
        (outside / "file").write_text("file\n")
        os.chmod(outside / "dir", 0o555)
        # Everything outside is nobody's: a removal that followed a link could delete it.
        for p in (outside, outside / "dir", outside / "dir" / "kept", outside / "file"):
            os.chown(p, 65534, 65534)
        if who == "same-uid":
            os.chown(root, 65534, 65534)  # the unprivileged agent's own scratch root
        res = subprocess.run(
            [*become, python, "-I", "-c", _SCRATCH_JOB, pkg, str(root), str(outside),
             json.dumps(job_uid)],
            capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.splitlines()[-1]) == {"exit": 0, "left": False}, res.stderr
        assert "not removed" not in res.stderr, res.stderr
        assert os.listdir(root) == []
        assert (outside / "file").read_text() == "file\n"
        assert (outside / "dir" / "kept").read_text() == "kept\n"
        assert os.stat(outside / "dir").st_mode & 0o777 == 0o555
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def test_a_bug_in_one_handler_does_not_take_the_spawner_down(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An exception while handling one job's event is logged with its traceback and the
    spawner goes on (its death would kill every running job); a start that hits one is
    answered as failed, so the agent never waits for it."""
    import socket as socket_mod

    from agent.keeper import spawner as spawner_mod
    from agent.keeper import spawnproto

    ours, theirs = socket_mod.socketpair(socket_mod.AF_UNIX, socket_mod.SOCK_SEQPACKET)
    with ours, theirs:
        sp = spawner_mod.Spawner(ours)

        def broken(*_: Any) -> None:
            raise RuntimeError("a bug")

        sp.on_exit = broken  # type: ignore[method-assign,assignment]
        sp.dispatch(12345)
        assert "internal error handling 12345" in capsys.readouterr().err
        sp.spawn = broken  # type: ignore[method-assign,assignment]
        spawnproto.send(theirs, {"op": "spawn", "id": 7, "plan": {}, "fds": []}, [])
        sp.on_socket()
        assert sp.running
        answer, _ = spawnproto.decode(*spawnproto.recv(theirs, 0))
        assert (
            answer["op"] == "spawned" and answer["id"] == 7 and "internal error" in answer["error"]
        )
        assert "RuntimeError: a bug" in capsys.readouterr().err
