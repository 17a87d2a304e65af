"""The floor: starting and reaping /bin/true straight from Python, no agent.

Run as its own process (``python -m bench.floor N_SERIAL N_CONCURRENT
IN_FLIGHT [UID GID]``) with the agent's interpreter and user, so it pays
what the agent's own spawn would pay and nothing else. Prints one JSON
object: for each variant jobs/s and spawn-to-reap latency percentiles.

* serial: ``subprocess.Popen`` then ``wait()``, one at a time;
* concurrent: IN_FLIGHT children at once, each watched with a pidfd in
  epoll and reaped with ``os.wait4`` (exit status and rusage, as the agent
  does; the project's design notes, "Facts measured on these machines");
* serial_user_switch (only with UID GID, as root): serial, but the child
  switches user and drops supplementary groups like the agent's jobs do
  when it runs as root. CPython then has to fork() instead of vfork().

Standard library only (no gRPC in this process).
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import time
from typing import Any

from bench.procstat import percentile

PROGRAM = "/bin/true"


def _popen(switch: tuple[int, int] | None = None) -> subprocess.Popen[bytes]:
    kw: dict[str, Any] = {}
    if switch is not None:
        kw = {"user": switch[0], "group": switch[1], "extra_groups": []}
    return subprocess.Popen(
        [PROGRAM],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,
        **kw,
    )


def _cpu() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime


def _cpu_children() -> float:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def _summary(lat: list[float], wall: float, cpu: float, child_cpu: float) -> dict[str, Any]:
    ms = [x * 1000 for x in lat]
    return {
        "jobs": len(lat),
        "jobs_per_s": len(lat) / wall if wall > 0 else 0.0,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "wall_s": wall,
        "client_cpu_s": cpu,
        "client_cpu_cores": cpu / wall if wall > 0 else 0.0,
        "jobs_cpu_s": child_cpu,
    }


def serial(n: int, switch: tuple[int, int] | None = None) -> dict[str, Any]:
    """Popen + wait, one child at a time."""
    for _ in range(min(50, n)):  # warm-up: page in subprocess and the binary
        _popen(switch).wait()
    lat: list[float] = []
    c0, k0 = _cpu(), _cpu_children()
    t_begin = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        _popen(switch).wait()
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_begin
    return _summary(lat, wall, _cpu() - c0, _cpu_children() - k0)


def concurrent(n: int, in_flight: int) -> dict[str, Any]:
    """``in_flight`` children at a time; pidfd + epoll to learn of exits, wait4 to reap."""
    ep = select.epoll()
    running: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    lat: list[float] = []
    started = 0

    def spawn() -> None:
        nonlocal started
        t0 = time.perf_counter()
        p = _popen()
        fd = os.pidfd_open(p.pid)
        running[fd] = (p, t0)
        ep.register(fd, select.EPOLLIN)
        started += 1

    c0, k0 = _cpu(), _cpu_children()
    t_begin = time.perf_counter()
    try:
        while len(lat) < n:
            while len(running) < in_flight and started < n:
                spawn()
            for fd, _ in ep.poll(5.0):
                p, t0 = running.pop(fd)
                ep.unregister(fd)
                os.close(fd)
                _, status, _ru = os.wait4(p.pid, 0)
                lat.append(time.perf_counter() - t0)
                p.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    finally:
        ep.close()
    wall = time.perf_counter() - t_begin
    out = _summary(lat, wall, _cpu() - c0, _cpu_children() - k0)
    out["in_flight"] = in_flight
    return out


def main(argv: list[str]) -> int:
    """Entry point: ``N_SERIAL N_CONCURRENT IN_FLIGHT [UID GID]``."""
    n_serial, n_conc, in_flight = int(argv[0]), int(argv[1]), int(argv[2])
    switch = (int(argv[3]), int(argv[4])) if len(argv) >= 5 else None
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": os.path.realpath(sys.executable),
        "uid": os.getuid(),
        "serial": serial(n_serial),
        "concurrent": concurrent(n_conc, in_flight),
    }
    if switch is not None:
        out["serial_user_switch"] = serial(max(1, n_serial // 2), switch)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
