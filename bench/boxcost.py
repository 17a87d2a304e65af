"""Two configurations of one agent mode, end to end: the ``seccomp`` and ``users`` steps.

For each agent mode, two fresh agents side by side, each in its own folder and cgroup,
whose configurations differ by one setting (:class:`VariantPair`):

- ``seccomp``: the mode's configuration as it is (the full box: a cgroup per job,
  Landlock, the entry's seccomp filter, a scratch directory, the user switch as root)
  and the same with ``[confinement] seccomp = false`` (no filter on any job);
- ``users``: the same with ``[jobs] dynamic_users = true`` (each job a uid of its own,
  taken from the range and, at the job's end, given back only after a helper of that
  uid removed what it left: processes, IPC objects, keyrings) against the mode's fixed
  job user. Only where the agent runs as root (a keeper that can switch users).

Each one's box is first read from /proc of a running job (the filters, or the job's
uid, must differ as the comparison says, or the step stops: a comparison of two equal
boxes would pass for the wrong reason). Then rounds: at 1 and ``main_level`` in flight,
the original protocol (StartJob, then QueryJob every ``poll_ms`` until done,
``/bin/true``) on one agent, then on the other, back to back, the order alternating
from one level and round to the next so that slow drifts of a noisy machine hit both
alike. One ``<step>_jobs`` record per measurement (``variant``: the comparison's two
names), then one ``<step>_summary`` per mode and level: the medians over the rounds of
both and their ratios, the first over the second (``bench.goals``: seccomp at least
0.95 in jobs/s at ``main_level``; the users step has no target, it is reported).
Ratios only: the two are measured in the same minutes, never against another run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.keeper.config import Jobs
from bench import workloads as wl
from bench.compare import MEDIANS, median_of, ratio
from bench.output import note
from bench.targets import Agent, Mode

Emit = Callable[[dict[str, Any]], object]
# Build an agent of ``mode`` named ``variant`` whose configuration differs by ``overrides``.
MakeAgent = Callable[[Mode, str, dict[str, dict[str, Any]]], Agent]

# The compare step's medians, and what tells a busier machine from a slower agent.
SUMMARY = (*MEDIANS, "polls_per_job", "agent_cpu_cores", "machine_busy_cores", "cpu_ms_per_job")


@dataclass(frozen=True)
class VariantPair:
    """Two configurations of a mode: ``first`` (measured over ``second``), their
    overrides, the box field that must tell them apart, and how."""

    step: str
    first: str
    second: str
    overrides: dict[str, dict[str, dict[str, Any]]]
    box_field: str
    # (first's value, second's value) -> what is wrong, or "" when they differ right
    check: Callable[[Any, Any], str]


def _filters_differ(first: Any, second: Any) -> str:
    if (first or 0) < 1 or second != 0:
        return f"the jobs' filters are {first} and {second} (expected >= 1 and 0)"
    return ""


def _uids_differ(first: Any, second: Any) -> str:
    lo, hi = DYNAMIC_RANGE
    if not isinstance(first, int) or not lo <= first <= hi or first == second:
        return f"the jobs' uids are {first} and {second} (expected one in {lo}-{hi}, then another)"
    return ""


DYNAMIC_RANGE = (Jobs().dynamic_uid_min, Jobs().dynamic_uid_max)  # the config's default
SECCOMP = VariantPair(
    "seccomp",
    "seccomp",
    "no_seccomp",
    {"seccomp": {}, "no_seccomp": {"confinement": {"seccomp": False}}},
    "seccomp_filters",
    _filters_differ,
)
USERS = VariantPair(
    "users",
    "dynamic_users",
    "fixed_user",
    {
        "dynamic_users": {
            "jobs": {
                "dynamic_users": True,
                "dynamic_uid_min": DYNAMIC_RANGE[0],
                "dynamic_uid_max": DYNAMIC_RANGE[1],
            }
        },
        "fixed_user": {"jobs": {"dynamic_users": False}},
    },
    "job_uid",
    _uids_differ,
)


class VariantCost:
    """The interleaved rounds of one mode's two agents, then the summaries."""

    def __init__(
        self,
        ctx: wl.Ctx,
        mode: Mode,
        make_agent: MakeAgent,
        emit: Emit,
        comparison: VariantPair = SECCOMP,
    ) -> None:
        self.cmp = comparison
        self.ctx = ctx
        self.mode = mode
        self.make_agent = make_agent
        self.emit = emit
        self.levels = sorted({1, ctx.p.main_level})
        self.jobs: list[dict[str, Any]] = []
        self.boxes: dict[str, Any] = {}  # variant -> its job's comparison.box_field

    def run(self) -> None:
        """Start both agents, check their boxes, measure the rounds, summarise, stop."""
        c = self.cmp
        agents = {v: self.make_agent(self.mode, v, o) for v, o in c.overrides.items()}
        try:
            for variant, agent in agents.items():
                agent.start()
                box = agent.box()
                self.boxes[variant] = box.get(c.box_field)
                self.emit(
                    {"mode": self.mode.key, "name": f"{c.step}_box", "variant": variant, **box}
                )
            # A comparison of two equal boxes would pass for the wrong reason.
            wrong = c.check(self.boxes[c.first], self.boxes[c.second])
            if wrong:
                raise RuntimeError(
                    f"{c.step} step: {wrong}: the two configurations are not what is compared"
                )
            for rnd in range(self.ctx.p.compare_rounds):
                for i, n in enumerate(self.levels):
                    # Which goes first alternates by round at every level (and between
                    # levels within a round): neither always follows the other.
                    first = (rnd + i) % 2 == 0
                    order = [c.first, c.second] if first else [c.second, c.first]
                    for variant in order:
                        note(
                            f"{c.step} round {rnd}: agent {self.mode.key} {variant}, "
                            f"original protocol, {n} in flight"
                        )
                        rec = wl.jobs(self.ctx, agents[variant], "original", n, f"{c.step}_jobs")
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
        """Per level: medians over the rounds of both, and the ratios (first over second)."""
        c = self.cmp
        a, b = c.first, c.second
        for n in self.levels:
            by = {
                v: [r for r in self.jobs if r["variant"] == v and r["in_flight"] == n]
                for v in (a, b)
            }
            med = {v: {k: median_of(recs, k) for k in SUMMARY} for v, recs in by.items() if recs}
            if len(med) < 2:
                continue
            on, off = med[a], med[b]
            # Each round's pair was measured back to back: its ratio is the one a slow
            # drift of the machine disturbs least.
            pairs = [
                x["jobs_per_s"] / y["jobs_per_s"]
                for x in by[a]
                for y in by[b]
                if x["round"] == y["round"] and y["jobs_per_s"]
            ]
            s: dict[str, Any] = {
                "mode": self.mode.key,
                "name": f"{c.step}_summary",
                "target": "agent",
                "protocol": "original",
                "in_flight": n,
                "rounds": len(by[a]),
                **on,
                **{f"{k}_{b}": v for k, v in off.items()},
                f"jobs_per_s_vs_{b}": ratio(on["jobs_per_s"], off["jobs_per_s"]),
                f"jobs_per_s_vs_{b}_paired": statistics.median(pairs) if pairs else None,
                f"p50_vs_{b}": ratio(on["p50_ms"], off["p50_ms"]),
                f"server_cpu_per_job_vs_{b}": ratio(
                    on["server_cpu_ms_per_job"], off["server_cpu_ms_per_job"]
                ),
                # On a saturated machine throughput goes as the inverse of this.
                f"cpu_per_job_vs_{b}": ratio(on["cpu_ms_per_job"], off["cpu_ms_per_job"]),
                "failed": sum(r.get("failed", 0) for recs in by.values() for r in recs),
                c.box_field: self.boxes.get(a),
                f"{c.box_field}_{b}": self.boxes.get(b),
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
