"""Starting, signalling and reaping job processes: the only place that does.

Everything here is behind :class:`ProcessOps`, so the supervisor
(:mod:`agent.daemon.supervisor`) is driven by a fake in unit tests
(tests/test_supervisor_unit.py) and by the real kernel in integration tests.

Why it is written this way (the project's design notes, "Facts measured on
these machines"):

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
  (measured both ways with bench/). That is why there is no lock here.
* No shell, ever: argv goes to execve as a list.
* The job leads its own session and process group (``setsid``), so a
  signal to the group reaches everything it started, and it has no
  controlling terminal to read from.
* Exit is learnt from a pidfd becoming readable (no polling, no SIGCHLD
  handler, no asyncio child watcher), then ``os.wait4`` gives the status
  and rusage in one call.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.daemon.lifecycle import Exit

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
    uid: int | None  # None: keep the agent's user
    gid: int | None
    umask: int
    limits: Mapping[str, int]  # rlimits, 0 = unlimited
    prlimit: str
    setpriv: str
    exec_fd: int | None = None  # execute /proc/self/fd/N (a verified file)


class ProcessOps(Protocol):
    """The process operations the supervisor needs: the seam for a fake or a spawner.

    Contract: ``spawn`` starts the job as the leader of its own session and
    process group and returns its pid, or raises OSError when the program
    could not be started. When the leader exits, the implementation kills
    whatever the job left behind (while the leader's pid is still reserved),
    reaps it and then calls ``on_exit`` once, on the event loop's thread.
    ``signal`` signals the whole job; False if it is already gone.
    """

    async def spawn(self, spec: SpawnSpec, on_exit: Callable[[Exit], None]) -> int: ...
    def signal(self, pid: int, sig: int) -> bool: ...
    def close(self) -> None: ...


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
    """:class:`ProcessOps` on the real kernel, spawning from the agent's own process."""

    def __init__(self) -> None:
        # Popen objects are kept until reaped: a collected, unreaped Popen
        # would be waited for by CPython's subprocess._cleanup(), stealing
        # the status.
        self._popen: dict[int, subprocess.Popen[bytes]] = {}
        self._pidfds: dict[int, int] = {}

    async def spawn(self, spec: SpawnSpec, on_exit: Callable[[Exit], None]) -> int:
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
        pid = int(proc.pid)
        self._popen[pid] = proc
        pidfd = os.pidfd_open(pid)
        self._pidfds[pid] = pidfd
        asyncio.get_running_loop().add_reader(pidfd, self._exited, pid, on_exit)
        return pid

    def _exited(self, pid: int, on_exit: Callable[[Exit], None]) -> None:
        # The leader is a zombie now, so its pid (the group id) cannot be
        # reused yet: the last moment signalling the group is safe. A job
        # is its process group; what it leaves behind is killed.
        self.signal(pid, signal.SIGKILL)
        ended = self._reap(pid)
        if ended is None:  # not actually exited (should not happen with a pidfd)
            return
        pidfd = self._pidfds.pop(pid)
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        on_exit(ended)

    def _reap(self, pid: int) -> Exit | None:
        try:
            wpid, status, ru = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            # Already reaped elsewhere: should not happen; report unknown.
            self._forget(pid, -1)
            return Exit(None, None)
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
        proc = self._popen.pop(pid, None)
        if proc is not None:
            # Tell Popen the child is gone, so it never waits for (and
            # steals the status of) a pid it no longer owns.
            proc.returncode = code

    def signal(self, pid: int, sig: int) -> bool:
        """Signal a job's process group; False if it no longer exists."""
        if pid <= 1:
            raise ValueError(f"refusing to signal process group {pid}")
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def close(self) -> None:
        """Stop watching (the jobs themselves are the supervisor's business)."""
        loop = asyncio.get_event_loop()
        for fd in self._pidfds.values():
            loop.remove_reader(fd)
            os.close(fd)
        self._pidfds.clear()


def trampoline_exec_failure(output_path: str, exit_code: int | None) -> str:
    """Recognise setpriv's or prlimit's report that it could not execute the program."""
    if exit_code not in (126, 127):
        return ""
    try:
        with open(output_path, "rb") as f:
            head = f.read(512).decode("utf-8", "replace")
    except OSError:
        return ""
    for tool in ("setpriv", "prlimit"):
        if head.startswith(f"{tool}: failed to execute"):
            return head.splitlines()[0].split(": ", 2)[-1]
    return ""
