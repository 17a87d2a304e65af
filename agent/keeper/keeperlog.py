"""The job keeper's voice: its log line, its guard around a job's handler, and its word
to the service manager. Standard library only: every part of the keeper uses these."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable
from typing import Any


def log(text: str) -> None:
    """One line on stderr (the agent's log while it lives); never raises."""
    with contextlib.suppress(OSError, ValueError):
        print(f"agent keeper: {text}", file=sys.stderr, flush=True)


def guarded(fn: Callable[..., None], *args: Any) -> None:
    """Run a job's handler; a bug in it is logged and the keeper goes on (its death
    would leave every job without a keeper)."""
    try:
        fn(*args)
    except Exception:
        import traceback

        name = getattr(fn, "__name__", type(fn).__name__)
        log(f"internal error in {name}:\n{traceback.format_exc()}")


def notify_address() -> str:
    """$NOTIFY_SOCKET as an address for sendto ("" when there is no service manager)."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr[:1] == "@":
        addr = "\0" + addr[1:]
    return addr


def notify(state: str) -> None:
    """sd_notify(3) to the service manager, if any (a service keeper; never raises). Not
    the agent's sdnotify: its logging import would double the keeper's memory."""
    addr = notify_address()
    if not addr:
        return
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s,
    ):
        s.sendto(state.encode(), addr)
