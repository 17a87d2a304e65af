"""A bare grpcio server answering one empty unary method, the cost of a call alone.

``python -m bench.bare SPEC_JSON`` with ``flavor`` ``aio`` (``grpc.aio``,
one event loop, like the agent) or ``sync`` (``grpc.server`` on a thread
pool of ``threads``), ``addr``, and the server certificate, key and CA:
mTLS like the agent, so a client pays the same transport. The method,
``/bench.Bare/Empty``, takes and returns empty bytes with no (de)serializer.
Prints ``ready`` once serving; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

SERVICE = "bench.Bare"
METHOD = f"/{SERVICE}/Empty"


def _creds(spec: dict[str, Any]) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(Path(spec["key"]).read_bytes(), Path(spec["cert"]).read_bytes())],
        root_certificates=Path(spec["ca"]).read_bytes(),
        require_client_auth=True,
    )


def _empty(request: bytes, context: Any) -> bytes:
    return b""


async def _empty_async(request: bytes, context: Any) -> bytes:
    return b""


def _handler(fn: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Empty": grpc.unary_unary_rpc_method_handler(fn)}
    )


def serve_sync(spec: dict[str, Any]) -> None:
    """grpc.server on a thread pool, until SIGTERM."""
    server = grpc.server(ThreadPoolExecutor(int(spec.get("threads", 16))))
    server.add_generic_rpc_handlers((_handler(_empty),))
    server.add_secure_port(spec["addr"], _creds(spec))
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.stop(0)


async def serve_aio(spec: dict[str, Any]) -> None:
    """grpc.aio.server, until SIGTERM."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(_empty_async),))
    server.add_secure_port(spec["addr"], _creds(spec))
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str]) -> int:
    """Entry point: one JSON spec argument."""
    spec = json.loads(argv[0])
    if spec["flavor"] == "aio":
        asyncio.run(serve_aio(spec))
    else:
        serve_sync(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
