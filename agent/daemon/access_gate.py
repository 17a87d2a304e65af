"""The ``[auth]`` gate in front of the services that do not check callers themselves.

Health and reflection come from grpcio's own packages and know nothing of
``[auth]``; every call to them first awaits ``gate(method, context)``, which
aborts the call of an identity ``[auth]`` does not allow. :func:`gated` is
the one place a handler is put behind that gate, whether metrics are on (the
metrics interceptor counts around the gated handler) or off
(:class:`AccessGate`). It fails closed: a handler whose kind it does not
wrap (stream-unary, which none of those services has, one with no behaviour,
or one with more than one) is refused, never passed through ungated.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

__all__ = ["GATED_KINDS", "HANDLER_KINDS", "AccessGate", "Gate", "gated"]

# gate(method, context): returns to let the call through, aborts the context to refuse.
Gate = Callable[[str, Any], Awaitable[None]]

# The behaviours of a grpc RpcMethodHandler, and those the gate wraps.
HANDLER_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
GATED_KINDS = frozenset({"unary_unary", "unary_stream", "stream_stream"})


def gated(handler: Any, method: str, gate: Gate) -> Any | None:
    """``handler`` with ``gate(method, context)`` awaited before its behaviour runs.

    None (gRPC then answers UNIMPLEMENTED) unless the handler has exactly one
    behaviour and it is of a kind in :data:`GATED_KINDS`.
    """
    kinds = [k for k in HANDLER_KINDS if getattr(handler, k, None) is not None]
    if len(kinds) != 1 or kinds[0] not in GATED_KINDS:
        return None
    kind = kinds[0]
    inner = getattr(handler, kind)
    if inspect.isasyncgenfunction(inner):

        async def gen(request: Any, context: Any) -> AsyncIterator[Any]:
            await gate(method, context)
            async for item in inner(request, context):
                yield item

        return handler._replace(**{kind: gen})

    async def call(request: Any, context: Any) -> Any:
        await gate(method, context)
        return await inner(request, context)

    return handler._replace(**{kind: call})


class AccessGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """An interceptor putting every handler behind the gate (see :func:`gated`).

    Methods under ``exempt`` (a prefix such as ``/jobscheduler.Worker/``: a
    service that checks its callers itself) pass untouched.
    """

    def __init__(self, gate: Gate, *, exempt: str = "") -> None:
        """``gate`` decides every call outside ``exempt``."""
        self._gate = gate
        self._exempt = exempt

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        """The handler behind the gate; None for a handler that cannot be gated."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or (self._exempt and method.startswith(self._exempt)):
            return handler
        return gated(handler, method, self._gate)
