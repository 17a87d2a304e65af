"""Self-test of the fleet helper: connectivity, blackhole cut/restore, isolation, cleanup.

All traffic stays inside namespaces these tests create.  Isolation from the
caller's namespace is checked by inspecting its links/addresses/routes rather
than by sending: a packet from there to a fleet address would leave through
the machine's real uplink.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest

from .netns import Fleet, available, cleanup_stale

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

ECHO_PORT = 7000
SINK_PORT = 7001

# Listens on <addr>:ECHO_PORT (banner "HELLO <ident>", then echo) and
# <addr>:SINK_PORT (discards everything).
SERVER = r"""
import socket, sys, threading
addr, echo_port, sink_port, ident = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def echo(conn):
    with conn:
        conn.sendall(f"HELLO {ident}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)

def sink(conn):
    with conn:
        while conn.recv(1 << 20):
            pass

def serve(listener, handler):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()

listeners = [(socket.create_server((addr, echo_port), backlog=64), echo),
             (socket.create_server((addr, sink_port), backlog=64), sink)]
threads = [threading.Thread(target=serve, args=lt, daemon=True) for lt in listeners]
for t in threads:
    t.start()
print("listening", flush=True)
for t in threads:
    t.join()
"""

# One connection: banner, one echoed line.  Prints a verdict and the elapsed time.
CLIENT = r"""
import errno, socket, sys, time
addr, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
t0 = time.monotonic()
try:
    with socket.create_connection((addr, port), timeout=timeout) as s:
        f = s.makefile("rb")
        banner = f.readline().decode().split()[-1]
        s.sendall(payload.encode() + b"\n")
        echoed = f.readline().decode().strip()
    print("ok", banner, echoed)
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", errno.errorcode.get(e.errno, e.errno))
print(f"{time.monotonic() - t0:.3f}")
"""

# Long-lived client holding one echo and one sink connection, driven by stdin:
#   ping TOKEN TIMEOUT -> "ok TOKEN SECS" | "timeout recv" | "timeout send" | "error ..."
#   flood TIMEOUT      -> "timeout send BYTES" | "sent BYTES"
SESSION = r"""
import socket, sys, time
addr, echo_port, sink_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
echo = socket.create_connection((addr, echo_port), timeout=5)
sink = socket.create_connection((addr, sink_port), timeout=5)
buf = bytearray()

def read_line(deadline):
    # Own buffering: socket.makefile() refuses to read again after a timeout.
    while b"\n" not in buf:
        echo.settimeout(max(deadline - time.monotonic(), 0.001))
        data = echo.recv(65536)
        if not data:
            raise EOFError
        buf.extend(data)
    i = buf.index(b"\n")
    line = bytes(buf[:i]).decode()
    del buf[: i + 1]
    return line

print("connected", read_line(time.monotonic() + 5), flush=True)
for cmd in sys.stdin:
    parts = cmd.split()
    t0 = time.monotonic()
    if parts[0] == "ping":
        token, timeout = parts[1], float(parts[2])
        deadline = t0 + timeout
        try:
            echo.settimeout(timeout)
            echo.sendall(token.encode() + b"\n")
        except TimeoutError:
            print("timeout send", flush=True)
            continue
        try:
            while read_line(deadline) != token:
                pass  # echo of an earlier, stuck ping
            print("ok", token, f"{time.monotonic() - t0:.3f}", flush=True)
        except TimeoutError:
            print("timeout recv", flush=True)
        except (OSError, EOFError) as e:
            print("error", repr(e), flush=True)
    elif parts[0] == "flood":
        sink.settimeout(float(parts[1]))
        chunk, sent = b"x" * 65536, 0
        try:
            while sent < 256 << 20:
                sent += sink.send(chunk)
            print("sent", sent, flush=True)
        except TimeoutError:
            print("timeout send", sent, flush=True)
"""


class Lines:
    """Line reader over a child's stdout with per-read timeouts."""

    def __init__(self, stream: IO[str]) -> None:
        self._q: queue.Queue[str | None] = queue.Queue()
        self._t = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._t.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._q.put(line.rstrip("\n"))
        except (OSError, ValueError):
            pass  # pipe closed by fleet teardown
        self._q.put(None)

    def get(self, timeout: float) -> str:
        """Next line, or fail the test after ``timeout`` seconds / on EOF."""
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output within {timeout}s")
        if line is None:
            pytest.fail("child exited")
        return line


@pytest.fixture(autouse=True)
def _need_netns() -> None:
    ok, why = available()
    if not ok:
        pytest.skip(why)


@pytest.fixture(scope="module", autouse=True)
def _no_stale() -> Iterator[None]:
    cleanup_stale()
    yield


def _timing(name: str, seconds: float) -> None:
    print(f"\nFLEET-TIMING {name}: {seconds * 1000:.1f} ms")


def _start_server(fleet: Fleet, host: str, ident: str) -> tuple[subprocess.Popen[Any], Lines]:
    proc = fleet.popen(
        host,
        [sys.executable, "-c", SERVER, fleet.addr(host), str(ECHO_PORT), str(SINK_PORT), ident],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    assert lines.get(10) == "listening"
    return proc, lines


def _client(
    fleet: Fleet, host: str, target: str, payload: str, timeout: float
) -> tuple[str, float]:
    res = fleet.run(
        host,
        [sys.executable, "-c", CLIENT, target, str(ECHO_PORT), payload, str(timeout)],
        timeout=timeout + 20,
        check=True,
    )
    verdict, elapsed = res.stdout.strip().splitlines()
    return verdict, float(elapsed)


def _ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def _paths_into_fleet(fleet: Fleet) -> list[str]:
    """Everything in the caller's namespace that could carry traffic into the fleet."""
    subnet = ipaddress.ip_network(fleet.subnet)
    fleet_ids = {
        e["id"] for e in _ip_json("netns", "list") if e["name"] in fleet.namespaces and "id" in e
    }
    found = []
    links = _ip_json("-d", "link", "show")
    wired = {ln["ifname"] for ln in links if ln.get("link_netnsid") in fleet_ids}
    found += [f"link {name} leads into the fleet" for name in sorted(wired)]
    for ln in _ip_json("-4", "addr", "show"):
        for a in ln.get("addr_info", []):
            if ipaddress.ip_address(a["local"]) in subnet:
                found.append(f"address {a['local']} on {ln['ifname']}")
    for r in _ip_json("-4", "route", "show", "table", "all"):
        dst = r.get("dst", "default")
        if dst != "default" and ipaddress.ip_network(dst, strict=False).overlaps(subnet):
            found.append(f"route {r}")
    for host in fleet.hosts:
        (r,) = _ip_json("-4", "route", "get", fleet.addr(host))
        if r.get("type") == "local" or r.get("dev") in wired:
            found.append(f"route get {fleet.addr(host)}: {r}")
    return found


def _netns_ids(names: tuple[str, ...]) -> set[tuple[int, int]]:
    ids = set()
    for name in names:
        st = os.stat(f"/run/netns/{name}")
        ids.add((st.st_dev, st.st_ino))
    return ids


def _pids_in(ids: set[tuple[int, int]]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ids:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """True unless the pid is gone or a zombie (pid 1 here may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _netns_list() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout


def test_echo_cut_restore_isolation_cleanup() -> None:
    t0 = time.perf_counter()
    fleet = Fleet(["srv", "c1", "c2"])
    with fleet:
        _timing("create 3 hosts", time.perf_counter() - t0)
        ids = _netns_ids(fleet.namespaces)
        listed = _netns_list()
        assert all(ns in listed for ns in fleet.namespaces)
        srv_addr = fleet.addr("srv")
        assert len({fleet.addr(h) for h in fleet.hosts}) == 3
        assert ipaddress.ip_address(srv_addr) in ipaddress.ip_network(fleet.subnet)

        server, _ = _start_server(fleet, "srv", "srv")
        for host in ("c1", "c2"):
            assert (
                _client(fleet, host, srv_addr, f"hi-from-{host}", 5)[0] == f"ok srv hi-from-{host}"
            )

        # Loopback inside a namespace, IPv4 and IPv6.
        loop = fleet.run(
            "c1",
            [
                sys.executable,
                "-c",
                "import socket\n"
                "for fam, a in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):\n"
                "    srv = socket.create_server((a, 0), family=fam)\n"
                "    c = socket.create_connection(srv.getsockname()[:2], timeout=2)\n"
                "    s, _ = srv.accept(); c.sendall(b'x'); assert s.recv(1) == b'x'\n"
                "print('loopback ok')",
            ],
            timeout=10,
            check=True,
        )
        assert loop.stdout.strip() == "loopback ok"

        session = fleet.popen(
            "c2",
            [sys.executable, "-c", SESSION, srv_addr, str(ECHO_PORT), str(SINK_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert session.stdin is not None and session.stdout is not None
        out = Lines(session.stdout)

        def cmd(line: str, timeout: float) -> str:
            assert session.stdin is not None
            session.stdin.write(line + "\n")
            session.stdin.flush()
            return out.get(timeout)

        assert out.get(10) == "connected HELLO srv"
        assert cmd("ping before 5", 10).startswith("ok before")

        t = time.perf_counter()
        fleet.cut("srv")
        _timing("cut", time.perf_counter() - t)
        assert fleet.is_cut("srv")

        verdict, elapsed = _client(fleet, "c1", srv_addr, "during-cut", 2)
        assert verdict == "timeout", f"new connect during cut: {verdict}"
        assert 1.9 <= elapsed < 4, elapsed
        _timing("new connect during cut gave up after", elapsed)
        assert cmd("ping during 2", 10) == "timeout recv"
        flood = cmd("flood 2", 60).split()
        assert flood[:2] == ["timeout", "send"], flood
        mb = int(flood[2]) / 1e6
        print(f"\nFLEET-INFO established conn accepted {mb:.2f} MB before send() blocked")
        # The cut host still reaches itself: local traffic never touches the switch.
        assert _client(fleet, "srv", srv_addr, "self", 2)[0] == "ok srv self"

        t = time.perf_counter()
        fleet.restore("srv")
        _timing("restore", time.perf_counter() - t)
        assert not fleet.is_cut("srv")

        verdict, elapsed = _client(fleet, "c1", srv_addr, "after-restore", 5)
        assert verdict == "ok srv after-restore"
        _timing("first new connect after restore", elapsed)
        recovered = cmd("ping after 30", 40).split()
        assert recovered[:2] == ["ok", "after"], recovered
        _timing(
            "established conn recovered after restore (retransmit backoff)", float(recovered[2])
        )
        assert cmd("ping again 5", 10).startswith("ok again")

        # Isolation, checked without sending from the caller's namespace: a packet
        # from there to a fleet address would leave through the machine's uplink.
        assert _paths_into_fleet(fleet) == []
        # And the fleet has no path out: no route, so nothing is even sent.
        main_addrs = re.findall(
            r"inet (\d+\.\d+\.\d+\.\d+)",
            subprocess.run(
                ["ip", "-4", "-o", "addr", "show", "scope", "global"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout,
        )
        for target in [*main_addrs, "203.0.113.1"]:
            verdict, elapsed = _client(fleet, "c1", target, "escape", 2)
            assert verdict == "error ENETUNREACH", (target, verdict)
            assert elapsed < 0.5

        t = time.perf_counter()
    _timing("teardown (incl. killing 2 processes)", time.perf_counter() - t)
    _timing("teardown as measured by Fleet", fleet.timings["teardown"])

    listed = _netns_list()
    assert not [ns for ns in fleet.namespaces if ns in listed]
    assert fleet.run_id not in listed
    assert server.returncode is not None and session.returncode is not None
    assert _pids_in(ids) == []


def test_cleanup_after_error_kills_whole_tree() -> None:
    spawner = (
        "import subprocess, sys, time\n"
        "a = subprocess.Popen(['sleep', '300'])\n"
        "b = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"  # escapes the group
        "print(a.pid, b.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    fleet = Fleet(["solo"])
    with pytest.raises(RuntimeError, match="boom"), fleet:
        ids = _netns_ids(fleet.namespaces)
        proc = fleet.popen(
            "solo", [sys.executable, "-c", spawner], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        kids = [int(p) for p in Lines(proc.stdout).get(10).split()]
        assert all(_alive(p) for p in [proc.pid, *kids])
        raise RuntimeError("boom")
    assert not any(_alive(p) for p in [proc.pid, *kids])
    assert _pids_in(ids) == []
    assert not [ns for ns in fleet.namespaces if ns in _netns_list()]


def test_run_timeout_and_misuse() -> None:
    with Fleet(["solo"]) as fleet:
        t = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            fleet.run("solo", ["sh", "-c", "sleep 30 & sleep 30"], timeout=0.5)
        assert time.monotonic() - t < 3, "the backgrounded sleep must die with its group"
        with pytest.raises(subprocess.CalledProcessError):
            fleet.run("solo", ["false"], check=True)
        with pytest.raises(KeyError):
            fleet.addr("nope")
        with pytest.raises(ValueError):
            fleet.popen("solo", ["true"], start_new_session=False)
    with pytest.raises(RuntimeError):
        fleet.cut("solo")
    with pytest.raises(ValueError):
        Fleet(["a", "a"])


def test_parallel_fleets_do_not_collide() -> None:
    with Fleet(["srv", "cli"]) as a, Fleet(["srv", "cli"]) as b:
        assert a.addr("srv") == b.addr("srv")
        assert not set(a.namespaces) & set(b.namespaces)
        _start_server(a, "srv", "A")
        _start_server(b, "srv", "B")
        assert _client(a, "cli", a.addr("srv"), "x", 5)[0] == "ok A x"
        assert _client(b, "cli", b.addr("srv"), "x", 5)[0] == "ok B x"
        a.cut("srv")
        assert _client(b, "cli", b.addr("srv"), "y", 5)[0] == "ok B y"
        assert _client(a, "cli", a.addr("srv"), "y", 1)[0] == "timeout"


def test_cleanup_stale_after_crash() -> None:
    # Own prefix per pytest process: a concurrent run's cleanup_stale() would
    # rightly remove this test's deliberately crashed fleet.
    prefix = f"fleetcrash{os.getpid()}-"
    crasher = (
        "import importlib.util, os, signal, subprocess, sys\n"
        "spec = importlib.util.spec_from_file_location('fleet_netns_child', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "f = mod.Fleet(['x', 'y'], prefix=sys.argv[2]).start()\n"
        "p = f.popen('x', ['sleep', '300'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(f.run_id, p.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    netns_py = os.path.join(os.path.dirname(__file__), "netns.py")
    res = subprocess.run(
        [sys.executable, "-c", crasher, netns_py, prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == -9, res.stderr
    run_id, orphan = res.stdout.split()
    leftovers = tuple(n for n in _netns_list().split() if n.startswith(run_id))
    assert len(leftovers) == 3
    assert _alive(int(orphan))
    ids = _netns_ids(leftovers)

    with Fleet(["live"], prefix=prefix) as live:
        removed = cleanup_stale(prefix)
        assert sorted(removed) == sorted(leftovers)
        listed = _netns_list()
        assert all(ns in listed for ns in live.namespaces), "a live fleet was removed"
    assert not _alive(int(orphan))
    assert _pids_in(ids) == []
    assert not [n for n in _netns_list().split() if n.startswith(prefix)]
