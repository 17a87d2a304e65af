"""The issue's targets, each computed from this run's own figures: PASS or FAIL."""

from __future__ import annotations

from typing import Any

from bench.params import Params

QUERY_VS_BARE = 1.2  # QueryJob's server CPU per call against the bare aio server's


def targets(records: list[dict[str, Any]], mode: str, p: Params) -> list[dict[str, Any]]:
    """The targets for one agent mode."""

    def find(name: str, **kw: Any) -> dict[str, Any] | None:
        for r in records:
            if (
                r["mode"] == mode
                and r["name"] == name
                and all(r.get(k) == v for k, v in kw.items())
            ):
                return r
        return None

    out = []

    def add(
        target: str, value: float | None, limit: float | None, ok: bool | None, shown: str
    ) -> None:
        out.append(
            {
                "mode": mode,
                "target": target,
                "value": value,
                "limit": limit,
                "pass": ok,
                "shown": shown,
            }
        )

    fs = find("floor_serial")
    fc = find("floor_concurrent")
    lvl = p.main_level
    o16 = find("jobs_original", in_flight=lvl)
    if o16 and fc:
        r = o16["jobs_per_s"] / fc["jobs_per_s"]
        add(
            f"throughput, {lvl} in flight, original protocol >= 0.4x floor",
            r,
            0.4,
            r >= 0.4,
            f"{o16['jobs_per_s']:.0f}/s vs floor {fc['jobs_per_s']:.0f}/s = {r:.2f}x",
        )
    o1 = find("jobs_original", in_flight=1)
    if o1 and fs:
        r = o1["p50_ms"] / fs["p50_ms"]
        add(
            "start-to-done p50, 1 in flight, 1 ms polling <= 3x floor",
            r,
            3.0,
            r <= 3.0,
            f"{o1['p50_ms']:.2f} ms vs floor {fs['p50_ms']:.2f} ms = {r:.2f}x",
        )
    waits = [w for w in (find("jobs_wait", in_flight=1), find("jobs_run", in_flight=1)) if w]
    if waits and fs:
        w1 = min(waits, key=lambda w: w["p50_ms"])
        how = "RunJob" if w1["protocol"] == "run" else "StartJob + WaitJob"
        r = w1["p50_ms"] / fs["p50_ms"]
        add(
            "start-to-done p50, 1 in flight, faster wait <= 2x floor",
            r,
            2.0,
            r <= 2.0,
            f"{w1['p50_ms']:.2f} ms ({how}) vs floor {fs['p50_ms']:.2f} ms = {r:.2f}x",
        )
    idle = find("rss_idle")
    if idle:
        v = idle["rss_mb"]
        add("idle RSS <= 40 MB", v, 40.0, v <= 40.0, f"{v:.1f} MB")
    hist = find("rss_history")
    if hist and idle:
        d = hist["rss_mb"] - idle["rss_mb"]
        add(
            f"RSS after {p.history} retained jobs <= idle + 10 MB",
            d,
            10.0,
            d <= 10.0 and hist["retained_jobs"] >= p.history,
            f"{hist['rss_mb']:.1f} MB = idle + {d:.1f} MB ({hist['retained_jobs']} retained)",
        )
    s1 = find("stream", clients=1)
    if s1:
        v = s1["mb_per_s_per_client_min"]
        add(
            "streaming to one client >= 200 MB/s",
            v,
            200.0,
            v >= 200.0 and s1["verified"],
            f"{v:.0f} MB/s" + ("" if s1["verified"] else " (byte count NOT verified)"),
        )
    q = find("cmp_summary_unary", target="agent_query")
    if q and q.get("server_cpu_ms_per_call_vs_bare_aio") is not None:
        r = q["server_cpu_ms_per_call_vs_bare_aio"]
        add(
            f"QueryJob server CPU per call, {q['callers']} in flight, <= {QUERY_VS_BARE}x "
            "bare grpc.aio empty call",
            r,
            QUERY_VS_BARE,
            r <= QUERY_VS_BARE,
            f"{q['server_cpu_ms_per_call']:.3f} ms vs {q['bare_aio_cpu_ms_per_call']:.3f} ms "
            f"= {r:.2f}x",
        )
    return out
