"""Jobs end to end: a real agent, real mTLS, real child processes."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import grpc
import pytest

from agent.client import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

from helpers import (
    IS_ROOT,
    AgentFactory,
    AgentProcess,
    job_children,
    job_processes,
    pb,
    wait_for,
)


def test_start_query_succeeds_and_output_is_captured(agent: AgentProcess, script_dir: Path) -> None:
    """A whitelisted script runs, its stdout and stderr land in one 0600 file."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "fail.sh"), args=["0"])
    st = c.wait(job, timeout=10)
    assert st.state == "SUCCEEDED" and st.done and not st.error
    assert st.exit_code == 0 and st.signal is None
    assert st.command in ("/usr/bin/bash", "/bin/bash")
    out = agent.state / "output" / f"{job}.out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text() == "failing with 0\n"  # stderr captured too
    assert b"".join(c.stream(job)) == b"failing with 0\n"


def test_nonzero_exit_sets_original_error_fields(agent: AgentProcess, script_dir: Path) -> None:
    """error/errorText are filled as the original worker fills them."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "fail.sh"), args=["7"])
    st = c.wait(job, timeout=10)
    assert st.state == "FAILED" and st.done and st.error
    assert st.exit_code == 7
    assert st.error_text == "exit status 7"
    with agent.stub() as stub:
        res = stub.QueryJob(pb.QueryJobReq(jobID=job), timeout=5)
    assert res.done and res.error and res.errorText == "exit status 7"
    assert res.state == pb.FAILED and res.exitCode == 7 and res.pid > 0
    assert res.startTime.ToNanoseconds() <= res.endTime.ToNanoseconds()


def test_executable_gets_path_as_first_argument(agent: AgentProcess) -> None:
    """`command path args...` for an executable: path is argv[1]."""
    c = agent.client()
    job = c.start("echo", "first", args=["second", "third"])
    assert c.wait(job, timeout=10).state == "SUCCEEDED"
    assert b"".join(c.stream(job)) == b"first second third\n"


def test_clean_environment_stdin_devnull_own_group(
    agent: AgentProcess, script_dir: Path, tmp_path: Path
) -> None:
    """The job sees a minimal environment (not the agent's) and leads its own group."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "env.sh"))
    assert c.wait(job, timeout=10).state == "SUCCEEDED"
    env = dict(line.split("=", 1) for line in b"".join(c.stream(job)).decode().splitlines())
    assert set(env) <= {
        "PATH",
        "HOME",
        "TMPDIR",
        "USER",
        "LOGNAME",
        "LANG",
        "AGENT_JOB_ID",
        "AGENT_INSTANCE",
        "PWD",
        "SHLVL",
        "_",
        "OLDPWD",
    }
    assert env["AGENT_JOB_ID"] == job
    assert "PYTHONPATH" not in env
    # own process group / session, stdin from /dev/null
    job2 = c.start("bash", str(script_dir / "sleep.sh"), args=["30"])
    wait_for(lambda: b"started" in b"".join(c.stream(job2)))  # past its exec
    pid = c.query(job2).pid
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    if IS_ROOT:
        st = os.stat(f"/proc/{pid}")
        assert (st.st_uid, st.st_gid) == (65534, 65534)  # nobody, and its group
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        assert status["Groups"].strip() == ""  # root's supplementary groups dropped
        assert status["CapEff"].strip() == "0000000000000000"
    c.stop(job2)
    assert c.wait(job2, timeout=10).state == "STOPPED"


def test_stop_kills_whole_tree_even_children_ignoring_term(
    agent: AgentProcess, script_dir: Path
) -> None:
    """Stopping a job whose script started children leaves no process of it alive."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "tree.sh"))
    wait_for(lambda: b"children started" in b"".join(c.stream(job)))
    wait_for(lambda: len(job_processes(job)) >= 4)
    t0 = time.monotonic()
    c.stop(job)
    st = c.wait(job, timeout=15)
    assert st.state == "STOPPED" and st.error
    assert "stopped by request" in st.error_text
    wait_for(lambda: not job_processes(job), timeout=5)
    # the TERM-ignoring child forced the SIGKILL after the grace (2 s here)
    assert time.monotonic() - t0 >= 1.5 or st.signal == signal.SIGTERM


def test_leftover_background_process_is_killed_when_leader_exits(
    agent: AgentProcess, script_dir: Path
) -> None:
    """A job is its process group: what it leaves behind dies with it."""
    c = agent.client()
    job = c.start("bash", str(script_dir / "hello.sh"))
    assert c.wait(job, timeout=10).state == "SUCCEEDED"
    assert not job_processes(job)


def test_stop_finished_job_succeeds_unknown_is_not_found(agent: AgentProcess) -> None:
    """Original semantics: stopping a finished job is fine; unknown ids are NOT_FOUND."""
    c = agent.client()
    job = c.start("true", "")
    assert c.wait(job, timeout=10).state == "SUCCEEDED"
    c.stop(job)
    assert c.query(job).state == "SUCCEEDED"
    with pytest.raises(NotFound):
        c.stop("00000000-0000-4000-8000-000000000000")
    with pytest.raises(NotFound):
        c.query("00000000-0000-4000-8000-000000000000")
    with pytest.raises(InvalidArgument):
        c.query("not-a-uuid")


def test_command_outside_whitelist_is_denied_and_nothing_starts(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """PERMISSION_DENIED, no process, no output file, and an audit line."""
    c = agent.client()
    marker = tmp_path / "ran"
    before_children = set(job_children(agent.pid))
    before_files = agent.output_files()
    for command, path, args in [
        ("/bin/sh", "-c", [f"touch {marker}"]),
        ("sh", "-c", [f"touch {marker}"]),
        ("/usr/bin/touch", str(marker), []),
        ("bash", "/etc/passwd", []),
        ("bash", "-c", [f"touch {marker}"]),
        ("/usr/bin/env", "touch", [str(marker)]),
    ]:
        with pytest.raises((PermissionDenied, InvalidArgument)):
            c.start(command, path, args=args)
    assert not marker.exists()
    assert agent.output_files() == before_files
    assert set(job_children(agent.pid)) <= before_children
    denials = [e for e in agent.audit_lines() if e["decision"] == "deny"]
    assert len(denials) >= 6
    assert all(e["identity"] == "client" and e["rpc"] == "StartJob" for e in denials)


def test_missing_script_in_allowed_place_is_not_found(
    agent: AgentProcess, script_dir: Path
) -> None:
    """A script the policy would allow but that does not exist: NOT_FOUND."""
    with pytest.raises(NotFound, match="does not exist"):
        agent.client().start("bash", str(script_dir / "nope.sh"))


def test_client_without_certificate_cannot_call(agent: AgentProcess) -> None:
    """No client certificate: the handshake fails, the call is UNAVAILABLE."""
    with agent.stub(identity=None) as stub, pytest.raises(grpc.RpcError) as e:
        stub.QueryJob(pb.QueryJobReq(jobID="00000000-0000-4000-8000-000000000000"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_start_failure_is_reported_through_query(
    make_agent: AgentFactory, script_dir: Path
) -> None:
    """A program whose #! interpreter is missing is refused at StartJob, before anything runs."""
    bad = script_dir / "noexec-interp.sh"
    bad.write_text("#!/nonexistent/interpreter\necho hi\n")
    os.chmod(bad, 0o755)
    policy = f"""
version: 1
entries:
  - name: direct
    command: {bad}
"""
    a = make_agent(policy)
    c = a.client()
    with pytest.raises(FailedPrecondition) as e:
        c.start(str(bad), "")
    assert "interpreter-file-missing" in str(e.value)


def test_output_file_that_cannot_be_created_fails_that_job(
    make_agent: AgentFactory, tmp_path: Path, script_dir: Path
) -> None:
    """No inode left for the output file: a job that writes fails clearly, one that
    writes nothing succeeds (the file is made at the first byte), the agent serves on."""
    import subprocess

    disk = tmp_path / "noinodes"
    disk.mkdir(mode=0o700)
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=1,mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()}")
    try:
        a = make_agent(jobs={"output_dir": str(disk)})
        c = a.client()
        st = c.wait(c.start("bash", str(script_dir / "sleep.sh"), args=["30"]), timeout=15)
        assert st.state == "FAILED"
        assert "its output file could not be created: No space left on device" in st.error_text
        assert c.wait(c.start("true", ""), timeout=10).state == "SUCCEEDED"
        a.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_jobs_survive_many_quick_starts(agent: AgentProcess) -> None:
    """A burst of jobs all finish successfully (no crashed children)."""
    c = agent.client()
    jobs = [c.start("true", "") for _ in range(60)]
    states = [c.wait(j, timeout=20).state for j in jobs]
    assert states == ["SUCCEEDED"] * 60


def test_pinned_digests_run_the_verified_file(make_agent: AgentFactory, script_dir: Path) -> None:
    """A sha256 pin: the right digest runs (through the opened file), a wrong one is denied."""
    import hashlib

    echo = os.path.realpath("/bin/echo")
    good = hashlib.sha256(Path(echo).read_bytes()).hexdigest()
    script = script_dir / "hello.sh"
    sgood = hashlib.sha256(script.read_bytes()).hexdigest()
    policy = f"""
version: 1
entries:
  - name: pinned-echo
    command: /bin/echo
    aliases: [echo]
    sha256: "{good}"
  - name: wrong-pin
    command: /bin/true
    aliases: ["true"]
    sha256: "{"0" * 64}"
  - name: pinned-script
    command: /bin/bash
    aliases: [bash]
    scripts:
      - path: {script}
        sha256: "{sgood}"
      - path: {script_dir / "fail.sh"}
        sha256: "{"1" * 64}"
"""
    a = make_agent(policy)
    c = a.client()
    job = c.start("echo", "pinned", args=["ok"])
    st = c.wait(job, timeout=10)
    assert st.state == "SUCCEEDED"
    assert b"".join(c.stream(job)) == b"pinned ok\n"
    with pytest.raises(PermissionDenied, match="sha256-mismatch"):
        c.start("true", "")
    assert c.wait(c.start("bash", str(script), args=["x"]), timeout=10).state == "SUCCEEDED"
    with pytest.raises(PermissionDenied, match="sha256-mismatch"):
        c.start("bash", str(script_dir / "fail.sh"))


@pytest.mark.parametrize("limits", [{}, {"open_files": 64}])
def test_file_without_interpreter_line_is_never_run_by_a_shell(
    make_agent: AgentFactory, script_dir: Path, tmp_path: Path, limits: dict[str, int]
) -> None:
    """Regression: a file the kernel cannot execute must never reach a shell (execvp's
    ENOEXEC fallback); the policy refuses it before anything starts."""
    marker = script_dir / f"ran-{len(limits)}"
    prog = script_dir / f"shell-text-{len(limits)}"
    prog.write_text(f"touch {marker}\necho ran\n")
    os.chmod(prog, 0o755)
    a = make_agent(
        f"version: 1\nentries:\n  - name: text\n    command: {prog}\n",
        limits={"max": {"open_files": 4096}, "default": {"open_files": 1024}},
    )
    c = a.client()
    with pytest.raises(FailedPrecondition) as e:
        c.start(str(prog), "", limits=limits)
    assert "not-executable-format" in str(e.value) or "format" in str(e.value)
    assert not marker.exists()


def test_runjob_starts_and_waits_in_one_call(agent: AgentProcess, script_dir: Path) -> None:
    """RunJob answers with the final status, or with done = false just before its deadline."""
    c = agent.client()
    st = c.run("bash", str(script_dir / "fail.sh"), args=["5"])
    assert st.done and st.state == "FAILED" and st.exit_code == 5 and st.job_id
    assert b"".join(c.stream(st.job_id)) == b"failing with 5\n"
    t0 = time.monotonic()
    slow = c.run("bash", str(script_dir / "sleep.sh"), args=["30"], timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    assert not slow.done and slow.state == "RUNNING" and slow.job_id
    c.stop(slow.job_id)
    assert c.wait(slow.job_id, timeout=10).state == "STOPPED"
    with pytest.raises(PermissionDenied):
        c.run("/bin/sh", "-c", args=["id"])
    starts = [e for e in agent.audit_lines() if e["event"] == "job_start" and e["rpc"] == "RunJob"]
    assert len(starts) == 2
