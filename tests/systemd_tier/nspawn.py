"""A real systemd in a ``systemd-nspawn`` container, for tests that need one.

What this gives a test:

* :func:`ensure_rootfs` builds (once, with ``debootstrap``) and caches a minimal
  Debian bookworm root file system with systemd, D-Bus, python3 and the tools a
  job runner uses.  The cached tree is never booted itself: it stays pristine.
* :class:`Container` boots a throw-away copy of it with systemd as PID 1
  (``systemd-nspawn --register=no --keep-unit -b``), waits until that systemd
  has finished booting, runs commands inside, copies files in, and powers it
  off on exit (killing it if the power-off hangs), removing every temporary
  directory, mount and cgroup it made.
* :func:`build_wheelhouse` / :func:`install_wheels` carry Python packages in
  without network access from the container: wheels built on the host, bound
  read-only into the container, installed with ``pip --no-index``.
* :func:`verify_unit` / :func:`security_exposure` run ``systemd-analyze`` on a
  unit file whose ``ExecStart=`` binary is not installed on the host.

Facts this module relies on, measured on the development machine (Debian 12,
systemd 252, PID 1 not systemd, hybrid cgroups v1 + v2) -- see README.md:

* The container shares the host's network namespace (no ``--private-network``),
  so a service inside listening on ``127.0.0.1:PORT`` is reachable from the
  host test process, and vice versa.
* Without machined (``--register=no``) ``machinectl shell`` and
  ``systemd-run -M`` are unavailable; commands are run with
  ``nsenter --target <container PID 1> --all``.  Such a process lives in the
  container's namespaces but stays in the caller's cgroup; use
  :meth:`Container.systemd_run` when a command must run as a real unit.
* With PID 1 not systemd, ``--keep-unit`` makes nspawn create its ``payload``
  and ``supervisor`` cgroups below the cgroup it was started in.  Started from
  the root cgroup, two containers would share (and fight over) ``/payload``,
  and the cgroups outlive the container, so each container is started in a
  cgroup of its own that is removed afterwards.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import io
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple

__all__ = [
    "BOOTED_STATES",
    "ROOTFS_PACKAGES",
    "Bind",
    "CommandResult",
    "Container",
    "ContainerError",
    "build_wheelhouse",
    "cleanup_stale",
    "default_cache_dir",
    "ensure_rootfs",
    "install_wheels",
    "security_exposure",
    "skip_reason",
    "verify_unit",
]

log = logging.getLogger(__name__)

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ROOTFS_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "ca-certificates",
    "openssl",
    "procps",
    "util-linux",
)
# Bump when the rootfs recipe changes (post-processing, not packages: those are
# part of the marker already) so that stale caches are rebuilt.
ROOTFS_RECIPE = 2
ROOTFS_MARKER = ".agent-rootfs-complete"
# Units that only add noise or background work (apt downloads, a login prompt on
# the console) to a test container.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "console-getty.service",
    "getty@.service",
    "systemd-timesyncd.service",
)

BOOTED_STATES = frozenset({"running", "degraded"})
TMP_PREFIX = "agent-nspawn-"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Paths a host process reaches for a container's cgroups when PID 1 is not
# systemd; only hierarchies that nspawn itself uses (name=systemd and cgroup2).
_CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))

# nspawn 252 puts the whole container under its own seccomp allow list, which
# lacks bpf() (so the container's systemd silently cannot enforce IPAddressDeny=),
# Landlock, and pidfd_getfd (the job spawner's listen() checks: EPERM there, measured).
# A host booted with systemd has no such filter: allow them.
NSPAWN_SYSCALLS = (
    "bpf",
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
    "pidfd_getfd",
)

SnapshotMode = Literal["overlay", "ephemeral", "copy"]


class ContainerError(RuntimeError):
    """A container could not be built, booted, used or stopped."""


class CommandResult(NamedTuple):
    """What a command run inside the container returned."""

    rc: int
    stdout: str
    stderr: str

    def check(self, what: str = "command") -> CommandResult:
        """Return self if rc is 0, else raise :class:`ContainerError` with the output."""
        if self.rc != 0:
            raise ContainerError(
                f"{what} failed with rc={self.rc}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
            )
        return self


@dataclass(frozen=True)
class Bind:
    """A host directory or file bound into the container (read-only by default)."""

    host: Path
    container: str
    read_only: bool = True

    def nspawn_arg(self) -> str:
        """Return the ``--bind``/``--bind-ro`` argument for systemd-nspawn."""
        if not self.container.startswith("/"):
            raise ValueError(f"container path must be absolute: {self.container!r}")
        for path in (str(self.host), self.container):
            if ":" in path:
                raise ValueError(f"':' is not allowed in a bind path: {path!r}")
        option = "--bind-ro" if self.read_only else "--bind"
        return f"{option}={Path(self.host).resolve()}:{self.container}"


def skip_reason() -> str | None:
    """Return why the systemd tier cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "systemd tier needs root (systemd-nspawn, debootstrap, mounts)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "systemd-analyze"):
        if shutil.which(tool) is None:
            return f"{tool} not found: run scripts/systemd_tier_setup.sh"
    return None


def default_cache_dir() -> Path:
    """Return the rootfs cache directory: ``$AGENT_ROOTFS_CACHE`` or the system default."""
    return Path(os.environ.get("AGENT_ROOTFS_CACHE") or "/var/cache/agent-test-rootfs")


def _marker_text(suite: str, packages: Sequence[str]) -> str:
    return json.dumps(
        {"suite": suite, "packages": sorted(packages), "recipe": ROOTFS_RECIPE},
        sort_keys=True,
    )


def _rootfs_complete(rootfs: Path, wanted: str) -> bool:
    try:
        return (rootfs / ROOTFS_MARKER).read_text() == wanted
    except OSError:
        return False


def ensure_rootfs(
    cache_dir: Path | str | None = None,
    *,
    suite: str = SUITE,
    mirror: str = MIRROR,
    extra_packages: Sequence[str] = (),
    timeout: float = 1800.0,
) -> Path:
    """Return a complete cached Debian rootfs, building it with debootstrap if needed.

    The rootfs lives in ``<cache_dir>/rootfs`` (cache_dir defaults to
    :func:`default_cache_dir`).  It counts as complete only when its marker
    file, written last, names the same suite, package set and recipe; anything
    else is rebuilt.  A build goes into a temporary sibling directory that is
    renamed into place only once complete, so an interrupted build never leaves
    a tree that looks complete.  Concurrent callers are serialised by a lock file.

    Raises ContainerError if debootstrap or the post-processing fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    packages = tuple(dict.fromkeys((*ROOTFS_PACKAGES, *extra_packages)))
    wanted = _marker_text(suite, packages)
    rootfs = cache / "rootfs"
    if _rootfs_complete(rootfs, wanted):
        return rootfs
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _rootfs_complete(rootfs, wanted):  # another process built it meanwhile
            return rootfs
        for stale in cache.glob(".build-*"):
            _remove_tree(stale)
        build_dir = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            target = build_dir / "rootfs"
            _debootstrap(
                target,
                suite=suite,
                mirror=mirror,
                packages=packages,
                log_path=cache / "build.log",
                timeout=timeout,
            )
            _post_process(target)
            marker = target / ROOTFS_MARKER
            marker.write_text(wanted)
            with open(marker) as fh:
                os.fsync(fh.fileno())
            if rootfs.exists() or rootfs.is_symlink():
                old = cache / f".old-{secrets.token_hex(4)}"
                rootfs.rename(old)
                _remove_tree(old)
            target.rename(rootfs)
        finally:
            _remove_tree(build_dir)
    return rootfs


def _debootstrap(
    target: Path,
    *,
    suite: str,
    mirror: str,
    packages: Sequence[str],
    log_path: Path,
    timeout: float,
) -> None:
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        suite,
        str(target),
        mirror,
    ]
    log.info("building rootfs: %s", shlex.join(argv))
    started = time.monotonic()
    with open(log_path, "wb") as out:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"debootstrap timed out after {timeout}s, see {log_path}") from exc
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise ContainerError(
            f"debootstrap failed (rc={proc.returncode}), see {log_path}:\n" + "\n".join(tail)
        )
    log.info("debootstrap took %.1fs", time.monotonic() - started)


def _post_process(target: Path) -> None:
    subprocess.run(
        ["systemctl", f"--root={target}", "mask", *MASKED_UNITS],
        check=True,
        capture_output=True,
    )
    # The host's name leaks in through debootstrap; a fixed one makes logs readable.
    (target / "etc/hostname").write_text("agent-test\n")
    # minbase has no /etc/hosts, so "localhost" would not resolve.
    (target / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tagent-test\n"
    )
    # An empty machine-id lets systemd generate one per boot (nspawn passes a
    # random one), so every container gets its own and the cache stays generic.
    (target / "etc/machine-id").write_text("")
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (target / leftover).glob("*"):
            if entry.is_file():
                entry.unlink()


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point == prefix or mount_point.startswith(prefix + "/"):
                found.append(mount_point)
    return found


def _remove_tree(path: Path) -> None:
    """Unmount anything below ``path`` (deepest first), then delete it."""
    if not (path.exists() or path.is_symlink()):
        return
    for mount_point in sorted(_mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
    if _mounts_below(path):
        raise ContainerError(f"refusing to delete {path}: mounts remain below it")
    shutil.rmtree(path, ignore_errors=True)


def _host_runs_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_cgroup(path: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process in a cgroup subtree and wait until it is empty."""
    if not path.is_dir():
        return
    kill_file = path / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for procs in path.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
        if not pids or time.monotonic() >= deadline:
            return
        if kill_file.exists():  # cgroup v2, kernel >= 5.14: atomic, no PID reuse race
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    subs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
    for sub in reversed(subs):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def cleanup_stale(tmp_root: Path | str | None = None) -> list[Path]:
    """Remove leftovers (temp dirs, mounts, cgroups) of containers whose owner died.

    A container's temporary directory and cgroups are named
    ``agent-nspawn-<owner pid>-<hex>``; for those whose owner process is gone,
    every process left in the cgroups is killed (their order matters: the
    cgroups first, so that nothing keeps the mounts busy) and all is removed.
    Returns the temporary directories removed.
    """
    removed = []
    pattern = re.compile(rf"^{re.escape(TMP_PREFIX)}(\d+)-[0-9a-f]+$")

    def stale(name: str) -> bool:
        match = pattern.match(name)
        return match is not None and not _pid_alive(int(match.group(1)))

    for cg_root in _CGROUP_ROOTS:
        for entry in cg_root.glob(f"{TMP_PREFIX}*"):
            if stale(entry.name):
                _kill_cgroup(entry)
                _remove_cgroup_tree(entry)
    for entry in Path(tmp_root or tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        if stale(entry.name):
            _remove_tree(entry)
            removed.append(entry)
    return removed


_live: set[Container] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_live_containers() -> None:
    with _live_lock:
        pending = list(_live)
    for container in pending:
        with contextlib.suppress(Exception):
            container.stop()


class Container:
    """One booted systemd container over a throw-away copy of a cached rootfs.

    Use as a context manager (``with Container(rootfs) as c: ...``) or call
    :meth:`start` and :meth:`stop` yourself.  ``snapshot`` picks how the cached
    rootfs is kept pristine: ``"overlay"`` (default: an overlayfs whose upper
    layer is a temp dir; starts in milliseconds), ``"ephemeral"``
    (``systemd-nspawn --ephemeral``: a full copy on non-btrfs file systems) or
    ``"copy"`` (``cp -a --reflink=auto`` into a temp dir).
    """

    def __init__(
        self,
        rootfs: Path | str,
        *,
        binds: Sequence[Bind] = (),
        snapshot: SnapshotMode = "overlay",
        name: str | None = None,
        boot_timeout: float = 180.0,
        stop_timeout: float = 60.0,
        nspawn_args: Sequence[str] = (),
        nspawn_env: Mapping[str, str] | None = None,
        tmp_root: Path | str | None = None,
    ) -> None:
        self.rootfs = Path(rootfs)
        self.binds = tuple(binds)
        self.snapshot: SnapshotMode = snapshot
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.nspawn_args = tuple(nspawn_args)
        self.nspawn_env = dict(nspawn_env or {})
        self._tmp_root = Path(tmp_root) if tmp_root else Path(tempfile.gettempdir())
        self._token = f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.name = name or self._token
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroups: list[Path] = []
        self._leader: int | None = None
        self._root_dir: Path | None = None
        self.failed_units: list[str] = []
        self.timings: dict[str, float] = {}
        self.returncode: int | None = None
        self.killed = False
        self._booted = False

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Container:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def leader_pid(self) -> int:
        """Host PID of the container's PID 1 (its systemd)."""
        if self._leader is None:
            raise ContainerError("container is not running")
        return self._leader

    @property
    def console_log(self) -> Path:
        """Host path of the file receiving the container's console (boot messages)."""
        if self._tmp is None:
            raise ContainerError("container was never started")
        return self._tmp / "console.log"

    def console_tail(self, lines: int = 40) -> str:
        """Return the last lines of the container console, for failure messages."""
        try:
            text = self.console_log.read_text(errors="replace")
        except (OSError, ContainerError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Container:
        """Boot the container and wait until its systemd reports running or degraded.

        Raises ContainerError (after cleaning up) if it does not boot in time.
        """
        if self._proc is not None:
            raise ContainerError("container already started")
        if not (self.rootfs / "usr/lib/systemd/systemd").exists():
            raise ContainerError(f"{self.rootfs} does not look like a rootfs with systemd")
        started = time.monotonic()
        self._tmp = self._tmp_root / self._token
        self._tmp.mkdir(mode=0o700)
        with _live_lock:
            _live.add(self)
        try:
            root = self._prepare_root()
            self.timings["prepare_root"] = time.monotonic() - started
            self._spawn(root)
            self._leader = self._wait_leader()
            self._wait_booted()
            self._booted = True
        except BaseException:
            log.warning("container %s failed to start:\n%s", self.name, self.console_tail())
            self.stop()
            raise
        self.timings["boot"] = time.monotonic() - started
        return self

    def _prepare_root(self) -> Path:
        assert self._tmp is not None
        if self.snapshot == "overlay":
            upper, work, merged = (self._tmp / d for d in ("upper", "work", "root"))
            for d in (upper, work, merged):
                d.mkdir()
            options = f"lowerdir={self.rootfs},upperdir={upper},workdir={work}"
            proc = subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise ContainerError(f"overlay mount failed: {proc.stderr.strip()}")
            self._root_dir = merged
            return merged
        if self.snapshot == "copy":
            copy = self._tmp / "root"
            subprocess.run(
                ["cp", "-a", "--reflink=auto", f"{self.rootfs}/.", str(copy)],
                check=True,
                capture_output=True,
            )
            self._root_dir = copy
            return copy
        if self.snapshot == "ephemeral":
            return self.rootfs
        raise ValueError(f"unknown snapshot mode {self.snapshot!r}")

    def _make_cgroups(self) -> list[Path]:
        made = []
        for cg_root in _CGROUP_ROOTS:
            if (cg_root / "cgroup.procs").exists():
                path = cg_root / self._token
                path.mkdir(exist_ok=True)
                made.append(path)
        return made

    def _spawn(self, root: Path) -> None:
        assert self._tmp is not None
        argv = [
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            "--boot",
            f"--directory={root}",
            f"--machine={self.name}",
            "--console=read-only",
            "--link-journal=no",
            f"--system-call-filter={' '.join(NSPAWN_SYSCALLS)}",
            *(b.nspawn_arg() for b in self.binds),
        ]
        if self.snapshot == "ephemeral":
            argv.append("--ephemeral")
        argv += self.nspawn_args
        if not _host_runs_systemd():
            self._cgroups = self._make_cgroups()
        if self._cgroups:
            # Move the shell into our own cgroups, then exec nspawn: no
            # preexec_fn, which is unsafe in processes that run gRPC threads.
            moves = "; ".join(
                f"echo $$ > {shlex.quote(str(p / 'cgroup.procs'))}" for p in self._cgroups
            )
            argv = ["/bin/sh", "-c", f'{moves}; exec "$@"', "sh", *argv]
        env = {**os.environ, **self.nspawn_env}
        log.info("starting container: %s", shlex.join(argv))
        with open(self.console_log, "wb") as console:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )

    def _find_leader(self) -> int | None:
        if self._proc is None:
            return None
        for pid in _children(self._proc.pid):
            status = _proc_status(pid)
            nspid = status.get("NSpid", "").split()
            # The container's init is the child whose PID in its own namespace
            # is 1 and that has already exec'ed systemd.
            if len(nspid) > 1 and nspid[-1] == "1" and status.get("Name") == "systemd":
                return pid
        return None

    def _wait_leader(self) -> int:
        assert self._proc is not None
        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited with rc={self._proc.returncode}:\n{self.console_tail()}"
                )
            leader = self._find_leader()
            if leader is not None:
                return leader
            time.sleep(0.05)
        raise ContainerError(f"no container init appeared within {self.boot_timeout}s")

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        last = CommandResult(-1, "", "")
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ContainerError(
                    f"container exited during boot (rc={self._proc.returncode}):\n"
                    + self.console_tail()
                )
            remaining = max(1.0, deadline - time.monotonic())
            try:
                last = self.run(["systemctl", "is-system-running", "--wait"], timeout=remaining)
            except subprocess.TimeoutExpired:
                break
            state = last.stdout.strip()
            if state in BOOTED_STATES:
                if state == "degraded":
                    failed = self.run(
                        ["systemctl", "list-units", "--failed", "--plain", "--no-legend"]
                    )
                    self.failed_units = [
                        line.split()[0] for line in failed.stdout.splitlines() if line
                    ]
                    log.warning("container %s booted degraded: %s", self.name, self.failed_units)
                return
            if state in ("maintenance", "stopping"):
                break
            # Before systemd's private socket exists systemctl fails at once.
            time.sleep(0.1)
        raise ContainerError(
            f"container did not finish booting within {self.boot_timeout}s "
            f"(last: {last})\n{self.console_tail()}"
        )

    def stop(self) -> None:
        """Power the container off, kill it if that hangs, and remove all temporary state.

        Safe to call more than once and on a container that failed to start.
        """
        started = time.monotonic()
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._power_off(self._proc)
        finally:
            self._proc = None
            self._leader = None
            self._booted = False
            for cgroup in self._cgroups:
                # Last resort for anything that outlived nspawn (an init that
                # was never found, say): it must not keep the mounts busy.
                _kill_cgroup(cgroup)
            if self._tmp is not None:
                _remove_tree(self._tmp)
            for cgroup in self._cgroups:
                _remove_cgroup_tree(cgroup)
            self._cgroups = []
            with _live_lock:
                _live.discard(self)
        self.timings["stop"] = time.monotonic() - started

    def _power_off(self, proc: subprocess.Popen[bytes]) -> None:
        # SIGTERM makes nspawn ask the container's systemd for an orderly
        # shutdown (SIGRTMIN+3), which works even if the container's bus is
        # wedged.  A container that never booted is killed at once: before its
        # init runs, nspawn does not act on SIGTERM.
        if self._booted:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                self.returncode = proc.wait(timeout=self.stop_timeout)
                return
            except subprocess.TimeoutExpired:
                log.warning(
                    "container %s did not power off in %ss, killing it",
                    self.name,
                    self.stop_timeout,
                )
        # Killing PID 1 of a PID namespace kills every process in it; nspawn's
        # death alone would leave the container's init orphaned and running.
        # nspawn then reaps it and unmounts; only if it does not is it killed.
        self.killed = True
        leader = self._leader or self._find_leader()
        if leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.returncode = proc.wait(timeout=10)
                return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        self.returncode = proc.wait(timeout=30)

    # -- using it ------------------------------------------------------------

    def _enter_argv(self) -> list[str]:
        return ["nsenter", f"--target={self.leader_pid}", "--all", "--"]

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        input: bytes | str | None = None,
        timeout: float = 120.0,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        check: bool = False,
    ) -> CommandResult:
        """Run a command inside the container and return (rc, stdout, stderr).

        ``argv`` as a string is run with ``/bin/sh -c``.  The command gets a
        clean environment (PATH, LANG, HOME, TERM plus ``env``), runs as root
        unless ``user`` names a container user (switched with ``setpriv``, no
        PAM session), from ``cwd`` or ``/``.  With ``check`` a non-zero rc
        raises ContainerError; a timeout raises subprocess.TimeoutExpired.
        """
        command = ["/bin/sh", "-c", argv] if isinstance(argv, str) else list(argv)
        base_env = {
            "PATH": CONTAINER_PATH,
            "LANG": "C.UTF-8",
            "HOME": "/root",
            "TERM": "dumb",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }
        if user is not None:
            base_env["HOME"] = "/"
        base_env.update(env or {})
        inner = [
            "/usr/bin/env",
            "-i",
            f"--chdir={cwd or '/'}",
            *(f"{k}={v}" for k, v in base_env.items()),
        ]
        if user is not None:
            # setpriv takes no "primary group of USER", so look it up in there.
            inner = [
                "/bin/sh",
                "-c",
                'u="$1"; shift; exec setpriv --reuid="$u" --regid="$(id -g -- "$u")"'
                ' --init-groups -- "$@"',
                "sh",
                user,
                *inner,
            ]
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.run(
            [*self._enter_argv(), *inner, *command],
            input=data,
            stdin=None if data is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env={"PATH": os.environ.get("PATH", CONTAINER_PATH)},
            check=False,
        )
        result = CommandResult(
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
        if check:
            result.check(shlex.join(command))
        return result

    def systemd_run(
        self,
        argv: Sequence[str],
        *,
        properties: Mapping[str, str] | Sequence[tuple[str, str]] = (),
        user: str | None = None,
        input: bytes | str | None = None,
        timeout: float = 120.0,
    ) -> CommandResult:
        """Run ``argv`` as a transient service of the container's systemd and wait for it.

        Unlike :meth:`run`, the command is a real unit (own cgroup, the
        sandbox of the given ``properties``, e.g. ``{"ProtectSystem": "strict"}``),
        with its stdin/stdout/stderr piped back (``systemd-run --pipe --wait``).
        """
        items = properties.items() if isinstance(properties, Mapping) else properties
        cmd = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec"]
        if user is not None:
            cmd.append(f"--uid={user}")
        cmd += [f"--property={k}={v}" for k, v in items]
        return self.run([*cmd, "--", *argv], input=input, timeout=timeout)

    def copy_in(
        self,
        src: Path | str,
        dest: str,
        *,
        owner: str | None = None,
        mode: int | None = None,
    ) -> None:
        """Copy a host file or directory to ``dest`` (absolute) inside the container.

        The copy is unpacked by ``tar`` inside the container, so symlinks in
        the container's tree are resolved there, never on the host.  Parent
        directories are created.  ``owner`` ("user" or "user:group") is applied
        recursively, ``mode`` to ``dest`` itself.
        """
        src_path = Path(src)
        if not src_path.exists():
            raise FileNotFoundError(src_path)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(str(src_path), arcname=Path(dest).name, recursive=True)
        self._untar(buf.getvalue(), dest, owner=owner, mode=mode)

    def write_file(
        self,
        dest: str,
        data: bytes | str,
        *,
        mode: int = 0o644,
        owner: str | None = None,
    ) -> None:
        """Create or replace the file ``dest`` inside the container with ``data``."""
        payload = data.encode() if isinstance(data, str) else data
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(Path(dest).name)
            info.size = len(payload)
            info.mode = mode
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(payload))
        self._untar(buf.getvalue(), dest, owner=owner, mode=mode)

    def _untar(self, archive: bytes, dest: str, *, owner: str | None, mode: int | None) -> None:
        if not dest.startswith("/") or dest.rstrip("/") == "":
            raise ValueError(f"destination must be an absolute path below /: {dest!r}")
        parent = str(Path(dest).parent)
        script = 'mkdir -p -- "$1" && tar -x --no-same-owner -C "$1" -f -'
        if owner is not None:
            script += ' && chown -R -- "$2" "$3"'
        if mode is not None:
            script += ' && chmod -- "$4" "$3"'
        self.run(
            ["/bin/sh", "-c", script, "sh", parent, owner or "", dest, f"{mode or 0:o}"],
            input=archive,
            check=True,
        )

    def read_file(self, path: str) -> bytes:
        """Return the content of a file inside the container."""
        proc = subprocess.run(
            [*self._enter_argv(), "/bin/cat", "--", path],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise ContainerError(
                f"cannot read {path}: {proc.stderr.decode(errors='replace').strip()}"
            )
        return proc.stdout

    def systemctl(self, *args: str, timeout: float = 120.0) -> CommandResult:
        """Run ``systemctl ARGS`` inside the container."""
        return self.run(["systemctl", *args], timeout=timeout)

    def unit_properties(self, unit: str, *names: str) -> dict[str, str]:
        """Return ``systemctl show -p NAMES unit`` as a dict (default: state properties)."""
        props = names or ("ActiveState", "SubState", "Result")
        out = self.systemctl("show", f"--property={','.join(props)}", unit).check("systemctl show")
        result = {}
        for line in out.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                result[key] = value
        return result

    def wait_unit(
        self,
        unit: str,
        active_states: Sequence[str],
        *,
        timeout: float = 60.0,
        interval: float = 0.1,
    ) -> dict[str, str]:
        """Poll until the unit's ActiveState is one of ``active_states``; return its state.

        Raises ContainerError with the unit's journal on timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.unit_properties(unit, "ActiveState", "SubState", "Result", "MainPID")
            if state.get("ActiveState") in active_states:
                return state
            if time.monotonic() >= deadline:
                raise ContainerError(
                    f"{unit} did not reach {list(active_states)} within {timeout}s: {state}\n"
                    + self.journal(unit)
                )
            time.sleep(interval)

    def journal(self, unit: str | None = None, lines: int = 80) -> str:
        """Return the last journal lines (of one unit, or all) inside the container."""
        cmd = ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines)]
        if unit:
            cmd += ["-u", unit]
        return self.run(cmd).stdout


def _children(pid: int) -> Iterator[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            yield from (int(p) for p in fh.read().split())
    except OSError:
        return


def _proc_status(pid: int) -> dict[str, str]:
    status = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                status[key] = value.strip()
    except OSError:
        pass
    return status


# -- Python packages ---------------------------------------------------------


def build_wheelhouse(
    requirements: Sequence[str],
    dest: Path | str,
    *,
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
    timeout: float = 900.0,
) -> Path:
    """Build wheels for ``requirements`` (and their dependencies) into ``dest`` with pip.

    Requirements may be names, specifiers or local project paths.  The host
    Python must match the container's (3.11 for bookworm) so that cp311 wheels
    are chosen.  Raises ContainerError if pip fails or the versions differ.
    """
    version = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != "3.11":
        raise ContainerError(f"{python} is Python {version}; bookworm's python3 is 3.11")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--wheel-dir",
            str(out),
            *extra_args,
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise ContainerError(f"pip wheel failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def install_wheels(
    container: Container,
    requirements: Sequence[str],
    *,
    wheelhouse: str = "/wheelhouse",
    venv: str = "/opt/worker-agent",
    timeout: float = 600.0,
) -> CommandResult:
    """Create ``venv`` in the container (if absent) and pip-install from ``wheelhouse`` only.

    ``wheelhouse`` is a container path, normally a read-only :class:`Bind` of a
    directory made by :func:`build_wheelhouse`.  No index is contacted.
    Raises ContainerError if venv creation or the install fails.
    """
    container.run(["python3", "-m", "venv", venv], timeout=timeout, check=True)
    return container.run(
        [
            f"{venv}/bin/pip",
            "install",
            "--quiet",
            "--no-index",
            "--disable-pip-version-check",
            "--no-cache-dir",
            f"--find-links={wheelhouse}",
            *requirements,
        ],
        timeout=timeout,
        check=True,
    )


# -- unit files --------------------------------------------------------------


def _exec_paths(unit_text: str) -> list[str]:
    paths = []
    for line in unit_text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() in (
            "ExecStart",
            "ExecStartPre",
            "ExecStartPost",
            "ExecReload",
            "ExecStop",
        ):
            word = value.strip().lstrip("@-:+!|")
            if word.startswith("/"):
                paths.append(word.split()[0])
    return paths


def verify_unit(unit_file: Path | str, *, stub_missing: bool = True) -> CommandResult:
    """Run ``systemd-analyze verify`` on a unit file, standing in for missing binaries.

    ``verify`` refuses a unit whose Exec*= binary does not exist.  With
    ``stub_missing``, each missing binary is replaced by a ``#!/bin/sh`` stub
    visible only to the verifying process: it runs in a private mount
    namespace (``unshare --mount``) where the deepest existing ancestor
    directory is overlaid with a temporary upper layer, so the host is not
    changed.  Needs root for the mounts.
    """
    unit = Path(unit_file).resolve()
    missing = [p for p in _exec_paths(unit.read_text()) if not os.access(p, os.X_OK)]
    if not missing or not stub_missing:
        proc = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
        )
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)
    with tempfile.TemporaryDirectory(prefix="agent-verify-") as tmp:
        lines = ["set -e"]
        for i, path in enumerate(sorted(set(missing))):
            anchor = Path(path).parent
            while not anchor.exists():
                anchor = anchor.parent
            if anchor == Path("/"):
                raise ContainerError(f"cannot stub {path}: no existing ancestor below /")
            upper, work = f"{tmp}/u{i}", f"{tmp}/w{i}"
            lines += [
                f"mkdir -p {upper} {work}",
                "mount -t overlay overlay -o "
                + shlex.quote(f"lowerdir={anchor},upperdir={upper},workdir={work}")
                + f" {shlex.quote(str(anchor))}",
                f"mkdir -p {shlex.quote(str(Path(path).parent))}",
                f"printf '#!/bin/sh\\nexit 0\\n' > {shlex.quote(path)}",
                f"chmod 755 {shlex.quote(path)}",
            ]
        lines.append(f"exec systemd-analyze verify {shlex.quote(str(unit))}")
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "\n".join(lines)],
            capture_output=True,
            text=True,
            check=False,
        )
    return CommandResult(proc.returncode, proc.stdout, proc.stderr)


_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def security_exposure(unit_file: Path | str) -> tuple[float, str]:
    """Return (overall exposure, full report) of ``systemd-analyze security --offline=true``.

    Raises ContainerError if the report has no overall exposure line.
    """
    proc = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--no-pager",
            str(Path(unit_file).resolve()),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    match = _EXPOSURE.search(proc.stdout + proc.stderr)
    if match is None:
        raise ContainerError(
            f"no exposure level in systemd-analyze output:\n{proc.stdout}\n{proc.stderr}"
        )
    return float(match.group(1)), proc.stdout
