"""One fail-closed access gate in front of health and reflection, metrics on or off.

With metrics on, the gate was the metrics interceptor's own copy, and it passed
a handler of a kind it did not know through ungated (``return handler``); the
gate without metrics refused it. Both settings now run
:func:`agent.daemon.access_gate.gated`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent.daemon.access_gate import AccessGate, gated
from agent.daemon.metrics import AgentMetrics, RpcMetricsInterceptor

from helpers import AgentFactory, free_port

HEALTH = "/grpc.health.v1.Health/Check"
Interceptor = Callable[[Any], grpc.aio.ServerInterceptor]


class _Chain(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Two interceptors as grpc runs a server's list: ``outer`` first, around ``inner``."""

    def __init__(self, outer: Any, inner: Any) -> None:
        self.outer, self.inner = outer, inner

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        async def then(d: Any) -> Any:
            return await self.inner.intercept_service(continuation, d)

        return await self.outer.intercept_service(then, details)


# What the server installs in front of health and reflection in each setting
# (agent.daemon.server: the same AccessGate, with the metrics counting around it).
SETTINGS: dict[str, Interceptor] = {
    "metrics off": lambda gate: AccessGate(gate),
    "metrics on": lambda gate: _Chain(RpcMetricsInterceptor(AgentMetrics()), AccessGate(gate)),
}


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


class _Gate:
    """Records the methods it was asked about; refuses them while ``allow`` is False."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.allow = False

    async def __call__(self, method: str, context: Any) -> None:
        self.asked.append(method)
        if not self.allow:
            raise PermissionError(method)  # stands in for context.abort()


async def _answer(request: Any, context: Any) -> str:
    return "answer"


async def _items(request: Any, context: Any) -> AsyncIterator[str]:
    yield "item"


def _intercept(ic: grpc.aio.ServerInterceptor, handler: Any, method: str = HEALTH) -> Any:
    async def found(details: Any) -> Any:
        return handler

    return asyncio.run(ic.intercept_service(found, _Details(method)))


UNGATEABLE = {
    "stream-unary": grpc.stream_unary_rpc_method_handler(_answer),
    "no behaviour": grpc.unary_unary_rpc_method_handler(_answer)._replace(unary_unary=None),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("kind", sorted(UNGATEABLE))
def test_a_handler_the_gate_cannot_wrap_is_refused(setting: str, kind: str) -> None:
    """A handler of a kind the gate does not know is refused (None), never passed ungated."""
    gate = _Gate()
    assert _intercept(SETTINGS[setting](gate), UNGATEABLE[kind]) is None


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_every_known_kind_runs_the_gate_before_its_behaviour(setting: str) -> None:
    """Unary, server-streaming and bidirectional handlers: the gate decides first."""
    gate = _Gate()
    ic = SETTINGS[setting](gate)
    unary = _intercept(ic, grpc.unary_unary_rpc_method_handler(_answer))
    stream = _intercept(ic, grpc.unary_stream_rpc_method_handler(_items))
    bidi = _intercept(ic, grpc.stream_stream_rpc_method_handler(_items))

    async def drain(h: Any, attr: str) -> list[str]:
        return [x async for x in getattr(h, attr)(None, None)]

    async def calls() -> list[Any]:
        out: list[Any] = []
        for run in (
            lambda: unary.unary_unary(None, None),
            lambda: drain(stream, "unary_stream"),
            lambda: drain(bidi, "stream_stream"),
        ):
            try:
                out.append(await run())
            except PermissionError:
                out.append("refused")
        return out

    assert asyncio.run(calls()) == ["refused"] * 3
    gate.allow = True
    assert asyncio.run(calls()) == ["answer", ["item"], ["item"]]
    assert gate.asked == [HEALTH] * 6


def test_gate_exempts_only_the_service_named() -> None:
    """AccessGate leaves a service that checks callers itself untouched, gates the rest."""
    gate = _Gate()
    ic = AccessGate(gate, exempt="/jobscheduler.Worker/")
    h = grpc.unary_unary_rpc_method_handler(_answer)
    assert _intercept(ic, h, "/jobscheduler.Worker/QueryJob") is h
    assert _intercept(ic, h, "/jobscheduler.WorkerX/QueryJob") not in (None, h)


def test_a_handler_with_two_behaviours_is_refused() -> None:
    """Only a handler with exactly one behaviour is gated: which one runs is then certain."""
    two = grpc.unary_unary_rpc_method_handler(_answer)._replace(unary_stream=_items)
    assert gated(two, HEALTH, _Gate()) is None


def _health_check(addr: str, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    with grpc.secure_channel(addr, creds) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def _reflection(addr: str, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.secure_channel(addr, creds) as ch:
        try:
            list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([req])))
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("metrics", [False, True], ids=["metrics off", "metrics on"])
def test_real_agent_gates_health_and_reflection_either_way(
    make_agent: AgentFactory, metrics: bool
) -> None:
    """A real agent: [auth] decides health and reflection calls, metrics on or off."""
    a = make_agent(metrics={"enabled": metrics, "addr": f"127.0.0.1:{free_port()}"})
    listed, unlisted = a.certs.creds("client"), a.certs.creds("agent")
    assert _health_check(a.addr, listed) == grpc.StatusCode.OK
    assert _reflection(a.addr, listed) == grpc.StatusCode.OK
    assert _health_check(a.addr, unlisted) == grpc.StatusCode.PERMISSION_DENIED
    assert _reflection(a.addr, unlisted) == grpc.StatusCode.PERMISSION_DENIED
