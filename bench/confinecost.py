"""What the per-job box costs: jobs through the spawner with and without confinement.

``python -m bench.confinecost [--jobs N] [--levels 1,16] [--rounds R] [--user NAME]
[--configs bare,landlock,seccomp] [--samples N]``

Runs ``/bin/true`` through :class:`agent.keeper.spawn.SpawnerOps` (what the agent
uses, no gRPC) in three configurations, interleaved in rounds in one process (each
level measured on every configuration back to back, the order rotating by round):

* ``bare``: no Landlock, no seccomp, no scratch directory (no confinement at all);
* ``landlock``: the default entry's Landlock ruleset (OS tree, standard devices, no
  TCP, scoped signals and sockets) with a deny list inside /etc (hole punching, the
  worst case of the shipped unit) and a per-job scratch directory (created, granted,
  removed);
* ``seccomp``: ``landlock`` plus the default entry's seccomp filter (``SeccompSpec()``,
  compiled once by the spawner, installed in each child last before execve): the full
  job box;
* with ``--user`` (as root) all three switch to that user, and the boxes drop every
  capability.

Prints one JSON line per measurement, then the medians and, at each level, the ratio of
``landlock`` to ``bare`` throughput (target: at least 0.8 at 16 in flight) and of
``seccomp`` to ``landlock`` (target: at least 0.95 at 16 in flight). Then,
apart from the spawner, what the filter costs by itself (``--samples`` of each):
compiling it (:func:`agent.keeper.seccomp.prepare`, once per entry in the spawner),
installing it (one ``seccomp(SET_MODE_FILTER)`` in a freshly forked child after
no_new_privs, what every job's child does), and a system call the filter lets through
(``getppid``, timed in a child with and without it). Cgroups are not part of this
measurement; the full run (``python -m bench``) measures the agent as configured.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import json
import os
import pwd
import shutil
import statistics
import struct
import sys
import tempfile
import time
from typing import Any

from agent.keeper import landlock, policy, seccomp
from agent.keeper.spawn import SpawnerOps, SpawnSpec

from .spawnloop import levels, measure

CONFIGS = ("bare", "landlock", "seccomp")
# (configuration, what it is compared with, the target at 16 in flight)
RATIOS = (("landlock", "bare", 0.8), ("seccomp", "landlock", 0.95))
_PR_SET_NO_NEW_PRIVS = 38


async def _measure(
    ops: SpawnerOps, spec: SpawnSpec, jobs: int, level: int, scratch: str | None
) -> dict[str, Any]:
    counter = 0

    def spec_for() -> SpawnSpec:
        nonlocal counter
        counter += 1
        if scratch is None:
            return spec
        return dataclasses.replace(spec, scratch=f"{scratch}/{os.getpid()}-{counter}")

    return await measure(
        ops,
        spec_for,
        jobs,
        level,
        spawner_pid=ops.spawner_pid,
        spawner_cpu=True,
        jobs_cpu=True,
        check_exit=True,
    )


async def _run(args: argparse.Namespace, tmp: str) -> list[dict[str, Any]]:
    uid = pwd.getpwnam(args.user).pw_uid if args.user else None
    abi = landlock.abi_version()
    scratch_root = os.path.join(tmp, "scratch")
    os.mkdir(scratch_root, 0o711)
    null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
    base = SpawnSpec(
        argv=["/bin/true"],
        executable="/bin/true",
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
        stdout_fd=null,
        uid=uid,
        gid=uid,
        umask=0o077,
        limits={},
    )
    # The default entry's specs, and a deny list as the shipped unit has it (/etc/worker-agent).
    default = policy.Confinement()
    spec = default.landlock
    assert spec is not None and default.seccomp is not None
    deny = (
        "/etc/worker-agent",
        "/etc/ssl/private",
        "/var/lib/worker-agent",
        "/var/log/worker-agent/audit.log",
    )
    boxed = dataclasses.replace(
        base,
        landlock=dataclasses.replace(spec, read_exec=(*spec.read_exec, "/bin/true"), deny=deny),
        landlock_abi=abi,
    )
    filtered = dataclasses.replace(boxed, seccomp=default.seccomp)
    specs = {
        "bare": (base, None),
        "landlock": (boxed, scratch_root),
        "seccomp": (filtered, scratch_root),
    }
    configs = [(name, *specs[name]) for name in args.configs]
    out: list[dict[str, Any]] = []
    ops = SpawnerOps()
    try:
        for rnd in range(args.rounds):
            for level in args.levels:
                k = rnd % len(configs)  # a rotating order: drifts hit every path alike
                for name, s, scratch in configs[k:] + configs[:k]:
                    res = {
                        "path": name,
                        "round": rnd,
                        "abi": abi,
                        **await _measure(ops, s, args.jobs, level, scratch),
                    }
                    print(json.dumps(res), flush=True)
                    out.append(res)
    finally:
        ops.close()
        os.close(null)
    return out


def _in_child(prepared: seccomp.Filter | None, calls: int) -> tuple[float, float]:
    """Fork; the child sets no_new_privs, installs ``prepared`` (when given), then makes
    ``calls`` getppid() calls. Returns (install seconds, seconds per call), as the child
    timed them; raises RuntimeError when the child failed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
            t0 = time.perf_counter_ns()
            if prepared is not None:
                prepared.install()
            t1 = time.perf_counter_ns()
            getppid = os.getppid
            for _ in range(calls):
                getppid()
            t2 = time.perf_counter_ns()
            os.write(w, struct.pack("=qq", t1 - t0, t2 - t1))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = os.read(r, 16)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if len(data) != 16 or os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("the measuring child failed")
    install, loop = struct.unpack("=qq", data)
    return install / 1e9, loop / 1e9 / max(1, calls)


def filter_cost(samples: int, calls: int = 20_000) -> dict[str, Any]:
    """What the default entry's filter costs apart from the spawner: compile (in this
    process), install (a forked child), and a system call it lets through (with and
    without the filter, interleaved). Medians over ``samples``."""
    spec = policy.Confinement().seccomp
    assert spec is not None
    seccomp.prepare(spec)  # libseccomp loaded, its tables warm
    compile_s = []
    for _ in range(samples):
        t0 = time.perf_counter()
        prepared = seccomp.prepare(spec)
        compile_s.append(time.perf_counter() - t0)
    install_s: list[float] = []
    call_with: list[float] = []
    call_without: list[float] = []
    for i in range(samples):
        # Alternating, so a drift of the machine hits both alike.
        for with_filter in (i % 2 == 0, i % 2 == 1):
            inst, per_call = _in_child(prepared if with_filter else None, calls)
            if with_filter:
                install_s.append(inst)
            (call_with if with_filter else call_without).append(per_call)
    m = statistics.median
    return {
        "filter": "default entry (SeccompSpec())",
        "bpf_instructions": len(prepared.program) // 8,
        "samples": samples,
        "compile_ms_median": round(1000 * m(compile_s), 3),
        "compile_ms_p90": round(1000 * sorted(compile_s)[int(0.9 * (samples - 1))], 3),
        "install_us_median": round(1e6 * m(install_s), 1),
        "install_us_p90": round(1e6 * sorted(install_s)[int(0.9 * (samples - 1))], 1),
        "getppid_ns_with_filter": round(1e9 * m(call_with), 1),
        "getppid_ns_without": round(1e9 * m(call_without), 1),
    }


def main(argv: list[str]) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.confinecost")
    p.add_argument("--jobs", type=int, default=1600)
    p.add_argument("--levels", type=levels, default=[1, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--user", default="")
    p.add_argument(
        "--configs",
        type=lambda text: [c for c in text.split(",") if c],
        default=list(CONFIGS),
        help=f"which of {','.join(CONFIGS)} to run (default all; empty: only --samples)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=200,
        help="compilations and installs of the filter to time (0: none)",
    )
    args = p.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not (args.configs or args.samples):
        p.error(f"--configs: unknown {unknown} (choose from {','.join(CONFIGS)})")
    if landlock.abi_version() < 1:
        print("this kernel has no Landlock: nothing to measure", file=sys.stderr)
        return 1
    seccomp_missing = seccomp.unavailable()
    if seccomp_missing and ("seccomp" in args.configs or args.samples):
        print(f"no seccomp filters here: {seccomp_missing}", file=sys.stderr)
        return 1
    results: list[dict[str, Any]] = []
    if args.configs:
        tmp = tempfile.mkdtemp(prefix="confinecost-")
        os.chmod(tmp, 0o711)  # the job user reaches its scratch below
        try:
            results = asyncio.run(_run(args, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print("\nmedian over rounds:", file=sys.stderr)
    for level in args.levels if results else ():
        med: dict[str, float] = {}
        for name in args.configs:
            rows = [r for r in results if r["path"] == name and r["in_flight"] == level]
            med[name] = statistics.median(r["jobs_per_s"] for r in rows)
            lat = statistics.median(r["latency_ms"] for r in rows)
            spawner = statistics.median(r["spawner_cpu_ms_per_job"] for r in rows)
            jobs = statistics.median(r["jobs_cpu_ms_per_job"] for r in rows)
            print(
                f"  {name:8s} in flight {level:3d}: {med[name]:.1f} jobs/s, {lat:.3f} ms, "
                f"CPU per job: spawner {spawner:.3f} ms, job {jobs:.3f} ms",
                file=sys.stderr,
            )
        for name, ref, goal in RATIOS:
            if name not in med or ref not in med:
                continue
            ratio = med[name] / med[ref]
            # The same ratio per round (each round's pair measured back to back).
            paired = statistics.median(
                a["jobs_per_s"] / b["jobs_per_s"]
                for a in results
                for b in results
                if (a["path"], b["path"]) == (name, ref)
                and a["in_flight"] == b["in_flight"] == level
                and a["round"] == b["round"]
            )
            verdict = ""
            if level == 16:
                verdict = f" (target >= {goal}: {'PASS' if ratio >= goal else 'FAIL'})"
            print(
                f"  ratio {name}/{ref} at {level}: {ratio:.3f} "
                f"(median of per-round ratios {paired:.3f}){verdict}",
                file=sys.stderr,
            )
            print(
                json.dumps(
                    {
                        "in_flight": level,
                        "ratio": f"{name}/{ref}",
                        "value": round(ratio, 3),
                        "paired": round(paired, 3),
                        "target": goal if level == 16 else None,
                    }
                ),
                flush=True,
            )
    if args.samples > 0:
        cost = filter_cost(args.samples)
        print(
            f"\nthe filter alone ({cost['bpf_instructions']} BPF instructions, "
            f"medians of {cost['samples']}): compile {cost['compile_ms_median']} ms "
            f"(once per entry, in the spawner), install {cost['install_us_median']} us "
            f"(per job, in its child), getppid() {cost['getppid_ns_with_filter']} ns with "
            f"the filter vs {cost['getppid_ns_without']} ns without",
            file=sys.stderr,
        )
        print(json.dumps({"name": "filter_cost", **cost}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
