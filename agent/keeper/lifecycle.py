"""A job's lifecycle as pure code: events in, new state and actions out.

Everything that affects how a job ends lives here, and nothing here does
I/O (the shape of h11's ``_state.py``): the agent's supervisor
(its ``supervisor`` module) owns the descriptors, the timers and the
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

How it gets there is one table, :data:`TABLE`: ``(phase, event) -> step``, every
pair listed (a test checks it), where a step returns the next phase and the
actions. The phases of the process::

    RUNNING --(timeout, stop, shutdown, output cap or failure)--> TERMINATING
    RUNNING, TERMINATING --(exited)--> DRAINING --(output closed)--> DONE
    RUNNING, TERMINATING --(exited, output already closed)--> DONE

beside a smaller one for the output (OPEN -> DISCARDING -> CLOSED) and one
:class:`Cause` (why it is being ended, which decides the end state and text).
"""

from __future__ import annotations

import dataclasses
import enum
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


class Phase(enum.Enum):
    """Where a job's process is: the rows of :data:`TABLE`."""

    RUNNING = "running"  # its main process lives; nobody is ending it
    TERMINATING = "terminating"  # SIGTERM sent, SIGKILL armed for after the grace
    DRAINING = "draining"  # it exited; its output is still being read (grace armed)
    DONE = "done"  # exited and its output closed: finished, recorded, nothing more


class Output(enum.Enum):
    """Where a job's output is (a second, smaller machine beside :class:`Phase`)."""

    OPEN = "open"
    DISCARDING = "discarding"  # still read (the pipe must drain) but no longer recorded
    CLOSED = "closed"


class Why(enum.Enum):
    """Why the job is being ended, by whom; the end text and state follow from it."""

    TIMEOUT = "timeout"
    STOP = "stop"  # an operator's StopJob
    SHUTDOWN = "shutdown"  # the agent's or the keeper's shutdown
    KILLED = "killed"  # the keeper's own reason (output cap, failed output, not recorded)


@dataclass(frozen=True)
class Cause:
    """Why a job is being ended, and the text that goes with it."""

    why: Why
    text: str = ""  # KILLED: the reason; SHUTDOWN: who shut down


def _caused(current: Cause | None, new: Cause) -> Cause | None:
    """The cause after ``new`` arrives: a timeout and an operator's stop exclude each
    other (the first wins); a shutdown takes over a stop; either takes over the
    keeper's own reason; the first of the keeper's own reasons is kept."""
    if current is None:
        return new
    was, now = current.why, new.why
    if was is Why.TIMEOUT:
        return current
    if now is Why.TIMEOUT:
        return new if was is Why.KILLED else current
    if now is Why.SHUTDOWN or (now is Why.STOP and was is Why.KILLED):
        return new
    return current


@dataclass
class Life:
    """One job's lifecycle state. Only :meth:`handle` changes it, and only through
    :data:`TABLE`; a job's final :class:`JobState` is set once, through
    :func:`check_transition`."""

    timeout_seconds: int = 0
    cpu_seconds: int = 0
    memory_max: int = 0  # the job cgroup's memory.max (0: none), for the OOM end reason
    # Appended to every end text when the job has no cgroup (its stop was not escape-proof).
    note: str = ""
    phase: Phase = Phase.RUNNING
    output: Output = Output.OPEN
    cause: Cause | None = None
    persist: bool = True  # False: the history never recorded the start (NotRecorded)
    exit: Exit | None = None
    state: JobState = JobState.RUNNING

    @property
    def running(self) -> bool:
        """True while the main process has not exited."""
        return self.exit is None

    @property
    def discarding(self) -> bool:
        """Whether output read now is to be dropped (past the cap, or unwritable)."""
        return self.output is Output.DISCARDING

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions the keeper must carry out."""
        step = TABLE[self.phase, type(event)]
        phase, actions = step(self, event)
        self.phase = phase
        return actions

    # ---- the steps of TABLE (called only by handle, through the table): each
    # returns the next phase and the actions

    def ignore(self, event: Event) -> Step:
        return self.phase, []

    def on_exited(self, event: Event) -> Step:
        assert isinstance(event, Exited)
        # Whatever the job left behind was killed by the process operations before
        # they reported the exit: its whole cgroup (cgroup.kill, then unpopulated), or
        # without one its process group (while the leader's pid is still reserved).
        self.exit = event.exit
        if self.output is Output.CLOSED:
            return self._finish()
        return Phase.DRAINING, [ArmOutputGrace()]

    def on_output_closed(self, event: Event) -> Step:
        self.output = Output.CLOSED
        if self.phase is Phase.DRAINING:
            return self._finish()
        return self.phase, []

    def on_output_grace(self, event: Event) -> Step:
        return self.phase, [] if self.output is Output.CLOSED else [CloseOutput()]

    def on_end(self, event: Event) -> Step:
        """A timeout, a stop or a shutdown while the process lives."""
        if isinstance(event, TimedOut):
            self.cause = _caused(self.cause, Cause(Why.TIMEOUT))
        elif isinstance(event, StopRequested):
            self.cause = _caused(self.cause, Cause(Why.STOP))
        else:
            assert isinstance(event, ShutdownRequested)
            self.cause = _caused(self.cause, Cause(Why.SHUTDOWN, event.by))
        return self._terminate()

    def on_output_cap(self, event: Event) -> Step:
        assert isinstance(event, OutputCapReached)
        actions = self._discard()
        if not event.kill:
            return self.phase, actions
        return self._kill(f"its output reached the cap of {event.cap} bytes", actions)

    def on_output_failed(self, event: Event) -> Step:
        assert isinstance(event, OutputFailed)
        return self._kill(event.reason, self._discard())

    def on_not_recorded(self, event: Event) -> Step:
        # No grace: a job the history does not know must not run at all.
        self.persist = False
        if self.cause is None or self.cause.why is Why.KILLED:
            self.cause = Cause(Why.KILLED, "not recorded")
        return self.phase, [] if self.exit is not None else [Signal(signal.SIGKILL)]

    def on_kill_grace(self, event: Event) -> Step:
        return self.phase, [Signal(signal.SIGKILL)]

    # ---- helpers of the steps

    def _discard(self) -> list[Action]:
        if self.output is not Output.OPEN:
            return []
        self.output = Output.DISCARDING
        return [DiscardOutput()]

    def _kill(self, reason: str, actions: list[Action]) -> Step:
        """The keeper ends the job for ``reason`` (its end text unless a stop, a
        shutdown or a timeout explains it); a job already exited keeps the reason."""
        self.cause = _caused(self.cause, Cause(Why.KILLED, reason))
        if self.phase is Phase.RUNNING:
            phase, more = self._terminate()
            return phase, actions + more
        return self.phase, actions

    def _terminate(self) -> Step:
        """SIGTERM now and SIGKILL after the grace, once."""
        if self.phase is Phase.RUNNING:
            return Phase.TERMINATING, [Signal(signal.SIGTERM), ArmKillTimer()]
        return self.phase, []

    def _finish(self) -> Step:
        ex = self.exit
        assert ex is not None
        why = None if self.cause is None else self.cause.why
        stopped = why in (Why.STOP, Why.SHUTDOWN)
        target = final_state(
            exit_code=ex.exit_code,
            signal=ex.signal,
            stop_requested=stopped,
            timed_out=why is Why.TIMEOUT,
        )
        target, text = self._end_text(ex, target, why)
        if self.note:
            text = f"{text}; {self.note}" if text else self.note
        check_transition(self.state, target)
        self.state = target
        return Phase.DONE, [Finish(target, text, ex, persist=self.persist)]

    def _end_text(self, ex: Exit, target: JobState, why: Why | None) -> tuple[JobState, str]:
        how = describe_exit(ex.exit_code, ex.signal)
        asked = why in (Why.TIMEOUT, Why.STOP, Why.SHUTDOWN)
        if ex.start_failure and not asked:
            return JobState.FAILED, f"start failed: {ex.start_failure}"
        if ex.lost and not asked:
            return JobState.FAILED, ex.lost
        if ex.unknown and why is None:
            # Never SUCCEEDED or FAILED on a guess: nobody saw how it exited.
            return JobState.LOST, ex.unknown
        if why is Why.TIMEOUT:
            return target, f"timed out after {self.timeout_seconds} s ({how})"
        if why is Why.SHUTDOWN:
            assert self.cause is not None
            return target, f"stopped by {self.cause.text} ({how})"
        if why is Why.STOP:
            return target, f"stopped by request ({how})"
        if why is Why.KILLED:
            assert self.cause is not None
            return JobState.FAILED, f"the agent stopped the job: {self.cause.text} ({how})"
        if target is JobState.SUCCEEDED:
            return target, ""
        if ex.oom_kills:
            # The kernel's memory.events says so: the job's own end reason, whatever
            # the exit looked like (memory.oom.group kills it all).
            return JobState.FAILED, f"{oom_text(self.memory_max)} ({how})"
        if ex.signal == signal.SIGXCPU:
            return target, f"{how} (CPU time limit of {self.cpu_seconds} s reached)"
        return target, how

    # ---- across the keeper's re-exec (agent.keeper.keeperstate)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the keeper's state handed across ``execve``: the shape of
        version 1 of that state (flags), so an older and a newer keeper read each other."""
        why = None if self.cause is None else self.cause.why
        text = "" if self.cause is None else self.cause.text
        return {
            "timeout_seconds": self.timeout_seconds,
            "cpu_seconds": self.cpu_seconds,
            "memory_max": self.memory_max,
            "note": self.note,
            "state": self.state.name,
            "stop_requested": why in (Why.STOP, Why.SHUTDOWN),
            "shutdown": why is Why.SHUTDOWN,
            "shutdown_by": text if why is Why.SHUTDOWN else "agent shutdown",
            "timed_out": why is Why.TIMEOUT,
            "kill_reason": text if why is Why.KILLED else "",
            "terminating": self.phase is Phase.TERMINATING
            or (self.phase is not Phase.RUNNING and self.cause is not None),
            "discarding": self.output is Output.DISCARDING,
            "not_recorded": not self.persist,
            "exit": None if self.exit is None else dataclasses.asdict(self.exit),
            "output_closed": self.output is Output.CLOSED,
            "finished": self.phase is Phase.DONE,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Life:
        """The inverse of :meth:`to_dict` (a ValueError or KeyError for a bad one)."""
        exit_ = None if d["exit"] is None else Exit(**d["exit"])
        cause = None
        if d["timed_out"]:
            cause = Cause(Why.TIMEOUT)
        elif d["shutdown"]:
            cause = Cause(Why.SHUTDOWN, d["shutdown_by"])
        elif d["stop_requested"]:
            cause = Cause(Why.STOP)
        elif d["kill_reason"]:
            cause = Cause(Why.KILLED, d["kill_reason"])
        if d["finished"]:
            phase = Phase.DONE
        elif exit_ is not None:
            phase = Phase.DRAINING
        else:
            phase = Phase.TERMINATING if d["terminating"] else Phase.RUNNING
        if d["output_closed"]:
            output = Output.CLOSED
        else:
            output = Output.DISCARDING if d["discarding"] else Output.OPEN
        return cls(
            timeout_seconds=int(d["timeout_seconds"]),
            cpu_seconds=int(d["cpu_seconds"]),
            memory_max=int(d["memory_max"]),
            note=str(d["note"]),
            phase=phase,
            output=output,
            cause=cause,
            persist=not d["not_recorded"],
            exit=exit_,
            state=JobState[d["state"]],
        )


Step = tuple[Phase, list[Action]]
_Handler = Callable[[Life, Event], Step]

_LIVE = (Phase.RUNNING, Phase.TERMINATING)
_EVENTS: tuple[type[Event], ...] = (
    Exited,
    OutputClosed,
    OutputGraceExpired,
    TimedOut,
    StopRequested,
    ShutdownRequested,
    OutputCapReached,
    OutputFailed,
    NotRecorded,
    KillGraceExpired,
)


def _table() -> dict[tuple[Phase, type[Event]], _Handler]:
    t: dict[tuple[Phase, type[Event]], _Handler] = {}
    for phase in _LIVE:  # the process lives
        t[phase, Exited] = Life.on_exited
        t[phase, TimedOut] = Life.on_end
        t[phase, StopRequested] = Life.on_end
        t[phase, ShutdownRequested] = Life.on_end
        t[phase, NotRecorded] = Life.on_not_recorded
        t[phase, KillGraceExpired] = Life.on_kill_grace
    for phase in (*_LIVE, Phase.DRAINING):  # its output is read
        t[phase, OutputClosed] = Life.on_output_closed
        t[phase, OutputGraceExpired] = Life.on_output_grace
        t[phase, OutputCapReached] = Life.on_output_cap
        t[phase, OutputFailed] = Life.on_output_failed
    # It exited: no signal, no timeout or stop can change how (they came too late).
    t[Phase.DRAINING, NotRecorded] = Life.on_not_recorded
    late: tuple[type[Event], ...] = (
        Exited,
        TimedOut,
        StopRequested,
        ShutdownRequested,
        KillGraceExpired,
    )
    for event in late:
        t[Phase.DRAINING, event] = Life.ignore
    for event in _EVENTS:  # done: nothing changes it
        t[Phase.DONE, event] = Life.ignore
    return t


# Every (phase, event) pair, and the step that takes it: the whole machine.
TABLE: dict[tuple[Phase, type[Event]], _Handler] = _table()
