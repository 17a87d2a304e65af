"""Keepalive: clients ping idle connections no more often than the servers allow.

A gRPC server counts a ping that arrives sooner than its minimum interval as a
strike and, after ``max_ping_strikes`` of them, closes the connection with
GOAWAY ``too_many_pings``. The agent named that minimum with an argument gRPC
does not know, so the default of five minutes applied and an idle client of the
library was cut off after three pings.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc._cython import cygrpc

from agent import channel
from agent.client import AgentClient, AsyncAgentClient, _calls

from helpers import AgentProcess

AgentFactory = Callable[..., AgentProcess]

MIN_INTERVAL = "grpc.http2.min_ping_interval_without_data_ms"
# The real intervals, divided by this in the idle runs (the ratios stay).
SCALE = 10.0
# The agent, with its minimum ping interval set by the first argument.
SCALED_AGENT = (
    "import sys\n"
    "import agent.channel\n"
    "agent.channel.SERVER_MIN_PING_INTERVAL_S = float(sys.argv[1])\n"
    "from agent.daemon.cli import main\n"
    "sys.exit(main(['run', '--config', sys.argv[2]]))\n"
)


def _ms(opts: list[tuple[str, Any]], name: str) -> int:
    [value] = [v for k, v in opts if k == name]
    return int(value)


def test_every_client_pings_no_sooner_than_every_server_allows() -> None:
    """Each client's keepalive interval is at least twice the servers' minimum."""
    server = channel.server_keepalive_options()
    floor = _ms(server, MIN_INTERVAL)
    assert _ms(server, "grpc.keepalive_permit_without_calls") == 1
    assert _ms(server, "grpc.http2.max_ping_strikes") > 0
    clients = {
        "client library": channel.client_channel_options(),
        "long-lived link": channel.reconnecting_channel_options(),
    }
    for name, opts in clients.items():
        assert _ms(opts, "grpc.keepalive_time_ms") >= 2 * floor, name
        assert _ms(opts, "grpc.keepalive_permit_without_calls") == 1, name
    # The clients' own default is the library's.
    for cls in (AgentClient, AsyncAgentClient, _calls.channel_spec):
        default = inspect.signature(cls).parameters["keepalive_s"].default
        assert default == channel.CLIENT_KEEPALIVE_S, cls


@pytest.fixture(scope="module")
def grpc_core_text() -> bytes:
    """The gRPC core library, where every channel argument it reads is named."""
    return Path(cygrpc.__file__).read_bytes()


@pytest.mark.parametrize(
    "opts",
    [
        channel.server_keepalive_options(),
        channel.client_channel_options(server_name="x"),
        channel.reconnecting_channel_options(),
    ],
    ids=["server", "client", "link"],
)
def test_keepalive_arguments_are_names_grpc_reads(grpc_core_text: bytes, opts: Any) -> None:
    """Every argument name given to gRPC is one it knows (an unknown one is ignored)."""
    unknown = [k for k, _ in opts if k.encode() not in grpc_core_text]
    assert unknown == []


class Watch:
    """The connectivity states a channel goes through, from now on."""

    def __init__(self, ch: grpc.Channel) -> None:
        self.states: list[grpc.ChannelConnectivity] = []
        self._lock = threading.Lock()
        self._ch = ch
        ch.subscribe(self._on, try_to_connect=False)

    def _on(self, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            self.states.append(state)

    def left_ready(self) -> bool:
        """True once the channel was READY and then was not."""
        with self._lock:
            seen = self.states
            return grpc.ChannelConnectivity.READY in seen and seen[-1] != (
                grpc.ChannelConnectivity.READY
            )

    def close(self) -> None:
        self._ch.unsubscribe(self._on)


@pytest.fixture
def scaled_agent(make_agent: AgentFactory) -> Iterator[Callable[[float], AgentProcess]]:
    """Start a real agent whose minimum ping interval is the given number of seconds."""

    def start(min_interval: float) -> AgentProcess:
        a = make_agent(start=False)
        code = [sys.executable, "-c", SCALED_AGENT, str(min_interval), str(a.config_path)]
        return a.start(command=code)

    yield start


def _idle(a: AgentProcess, seconds: float, monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Idle a client and a long-lived link (intervals / SCALE); which were cut off."""
    monkeypatch.setattr(channel, "LINK_KEEPALIVE_S", channel.LINK_KEEPALIVE_S / SCALE)
    tls = a.certs.tls("client")
    clients = {
        "client": AgentClient(a.addr, tls, keepalive_s=channel.CLIENT_KEEPALIVE_S / SCALE),
        "link": AgentClient(a.addr, tls, options=channel.reconnecting_channel_options()),
    }
    watches = {}
    try:
        for name, c in clients.items():
            c.list()  # connected and READY
            watches[name] = Watch(c._channel)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not all(w.left_ready() for w in watches.values()):
            time.sleep(0.1)
        return {name: w.left_ready() for name, w in watches.items()}
    finally:
        for w in watches.values():
            w.close()
        for c in clients.values():
            c.close()


@pytest.mark.slow
def test_idle_clients_are_never_sent_too_many_pings(
    scaled_agent: Callable[[float], AgentProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real agent keeps idle clients pinging at the library's intervals (scaled down)."""
    a = scaled_agent(channel.SERVER_MIN_PING_INTERVAL_S / SCALE)
    # Six client pings and twelve on the link; the third early one would be the end.
    cut = _idle(a, 6 * channel.CLIENT_KEEPALIVE_S / SCALE, monkeypatch)
    assert cut == {"client": False, "link": False}


def test_control_a_server_stricter_than_its_clients_cuts_them_off(
    scaled_agent: Callable[[float], AgentProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: the same idle run against a minimum above the clients' interval ends in GOAWAY."""
    a = scaled_agent(2 * channel.CLIENT_KEEPALIVE_S / SCALE)
    # The fourth ping, the third early one, ends it: given time to spare on a busy machine.
    cut = _idle(a, 12 * channel.CLIENT_KEEPALIVE_S / SCALE, monkeypatch)
    assert cut == {"client": True, "link": True}
