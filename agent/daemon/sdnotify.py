"""systemd's notification protocol (sd_notify), in the standard library.

A datagram of ``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``;
a leading ``@`` names a socket in the abstract namespace. Without the
variable every call is a no-op, so the agent behaves the same outside
systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages (no-op when not under systemd)."""

    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = addr
        self._sock: socket.socket | None = None
        if addr:
            if addr.startswith("@"):
                addr = "\0" + addr[1:]
            elif not addr.startswith("/"):
                log.warning("ignoring NOTIFY_SOCKET=%r (not a unix socket path)", addr)
                self.address = ""
                return
            self._target = addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is configured."""
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines; returns False (and logs) on failure."""
        if self._sock is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(msg, self._target)
        except OSError as e:
            log.warning("sd_notify failed: %s", e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """READY=1 (with an optional STATUS)."""
        return self.send(READY=1, STATUS=status) if status else self.send(READY=1)

    def status(self, text: str) -> bool:
        """STATUS=text."""
        return self.send(STATUS=text)

    def reloading(self) -> bool:
        """RELOADING=1 with the monotonic timestamp systemd 253+ expects."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> bool:
        """STOPPING=1."""
        return self.send(STOPPING=1)

    def watchdog(self) -> bool:
        """WATCHDOG=1 keep-alive."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of the unit's WatchdogSec, if it applies to this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6 / 2
