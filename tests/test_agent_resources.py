"""The agent's own resources running out: a status that says so, one log line, nothing
started half-way, so a client retries instead of changing a request that was never
wrong. Real agents under a low descriptor limit; the mapping and the policy seam
directly."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from agent._proto import jobscheduler_pb2 as pb
from agent.keeper import errors, policy, policyfile
from agent.keeper.errors import ResourceExhausted, Unavailable, agent_condition
from agent.keeper.filetrust import RealFileSystem

from helpers import AgentFactory, AgentProcess, wait_for

PRLIMIT = shutil.which("prlimit")


# ---------------------------------------------------------------- the mapping


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (
            OSError(errno.EMFILE, "Too many open files"),
            ResourceExhausted,
            "out of file descriptors",
        ),
        (OSError(errno.ENFILE, "Too many open files in system"), ResourceExhausted, "system"),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), ResourceExhausted, "out of memory"),
        (MemoryError(), ResourceExhausted, "out of memory"),
        (OSError(errno.ENOSPC, "No space left on device"), Unavailable, "disk is full"),
        (OSError(errno.EAGAIN, "Resource temporarily unavailable"), Unavailable, "process"),
        (RuntimeError("can't start new thread"), Unavailable, "thread"),
    ],
)
def test_the_agents_conditions_have_their_own_status(
    exc: BaseException, kind: type[errors.AgentError], words: str
) -> None:
    """Each exhaustion of the agent's resources is its own refusal, saying it is the
    agent's condition (so a client retries instead of changing its request)."""
    err = agent_condition(exc)
    assert isinstance(err, kind)
    assert words in err.message and "the agent's condition" in err.message
    assert err.rule == "agent-resources"


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOENT, "x"), RuntimeError("other"), ValueError("v"), KeyError("k")]
)
def test_other_errors_are_not_the_agents_condition(exc: BaseException) -> None:
    """Anything else is not mistaken for a resource problem."""
    assert agent_condition(exc) is None


class _NoDescriptors(RealFileSystem):
    def open_verified(self, path: str, st: os.stat_result) -> int:
        raise OSError(errno.EMFILE, "Too many open files")


def test_policy_open_out_of_descriptors_is_not_a_changed_file() -> None:
    """EMFILE while opening the checked program is the agent's condition, never
    "changed while being checked" [file-changed]."""
    pol = policyfile.parse("version: 1\nentries:\n  - name: t\n    command: /bin/true\n")
    req = policy.JobRequest(command="/bin/true", path="")
    with pytest.raises(ResourceExhausted, match="out of file descriptors"):
        policy.decide(pol, req, fs=_NoDescriptors())


# ---------------------------------------------------------------- real agents


def _limited(agent: AgentProcess, nofile: int) -> list[str]:
    assert PRLIMIT is not None
    return [
        PRLIMIT,
        f"--nofile={nofile}:{nofile}",
        sys.executable,
        "-m",
        "agent",
        "run",
        "--config",
        str(agent.config_path),
    ]


@pytest.mark.skipif(PRLIMIT is None, reason="needs prlimit (util-linux)")
def test_out_of_descriptors_answers_resource_exhausted_and_recovers(
    make_agent: AgentFactory, script_dir: Path
) -> None:
    """Under a low descriptor limit, starts beyond what the agent can hold are refused
    RESOURCE_EXHAUSTED ("out of file descriptors"), never UNKNOWN, no traceback in the
    log, no job started half-way; once jobs end, starts work again."""
    a = make_agent(start=False, jobs={"max_running": 500})
    a.start(command=_limited(a, 90))
    started: list[str] = []
    refused: list[tuple[grpc.StatusCode, str]] = []
    with a.stub() as stub:
        for _ in range(80):
            req = pb.StartJobReq(command="bash", path=str(script_dir / "sleep.sh"))
            try:
                started.append(stub.StartJob(req, timeout=20).jobID)
            except grpc.RpcError as e:
                refused.append((e.code(), e.details() or ""))
                if len(refused) >= 5:
                    break
        assert refused, "the limit was never reached"
        for code, details in refused:
            assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE), (
                code,
                details,
            )
            assert "the agent's condition" in details, details
        # Every accepted job really runs (nothing half-started), and stops.
        for job in started:
            res = stub.QueryJob(pb.QueryJobReq(jobID=job), timeout=20)
            assert not res.done, res
        for job in started:
            stub.StopJob(pb.StopJobReq(jobID=job), timeout=20)

        def all_done() -> bool:
            return all(stub.QueryJob(pb.QueryJobReq(jobID=j), timeout=20).done for j in started)

        wait_for(all_done, timeout=30)
        ok = stub.StartJob(pb.StartJobReq(command="echo", path="again"), timeout=20)
        assert ok.jobID
    log = a.log()
    assert "Traceback" not in log and "Unexpected <class" not in log, log[-3000:]
    assert "out of file descriptors" in log


def test_a_default_limit_above_the_agents_hard_limit_is_refused_at_start(
    make_agent: AgentFactory,
) -> None:
    """[limits.default] open_files above the agent's own hard limit stops the start-up
    (exit 2, one line naming the key), instead of refusing every StartJob later."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 1 << 30:
        pytest.skip("no finite hard descriptor limit to exceed")
    a = make_agent(start=False, limits={"default": {"open_files": hard + 1}})
    r = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(a.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(a.workdir),
    )
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "[limits.default]" in lines[0] and "open_files" in lines[0], lines
