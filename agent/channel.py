"""Channels of all three programs: keepalive (both ends), deadlines, backoff.

The daemon (its listener and its registration with the scheduler), the
client library and the reference scheduler share this one copy. Standard library only (it
names gRPC channel arguments but does not import grpc), so importing it
never disturbs the daemon's rule that its cipher policy is set before grpc
is imported (see :mod:`agent.tls`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "CLIENT_KEEPALIVE_S",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LINK_KEEPALIVE_S",
    "SERVER_MIN_PING_INTERVAL_S",
    "Deadline",
    "backoff",
    "client_channel_options",
    "jittered_delays",
    "keepalive_options",
    "merge_options",
    "reconnecting_channel_options",
    "server_keepalive_options",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The shortest deadline handed to gRPC: a call whose time is up still goes
# out once and fails with DEADLINE_EXCEEDED instead of a ValueError.
_MIN_REMAINING = 0.001

ChannelOptions = list[tuple[str, Any]]

# Keepalive, both ends in one place. A gRPC server counts a ping that comes
# sooner than its minimum interval after the previous one as a strike, and
# after ``max_ping_strikes`` of them closes the connection with GOAWAY
# ``too_many_pings``: every client's ping interval must be at least the
# minimum of every server it talks to (tests/test_keepalive.py checks it, and
# idles real clients against a real agent). The server's minimum is half the
# most frequent client's interval, so a ping that arrives a little early
# (timers, a busy peer) is never a strike.
CLIENT_KEEPALIVE_S = 10.0  # the client library (agentctl, scripts)
CLIENT_KEEPALIVE_TIMEOUT_S = 5.0
LINK_KEEPALIVE_S = 5.0  # long-lived links: registration, the scheduler's channels to agents
LINK_KEEPALIVE_TIMEOUT_S = 3.0
SERVER_MIN_PING_INTERVAL_S = LINK_KEEPALIVE_S / 2
# The server's own pings, to notice a vanished client.
SERVER_KEEPALIVE_S = 60.0
SERVER_KEEPALIVE_TIMEOUT_S = 20.0
SERVER_MAX_PING_STRIKES = 2


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
    keepalive_s: float = CLIENT_KEEPALIVE_S,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> ChannelOptions:
    """Channel arguments of the client library (agentctl, scripts)."""
    opts: ChannelOptions = [("grpc.max_receive_message_length", max_message_bytes)]
    opts += keepalive_options(keepalive_s, CLIENT_KEEPALIVE_TIMEOUT_S)
    return _with_name(opts, server_name)


def reconnecting_channel_options(server_name: str = "") -> ChannelOptions:
    """Channel arguments for long-lived links that must notice cuts and heal fast."""
    opts = keepalive_options(LINK_KEEPALIVE_S, LINK_KEEPALIVE_TIMEOUT_S)
    # gRPC's own reconnect backoff grows to 120 s by default; after a
    # network cut heals the link should be back within seconds.
    opts += [
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    return _with_name(opts, server_name)


def server_keepalive_options() -> ChannelOptions:
    """Keepalive arguments of a listener (the agent's, the scheduler's).

    Clients may ping an idle connection (the client library does, to notice
    a dead agent quickly) as often as every ``SERVER_MIN_PING_INTERVAL_S``;
    the server pings its clients every ``SERVER_KEEPALIVE_S``. The values
    are read when called, not when this module is imported.
    """
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC's name for the minimum interval between received pings
        # (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS). An unknown
        # name is silently ignored, and the default of 5 minutes then sends
        # an idle client GOAWAY too_many_pings after three pings.
        ("grpc.http2.min_ping_interval_without_data_ms", int(SERVER_MIN_PING_INTERVAL_S * 1000)),
        ("grpc.http2.max_ping_strikes", SERVER_MAX_PING_STRIKES),
        ("grpc.keepalive_time_ms", int(SERVER_KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(SERVER_KEEPALIVE_TIMEOUT_S * 1000)),
    ]


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
    import random  # only when a call is retried: most never are

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
