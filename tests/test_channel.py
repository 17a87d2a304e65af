"""Channel arguments, deadlines and backoff (agent.channel), directly.

Keepalive between real clients and a real agent is tests/test_keepalive.py; this pins
the arithmetic and the option lists every program builds its channels from.
"""

from __future__ import annotations

import pytest

from agent.channel import (
    LINK_KEEPALIVE_S,
    Deadline,
    backoff,
    client_channel_options,
    jittered_delays,
    merge_options,
    reconnecting_channel_options,
)

from helpers import FakeClock


def test_deadline_counts_down_and_never_hands_grpc_zero() -> None:
    """remaining() falls with the clock to a small positive floor; allows() says if a
    sleep still fits."""
    clock = FakeClock(100.0)
    d = Deadline(2.0, clock)
    assert d.remaining() == 2.0 and d.allows(1.9) and not d.allows(2.0)
    clock.t += 1.5
    assert d.remaining() == pytest.approx(0.5)
    clock.t += 10
    remaining = d.remaining()
    assert remaining is not None and 0 < remaining <= 0.001
    assert not d.allows(0.0)


def test_no_deadline_never_runs_out() -> None:
    """Deadline(None): no remaining time to give, every sleep allowed."""
    d = Deadline(None, FakeClock(100.0))
    assert d.remaining() is None and d.allows(1e9)


def test_jittered_delays_double_up_to_the_maximum() -> None:
    """attempts - 1 delays, each within [floor * d, d] as d doubles to the cap."""
    delays = list(jittered_delays(0.1, 0.5, attempts=6, floor=0.5))
    assert len(delays) == 5
    for got, cap in zip(delays, [0.1, 0.2, 0.4, 0.5, 0.5], strict=True):
        assert cap / 2 <= got <= cap
    assert list(jittered_delays(1, 1, attempts=1)) == []


def test_backoff_is_endless_and_bounded() -> None:
    """backoff() gives a next delay at every call, never above the maximum."""
    nxt = backoff(0.01, 0.04)
    got = [nxt() for _ in range(50)]
    assert all(0.005 <= g <= 0.04 for g in got) and max(got) > 0.02


def test_merge_options_replaces_by_name() -> None:
    """Options named in extra replace base's, the others stay in order."""
    merged = merge_options([("a", 1), ("b", 2), ("c", 3)], [("b", 20), ("d", 4)])
    assert merged == [("a", 1), ("c", 3), ("b", 20), ("d", 4)]


def test_client_options_name_the_server_only_when_asked() -> None:
    """The TLS name override is added only for a server name; the receive limit is set."""
    plain = dict(client_channel_options(max_message_bytes=1234))
    assert plain["grpc.max_receive_message_length"] == 1234
    assert "grpc.ssl_target_name_override" not in plain
    named = dict(client_channel_options(server_name="agent.example"))
    assert named["grpc.ssl_target_name_override"] == "agent.example"
    assert named["grpc.enable_retries"] == 0  # ours retry only safe calls


def test_links_ping_often_and_reconnect_within_seconds() -> None:
    """Long-lived links: the link keepalive, and gRPC's reconnect backoff capped at 5 s."""
    opts = dict(reconnecting_channel_options())
    assert opts["grpc.keepalive_time_ms"] == int(LINK_KEEPALIVE_S * 1000)
    assert opts["grpc.max_reconnect_backoff_ms"] <= 5000
    assert len(opts) == len(reconnecting_channel_options())  # no option named twice
