"""The one vocabulary of all three programs: job states, limits, error kinds.

The bottom of the package: standard library only, no I/O. The daemon, the
client library and the reference scheduler all take their names from here,
so a state, a limit or a default is written down exactly once. The table of
allowed state *transitions* belongs to the lifecycle
(:mod:`agent.daemon.lifecycle`); this module only names things.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobState(enum.Enum):
    """The lifecycle state of one job (numbers match the wire enum ``JobState``)."""

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


DONE_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED, JobState.TIMED_OUT, JobState.LOST}
)
# The original worker reports error=true for a start failure, a non-zero exit
# or a death by signal. A stopped or timed-out job died by a signal, so it is
# an error in that sense too; LOST has no known outcome and is reported as one.
ERROR_STATES = frozenset({JobState.FAILED, JobState.STOPPED, JobState.TIMED_OUT, JobState.LOST})
SIGNALLABLE_STATES = frozenset({JobState.RUNNING})


def state_named(name: str) -> JobState:
    """The state called ``name`` (case-insensitive); ValueError naming the known ones."""
    try:
        return JobState[name.upper()]
    except KeyError:
        known = ", ".join(s.name for s in JobState)
        raise ValueError(f"unknown job state {name!r} (known: {known})") from None


# ---------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limit:
    """One per-job limit: its names in each layer, and what enforces it."""

    name: str  # config key in [limits.default] / [limits.max], and in agentctl --limit
    wire: str  # field of the wire message ``Limits``
    kernel: str  # the rlimit bounding it at admission (memory/processes: enforced by the cgroup)
    help: str


LIMITS: tuple[Limit, ...] = (
    Limit(
        "cpu_seconds", "cpuSeconds", "RLIMIT_CPU", "RLIMIT_CPU: CPU seconds; SIGXCPU then SIGKILL"
    ),
    Limit(
        "memory_bytes",
        "memoryBytes",
        "RLIMIT_AS",
        "memory.max of the job's cgroup in bytes (needs the memory controller)",
    ),
    Limit("open_files", "openFiles", "RLIMIT_NOFILE", "RLIMIT_NOFILE: open file descriptors"),
    Limit(
        "processes",
        "processes",
        "RLIMIT_NPROC",
        "pids.max of the job's cgroup: its processes and threads (needs the pids controller)",
    ),
    Limit("output_bytes", "outputBytes", "agent", "output cap in bytes (see jobs.on_output_cap)"),
)
LIMIT_NAMES: tuple[str, ...] = tuple(lim.name for lim in LIMITS)
LIMIT_BY_WIRE: dict[str, Limit] = {lim.wire: lim for lim in LIMITS}
LIMIT_BY_NAME: dict[str, Limit] = {lim.name: lim for lim in LIMITS}
# Limits the kernel applies as rlimits (the rest the agent enforces itself).
RLIMITS: dict[str, str] = {
    lim.name: lim.kernel for lim in LIMITS if lim.kernel.startswith("RLIMIT_")
}


# ---------------------------------------------------------------- errors


class Kind(enum.Enum):
    """What went wrong, independent of the transport; ``code`` is the gRPC status name."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"

    @property
    def code(self) -> str:
        """The name of the gRPC status code for this kind (``grpc.StatusCode[...]``)."""
        return self.name
