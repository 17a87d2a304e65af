"""The benchmark: a real agent with mTLS on loopback, measured beside the floor.

``python -m bench [--quick] [--out DIR] [--modes root,user] [--profile]
[--peer-addr HOST:PORT | --peer-cmd CMD]`` (see bench/README.md). Prints one
JSON line per measurement on stdout, progress on stderr, and writes
``DIR/latest.json``, ``DIR/latest.md`` and, for a full run,
``docs/benchmarks.md`` and ``docs/benchmarks-latency.png``.

This module is the command line and the order of things; what is measured
lives in ``bench.workloads``, ``bench.compare``, ``bench.boxcost`` and ``bench.baseline``, what
it runs against in
``bench.targets``, how clients are driven in ``bench.driver``, and the
tables in ``bench.report``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from agent._proto import jobscheduler_pb2 as pb
from bench import agentctlcost, fleet, procstat
from bench import interp as interpreter
from bench import workloads as wl
from bench.baseline import BaselineCost
from bench.boxcost import SECCOMP, USERS, VariantCost, VariantPair
from bench.compare import Comparison
from bench.driver import Driver
from bench.goals import targets
from bench.output import clean, emit, note
from bench.params import FULL, QUICK, Params
from bench.targets import (
    ROOT,
    Agent,
    BareServer,
    BenchCgroup,
    Mode,
    Peer,
    StubScheduler,
    gen_certs,
    make_modes,
)

STEPS = (
    "rpc",
    "levels",
    "wait",
    "qps",
    "history",
    "running",
    "stream",
    "compare",
    "seccomp",
    "users",
    "agentctl",
)
# Not among the default steps: runs with --baseline-python (``all`` or ``--steps baseline``).
BASELINE = "baseline"
# Not among the default steps either (thousands of stand-in workers): only ``--steps fleet``.
FLEET = "fleet"


class Bench:
    """One run: the context every workload shares, the records, the order of steps."""

    def __init__(
        self,
        args: argparse.Namespace,
        ctx: wl.Ctx,
        base: Path,
        certs: Path,
        peer: Peer | None,
        cgroup: BenchCgroup | None = None,
    ) -> None:
        self.args = args
        self.cgroup = cgroup
        self.agents: dict[str, Agent] = {}  # mode -> its agent (stopped between steps)
        self.ctx = ctx
        self.p = ctx.p
        self.base = base
        self.certs = certs
        self.peer = peer
        self.records: list[dict[str, Any]] = []
        self.started = 0  # jobs started on the current agent (its history)
        self._agentctl_done = False  # the agentctl step runs against the first mode only
        self.profiles: dict[str, str] = {}  # mode -> py-spy summary (--profile)
        self.baseline_result: dict[str, Any] | None = None  # the baseline step's summary
        self.head = os.path.realpath(shutil.which("head") or "/usr/bin/head")

    def step(self, name: str) -> bool:
        """Whether ``--steps`` asks for this step."""
        return self.args.steps == "all" or name in self.args.steps.split(",")

    def out(self, mode: Mode, rec: dict[str, Any]) -> dict[str, Any]:
        """Emit a workload's record for ``mode``; count the jobs it started."""
        self.started += rec.get("jobs_started", 0) if rec.get("target") == "agent" else 0
        emit({"mode": mode.key, **rec}, self.records)
        return rec

    def jobs(
        self,
        agent: Agent,
        mode: Mode,
        protocol: str,
        n: int,
        floor: dict[str, Any],
        name: str,
        count: int | None = None,
    ) -> None:
        self.out(mode, wl.jobs(self.ctx, agent, protocol, n, name, floor=floor, count=count))

    def setup_calls(self, agent: Agent, mode: Mode) -> None:
        """QueryJob latency on a running and on a finished job."""
        ch, stub = agent.stub()
        try:
            running = stub.StartJob(
                pb.StartJobReq(command="/bin/sleep", path="600"), timeout=30
            ).jobID
            finished = stub.StartJob(pb.StartJobReq(command="/bin/true"), timeout=30).jobID
            stub.WaitJob(pb.WaitJobReq(jobID=finished, waitMillis=10_000), timeout=15)
            self.started += 2
            if self.step("rpc"):
                note("QueryJob latency")
                for job_id, name in (
                    (running, "query_rpc_running_job"),
                    (finished, "query_rpc_finished_job"),
                ):
                    self.out(
                        mode,
                        wl.calls(
                            self.ctx,
                            agent,
                            "query",
                            1,
                            name,
                            job_id=job_id,
                            warm=min(0.3, self.p.warm),
                            duration=self.p.rpc_duration,
                        ),
                    )
            stub.StopJob(pb.StopJobReq(jobID=running), timeout=30)
            stub.WaitJob(pb.WaitJobReq(jobID=running, waitMillis=30_000), timeout=35)
        finally:
            ch.close()

    def history(
        self, agent: Agent, mode: Mode, floor: dict[str, Any], idle: dict[str, float]
    ) -> None:
        """Run jobs until the history holds ``p.history`` (half as many more when the
        earlier steps already ran that many), RSS after each quarter; restart; RSS."""
        p = self.p
        # Count from our own bookkeeping: listing 10,000 jobs through the API
        # before measuring would inflate the agent's heap.
        have = self.started
        growth = [(have, procstat.rss_mb(agent.pid)["rss_mb"])]
        # A full run's earlier steps may already have run p.history jobs: the
        # quarters are still needed to tell a plateau from per-job growth.
        left = max(p.history - have, p.history // 2)
        if left > 0:
            note(f"history: {have} jobs, running {left} more")
            # In chunks, with RSS after each: growth that levels off (caches,
            # allocator) is not growth per job.
            for i in range(4):
                n = left // 4 + (1 if i < left % 4 else 0)
                if n:
                    self.jobs(
                        agent,
                        mode,
                        "wait",
                        min(16, max(1, p.main_level)),
                        floor,
                        "history_fill",
                        count=n,
                    )
                    growth.append((self.started, procstat.rss_mb(agent.pid)["rss_mb"]))
        time.sleep(0.5)
        hist = procstat.rss_mb(agent.pid)
        self.out(
            mode,
            {
                "name": "rss_history",
                "retained_jobs": wl.history_count(agent),
                "jobs_run": self.started,
                **hist,
                "above_idle_mb": hist["rss_mb"] - idle["rss_mb"],
                "rss_mb_by_jobs_run": growth,
            },
        )
        note("restart with the full history")
        agent.stop()
        agent.start()
        time.sleep(1.0)
        # RSS first: counting the jobs lists all of them through ListJobs, which
        # leaves its pages resident (about 4 MB for 10,000 jobs): not idle any more.
        rss = procstat.rss_mb(agent.pid)
        self.out(
            mode,
            {
                "name": "rss_idle_with_history",
                "retained_jobs": wl.history_count(agent),
                **rss,
            },
        )

    def compare(self, modes: list[Mode]) -> None:
        """The interleaved comparison of every agent that ran, the peer and the bare servers."""
        agents = [self.agents[m.key] for m in modes if m.key in self.agents]
        if not agents:
            return
        # The floor runs as the unprivileged agent's user when there is one.
        floor_mode = next((m for m in modes if m.key == "user"), modes[0])
        bares = [
            BareServer(
                f,
                self.base,
                self.certs,
                self.ctx.interp,
                self.ctx.helper_path,
                self.p.unary_callers,
            )
            for f in ("aio", "sync")
        ]
        try:
            for a in agents:
                a.start()
            for b in bares:
                b.start()
            Comparison(
                self.ctx, agents, floor_mode, self.peer, bares, lambda r: emit(r, self.records)
            ).run()
        finally:
            for b in bares:
                b.stop()
            for a in agents:
                a.stop()
            self.ctx.driver.kill_all()

    def variants(self, modes: list[Mode], comparison: VariantPair) -> bool:
        """Per mode that ran: two fresh agents whose configurations differ as
        ``comparison`` says (``seccomp``: the full box against ``[confinement] seccomp =
        false``; ``users``: ``[jobs] dynamic_users`` against the fixed job user, root
        agents only), interleaved (bench.boxcost). False when a mode's step failed (the
        others still run)."""

        def make(mode: Mode, variant: str, overrides: dict[str, dict[str, Any]]) -> Agent:
            return Agent(
                mode,
                self.base,
                self.certs,
                self.ctx.interp,
                self.head,
                self.cgroup,
                variant=variant,
                overrides=overrides,
            )

        ok = True
        for m in modes:
            if m.key not in self.agents:
                continue
            if comparison is USERS and m.agent_uid != 0:
                note(f"users step, mode {m.key}: skipped (its keeper cannot switch users)")
                continue
            try:
                VariantCost(self.ctx, m, make, lambda r: emit(r, self.records), comparison).run()
            except Exception as e:  # report and carry on with the next mode
                ok = False
                note(f"{comparison.step} step, mode {m.key}, failed: {type(e).__name__}: {e}")
        return ok

    def baseline(self, mode: Mode, python: str) -> bool:
        """This checkout's agent against the one ``python`` has installed, ``mode``'s
        configuration, interleaved (bench.baseline). False when the step failed."""
        base_interp = interpreter.other(python)

        def make(m: Mode, variant: str, interp: interpreter.Interpreter) -> Agent:
            return Agent(m, self.base, self.certs, interp, self.head, self.cgroup, variant=variant)

        try:
            self.baseline_result = BaselineCost(
                self.ctx, mode, base_interp, make, lambda r: emit(r, self.records)
            ).run()
            return True
        except Exception as e:  # the other figures are still written
            note(f"baseline step, mode {mode.key}, failed: {type(e).__name__}: {e}")
            self.baseline_result = {"mode": mode.key, "error": f"{type(e).__name__}: {e}"}
            return False

    def run_mode(self, mode: Mode) -> dict[str, Any]:
        """Every requested step against one fresh agent."""
        p = self.p
        note(f"mode {mode.key}: {mode.label}")
        floor, recs = wl.floor(self.ctx, mode, p.floor_serial, p.floor_concurrent)
        for r in recs:
            self.out(mode, r)
        agent = Agent(mode, self.base, self.certs, self.ctx.interp, self.head, self.cgroup)
        self.agents[mode.key] = agent
        info: dict[str, Any] = {
            "label": mode.label,
            "agent_user": mode.agent_user,
            "job_user": mode.job_user,
        }
        try:
            agent.start()
            self.started = 0
            info["agent_python"] = agent.python_of_process()
            time.sleep(1.0)
            idle = procstat.rss_mb(agent.pid)
            self.out(mode, {"name": "rss_idle", **idle})
            info["box"] = agent.box()
            self.started += 1
            self.out(mode, {"name": "box", **info["box"]})
            self.setup_calls(agent, mode)
            if self.step("agentctl") and not self._agentctl_done:
                # Whole agentctl commands against this idle agent (what a user waits
                # for, start-up included): once, the first mode; with
                # --agentctl-baseline, an older tree interleaved.
                self._agentctl_done = True
                note("agentctl commands, whole processes")
                rounds = 2 if self.args.quick else max(10, 5 * (self.args.rounds or 3))
                for rec in agentctlcost.measure(
                    agent.addr, self.certs, rounds=rounds, baseline=self.args.agentctl_baseline
                ):
                    self.out(mode, {"name": "agentctl", **rec})
            for n in p.levels if self.step("levels") else ():
                note(f"original protocol, {n} in flight")
                self.jobs(agent, mode, "original", n, floor, "jobs_original")
            for n in p.wait_levels if self.step("wait") else ():
                note(f"WaitJob and RunJob, {n} in flight")
                self.jobs(agent, mode, "wait", n, floor, "jobs_wait")
                self.jobs(agent, mode, "run", n, floor, "jobs_run")
            if self.step("qps"):
                note(f"QueryJob calls/s, {p.qps_callers} callers")
                # A fresh one: the sweep above ran enough jobs for retention
                # to have removed the first.
                ch, stub = agent.stub()
                try:
                    fresh = stub.RunJob(pb.StartJobReq(command="/bin/true"), timeout=30).jobID
                finally:
                    ch.close()
                self.out(
                    mode,
                    wl.calls(self.ctx, agent, "query", p.qps_callers, "query_qps", job_id=fresh),
                )
            if self.args.profile:
                out = Path(self.args.out) / f"profile-{mode.key}.txt"
                prof, summary = wl.profiled_jobs(
                    self.ctx,
                    agent,
                    self.args.profile_level or p.main_level,
                    floor,
                    out,
                    self.args.native,
                )
                if prof:
                    self.out(mode, prof)
                if summary:
                    (Path(self.args.out) / f"profile-{mode.key}.summary.txt").write_text(summary)
                    self.profiles[mode.key] = summary
                    note(f"profile of the agent ({mode.key}) in {out}; summary:\n{summary}")
            if self.step("history"):
                self.history(agent, mode, floor, idle)
            # The shipped limits (max_running, output_bytes) refuse these two.
            shipped = mode.key == "shipped"
            if shipped and (self.step("running") or self.step("stream")):
                note("shipped config: no running-jobs or streaming step (its limits refuse them)")
            if self.step("running") and not shipped:
                note(f"{p.running} jobs running at once")
                self.out(
                    mode, wl.running_jobs(self.ctx, agent, procstat.rss_mb(agent.pid)["rss_mb"])
                )
            for c in p.stream_clients if self.step("stream") and not shipped else ():
                note(f"streaming {p.stream_bytes / procstat.MB:.0f} MB to {c} client(s)")
                self.out(mode, wl.stream(self.ctx, agent, c, self.head))
            info["agent_exit"] = agent.stop()
        finally:
            agent.stop()
            self.ctx.driver.kill_all()
        info["floor"] = floor
        return info


def machine_info(interp: interpreter.Interpreter) -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import google.protobuf

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python_bench": platform.python_version(),
        "python_agent": interp.version,
        "python_agent_argv": list(interp.argv),
        "interpreter_note": interp.note,
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "loadavg_start": procstat.load_average(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see bench/README.md)."""
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--quick", action="store_true", help="tiny counts: a smoke run in seconds")
    add(
        "--out",
        default=str(ROOT / "bench" / "results"),
        help="results folder (latest.json, latest.md)",
    )
    add(
        "--modes",
        default="root,user,shipped",
        help="agent modes to measure: root (agent root, jobs as --user), user "
        "(agent and jobs one unprivileged user), shipped (config.toml as shipped); "
        "default all three",
    )
    add("--user", default="nobody", help="the unprivileged user (default nobody)")
    add(
        "--python",
        default="auto",
        help="interpreter for agent, floor and clients: auto, venv or a path",
    )
    add("--duration", type=float, help="seconds per throughput point")
    add("--levels", help="jobs in flight to sweep, e.g. 1,2,4,8,16,32")
    add(
        "--rounds",
        type=int,
        help="interleaved rounds of the compare, seccomp and users steps (default 3)",
    )
    add(
        "--docs",
        dest="docs",
        action="store_true",
        default=None,
        help="write docs/benchmarks.md and the plot (default for a full run)",
    )
    add("--no-docs", dest="docs", action="store_false")
    add(
        "--profile",
        action="store_true",
        help="also run py-spy on the agent under the main original-protocol load",
    )
    add("--native", action="store_true", help="with --profile: native frames too")
    add("--profile-level", type=int, help="jobs in flight while profiling (default 16)")
    add("--history", type=int, help="jobs to run before the retained-history RSS (default 10000)")
    add(
        "--steps",
        default="all",
        help=f"comma list of {','.join(STEPS)},{BASELINE},{FLEET} (default all; {BASELINE} "
        f"only with --baseline-python; {FLEET} only when named: see bench/fleet.py)",
    )
    fleet.add_args(ap)
    add(
        "--baseline-python",
        help="an interpreter with another version of the agent installed: the baseline "
        "step runs its agent beside this checkout's (the first of --modes), interleaved",
    )
    add(
        "--baseline-jobs",
        type=int,
        help="with --baseline-python: jobs per agent before the second RSS (default 2000)",
    )
    add(
        "--agentctl-baseline",
        help="a checkout of an older agent (git worktree) whose agentctl the agentctl step "
        "times beside this one",
    )
    add(
        "--peer-addr",
        help="a worker speaking the original protocol, to compare with "
        "(default 127.0.0.1:30000 with --peer-cmd)",
    )
    add(
        "--peer-cmd",
        help="start this peer (split like a shell would, no shell) and stop "
        "it at the end; its CPU is read from /proc",
    )
    add("--peer-cwd", help="working folder of --peer-cmd (default: a temporary one)")
    add("--peer-ca", help="the peer serves TLS: verify it with this CA (default plaintext)")
    add("--peer-pid", type=int, help="pid of an already running --peer-addr, for its CPU")
    add(
        "--peer-scheduler",
        help="serve a stub Scheduler (plaintext) here while the peer "
        "runs: the original worker exits unless it can register",
    )
    add("--keep", action="store_true", help="keep the temporary folder")
    return ap.parse_args(argv)


def params_of(args: argparse.Namespace) -> Params:
    """FULL or QUICK with the command line's overrides."""
    p = QUICK if args.quick else FULL
    if args.duration:
        p = p.replace(duration=args.duration)
    if args.history:
        p = p.replace(history=args.history)
    if args.levels:
        p = p.replace(levels=tuple(int(x) for x in args.levels.split(",")))
    if args.rounds:
        p = p.replace(compare_rounds=args.rounds)
    if args.baseline_jobs is not None:
        p = p.replace(baseline_history=args.baseline_jobs)
    return p


def write_results(result: dict[str, Any], out: Path, docs: bool) -> None:
    """latest.json, latest.md and (``docs``) docs/benchmarks.md with its plot."""
    from bench import report

    (out / "latest.json").write_text(json.dumps(clean(result), indent=1) + "\n")
    (out / "latest.md").write_text(report.markdown(result))
    if docs:
        docs_dir = ROOT / "docs"
        docs_dir.mkdir(exist_ok=True)
        plot = report.plot(result, docs_dir / "benchmarks-latency.png")
        report.write_docs_page(docs_dir / "benchmarks.md", result, plot is not None)
    else:
        report.plot(result, out / "latency.png")


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit status 0 unless something failed to run."""
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the agents (in their own sessions) are
    # stopped and the temporary folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = params_of(args)
    steps = set(args.steps.split(",")) if args.steps != "all" else set()
    if FLEET in steps:
        # One scheduler against stand-in workers: no agent, no modes (bench/fleet.py).
        status = fleet.run(args, Path(args.out))
        steps.discard(FLEET)
        if not steps:
            return status
        args.steps = ",".join(sorted(steps))
    if BASELINE in steps and not args.baseline_python:
        note(f"--steps {BASELINE} needs --baseline-python")
        return 2
    if args.baseline_python and not os.access(args.baseline_python, os.X_OK):
        note(f"--baseline-python {args.baseline_python}: not an executable")
        return 2
    modes = make_modes([m.strip() for m in args.modes.split(",") if m.strip()], args.user)
    if not modes:
        note("nothing to measure")
        return 2
    docs = (not args.quick) if args.docs is None else args.docs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    interp = interpreter.choose(args.python, next((m.prefix for m in modes if m.prefix), None))
    if interp.note:
        note(interp.note)
    base = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    os.chmod(base, 0o755)
    certs = base / "certs"
    gen_certs(certs)
    lib = interpreter.helper_lib(base)
    ctx = wl.Ctx(
        Driver(interp, interpreter.helper_path(lib, interp), base),
        p,
        interp,
        interpreter.helper_path(lib, interp),
    )
    peer = None
    if args.peer_addr or args.peer_cmd:
        peer = Peer(
            args.peer_addr or "127.0.0.1:30000",
            args.peer_cmd,
            Path(args.peer_cwd) if args.peer_cwd else base / "peer",
            args.peer_ca,
            args.peer_pid,
        )
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": args.quick,
        "params": dict(p.__dict__),
        "machine": machine_info(interp),
        "peer": peer.describe() if peer else None,
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    cgroup = BenchCgroup.make()
    if cgroup is not None:
        note(f"job cgroups below {cgroup.path}")
    bench = Bench(args, ctx, base, certs, peer, cgroup)
    infos: dict[str, Any] = {}
    status = 0
    t0 = time.monotonic()
    sched = None
    try:
        if peer is not None:
            sched = StubScheduler(args.peer_scheduler) if args.peer_scheduler else None
            peer.start()
        # --steps baseline alone: no per-mode steps (floor, idle agent, box) at all.
        per_mode = any(bench.step(s) for s in STEPS)
        for m in modes if per_mode else ():
            try:
                infos[m.key] = bench.run_mode(m)
            except Exception as e:  # report and carry on with the next mode
                status = 1
                note(f"mode {m.key} failed: {type(e).__name__}: {e}")
                infos[m.key] = {"label": m.label, "error": f"{type(e).__name__}: {e}"}
                bench.agents.pop(m.key, None)
        if bench.step("compare"):
            try:
                bench.compare(modes)
            except Exception as e:  # the per-mode figures are still written
                status = 1
                note(f"compare failed: {type(e).__name__}: {e}")
        for cmp in (SECCOMP, USERS):
            if bench.step(cmp.step) and not bench.variants(modes, cmp):
                status = 1
        if (
            args.baseline_python
            and bench.step(BASELINE)
            and not bench.baseline(modes[0], args.baseline_python)
        ):
            status = 1
    finally:
        for a in bench.agents.values():
            a.stop()
        if cgroup is not None:
            cgroup.remove()
        if peer is not None:
            peer.stop()
        if sched is not None:
            sched.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            note(f"kept {base}")
    meta["elapsed_s"] = time.monotonic() - t0
    meta["machine"]["loadavg_end"] = procstat.load_average()
    tg = [t for m in modes if m.key in infos for t in targets(bench.records, m.key, p)]
    for t in tg:
        emit(
            {
                "mode": t["mode"],
                "name": "target",
                "target": t["target"],
                "value": t["value"],
                "limit": t["limit"],
                "pass": t["pass"],
            },
            [],
        )
    result = {
        "meta": meta,
        "modes": infos,
        "records": bench.records,
        "targets": tg,
        "profiles": bench.profiles,
    }
    if bench.baseline_result is not None:
        result["baseline"] = bench.baseline_result
    write_results(result, out, docs)
    note(f"done in {meta['elapsed_s']:.0f}s; results in {out}/latest.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
