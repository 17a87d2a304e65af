"""What the daemon's and the scheduler's gRPC services share: the caller, and refusals.

Both read who is calling from the call's context the same way
(:func:`peer_certificate`: the handshake-verified client certificate and the
one identity it names), and both answer a :class:`~agent.refusal.Refusal`
with the status of its kind from one table (:data:`STATUS`, :func:`abort`).
What each service then asks of the caller (the daemon's ``[auth]`` lists and
revocation, the scheduler's roles) stays with it.

Imports grpc: the daemon imports this only after its gate
(:mod:`agent.daemon.grpc_gate`), like every other gRPC module of it.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from agent.refusal import Refusal, Unauthenticated
from agent.tls import PeerCert, identity_from_cert
from agent.vocabulary import Kind

__all__ = ["STATUS", "abort", "peer_certificate"]

# The gRPC status of each kind of refusal: the one table.
STATUS: dict[Kind, grpc.StatusCode] = {kind: grpc.StatusCode[kind.code] for kind in Kind}


def peer_certificate(context: Any) -> tuple[bytes, PeerCert]:
    """The caller's verified certificate (PEM) and the identity it names.

    Raises Unauthenticated when the call carries no verified client
    certificate (rule ``no-client-cert``) or the certificate names no single
    usable identity (rule ``bad-client-cert``, the message says why).
    """
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise Unauthenticated("no verified client certificate", rule="no-client-cert")
    peer = identity_from_cert(pems[0])
    if peer.problem:
        raise Unauthenticated(peer.problem, rule="bad-client-cert")
    return pems[0], peer


async def abort(context: Any, refusal: Refusal) -> NoReturn:
    """End the call with the status of ``refusal``'s kind and its message."""
    await context.abort(STATUS[refusal.kind], refusal.message)
    raise AssertionError("unreachable")  # abort() raises
