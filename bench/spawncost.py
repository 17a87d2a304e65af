"""Spawn-to-exit cost of the job spawner against the old in-process Popen path.

``python -m bench.spawncost [--jobs N] [--levels 1,16] [--rounds R] [--user NAME]``

Runs ``/bin/true`` through :class:`agent.keeper.spawn.SpawnerOps` (what the
agent uses: "spawner", its C vfork path where built; "spawner-fork", its Python
fork fallback, ``WORKER_AGENT_SPAWN=fork``) and through a copy of the old
``RealProcessOps`` fast path (``subprocess.Popen`` on the event loop thread,
CPython's vfork path, pidfd + ``wait4``; no trampolines, so no limits and no
user switch), interleaved in rounds, in one process with no gRPC. For each
level of jobs in flight it prints one JSON line per path: jobs/s, mean start-to-exit latency, the
agent process's CPU per job and (spawner only) the spawner's CPU per job.
With ``--user`` (as root) the spawner path also switches to that user,
which the old path could only do through setpriv (not measured here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from agent.keeper.lifecycle import Exit
from agent.keeper.spawn import ProcessOps, SpawnerOps, SpawnSpec

from .spawnloop import levels, measure, spawner_on


class PopenOps:
    """The old in-process path (agent/keeper/spawn.py before the spawner), for comparison."""

    def __init__(self) -> None:
        self._popen: dict[int, subprocess.Popen[bytes]] = {}
        self.spawner_pid: int | None = None

    async def spawn(self, spec: SpawnSpec, on_exit: Callable[[Exit], None]) -> int:
        proc = subprocess.Popen(
            list(spec.argv),
            executable=spec.executable,
            stdin=subprocess.DEVNULL,
            stdout=spec.stdout_fd,
            stderr=spec.stdout_fd,
            close_fds=True,
            cwd=spec.cwd,
            env=dict(spec.env),
            start_new_session=True,
            restore_signals=True,
            umask=spec.umask,
        )
        pid = int(proc.pid)
        self._popen[pid] = proc
        pidfd = os.pidfd_open(pid)
        loop = asyncio.get_running_loop()

        def exited() -> None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            _, status, ru = os.wait4(pid, 0)
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._popen.pop(pid).returncode = os.waitstatus_to_exitcode(status)
            on_exit(Exit(os.waitstatus_to_exitcode(status), None, ru.ru_utime, ru.ru_stime))

        loop.add_reader(pidfd, exited)
        return pid

    def signal(self, pid: int, sig: int) -> bool:
        return False

    def close(self) -> None:
        pass


async def _measure(
    ops: ProcessOps, spawner_pid: int | None, jobs: int, level: int, uid: int | None
) -> dict[str, Any]:
    null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
    spec = SpawnSpec(
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
    try:
        return await measure(
            ops,
            lambda: spec,
            jobs,
            level,
            spawner_pid=spawner_pid,
            agent_cpu=True,
            spawner_cpu=True,
        )
    finally:
        os.close(null)


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    uid = pwd.getpwnam(args.user).pw_uid if args.user else None
    out: list[dict[str, Any]] = []
    spawner = SpawnerOps()
    # The spawner's Python fork fallback (WORKER_AGENT_SPAWN=fork), interleaved.
    forking = spawner_on("fork")
    old = PopenOps()
    try:
        for rnd in range(args.rounds):
            for level in args.levels:
                for name, ops, spid in (
                    ("spawner", spawner, spawner.spawner_pid),
                    ("spawner-fork", forking, forking.spawner_pid),
                    ("popen", old, None),
                ):
                    if name == "popen" and uid is not None:
                        continue
                    res = {
                        "path": name,
                        "round": rnd,
                        **await _measure(ops, spid, args.jobs, level, uid),
                    }
                    print(json.dumps(res), flush=True)
                    out.append(res)
        rss = 0
        with open(f"/proc/{spawner.spawner_pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        print(json.dumps({"spawner_rss_kb": rss}), flush=True)
    finally:
        spawner.close()
        forking.close()
    return out


def main(argv: list[str]) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.spawncost")
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--levels", type=levels, default=[1, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--user", default="")
    args = p.parse_args(argv)
    results = asyncio.run(_run(args))
    print("\nmedian over rounds:", file=sys.stderr)
    for level in args.levels:
        for name in ("spawner", "spawner-fork", "popen"):
            rows = [r for r in results if r["path"] == name and r["in_flight"] == level]
            if not rows:
                continue
            med = {
                k: sorted(r[k] for r in rows)[len(rows) // 2]
                for k in (
                    "jobs_per_s",
                    "latency_ms",
                    "agent_cpu_ms_per_job",
                    "spawner_cpu_ms_per_job",
                )
            }
            print(f"  {name:8s} in flight {level:3d}: {med}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
