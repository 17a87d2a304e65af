"""The benchmark targets (throughput against the original worker, RSS, the box's
cost), each computed from this run's own figures: PASS, FAIL or not measured.

Most come from the interleaved ``compare`` step (its ``cmp_summary_*`` medians); the
RSS ones from ``rss_idle`` and the history step's quarters (``rss_history``); the
seccomp layer's from the interleaved ``seccomp`` step (``seccomp_summary``).
"""

from __future__ import annotations

from typing import Any

from bench.compare import SHARED
from bench.params import Params

VS_PEER_1 = 0.9  # original protocol, 1 in flight, against the peer
VS_PEER_N = 0.6  # original protocol, main_level in flight, against the peer
RUN_VS_PEER = 1.0  # RunJob at main_level against the peer's polling at main_level
SHIPPED_VS_FASTEST = 0.9  # the shipped config.toml against the fastest configuration
IDLE_RSS_MB = 40.0
FLAT_MB = 2.0  # RSS growth allowed over the last three quarters of the history
QUERY_VS_BARE = 1.2  # QueryJob's server CPU per call against the bare aio server's
SECCOMP_VS_NONE = 0.95  # the full box at main_level against the same config without seccomp


def targets(records: list[dict[str, Any]], mode: str, p: Params) -> list[dict[str, Any]]:
    """The targets for one agent mode."""

    def find(name: str, of: str = mode, **kw: Any) -> dict[str, Any] | None:
        for r in records:
            if r["mode"] == of and r["name"] == name and all(r.get(k) == v for k, v in kw.items()):
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

    lvl = p.main_level
    compared = find("cmp_summary_jobs", target="agent") is not None

    def vs_peer(target: str, protocol: str, n: int, limit: float) -> None:
        me = find("cmp_summary_jobs", target="agent", protocol=protocol, in_flight=n)
        peer = find("cmp_summary_jobs", SHARED, target="peer", protocol="original", in_flight=n)
        if me is None or not compared:
            add(target, None, limit, None, "not measured (no compare step)")
        elif peer is None or not peer.get("jobs_per_s"):
            add(target, None, limit, None, "not measured (no peer)")
        else:
            r = me["jobs_per_s"] / peer["jobs_per_s"]
            add(
                target,
                r,
                limit,
                r >= limit,
                f"{me['jobs_per_s']:.0f}/s vs peer {peer['jobs_per_s']:.0f}/s = {r:.2f}x",
            )

    vs_peer(f"original protocol, 1 in flight, >= {VS_PEER_1}x the peer", "original", 1, VS_PEER_1)
    vs_peer(
        f"original protocol, {lvl} in flight, >= {VS_PEER_N}x the peer", "original", lvl, VS_PEER_N
    )
    vs_peer(
        f"RunJob, {lvl} in flight, >= {RUN_VS_PEER}x the peer's polling at {lvl}",
        "run",
        lvl,
        RUN_VS_PEER,
    )
    if mode == "shipped":
        for n in sorted({1, lvl}):
            target = (
                f"shipped config.toml, original protocol, {n} in flight, "
                f">= {SHIPPED_VS_FASTEST}x the fastest agent configuration"
            )
            me = find("cmp_summary_jobs", target="agent", protocol="original", in_flight=n)
            r = me.get("jobs_per_s_vs_fastest") if me else None
            if me is None or r is None:
                why = "no compare step" if me is None else "no other configuration"
                add(target, None, SHIPPED_VS_FASTEST, None, f"not measured ({why})")
            else:
                add(
                    target,
                    r,
                    SHIPPED_VS_FASTEST,
                    r >= SHIPPED_VS_FASTEST,
                    f"{me['jobs_per_s']:.0f}/s vs {me['fastest_mode']} "
                    f"{me['jobs_per_s'] / r:.0f}/s = {r:.2f}x",
                )
    idle = find("rss_idle")
    if idle:
        v = idle["rss_mb"]
        add(
            f"idle RSS <= {IDLE_RSS_MB:.0f} MB",
            v,
            IDLE_RSS_MB,
            v <= IDLE_RSS_MB,
            f"{v:.1f} MB (anon {idle.get('anon_mb', 0):.1f})",
        )
    hist = find("rss_history")
    flat = f"RSS flat with history: <= +{FLAT_MB:.0f} MB over the last 3 of 4 quarters"
    quarters = hist.get("rss_mb_by_jobs_run", [])[1:] if hist else []
    if len(quarters) < 2:
        add(flat, None, FLAT_MB, None, "not measured (no history step)")
    else:
        assert hist is not None
        d = quarters[-1][1] - quarters[0][1]
        after = find("rss_idle_with_history")
        add(
            flat,
            d,
            FLAT_MB,
            d <= FLAT_MB and hist["retained_jobs"] >= p.history,
            f"{' -> '.join(f'{q[1]:.1f}' for q in quarters)} MB after "
            f"{' / '.join(str(q[0]) for q in quarters)} jobs: {d:+.1f} MB; "
            f"{hist['retained_jobs']} retained"
            + (f", {after['rss_mb']:.1f} MB restarted with them" if after else ""),
        )
    q = find("cmp_summary_unary", target="agent_query")
    qt = (
        f"QueryJob server CPU per call, {p.unary_callers} in flight, "
        f"<= {QUERY_VS_BARE}x bare grpc.aio empty call"
    )
    if q and q.get("server_cpu_ms_per_call_vs_bare_aio") is not None:
        r = q["server_cpu_ms_per_call_vs_bare_aio"]
        add(
            qt,
            r,
            QUERY_VS_BARE,
            r <= QUERY_VS_BARE,
            f"{q['server_cpu_ms_per_call']:.3f} ms vs {q['bare_aio_cpu_ms_per_call']:.3f} ms "
            f"= {r:.2f}x",
        )
    else:
        add(qt, None, QUERY_VS_BARE, None, "not measured (no compare step)")
    sc = find("seccomp_summary", in_flight=lvl)
    st = (
        f"full box, original protocol, {lvl} in flight, >= {SECCOMP_VS_NONE}x the same "
        "config with seccomp = false"
    )
    if sc is None or sc.get("jobs_per_s_vs_no_seccomp") is None:
        add(st, None, SECCOMP_VS_NONE, None, "not measured (no seccomp step)")
    else:
        r = sc["jobs_per_s_vs_no_seccomp"]
        paired = sc.get("jobs_per_s_vs_no_seccomp_paired")
        add(
            st,
            r,
            SECCOMP_VS_NONE,
            r >= SECCOMP_VS_NONE,
            f"{sc['jobs_per_s']:.0f}/s vs {sc['jobs_per_s_no_seccomp']:.0f}/s = {r:.3f}x"
            + (f" (per-round median {paired:.3f}x)" if paired is not None else ""),
        )
    return out
