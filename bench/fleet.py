"""The ``fleet`` step: one reference scheduler against 100, 1,000, 10,000 stand-in workers.

``python -m bench --steps fleet [--fleet-sizes 100,1000,10000]`` (or
``python -m bench.fleet``) runs, for each size N, from scratch (new
certificates, a new SQLite store):

1. the scheduler (``agent-scheduler serve``, the installed package) and its
   idle RSS; then N stand-ins (:mod:`bench.standins`, at most
   ``--per-process`` per process) that register with it: the time until all
   are listed, and the scheduler's RSS then (and per worker, over idle);
   Each stand-in keeps a Link open (heartbeats on it, the scheduler's calls
   down it) unless ``--no-link`` (Heartbeat calls; the scheduler connects to it);
2. a fan-out of a trivial job to all N (``--select id:*``, no concurrency
   limit), followed to its end as ``agent-scheduler run`` does: per host the
   time from the run's start to the host's end (p50, p99, max) and the time
   to the last event the follower got;
3. a restart of the scheduler on its store (SIGTERM, start again): the time
   to serve (it loads N workers from SQLite) and until every worker's
   heartbeat was heard again;
4. a registration storm: a restart on an *empty* store, so every heartbeat
   answers ``known = false`` and all N stand-ins register again at once: the
   time until all are listed, and the RSS then.

Results: one JSON line per size on stdout, ``bench/results/fleet.json`` and
``bench/results/fleet.md`` (the table for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.client import SchedulerClient, TLSFiles
from bench.standins import raise_fd_limit

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 10  # the scheduler's default; --heartbeat to change
EXPIRE_FACTOR = 6  # expire_seconds = this many heartbeats


def note(msg: str) -> None:
    """Progress on stderr."""
    print(f"fleet: {msg}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free loopback TCP port (ephemeral range)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``xs``."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


class Scheduler:
    """An ``agent-scheduler serve`` process with a config in ``workdir``."""

    def __init__(self, workdir: Path, certs: Path, heartbeat: int = HEARTBEAT_S) -> None:
        """Configure (not start) a scheduler with ``certs`` (from gen_certs.sh)."""
        self.workdir = workdir
        self.certs = certs
        self.addr = f"127.0.0.1:{free_port()}"
        self.db = workdir / "state" / "scheduler.db"
        self.config = workdir / "scheduler.toml"
        c = certs
        self.config.write_text(
            f"""[server]
addr = "{self.addr}"
crt_file = "{c / "scheduler.crt"}"
key_file = "{c / "scheduler.key"}"
ca_file = "{c / "ca.crt"}"
[auth]
workers = ["agent"]
users = ["admin"]
[registry]
heartbeat_seconds = {heartbeat}
expire_seconds = {EXPIRE_FACTOR * heartbeat}
[agents]
crt_file = "{c / "scheduler.crt"}"
key_file = "{c / "scheduler.key"}"
ca_file = "{c / "ca.crt"}"
call_timeout_seconds = 30.0
[store]
sqlite_file = "{self.db}"
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = TLSFiles(ca=c / "ca.crt", cert=c / "admin.crt", key=c / "admin.key")

    @property
    def pid(self) -> int:
        """The running process's pid."""
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Start and wait until it answers; the seconds that took."""
        t0 = time.monotonic()
        log = open(self.workdir / "scheduler.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.scheduler.cli", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            cwd=self.workdir,
        )
        log.close()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"scheduler exited: see {self.workdir / 'scheduler.log'}")
            try:
                with self.client(2) as c:
                    c.workers()
                return time.monotonic() - t0
            except Exception:
                time.sleep(0.05)

    def client(self, timeout: float = 60) -> SchedulerClient:
        """An admin client."""
        return SchedulerClient(self.addr, self.tls, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class StandIns:
    """Processes of stand-ins (bench.standins), ``per_process`` in each."""

    def __init__(
        self, n: int, per_process: int, sched: Scheduler, port_base: int, link: bool = True
    ) -> None:
        """Configure (not start) ``n`` stand-ins for ``sched`` (``link``: each keeps a Link)."""
        self.link = link
        self.procs: list[subprocess.Popen[str]] = []
        self.counts = []
        left, base = n, port_base
        while left > 0:
            k = min(left, per_process)
            self.counts.append((k, base))
            base += k + 200  # room for ports someone else holds
            left -= k
        self.sched = sched

    def start(self) -> None:
        """Start every process and wait until all of them listen."""
        for k, base in self.counts:
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.standins",
                        "--count",
                        str(k),
                        "--scheduler",
                        self.sched.addr,
                        "--certs",
                        str(self.sched.certs),
                        "--port-base",
                        str(base),
                        *([] if self.link else ["--no-link"]),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                    env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
                )
            )
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"stand-ins did not start: {line!r}")
            # Drain stdout in the background so the pipe never fills.
            subprocess.Popen(["cat"], stdin=p.stdout, stdout=subprocess.DEVNULL)

    def rss_kib(self) -> int:
        """Their total RSS."""
        return sum(rss_kib(p.pid) for p in self.procs)

    def stop(self) -> None:
        """SIGTERM every process and wait."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_listed(sched: Scheduler, n: int, since: float, limit: float) -> tuple[float, float]:
    """Seconds from ``since`` (monotonic) until the scheduler first lists a worker heard
    from after ``since``, and until it lists ``n`` of them; raises past ``limit`` seconds."""
    wall_since = time.time() - (time.monotonic() - since)
    first = None
    with sched.client() as c:
        while True:
            ws = c.workers()
            fresh = sum(1 for w in ws if w.last_seen.timestamp() >= wall_since)
            now = time.monotonic() - since
            if fresh and first is None:
                first = now
            if fresh >= n:
                return first or now, now
            if now > limit:
                raise RuntimeError(f"only {fresh} of {n} workers after {limit:.0f} s")
            time.sleep(0.2 if n < 2000 else 1.0)  # listing 10,000 costs the scheduler


def fan_out(sched: Scheduler) -> dict[str, Any]:
    """A run of ``true`` on every worker, followed to its end; its figures."""
    from agent.client import RunInfo

    t0 = time.monotonic()
    cpu0 = cpu_s(sched.pid)
    with sched.client(600) as c:
        # Every host is tried whatever fails (a budget of 0 would stop at the first).
        run = c.start_run("id:*", "true", max_errors="100%")
        events = 0
        final = None
        for e in c.follow_run(run.run_id, timeout=600):
            events += 1
            if isinstance(e, RunInfo):
                final = e
    wall = time.monotonic() - t0
    assert final is not None and final.created_at is not None
    start = final.created_at.timestamp()
    per_host = [h.end_time.timestamp() - start for h in final.hosts if h.end_time is not None]
    errors: dict[str, int] = {}
    for h in final.hosts:
        if h.error_text:
            # One line, addresses folded, so that hosts failing alike count together.
            first = h.error_text.splitlines()[0]
            why = re.sub(r"127\.0\.0\.1:\d+", "ADDR", first)[:160]
            errors[why] = errors.get(why, 0) + 1
    return {
        "hosts": len(final.hosts),
        "summary": final.summary,
        "host_p50_s": round(percentile(per_host, 50), 3),
        "host_p99_s": round(percentile(per_host, 99), 3),
        "host_last_s": round(max(per_host), 3),
        "follow_wall_s": round(wall, 3),
        "events": events,
        "scheduler_cpu_s": round(cpu_s(sched.pid) - cpu0, 2),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }


def measure(n: int, args: argparse.Namespace, base: Path, certs: Path) -> dict[str, Any]:
    """Every figure for ``n`` stand-ins (see the module doc)."""
    work = base / f"n{n}"
    work.mkdir()
    hb = args.heartbeat
    sched = Scheduler(work, certs, hb)
    link = not args.no_link
    stand = StandIns(n, args.per_process, sched, args.port_base, link)
    rec: dict[str, Any] = {
        "workers": n,
        "processes": len(stand.counts),
        "heartbeat_s": hb,
        "link": link,
    }
    try:
        rec["start_s"] = round(sched.start(), 3)
        time.sleep(1)
        idle = rss_kib(sched.pid)
        rec["rss_idle_mib"] = round(idle / 1024, 1)
        note(f"{n}: scheduler idle {idle / 1024:.0f} MiB; starting stand-ins")
        t0 = time.monotonic()
        stand.start()
        rec["register_s"] = round(wait_listed(sched, n, t0, args.limit)[1], 2)
        time.sleep(2 * hb)  # a few heartbeats: the steady state
        rss = rss_kib(sched.pid)
        rec["rss_registered_mib"] = round(rss / 1024, 1)
        rec["rss_per_worker_kib"] = round((rss - idle) / n, 1)
        c0 = cpu_s(sched.pid)
        time.sleep(hb)
        rec["heartbeat_cpu_pct"] = round(100 * (cpu_s(sched.pid) - c0) / hb, 1)
        note(f"{n}: registered in {rec['register_s']} s, {rss / 1024:.0f} MiB; fan-out")
        rec["fanout"] = fan_out(sched)
        rec["rss_after_fanout_mib"] = round(rss_kib(sched.pid) / 1024, 1)
        note(f"{n}: fan-out {rec['fanout']}; restart on the store")
        rec["db_kib"] = round(sched.db.stat().st_size / 1024, 1)
        sched.stop()
        t0 = time.monotonic()
        rec["restart_serving_s"] = round(sched.start(), 3)
        with sched.client() as c:
            rec["restart_listed_at_once"] = len(c.workers())
        rec["restart_all_heard_s"] = round(wait_listed(sched, n, t0, args.limit)[1], 2)
        note(f"{n}: restart {rec['restart_serving_s']} s; storm on an empty store")
        sched.stop()
        for f in sched.db.parent.iterdir():
            f.unlink()
        t0 = time.monotonic()
        sched.start()
        first, last = wait_listed(sched, n, t0, args.limit)
        rec["storm_register_s"] = round(last, 2)
        # From the first re-registration to the last: the storm itself (the time
        # before it is the workers' next heartbeat, up to one interval).
        rec["storm_span_s"] = round(last - first, 2)
        rec["storm_rss_mib"] = round(rss_kib(sched.pid) / 1024, 1)
        rec["standins_rss_mib"] = round(stand.rss_kib() / 1024, 1)
        note(f"{n}: storm {rec['storm_register_s']} s")
    finally:
        stand.stop()
        sched.stop()
    return rec


def table(recs: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    rows = [
        ("workers", lambda r: f"{r['workers']:,}"),
        ("heartbeat interval (s)", lambda r: f"{r['heartbeat_s']}"),
        ("workers' link (heartbeats and calls on it)", lambda r: "yes" if r["link"] else "no"),
        (
            "scheduler RSS idle / all registered (MiB)",
            lambda r: f"{r['rss_idle_mib']:.0f} / {r['rss_registered_mib']:.0f}",
        ),
        ("RSS per registered worker (KiB)", lambda r: f"{r['rss_per_worker_kib']:.0f}"),
        ("first registration, all listed (s)", lambda r: f"{r['register_s']:.1f}"),
        ("scheduler CPU for heartbeats (% of a core)", lambda r: f"{r['heartbeat_cpu_pct']:.0f}"),
        (
            "fan-out: per host p50 / p99 (s)",
            lambda r: f"{r['fanout']['host_p50_s']:.2f} / {r['fanout']['host_p99_s']:.2f}",
        ),
        ("fan-out: to the last host (s)", lambda r: f"{r['fanout']['host_last_s']:.2f}"),
        ("fan-out: follower saw the end (s)", lambda r: f"{r['fanout']['follow_wall_s']:.2f}"),
        ("fan-out: succeeded", lambda r: f"{r['fanout']['summary'].get('succeeded', 0):,}"),
        ("fan-out: scheduler CPU (s)", lambda r: f"{r['fanout']['scheduler_cpu_s']:.1f}"),
        ("RSS after the fan-out (MiB)", lambda r: f"{r['rss_after_fanout_mib']:.0f}"),
        ("restart on the store: serving (s)", lambda r: f"{r['restart_serving_s']:.2f}"),
        (
            "restart on the store: every worker heard again (s)",
            lambda r: f"{r['restart_all_heard_s']:.1f}",
        ),
        (
            "storm (empty store, all re-register): all listed (s)",
            lambda r: f"{r['storm_register_s']:.1f}",
        ),
        ("storm: first to last re-registration (s)", lambda r: f"{r['storm_span_s']:.1f}"),
        ("store file (KiB)", lambda r: f"{r['db_kib']:.0f}"),
    ]
    head = "| | " + " | ".join(f"{r['workers']:,}" for r in recs) + " |"
    out = [head, "|---|" + "---:|" * len(recs)]
    for name, f in rows[1:]:
        cells = []
        for r in recs:
            try:
                cells.append(f(r))
            except (KeyError, TypeError):
                cells.append("-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    return {
        "cpus": os.cpu_count(),
        "mem_mib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load": os.getloadavg(),
    }


def add_args(ap: argparse.ArgumentParser) -> None:
    """The fleet step's options."""
    ap.add_argument("--fleet-sizes", default="100,1000,10000", help="stand-in counts")
    ap.add_argument(
        "--heartbeat", type=int, default=HEARTBEAT_S, help="the scheduler's heartbeat_seconds"
    )
    ap.add_argument("--per-process", type=int, default=2500, help="stand-ins per process")
    ap.add_argument("--port-base", type=int, default=12000, help="first stand-in port")
    ap.add_argument("--limit", type=float, default=600.0, help="seconds to wait for registrations")
    ap.add_argument(
        "--no-link",
        action="store_true",
        help="stand-ins without a Link: Heartbeat calls, the scheduler connects to each",
    )


def run(args: argparse.Namespace, out: Path) -> int:
    """Measure every size; write fleet.json and fleet.md into ``out``."""
    raise_fd_limit(65536)
    base = Path(tempfile.mkdtemp(prefix="agent-fleet-"))
    certs = base / "certs"
    subprocess.run(
        [str(ROOT / "scripts" / "gen_certs.sh"), "--out", str(certs)],
        check=True,
        capture_output=True,
    )
    recs = []
    status = 0
    try:
        for n in [int(x) for x in args.fleet_sizes.split(",") if x.strip()]:
            try:
                rec = measure(n, args, base, certs)
            except Exception as e:  # report and go on with the next size
                note(f"{n}: failed: {e}")
                status = 1
                continue
            print(json.dumps(rec), flush=True)
            recs.append(rec)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "per_process": args.per_process,
        "results": recs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "fleet.md").write_text(table(recs))
    note(f"wrote {out / 'fleet.json'} and {out / 'fleet.md'}")
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.fleet``."""
    ap = argparse.ArgumentParser(prog="python -m bench.fleet")
    add_args(ap)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    return run(args, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
