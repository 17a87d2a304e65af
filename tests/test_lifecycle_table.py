"""Job states: the transition table and how an exit becomes a final state."""

from __future__ import annotations

import itertools

import pytest

from agent.daemon.lifecycle import TRANSITIONS, InvalidTransition, check_transition, final_state
from agent.vocabulary import DONE_STATES, JobState


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
