"""The seccomp step: what the job box's seccomp layer costs, end to end.

For each agent mode, two fresh agents side by side, each in its own folder and cgroup:
the mode's configuration as it is (the full box: a cgroup per job, Landlock, the
entry's seccomp filter, a scratch directory, the user switch as root) and the same
configuration with ``[confinement] seccomp = false`` (no filter on any job; the only
difference). Each one's box is first read from /proc of a running job (the filters
that bind it: 1 and 0, or the step stops). Then rounds: at 1 and ``main_level`` in
flight, the original protocol (StartJob, then QueryJob every ``poll_ms`` until done,
``/bin/true``) on one agent, then on the other, back to back, the order alternating
from one level and round to the next so that slow drifts of a noisy machine hit both
alike. One ``seccomp_jobs`` record per measurement (``variant``: ``seccomp`` or
``no_seccomp``), then one ``seccomp_summary`` per mode and level: the medians over the
rounds of both and their ratios, with seccomp over without (``bench.goals``: at least
0.95 in jobs/s at ``main_level``). Ratios only: the two are measured in the same
minutes, never against another run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from bench import workloads as wl
from bench.compare import MEDIANS, median_of, ratio
from bench.output import note
from bench.targets import Agent, Mode

Emit = Callable[[dict[str, Any]], object]
# Build an agent of ``mode`` named ``variant`` whose configuration differs by ``overrides``.
MakeAgent = Callable[[Mode, str, dict[str, dict[str, Any]]], Agent]

# The compare step's medians, and what tells a busier machine from a slower agent.
SUMMARY = (*MEDIANS, "polls_per_job", "agent_cpu_cores", "machine_busy_cores", "cpu_ms_per_job")
WITH, WITHOUT = "seccomp", "no_seccomp"
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    WITH: {},  # the mode's own configuration: seccomp is on by default
    WITHOUT: {"confinement": {"seccomp": False}},
}


class SeccompCost:
    """The interleaved rounds of one mode's two agents, then the summaries."""

    def __init__(self, ctx: wl.Ctx, mode: Mode, make_agent: MakeAgent, emit: Emit) -> None:
        self.ctx = ctx
        self.mode = mode
        self.make_agent = make_agent
        self.emit = emit
        self.levels = sorted({1, ctx.p.main_level})
        self.jobs: list[dict[str, Any]] = []
        self.filters: dict[str, int | None] = {}

    def run(self) -> None:
        """Start both agents, check their boxes, measure the rounds, summarise, stop."""
        agents = {v: self.make_agent(self.mode, v, o) for v, o in VARIANTS.items()}
        try:
            for variant, agent in agents.items():
                agent.start()
                box = agent.box()
                self.filters[variant] = box.get("seccomp_filters")
                self.emit({"mode": self.mode.key, "name": "seccomp_box", "variant": variant, **box})
            # A comparison of two equal boxes would pass for the wrong reason.
            if (self.filters[WITH] or 0) < 1 or self.filters[WITHOUT] != 0:
                raise RuntimeError(
                    f"seccomp step: the jobs' filters are {self.filters} (expected "
                    f"{WITH} >= 1, {WITHOUT} 0): the two configurations are not what is compared"
                )
            for rnd in range(self.ctx.p.compare_rounds):
                for i, n in enumerate(self.levels):
                    # Which goes first alternates by round at every level (and between
                    # levels within a round): neither always follows the other.
                    first = (rnd + i) % 2 == 0
                    order = list(VARIANTS) if first else list(reversed(VARIANTS))
                    for variant in order:
                        note(
                            f"seccomp round {rnd}: agent {self.mode.key} {variant}, "
                            f"original protocol, {n} in flight"
                        )
                        rec = wl.jobs(self.ctx, agents[variant], "original", n, "seccomp_jobs")
                        rec["cpu_ms_per_job"] = _cpu_per_job(rec)
                        rec = {"mode": self.mode.key, **rec, "variant": variant, "round": rnd}
                        self.jobs.append(rec)
                        self.emit(rec)
        finally:
            for agent in agents.values():
                agent.stop()
            self.ctx.driver.kill_all()
        self.summarise()

    def summarise(self) -> None:
        """Per level: medians over the rounds with and without seccomp, and the ratios."""
        for n in self.levels:
            by = {
                v: [r for r in self.jobs if r["variant"] == v and r["in_flight"] == n]
                for v in VARIANTS
            }
            med = {v: {k: median_of(recs, k) for k in SUMMARY} for v, recs in by.items() if recs}
            if len(med) < len(VARIANTS):
                continue
            on, off = med[WITH], med[WITHOUT]
            # Each round's pair was measured back to back: its ratio is the one a slow
            # drift of the machine disturbs least.
            pairs = [
                a["jobs_per_s"] / b["jobs_per_s"]
                for a in by[WITH]
                for b in by[WITHOUT]
                if a["round"] == b["round"] and b["jobs_per_s"]
            ]
            s: dict[str, Any] = {
                "mode": self.mode.key,
                "name": "seccomp_summary",
                "target": "agent",
                "protocol": "original",
                "in_flight": n,
                "rounds": len(by[WITH]),
                **on,
                **{f"{k}_{WITHOUT}": v for k, v in off.items()},
                "jobs_per_s_vs_no_seccomp": ratio(on["jobs_per_s"], off["jobs_per_s"]),
                "jobs_per_s_vs_no_seccomp_paired": statistics.median(pairs) if pairs else None,
                "p50_vs_no_seccomp": ratio(on["p50_ms"], off["p50_ms"]),
                "server_cpu_per_job_vs_no_seccomp": ratio(
                    on["server_cpu_ms_per_job"], off["server_cpu_ms_per_job"]
                ),
                # On a saturated machine throughput goes as the inverse of this.
                "cpu_per_job_vs_no_seccomp": ratio(on["cpu_ms_per_job"], off["cpu_ms_per_job"]),
                "failed": sum(r.get("failed", 0) for recs in by.values() for r in recs),
                "seccomp_filters": self.filters.get(WITH),
                f"seccomp_filters_{WITHOUT}": self.filters.get(WITHOUT),
            }
            self.emit(s)


def _cpu_per_job(rec: dict[str, Any]) -> float | None:
    """All the CPU a job cost in the window, in ms: clients, agent and spawner, the job
    itself (its child's set-up, the filter's install included); None when unknown."""
    parts = [rec.get(k) for k in ("client_cpu_cores", "agent_cpu_cores", "jobs_cpu_cores")]
    rate = rec.get("jobs_per_s")
    cores = [x for x in parts if isinstance(x, (int, float))]
    if not isinstance(rate, (int, float)) or not rate or len(cores) < len(parts):
        return None
    return 1000 * float(sum(cores)) / rate
