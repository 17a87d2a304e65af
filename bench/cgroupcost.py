"""Per-job cost of a job cgroup: the spawner with and without one, in the same run.

``python -m bench.cgroupcost [--jobs N] [--levels 1,16] [--rounds R]``

Runs ``/bin/true`` through :class:`agent.keeper.spawn.SpawnerOps` twice,
interleaved in rounds: once with a cgroup subtree (each job: leaf created,
joined by the child before exec, killed and waited for until empty through
inotify, ``cpu.stat``/``memory.*`` read, leaf removed) and once without.
Prints one JSON line per path and level (jobs/s, mean start-to-exit latency,
spawner CPU per job) and the median ratio with/without per level: the target
is at least 0.85 at 16 in flight. Needs a usable cgroup2 (root here: the
subtree is ``<cgroup2 mount>/worker-agent/bench-<pid>``, removed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from agent.keeper import cgroups
from agent.keeper.spawn import SpawnerOps, SpawnSpec

from .spawnloop import levels, measure


async def _measure(ops: SpawnerOps, jobs: int, level: int, with_cgroup: bool) -> dict[str, Any]:
    null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)

    def spec() -> SpawnSpec:
        return SpawnSpec(
            argv=["/bin/true"],
            executable="/bin/true",
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            stdout_fd=null,
            uid=None,
            gid=None,
            umask=0o077,
            limits={},
            cgroup={"id": str(uuid.uuid4())} if with_cgroup else None,
        )

    try:
        return await measure(ops, spec, jobs, level, spawner_pid=ops.spawner_pid, spawner_cpu=True)
    finally:
        os.close(null)


async def _run(args: argparse.Namespace, subtree: cgroups.Subtree) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with_cg = SpawnerOps(cgroups=subtree)
    without = SpawnerOps()
    try:
        for rnd in range(args.rounds):
            for level in args.levels:
                for name, ops in (("cgroup", with_cg), ("no-cgroup", without)):
                    res = {
                        "path": name,
                        "round": rnd,
                        **await _measure(ops, args.jobs, level, name == "cgroup"),
                    }
                    print(json.dumps(res), flush=True)
                    out.append(res)
    finally:
        with_cg.close()
        without.close()
    return out


def main(argv: list[str]) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.cgroupcost")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--levels", type=levels, default=[1, 16])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    mount = cgroups.choose_cgroup2_mount(
        cgroups.parse_cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
    )
    if mount is None:
        print("no cgroup2 mount", file=sys.stderr)
        return 1
    where = mount / "worker-agent" / f"bench-{os.getpid()}"
    try:
        subtree = cgroups.setup("required", where, under_systemd=False)
    except cgroups.CgroupError as e:
        print(f"no job cgroups here: {e}", file=sys.stderr)
        return 1
    assert subtree is not None
    try:
        results = asyncio.run(_run(args, subtree))
    finally:
        os.rmdir(subtree.jobs)
    print("\nmedian over rounds:", file=sys.stderr)
    for level in args.levels:
        med: dict[str, float] = {}
        for name in ("cgroup", "no-cgroup"):
            rows = sorted(
                r["jobs_per_s"] for r in results if r["path"] == name and r["in_flight"] == level
            )
            med[name] = rows[len(rows) // 2]
        ratio = med["cgroup"] / med["no-cgroup"]
        print(
            json.dumps({"in_flight": level, **med, "ratio": round(ratio, 3)}),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
