"""Python client library for worker agents (and the reference scheduler).

Synchronous::

    from agent.client import AgentClient, TLSFiles

    with AgentClient("10.0.0.5:50000", TLSFiles("ca.crt", "me.crt", "me.key")) as c:
        job = c.start("bash", "/opt/scripts/backup.sh", args=["--full"])
        status = c.wait(job, timeout=60)
        print(status.state, status.exit_code)
        for chunk in c.stream(job):
            sys.stdout.buffer.write(chunk)

Asynchronous: :class:`AsyncAgentClient` has the same methods as coroutines
(``stream`` and ``list_all`` are async iterators).

Every call has a deadline (``timeout`` argument, else the client's
default). Calls that are safe to repeat (query, stop, wait, list, and
stream resumed from its last offset) are retried with backoff while the
agent is UNAVAILABLE; ``start`` is never retried, so a job is never
started twice. Errors are :class:`AgentClientError` subclasses named after
the gRPC status (:class:`NotFound`, :class:`PermissionDenied`, ...).

Layout: :mod:`agent.client._calls` builds every request and converts every
answer; :mod:`agent.client.sync` and :mod:`agent.client.aio` only carry
them over a channel. The names below are loaded on first use, so importing
``agent.client.cli`` does not import grpc before agentctl has set up
grpc's logging environment, and agentctl's commands that make no call
(``--version``, ``--help``, ``completion``) never import it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

    from agent.channel import client_channel_options as channel_options
    from agent.client._calls import channel_credentials, list_request, start_request
    from agent.client.aio import AsyncAgentClient
    from agent.client.errors import (
        AgentClientError,
        DeadlineExceeded,
        FailedPrecondition,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
    )
    from agent.client.model import STATES, JobStatus, RetryPolicy, TLSFiles, WorkerInfo
    from agent.client.runs import RunHostInfo, RunInfo, RunOutputLine
    from agent.client.sync import AgentClient, SchedulerClient

__all__ = [
    "LIMIT_FIELDS",
    "STATES",
    "STATE_NUMBERS",
    "AgentClient",
    "AgentClientError",
    "AsyncAgentClient",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "JobStatus",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "RunHostInfo",
    "RunInfo",
    "RunOutputLine",
    "SchedulerClient",
    "TLSFiles",
    "Unauthenticated",
    "Unavailable",
    "WorkerInfo",
    "channel_credentials",
    "channel_options",
    "list_request",
    "start_request",
]

# Public name -> (module, name there).
_WHERE: dict[str, tuple[str, str]] = {
    "channel_options": ("agent.channel", "client_channel_options"),
    **{
        n: ("agent.client._calls", n)
        for n in ("channel_credentials", "list_request", "start_request")
    },
    "AsyncAgentClient": ("agent.client.aio", "AsyncAgentClient"),
    **{
        n: ("agent.client.errors", n)
        for n in (
            "AgentClientError",
            "DeadlineExceeded",
            "FailedPrecondition",
            "InvalidArgument",
            "NotFound",
            "PermissionDenied",
            "ResourceExhausted",
            "Unauthenticated",
            "Unavailable",
        )
    },
    **{
        n: ("agent.client.model", n)
        for n in ("STATES", "JobStatus", "RetryPolicy", "TLSFiles", "WorkerInfo")
    },
    **{n: ("agent.client.runs", n) for n in ("RunHostInfo", "RunInfo", "RunOutputLine")},
    **{n: ("agent.client.sync", n) for n in ("AgentClient", "SchedulerClient")},
}


def _derived(name: str) -> Any:
    from agent.vocabulary import LIMITS, JobState

    if name == "STATE_NUMBERS":
        return {s.name: s.value for s in JobState}
    return {lim.name: lim.wire for lim in LIMITS}  # LIMIT_FIELDS


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562)."""
    if name in ("STATE_NUMBERS", "LIMIT_FIELDS"):
        value = _derived(name)
    elif name in _WHERE:
        import importlib

        module, attr = _WHERE[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
