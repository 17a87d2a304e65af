"""``agent run --daemon``: python-daemon, a pid file, and a readiness report.

Sequence (nothing gRPC exists in the starting process: a forked gRPC
process crashes its children, measured):

1. In the starting process: take the pid file's lock. A live agent holds
   it, so a second instance is refused here, on the terminal. A pid file
   whose lock is free was left by a dead process: it is stale and replaced.
2. Fork. The starting process waits on a pipe for the daemon's word.
3. The child enters ``DaemonContext`` (second fork, new session, umask 027,
   working directory /, standard streams to /dev/null, core dumps off),
   keeping the pid file's descriptor (so the lock carries over) and the
   pipe; it writes its pid into the pid file.
4. Only then is the gRPC server built; once it serves TLS the daemon
   writes "ready" to the pipe (or the start-up error), and the starting
   process prints it and exits 0 (or 1).

The lock is an ``flock`` on the pid file, released by the kernel when the
daemon dies however it dies, so staleness never needs guessing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

from agent.daemon.lockfile import LockFile
from agent.keeper.config import Config

UMASK = 0o027


def daemonize(cfg: Config, run: Callable[[Callable[[str], None]], int]) -> int:
    """Start ``run`` as a daemon; return the starting process's exit status.

    ``run(report)`` runs inside the daemon; it must call ``report("ready")``
    once serving, or ``report("error: ...")`` if start-up fails.
    """
    import daemon  # python-daemon; imported here, the only place it is used

    if "grpc" in sys.modules:
        # gRPC's threads and its fork handlers must not exist in a process
        # that forks into a daemon (a forked gRPC process crashes its
        # children); cli.py imports it only after the fork.
        print("agent: internal error: grpc was imported before daemonizing", file=sys.stderr)
        return 1
    pid_file = LockFile.pid_file(cfg.pid_file)
    try:
        cfg.pid_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pid_file.acquire(write_pid=False)  # written by the daemon, after the fork
    except (RuntimeError, OSError) as e:
        print(f"agent: {e}", file=sys.stderr)
        return 1
    if pid_file.stale_pid is not None:
        print(
            f"agent: replacing stale pid file {cfg.pid_file} of dead process {pid_file.stale_pid}",
            file=sys.stderr,
        )
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child > 0:
        os.close(wfd)
        os.close(pid_file.fd)
        return _wait_for_report(cfg, child, rfd)
    # First child: becomes the daemon (python-daemon forks once more).
    os.close(rfd)
    status = 1
    try:
        ctx = daemon.DaemonContext(
            working_directory="/",
            umask=UMASK,
            pidfile=pid_file,
            detach_process=True,
            files_preserve=[wfd, pid_file.fd],
            stdin=None,
            stdout=None,
            stderr=None,
            prevent_core=True,
            # The agent installs its own handlers (asyncio) once running.
            signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
        )
        with ctx:
            reported = False

            def report(text: str) -> None:
                # Once only: after close() the descriptor number may be
                # reused by something else (a socket), never write to it.
                nonlocal reported
                if reported:
                    return
                reported = True
                with contextlib.suppress(OSError):
                    os.write(wfd, (text + "\n").encode())
                os.close(wfd)

            status = run(report)
            report(f"error: the agent exited with status {status} during start-up")
    finally:
        os._exit(status)


def _wait_for_report(cfg: Config, child: int, rfd: int) -> int:
    """The starting process: what the daemon reported, as the exit status."""
    message = _read_all(rfd)
    os.close(rfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)
    if message.startswith("ready"):
        print(f"agent: running in the background ({message[6:].strip()}), pid file {cfg.pid_file}")
        return 0
    print(
        f"agent: {message or 'the daemon exited during start-up (see its log)'}",
        file=sys.stderr,
    )
    return 1


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace").strip().splitlines()[0] if chunks else ""
