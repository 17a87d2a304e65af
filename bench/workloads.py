"""What is measured: each workload takes a target and parameters and returns plain records.

A target is anything with ``name``, ``addr``, ``pid`` and ``client_spec()``
(``bench.targets``): the agent, a peer speaking the original protocol, a
bare grpcio server. Records are plain dicts, without the ``mode`` key (the
orchestration in ``bench.run`` adds it and emits them).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from agent._proto import jobscheduler_pb2 as pb
from bench import procstat
from bench.driver import Driver, Sampler, Window, cpu_fields, layout
from bench.interp import Interpreter, env
from bench.params import Params
from bench.procstat import MB, percentile
from bench.targets import Agent, Mode


class Target(Protocol):
    """A server the clients connect to."""

    name: str
    addr: str

    @property
    def pid(self) -> int | None: ...

    def client_spec(self) -> dict[str, Any]: ...


@dataclass
class Ctx:
    """What every workload needs: the driver, the parameters, the interpreter."""

    driver: Driver
    p: Params
    interp: Interpreter
    helper_path: str  # PYTHONPATH of helper processes (the bench copy)


def floor(
    ctx: Ctx, mode: Mode, serial: int, concurrent: int, switch: bool = True
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Spawn-and-reap /bin/true from Python, as the agent's user, same interpreter.

    Returns the floor's own output and one record per variant.
    """
    p = ctx.p
    argv = [
        *mode.prefix,
        *ctx.interp.argv,
        "-m",
        "bench.floor",
        str(serial),
        str(concurrent),
        str(p.floor_in_flight),
    ]
    if switch and mode.agent_uid == 0 and mode.job_user != "root":
        pw = pwd.getpwnam(mode.job_user)
        argv += [str(pw.pw_uid), str(pw.pw_gid)]
    m0 = procstat.machine_cpu()[0]
    t0 = time.monotonic()
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(ctx.driver.base),
        env=env(ctx.helper_path, mode.home),
        check=False,
    )
    wall = time.monotonic() - t0
    busy = procstat.machine_cpu()[0] - m0
    if r.returncode != 0:
        raise RuntimeError(f"floor failed: {r.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    recs = []
    for key, name in (
        ("serial", "floor_serial"),
        ("concurrent", "floor_concurrent"),
        ("serial_user_switch", "floor_serial_user_switch"),
    ):
        if key not in data:
            continue
        d = data[key]
        recs.append(
            {
                "name": name,
                "in_flight": d.get("in_flight", 1),
                "jobs": d["jobs"],
                "jobs_per_s": d["jobs_per_s"],
                "p50_ms": d["p50_ms"],
                "p90_ms": d["p90_ms"],
                "p99_ms": d["p99_ms"],
                "client_cpu_cores": d["client_cpu_cores"],
                "jobs_cpu_cores": d["jobs_cpu_s"] / d["wall_s"],
                "server_cpu_ms_per_job": d["client_cpu_s"] / d["jobs"] * 1000,
                "jobs_cpu_ms_per_job": d["jobs_cpu_s"] / d["jobs"] * 1000,
                "machine_busy_cores_whole_floor_run": busy / wall,
                "python": data["python"],
            }
        )
    return data, recs


def _per_job(win: Window, jobs: int) -> dict[str, Any]:
    if not win.server_known or not jobs:
        return {"server_cpu_ms_per_job": None, "jobs_cpu_ms_per_job": None}
    return {
        "server_cpu_ms_per_job": win.server.self_s / jobs * 1000,
        "jobs_cpu_ms_per_job": win.server.children_s / jobs * 1000,
    }


def jobs(
    ctx: Ctx,
    target: Target,
    protocol: str,
    n: int,
    name: str,
    *,
    floor: dict[str, Any] | None = None,
    count: int | None = None,
    before_go: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Throughput and start-to-done latency of /bin/true with ``n`` jobs in flight.

    ``protocol``: ``original`` (StartJob, QueryJob every ``poll_ms``),
    ``wait`` (StartJob + WaitJob) or ``run`` (RunJob). ``count``: a counted
    run of that many jobs instead of a timed window.
    """
    p = ctx.p
    per_thread = None if count is None else -(-count // n)  # count is per thread
    specs = [
        {
            **target.client_spec(),
            "kind": "jobs",
            "protocol": protocol,
            "threads": t,
            "poll_ms": p.poll_ms,
            "count": per_thread,
        }
        for t in layout(n)
    ]
    results, win, warm_at, end_at = ctx.driver.drive(
        target.pid,
        specs,
        warm=0.0 if count else p.warm,
        duration=None if count else p.duration,
        before_go=before_go,
    )
    starts, dones, start_rpc, query_rpc, polls = [], [], [], [], []
    failed = 0
    errors: list[str] = []
    client_cpu = 0.0
    for r in results:
        client_cpu += (
            r["cpu_window_s"] if (r["cpu_window_s"] is not None and not count) else r["cpu_total_s"]
        )
        for t in r["threads"]:
            starts += t["starts"]
            dones += t["dones"]
            start_rpc += t["start_rpc"]
            query_rpc += t["query_rpc"]
            polls += t["polls"]
            failed += t["failed"]
            errors += t["errors"]
    if count:
        span = (max(dones) - min(starts)) if dones else 0.0
        done_in = len(dones)
        sel = list(range(len(starts)))
    else:
        span = end_at - warm_at
        done_in = sum(1 for d in dones if warm_at <= d <= end_at)
        sel = [i for i, s in enumerate(starts) if warm_at <= s < end_at]
    lat = [(dones[i] - starts[i]) * 1000 for i in sel]
    srpc = [start_rpc[i] * 1000 for i in sel if i < len(start_rpc)]
    rate = done_in / span if span > 0 else 0.0
    rec: dict[str, Any] = {
        "name": name,
        "target": target.name,
        "protocol": protocol,
        "in_flight": n,
        "jobs": len(lat),
        "jobs_per_s": rate,
        "jobs_started": len(starts),
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "start_rpc_p50_ms": percentile(srpc, 50),
        "start_rpc_p99_ms": percentile(srpc, 99),
        "query_rpc_p50_ms": percentile([x * 1000 for x in query_rpc], 50),
        "polls_per_job": (sum(polls) / len(polls)) if polls else 0.0,
    }
    if floor is not None:
        fl = floor["serial"] if n == 1 else floor["concurrent"]
        rec.update(
            {
                "floor": "serial" if n == 1 else f"concurrent{fl.get('in_flight', '')}",
                "throughput_vs_floor": rate / fl["jobs_per_s"] if fl["jobs_per_s"] else None,
                "p50_vs_floor": percentile(lat, 50) / fl["p50_ms"] if fl["p50_ms"] else None,
                "p50_vs_floor_serial": percentile(lat, 50) / floor["serial"]["p50_ms"],
            }
        )
    rec.update(
        {
            "failed": failed,
            "errors": errors[:5],
            "client_procs": len(specs),
            "client_threads": n,
            **cpu_fields(win, client_cpu),
            **_per_job(win, done_in),
        }
    )
    if n == p.main_level and win.threads:
        total = sum(win.threads.values()) or 1e-9
        rec["agent_threads_cpu_share"] = {
            k: v / total for k, v in sorted(win.threads.items(), key=lambda x: -x[1])
        }
    return rec


def calls(
    ctx: Ctx,
    target: Target,
    kind: str,
    callers: int,
    name: str,
    *,
    job_id: str = "",
    warm: float | None = None,
    duration: float | None = None,
) -> dict[str, Any]:
    """Back-to-back unary calls from ``callers`` threads: QueryJob (``query``) or the
    bare server's empty method (``unary``). Calls/s, latency, server CPU per call."""
    p = ctx.p
    specs = [
        {**target.client_spec(), "kind": kind, "job_id": job_id, "threads": t}
        for t in layout(callers)
    ]
    results, win, warm_at, end_at = ctx.driver.drive(
        target.pid,
        specs,
        warm=p.warm if warm is None else warm,
        duration=p.duration if duration is None else duration,
    )
    lat: list[float] = []
    errors: list[str] = []
    cpu = 0.0
    for r in results:
        cpu += r["cpu_window_s"] or 0.0
        for t in r["threads"]:
            errors += t["errors"]
            lat += [
                x * 1000
                for a, x in zip(t["at"], t["lat"], strict=True)
                if warm_at <= a and a + x <= end_at
            ]
    span = end_at - warm_at
    per_call = (win.server.self_s / len(lat) * 1000) if lat and win.server_known else None
    return {
        "name": name,
        "target": target.name,
        "callers": callers,
        "calls": len(lat),
        "calls_per_s": len(lat) / span if span > 0 else 0.0,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "server_cpu_ms_per_call": per_call,
        "errors": errors[:5],
        **cpu_fields(win, cpu),
    }


def history_count(agent: Agent) -> int:
    """Jobs in the agent's history (ListJobs as the admin identity)."""
    ch, stub = agent.stub("admin")
    n = 0
    token = ""
    try:
        for _ in range(1000):
            res = stub.ListJobs(pb.ListJobsReq(pageSize=1000, pageToken=token), timeout=60)
            n += len(res.jobs)
            token = res.nextPageToken
            if not token:
                break
    finally:
        ch.close()
    return n


def running_jobs(ctx: Ctx, agent: Agent, base_rss: float) -> dict[str, Any]:
    """RSS with many jobs running at once (``sleep 60``), then stop them all."""
    n = ctx.p.running
    ch, stub = agent.stub()
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def start(_: int) -> None:
        try:
            r = stub.StartJob(pb.StartJobReq(command="/bin/sleep", path="60"), timeout=60)
            with lock:
                ids.append(r.jobID)
        except grpc.RpcError as e:
            with lock:
                errors.append(f"{e.code().name}: {e.details()}")

    try:
        sampler = Sampler(agent.pid)
        sampler.begin()
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(start, range(n)))
        t_start = time.monotonic() - t0
        win_start = sampler.end()
        time.sleep(0.5)
        kids = len(procstat.children_of(agent.pid))
        mem = procstat.rss_mb(agent.pid)
        fds = len(os.listdir(f"/proc/{agent.pid}/fd"))
        t1 = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda i: stub.StopJob(pb.StopJobReq(jobID=i), timeout=60), ids))
            done = list(
                ex.map(
                    lambda i: (
                        stub.WaitJob(pb.WaitJobReq(jobID=i, waitMillis=60_000), timeout=70).done
                    ),
                    ids,
                )
            )
        t_stop = time.monotonic() - t1
    finally:
        ch.close()
    time.sleep(0.3)
    after = procstat.rss_mb(agent.pid)
    return {
        "name": "rss_running",
        "running": len(ids),
        "children_seen": kids,
        "agent_fds": fds,
        "rss_mb": mem["rss_mb"],
        "anon_mb": mem["anon_mb"],
        "rss_before_mb": base_rss,
        "above_before_mb": mem["rss_mb"] - base_rss,
        "kb_per_running_job": (mem["rss_mb"] - base_rss) * MB / 1024 / max(1, len(ids)),
        "start_all_s": t_start,
        "starts_per_s": len(ids) / t_start if t_start else 0,
        "stop_and_wait_all_s": t_stop,
        "all_done": all(done) and len(done) == len(ids),
        "rss_after_stop_mb": after["rss_mb"],
        "errors": errors[:5],
        **cpu_fields(win_start, 0.0),
    }


def stream(ctx: Ctx, agent: Agent, clients: int, head: str) -> dict[str, Any]:
    """MB/s to ``clients`` followers of a job writing ``stream_bytes`` (``head -c``)."""
    nbytes = ctx.p.stream_bytes
    ch, stub = agent.stub()
    job: dict[str, str] = {}

    def start_job() -> dict[str, Any]:
        r = stub.StartJob(
            pb.StartJobReq(command=head, path="-c", args=[str(nbytes), "/dev/zero"]), timeout=30
        )
        job["id"] = r.jobID
        return {"job_id": r.jobID}

    try:
        specs = [
            {**agent.client_spec(), "kind": "stream", "threads": 1, "timeout": 600}
            for _ in range(clients)
        ]
        results, win, _, _ = ctx.driver.drive(
            agent.pid, specs, warm=0.0, duration=None, before_go=start_job
        )
        final = stub.WaitJob(pb.WaitJobReq(jobID=job["id"], waitMillis=60_000), timeout=70)
    finally:
        ch.close()
    per = []
    errors: list[str] = []
    cpu = 0.0
    ok = True
    t_first = min(t["t0"] for r in results for t in r["threads"])
    t_last = max(t["t1"] for r in results for t in r["threads"])
    for r in results:
        cpu += r["cpu_total_s"]
        for t in r["threads"]:
            el = t["t1"] - t["t0"]
            per.append(t["bytes"] / el / MB if el > 0 else 0.0)
            ok = ok and t["bytes"] == nbytes and not t["errors"]
            errors += t["errors"]
    total = sum(t["bytes"] for r in results for t in r["threads"])
    job_s = (final.endTime.ToNanoseconds() - final.startTime.ToNanoseconds()) / 1e9
    return {
        "name": "stream",
        "clients": clients,
        "bytes_per_client": nbytes,
        "verified": ok and final.outputBytes == nbytes and final.done and not final.error,
        "job_output_bytes": final.outputBytes,
        "mb_per_s_per_client_min": min(per),
        "mb_per_s_per_client_mean": sum(per) / len(per),
        "mb_per_s_aggregate": total / (t_last - t_first) / MB,
        "job_write_s": job_s,
        "job_write_mb_per_s": nbytes / job_s / MB if job_s else 0,
        "errors": errors[:5],
        **cpu_fields(win, cpu),
    }


def profiled_jobs(
    ctx: Ctx, agent: Agent, n: int, floor: dict[str, Any], out: Path, native: bool
) -> tuple[dict[str, Any] | None, str | None]:
    """One original-protocol run under ``py-spy record``: (record, summary) or Nones."""
    from bench.output import note
    from bench.profile_summary import summarize

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        note("--profile: py-spy not found (pip install py-spy); skipped")
        return None, None
    dur = ctx.p.warm + ctx.p.duration
    cmd = [
        spy,
        "record",
        "--pid",
        str(agent.pid),
        "--format",
        "raw",
        "--duration",
        str(max(1, round(dur))),
        "--idle",
        "-o",
        str(out),
    ]
    # --native needs to stop the process for each sample; without it
    # py-spy reads the interpreter's memory without pausing it.
    cmd += ["--native", "--rate", "100"] if native else ["--nonblocking", "--rate", "250"]
    procs: list[subprocess.Popen[str]] = []

    def start_spy() -> dict[str, Any]:
        # Started once the clients are connected, so it samples the load.
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
        time.sleep(0.3)
        return {}

    rec = None
    err = ""
    try:
        rec = jobs(ctx, agent, "original", n, "profiled_original", floor=floor, before_go=start_spy)
    finally:
        for sp in procs:
            try:
                _, err = sp.communicate(timeout=dur + 30)
            except subprocess.TimeoutExpired:
                sp.kill()
                _, err = sp.communicate()
    if not procs or procs[0].returncode != 0:
        note(f"py-spy failed: {err.strip()[-500:]}")
        return rec, None
    return rec, summarize(out.read_text())
