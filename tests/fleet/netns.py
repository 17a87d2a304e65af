"""A "fleet on one machine": network namespaces wired to a private switch.

Topology.  Nothing is added to, or changed in, the caller's own network
namespace; the only trace there is the namespace names under ``/run/netns``::

    <run>-switch   lo, br0 (Linux bridge, STP off) with ports p0, p1, p2 ...
                          |    |    |      veth pairs
    <run>-h-<host> lo + eth0   eth0 eth0   198.18.0.2/24, .3, .4 ... (one per host)

``<run>`` is ``<prefix><owner pid>-<random hex>``, so parallel runs never
collide and :func:`cleanup_stale` can tell leftovers of dead runs from live
fleets.  Hosts have no default route: anything not in the fleet subnet fails
with ``ENETUNREACH`` without a packet being sent, and the caller's namespace
has no route into the fleet.  198.18.0.0/15 is the benchmarking range
(RFC 2544), so it never clashes with real networks.

Cutting a host (:meth:`Fleet.cut`) puts its bridge port into the ``disabled``
port state (``bridge link set dev pN state 0``).  The bridge then silently
drops every frame to and from that port; carrier stays up on both veth ends,
nothing is signalled to anyone.  Every host also gets permanent ARP entries for
all other hosts (``static_arp=True``), so a peer never learns about the cut
through failed ARP resolution either.  What peers (and the cut host) observe:

* established TCP connection: ``send()`` keeps succeeding until the socket send
  buffer is full (tens of KB on a connection that was idle, up to a few MB on a
  busy one), then blocks; ``recv()`` blocks.  The kernel retransmits with
  exponential backoff (RTO 200 ms, doubling) and receives neither RST nor ICMP.
  Without an application deadline, keepalive or ``TCP_USER_TIMEOUT`` the
  connection only dies after ``tcp_retries2`` (15, roughly 15 minutes) with
  ``ETIMEDOUT``.
* new ``connect()``: the SYN vanishes; connect blocks until the caller's own
  timeout, or the kernel gives up after ``tcp_syn_retries`` (6, about 127 s)
  with ``ETIMEDOUT``.  Never ``ECONNREFUSED``.
* UDP datagrams vanish.  Traffic of the cut host to itself (its loopback and its
  own fleet address) keeps working, as on a real host with a dead uplink.
* after :meth:`Fleet.restore`: new connections work at once; an established
  connection resumes at its next retransmission, which after a long cut can be
  a backed-off RTO (seconds) later.

Why this method and not another:

* ``tc qdisc ... netem loss 100%`` needs ``sch_netem`` and a ``tc ... action
  drop`` filter needs ``act_gact``; kernels built without them (as the one this
  was developed on) have no way to load them.  nftables/iptables need extra
  userland that is not necessarily installed.
* ``ip link set pN down`` on the bridge side also blackholes, but the cut host
  sees its carrier drop (``NO-CARRIER``) and the bridge flushes its FDB; a real
  partition (a dead switch or a dropping firewall) is usually invisible.
* port state ``blocking`` (4) cannot be used: with STP off the kernel moves the
  port straight back to ``forwarding``.  ``disabled`` (0) sticks.
* Without static ARP, a peer whose ARP entry for the cut host has expired gets
  ``EHOSTUNREACH`` on connect after about 3 s of unanswered ARP probes (what a
  flat LAN really does).  Pass ``static_arp=False`` to get that behaviour.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SUBNET",
    "Fleet",
    "FleetError",
    "available",
    "cleanup_stale",
]

DEFAULT_PREFIX = "fleet-"
DEFAULT_SUBNET = "198.18.0.0/24"

_NETNS_DIR = "/run/netns"
_BRIDGE = "br0"
_HOST_IF = "eth0"
_PORT_DISABLED = 0
_PORT_FORWARDING = 3
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,24}$")
_TOOL_TIMEOUT = 30.0

_available_result: tuple[bool, str] | None = None
_available_lock = threading.Lock()


class FleetError(RuntimeError):
    """Raised when setting up, changing or tearing down a fleet fails."""


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise FleetError(f"{name!r} not found (install iproute2)")
    return path


def _check(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if proc.returncode != 0:
        cmd = " ".join(str(a) for a in proc.args)
        raise FleetError(f"{cmd} failed (rc={proc.returncode}): {proc.stderr.strip()}")
    return proc


def _run_tool(argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=_TOOL_TIMEOUT,
        check=False,
    )
    return _check(proc)


def _run_many(
    cmds: Sequence[tuple[list[str], str | None]],
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent tool invocations concurrently; raise if any failed."""
    procs = [
        subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if inp is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv, inp in cmds
    ]
    results: list[subprocess.CompletedProcess[str]] = []
    try:
        for (argv, inp), proc in zip(cmds, procs, strict=True):
            out, err = proc.communicate(inp, timeout=_TOOL_TIMEOUT)
            results.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for res in results:
        _check(res)
    return results


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(_NETNS_DIR))
    except FileNotFoundError:
        return []


def _netns_ids(names: Sequence[str]) -> set[tuple[int, int]]:
    ids: set[tuple[int, int]] = set()
    for name in names:
        try:
            st = os.stat(os.path.join(_NETNS_DIR, name))
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def _pids_in(ids: set[tuple[int, int]]) -> list[int]:
    # Same test as `ip netns pids`, but one /proc scan for all namespaces.
    pids: list[int] = []
    if not ids:
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # exited, zombie or kernel thread
        if (st.st_dev, st.st_ino) in ids:
            pids.append(int(entry))
    return pids


def _kill_netns_processes(names: Sequence[str], timeout: float = 5.0) -> list[int]:
    """SIGKILL every process inside the given namespaces; return survivors.

    This catches what process-group killing misses: daemons that called
    setsid(), or processes started by someone else via ``ip netns exec``.
    """
    ids = _netns_ids(names)
    deadline = time.monotonic() + timeout
    while True:
        victims = _pids_in(ids)
        if not victims or time.monotonic() > deadline:
            return victims
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _delete_netns(names: Sequence[str]) -> list[str]:
    """Delete namespaces by name; return the names that still exist."""
    present = set(_list_netns())
    todo = [n for n in names if n in present]
    if todo:
        # -force: keep going past a failed line so one bad entry does not leak the rest.
        subprocess.run(
            [_tool("ip"), "-force", "-batch", "-"],
            input="".join(f"netns del {n}\n" for n in todo),
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT,
            check=False,
        )
    remaining = set(_list_netns())
    return [n for n in todo if n in remaining]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _validate_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"bad namespace prefix {prefix!r} (want 1-24 of [A-Za-z0-9_.-])")


def available() -> tuple[bool, str]:
    """Tell whether fleets can be built here: ``(ok, reason)``.

    Checks for Linux, root, ``ip``/``bridge`` and then really creates (and
    deletes) a namespace with a bridge, a veth pair and a disabled port, so
    a missing kernel feature is reported instead of failing mid-test.  The
    result is cached for the life of the process.
    """
    global _available_result
    with _available_lock:
        if _available_result is None:
            _available_result = _probe()
        return _available_result


def _probe() -> tuple[bool, str]:
    if not os.path.isdir("/proc/self/ns"):
        return False, "not Linux (no /proc/self/ns)"
    if os.geteuid() != 0:
        return False, "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    try:
        ip, bridge = _tool("ip"), _tool("bridge")
    except FleetError as exc:
        return False, str(exc)
    name = f"{DEFAULT_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _run_tool([ip, "netns", "add", name])
        _run_tool(
            [ip, "-n", name, "-batch", "-"],
            input=(
                "link set dev lo up\n"
                f"link add {_BRIDGE} type bridge stp_state 0\n"
                f"link set dev {_BRIDGE} up\n"
                "link add v0 type veth peer name v1\n"
                f"link set dev v0 master {_BRIDGE}\n"
                "link set dev v0 up\n"
                "link set dev v1 up\n"
            ),
        )
        _run_tool([bridge, "-n", name, "link", "set", "dev", "v0", "state", str(_PORT_DISABLED)])
    except (FleetError, OSError, subprocess.SubprocessError) as exc:
        return False, f"cannot build a test network here: {exc}"
    finally:
        _kill_netns_processes([name])
        _delete_netns([name])
    return True, f"network namespaces available ({ip})"


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, force: bool = False) -> list[str]:
    """Remove namespaces (and processes in them) left by crashed earlier runs.

    Only namespaces named ``<prefix><pid>-...`` whose owner pid is no longer
    alive are removed, so fleets of concurrently running tests are left alone.
    ``force=True`` removes every namespace starting with ``prefix``, including
    live fleets of this and other processes.  Returns the removed names.
    """
    _validate_prefix(prefix)
    stale: list[str] = []
    for name in _list_netns():
        if not name.startswith(prefix):
            continue
        owner = name[len(prefix) :].split("-", 1)[0]
        if force or (owner.isdigit() and int(owner) != os.getpid() and not _pid_alive(int(owner))):
            stale.append(name)
    if stale:
        _kill_netns_processes(stale)
        left = _delete_netns(stale)
        if left:
            raise FleetError(f"could not delete stale namespaces: {left}")
    return stale


def _exited(proc: subprocess.Popen[Any]) -> bool:
    # WNOWAIT leaves the zombie in place: while it is unreaped its pid cannot be
    # reused, so a later killpg(pid) cannot hit an unrelated process group.
    try:
        res = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return res is not None


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    if proc.returncode is not None:
        return  # already reaped: the pgid may have been recycled
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _close_pipes(proc: subprocess.Popen[Any]) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


class Fleet:
    """N hosts, each its own network namespace, on one private switch.

    Use as a context manager (or call :meth:`start` and :meth:`close`)::

        with Fleet(["sched", "agent1", "agent2"]) as fleet:
            srv = fleet.popen("sched", ["python3", "-m", "mysrv", fleet.addr("sched")])
            fleet.run("agent1", ["python3", "-c", "..."], timeout=10)
            fleet.cut("sched")
            ...
            fleet.restore("sched")

    On exit every process started through the fleet is killed (whole process
    group, SIGTERM then SIGKILL after ``kill_grace`` seconds), then anything
    else still running inside the namespaces is SIGKILLed, and the namespaces
    are deleted.  This also happens when :meth:`start` fails half-way, and at
    interpreter exit if the fleet was never closed.
    """

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        subnet: str = DEFAULT_SUBNET,
        prefix: str = DEFAULT_PREFIX,
        static_arp: bool = True,
        kill_grace: float = 2.0,
        ready_timeout: float = 10.0,
    ) -> None:
        """Describe a fleet; nothing is created before :meth:`start`.

        ``hosts`` are short names (``[A-Za-z0-9][A-Za-z0-9_.-]*``, max 32).
        Host ``i`` gets the ``i+2``-th address of ``subnet`` (``.1`` is left
        free).  ``static_arp`` pins ARP entries so a cut is a pure blackhole
        (see module docstring).
        """
        _validate_prefix(prefix)
        if isinstance(hosts, str):
            raise TypeError("hosts must be a sequence of names, not a string")
        names = list(hosts)
        if not names:
            raise ValueError("a fleet needs at least one host")
        for name in names:
            if not _HOST_RE.match(name):
                raise ValueError(f"bad host name {name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in {names}")
        net = ipaddress.IPv4Network(subnet)
        if net.num_addresses - 3 < len(names):
            raise ValueError(f"subnet {subnet} too small for {len(names)} hosts")

        self.run_id = f"{prefix}{os.getpid()}-{secrets.token_hex(3)}"
        self.static_arp = static_arp
        self.kill_grace = kill_grace
        self.ready_timeout = ready_timeout
        self.timings: dict[str, float] = {}
        self._net = net
        self._hosts = tuple(names)
        self._switch_ns = f"{self.run_id}-switch"
        self._host_ns = {h: f"{self.run_id}-h-{h}" for h in names}
        self._addr = {h: str(net.network_address + 2 + i) for i, h in enumerate(names)}
        self._mac = {
            h: f"02:66:6c:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
            for i, h in enumerate(names)
        }
        self._port = {h: f"p{i}" for i, h in enumerate(names)}
        self._cut: set[str] = set()
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return f"Fleet({self.run_id!r}, hosts={list(self._hosts)}, {state})"

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Fleet:
        """Create namespaces, switch and links; return once every link is up."""
        if self._started:
            raise FleetError("fleet already started")
        self._started = True
        atexit.register(self.close)
        t0 = time.perf_counter()
        try:
            self._create()
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self.timings["create"] = time.perf_counter() - t0
        return self

    def close(self) -> None:
        """Kill all processes and delete all namespaces.  Idempotent.

        Raises :class:`FleetError` if something could not be removed.
        """
        with self._lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
            procs, self._procs = self._procs, []
        t0 = time.perf_counter()
        problems: list[str] = []
        try:
            problems += self._terminate(procs)
        except Exception as exc:  # cleanup must go on whatever happens
            problems.append(f"terminating processes: {exc!r}")
        ours = self.namespaces
        try:
            survivors = _kill_netns_processes(ours)
            if survivors:
                problems.append(f"processes survived SIGKILL: {survivors}")
        except Exception as exc:
            problems.append(f"killing namespace processes: {exc!r}")
        # Only now: closing a pipe blocks while another thread reads it, and an
        # escaped grandchild (killed just above) may have been holding it open.
        for p in procs:
            _close_pipes(p)
        try:
            left = _delete_netns(ours)
            if left:
                problems.append(f"namespaces not deleted: {left}")
        except Exception as exc:
            problems.append(f"deleting namespaces: {exc!r}")
        atexit.unregister(self.close)
        self.timings["teardown"] = time.perf_counter() - t0
        if problems:
            raise FleetError(f"fleet {self.run_id} cleanup incomplete: " + "; ".join(problems))

    def _create(self) -> None:
        ip = _tool("ip")
        sw = self._switch_ns
        # veths are created directly inside their target namespaces, so no
        # name ever appears in (or clashes with) the caller's namespace.
        lines = [f"netns add {sw}"]
        lines += [f"netns add {self._host_ns[h]}" for h in self._hosts]
        lines += [
            f"link add {self._port[h]} netns {sw} type veth"
            f" peer name {_HOST_IF} netns {self._host_ns[h]} address {self._mac[h]}"
            for h in self._hosts
        ]
        _run_tool([ip, "-batch", "-"], input="".join(f"{line}\n" for line in lines))

        # addrgenmode none: no IPv6 link-local, hence no DAD/RS/MLD chatter on the switch.
        sw_lines = [
            "link set dev lo up",
            f"link add {_BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            f"link set dev {_BRIDGE} addrgenmode none",
            f"link set dev {_BRIDGE} up",
        ]
        for h in self._hosts:
            port = self._port[h]
            sw_lines += [
                f"link set dev {port} addrgenmode none",
                f"link set dev {port} master {_BRIDGE}",
                f"link set dev {port} up",
            ]
        cmds: list[tuple[list[str], str | None]] = [
            ([ip, "-n", sw, "-batch", "-"], "".join(f"{line}\n" for line in sw_lines))
        ]
        plen = self._net.prefixlen
        for h in self._hosts:
            h_lines = [
                "link set dev lo up",
                f"link set dev {_HOST_IF} addrgenmode none",
                f"addr add {self._addr[h]}/{plen} dev {_HOST_IF}",
                f"link set dev {_HOST_IF} up",
            ]
            if self.static_arp:
                h_lines += [
                    f"neigh replace {self._addr[o]} lladdr {self._mac[o]}"
                    f" dev {_HOST_IF} nud permanent"
                    for o in self._hosts
                    if o != h
                ]
            cmds.append(
                (
                    [ip, "-n", self._host_ns[h], "-batch", "-"],
                    "".join(f"{line}\n" for line in h_lines),
                )
            )
        _run_many(cmds)

    def _wait_ready(self) -> None:
        # Packets sent before linkwatch has attached the qdisc are dropped, which
        # would add a 1 s SYN retransmit to the first connect; wait it out.
        ip = _tool("ip")
        want_sw = {self._port[h] for h in self._hosts}
        cmds: list[tuple[list[str], str | None]] = [
            ([ip, "-j", "-n", self._switch_ns, "link", "show"], None)
        ]
        cmds += [
            ([ip, "-j", "-n", self._host_ns[h], "link", "show", "dev", _HOST_IF], None)
            for h in self._hosts
        ]
        deadline = time.monotonic() + self.ready_timeout
        while True:
            results = _run_many(cmds)
            up_sw = {
                d["ifname"] for d in json.loads(results[0].stdout) if d.get("operstate") == "UP"
            }
            hosts_up = all(json.loads(r.stdout)[0].get("operstate") == "UP" for r in results[1:])
            if want_sw <= up_sw and hosts_up:
                return
            if time.monotonic() > deadline:
                raise FleetError(
                    f"links not up after {self.ready_timeout}s: switch up={sorted(up_sw)}"
                )
            time.sleep(0.01)

    def _terminate(self, procs: Sequence[subprocess.Popen[Any]]) -> list[str]:
        problems: list[str] = []
        live = [p for p in procs if p.returncode is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        pending = list(live)
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if not _exited(p)]
            if pending:
                time.sleep(0.01)
        for p in live:
            # Also for leaders that exited on SIGTERM: their children may not have.
            _signal_group(p, signal.SIGKILL)
        for p in live:
            try:
                p.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {p.pid} did not die")
        return problems

    # -- topology ------------------------------------------------------------

    @property
    def hosts(self) -> tuple[str, ...]:
        """Host names in creation order."""
        return self._hosts

    @property
    def switch_netns(self) -> str:
        """Name of the namespace holding the bridge."""
        return self._switch_ns

    @property
    def namespaces(self) -> tuple[str, ...]:
        """All namespace names of this fleet (switch first)."""
        return (self._switch_ns, *(self._host_ns[h] for h in self._hosts))

    @property
    def subnet(self) -> str:
        """The fleet subnet in CIDR notation."""
        return str(self._net)

    def netns(self, host: str) -> str:
        """Namespace name of ``host`` (usable with ``ip netns exec``)."""
        return self._host_ns[self._known(host)]

    def addr(self, host: str) -> str:
        """IPv4 address of ``host`` on the fleet switch."""
        return self._addr[self._known(host)]

    def _known(self, host: str) -> str:
        if host not in self._host_ns:
            raise KeyError(f"unknown host {host!r}; fleet has {list(self._hosts)}")
        return host

    def _check_running(self) -> None:
        if not self._started or self._closed:
            raise FleetError(f"{self!r} is not running")

    # -- faults --------------------------------------------------------------

    def cut(self, host: str) -> None:
        """Blackhole ``host``: all its frames silently vanish in the switch.

        See the module docstring for what peers observe.  Idempotent.
        """
        self._set_port_state(host, _PORT_DISABLED)
        self._cut.add(host)

    def restore(self, host: str) -> None:
        """Reconnect a host cut by :meth:`cut`.  Idempotent."""
        self._set_port_state(host, _PORT_FORWARDING)
        self._cut.discard(host)

    def is_cut(self, host: str) -> bool:
        """Whether ``host`` is currently cut off."""
        return self._known(host) in self._cut

    def _set_port_state(self, host: str, state: int) -> None:
        self._check_running()
        port = self._port[self._known(host)]
        # `bridge link`, not `ip link set ... type bridge_slave state N`: with
        # iproute2 6.1 the latter exits 0 but leaves the port forwarding.
        _run_tool(
            [
                _tool("bridge"),
                "-n",
                self._switch_ns,
                "link",
                "set",
                "dev",
                port,
                "state",
                str(state),
            ]
        )

    # -- processes -----------------------------------------------------------

    def popen(
        self, host: str, argv: Sequence[str | os.PathLike[str]], **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host`` (``ip netns exec``); the fleet owns it.

        ``popen_kwargs`` go to :class:`subprocess.Popen`.  The process always
        gets its own session/process group, so the whole group can be killed
        when the fleet closes; its pipes are closed then too.
        """
        if popen_kwargs.get("start_new_session", True) is False or "process_group" in popen_kwargs:
            raise ValueError("fleet processes always run in their own session")
        popen_kwargs["start_new_session"] = True
        ns = self.netns(host)
        full = [_tool("ip"), "netns", "exec", ns, *(os.fspath(a) for a in argv)]
        with self._lock:
            self._check_running()
            proc: subprocess.Popen[Any] = subprocess.Popen(full, **popen_kwargs)
            self._procs.append(proc)
        return proc

    def run(
        self,
        host: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        timeout: float = 30.0,
        check: bool = False,
        input: str | bytes | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside ``host`` to completion, like :func:`subprocess.run`.

        Output is captured as text unless ``popen_kwargs`` say otherwise.  On
        ``timeout`` the whole process group is SIGKILLed and
        :class:`subprocess.TimeoutExpired` is raised; with ``check`` a non-zero
        exit raises :class:`subprocess.CalledProcessError`.
        """
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
        if input is not None:
            popen_kwargs["stdin"] = subprocess.PIPE
        else:
            popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        if not any(k in popen_kwargs for k in ("text", "universal_newlines", "encoding", "errors")):
            popen_kwargs["text"] = True
        proc = self.popen(host, argv, **popen_kwargs)
        try:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                try:
                    out, err = proc.communicate(timeout=5.0)
                except subprocess.TimeoutExpired:
                    out, err = None, None  # an escaped grandchild holds the pipe
                raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
            except BaseException:
                _signal_group(proc, signal.SIGKILL)
                raise
        finally:
            if proc.returncode is None and _exited(proc):
                proc.wait()
            if proc.returncode is not None:
                with self._lock:
                    if proc in self._procs:
                        self._procs.remove(proc)
                _close_pipes(proc)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result
