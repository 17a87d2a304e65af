"""``agent keeper``: the job keeper as a service of its own (``[keeper] mode = "service"``).

The keeper (:mod:`agent.keeper.keeper`) is normally the agent's child; as a service
(the unit worker-agent-keeper.service) it is started on its own, before the agent, and
outlives every restart, crash and upgrade of the agent: stopping the agent leaves the
jobs running, stopping the keeper stops them (docs/deployment.md, "Stopping, restarting,
upgrading").

This module is the keeper's set-up, run once: it reads the configuration, checks the
directories the keeper writes (state, output, scratch), makes the job cgroup subtree
(under systemd: its own unit's, delegated) and the socket, then *replaces itself* with
the keeper (``execve``, same pid: systemd's main process stays the keeper). The set-up
imports what the agent's configuration needs; the keeper that follows starts from a fresh
interpreter and loads only its own modules, so its memory stays the keeper's.
"""

from __future__ import annotations

import os
import pwd
import socket
import sys
import time
from pathlib import Path

from agent.configfile import ConfigError
from agent.keeper import cgroups
from agent.keeper import spawnproto as proto
from agent.keeper.config import Config
from agent.keeper.decision import deny_paths
from agent.keeper.launch import KEEPER_ENDED, KEEPER_SOCKET, interpreter, keeper_argv
from agent.keeper.preparation import check_private_dir, check_scratch_dir, setup_cgroups
from agent.keeper.spawn import SPAWN_ENV

# What the keeper keeps of its environment: the service manager's notification socket
# and the spawn path override (tests); nothing reaches a job (its environment is built
# from the policy).
# The descriptor store's pipes of a dead keeper's jobs (LISTEN_*, fds from 3 on, not
# closed on exec) and whether the unit keeps one (FDSTORE) go to the keeper too.
KEPT_ENV = (
    "NOTIFY_SOCKET",
    "INVOCATION_ID",
    SPAWN_ENV,
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "FDSTORE",
)


def agent_uid(cfg: Config) -> int:
    """The uid whose agent may attach: ``[keeper] agent_user``, else the keeper's own."""
    name = cfg.keeper.agent_user
    if not name:
        return os.geteuid()
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ConfigError(cfg.path, "keeper", "agent_user", f"no such user: {name!r}") from None


def answers(path: str) -> bool:
    """Whether a keeper already listens at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        proto.bind_long(sock, path, connect=True)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def main(cfg: Config) -> int:
    """Set up and become the keeper; returns only on failure (2: configuration, 1: other)."""
    try:
        uid = agent_uid(cfg)
        # The state and output directories are the agent's (its history, its reads of
        # the output); the keeper writes there as that user or as root.
        for key, where in (("state_dir", cfg.jobs.state_dir), ("output_dir", cfg.output_dir)):
            check_private_dir(cfg, "jobs", key, where, create=True, owner=uid)
        check_scratch_dir(cfg, deny_paths(cfg), create=True)
        subtree, _, warnings = setup_cgroups(cfg)
    except ConfigError as e:
        print(f"agent keeper: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"agent keeper: warning: {w}", file=sys.stderr)
    path = str(cfg.jobs.state_dir / KEEPER_SOCKET)
    if answers(path):
        print(f"agent keeper: a job keeper already listens at {path}", file=sys.stderr)
        return 1
    try:
        listener = proto.listen_at(path)
    except OSError as e:
        print(f"agent keeper: cannot listen at {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    if os.geteuid() == 0 and uid != 0:
        # The socket is 0600: a root keeper lets its agent's user connect (and nobody
        # else: the keeper checks the peer's uid as well).
        try:
            os.chown(path, uid, -1)
        except OSError as e:
            print(f"agent keeper: cannot give {path} to uid {uid}: {e}", file=sys.stderr)
            return 1
    listener.set_inheritable(True)
    argv = keeper_argv(
        listener.fileno(),
        str(cfg.output_dir),
        subtree,
        config=str(cfg.path),
        agent_uid=uid,
        service=True,
        ended_file=str(cfg.jobs.state_dir / KEEPER_ENDED),
    )
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    sys.stderr.flush()
    try:
        os.execve(interpreter(), argv, env)  # noqa: S606 - no shell, by design
    except OSError as e:
        print(f"agent keeper: cannot start the keeper: {e.strerror or e}", file=sys.stderr)
    return 1


# $SERVICE_RESULT of a keeper that was stopped (systemctl stop or restart; a stop that
# timed out) rather than one that died ("signal", "exit-code", "core-dump", "watchdog"...).
STOPPED_RESULTS = frozenset({"success", "timeout"})
AFTER_STOP_WAIT = 10.0  # seconds: for the killed job cgroups to empty


def after_stop(environ: dict[str, str] | os._Environ[str]) -> int:
    """``agent keeper --after-stop``: the unit's ExecStopPost=. The unit has
    KillMode=process, so systemd kills only the keeper's own process: a keeper that
    crashed (kill -9, a bug) leaves its jobs running in their cgroups, and the keeper
    systemd restarts adopts them (:meth:`agent.keeper.keeper.Keeper.adopt_leftovers`).
    A keeper that was *stopped* stopped its jobs itself; whatever is left then (the stop
    timed out) is killed here, so that stopping the unit still stops every job.

    Measured under systemd 252: after SIGKILL of the main process ExecStopPost sees
    SERVICE_RESULT=signal (EXIT_CODE=killed, EXIT_STATUS=KILL); after `systemctl stop`,
    SERVICE_RESULT=success; after a stop past TimeoutStopSec=, timeout. Returns 0 (a
    failure here must not fail the stop), 1 when a job cgroup could not be emptied."""
    result = environ.get("SERVICE_RESULT", "")
    if result and result not in STOPPED_RESULTS:
        print(
            f"agent keeper: the keeper ended with result {result!r} "
            f"({environ.get('EXIT_CODE', '?')} {environ.get('EXIT_STATUS', '?')}): its jobs "
            "are left running for the next keeper to adopt",
            file=sys.stderr,
        )
        return 0
    try:
        jobs = unit_jobs_dir()
    except cgroups.CgroupError as e:
        print(f"agent keeper: no job cgroups to clear: {e}", file=sys.stderr)
        return 0
    leaves = cgroups.Subtree(jobs).leftovers()
    for leaf in leaves:
        try:
            leaf.kill()
        except cgroups.CgroupError as e:
            print(f"agent keeper: {e}", file=sys.stderr)
    deadline = time.monotonic() + AFTER_STOP_WAIT
    failed = 0
    for leaf in leaves:
        while leaf.populated() and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            leaf.remove()
        except cgroups.CgroupError as e:
            failed += 1
            print(f"agent keeper: {e}", file=sys.stderr)
    if leaves:
        print(
            f"agent keeper: stopped ({result or 'by hand'}): killed {len(leaves)} job "
            "cgroup(s) the keeper left",
            file=sys.stderr,
        )
    return 1 if failed else 0


def unit_jobs_dir() -> Path:
    """The job subtree of the unit this process runs in (systemd runs a delegated unit's
    ExecStopPost= in its ``.control`` sub-cgroup). Raises CgroupError."""
    own = cgroups.own_cgroup()
    if own.endswith("/.control"):
        own = own[: -len("/.control")]
    mounts = cgroups.parse_cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
    mount = cgroups.choose_cgroup2_mount(mounts)
    if mount is None or own == "/":
        raise cgroups.CgroupError("not in a delegated cgroup of a unit")
    return cgroups.cgroup_dir(mount, own) / cgroups.JOBS_DIR
