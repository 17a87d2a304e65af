"""Client channels of all three programs: keepalive options, deadlines, backoff.

The daemon (its registration with the scheduler), the client library and
the reference scheduler share this one copy. Standard library only (it
names gRPC channel arguments but does not import grpc), so importing it
never disturbs the daemon's rule that its cipher policy is set before grpc
is imported (see :mod:`agent.tls`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Deadline",
    "backoff",
    "client_channel_options",
    "jittered_delays",
    "keepalive_options",
    "merge_options",
    "reconnecting_channel_options",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The shortest deadline handed to gRPC: a call whose time is up still goes
# out once and fails with DEADLINE_EXCEEDED instead of a ValueError.
_MIN_REMAINING = 0.001

ChannelOptions = list[tuple[str, Any]]


def keepalive_options(interval_s: float, timeout_s: float) -> ChannelOptions:
    """Keepalive pings every ``interval_s``, a peer silent for ``timeout_s`` is dead.

    Notices a dead peer (a host cut from the network) within seconds rather
    than when TCP gives up minutes later; pings also go out with no call in
    flight, and gRPC's own retries are off (ours retry only safe calls).
    """
    return [
        ("grpc.keepalive_time_ms", int(interval_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 0),
    ]


def _with_name(opts: ChannelOptions, server_name: str) -> ChannelOptions:
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def client_channel_options(
    *,
    server_name: str = "",
    keepalive_s: float = 10.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> ChannelOptions:
    """Channel arguments of the client library (agentctl, scripts)."""
    opts: ChannelOptions = [("grpc.max_receive_message_length", max_message_bytes)]
    opts += keepalive_options(keepalive_s, 5.0)
    return _with_name(opts, server_name)


def reconnecting_channel_options(server_name: str = "") -> ChannelOptions:
    """Channel arguments for long-lived links that must notice cuts and heal fast."""
    opts = keepalive_options(5.0, 3.0)
    # gRPC's own reconnect backoff grows to 120 s by default; after a
    # network cut heals the link should be back within seconds.
    opts += [
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    return _with_name(opts, server_name)


def merge_options(
    base: Sequence[tuple[str, Any]], extra: Sequence[tuple[str, Any]]
) -> ChannelOptions:
    """``base`` with every option named in ``extra`` replaced by ``extra``'s value."""
    names = {k for k, _ in extra}
    return [(k, v) for k, v in base if k not in names] + list(extra)


class Deadline:
    """The end of a call (or of a sequence of attempts); ``None`` for no end."""

    def __init__(self, timeout: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        """Start counting ``timeout`` seconds now."""
        self._clock = clock
        self.at = None if timeout is None else clock() + timeout

    def remaining(self) -> float | None:
        """Seconds left for the next attempt (a small positive floor), or None."""
        if self.at is None:
            return None
        return max(_MIN_REMAINING, self.at - self._clock())

    def allows(self, delay: float) -> bool:
        """True if sleeping ``delay`` still leaves time before the deadline."""
        return self.at is None or self._clock() + delay < self.at


def jittered_delays(
    initial: float, maximum: float, *, attempts: int | None = None, floor: float = 0.0
) -> Iterator[float]:
    """Exponential backoff with jitter: ``attempts - 1`` delays (endless if None).

    Each delay is uniform in ``[floor * d, d]`` where ``d`` doubles from
    ``initial`` up to ``maximum`` (``floor = 0``: full jitter).
    """
    d = initial
    n = 0
    while attempts is None or n < attempts - 1:
        n += 1
        yield random.uniform(floor * d, d)  # noqa: S311 - jitter, not a secret
        d = min(maximum, d * 2)


def backoff(initial: float, maximum: float) -> Callable[[], float]:
    """Endless backoff (jitter in the upper half): returns the next delay each call."""
    delays = jittered_delays(initial, maximum, floor=0.5)
    return lambda: next(delays)
