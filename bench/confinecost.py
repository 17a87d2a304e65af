"""What the per-job box costs: jobs through the spawner with and without confinement.

``python -m bench.confinecost [--jobs N] [--levels 1,16] [--rounds R] [--user NAME]``

Runs ``/bin/true`` through :class:`agent.daemon.spawn.SpawnerOps` (what the agent
uses, no gRPC) in three configurations, interleaved in rounds in one process:

* ``bare``: no Landlock, no scratch directory (the agent before issue 14);
* ``landlock``: the default entry's Landlock ruleset (OS tree, standard devices, no
  TCP, scoped signals and sockets) with a deny list inside /etc (hole punching, the
  worst case of the shipped unit) and a per-job scratch directory (created, granted,
  removed);
* with ``--user`` (as root) both switch to that user, and the box drops every
  capability.

Prints one JSON line per measurement, then the medians and the ratio of boxed to bare
throughput at each level (the target: at least 0.8 at 16 in flight). Cgroups are not
part of this measurement; the full run (``python -m bench``) measures the agent as
configured.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pwd
import shutil
import sys
import tempfile
from typing import Any

from agent.daemon import landlock, policy
from agent.daemon.spawn import SpawnerOps, SpawnSpec

from .spawnloop import levels, measure


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

    return await measure(ops, spec_for, jobs, level, check_exit=True)


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
    # The default entry's spec, and a deny list as the shipped unit has it (/etc/worker-agent).
    spec = policy.Confinement().landlock
    assert spec is not None
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
    configs = [("bare", base, None), ("landlock", boxed, scratch_root)]
    out: list[dict[str, Any]] = []
    ops = SpawnerOps()
    try:
        for rnd in range(args.rounds):
            for level in args.levels:
                for name, s, scratch in configs:
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


def main(argv: list[str]) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.confinecost")
    p.add_argument("--jobs", type=int, default=1600)
    p.add_argument("--levels", type=levels, default=[1, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--user", default="")
    args = p.parse_args(argv)
    if landlock.abi_version() < 1:
        print("this kernel has no Landlock: nothing to measure", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="confinecost-")
    os.chmod(tmp, 0o711)  # the job user reaches its scratch below
    try:
        results = asyncio.run(_run(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nmedian over rounds:", file=sys.stderr)
    for level in args.levels:
        med: dict[str, float] = {}
        for name in ("bare", "landlock"):
            rows = [r for r in results if r["path"] == name and r["in_flight"] == level]
            med[name] = sorted(r["jobs_per_s"] for r in rows)[len(rows) // 2]
            lat = sorted(r["latency_ms"] for r in rows)[len(rows) // 2]
            print(
                f"  {name:8s} in flight {level:3d}: {med[name]} jobs/s, {lat} ms", file=sys.stderr
            )
        ratio = med["landlock"] / med["bare"]
        print(f"  ratio landlock/bare at {level}: {ratio:.2f}", file=sys.stderr)
        print(json.dumps({"in_flight": level, "ratio": round(ratio, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
