"""agent.credentials: a real gRPC server on reloading credentials, real TLS handshakes.

Which certificate the server presents is read from the handshake itself; a
rotation on disk must show at the next handshake, and a rotation the
reloader refuses (a key that does not match, a key others can read, an
expired certificate) must leave the previous certificate served.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.credentials import reloading_server_credentials
from agent.tls import CertificateReloader

from certfactory import DAY, NOW, Issuer, make_ca, make_leaf, pem, server_pair


@dataclass
class Served:
    """A running server and the files its credentials follow."""

    port: int
    crt: Path
    key: Path
    ca: Path
    ca_issuer: Issuer
    reloader: CertificateReloader


def _replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace a file by rename, as an operator's deploy tool would."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _serve(tmp_path: Path, *, require_client_auth: bool) -> Iterator[Served]:
    ca = make_ca("credentials test CA")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(pem(ca.cert))
    crt, key = server_pair(ca, tmp_path)
    reloader = CertificateReloader(crt, key, ca_file)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port(
        "127.0.0.1:0",
        reloading_server_credentials(reloader, require_client_auth=require_client_auth),
    )
    server.start()
    try:
        yield Served(port, crt, key, ca_file, ca, reloader)
    finally:
        server.stop(None)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A server that does not ask clients for a certificate."""
    yield from _serve(tmp_path, require_client_auth=False)


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[Served]:
    """A server that requires a client certificate of its CA."""
    yield from _serve(tmp_path, require_client_auth=True)


def _presented(s: Served) -> x509.Certificate:
    """The certificate the server presents in a new handshake (verification off: we look)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _on_disk(s: Served) -> x509.Certificate:
    return x509.load_pem_x509_certificate(s.crt.read_bytes())


def _health(s: Served, client: tuple[bytes, bytes] | None = None) -> grpc.StatusCode:
    """One health check on a new connection; the client certificate (key, cert) if given."""
    key, cert = client if client else (None, None)
    creds = grpc.ssl_channel_credentials(s.ca.read_bytes(), key, cert)
    # A channel of its own: no connection shared with an earlier check.
    with grpc.secure_channel(
        f"localhost:{s.port}", creds, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def _server_leaf(issuer: Issuer, **kw: object) -> tuple[x509.Certificate, object]:
    return make_leaf(
        issuer,
        "localhost",
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        san=["localhost", "127.0.0.1"],
        **kw,  # type: ignore[arg-type]
    )


def _rotate(s: Served, cert: x509.Certificate, key: object, key_mode: int = 0o600) -> None:
    _replace(s.key, _key_pem(key), key_mode)
    _replace(s.crt, pem(cert))


def _client(issuer: Issuer) -> tuple[bytes, bytes]:
    cert, key = make_leaf(issuer, "client")
    return _key_pem(key), pem(cert)


def test_serves_the_certificate_on_disk(served: Served) -> None:
    assert _presented(served) == _on_disk(served)
    assert _health(served) == grpc.StatusCode.OK


def test_a_rotated_certificate_is_served_at_the_next_handshake(served: Served) -> None:
    old = _presented(served)
    cert, key = _server_leaf(served.ca_issuer)
    _rotate(served, cert, key)
    assert _presented(served) == cert != old
    assert served.reloader.version == 1
    assert _health(served) == grpc.StatusCode.OK


def _refused_rotation(s: Served, before: x509.Certificate, words: str) -> None:
    """The files on disk were refused: the previous certificate is still served."""
    assert _presented(s) == before  # the handshake runs the reloader's check
    assert s.reloader.error is not None and words in s.reloader.error, s.reloader.error
    assert s.reloader.version == 0
    assert _presented(s) == before


def test_a_key_that_does_not_match_the_certificate_is_refused(served: Served) -> None:
    before = _presented(served)
    cert, _ = _server_leaf(served.ca_issuer)
    _, other_key = _server_leaf(served.ca_issuer)
    _rotate(served, cert, other_key)
    _refused_rotation(served, before, "does not match the certificate")


def test_a_key_others_can_read_is_refused(served: Served) -> None:
    before = _presented(served)
    cert, key = _server_leaf(served.ca_issuer)
    _rotate(served, cert, key, 0o644)
    _refused_rotation(served, before, "accessible by group or others")


def test_a_key_owned_by_another_user_is_refused(served: Served) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving the key file to another uid needs root")
    before = _presented(served)
    cert, key = _server_leaf(served.ca_issuer)
    _rotate(served, cert, key)
    os.chown(served.key, 65534, -1)
    _refused_rotation(served, before, "owned by uid 65534")


def test_an_expired_certificate_is_refused(served: Served) -> None:
    before = _presented(served)
    cert, key = _server_leaf(served.ca_issuer, not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    _rotate(served, cert, key)
    _refused_rotation(served, before, "expired")


def test_a_refused_set_fixed_later_is_served(served: Served) -> None:
    """After a refused rotation the next good one still comes through."""
    before = _presented(served)
    cert, key = _server_leaf(served.ca_issuer)
    _rotate(served, cert, key, 0o644)
    _refused_rotation(served, before, "accessible by group or others")
    os.chmod(served.key, 0o600)
    assert _presented(served) == cert


def test_client_authentication_required(mtls: Served) -> None:
    assert _health(mtls) == grpc.StatusCode.UNAVAILABLE
    assert _health(mtls, _client(make_ca("another CA"))) == grpc.StatusCode.UNAVAILABLE
    assert _health(mtls, _client(mtls.ca_issuer)) == grpc.StatusCode.OK


def test_client_authentication_not_required(served: Served) -> None:
    assert _health(served) == grpc.StatusCode.OK


def test_a_rotated_ca_decides_which_clients_are_accepted(mtls: Served) -> None:
    """The CA bundle is part of the reloaded configuration, not only the server pair."""
    new_ca = make_ca("rotated CA")
    assert _health(mtls, _client(new_ca)) == grpc.StatusCode.UNAVAILABLE
    # The server certificate stays signed by the old CA: the client trusts both.
    _replace(mtls.ca, pem(mtls.ca_issuer.cert) + pem(new_ca.cert))
    assert _health(mtls, _client(new_ca)) == grpc.StatusCode.OK
    assert mtls.reloader.version == 1
    # And the old CA's clients, no longer in the bundle, are refused.
    _replace(mtls.ca, pem(new_ca.cert))
    srv_cert, srv_key = _server_leaf(new_ca)
    _rotate(mtls, srv_cert, srv_key)
    assert _health(mtls, _client(mtls.ca_issuer)) == grpc.StatusCode.UNAVAILABLE
    assert _health(mtls, _client(new_ca)) == grpc.StatusCode.OK
