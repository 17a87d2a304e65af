"""The measuring loop shared by the spawn cost benchmarks (spawncost, cgroupcost, confinecost).

``level`` workers each start ``jobs // level`` jobs one after another through a
:class:`~agent.keeper.spawn.ProcessOps` and wait for each to exit; the result is
jobs/s, the mean start-to-exit latency and, when asked, the CPU per job of this
process (the agent's side) and of the spawner process ``spawner_pid``.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Callable
from typing import Any

from agent.keeper.lifecycle import Exit
from agent.keeper.spawn import SPAWN_ENV, ProcessOps, SpawnerOps, SpawnSpec

TICK = os.sysconf("SC_CLK_TCK")
WARM_UP = 20


def cpu_of(pid: int | None, children: bool = False) -> float:
    """User plus system CPU seconds of process ``pid`` so far (0 for None); with
    ``children``, those of its reaped children instead (cutime + cstime: the jobs)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    at = 13 if children else 11
    return (int(fields[at]) + int(fields[at + 1])) / TICK


def spawner_on(path: str, **kw: Any) -> SpawnerOps:
    """A SpawnerOps whose spawner uses ``path`` ("vfork": the C path, "fork": the Python
    fallback; WORKER_AGENT_SPAWN, see agent.keeper.vspawn), for interleaved comparisons."""
    old = os.environ.get(SPAWN_ENV)
    os.environ[SPAWN_ENV] = path
    try:
        return SpawnerOps(**kw)
    finally:
        if old is None:
            del os.environ[SPAWN_ENV]
        else:
            os.environ[SPAWN_ENV] = old


def levels(text: str) -> list[int]:
    """``--levels 1,16`` -> [1, 16]."""
    return [int(x) for x in text.split(",")]


async def measure(
    ops: ProcessOps,
    spec_for: Callable[[], SpawnSpec],
    jobs: int,
    level: int,
    *,
    spawner_pid: int | None = None,
    agent_cpu: bool = False,
    spawner_cpu: bool = False,
    jobs_cpu: bool = False,
    check_exit: bool = False,
) -> dict[str, Any]:
    """Run the jobs ``spec_for()`` makes, ``level`` at a time; one result record.

    ``jobs_cpu``: the CPU per job of the jobs the spawner ``spawner_pid`` reaped in
    the window (their set-up between fork and exec included: the child's Landlock and
    seccomp steps are counted there)."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []

    async def one() -> None:
        spec = spec_for()
        done: asyncio.Future[Exit] = loop.create_future()
        t0 = time.perf_counter()
        await ops.spawn(spec, done.set_result)
        ex = await done
        if check_exit:
            assert ex.exit_code == 0, ex
        latencies.append(time.perf_counter() - t0)

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    for _ in range(WARM_UP):
        await one()
    latencies.clear()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    s0 = cpu_of(spawner_pid)
    c0 = cpu_of(spawner_pid, children=True)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(jobs // level) for _ in range(level)))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    s1 = cpu_of(spawner_pid)
    c1 = cpu_of(spawner_pid, children=True)
    n = len(latencies)
    out: dict[str, Any] = {
        "jobs": n,
        "in_flight": level,
        "jobs_per_s": round(n / wall, 1),
        "latency_ms": round(1000 * sum(latencies) / n, 3),
    }
    if agent_cpu:
        used = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        out["agent_cpu_ms_per_job"] = round(1000 * used / n, 3)
    if spawner_cpu:  # 0 when there is no spawner (the old in-process path)
        out["spawner_cpu_ms_per_job"] = round(1000 * (s1 - s0) / n, 3)
    if jobs_cpu:
        out["jobs_cpu_ms_per_job"] = round(1000 * (c1 - c0) / n, 3)
    return out
