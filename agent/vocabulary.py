"""The one vocabulary of all three programs: job states, limits, error kinds.

The bottom of the package: standard library only, no I/O. The daemon, the
client library and the reference scheduler all take their names from here,
so a state, a limit or a default is written down exactly once. The table of
allowed state *transitions* belongs to the lifecycle
(:mod:`agent.keeper.lifecycle`); this module only names things.
"""

from __future__ import annotations

import enum
import re
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


def state_named(name: str) -> JobState:
    """The state called ``name`` (case-insensitive); ValueError naming the known ones."""
    try:
        return JobState[name.upper()]
    except KeyError:
        known = ", ".join(s.name for s in JobState)
        raise ValueError(f"unknown job state {name!r} (known: {known})") from None


# ---------------------------------------------------------------- fan-out runs


class RunState(enum.Enum):
    """The state of a fan-out run (numbers match the wire enum ``RunState``)."""

    RUNNING = 1
    DONE = 2
    CANCELLED = 3
    INTERRUPTED = 4


class HostState(enum.Enum):
    """One host's state in a run (numbers match the wire enum ``HostState``)."""

    PENDING = 1
    STARTING = 2
    RUNNING = 3
    SUCCEEDED = 4
    FAILED = 5
    NOT_STARTED = 6
    UNREACHABLE = 7
    UNKNOWN = 8

    @property
    def final(self) -> bool:
        """The host's part of the run is over (nothing more will change it)."""
        return self in HOST_FINAL_STATES

    @property
    def counts_as_error(self) -> bool:
        """The host counts against the run's error budget."""
        return self in (HostState.FAILED, HostState.UNREACHABLE)


HOST_FINAL_STATES = frozenset(
    {
        HostState.SUCCEEDED,
        HostState.FAILED,
        HostState.NOT_STARTED,
        HostState.UNREACHABLE,
        HostState.UNKNOWN,
    }
)

# Labels a worker advertises ([scheduler] labels): the same shape as
# Kubernetes' (a key of letters, digits and ._/-; a short value), so a
# selector written on a command line needs no quoting rules of its own.
MAX_LABELS = 64
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._-]{0,63}")


def label_problem(key: str, value: str) -> str | None:
    """What is wrong with one label, or None when it is fine."""
    if not _LABEL_KEY.fullmatch(key):
        return (
            f"label key {key[:80]!r}: 1-63 letters, digits and . _ / -, "
            "starting and ending with a letter or digit"
        )
    if not _LABEL_VALUE.fullmatch(value):
        return f"label {key}: value {value[:80]!r}: at most 63 letters, digits and . _ -"
    return None


# ---------------------------------------------------------------- limits


class Enforcer(enum.Enum):
    """What enforces a per-job limit."""

    RLIMIT = "rlimit"  # a resource limit of the job's process, set before exec
    CGROUP = "cgroup"  # a file of the job's cgroup (needs its controller)
    AGENT = "agent"  # the agent itself, as it copies the job's output


@dataclass(frozen=True)
class Limit:
    """One per-job limit: its names in each layer, and what enforces it."""

    name: str  # config key in [limits.default] / [limits.max], and in agentctl --limit
    wire: str  # field of the wire message ``Limits``
    enforcer: Enforcer
    control: str  # the rlimit (RLIMIT_CPU), the cgroup file (memory.max), or the agent's cap
    help: str
    controller: str = ""  # the cgroup controller ``control`` belongs to
    cgroup_field: str = ""  # the cgroups.Limits field that writes ``control``
    # What the hard rlimit adds to the soft one: RLIMIT_CPU's SIGKILL comes 2 s after
    # its SIGXCPU, so a job may end itself cleanly on the signal.
    hard_extra: int = 0


LIMITS: tuple[Limit, ...] = (
    Limit(
        "cpu_seconds",
        "cpuSeconds",
        Enforcer.RLIMIT,
        "RLIMIT_CPU",
        "RLIMIT_CPU: CPU seconds; SIGXCPU then SIGKILL",
        hard_extra=2,
    ),
    # Memory and processes are the whole job's, so a cgroup enforces them: never
    # RLIMIT_AS (address space of each process, not memory, and not the job's)
    # nor RLIMIT_NPROC (every process of the job's user, other jobs' too).
    Limit(
        "memory_bytes",
        "memoryBytes",
        Enforcer.CGROUP,
        "memory.max",
        "memory.max of the job's cgroup in bytes (needs the memory controller)",
        controller="memory",
        cgroup_field="memory_bytes",
    ),
    Limit(
        "open_files",
        "openFiles",
        Enforcer.RLIMIT,
        "RLIMIT_NOFILE",
        "RLIMIT_NOFILE: open file descriptors",
    ),
    Limit(
        "processes",
        "processes",
        Enforcer.CGROUP,
        "pids.max",
        "pids.max of the job's cgroup: its processes and threads (needs the pids controller)",
        controller="pids",
        cgroup_field="pids",
    ),
    Limit(
        "output_bytes",
        "outputBytes",
        Enforcer.AGENT,
        "output cap",
        "output cap in bytes (see jobs.on_output_cap)",
    ),
)
LIMIT_NAMES: tuple[str, ...] = tuple(lim.name for lim in LIMITS)
LIMIT_BY_NAME: dict[str, Limit] = {lim.name: lim for lim in LIMITS}
# Limit name -> the rlimit set on the job's process (RLIMIT_CPU, ...).
RLIMITS: dict[str, str] = {
    lim.name: lim.control for lim in LIMITS if lim.enforcer is Enforcer.RLIMIT
}
# Limit name -> (file of the job's cgroup, the controller it needs).
CGROUP_LIMITS: dict[str, tuple[str, str]] = {
    lim.name: (lim.control, lim.controller) for lim in LIMITS if lim.enforcer is Enforcer.CGROUP
}
# Limit name -> the cgroups.Limits field that sets its file.
CGROUP_FIELDS: dict[str, str] = {
    lim.name: lim.cgroup_field for lim in LIMITS if lim.enforcer is Enforcer.CGROUP
}
# Limit name -> what its hard rlimit adds to the soft one (seconds, files).
RLIMIT_HARD_EXTRA: dict[str, int] = {
    lim.name: lim.hard_extra for lim in LIMITS if lim.enforcer is Enforcer.RLIMIT
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
