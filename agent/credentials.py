"""gRPC server credentials that follow certificate files on disk.

Imports grpc, so it must only be imported after the cipher policy is set
(see ``agent.tls``).
"""

from __future__ import annotations

from typing import Any

import grpc

from agent.tls import CertificateReloader, ServerTLSState


def _config(state: ServerTLSState) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(state.pair.key_pem, state.pair.cert_pem)], root_certificates=state.ca_pem
    )


def reloading_server_credentials(
    reloader: CertificateReloader, *, require_client_auth: bool
) -> grpc.ServerCredentials:
    """Credentials whose certificate, key and CA are re-read when the files change.

    gRPC calls the fetcher at the start of every TLS handshake; it only
    compares file signatures unless something changed, and hands gRPC a new
    configuration only after the reloader validated it (a broken set is
    logged once and the previous one stays in use).
    """
    served = {"version": reloader.version}

    def fetch() -> Any:
        reloader.check()
        if reloader.version == served["version"]:
            return None
        served["version"] = reloader.version
        return _config(reloader.state)

    return grpc.dynamic_ssl_server_credentials(
        _config(reloader.state), fetch, require_client_authentication=require_client_auth
    )
