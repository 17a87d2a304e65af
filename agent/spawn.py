"""Starting, signalling and reaping job processes: the only place that does.

Everything here is behind :class:`ProcessOps`, so the job state machine in
``agent.jobs`` can be driven by a fake in unit tests and by the real kernel
in integration tests.

Why it is written this way (DESIGN.md, "Facts measured on these machines"):

* No ``preexec_fn``: in a process running gRPC it crashes children. All the
  set-up between fork and exec (new session, user switch, dropping
  supplementary groups, umask, closing descriptors, dup2 of stdio) is done
  by CPython's C code in ``_posixsubprocess``.
* Resource limits are therefore applied by exec'ing util-linux ``prlimit``,
  which sets them on itself and execs the job: no Python runs in the child.
* The switch to the job user (when the agent is root) is done by exec'ing
  util-linux ``setpriv`` (setresgid, setgroups([]), setresuid), not by
  Popen's ``user=``: CPython can only use ``vfork()`` when Popen changes no
  ids, and a ``fork()`` of the agent (tens of MB, gRPC threads) costs about
  2 ms of the agent's time per job against 0.1 ms (measured, bench/). The
  trampolines run with the job's environment, which the policy keeps free
  of every variable that changes how the loader or libc behave.
* Spawning stays on the event loop's thread: on the vfork path Popen
  blocks for about 0.1 ms, less than a hand-off to a worker thread costs
  (measured both ways with bench/).
* No shell, ever: argv goes to execve as a list.
* The job leads its own session and process group (``setsid``), so a
  signal to the group reaches everything it started, and it has no
  controlling terminal to read from.
* Exit is learnt from a pidfd becoming readable (no polling, no SIGCHLD
  handler, no asyncio child watcher), then ``os.wait4`` gives the status
  and rusage in one call.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# Limit name -> (prlimit option, extra seconds between soft and hard).
PRLIMIT_OPTIONS = {
    "cpu_seconds": "--cpu",
    "memory_bytes": "--as",
    "open_files": "--nofile",
    "processes": "--nproc",
}


@dataclass(frozen=True)
class SpawnSpec:
    """Everything needed to start one job process."""

    argv: Sequence[str]
    executable: str
    env: Mapping[str, str]
    cwd: str
    stdout_fd: int
    uid: int | None = None  # None: keep the agent's user
    gid: int | None = None
    umask: int = 0o077
    limits: Mapping[str, int] = field(default_factory=dict)  # rlimits, 0 = unlimited
    prlimit: str = "/usr/bin/prlimit"
    setpriv: str = "/usr/bin/setpriv"
    exec_fd: int | None = None  # execute /proc/self/fd/N (a verified file)


@dataclass(frozen=True)
class Exit:
    """How a reaped process ended."""

    exit_code: int | None
    signal: int | None
    user_cpu: float
    system_cpu: float
    max_rss: int  # bytes


class ProcessOps(Protocol):
    """The system calls the job manager needs."""

    def spawn(self, spec: SpawnSpec) -> int: ...
    def pidfd_open(self, pid: int) -> int: ...
    def reap(self, pid: int) -> Exit | None: ...
    def kill_group(self, pgid: int, sig: int) -> bool: ...


def check_exec_format(path: str, fd: int | None = None) -> None:
    """Raise OSError(ENOEXEC) unless the program is an ELF binary or a #! script.

    The kernel would refuse anything else with ENOEXEC, but the trampolines
    (setpriv, prlimit) call execvp(), which then runs the file with /bin/sh:
    a job must never end up interpreted by a shell it did not name.
    The interpreter named on a #! line is checked too, so that a missing one
    is a start failure now rather than a trampoline's exit status later.
    """
    try:
        if fd is not None:
            head = os.pread(fd, 256, 0)
        else:
            with open(path, "rb", buffering=0) as f:
                head = f.read(256)
    except OSError:
        return  # let execve report the real error (ENOENT, EACCES, ...)
    if head.startswith(b"\x7fELF"):
        return
    if not head.startswith(b"#!"):
        raise OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC), path)
    line = head[2:].split(b"\n", 1)[0].strip()
    interp = line.split(None, 1)[0] if line else b""
    if not interp or not os.access(interp, os.X_OK):
        code = errno.ENOENT if not interp or not os.path.exists(interp) else errno.EACCES
        raise OSError(code, os.strerror(code), path)


def build_argv(spec: SpawnSpec) -> tuple[list[str], str, tuple[int, ...]]:
    """The argv, program and inherited fds actually passed to execve."""
    program = spec.executable
    pass_fds: tuple[int, ...] = ()
    argv = list(spec.argv)
    if spec.exec_fd is not None:
        # The digest was checked on this open file; executing it through
        # /proc/self/fd leaves no window to swap the file on disk.
        program = f"/proc/self/fd/{spec.exec_fd}"
        pass_fds = (spec.exec_fd,)
    opts = []
    for name, value in sorted(spec.limits.items()):
        if not value or name not in PRLIMIT_OPTIONS:
            continue
        if name == "cpu_seconds":
            # Soft limit sends SIGXCPU, the hard one SIGKILL two seconds of
            # CPU later, so a job may clean up.
            opts.append(f"--cpu={value}:{value + 2}")
        else:
            opts.append(f"{PRLIMIT_OPTIONS[name]}={value}:{value}")
    if opts:
        argv = [spec.prlimit, *opts, "--", program, *argv[1:]]
        program = spec.prlimit
    if spec.uid is not None:
        # First drop to the job user (so RLIMIT_NPROC is checked against
        # the job user's processes), then prlimit, then the program.
        gid = spec.gid if spec.gid is not None else spec.uid
        argv = [spec.setpriv, f"--reuid={spec.uid}", f"--regid={gid}", "--clear-groups",
                "--", program, *argv[1:]]
        program = spec.setpriv
    return argv, program, pass_fds


class RealProcessOps:
    """:class:`ProcessOps` on the real kernel."""

    def __init__(self) -> None:
        # Popen objects are kept until reaped: a collected, unreaped Popen
        # would be waited for by CPython's subprocess._cleanup(), stealing
        # the status. Spawning happens in worker threads, hence the lock.
        self._popen: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def spawn(self, spec: SpawnSpec) -> int:
        """Start the process; raise OSError if exec fails (errno of the child)."""
        check_exec_format(spec.executable, spec.exec_fd)
        argv, program, pass_fds = build_argv(spec)
        proc = subprocess.Popen(
            argv,
            executable=program,
            stdin=subprocess.DEVNULL,
            stdout=spec.stdout_fd,
            stderr=spec.stdout_fd,
            close_fds=True,
            pass_fds=pass_fds,
            cwd=spec.cwd,
            env=dict(spec.env),
            start_new_session=True,
            restore_signals=True,
            umask=spec.umask,
        )
        with self._lock:
            self._popen[proc.pid] = proc
        return int(proc.pid)

    def pidfd_open(self, pid: int) -> int:
        """A pidfd that becomes readable when ``pid`` exits."""
        return os.pidfd_open(pid)

    def reap(self, pid: int) -> Exit | None:
        """Collect an exited child (None if it has not exited yet)."""
        try:
            wpid, status, ru = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            # Already reaped elsewhere: should not happen; report unknown.
            self._forget(pid, -1)
            return Exit(None, None, 0.0, 0.0, 0)
        if wpid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        self._forget(pid, code)
        return Exit(
            exit_code=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            user_cpu=ru.ru_utime,
            system_cpu=ru.ru_stime,
            max_rss=ru.ru_maxrss * 1024,
        )

    def _forget(self, pid: int, code: int) -> None:
        with self._lock:
            proc = self._popen.pop(pid, None)
        if proc is not None:
            # Tell Popen the child is gone, so it never waits for (and
            # steals the status of) a pid it no longer owns.
            proc.returncode = code

    def kill_group(self, pgid: int, sig: int) -> bool:
        """Signal a process group; False if it no longer exists."""
        if pgid <= 1:
            raise ValueError(f"refusing to signal process group {pgid}")
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False
        return True


def describe_exit(exit_code: int | None, sig: int | None) -> str:
    """Human text for an exit, as QueryJob's errorText shows it."""
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    if exit_code is None:
        return "exit status unknown"
    return f"exit status {exit_code}"


def describe_oserror(e: OSError) -> str:
    """``Exec format error (ENOEXEC)``-style text for a failed start."""
    code = errno.errorcode.get(e.errno or 0, "")
    text = e.strerror or str(e)
    return f"{text} ({code})" if code else text
