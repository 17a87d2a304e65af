"""Domain errors, free of gRPC.

Each error names the kind of failure; the gRPC layer (``agent.daemon.service``) maps
the kind to a status code in one table. Messages are written for a person:
they say what was refused and why, never include a stack trace, and never
echo secret values.
"""

from __future__ import annotations

import errno

from agent.vocabulary import Kind

__all__ = [
    "AgentError",
    "FailedPrecondition",
    "InvalidArgument",
    "Kind",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SpawnFailure",
    "Unauthenticated",
    "Unavailable",
    "agent_condition",
]


class AgentError(Exception):
    """A refusal or failure with a kind and a message a person can act on."""

    kind: Kind = Kind.INTERNAL

    def __init__(self, message: str, *, rule: str = "") -> None:
        super().__init__(message)
        self.message = message
        # The name of the rule that produced the refusal (for the audit log).
        self.rule = rule


class InvalidArgument(AgentError):
    """The request is malformed (bad id, oversize field, too many arguments)."""

    kind = Kind.INVALID_ARGUMENT


class NotFound(AgentError):
    """The job (or file) does not exist, or is not visible to the caller."""

    kind = Kind.NOT_FOUND


class PermissionDenied(AgentError):
    """The caller or the request is not allowed by configuration or policy."""

    kind = Kind.PERMISSION_DENIED


class Unauthenticated(AgentError):
    """The caller presented no verifiable identity."""

    kind = Kind.UNAUTHENTICATED


class FailedPrecondition(AgentError):
    """The request is well-formed but the system is not in a state to run it."""

    kind = Kind.FAILED_PRECONDITION


class ResourceExhausted(AgentError):
    """A configured capacity (running jobs, ...) is used up."""

    kind = Kind.RESOURCE_EXHAUSTED


class Unavailable(AgentError):
    """The agent is shutting down or otherwise not accepting work."""

    kind = Kind.UNAVAILABLE


class SpawnFailure(OSError):
    """The job could not be started; ``str()`` is the whole reason, naming the step.

    An OSError (the process operations' contract), not an AgentError: a start
    that fails this way is a FAILED job, not a refused request.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


# The agent's own resources running out: (kind, what ran out). A refusal that says it is
# the agent's condition, not the caller's request, so a client retries instead of
# changing what it asks (issue 23).
_CONDITIONS: dict[int, tuple[type[AgentError], str]] = {
    errno.EMFILE: (ResourceExhausted, "the agent is out of file descriptors"),
    errno.ENFILE: (ResourceExhausted, "the system is out of file descriptors"),
    errno.ENOMEM: (ResourceExhausted, "the agent is out of memory"),
    errno.ENOBUFS: (ResourceExhausted, "the agent is out of buffer memory"),
    errno.ENOSPC: (Unavailable, "the agent's disk is full"),
    errno.EDQUOT: (Unavailable, "the agent's disk quota is used up"),
    errno.EAGAIN: (Unavailable, "the agent cannot create a process or thread now"),
}


def agent_condition(exc: BaseException) -> AgentError | None:
    """The refusal for ``exc`` when it is the agent's own resources running out
    (descriptors, memory, disk, processes or threads), else None. Never raises."""
    if isinstance(exc, AgentError):
        return None
    kind: type[AgentError]
    if isinstance(exc, MemoryError):
        kind, what = ResourceExhausted, "the agent is out of memory"
        detail = "MemoryError"
    elif isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        kind, what = Unavailable, "the agent cannot create a thread now"
        detail = str(exc)
    elif isinstance(exc, OSError) and exc.errno in _CONDITIONS:
        kind, what = _CONDITIONS[exc.errno]
        detail = f"{exc.strerror or exc}, {errno.errorcode.get(exc.errno, exc.errno)}"
    else:
        return None
    return kind(
        f"{what} ({detail}): the agent's condition, not the request's; try again later",
        rule="agent-resources",
    )
