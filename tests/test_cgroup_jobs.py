"""Jobs in cgroups: a real agent (root here), real job cgroups on this machine's cgroup2.

Each job runs in ``<cgroup2 mount>/worker-agent/<instance>/<job id>``; the tests
start escapes (setsid, double fork, ``set -m``, ``env -i``, nohup, renamed,
TERM ignored) and check that nothing of them is alive after stop, timeout,
the leader's exit, the agent's shutdown and a restart after ``kill -9``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.client.errors import FailedPrecondition
from agent.daemon.supervisor import NO_CGROUP_NOTE
from agent.keeper import lifecycle as lc
from agent.keeper.jobsettings import instance_id
from agent.vocabulary import JobState

from helpers import (
    AgentFactory,
    AgentProcess,
    cgroup2_mount,
    make_safe_dir,
    policy_for,
    wait_for,
    write_script,
)

IS_ROOT = os.geteuid() == 0


MOUNT = cgroup2_mount()
pytestmark = pytest.mark.skipif(
    not IS_ROOT or MOUNT is None, reason="needs root and a cgroup2 mount (job cgroups)"
)


def _controllers() -> set[str]:
    if MOUNT is None:
        return set()
    try:
        return set((MOUNT / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


CONTROLLERS = _controllers()

ESCAPES = {
    "setsid": "setsid /bin/sh -c 'echo pid $$; exec sleep 1000' &",
    "double-fork": "( /bin/sh -c 'echo pid $$; exec sleep 1000' & )",
    "set-m": "set -m; /bin/sh -c 'echo pid $$; exec sleep 1000' & set +m",
    "env-i": "setsid env -i /bin/sh -c 'echo pid $$; exec /bin/sleep 1000' &",
    "nohup": "nohup /bin/sh -c 'echo pid $$; exec sleep 1000' &",
    "renamed": "setsid /bin/bash -c 'echo pid $$; exec -a \"[kworker/0:1]\" sleep 1000' &",
    "all-at-once": (
        "( setsid env -i /bin/bash -c "
        "'trap \"\" TERM HUP; echo pid $$; exec -a x /bin/sleep 1000' & )"
    ),
}


@pytest.fixture(scope="module")
def escape_dir() -> Path:
    d = make_safe_dir()
    lines = ["#!/bin/bash", 'case "$1" in']
    lines += [f"  {name}) {cmd} ;;" for name, cmd in ESCAPES.items()]
    lines += [
        "esac",
        "sleep 0.2",
        "echo ready",
        'if [ "$2" = exit ]; then exit 0; fi',
        "sleep 1000",
    ]
    write_script(d, "escape.sh", "\n".join(lines) + "\n")
    write_script(d, "cgroup.sh", "#!/bin/bash\ncat /proc/self/cgroup\n")
    write_script(
        d,
        "burn.sh",
        "#!/bin/bash\nsetsid /bin/bash -c 'i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done' &\n"
        "wait\n",
    )
    # Holds 400 MB in one shell variable (and its pipe buffers).
    write_script(
        d, "hog.sh", "#!/bin/bash\na=$(head -c 400000000 /dev/zero | tr '\\0' x)\necho ${#a}\n"
    )
    return d


@pytest.fixture
def cg_agent(make_agent: AgentFactory, escape_dir: Path, script_dir: Path) -> AgentProcess:
    return make_agent(policy_for(script_dir, _entry(escape_dir)))


def _entry(d: Path) -> str:
    return f"""  - name: escapes
    command: /bin/bash
    aliases: [bash]
    scripts: ["{d}/*.sh"]
    args: {{max_count: 2}}
"""


def _subtree(a: AgentProcess) -> Path:
    assert MOUNT is not None
    return MOUNT / "worker-agent" / instance_id(a.state)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :][:1] != b"Z"


def _escapees(a: AgentProcess, job: str, n: int = 1, *, alive: bool = True) -> list[int]:
    c = a.client()

    def pids() -> list[int] | None:
        out = b"".join(c.stream(job))
        found = [int(line.split()[1]) for line in out.splitlines() if line.startswith(b"pid ")]
        return found if len(found) >= n and b"ready" in out else None

    found: list[int] = wait_for(pids, timeout=10)
    assert not alive or all(_alive(p) for p in found)
    return found


def _gone(pids: list[int]) -> bool:
    return not any(_alive(p) for p in pids)


# ---------------------------------------------------------------- the cgroup itself


def test_job_runs_in_its_own_cgroup_removed_afterwards(
    cg_agent: AgentProcess, escape_dir: Path
) -> None:
    """A job's processes are in <subtree>/<job id> from the start; the leaf is gone after."""
    c = cg_agent.client()
    job = c.start("bash", str(escape_dir / "cgroup.sh"))
    st = c.wait(job, timeout=10)
    assert st.state == "SUCCEEDED", st.error_text
    out = b"".join(c.stream(job)).decode()
    assert MOUNT is not None
    expected = "/" + str((_subtree(cg_agent) / job).relative_to(MOUNT))
    assert f"0::{expected}\n" in out
    # The empty leaf goes right after the end is reported (not before: see cgroup_done).
    wait_for(lambda: not (_subtree(cg_agent) / job).exists(), timeout=5)
    assert "job cgroups" not in cg_agent.log() or "lack the" in cg_agent.log()


def test_true_reports_its_own_peak_or_none(cg_agent: AgentProcess) -> None:
    """/bin/true's peak RSS is its cgroup's memory.peak, or 0: never the agent's 50 MB."""
    c = cg_agent.client()
    st = c.wait(c.start("true", ""), timeout=10)
    assert st.state == "SUCCEEDED"
    if "memory" in CONTROLLERS:
        assert 0 < st.max_rss < 8 << 20
    else:
        assert st.max_rss == 0


def test_cpu_of_escaped_processes_is_accounted(cg_agent: AgentProcess, escape_dir: Path) -> None:
    """CPU comes from cpu.stat: a setsid'd child's work counts, which wait4 never sees."""
    c = cg_agent.client()
    st = c.wait(c.start("bash", str(escape_dir / "burn.sh")), timeout=30)
    assert st.state == "SUCCEEDED", st.error_text
    assert st.user_cpu + st.system_cpu > 0.05


# ---------------------------------------------------------------- escapes


@pytest.mark.parametrize("kind", sorted(ESCAPES))
def test_escapes_die_on_stop(cg_agent: AgentProcess, escape_dir: Path, kind: str) -> None:
    """StopJob leaves nothing of the job alive, whatever it did to leave its group."""
    c = cg_agent.client()
    job = c.start("bash", str(escape_dir / "escape.sh"), args=[kind])
    pids = _escapees(cg_agent, job)
    c.stop(job)
    st = c.wait(job, timeout=20)
    assert st.state == "STOPPED"
    # Done means the cgroup was empty: nothing may be alive at this point.
    assert _gone(pids)
    wait_for(lambda: not (_subtree(cg_agent) / job).exists(), timeout=5)


@pytest.mark.parametrize("kind", ["all-at-once", "env-i", "double-fork"])
def test_escapes_die_on_timeout_and_leader_exit(
    cg_agent: AgentProcess, escape_dir: Path, kind: str
) -> None:
    """A timeout, or the leader's own exit, ends every process of the job."""
    c = cg_agent.client()
    job = c.start("bash", str(escape_dir / "escape.sh"), args=[kind], timeout_seconds=2)
    pids = _escapees(cg_agent, job)
    st = c.wait(job, timeout=20)
    assert st.state == "TIMED_OUT" and _gone(pids)
    job = c.start("bash", str(escape_dir / "escape.sh"), args=[kind, "exit"])
    st = c.wait(job, timeout=20)
    assert st.state == "SUCCEEDED"
    assert _gone(_escapees(cg_agent, job, alive=False))


def test_escapes_die_at_shutdown(
    make_agent: AgentFactory, escape_dir: Path, script_dir: Path
) -> None:
    """SIGTERM to the agent: every job's escaped processes are gone when it exits; subtree too."""
    a = make_agent(policy_for(script_dir, _entry(escape_dir)))
    c = a.client()
    jobs = [
        c.start("bash", str(escape_dir / "escape.sh"), args=[k]) for k in ("all-at-once", "set-m")
    ]
    pids = [p for j in jobs for p in _escapees(a, j)]
    assert a.stop() == 0
    assert _gone(pids)
    assert not _subtree(a).exists()


def test_a_job_is_adopted_after_kill9_of_agent_and_keeper(
    make_agent: AgentFactory, escape_dir: Path, script_dir: Path
) -> None:
    """After kill -9 of the agent and of its job keeper, the job (escapee included) runs
    on in its cgroup; the next start's keeper adopts it (RUNNING, nothing killed at
    start-up); a stop ends it through its cgroup, honestly: STOPPED with its exit
    status unknown; nothing is left."""
    a = make_agent(policy_for(script_dir, _entry(escape_dir)))
    c = a.client()
    job = c.start("bash", str(escape_dir / "escape.sh"), args=["all-at-once"])
    pids = _escapees(a, job)
    a.kill9()
    # Nobody holds the job any more; it and its escapee stay.
    assert a.kill_keepers(), "the agent had a job keeper"
    assert not _gone(pids) and (_subtree(a) / job).is_dir()
    a.restart()
    assert not _gone(pids)
    c = a.client()
    assert c.query(job).state == "RUNNING"
    c.stop(job)
    st = c.wait(job, timeout=20)
    assert st.state == "STOPPED"
    assert "exit status unknown" in st.error_text
    assert _gone(pids)
    assert not (_subtree(a) / job).exists()


def test_escapes_stay_the_jobs_after_kill9_of_the_agent(
    make_agent: AgentFactory, escape_dir: Path, script_dir: Path
) -> None:
    """kill -9 of the agent alone: the keeper holds the job, whose escapees stay in its
    cgroup; the next agent adopts it (RUNNING, nothing killed at start-up), and they die
    when the job ends."""
    a = make_agent(policy_for(script_dir, _entry(escape_dir)))
    c = a.client()
    job = c.start("bash", str(escape_dir / "escape.sh"), args=["all-at-once"])
    pids = _escapees(a, job)
    keepers = a.keepers()
    a.kill9()
    assert a.keepers() == keepers
    a.restart()
    assert not _gone(pids)
    procs = (_subtree(a) / job / "cgroup.procs").read_text().split()
    assert {str(p) for p in pids} <= set(procs), procs
    c = a.client()
    assert c.query(job).state == "RUNNING"
    c.stop(job)
    st = c.wait(job, timeout=20)
    assert st.state == "STOPPED"
    assert _gone(pids)
    assert not (_subtree(a) / job).exists()


# ---------------------------------------------------------------- limits


@pytest.mark.skipif("memory" in CONTROLLERS, reason="the memory controller exists here")
def test_memory_limit_without_controller_is_failed_precondition(cg_agent: AgentProcess) -> None:
    """memory_bytes needs the memory controller: refused with one line naming it, nothing runs."""
    c = cg_agent.client()
    with pytest.raises(FailedPrecondition, match="memory_bytes needs the memory controller"):
        c.start("true", "", limits={"memory_bytes": 256 << 20})


@pytest.mark.skipif("pids" in CONTROLLERS, reason="the pids controller exists here")
def test_process_limit_without_controller_is_failed_precondition(cg_agent: AgentProcess) -> None:
    """processes needs the pids controller: FAILED_PRECONDITION naming it."""
    c = cg_agent.client()
    with pytest.raises(FailedPrecondition, match="processes needs the pids controller"):
        c.start("true", "", limits={"processes": 10})
    # rlimits the kernel gives per process still work.
    st = c.wait(c.start("true", "", limits={"open_files": 64, "cpu_seconds": 5}), timeout=10)
    assert st.state == "SUCCEEDED"


@pytest.mark.skipif("memory" not in CONTROLLERS, reason="no memory controller on this machine")
def test_memory_hungry_job_ends_with_the_oom_reason(
    cg_agent: AgentProcess, escape_dir: Path
) -> None:
    """Where the memory controller exists, a job past memory.max ends as OOM-killed."""
    c = cg_agent.client()
    job = c.start("bash", str(escape_dir / "hog.sh"), limits={"memory_bytes": 64 << 20})
    st = c.wait(job, timeout=60)
    assert st.state == "FAILED"
    assert st.error_text.startswith("killed by the OOM killer at memory.max 64 MiB"), st.error_text


def _run_agent(a: AgentProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(a.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(a.workdir),
    )


@pytest.mark.skipif("memory" in CONTROLLERS, reason="the memory controller exists here")
def test_default_limit_needing_a_missing_controller_refuses_start(make_agent: AgentFactory) -> None:
    """[limits.default] memory_bytes without the memory controller: one line, exit 2."""
    a = make_agent(start=False, limits={"default": {"memory_bytes": 1 << 30}})
    r = _run_agent(a)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "[limits.default] memory_bytes" in line and "memory controller" in line


def test_required_mode_without_a_usable_subtree_exits_2(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """mode = "required", a path outside cgroup2: one line naming [cgroups] mode, exit 2."""
    a = make_agent(start=False, cgroups={"mode": "required", "path": str(tmp_path / "nocg")})
    r = _run_agent(a)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "[cgroups] mode" in line and "not inside a cgroup2 mount" in line


def test_auto_mode_without_a_subtree_runs_jobs_and_says_so(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """mode = "auto" without a usable subtree: jobs run, the agent says so once and in each job."""
    a = make_agent(cgroups={"mode": "auto", "path": str(tmp_path / "nocg")})
    assert a.log().count("jobs run without cgroups") == 1
    c = a.client()
    st = c.wait(c.start("true", ""), timeout=10)
    assert st.state == "SUCCEEDED" and NO_CGROUP_NOTE in st.error_text
    with pytest.raises(FailedPrecondition, match="jobs run without a cgroup"):
        c.start("true", "", limits={"memory_bytes": 1 << 30})


# ---------------------------------------------------------------- pure: the OOM reason


def test_oom_kill_is_its_own_end_reason() -> None:
    """memory.events oom_kill > 0: FAILED, "killed by the OOM killer at memory.max 256 MiB"."""
    life = lc.Life(memory_max=256 << 20)
    life.handle(lc.Exited(lc.Exit(exit_code=None, signal=signal.SIGKILL, oom_kills=1)))
    (fin,) = life.handle(lc.OutputClosed())
    assert isinstance(fin, lc.Finish) and fin.state is JobState.FAILED
    assert fin.text == "killed by the OOM killer at memory.max 256 MiB (killed by SIGKILL)"


def test_stop_wins_over_oom_and_success_ignores_it() -> None:
    """A stopped job stays STOPPED; a clean exit 0 stays SUCCEEDED even after an OOM kill."""
    life = lc.Life(memory_max=1 << 30)
    life.handle(lc.StopRequested())
    life.handle(lc.Exited(lc.Exit(exit_code=None, signal=signal.SIGKILL, oom_kills=1)))
    (fin,) = life.handle(lc.OutputClosed())
    assert isinstance(fin, lc.Finish) and fin.state is JobState.STOPPED
    life = lc.Life()
    life.handle(lc.Exited(lc.Exit(exit_code=0, signal=None, oom_kills=1)))
    (fin,) = life.handle(lc.OutputClosed())
    assert isinstance(fin, lc.Finish) and fin.state is JobState.SUCCEEDED
