"""The pure job lifecycle: every transition of the table and the races, with no process."""

from __future__ import annotations

import signal

import pytest

from agent.daemon import lifecycle as lc
from agent.vocabulary import JobState

OK = lc.Exit(0, None)
FAIL = lc.Exit(3, None)
TERMED = lc.Exit(None, signal.SIGTERM)
KILLED = lc.Exit(None, signal.SIGKILL)


def finish(actions: list[lc.Action]) -> lc.Finish:
    fins = [a for a in actions if isinstance(a, lc.Finish)]
    assert len(fins) == 1, actions
    return fins[0]


def run(life: lc.Life, *events: lc.Event) -> list[lc.Action]:
    out: list[lc.Action] = []
    for e in events:
        out += life.handle(e)
    return out


def test_clean_exit_then_eof_succeeds() -> None:
    """RUNNING -> SUCCEEDED: exit 0, then the output closes; no error text."""
    life = lc.Life()
    assert run(life, lc.Exited(OK)) == [lc.ArmOutputGrace()]
    fin = finish(life.handle(lc.OutputClosed()))
    assert (fin.state, fin.text) == (JobState.SUCCEEDED, "")
    assert life.state is JobState.SUCCEEDED


def test_eof_before_exit_finishes_at_the_exit() -> None:
    """The output may close first: the job is done only when the process has exited too."""
    life = lc.Life()
    assert life.handle(lc.OutputClosed()) == []
    assert finish(life.handle(lc.Exited(OK))).state is JobState.SUCCEEDED


def test_non_zero_exit_fails_with_its_status() -> None:
    """RUNNING -> FAILED: a non-zero exit is FAILED "exit status N"."""
    fin = finish(run(lc.Life(), lc.OutputClosed(), lc.Exited(FAIL)))
    assert (fin.state, fin.text) == (JobState.FAILED, "exit status 3")


def test_signal_death_fails_and_names_the_signal() -> None:
    """A death by an unexpected signal is FAILED "killed by SIGKILL"."""
    fin = finish(run(lc.Life(), lc.OutputClosed(), lc.Exited(KILLED)))
    assert (fin.state, fin.text) == (JobState.FAILED, "killed by SIGKILL")


def test_sigxcpu_names_the_cpu_limit() -> None:
    """SIGXCPU says which CPU limit was reached."""
    life = lc.Life(cpu_seconds=7)
    fin = finish(run(life, lc.OutputClosed(), lc.Exited(lc.Exit(None, signal.SIGXCPU))))
    assert "CPU time limit of 7 s reached" in fin.text


def test_stop_sends_term_then_kill_after_the_grace() -> None:
    """RUNNING -> STOPPED: SIGTERM and a kill timer; SIGKILL when the grace is over."""
    life = lc.Life()
    assert life.handle(lc.StopRequested()) == [lc.Signal(signal.SIGTERM), lc.ArmKillTimer()]
    assert life.handle(lc.KillGraceExpired()) == [lc.Signal(signal.SIGKILL)]
    fin = finish(run(life, lc.Exited(KILLED), lc.OutputClosed()))
    assert (fin.state, fin.text) == (JobState.STOPPED, "stopped by request (killed by SIGKILL)")


def test_stop_twice_signals_once() -> None:
    """A second StopJob does not send a second SIGTERM or a second timer."""
    life = lc.Life()
    life.handle(lc.StopRequested())
    assert life.handle(lc.StopRequested()) == []


def test_exit_zero_after_stop_is_still_stopped() -> None:
    """A job that exits 0 in reaction to our SIGTERM was stopped, not successful."""
    fin = finish(run(lc.Life(), lc.StopRequested(), lc.Exited(OK), lc.OutputClosed()))
    assert fin.state is JobState.STOPPED


def test_timeout_is_timed_out_and_says_after_how_long() -> None:
    """RUNNING -> TIMED_OUT: the timeout terminates and wins over a later stop."""
    life = lc.Life(timeout_seconds=5)
    assert life.handle(lc.TimedOut()) == [lc.Signal(signal.SIGTERM), lc.ArmKillTimer()]
    assert life.handle(lc.StopRequested()) == []
    fin = finish(run(life, lc.Exited(TERMED), lc.OutputClosed()))
    assert (fin.state, fin.text) == (JobState.TIMED_OUT, "timed out after 5 s (killed by SIGTERM)")


def test_timeout_after_exit_changes_nothing() -> None:
    """A timer that fires after the exit (before EOF) neither signals nor changes the end."""
    life = lc.Life(timeout_seconds=1)
    life.handle(lc.Exited(OK))
    assert life.handle(lc.TimedOut()) == []
    assert finish(life.handle(lc.OutputClosed())).state is JobState.SUCCEEDED


def test_stop_after_exit_changes_nothing() -> None:
    """A StopJob between the exit and the end of output neither signals nor changes the end."""
    life = lc.Life()
    life.handle(lc.Exited(FAIL))
    assert life.handle(lc.StopRequested()) == []
    assert finish(life.handle(lc.OutputClosed())).state is JobState.FAILED


def test_stop_during_start_is_honoured_once_running() -> None:
    """A stop that arrives right after the spawn (no output, no exit yet) stops the job."""
    life = lc.Life()
    assert life.handle(lc.StopRequested())[0] == lc.Signal(signal.SIGTERM)
    assert finish(run(life, lc.OutputClosed(), lc.Exited(TERMED))).state is JobState.STOPPED


def test_shutdown_says_it_was_the_agent() -> None:
    """RUNNING -> STOPPED by the agent's shutdown, distinct from an operator's stop."""
    life = lc.Life()
    assert life.handle(lc.ShutdownRequested())[0] == lc.Signal(signal.SIGTERM)
    fin = finish(run(life, lc.Exited(TERMED), lc.OutputClosed()))
    assert (fin.state, fin.text) == (
        JobState.STOPPED,
        "stopped by agent shutdown (killed by SIGTERM)",
    )


def test_shutdown_after_exit_changes_nothing() -> None:
    """A job that already exited when the agent shuts down keeps its own outcome."""
    life = lc.Life()
    life.handle(lc.Exited(OK))
    assert life.handle(lc.ShutdownRequested()) == []
    assert finish(life.handle(lc.OutputClosed())).state is JobState.SUCCEEDED


def test_output_cap_with_kill_fails_the_job() -> None:
    """The cap in kill mode discards further output and ends the job FAILED, naming the cap."""
    life = lc.Life()
    acts = life.handle(lc.OutputCapReached(100, kill=True))
    assert acts == [lc.DiscardOutput(), lc.Signal(signal.SIGTERM), lc.ArmKillTimer()]
    fin = finish(run(life, lc.Exited(TERMED), lc.OutputClosed()))
    assert fin.state is JobState.FAILED
    assert "its output reached the cap of 100 bytes" in fin.text


def test_output_cap_with_truncate_lets_the_job_run() -> None:
    """The cap in truncate mode only discards output; the job's exit decides."""
    life = lc.Life()
    assert life.handle(lc.OutputCapReached(100, kill=False)) == [lc.DiscardOutput()]
    assert finish(run(life, lc.Exited(OK), lc.OutputClosed())).state is JobState.SUCCEEDED


def test_cap_reached_at_the_exit_does_not_signal() -> None:
    """The cap reached by the last bytes, after the exit, marks no kill and keeps the end."""
    life = lc.Life()
    life.handle(lc.Exited(OK))
    assert life.handle(lc.OutputCapReached(10, kill=True)) == [lc.DiscardOutput()]
    fin = finish(life.handle(lc.OutputClosed()))
    assert fin.state is JobState.FAILED  # the agent's own reason is kept for the record
    assert "cap of 10 bytes" in fin.text


def test_output_failure_fails_the_job_with_the_reason() -> None:
    """Disk full: the job is terminated and FAILED with the reason."""
    life = lc.Life()
    acts = life.handle(lc.OutputFailed("its output could not be written: No space left"))
    assert lc.Signal(signal.SIGTERM) in acts
    fin = finish(run(life, lc.Exited(TERMED), lc.OutputClosed()))
    assert fin.state is JobState.FAILED and "No space left" in fin.text


def test_escaped_output_holder_is_closed_after_the_grace() -> None:
    """Output still open after the exit: the grace timer asks for a forced close."""
    life = lc.Life()
    assert life.handle(lc.Exited(OK)) == [lc.ArmOutputGrace()]
    assert life.handle(lc.OutputGraceExpired()) == [lc.CloseOutput()]
    assert finish(life.handle(lc.OutputClosed())).state is JobState.SUCCEEDED


def test_grace_after_close_does_nothing() -> None:
    """The output grace timer firing after the output closed asks for nothing."""
    life = lc.Life()
    life.handle(lc.OutputClosed())
    assert life.handle(lc.OutputGraceExpired()) == []


def test_not_recorded_kills_and_is_not_persisted() -> None:
    """A start the history could not record is killed at once and never written."""
    life = lc.Life()
    assert life.handle(lc.NotRecorded()) == [lc.Signal(signal.SIGKILL)]
    fin = finish(run(life, lc.Exited(KILLED), lc.OutputClosed()))
    assert fin.persist is False


def test_start_failure_reported_by_the_spawner_is_failed() -> None:
    """An Exit carrying a start failure is FAILED "start failed: ..."."""
    ex = lc.Exit(127, None, start_failure="execve: Exec format error (ENOEXEC)")
    fin = finish(run(lc.Life(), lc.Exited(ex), lc.OutputClosed()))
    assert (fin.state, fin.text) == (
        JobState.FAILED,
        "start failed: execve: Exec format error (ENOEXEC)",
    )


def test_nothing_happens_after_the_finish() -> None:
    """A finished job ignores every further event (nothing leaves a final state)."""
    life = lc.Life()
    run(life, lc.Exited(OK), lc.OutputClosed())
    for ev in (
        lc.StopRequested(),
        lc.TimedOut(),
        lc.ShutdownRequested(),
        lc.Exited(FAIL),
        lc.OutputClosed(),
        lc.KillGraceExpired(),
        lc.NotRecorded(),
    ):
        assert life.handle(ev) == []
    assert life.state is JobState.SUCCEEDED


def test_kill_grace_after_exit_does_not_signal() -> None:
    """The SIGKILL timer firing after the exit sends nothing (the pid may be reused)."""
    life = lc.Life()
    life.handle(lc.StopRequested())
    life.handle(lc.Exited(TERMED))
    assert life.handle(lc.KillGraceExpired()) == []


@pytest.mark.parametrize("target", [s for s in JobState if s is not JobState.RUNNING])
def test_final_states_are_final(target: JobState) -> None:
    """The table lets nothing leave a final state."""
    for dst in JobState:
        with pytest.raises(lc.InvalidTransition):
            lc.check_transition(target, dst)


def test_an_illegal_finish_is_refused() -> None:
    """A Life forced into a final state refuses to finish again through the table."""
    life = lc.Life(state=JobState.SUCCEEDED)
    with pytest.raises(lc.InvalidTransition):
        run(life, lc.Exited(OK), lc.OutputClosed())
