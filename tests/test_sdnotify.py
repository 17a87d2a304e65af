"""sd_notify in the standard library (agent.daemon.sdnotify), against a real datagram socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A unix datagram socket standing in for systemd's notification socket."""
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield path, s
    s.close()


def test_ready_and_status_arrive_as_key_value_lines(
    listener: tuple[str, socket.socket],
) -> None:
    """READY=1 with STATUS, and STATUS alone, are one datagram of KEY=VALUE lines each."""
    path, s = listener
    n = Notifier(path)
    assert n.enabled
    assert n.ready("serving on 127.0.0.1:1")
    assert s.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:1"
    assert n.status("draining") and s.recv(4096) == b"STATUS=draining"
    assert n.stopping() and s.recv(4096) == b"STOPPING=1"
    n.close()
    assert not n.enabled and not n.watchdog()


def test_reloading_carries_a_monotonic_timestamp(listener: tuple[str, socket.socket]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC, which systemd 253+ requires."""
    path, s = listener
    n = Notifier(path)
    assert n.reloading()
    lines = s.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0
    n.close()


def test_abstract_namespace_address() -> None:
    """A leading @ names a socket in the abstract namespace."""
    name = f"agent-test-notify-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        n = Notifier("@" + name)
        assert n.watchdog() and s.recv(4096) == b"WATCHDOG=1"
        n.close()
    finally:
        s.close()


def test_without_a_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NOTIFY_SOCKET (or one that is not a unix path): disabled, calls return False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled and not Notifier().ready()
    n = Notifier("127.0.0.1:9")
    assert not n.enabled and n.address == "" and not n.status("x")


def test_a_send_that_fails_returns_false(tmp_path: Path) -> None:
    """A socket path nobody listens on: the send fails, is logged, and returns False."""
    n = Notifier(str(tmp_path / "nobody"))
    assert n.enabled and not n.ready()
    n.close()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half of WATCHDOG_USEC, only when WATCHDOG_PID is unset or this process."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() is None
