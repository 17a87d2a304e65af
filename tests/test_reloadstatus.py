"""The reload record: what ``agent reload`` (the units' ExecReload=) waits for.

Direct tests of agent.daemon.reloadstatus with real files and a real process
that handles SIGHUP the way the agent does (it writes an Outcome that began
after the signal). The end-to-end reloads are in test_reload.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.daemon import reloadstatus
from agent.daemon.lockfile import LockFile
from agent.daemon.reloadstatus import Outcome, ReloadError


def test_a_record_reads_back_as_written(tmp_path: Path) -> None:
    outcome = Outcome(pid=42, generation=3, started=12.5, rejected=(("policy", "entry x: bad"),))
    reloadstatus.write(tmp_path, outcome)
    assert reloadstatus.read(tmp_path) == outcome
    assert not outcome.ok
    assert Outcome(pid=1, generation=1, started=0.0, rejected=()).ok
    # Only the record is left: the temporary file was renamed over it.
    assert [p.name for p in tmp_path.iterdir()] == [reloadstatus.FILE_NAME]
    assert reloadstatus.path(tmp_path).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"pid": 1}',
        '{"pid": "x", "generation": 1, "started": 0, "rejected": []}',
    ],
)
def test_a_missing_or_torn_record_reads_as_none(tmp_path: Path, text: str) -> None:
    assert reloadstatus.read(tmp_path) is None
    reloadstatus.path(tmp_path).write_text(text)
    assert reloadstatus.read(tmp_path) is None


def test_writing_refuses_to_follow_a_planted_symlink(tmp_path: Path) -> None:
    """The temporary name is opened O_NOFOLLOW: a link planted there does not
    redirect the agent's write to another file."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / f".{reloadstatus.FILE_NAME}.{os.getpid()}").symlink_to(victim)
    with pytest.raises(OSError):
        reloadstatus.write(tmp_path, Outcome(pid=1, generation=1, started=0.0, rejected=()))
    assert victim.read_text() == "untouched"


def test_agent_pid_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ReloadError, match="no agent found: cannot read"):
        reloadstatus.agent_pid(tmp_path)
    lock = LockFile.state_dir(tmp_path).path
    lock.write_text("garbage\n")
    with pytest.raises(ReloadError, match="names no pid"):
        reloadstatus.agent_pid(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(f"{gone.pid}\n")
    with pytest.raises(ReloadError, match=f"pid {gone.pid} .* is gone"):
        reloadstatus.agent_pid(tmp_path)
    lock.write_text(f"{os.getpid()}\n")
    assert reloadstatus.agent_pid(tmp_path) == os.getpid()


def _stand_in_agent(state_dir: Path, rejected: list[list[str]]) -> subprocess.Popen[bytes]:
    """A process that, on each SIGHUP, records a reload begun after the signal."""
    code = textwrap.dedent(
        f"""
        import signal, sys, time
        from pathlib import Path
        from agent.daemon import reloadstatus
        gen = 0
        def on_hup(signum, frame):
            global gen
            gen += 1
            started = time.monotonic()
            reloadstatus.write(Path({str(state_dir)!r}), reloadstatus.Outcome(
                pid=__import__("os").getpid(), generation=gen, started=started,
                rejected=tuple(tuple(r) for r in {rejected!r})))
        signal.signal(signal.SIGHUP, on_hup)
        print("ready", flush=True)
        while True:
            time.sleep(1)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_request_returns_the_reload_that_handled_the_signal(tmp_path: Path) -> None:
    proc = _stand_in_agent(tmp_path, [["policy", "bad entry"]])
    try:
        # A record of an earlier reload is not taken for this one.
        reloadstatus.write(tmp_path, Outcome(pid=proc.pid, generation=0, started=0.0, rejected=()))
        outcome = reloadstatus.request(tmp_path, proc.pid, timeout=30)
        assert outcome.pid == proc.pid and outcome.generation == 1
        assert outcome.rejected == (("policy", "bad entry"),) and not outcome.ok
        again = reloadstatus.request(tmp_path, proc.pid, timeout=30)
        assert again.generation == 2
    finally:
        proc.kill()
        proc.wait()


def test_request_fails_when_the_agent_exits_or_never_records(tmp_path: Path) -> None:
    # SIGHUP's default action ends a process that does not handle it: "exited".
    silent = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert silent.stdout is not None and silent.stdout.readline() == b"ready\n"
    try:
        with pytest.raises(ReloadError, match="exited before it reloaded"):
            reloadstatus.request(tmp_path, silent.pid, timeout=30)
    finally:
        silent.kill()
        silent.wait()
    # One that ignores the signal: no record within the timeout.
    ignoring = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert ignoring.stdout is not None and ignoring.stdout.readline() == b"ready\n"
    try:
        with pytest.raises(ReloadError, match="recorded no reload"):
            reloadstatus.request(tmp_path, ignoring.pid, timeout=0.3)
    finally:
        ignoring.kill()
        ignoring.wait()
