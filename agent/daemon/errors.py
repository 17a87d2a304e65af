"""Domain errors, free of gRPC.

Each error names the kind of failure; the gRPC layer (``agent.daemon.service``) maps
the kind to a status code in one table. Messages are written for a person:
they say what was refused and why, never include a stack trace, and never
echo secret values.
"""

from __future__ import annotations

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
