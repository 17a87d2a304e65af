"""The pure job lifecycle (agent.keeper.lifecycle), with no process: the states and
their transitions, how an exit becomes a final state, every step of the table and the
races; the table is complete and agrees with the flag-based machine it replaced (kept
here as the reference) on every sequence of events hypothesis finds, and a job's life
crosses the keeper's re-execution in the shape the previous code wrote, both ways."""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.keeper import lifecycle as lc
from agent.keeper.lifecycle import TRANSITIONS, InvalidTransition, check_transition, final_state
from agent.vocabulary import DONE_STATES, JobState

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


# ---------------------------------------------------------------- states and transitions


def test_every_state_has_a_row() -> None:
    """The table covers every state."""
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize("src,dst", list(itertools.product(JobState, JobState)))
def test_only_running_moves_and_only_to_done_states(src: JobState, dst: JobState) -> None:
    """RUNNING -> any done state; nothing leaves a done state."""
    if src is JobState.RUNNING and dst in DONE_STATES:
        check_transition(src, dst)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(src, dst)


def test_done_and_error_flags_match_the_original_protocol() -> None:
    """error is true for start failure, non-zero exit, signal, stop, timeout, lost."""
    assert not JobState.RUNNING.done and not JobState.RUNNING.is_error
    assert JobState.SUCCEEDED.done and not JobState.SUCCEEDED.is_error
    for s in (JobState.FAILED, JobState.STOPPED, JobState.TIMED_OUT, JobState.LOST):
        assert s.done and s.is_error


@pytest.mark.parametrize(
    "kw,expected",
    [
        ({"exit_code": 0, "signal": None}, JobState.SUCCEEDED),
        ({"exit_code": 1, "signal": None}, JobState.FAILED),
        ({"exit_code": None, "signal": 9}, JobState.FAILED),
        ({"exit_code": 0, "signal": None, "stop_requested": True}, JobState.STOPPED),
        ({"exit_code": None, "signal": 15, "stop_requested": True}, JobState.STOPPED),
        ({"exit_code": None, "signal": 15, "timed_out": True}, JobState.TIMED_OUT),
        (
            {"exit_code": None, "signal": 15, "timed_out": True, "stop_requested": True},
            JobState.TIMED_OUT,
        ),
    ],
)
def test_final_state(kw: dict[str, object], expected: JobState) -> None:
    """How a reaped process is classified."""
    args = {"stop_requested": False, "timed_out": False, **kw}
    assert final_state(**args) is expected  # type: ignore[arg-type]


def test_wire_numbers_match_proto() -> None:
    """JobState values are the proto enum numbers."""
    from agent._proto import jobscheduler_pb2 as pb

    for s in JobState:
        assert pb.JobState.Value(s.name) == s.value


# ---------------------------------------------------------------- the table


def test_every_phase_has_a_step_for_every_event() -> None:
    """No (phase, event) pair is left to chance: each is in the table."""
    events = {e for _, e in lc.TABLE}
    assert len(events) == 10
    assert set(lc.TABLE) == {(p, e) for p in lc.Phase for e in events}


def test_done_ignores_everything() -> None:
    for (phase, _), step in lc.TABLE.items():
        if phase is lc.Phase.DONE:
            assert step is lc.Life.ignore


@dataclass
class FlagLife:
    """The lifecycle as it was written before the table: eight flags and a chain of
    ``isinstance`` checks (the reference the table must agree with)."""

    timeout_seconds: int = 0
    cpu_seconds: int = 0
    memory_max: int = 0  # the job cgroup's memory.max (0: none), for the OOM end reason
    # Appended to every end text when the job has no cgroup (its stop was not escape-proof).
    note: str = ""
    state: JobState = JobState.RUNNING
    stop_requested: bool = False
    shutdown: bool = False
    shutdown_by: str = "agent shutdown"
    timed_out: bool = False
    kill_reason: str = ""  # set when the agent itself ends the job
    terminating: bool = False
    discarding: bool = False
    not_recorded: bool = False
    exit: lc.Exit | None = None
    output_closed: bool = False
    finished: bool = field(default=False)

    @property
    def running(self) -> bool:
        """True while the main process has not exited."""
        return self.exit is None

    def handle(self, event: lc.Event) -> list[lc.Action]:
        """Apply one event; return the actions the supervisor must carry out."""
        if self.finished:
            return []
        if isinstance(event, lc.Exited):
            return self._exited(event.exit)
        if isinstance(event, lc.OutputClosed):
            self.output_closed = True
            return self._finish_if_done()
        if isinstance(event, lc.OutputGraceExpired):
            return [] if self.output_closed else [lc.CloseOutput()]
        if isinstance(event, lc.TimedOut):
            if self.exit is not None or self.stop_requested:
                return []
            self.timed_out = True
            return self._terminate("timeout")
        if isinstance(event, lc.StopRequested):
            if self.exit is not None or self.timed_out:
                return []
            self.stop_requested = True
            self.kill_reason = ""
            return self._terminate("stop")
        if isinstance(event, lc.ShutdownRequested):
            if self.exit is not None:
                return []
            self.stop_requested = True
            self.shutdown = True
            self.shutdown_by = event.by
            return self._terminate(event.by)
        if isinstance(event, lc.OutputCapReached):
            actions: list[lc.Action] = [] if self.discarding else [lc.DiscardOutput()]
            self.discarding = True
            if event.kill and not self.terminating:
                actions += self._terminate(f"its output reached the cap of {event.cap} bytes")
            return actions
        if isinstance(event, lc.OutputFailed):
            actions = [] if self.discarding else [lc.DiscardOutput()]
            self.discarding = True
            return actions + self._terminate(event.reason)
        if isinstance(event, lc.NotRecorded):
            self.not_recorded = True
            self.kill_reason = "not recorded"
            return [lc.Signal(signal.SIGKILL)] if self.exit is None else []
        if isinstance(event, lc.KillGraceExpired):
            return [lc.Signal(signal.SIGKILL)] if self.exit is None else []
        raise TypeError(f"unknown event {event!r}")  # pragma: no cover

    def _terminate(self, reason: str) -> list[lc.Action]:
        """SIGTERM now and SIGKILL after the grace; the first reason is kept."""
        if not self.kill_reason and not self.stop_requested and not self.timed_out:
            self.kill_reason = reason
        if self.terminating or self.exit is not None:
            return []
        self.terminating = True
        return [lc.Signal(signal.SIGTERM), lc.ArmKillTimer()]

    def _exited(self, ex: lc.Exit) -> list[lc.Action]:
        if self.exit is not None:
            return []
        self.exit = ex
        # Whatever the job left behind was killed by the process operations
        # before they reported the exit: its whole cgroup (cgroup.kill, then
        # unpopulated), or without one its process group (while the leader's
        # pid is still reserved). A job ends with its leader.
        if self.output_closed:
            return self._finish_if_done()
        return [lc.ArmOutputGrace()]

    def _finish_if_done(self) -> list[lc.Action]:
        if self.exit is None or not self.output_closed or self.finished:
            return []
        ex = self.exit
        target = lc.final_state(
            exit_code=ex.exit_code,
            signal=ex.signal,
            stop_requested=self.stop_requested,
            timed_out=self.timed_out,
        )
        how = lc.describe_exit(ex.exit_code, ex.signal)
        if ex.start_failure and not (self.timed_out or self.stop_requested):
            target, text = JobState.FAILED, f"start failed: {ex.start_failure}"
        elif ex.lost and not (self.timed_out or self.stop_requested):
            target, text = JobState.FAILED, ex.lost
        elif ex.unknown and not (self.timed_out or self.stop_requested or self.kill_reason):
            target, text = JobState.LOST, ex.unknown
        elif self.timed_out:
            text = f"timed out after {self.timeout_seconds} s ({how})"
        elif self.shutdown:
            text = f"stopped by {self.shutdown_by} ({how})"
        elif self.stop_requested:
            text = f"stopped by request ({how})"
        elif self.kill_reason:
            target = JobState.FAILED
            text = f"the agent stopped the job: {self.kill_reason} ({how})"
        elif target is JobState.SUCCEEDED:
            text = ""
        elif ex.oom_kills:
            # The kernel's memory.events says so: the job's own end reason,
            # whatever the exit looked like (memory.oom.group kills it all).
            target = JobState.FAILED
            text = f"{lc.oom_text(self.memory_max)} ({how})"
        else:
            text = how
            if ex.signal == signal.SIGXCPU:
                text += f" (CPU time limit of {self.cpu_seconds} s reached)"
        if self.note:
            text = f"{text}; {self.note}" if text else self.note
        lc.check_transition(self.state, target)
        self.state = target
        self.finished = True
        return [lc.Finish(target, text, ex, persist=not self.not_recorded)]


EXITS = st.builds(
    lc.Exit,
    exit_code=st.sampled_from([0, 1, None]),
    signal=st.sampled_from([None, signal.SIGTERM, signal.SIGKILL, signal.SIGXCPU]),
    oom_kills=st.sampled_from([0, 1]),
    start_failure=st.sampled_from(["", "execve: No such file or directory (ENOENT)"]),
    lost=st.sampled_from(["", "the keeper died"]),
    unknown=st.sampled_from(["", "exit status unknown: the keeper restarted"]),
)
LIVE_EVENTS = st.one_of(
    st.builds(lc.Exited, EXITS),
    st.just(lc.OutputGraceExpired()),
    st.just(lc.TimedOut()),
    st.just(lc.StopRequested()),
    st.builds(lc.ShutdownRequested, st.sampled_from(["agent shutdown", "the keeper's stop"])),
    st.just(lc.NotRecorded()),
    st.just(lc.KillGraceExpired()),
)
OUTPUT_EVENTS = st.one_of(
    st.builds(lc.OutputCapReached, st.sampled_from([10, 100]), st.booleans()),
    st.builds(lc.OutputFailed, st.sampled_from(["disk full", "no file"])),
)


@st.composite
def histories(draw: st.DrawFn) -> list[lc.Event]:
    """Any order of events, except that nothing is written to an output once it is
    closed (the keeper reads no more from it) and it closes at most once."""
    events: list[lc.Event] = []
    closed = False
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.integers(0, 2))
        if choice == 0 or closed:
            events.append(draw(LIVE_EVENTS))
        elif choice == 1:
            events.append(draw(OUTPUT_EVENTS))
        else:
            events.append(lc.OutputClosed())
            closed = True
    return events


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(histories(), st.sampled_from(["", "no cgroup"]))
def test_the_table_agrees_with_the_flags_it_replaced(events: list[lc.Event], note: str) -> None:
    """Same actions, same end state and text, event by event."""
    new = lc.Life(timeout_seconds=5, cpu_seconds=2, memory_max=1 << 20, note=note)
    ref = FlagLife(timeout_seconds=5, cpu_seconds=2, memory_max=1 << 20, note=note)
    for e in events:
        assert new.handle(e) == ref.handle(e), (events, e)
        assert new.state is ref.state
        assert new.discarding == ref.discarding or ref.output_closed
        assert new.running == ref.running


@pytest.mark.slow
@settings(max_examples=1000, deadline=None)
@given(histories(), histories())
def test_the_state_crosses_a_reexec_in_the_old_shape(
    before: list[lc.Event], after: list[lc.Event]
) -> None:
    """A keeper re-executes with each job's life as the flags the previous code wrote
    (an upgrade from it reads them, and it reads ours): the job goes on the same."""
    ours, ref = lc.Life(timeout_seconds=5), FlagLife(timeout_seconds=5)
    for e in before:
        ours.handle(e)
        ref.handle(e)
    old_shape = ours.to_dict()
    assert set(old_shape) == {f for f in FlagLife.__dataclass_fields__}
    resumed = lc.Life.from_dict(old_shape)
    from_old = lc.Life.from_dict(ref_dict(ref))
    closed = any(isinstance(e, lc.OutputClosed) for e in before)
    for e in after:
        if closed and isinstance(e, (lc.OutputCapReached, lc.OutputFailed, lc.OutputClosed)):
            continue
        got = resumed.handle(e)
        assert got == from_old.handle(e) == ref.handle(e), (before, after, e)


def ref_dict(ref: FlagLife) -> dict[str, object]:
    """What the previous keeper wrote for a job (dataclasses.asdict, state by name)."""
    import dataclasses

    d = dataclasses.asdict(ref)
    d["state"] = ref.state.name
    return d


def test_a_job_finished_by_the_old_code_stays_finished() -> None:
    ref = FlagLife()
    ref.handle(lc.OutputClosed())
    ref.handle(lc.Exited(lc.Exit(0, None)))
    life = lc.Life.from_dict(ref_dict(ref))
    assert (life.phase, life.state) == (lc.Phase.DONE, JobState.SUCCEEDED)
    assert life.handle(lc.StopRequested()) == []
