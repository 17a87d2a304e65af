"""The one gate through which the daemon lets grpc be imported.

gRPC reads two process-wide settings once, when it is first imported:
``GRPC_SSL_CIPHER_SUITES`` (the TLS 1.2 suites the listener accepts, which
depend on the server key's type and ``tls13_only``) and
``GRPC_ENABLE_FORK_SUPPORT`` (its fork handlers crash a forked child now and
then: SIGABRT in ev_epoll1, about 1 in 300 spawns measured here; the agent
never forks a process that runs Python after the fork, so they are off).
Setting either after the import silently does nothing, so the daemon's
entry point calls :func:`open_gate` before importing anything that imports
grpc, and :func:`open_gate` refuses if grpc is already there. Only the
daemon needs this: the client and the scheduler import grpc freely.
"""

from __future__ import annotations

import os
import sys

from agent.tls import set_cipher_policy


class GateError(RuntimeError):
    """grpc was imported before the daemon's settings were made."""


def open_gate(*, key_type: str | None, tls13_only: bool) -> None:
    """Make the process-wide gRPC settings; raise GateError if grpc is already imported."""
    if "grpc" in sys.modules:
        raise GateError(
            "grpc was imported before its process-wide settings were made; "
            "the cipher policy would silently not apply"
        )
    if key_type is not None:
        set_cipher_policy(key_type, tls13_only)
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
