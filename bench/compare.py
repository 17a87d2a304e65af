"""The comparison step: every agent mode, the floor, the peer and bare grpcio servers, interleaved.

Each round measures, in a rotating order so that slow drifts of a noisy
machine hit every target alike:

* the floor (serial, and ``floor_in_flight`` at once);
* each agent (one per mode: the bench's own configurations and the shipped
  config.toml, all running side by side and idle while not measured) with
  the original protocol (StartJob, then QueryJob every ``poll_ms`` until
  done) at 1 and at ``main_level`` in flight, and RunJob (one call per job)
  at ``main_level``;
* the peer, when given, with the original protocol at 1 and ``main_level``;
* ``unary_callers`` concurrent callers of an empty unary method on a bare
  grpc.aio server and a bare thread-pool grpc.server, and of QueryJob on
  each agent (a finished job).

Then one summary record per target, protocol and level: medians over the
rounds and the ratios to the peer's original protocol at the same level, to
the floor, to the agent's fastest configuration other than the shipped one
(for the shipped one), and to the bare aio call. Agent records carry their
mode; the floor's, the peer's and the bare servers' carry ``mode =
"compare"``.
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


def median_of(recs: list[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over the records that have a number there (None if none)."""
    vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    return a / b if a is not None and b else None


SHARED = "compare"  # the ``mode`` of the floor's, the peer's and the bare servers' records


class Comparison:
    """The comparison of all agent modes in one set of rounds, then the summaries."""

    def __init__(
        self,
        ctx: wl.Ctx,
        agents: list[Agent],
        floor_mode: Mode,
        peer: Peer | None,
        bares: list[BareServer],
        emit: Emit,
    ) -> None:
        self.ctx = ctx
        self.agents = agents
        self.floor_mode = floor_mode
        self.peer = peer
        self.bares = bares
        self.emit = emit
        self.jobs: list[dict[str, Any]] = []
        self.unary: list[dict[str, Any]] = []
        self.levels = sorted({1, ctx.p.main_level})

    def _keep(self, store: list[dict[str, Any]], mode: str, rec: dict[str, Any], rnd: int) -> None:
        rec = {"mode": mode, **rec, "round": rnd}
        store.append(rec)
        self.emit(rec)

    def _floor(self, rnd: int) -> None:
        p = self.ctx.p
        _, recs = wl.floor(
            self.ctx, self.floor_mode, p.floor_serial, p.floor_concurrent, switch=False
        )
        for r in recs:
            r.update(
                {
                    "name": "cmp_jobs",
                    "target": "floor",
                    "protocol": "spawn",
                    "variant": "serial" if r["in_flight"] == 1 else "concurrent",
                }
            )
            self._keep(self.jobs, SHARED, r, rnd)

    def _agent(self, agent: Agent, rnd: int) -> None:
        key = agent.mode.key
        runs = [("original", n) for n in self.levels] + [("run", self.ctx.p.main_level)]
        for protocol, n in runs:
            note(f"compare round {rnd}: agent {key}, {protocol} protocol, {n} in flight")
            self._keep(self.jobs, key, wl.jobs(self.ctx, agent, protocol, n, "cmp_jobs"), rnd)

    def _peer(self, peer: Peer, rnd: int) -> None:
        for n in self.levels:
            note(f"compare round {rnd}: peer, original protocol, {n} in flight")
            self._keep(self.jobs, SHARED, wl.jobs(self.ctx, peer, "original", n, "cmp_jobs"), rnd)

    def _unary(self, rnd: int, job_ids: dict[str, str]) -> None:
        c = self.ctx.p.unary_callers
        for b in self.bares:
            note(f"compare round {rnd}: {b.name}, empty unary, {c} in flight")
            self._keep(self.unary, SHARED, wl.calls(self.ctx, b, "unary", c, "cmp_unary"), rnd)
        for a in self.agents:
            note(f"compare round {rnd}: agent {a.mode.key} QueryJob, {c} in flight")
            r = wl.calls(self.ctx, a, "query", c, "cmp_unary", job_id=job_ids[a.mode.key])
            r["target"] = "agent_query"
            self._keep(self.unary, a.mode.key, r, rnd)

    def run(self) -> None:
        """All rounds, then the summary records."""
        job_ids = {}
        for a in self.agents:
            ch, stub = a.stub()
            try:
                job_ids[a.mode.key] = stub.RunJob(
                    pb.StartJobReq(command="/bin/true"), timeout=30
                ).jobID
            finally:
                ch.close()
        blocks: list[Callable[[int], None]] = [self._floor]
        for a in self.agents:
            blocks.append(lambda r, a=a: self._agent(a, r))  # type: ignore[misc]
        if self.peer is not None:
            peer = self.peer
            blocks.append(lambda r: self._peer(peer, r))
        if self.bares:
            blocks.append(lambda r: self._unary(r, job_ids))
        for rnd in range(self.ctx.p.compare_rounds):
            k = rnd % len(blocks)
            for block in blocks[k:] + blocks[:k]:
                block(rnd)
        self.summarise()

    def summarise(self) -> None:
        """Medians over rounds per target, protocol and level, with the ratios."""
        fl_n = self.ctx.p.floor_in_flight
        by: dict[tuple[str, str, str, int], dict[str, Any]] = {}
        keys = {(r["mode"], r["target"], r["protocol"], r["in_flight"]) for r in self.jobs}
        for mode, target, protocol, n in sorted(keys):
            recs = [
                r
                for r in self.jobs
                if (r["mode"], r["target"], r["protocol"], r["in_flight"])
                == (mode, target, protocol, n)
            ]
            by[(mode, target, protocol, n)] = {
                "mode": mode,
                "name": "cmp_summary_jobs",
                "target": target,
                "protocol": protocol,
                "in_flight": n,
                "rounds": len(recs),
                **{k: median_of(recs, k) for k in MEDIANS},
            }
        agents = [s for s in by.values() if s["target"] == "agent"]
        for s in by.values():
            n = s["in_flight"]
            if s["target"] == "floor":
                continue
            refs = [("floor", by.get((SHARED, "floor", "spawn", 1 if n == 1 else fl_n)))]
            if s["target"] != "peer":
                refs.append(("peer", by.get((SHARED, "peer", "original", n))))
            if s["mode"] == "shipped":
                # The agent's fastest configuration other than this one, same
                # protocol and level, measured in the same rounds.
                others = [
                    a
                    for a in agents
                    if a["mode"] != "shipped"
                    and (a["protocol"], a["in_flight"]) == (s["protocol"], n)
                    and a["jobs_per_s"]
                ]
                best = max(others, key=lambda a: a["jobs_per_s"], default=None)
                if best is not None:
                    s["fastest_mode"] = best["mode"]
                    refs.append(("fastest", best))
            for other, ref in refs:
                if ref is None:
                    continue
                s[f"jobs_per_s_vs_{other}"] = ratio(s["jobs_per_s"], ref["jobs_per_s"])
                s[f"p50_vs_{other}"] = ratio(s["p50_ms"], ref["p50_ms"])
                s[f"server_cpu_per_job_vs_{other}"] = ratio(
                    s["server_cpu_ms_per_job"], ref["server_cpu_ms_per_job"]
                )
        for s in by.values():
            self.emit(s)
        uby: dict[tuple[str, str], dict[str, Any]] = {}
        for mode, target in dict.fromkeys((r["mode"], r["target"]) for r in self.unary):
            recs = [r for r in self.unary if (r["mode"], r["target"]) == (mode, target)]
            uby[(mode, target)] = {
                "mode": mode,
                "name": "cmp_summary_unary",
                "target": target,
                "callers": recs[0]["callers"],
                "rounds": len(recs),
                **{k: median_of(recs, k) for k in UNARY_MEDIANS},
            }
        bare = uby.get((SHARED, "bare_aio"))
        for (_, target), s in uby.items():
            if bare is not None and target != "bare_aio":
                s["bare_aio_cpu_ms_per_call"] = bare["server_cpu_ms_per_call"]
                s["server_cpu_ms_per_call_vs_bare_aio"] = ratio(
                    s["server_cpu_ms_per_call"], bare["server_cpu_ms_per_call"]
                )
                s["calls_per_s_vs_bare_aio"] = ratio(s["calls_per_s"], bare["calls_per_s"])
                s["p50_vs_bare_aio"] = ratio(s["p50_ms"], bare["p50_ms"])
            self.emit(s)
