"""Errors of the client library: one class per gRPC status the agent answers with."""

from __future__ import annotations

import grpc

__all__ = [
    "AgentClientError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "convert",
]


class AgentClientError(Exception):
    """A call failed; ``code`` is the gRPC status, ``details`` the agent's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name.lower().replace('_', ' ')}: {self.details}"


class InvalidArgument(AgentClientError):
    """The request was malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(AgentClientError):
    """No such job (or script)."""

    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(AgentClientError):
    """The identity or the request is not allowed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(AgentClientError):
    """The client certificate was not accepted as an identity."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(AgentClientError):
    """The request is valid but cannot be carried out now."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(AgentClientError):
    """A limit was reached (running jobs, message size)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(AgentClientError):
    """The agent could not be reached or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AgentClientError):
    """The call did not complete before its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_ERRORS: dict[grpc.StatusCode, type[AgentClientError]] = {
    c.code: c
    for c in (
        InvalidArgument,
        NotFound,
        PermissionDenied,
        Unauthenticated,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
    )
}


def status_of(e: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call (UNKNOWN if the error carries none)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def convert(e: grpc.RpcError) -> AgentClientError:
    """The :class:`AgentClientError` subclass named after ``e``'s status."""
    code = status_of(e)
    details = (e.details() if hasattr(e, "details") else "") or str(code)
    cls = _ERRORS.get(code, AgentClientError)
    return cls(details, code) if cls is AgentClientError else cls(details)
