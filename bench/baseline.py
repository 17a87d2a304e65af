"""The baseline step: this checkout's agent against another version of it, in the same run.

``python -m bench --steps baseline --baseline-python PATH``: PATH is an interpreter
that has another version of the agent installed (a venv with the previous release,
say). For one mode (the first of ``--modes``) two agents with the same configuration,
each in its own folder and cgroup (``MODE-new``, ``MODE-old``): this checkout's (the
interpreter the bench runs its agents with) and the baseline's (PATH ``-m agent run``).

1. Idle RSS of each, right after start and before any job: the agent process plus all
   its descendants (the job keeper of the new agent, the job spawner of the old one),
   ``VmRSS`` of ``/proc/PID/status``, summed.
2. The history: ``baseline_history`` jobs (``/bin/true``, StartJob + WaitJob,
   ``main_level`` in flight) on each, in quarters with the RSS sum after each, then the
   RSS sum again after a pause: flat with history (first to last quarter) or not.
3. ``--rounds`` interleaved rounds: ``/bin/true`` with StartJob + WaitJob at 1 and at
   ``main_level`` in flight on one agent, then on the other, back to back, which one
   goes first alternating by round and level (``baseline_jobs`` records with
   ``variant`` ``new`` or ``old``).
4. One ``baseline_summary`` per level: the medians of both and the ratios, each so that
   above 1 means the new one is better: jobs/s new/old, p50 latency old/new (and the
   median of the per-round ratios); and a ``baseline_rss`` record: the sums, new/old.

The checks (issue: "at least 0.9x of today's path; the agent's and the keeper's idle
memory together no more than today's agent and spawner, flat with history") are
computed from these figures, measured in the same minutes, never against another run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procstat
from bench import workloads as wl
from bench.compare import median_of, ratio
from bench.interp import Interpreter, env
from bench.output import note
from bench.targets import Agent, Mode

Emit = Callable[[dict[str, Any]], object]
# Build an agent of ``mode`` named ``variant`` that runs with ``interp``.
MakeAgent = Callable[[Mode, str, Interpreter], Agent]

NEW, OLD = "new", "old"
PROTOCOL = "wait"  # StartJob + WaitJob
SUMMARY = (
    "jobs_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "start_rpc_p50_ms",
    "server_cpu_ms_per_job",
    "agent_own_cpu_ms_per_job",
    "helper_cpu_ms_per_job",
    "jobs_cpu_ms_per_job",
    "agent_cpu_cores",
    "agent_children_cpu_cores",
    "client_cpu_cores",
    "other_cpu_cores",
)
AT_LEAST = 0.9  # jobs/s new/old and p50 old/new, at 1 and at main_level in flight
FLAT_MB = 0.5  # RSS growth over the old agent's allowed, first to last history quarter


def probe(interp: Interpreter, home: str = "/") -> dict[str, Any]:
    """Which agent ``interp`` runs: its package's folder and version, keeper or not."""
    code = (
        "import importlib.util, os, sys, agent; "
        "print(os.path.dirname(agent.__file__)); print(agent.__version__); "
        # The keeper's module where it lives now, or where it lived before agent.keeper.
        "print(any(importlib.util.find_spec(p) and importlib.util.find_spec(p + '.keeper') "
        "for p in ('agent.keeper', 'agent.daemon'))); "
        "print(sys.version.split()[0])"
    )
    try:
        r = subprocess.run(
            [*interp.argv, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=env(interp.sitepath, home),
            cwd="/",
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-500:]}
    pkg, version, keeper, py = r.stdout.split()[:4]
    return {
        "python": " ".join(interp.argv),
        "pythonpath": interp.sitepath,
        "python_version": py,
        "package": pkg,
        "version": version,
        "has_keeper": keeper == "True",
    }


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = procstat.children_of(todo.pop())
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]


def _role(cmd: str) -> str:
    for key in ("keeper", "spawner"):
        # agent.daemon: where an older agent (the baseline) has them.
        if f"agent.keeper.{key}" in cmd or f"agent.daemon.{key}" in cmd:
            return key
    return "other"


def tree_rss(pid: int) -> dict[str, Any]:
    """VmRSS (and RssAnon) of ``pid`` and of all its descendants, and their sum, in MB."""
    procs = []
    for p in [pid, *descendants(pid)]:
        try:
            m = procstat.rss_mb(p)
        except OSError:
            continue  # gone in between
        cmd = _cmdline(p)
        procs.append(
            {
                "pid": p,
                "role": "agent" if p == pid else _role(cmd),
                "rss_mb": m["rss_mb"],
                "anon_mb": m["anon_mb"],
                "cmdline": cmd,
            }
        )
    return {
        "rss_sum_mb": sum(x["rss_mb"] for x in procs),
        "anon_sum_mb": sum(x["anon_mb"] for x in procs),
        "agent_rss_mb": next((x["rss_mb"] for x in procs if x["pid"] == pid), None),
        "helpers_rss_mb": sum(x["rss_mb"] for x in procs if x["pid"] != pid),
        "processes": len(procs),
        "by_process": procs,
    }


def _end_group(agent: Agent) -> None:
    """After ``agent.stop()``: anything left of the session the bench started it in
    (its keeper or spawner shares the agent's process group) is waited for, then killed."""
    if agent.proc is None:
        return
    pgid = agent.proc.pid  # start_new_session: the agent leads its own group
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    note(f"baseline: processes of agent {agent.key}'s group {pgid} outlived it; killing them")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _growth(hist: dict[str, Any]) -> float | None:
    """RSS sum after the last history quarter minus after the first (None without both)."""
    series = hist.get("rss_sum_mb_by_jobs_run") or []
    return series[-1][1] - series[1][1] if len(series) > 2 else None


class BaselineCost:
    """One mode's agent of this checkout against the baseline's, then the summaries."""

    def __init__(
        self,
        ctx: wl.Ctx,
        mode: Mode,
        baseline: Interpreter,
        make_agent: MakeAgent,
        emit: Emit,
    ) -> None:
        self.ctx = ctx
        self.mode = mode
        self.interps = {NEW: ctx.interp, OLD: baseline}
        self.make_agent = make_agent
        self.emit = emit
        self.levels = sorted({1, ctx.p.main_level})
        self.jobs: list[dict[str, Any]] = []
        self.rss: dict[str, dict[str, Any]] = {NEW: {}, OLD: {}}
        self.ran = {NEW: 0, OLD: 0}  # jobs started on each agent (its history)
        self.result: dict[str, Any] = {"mode": mode.key, "protocol": PROTOCOL}

    def _rec(self, variant: str, rec: dict[str, Any]) -> dict[str, Any]:
        rec = {"mode": self.mode.key, **rec, "variant": variant}
        # The server CPU split: the agent's own and its keeper's (or spawner's), per job.
        jps, helpers = rec.get("jobs_per_s"), rec.get("agent_children_cpu_cores")
        if jps and helpers is not None and rec.get("server_cpu_ms_per_job") is not None:
            rec["helper_cpu_ms_per_job"] = helpers / jps * 1000
            rec["agent_own_cpu_ms_per_job"] = rec["server_cpu_ms_per_job"] - helpers / jps * 1000
        self.emit(rec)
        return rec

    def run(self) -> dict[str, Any]:
        """Start both, idle RSS, the history, the rounds; stop both; the summary."""
        info = {v: probe(i, self.mode.home) for v, i in self.interps.items()}
        self.result["agents"] = info
        for v, i in info.items():
            if "error" in i:
                raise RuntimeError(f"baseline: the {v} interpreter cannot import agent: {i}")
        if info[NEW]["package"] == info[OLD]["package"]:
            note(f"baseline: WARNING: both interpreters import the same agent ({info[NEW]})")
        agents = {v: self.make_agent(self.mode, v, i) for v, i in self.interps.items()}
        try:
            for v, a in agents.items():
                note(f"baseline: starting the {v} agent ({info[v]['package']})")
                a.start()
                info[v]["agent_process"] = a.python_of_process()
            time.sleep(1.0)
            for v, a in agents.items():
                idle = tree_rss(a.pid)
                self.rss[v]["idle"] = idle
                self._rec(v, {"name": "baseline_rss_idle", **idle})
            for v, a in agents.items():
                self._history(v, a)
            self._rounds(agents)
            for v, a in agents.items():
                end = tree_rss(a.pid)
                self.rss[v]["end"] = end
                self._rec(v, {"name": "baseline_rss_end", "jobs_run": self.ran[v], **end})
        finally:
            for a in agents.values():
                a.stop()
                _end_group(a)
            self.ctx.driver.kill_all()
        self.summarise()
        return self.result

    def _history(self, variant: str, agent: Agent) -> None:
        """``baseline_history`` jobs at ``main_level`` in flight, RSS sum after each quarter."""
        n_all = self.ctx.p.baseline_history
        series = [(0, self.rss[variant]["idle"]["rss_sum_mb"])]
        note(f"baseline: {n_all} jobs on the {variant} agent, RSS after each quarter")
        for i in range(4):
            n = n_all // 4 + (1 if i < n_all % 4 else 0)
            if not n:
                continue
            rec = wl.jobs(
                self.ctx, agent, PROTOCOL, self.ctx.p.main_level, "baseline_history", count=n
            )
            self.ran[variant] += rec["jobs_started"]
            if rec["failed"]:
                note(f"baseline: {rec['failed']} of the {variant} agent's jobs failed")
            series.append((self.ran[variant], tree_rss(agent.pid)["rss_sum_mb"]))
        time.sleep(1.0)
        hist = tree_rss(agent.pid)
        hist["rss_sum_mb_by_jobs_run"] = series
        hist["jobs_run"] = self.ran[variant]
        hist["above_idle_mb"] = hist["rss_sum_mb"] - self.rss[variant]["idle"]["rss_sum_mb"]
        self.rss[variant]["history"] = hist
        self._rec(variant, {"name": "baseline_rss_history", **hist})

    def _rounds(self, agents: dict[str, Agent]) -> None:
        for rnd in range(self.ctx.p.compare_rounds):
            for i, n in enumerate(self.levels):
                # Which goes first alternates by round and, within a round, by level.
                order = [NEW, OLD] if (rnd + i) % 2 == 0 else [OLD, NEW]
                for v in order:
                    note(f"baseline round {rnd}: {v} agent, StartJob + WaitJob, {n} in flight")
                    rec = wl.jobs(self.ctx, agents[v], PROTOCOL, n, "baseline_jobs")
                    self.ran[v] += rec["jobs_started"]
                    self.jobs.append(self._rec(v, {**rec, "round": rnd}))

    def summarise(self) -> None:
        """Per level the medians and ratios; the RSS sums; the checks."""
        levels = []
        for n in self.levels:
            by = {
                v: [r for r in self.jobs if r["variant"] == v and r["in_flight"] == n]
                for v in (NEW, OLD)
            }
            if not by[NEW] or not by[OLD]:
                continue
            med = {v: {k: median_of(recs, k) for k in SUMMARY} for v, recs in by.items()}
            new, old = med[NEW], med[OLD]
            pairs = [(a, b) for a in by[NEW] for b in by[OLD] if a["round"] == b["round"]]
            tp = [a["jobs_per_s"] / b["jobs_per_s"] for a, b in pairs if b["jobs_per_s"]]
            lat = [b["p50_ms"] / a["p50_ms"] for a, b in pairs if a["p50_ms"]]
            s: dict[str, Any] = {
                "mode": self.mode.key,
                "name": "baseline_summary",
                "protocol": PROTOCOL,
                "in_flight": n,
                "rounds": len(by[NEW]),
                NEW: new,
                OLD: old,
                "jobs_per_s_new_vs_old": ratio(new["jobs_per_s"], old["jobs_per_s"]),
                "jobs_per_s_new_vs_old_paired": statistics.median(tp) if tp else None,
                "p50_old_vs_new": ratio(old["p50_ms"], new["p50_ms"]),
                "p50_old_vs_new_paired": statistics.median(lat) if lat else None,
                "server_cpu_per_job_new_vs_old": ratio(
                    new["server_cpu_ms_per_job"], old["server_cpu_ms_per_job"]
                ),
                "failed": sum(r.get("failed", 0) for recs in by.values() for r in recs),
            }
            self.emit(s)
            levels.append(s)
        self.result["levels"] = levels
        rss: dict[str, Any] = {"mode": self.mode.key, "name": "baseline_rss"}
        for v in (NEW, OLD):
            r = self.rss[v]
            rss[v] = {
                "idle_sum_mb": r.get("idle", {}).get("rss_sum_mb"),
                "idle_agent_mb": r.get("idle", {}).get("agent_rss_mb"),
                "idle_helpers_mb": r.get("idle", {}).get("helpers_rss_mb"),
                "idle_anon_sum_mb": r.get("idle", {}).get("anon_sum_mb"),
                "idle_processes": r.get("idle", {}).get("processes"),
                "history_jobs_run": r.get("history", {}).get("jobs_run"),
                "history_sum_mb": r.get("history", {}).get("rss_sum_mb"),
                "history_above_idle_mb": r.get("history", {}).get("above_idle_mb"),
                "history_series": r.get("history", {}).get("rss_sum_mb_by_jobs_run"),
                "history_quarters_growth_mb": _growth(r.get("history", {})),
                "end_sum_mb": r.get("end", {}).get("rss_sum_mb"),
                "end_jobs_run": self.ran[v],
            }
        rss["idle_sum_new_vs_old"] = ratio(rss[NEW]["idle_sum_mb"], rss[OLD]["idle_sum_mb"])
        rss["history_sum_new_vs_old"] = ratio(
            rss[NEW]["history_sum_mb"], rss[OLD]["history_sum_mb"]
        )
        self.emit(rss)
        self.result["rss"] = rss
        self.result["checks"] = self.checks()

    def checks(self) -> list[dict[str, Any]]:
        """The issue's targets, PASS (True), FAIL (False) or not measured (None)."""
        out: list[dict[str, Any]] = []

        def add(what: str, value: float | None, limit: float, ok: bool | None) -> None:
            out.append({"check": what, "value": value, "limit": limit, "pass": ok})

        def at_least(what: str, value: float | None, limit: float) -> None:
            add(what, value, limit, None if value is None else value >= limit)

        def at_most(what: str, value: float | None, limit: float | None) -> None:
            if limit is None:
                add(what, value, float("nan"), None)
            else:
                add(what, value, limit, None if value is None else value <= limit)

        lv = {s["in_flight"]: s for s in self.result.get("levels", [])}
        one, top = lv.get(1, {}), lv.get(self.ctx.p.main_level, {})
        n = self.ctx.p.main_level
        at_least("start-to-done p50 at 1 in flight, old/new", one.get("p50_old_vs_new"), AT_LEAST)
        at_least("jobs/s at 1 in flight, new/old", one.get("jobs_per_s_new_vs_old"), AT_LEAST)
        at_least(f"jobs/s at {n} in flight, new/old", top.get("jobs_per_s_new_vs_old"), AT_LEAST)
        rss = self.result["rss"]
        at_most(
            "idle RSS, agent + keeper (MB) <= old agent + spawner",
            rss[NEW]["idle_sum_mb"],
            rss[OLD]["idle_sum_mb"],
        )
        at_most(
            "RSS after the history, agent + keeper (MB) <= old agent + spawner",
            rss[NEW]["history_sum_mb"],
            rss[OLD]["history_sum_mb"],
        )
        # Flat with history, measured from the first quarter to the last
        # (the first jobs' warm-up, imports and caches, is not growth per job), held
        # against the old agent's in the same run (both carry the history's SQLite cache),
        # with FLAT_MB of slack for the noise of one run.
        old_growth = rss[OLD]["history_quarters_growth_mb"]
        at_most(
            "RSS growth, first to last history quarter (MB), <= the old agent's + slack",
            rss[NEW]["history_quarters_growth_mb"],
            None if old_growth is None else old_growth + FLAT_MB,
        )
        return out
