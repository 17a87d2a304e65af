"""The daemon's domain errors (both of its programs: the keeper raises them, the agent
answers with them), free of gRPC.

The refusals themselves are the shared ones of :mod:`agent.refusal` (re-exported
here; ``AgentError`` is the daemon's name for :class:`~agent.refusal.Refusal`),
so the daemon's gRPC layer maps every kind to a status code in the one table of
:mod:`agent.rpc`. What is the daemon's own: a spawn that failed
(:class:`SpawnFailure`) and the agent's own resources running out, as refusals
(:func:`agent_condition`).
"""

from __future__ import annotations

import errno

from agent.refusal import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Refusal,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
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


# The daemon's name for a refusal: the one type all programs share.
AgentError = Refusal


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
# changing what it asks.
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
