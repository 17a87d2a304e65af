"""The comparison step: agent, floor, peer and bare grpcio servers, interleaved.

Each round measures, in a rotating order so that slow drifts of a noisy
machine hit every target alike:

* the floor (serial, and ``floor_in_flight`` at once);
* the agent and, when given, the peer, with the original protocol
  (StartJob, then QueryJob every ``poll_ms`` until done) at 1 and at
  ``main_level`` in flight;
* ``unary_callers`` concurrent callers of an empty unary method on a bare
  grpc.aio server and a bare thread-pool grpc.server, and of QueryJob on
  the agent (a finished job).

Then one summary record per target and level: medians over the rounds and
the ratios to the peer, to the floor and to the bare aio call.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from agent._proto import jobscheduler_pb2 as pb
from bench import workloads as wl
from bench.output import note
from bench.targets import Agent, BareServer, Mode, Peer

Emit = Callable[[dict[str, Any]], object]
MEDIANS = (
    "jobs_per_s",
    "p50_ms",
    "p99_ms",
    "server_cpu_ms_per_job",
    "jobs_cpu_ms_per_job",
    "client_cpu_cores",
    "other_cpu_cores",
)
UNARY_MEDIANS = (
    "calls_per_s",
    "p50_ms",
    "p99_ms",
    "server_cpu_ms_per_call",
    "client_cpu_cores",
    "other_cpu_cores",
)


def _median(recs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class Comparison:
    """One mode's comparison: runs the rounds, then summarises them."""

    def __init__(
        self,
        ctx: wl.Ctx,
        mode: Mode,
        agent: Agent,
        peer: Peer | None,
        bares: list[BareServer],
        emit: Emit,
    ) -> None:
        self.ctx = ctx
        self.mode = mode
        self.agent = agent
        self.peer = peer
        self.bares = bares
        self.emit = emit
        self.jobs: list[dict[str, Any]] = []
        self.unary: list[dict[str, Any]] = []
        self.levels = sorted({1, ctx.p.main_level})

    def _floor(self, rnd: int) -> None:
        p = self.ctx.p
        _, recs = wl.floor(self.ctx, self.mode, p.floor_serial, p.floor_concurrent, switch=False)
        for r in recs:
            r.update(
                {
                    "name": "cmp_jobs",
                    "target": "floor",
                    "round": rnd,
                    "variant": "serial" if r["in_flight"] == 1 else "concurrent",
                }
            )
            self.jobs.append(r)
            self.emit(r)

    def _jobs(self, target: wl.Target, rnd: int) -> None:
        for n in self.levels:
            note(f"compare round {rnd}: {target.name}, original protocol, {n} in flight")
            r = wl.jobs(self.ctx, target, "original", n, "cmp_jobs")
            r["round"] = rnd
            self.jobs.append(r)
            self.emit(r)

    def _unary(self, rnd: int, job_id: str) -> None:
        c = self.ctx.p.unary_callers
        for b in self.bares:
            note(f"compare round {rnd}: {b.name}, empty unary, {c} in flight")
            r = wl.calls(self.ctx, b, "unary", c, "cmp_unary")
            r["round"] = rnd
            self.unary.append(r)
            self.emit(r)
        note(f"compare round {rnd}: agent QueryJob, {c} in flight")
        r = wl.calls(self.ctx, self.agent, "query", c, "cmp_unary", job_id=job_id)
        r.update({"target": "agent_query", "round": rnd})
        self.unary.append(r)
        self.emit(r)

    def run(self) -> None:
        """All rounds, then the summary records."""
        ch, stub = self.agent.stub()
        try:
            job_id = stub.RunJob(pb.StartJobReq(command="/bin/true"), timeout=30).jobID
        finally:
            ch.close()
        blocks: list[Callable[[int], None]] = [self._floor, lambda r: self._jobs(self.agent, r)]
        if self.peer is not None:
            peer = self.peer
            blocks.append(lambda r: self._jobs(peer, r))
        if self.bares:
            blocks.append(lambda r: self._unary(r, job_id))
        for rnd in range(self.ctx.p.compare_rounds):
            k = rnd % len(blocks)
            for block in blocks[k:] + blocks[:k]:
                block(rnd)
        self.summarise()

    def summarise(self) -> None:
        """Medians over rounds per target and level, with the ratios."""
        fl_n = self.ctx.p.floor_in_flight
        by: dict[tuple[str, int], dict[str, Any]] = {}
        for target, n in sorted({(r["target"], r["in_flight"]) for r in self.jobs}):
            recs = [r for r in self.jobs if r["target"] == target and r["in_flight"] == n]
            by[(target, n)] = {
                "name": "cmp_summary_jobs",
                "target": target,
                "in_flight": n,
                "rounds": len(recs),
                **{k: _median(recs, k) for k in MEDIANS},
            }
        for (target, n), s in by.items():
            if target == "floor":
                continue
            floor = by.get(("floor", 1 if n == 1 else fl_n))
            peer = by.get(("peer", n))
            for other, ref in (("floor", floor), ("peer", peer)):
                if ref is None or other == target:
                    continue
                s[f"jobs_per_s_vs_{other}"] = _ratio(s["jobs_per_s"], ref["jobs_per_s"])
                s[f"p50_vs_{other}"] = _ratio(s["p50_ms"], ref["p50_ms"])
                s[f"server_cpu_per_job_vs_{other}"] = _ratio(
                    s["server_cpu_ms_per_job"], ref["server_cpu_ms_per_job"]
                )
        for s in by.values():
            self.emit(s)
        uby: dict[str, dict[str, Any]] = {}
        for target in dict.fromkeys(r["target"] for r in self.unary):
            recs = [r for r in self.unary if r["target"] == target]
            uby[target] = {
                "name": "cmp_summary_unary",
                "target": target,
                "callers": recs[0]["callers"],
                "rounds": len(recs),
                **{k: _median(recs, k) for k in UNARY_MEDIANS},
            }
        bare = uby.get("bare_aio")
        for target, s in uby.items():
            if bare is not None and target != "bare_aio":
                s["bare_aio_cpu_ms_per_call"] = bare["server_cpu_ms_per_call"]
                s["server_cpu_ms_per_call_vs_bare_aio"] = _ratio(
                    s["server_cpu_ms_per_call"], bare["server_cpu_ms_per_call"]
                )
                s["calls_per_s_vs_bare_aio"] = _ratio(s["calls_per_s"], bare["calls_per_s"])
                s["p50_vs_bare_aio"] = _ratio(s["p50_ms"], bare["p50_ms"])
            self.emit(s)
