"""The shared refusal type and the shared gRPC edge (agent.refusal, agent.rpc), directly.

A fake servicer context stands in for gRPC's: the two functions only read its
``auth_context()`` and call its ``abort``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent import refusal
from agent.access import AccessDenied, AccessRules
from agent.keeper import errors
from agent.rpc import STATUS, abort, peer_certificate
from agent.vocabulary import Kind

from certfactory import make_ca, make_leaf, pem


class Aborted(Exception):
    """What the fake context raises from abort(), as gRPC's raises AbortError."""


class FakeContext:
    """The part of grpc.aio.ServicerContext that agent.rpc uses."""

    def __init__(self, pems: list[bytes] | None = None) -> None:
        self.auth = {"x509_pem_cert": pems} if pems is not None else {}
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def auth_context(self) -> dict[str, Any]:
        return self.auth

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


def test_status_table_covers_every_kind_by_its_name() -> None:
    """Every Kind has a status, and it is the gRPC code of the same name."""
    assert set(STATUS) == set(Kind)
    assert all(STATUS[k].name == k.name for k in Kind)


def test_access_denied_is_a_permission_denied_refusal() -> None:
    """The access rules' refusal maps through the one table to PERMISSION_DENIED."""
    with pytest.raises(refusal.PermissionDenied) as e:
        AccessRules(clients=frozenset({"alice"})).caller("mallory").may_call()
    assert isinstance(e.value, AccessDenied)
    assert STATUS[e.value.kind] is grpc.StatusCode.PERMISSION_DENIED
    assert e.value.rule == "identity-not-allowed" and "'mallory'" in e.value.message


def test_the_daemon_errors_are_the_shared_refusals() -> None:
    """AgentError is Refusal, and each daemon error class is the shared one of its kind."""
    assert errors.AgentError is refusal.Refusal
    for name in ("InvalidArgument", "NotFound", "PermissionDenied", "Unauthenticated"):
        assert getattr(errors, name) is getattr(refusal, name)
    assert refusal.Refusal("x").kind is Kind.INTERNAL
    assert refusal.Unavailable("x", rule="r").rule == "r"


def test_peer_certificate_reads_the_verified_identity() -> None:
    """A verified client certificate gives its PEM and its CN as the identity."""
    cert, _ = make_leaf(make_ca(), "alice")
    pem_bytes = pem(cert)
    got, peer = peer_certificate(FakeContext([pem_bytes]))
    assert got == pem_bytes and peer.identity == "alice" and not peer.problem


def test_peer_certificate_without_a_certificate_is_unauthenticated() -> None:
    """No verified certificate on the call: Unauthenticated, rule no-client-cert."""
    for ctx in (FakeContext(None), FakeContext([])):
        with pytest.raises(refusal.Unauthenticated) as e:
            peer_certificate(ctx)
        assert e.value.rule == "no-client-cert"


def test_peer_certificate_refuses_a_certificate_that_is_not_a_client_one() -> None:
    """A certificate with a problem (serverAuth only) is refused, saying why."""
    cert, _ = make_leaf(make_ca(), "alice", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(refusal.Unauthenticated) as e:
        peer_certificate(FakeContext([pem(cert)]))
    assert e.value.rule == "bad-client-cert" and "clientAuth" in e.value.message


def test_abort_answers_with_the_status_of_the_kind() -> None:
    """abort() ends the call with the kind's status and the refusal's message."""
    ctx = FakeContext()
    with pytest.raises(Aborted):
        asyncio.run(abort(ctx, refusal.NotFound("no job x")))
    assert ctx.aborted == (grpc.StatusCode.NOT_FOUND, "no job x")
