"""The job keeper upgrading itself in place: its state handed across ``execve``.

``execve`` keeps the process's pid, its children and every descriptor without
``O_CLOEXEC``. So a keeper can replace its own code and go on: its jobs stay its
children (it still reaps them, with their exit status and rusage), their output
pipes, output files, pidfds, listen() guards and the agent's connection stay open,
and what the descriptors mean travels in a sealed memfd (:func:`snapshot`), which
the new code reads back (:func:`restore`). The agent notices a pause, nothing else.

It happens on SIGUSR2 (the packaging's reload), once the keeper is quiet: no start
in the spawner's hands and no job's cgroup being emptied. Before it execs, the
keeper checks that the new code imports at all (a broken upgrade must not take the
jobs' keeper down): if it does not, the keeper says why and goes on as it was.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.keeper import cgroups, seccomp
from agent.keeper import lifecycle as lc
from agent.keeper.launch import KEEPER_MAIN, PACKAGE_ROOT, helper_argv, interpreter
from agent.keeper.outputfile import OutputFile

if TYPE_CHECKING:
    import selectors

    from agent.keeper.cgroups import JobCgroup, Subtree
    from agent.keeper.keeperadopt import Adoption
    from agent.keeper.keeperconn import AgentLink
    from agent.keeper.keeperfiles import JobFiles
    from agent.keeper.keeperstart import Starter
    from agent.keeper.keeperuids import UidHolds
    from agent.keeper.keptjobs import Kept
    from agent.keeper.seccomp import ListenGuard

STATE_VERSION = 1
# The timer events a kept job can be waiting for (they carry no fields).
TIMER_EVENTS = {
    cls.__name__: cls for cls in (lc.TimedOut, lc.KillGraceExpired, lc.OutputGraceExpired)
}
CHECK = "import sys; sys.path.insert(0, sys.argv[1]); import agent.keeper.keeperstate"
F_ADD_SEALS = 1033
SEALS = 0x0001 | 0x0002 | 0x0004 | 0x0008  # SEAL, SHRINK, GROW, WRITE


class KeeperParts(Protocol):
    """What of the keeper (:class:`agent.keeper.keeper.Keeper`) an upgrade hands across
    ``execve``: its parts, by what they are, so that the keeper's module imports this one
    (lazily, at an upgrade) and never the other way round."""

    @property
    def sel(self) -> selectors.BaseSelector: ...
    @property
    def draining(self) -> dict[int, Any]: ...
    @property
    def subtree(self) -> Subtree | None: ...
    @property
    def service(self) -> bool: ...
    @property
    def ended_file(self) -> str: ...
    @property
    def children(self) -> dict[int, int]: ...
    @property
    def cgroups(self) -> dict[int, JobCgroup]: ...
    @property
    def scratch(self) -> dict[int, str]: ...
    @property
    def scratch_owners(self) -> dict[str, tuple[int, int]]: ...
    @property
    def guards(self) -> dict[int, ListenGuard]: ...
    @property
    def job_users(self) -> dict[int, tuple[int, int]]: ...
    @property
    def kept(self) -> Kept: ...
    @property
    def link(self) -> AgentLink: ...
    @property
    def files(self) -> JobFiles: ...
    @property
    def holds(self) -> UidHolds: ...
    @property
    def starter(self) -> Starter: ...
    @property
    def adoption(self) -> Adoption: ...


def quiet(k: KeeperParts) -> bool:
    """No start half-way and no cgroup being emptied: nothing a snapshot would miss."""
    from agent.keeper.spawner import Starting

    starting = any(isinstance(key.data, Starting) for key in k.sel.get_map().values())
    return not k.kept.by_rid and not k.draining and not starting


def new_code_problem() -> str:
    """Why the code on disk would not run as a keeper ("" if it would)."""
    import subprocess  # only here: a resumed keeper does not carry it

    try:
        r = subprocess.run(
            [interpreter(), "-I", "-c", CHECK, PACKAGE_ROOT],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if r.returncode != 0:
        return r.stderr.decode(errors="replace").strip().splitlines()[-1:][0]
    return ""


def snapshot(k: KeeperParts) -> dict[str, Any]:
    """Everything the keeper holds, as JSON, its descriptors by number."""
    now = time.monotonic()
    jobs = []
    for job in k.kept.jobs.values():
        life = job.life.to_dict()
        timers = [
            [max(0.0, when - now), type(t.event).__name__]
            for when, _, t in k.kept.heap
            if t.job is job and not t.cancelled
        ]
        jobs.append(
            {
                "id": job.id,
                "rid": job.rid,
                "gen": job.gen,
                "pid": job.pid,
                "rfd": job.rfd,
                "grace": job.grace,
                "kill_on_cap": job.kill_on_cap,
                "life": life,
                "exit": None if job.exit is None else dataclasses.asdict(job.exit),
                "record": job.record,
                "timers": timers,
                "out": job.out.state(),
                "run": job.run,
                # Adopted from a dead keeper: its leaf (watched again after the exec).
                "leaf": None if job.leaf is None else str(job.leaf.path),
                "key": job.key,
                "stored": job.stored,
            }
        )
    return {
        "version": STATE_VERSION,
        "listener": k.link.listener.fileno(),
        "agent_uid": k.link.agent_uid,
        "output_dir": k.files.output_dir,
        "service": k.service,
        "ended_file": k.ended_file,
        "config": None if k.starter.decider is None else k.starter.decider.config_path,
        "subtree": None
        if k.subtree is None
        else {"jobs": str(k.subtree.jobs), "controllers": sorted(k.subtree.controllers)},
        "agent": k.link.state(),
        "gen": k.link.gen,
        "rids": next(k.starter.rids),
        "children": {str(pid): fd for pid, fd in k.children.items()},
        "cgroups": {str(pid): [cg.job_id, str(cg.path)] for pid, cg in k.cgroups.items()},
        "scratch": {str(pid): path for pid, path in k.scratch.items()},
        "scratch_owners": {path: list(o) for path, o in k.scratch_owners.items()},
        "guards": {str(pid): [g.fd, g.uid, g.gid, list(g.caps)] for pid, g in k.guards.items()},
        "job_users": {str(pid): list(u) for pid, u in k.job_users.items()},
        "dynamic": dict(k.holds.dynamic),
        "jobs": jobs,
        "ended": list(k.kept.ended.values()),
        "fdstore": k.files.fdstore,
    }


def descriptors(state: dict[str, Any]) -> list[int]:
    """Every descriptor a snapshot names (they must survive the exec)."""
    fds = [state["listener"], *state["children"].values()]
    if state["agent"] is not None:
        fds.append(state["agent"]["fd"])
        if state["agent"]["pidfd"] >= 0:
            fds.append(state["agent"]["pidfd"])
    fds += [g[0] for g in state["guards"].values()]
    for job in state["jobs"]:
        fds += [job["rfd"], job["out"]["fd"]]
    return [fd for fd in fds if fd >= 0]


def reexec(k: KeeperParts) -> str:
    """Replace the keeper's code with what is on disk now, keeping everything; returns
    why it did not (it does not return when it did)."""
    why = new_code_problem()
    if why:
        return f"the new code does not import: {why}"
    k.kept.flush_output()
    state = snapshot(k)
    fds = descriptors(state)
    memfd = os.memfd_create("agent-keeper-state", os.MFD_ALLOW_SEALING)
    try:
        data = json.dumps(state, separators=(",", ":")).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(memfd, view) :]
        # Sealed: what the new code reads is exactly what the old one wrote.
        fcntl.fcntl(memfd, F_ADD_SEALS, SEALS)
        for fd in fds:
            os.set_inheritable(fd, True)
        argv = helper_argv(KEEPER_MAIN, "--resume-fd", str(memfd))
        sys.stderr.flush()
        os.execve(interpreter(), argv, dict(os.environ))  # noqa: S606 - no shell, by design
    except OSError as e:
        for fd in fds:
            os.set_inheritable(fd, False)
        return f"execve: {e.strerror or e}"
    finally:
        os.close(memfd)
    return "execve returned"  # pragma: no cover - execve does not return


def load(fd: int) -> dict[str, Any]:
    """The state the previous code left in memfd ``fd`` (closed here)."""
    try:
        size = os.fstat(fd).st_size
        state: dict[str, Any] = json.loads(os.pread(fd, size, 0))
    finally:
        os.close(fd)
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"keeper state version {state.get('version')!r}")
    for fd2 in descriptors(state):
        os.set_inheritable(fd2, False)
    return state


def subtree_of(state: dict[str, Any]) -> cgroups.Subtree | None:
    st = state["subtree"]
    if st is None:
        return None
    return cgroups.Subtree(Path(st["jobs"]), frozenset(st["controllers"]))


def restore(k: KeeperParts, state: dict[str, Any]) -> None:
    """Take over the previous code's state (the Keeper is new and empty)."""
    import itertools
    import selectors

    k.starter.rids = itertools.count(state["rids"])
    for pid_s, pidfd in state["children"].items():
        pid = int(pid_s)
        k.children[pid] = pidfd
        k.sel.register(pidfd, selectors.EVENT_READ, pid)
    for pid_s, (job_id, path) in state["cgroups"].items():
        k.cgroups[int(pid_s)] = cgroups.JobCgroup(job_id, Path(path))
    k.scratch.update({int(p): path for p, path in state["scratch"].items()})
    k.scratch_owners.update({path: (o[0], o[1]) for path, o in state["scratch_owners"].items()})
    k.job_users.update({int(p): (u[0], u[1]) for p, u in state.get("job_users", {}).items()})
    for job_id, uid in state.get("dynamic", {}).items():
        # Held by a running job whatever the range is now (a reload may have changed it).
        k.holds.hold(job_id, uid)
    for pid_s, (fd, uid, gid, caps) in state["guards"].items():
        guard = k.guards[int(pid_s)] = seccomp.ListenGuard(fd, uid, gid, caps)
        k.sel.register(fd, selectors.EVENT_READ, guard)
    for j in state["jobs"]:
        _restore_job(k, j)
    k.kept.ended.update({m["job"]: m for m in state["ended"]})
    k.files.fdstore = bool(state.get("fdstore", False))
    if k.subtree is not None:
        # The journal is opened again at the next write (its descriptor was closed on
        # exec, never a job's); a job's .keeper file (written by the code before the exec,
        # perhaps of the previous release) is still removed at its end.
        k.files.note_job_files(k.kept.jobs)
    k.link.restore(state["agent"], state["gen"])
    # Last: an adopted job found ended now is told to the agent restored above.
    for job in list(k.kept.jobs.values()):
        if job.leaf is not None and job.exit is None:
            k.adoption.watch(job)


def _restore_job(k: KeeperParts, j: dict[str, Any]) -> None:
    """One kept job of a snapshot, kept again (its pipe watched, its timers armed)."""
    import itertools
    import selectors

    from agent.keeper.keptjobs import KeptJob

    out = OutputFile.from_state(j["out"])
    run = {
        "timeout": 0,
        "cpu_seconds": 0,
        "memory_max": 0,
        "note": "",
        "grace": j["grace"],
        "kill_on_cap": j["kill_on_cap"],
    }
    job = KeptJob(j["id"], j["rid"], j["gen"], run, out)
    job.run = dict(j.get("run") or run)
    job.life = lc.Life.from_dict(j["life"])
    job.exit = None if j["exit"] is None else lc.Exit(**j["exit"])
    job.pid, job.rfd, job.record = j["pid"], j["rfd"], j["record"]
    kept = k.kept
    kept.jobs[job.id] = job
    job.stored = bool(j.get("stored", False))
    if j.get("leaf"):
        job.leaf = cgroups.JobCgroup(job.id, Path(j["leaf"]))
        job.key = int(j["key"])
        adoption = k.adoption
        adoption.adopt_keys = itertools.count(max(-job.key + 1, next(adoption.adopt_keys)))
        if job.exit is None:
            kept.by_pid[job.key] = job
    elif job.pid and job.exit is None:
        kept.by_pid[job.pid] = job
    if job.rfd >= 0:
        k.sel.register(job.rfd, selectors.EVENT_READ, job)
    for delay, name in j["timers"]:
        kept.arm(job, delay, TIMER_EVENTS[name]())
