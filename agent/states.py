"""Job states and the table of allowed transitions.

This module is the bottom of the package: standard library only, no I/O.
Every state change of a job goes through :func:`transition`, which refuses
any move the table does not list, so a bug elsewhere cannot, for example,
turn a finished job back into a running one.

Lifecycle::

                      +--> SUCCEEDED   (exit status 0)
                      +--> FAILED      (non-zero exit, unexpected signal)
    (start) --> RUNNING --> STOPPED     (StopJob / agent shutdown)
       |              +--> TIMED_OUT   (ran past its timeout)
       |              +--> LOST        (agent died while it ran; found at restart)
       +--> FAILED                      (could not be started: exec error)
"""

from __future__ import annotations

import enum


class JobState(enum.Enum):
    """The lifecycle state of one job (numbers match the wire enum)."""

    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    STOPPED = 4
    TIMED_OUT = 5
    LOST = 6

    @property
    def done(self) -> bool:
        """True once the job's process has ended (or never started)."""
        return self in DONE_STATES

    @property
    def is_error(self) -> bool:
        """The original protocol's ``error`` flag for this state."""
        return self in ERROR_STATES


# A job is created directly in RUNNING (the process exists) or FAILED (exec
# failed); there is no PENDING state because the agent spawns synchronously
# inside StartJob and never queues.
INITIAL_STATES = frozenset({JobState.RUNNING, JobState.FAILED})
DONE_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED, JobState.TIMED_OUT, JobState.LOST}
)
# The original worker reports error=true for a start failure, a non-zero exit
# or a death by signal. A stopped or timed-out job died by a signal, so it is
# an error in that sense too; LOST has no known outcome and is reported as one.
ERROR_STATES = frozenset({JobState.FAILED, JobState.STOPPED, JobState.TIMED_OUT, JobState.LOST})
SIGNALLABLE_STATES = frozenset({JobState.RUNNING})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED, JobState.TIMED_OUT, JobState.LOST}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.STOPPED: frozenset(),
    JobState.TIMED_OUT: frozenset(),
    JobState.LOST: frozenset(),
}


class InvalidTransition(Exception):
    """A state change the lifecycle does not allow was attempted."""

    def __init__(self, current: JobState, target: JobState) -> None:
        super().__init__(f"job cannot go from {current.name} to {target.name}")
        self.current = current
        self.target = target


def check_transition(current: JobState, target: JobState) -> None:
    """Raise :class:`InvalidTransition` unless ``current -> target`` is allowed."""
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(current, target)


def final_state(
    *,
    exit_code: int | None,
    signal: int | None,
    stop_requested: bool,
    timed_out: bool,
) -> JobState:
    """Decide how a reaped process ended.

    A timeout wins over a stop request (the timeout fired first or the
    operator's stop came after the deadline anyway); a process that exits on
    its own with 0 after a stop request still counts as SUCCEEDED only if no
    stop was asked for, because the exit was most likely the reaction to our
    SIGTERM.
    """
    if timed_out:
        return JobState.TIMED_OUT
    if stop_requested:
        return JobState.STOPPED
    if signal is None and exit_code == 0:
        return JobState.SUCCEEDED
    return JobState.FAILED
