"""Refusals, free of gRPC: the one type of a refused (or failed) request, for all programs.

A :class:`Refusal` carries its :class:`~agent.vocabulary.Kind` (the class
says it), a message written for a person (what was refused and why, never a
stack trace, never a secret value) and the name of the rule that refused
(for the audit log). The gRPC layers map the kind to a status code in one
table (:data:`agent.rpc.STATUS`), so the daemon and the scheduler answer the
same refusal with the same status. The daemon calls a refusal an
``AgentError`` (:mod:`agent.keeper.errors`); the access rules' refusal,
:class:`~agent.access.AccessDenied`, is a :class:`PermissionDenied`.
"""

from __future__ import annotations

from agent.vocabulary import Kind

__all__ = [
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Refusal",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]


class Refusal(Exception):
    """A refusal or failure with a kind and a message a person can act on."""

    kind: Kind = Kind.INTERNAL

    def __init__(self, message: str, *, rule: str = "") -> None:
        super().__init__(message)
        self.message = message
        # The name of the rule that produced the refusal (for the audit log).
        self.rule = rule


class InvalidArgument(Refusal):
    """The request is malformed (bad id, oversize field, too many arguments)."""

    kind = Kind.INVALID_ARGUMENT


class NotFound(Refusal):
    """The job (or file, or worker) does not exist, or is not visible to the caller."""

    kind = Kind.NOT_FOUND


class PermissionDenied(Refusal):
    """The caller or the request is not allowed by configuration or policy."""

    kind = Kind.PERMISSION_DENIED


class Unauthenticated(Refusal):
    """The caller presented no verifiable identity."""

    kind = Kind.UNAUTHENTICATED


class FailedPrecondition(Refusal):
    """The request is well-formed but the system is not in a state to run it."""

    kind = Kind.FAILED_PRECONDITION


class ResourceExhausted(Refusal):
    """A configured capacity (running jobs, ...) is used up."""

    kind = Kind.RESOURCE_EXHAUSTED


class Unavailable(Refusal):
    """The program is shutting down, or what the request needs is not reachable now."""

    kind = Kind.UNAVAILABLE
