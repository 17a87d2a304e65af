"""How a measurement is run: client processes, the window, the CPU around it.

:class:`Driver` starts ``bench.load`` processes against a target's
``client_spec()``, waits until every one is connected, tells them all when
to start, when the warm-up ends and when to stop, samples the server's and
the machine's CPU over exactly that window, and collects their raw
timings. Turning timings into records is the workloads' business.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.interp import Interpreter, env

MAX_CLIENT_PROCS = 4


@dataclass
class Window:
    """CPU of the server process and the machine over a measurement window."""

    wall: float = 0.0
    server: procstat.ProcCPU = field(default_factory=lambda: procstat.ProcCPU(0, 0))
    machine_busy: float = 0.0
    threads: dict[str, float] = field(default_factory=dict)
    server_known: bool = True
    helpers_s: float = 0.0  # of ``server.self_s``: its long-lived child processes' own CPU


class Sampler:
    """Samples a process's CPU (if its pid is known) and the machine's, begin to end.

    The server's CPU includes its child processes that live through the whole
    window (the agent's job spawner): their own CPU counts as the server's,
    and the jobs they reaped as the jobs'. Children that come and go inside
    the window (the jobs themselves) are counted once reaped, as the reaper's
    ``cutime + cstime``.
    """

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.t0 = 0.0
        self.a0 = procstat.ProcCPU(0, 0)
        self.m0 = 0.0
        self.th0: dict[str, float] = {}
        self.h0: dict[int, procstat.ProcCPU] = {}

    def _proc(self) -> tuple[procstat.ProcCPU, dict[str, float], dict[int, procstat.ProcCPU]]:
        if self.pid is None:
            return procstat.ProcCPU(0, 0), {}, {}
        helpers = {}
        for child in procstat.children_of(self.pid):
            with contextlib.suppress(OSError):
                helpers[child] = procstat.proc_cpu(child)
        return procstat.proc_cpu(self.pid), procstat.thread_cpu(self.pid), helpers

    def begin(self) -> None:
        """Start of the window."""
        self.t0 = time.monotonic()
        self.a0, self.th0, self.h0 = self._proc()
        self.m0 = procstat.machine_cpu()[0]

    def end(self) -> Window:
        """End of the window: what was used since :meth:`begin`."""
        wall = time.monotonic() - self.t0
        a1, th1, h1 = self._proc()
        m1 = procstat.machine_cpu()[0]
        threads = {k: v - self.th0.get(k, 0.0) for k, v in th1.items()}
        server = a1 - self.a0
        helpers = 0.0
        for pid in h1.keys() & self.h0.keys():
            d = h1[pid] - self.h0[pid]
            helpers += d.self_s
            server = procstat.ProcCPU(server.self_s + d.self_s, server.children_s + d.children_s)
        if helpers > 0:
            threads["child processes (the spawner)"] = helpers
        return Window(
            wall,
            server,
            m1 - self.m0,
            {k: v for k, v in threads.items() if v > 0},
            self.pid is not None,
            helpers,
        )


def sleep_until(t: float) -> None:
    """Sleep until monotonic instant ``t``."""
    while (d := t - time.monotonic()) > 0:
        time.sleep(min(d, 0.5))


def layout(n: int) -> list[int]:
    """Threads per client process for ``n`` concurrent callers."""
    procs = min(n, MAX_CLIENT_PROCS)
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


def cpu_fields(win: Window, client_cpu: float) -> dict[str, Any]:
    """The CPU columns of a record, in cores used during the window."""
    w = win.wall or 1e-9
    other = win.machine_busy - win.server.self_s - win.server.children_s - client_cpu
    known = win.server_known
    return {
        "window_s": win.wall,
        "client_cpu_cores": client_cpu / w,
        "agent_cpu_cores": win.server.self_s / w if known else None,
        "agent_children_cpu_cores": win.helpers_s / w if known else None,
        "jobs_cpu_cores": win.server.children_s / w if known else None,
        "machine_busy_cores": win.machine_busy / w,
        "other_cpu_cores": max(0.0, other / w) if known else None,
    }


Results = tuple[list[dict[str, Any]], Window, float, float]


class Driver:
    """Starts client processes for one run and keeps track of them."""

    def __init__(self, interp: Interpreter, pythonpath: str, base: Path) -> None:
        self.interp = interp
        self.pythonpath = pythonpath
        self.base = base
        self.workers: list[subprocess.Popen[str]] = []

    def spawn(self, specs: list[dict[str, Any]]) -> list[subprocess.Popen[str]]:
        """One ``bench.load`` per spec, each connected and ``ready``."""
        procs = []
        log = open(self.base / "clients.log", "a")  # noqa: SIM115 - children own it
        try:
            for s in specs:
                p = subprocess.Popen(
                    [*self.interp.argv, "-m", "bench.load", json.dumps(s)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    cwd=str(self.base),
                    env=env(self.pythonpath, os.environ.get("HOME", "/")),
                )
                procs.append(p)
                self.workers.append(p)
        finally:
            log.close()
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(
                    f"a client process did not start (see {self.base}/clients.log): {line!r}"
                )
        return procs

    def drive(
        self,
        pid: int | None,
        specs: list[dict[str, Any]],
        *,
        warm: float,
        duration: float | None,
        before_go: Callable[[], dict[str, Any]] | None = None,
    ) -> Results:
        """Run client processes: ready, go, sample the window, collect.

        ``pid`` is the server whose CPU is sampled (None: not known).
        ``duration`` None: a counted run, the window lasts until every
        client has finished. Returns (results, window, warm_at, end_at).
        """
        procs = self.spawn(specs)
        go: dict[str, Any] = {}
        if before_go is not None:
            go.update(before_go())
        t_start = time.monotonic() + 0.1
        warm_at = t_start + warm
        limit = duration if duration is not None else 3600.0
        end_at = warm_at + limit
        go.update({"start": t_start, "warm": warm_at, "end": end_at, "counted": duration is None})
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go " + json.dumps(go) + "\n")
            p.stdin.close()
            p.stdin = None  # communicate() must not touch it again
        # Read every client's output while it runs: a result larger than a
        # pipe buffer must never block a client we are waiting for.
        outputs: list[str] = [""] * len(procs)

        def reader(i: int, p: subprocess.Popen[str]) -> None:
            try:
                outputs[i], _ = p.communicate(timeout=limit + 600)
            except subprocess.TimeoutExpired:
                p.kill()
                outputs[i], _ = p.communicate()

        readers = [
            threading.Thread(target=reader, args=(i, p), daemon=True) for i, p in enumerate(procs)
        ]
        for r in readers:
            r.start()
        sampler = Sampler(pid)
        sleep_until(warm_at)
        sampler.begin()
        if duration is not None:
            sleep_until(end_at)
        else:
            while any(r.is_alive() for r in readers) and time.monotonic() < end_at:
                time.sleep(0.02)
            end_at = time.monotonic()
        win = sampler.end()
        for r in readers:
            r.join(timeout=limit + 700)
        results = []
        for out in outputs:
            lines = [x for x in out.splitlines() if x.startswith("{")]
            if not lines:
                raise RuntimeError(f"a client process failed (see {self.base}/clients.log)")
            results.append(json.loads(lines[-1]))
        self.workers = [w for w in self.workers if w.poll() is None]
        return results, win, warm_at, end_at

    def kill_all(self) -> None:
        """Kill client processes still running (after a failure)."""
        for w in self.workers:
            if w.poll() is None:
                w.kill()
                w.wait(5)
        self.workers.clear()
