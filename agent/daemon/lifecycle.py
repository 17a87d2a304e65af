"""A job's lifecycle as pure code: events in, new state and actions out.

Everything that affects how a job ends lives here, and nothing here does
I/O (the shape of h11's ``_state.py``): the supervisor
(:mod:`agent.daemon.supervisor`) owns the descriptors, the timers and the
process operations, feeds every event it observes to :meth:`Life.handle`,
and carries out the actions it gets back. That keeps the races (exit before
the end of output, a stop during start, a timeout after the exit, a cap
reached at the exit, a shutdown with followers attached) testable in-process
with no real child at all (tests/test_lifecycle_unit.py).

The states and the table of allowed transitions::

                      +--> SUCCEEDED   (exit status 0)
                      +--> FAILED      (non-zero exit, unexpected signal, agent's kill)
    (start) --> RUNNING --> STOPPED     (StopJob / agent shutdown)
       |              +--> TIMED_OUT   (ran past its timeout)
       |              +--> LOST        (agent died while it ran; found at restart)
       +--> FAILED                      (could not be started)

A job is *done* only when its process has exited **and** its output is
closed (completely recorded): followers and ``WaitJob`` rely on that.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from agent.vocabulary import JobState

# A job is created directly in RUNNING (the process exists) or FAILED (it
# could not be started); there is no PENDING state because the agent spawns
# inside StartJob and never queues.
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


# ---------------------------------------------------------------- exits


@dataclass(frozen=True)
class Exit:
    """How a reaped process ended, with what it used."""

    exit_code: int | None
    signal: int | None
    user_cpu: float = 0.0
    system_cpu: float = 0.0
    max_rss: int = 0  # bytes: the job cgroup's memory.peak; 0 when unknown (never the agent's)
    # memory.events oom_kill + oom_group_kill of the job's cgroup (0 without one).
    oom_kills: int = 0
    # Set when the program never ran: the spawner's child failed a set-up
    # step or execve itself ("execve: Exec format error (ENOEXEC)").
    start_failure: str = ""
    # Set when the job ran but ended without an exit status anyone saw: why (the job
    # spawner died and its processes were killed).
    lost: str = ""
    # Set when the job's end was seen but not its exit status: why (a keeper that adopted
    # the job from its cgroup after the previous keeper's death saw only the cgroup empty).
    # Recorded LOST with this text, unless a timeout or a stop explains the end.
    unknown: str = ""
    # When the job ended (wall clock), as the spawner saw it at the reap: not when the
    # agent heard of it, which a stopped or busy agent may do much later. None: unknown.
    end_time: float | None = None


def describe_exit(exit_code: int | None, sig: int | None) -> str:
    """Human text for an exit, as QueryJob's errorText shows it."""
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    if exit_code is None:
        return "exit status unknown"
    return f"exit status {exit_code}"


def format_bytes(n: int) -> str:
    """``256 MiB``: a byte count in the largest binary unit that divides it evenly-ish."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def oom_text(memory_max: int) -> str:
    """The end reason of a job the kernel's OOM killer ended."""
    at = f" at memory.max {format_bytes(memory_max)}" if memory_max else ""
    return f"killed by the OOM killer{at}"


def final_state(
    *, exit_code: int | None, signal: int | None, stop_requested: bool, timed_out: bool
) -> JobState:
    """Decide how a reaped process ended.

    A timeout wins over a stop request (the timeout fired first, or the
    operator's stop came after the deadline anyway). A process that exits 0
    after a stop request is STOPPED, because the exit was most likely its
    reaction to our SIGTERM.
    """
    if timed_out:
        return JobState.TIMED_OUT
    if stop_requested:
        return JobState.STOPPED
    if signal is None and exit_code == 0:
        return JobState.SUCCEEDED
    return JobState.FAILED


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Exited:
    """The job's main process has exited and been reaped; its leftovers were killed."""

    exit: Exit


@dataclass(frozen=True)
class OutputClosed:
    """The output pipe reached end of file (or was closed by force)."""


@dataclass(frozen=True)
class OutputGraceExpired:
    """The output is still open some time after the exit (an escaped holder)."""


@dataclass(frozen=True)
class TimedOut:
    """The job's timeout elapsed."""


@dataclass(frozen=True)
class StopRequested:
    """An operator's StopJob."""


@dataclass(frozen=True)
class ShutdownRequested:
    """The agent (or the job keeper's service) is shutting down and stops its jobs."""

    by: str = "agent shutdown"  # who, in the end text: "stopped by <by> (...)"


@dataclass(frozen=True)
class OutputCapReached:
    """The output reached ``output_bytes``; ``kill`` says whether the job must end."""

    cap: int
    kill: bool


@dataclass(frozen=True)
class OutputFailed:
    """The output could not be recorded (file not created, disk full)."""

    reason: str


@dataclass(frozen=True)
class NotRecorded:
    """The history could not record the start: the job must not run."""


@dataclass(frozen=True)
class KillGraceExpired:
    """The grace after SIGTERM is over."""


Event = (
    Exited
    | OutputClosed
    | OutputGraceExpired
    | TimedOut
    | StopRequested
    | ShutdownRequested
    | OutputCapReached
    | OutputFailed
    | NotRecorded
    | KillGraceExpired
)


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Signal:
    """Send ``sig`` to the whole job (every process of its cgroup, or its process group).

    SIGKILL of a job with a cgroup is ``cgroup.kill``.
    """

    sig: int


@dataclass(frozen=True)
class ArmKillTimer:
    """Deliver :class:`KillGraceExpired` after the stop grace."""


@dataclass(frozen=True)
class ArmOutputGrace:
    """Deliver :class:`OutputGraceExpired` a little after the exit."""


@dataclass(frozen=True)
class CloseOutput:
    """Close the output pipe now (then deliver :class:`OutputClosed`)."""


@dataclass(frozen=True)
class DiscardOutput:
    """Record no more output from now on."""


@dataclass(frozen=True)
class Finish:
    """The job is done: record ``state`` and ``text`` and wake every waiter."""

    state: JobState
    text: str
    exit: Exit
    persist: bool = True


Action = Signal | ArmKillTimer | ArmOutputGrace | CloseOutput | DiscardOutput | Finish


# ---------------------------------------------------------------- the machine


@dataclass
class Life:
    """One running job's lifecycle state. Only :meth:`handle` changes it."""

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
    exit: Exit | None = None
    output_closed: bool = False
    finished: bool = field(default=False)

    @property
    def running(self) -> bool:
        """True while the main process has not exited."""
        return self.exit is None

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions the supervisor must carry out."""
        if self.finished:
            return []
        if isinstance(event, Exited):
            return self._exited(event.exit)
        if isinstance(event, OutputClosed):
            self.output_closed = True
            return self._finish_if_done()
        if isinstance(event, OutputGraceExpired):
            return [] if self.output_closed else [CloseOutput()]
        if isinstance(event, TimedOut):
            if self.exit is not None or self.stop_requested:
                return []
            self.timed_out = True
            return self._terminate("timeout")
        if isinstance(event, StopRequested):
            if self.exit is not None or self.timed_out:
                return []
            self.stop_requested = True
            self.kill_reason = ""
            return self._terminate("stop")
        if isinstance(event, ShutdownRequested):
            if self.exit is not None:
                return []
            self.stop_requested = True
            self.shutdown = True
            self.shutdown_by = event.by
            return self._terminate(event.by)
        if isinstance(event, OutputCapReached):
            actions: list[Action] = [] if self.discarding else [DiscardOutput()]
            self.discarding = True
            if event.kill and not self.terminating:
                actions += self._terminate(f"its output reached the cap of {event.cap} bytes")
            return actions
        if isinstance(event, OutputFailed):
            actions = [] if self.discarding else [DiscardOutput()]
            self.discarding = True
            return actions + self._terminate(event.reason)
        if isinstance(event, NotRecorded):
            self.not_recorded = True
            self.kill_reason = "not recorded"
            return [Signal(signal.SIGKILL)] if self.exit is None else []
        if isinstance(event, KillGraceExpired):
            return [Signal(signal.SIGKILL)] if self.exit is None else []
        raise TypeError(f"unknown event {event!r}")  # pragma: no cover

    def _terminate(self, reason: str) -> list[Action]:
        """SIGTERM now and SIGKILL after the grace; the first reason is kept."""
        if not self.kill_reason and not self.stop_requested and not self.timed_out:
            self.kill_reason = reason
        if self.terminating or self.exit is not None:
            return []
        self.terminating = True
        return [Signal(signal.SIGTERM), ArmKillTimer()]

    def _exited(self, ex: Exit) -> list[Action]:
        if self.exit is not None:
            return []
        self.exit = ex
        # Whatever the job left behind was killed by the process operations
        # before they reported the exit: its whole cgroup (cgroup.kill, then
        # unpopulated), or without one its process group (while the leader's
        # pid is still reserved). A job ends with its leader.
        if self.output_closed:
            return self._finish_if_done()
        return [ArmOutputGrace()]

    def _finish_if_done(self) -> list[Action]:
        if self.exit is None or not self.output_closed or self.finished:
            return []
        ex = self.exit
        target = final_state(
            exit_code=ex.exit_code,
            signal=ex.signal,
            stop_requested=self.stop_requested,
            timed_out=self.timed_out,
        )
        how = describe_exit(ex.exit_code, ex.signal)
        if ex.start_failure and not (self.timed_out or self.stop_requested):
            target, text = JobState.FAILED, f"start failed: {ex.start_failure}"
        elif ex.lost and not (self.timed_out or self.stop_requested):
            target, text = JobState.FAILED, ex.lost
        elif ex.unknown and not (self.timed_out or self.stop_requested or self.kill_reason):
            # Never SUCCEEDED or FAILED on a guess: nobody saw how it exited.
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
            text = f"{oom_text(self.memory_max)} ({how})"
        else:
            text = how
            if ex.signal == signal.SIGXCPU:
                text += f" (CPU time limit of {self.cpu_seconds} s reached)"
        if self.note:
            text = f"{text}; {self.note}" if text else self.note
        check_transition(self.state, target)
        self.state = target
        self.finished = True
        return [Finish(target, text, ex, persist=not self.not_recorded)]
