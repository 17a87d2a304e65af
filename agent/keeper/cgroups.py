"""One cgroup v2 per job: create with limits, join, kill as a whole, account, remove.

Design
------
The agent owns one cgroup v2 *subtree*. Every job gets a leaf ``<jobs>/<job-id>``
(the job id is the agent's UUID). The single-threaded spawner uses this module:

1. ``Subtree.create(job_id, limits)`` makes the leaf and writes its limits. A limit
   whose controller is not enabled for job cgroups raises ``MissingController``
   before anything is created (a limit the kernel cannot give is refused, never
   silently skipped).
2. ``JobCgroup.procs_fd()`` opens the leaf's ``cgroup.procs`` (O_WRONLY|O_CLOEXEC)
   before the fork; the forked child's very first act is ``join(fd)`` (write ``"0"``),
   before any other set-up and before exec, so nothing of the job ever runs outside
   its cgroup, including processes that call setsid(), double-fork or scrub their
   environment. The join must happen before the child drops privileges: writing
   ``cgroup.procs`` needs write access to it *and* to the ``cgroup.procs`` of the
   common ancestor of the source and destination cgroups.
3. ``EventWatcher`` (one inotify instance for all jobs) tells when a leaf's
   ``cgroup.events`` changes; ``JobCgroup.populated()`` then says whether the job's
   last process has exited. Watch first, then check once, so an emptying that
   happens before the watch is not missed.
4. ``JobCgroup.kill()`` writes ``1`` to ``cgroup.kill`` (Linux 5.14+): the kernel
   SIGKILLs every process in the leaf and its descendants, with no pid race. On older
   kernels it freezes the leaf and SIGKILLs each pid of ``cgroup.procs`` until empty.
5. ``JobCgroup.stats()`` reads ``cpu.stat`` (always present in cgroup v2, even without
   the cpu controller), ``memory.peak`` and ``memory.events`` (memory controller only).
   ``memory.peak`` replaces ``ru_maxrss``, which for a vfork'd child keeps the
   parent's high-water mark. Only the leaf's own files are read, never a parent's.
6. ``JobCgroup.remove()`` rmdirs the leaf (and any empty cgroups the job made inside
   it), retrying briefly: after the last process exits the kernel may still be
   tearing the cgroup down (EBUSY). rmdir on cgroupfs removes only empty cgroups;
   nothing is ever deleted recursively and nothing outside the subtree is touched.
7. After a crash (kill -9 of the agent) ``Subtree.leftovers()`` lists the job leaves
   still present; the caller kills and removes them. Only directories named like a
   job id inside the jobs directory are returned.

A job leaf's main process is the spawner's child: it stays a zombie until the spawner
reaps it, but a zombie no longer counts for ``populated`` and does not stop rmdir.

systemd delegation (production: Debian 12, cgroup2-only at /sys/fs/cgroup)
--------------------------------------------------------------------------
With ``Delegate=yes`` systemd hands the unit's own cgroup (for example
``/sys/fs/cgroup/system.slice/worker-agent.service``) to the service: it will not
move processes or change settings below it, and marks it with the extended
attributes ``trusted.delegate`` and ``user.delegate`` = ``1`` (systemd 252 in a
Debian 12 container, measured: set with Delegate=yes, absent without; ``setup``
refuses an own cgroup without them). cgroup v2's
"no internal processes" rule forbids enabling controllers in ``cgroup.subtree_control``
of a cgroup that has processes of its own, so ``setup(..., under_systemd=True)``:

* moves every pid of ``<own>/cgroup.procs`` into the leaf ``<own>/supervisor``
  (repeated until ``<own>`` is empty, since a process may fork meanwhile);
* enables ``+cpu +io +memory +pids`` (those listed in ``<own>/cgroup.controllers``) in
  ``<own>/cgroup.subtree_control``, creates ``<own>/jobs`` and enables the same in
  ``<own>/jobs/cgroup.subtree_control``; job leaves are ``<own>/jobs/<job-id>``;
* probes the result: a real process is moved into a probe leaf, killed through
  ``cgroup.kill``, and the leaf removed.

``Subtree.controllers`` is what ``<jobs>/cgroup.subtree_control`` really holds after
that, not what was asked for. systemd only delegates controllers it has enabled for
the unit; ``Delegate=yes`` asks for all of them. The unit must not have
``ProtectControlGroups=yes``: even with Delegate=yes it mounts /sys/fs/cgroup
read-only for the service (measured: ``setup`` then fails with EROFS).

A process that is not in the cgroup namespace it looks from (``nsenter`` into a
container) sees its cgroup as ``/../..``; ``cgroup_dir`` refuses such a path.

With a configured path (``[cgroups] path``) the directory and missing parents are
created, controllers are enabled in the directories this module created and in the
configured one (never in pre-existing ancestors), and job leaves live directly in it.

This machine (hybrid hierarchy)
-------------------------------
v1 controllers are mounted under /sys/fs/cgroup/<name>; the cgroup2 hierarchy is at
/sys/fs/cgroup/unified and its ``cgroup.controllers`` lists only ``hugetlb``. Job
leaves there have ``cgroup.procs``, ``cgroup.kill``, ``cgroup.freeze``,
``cgroup.events`` and ``cpu.stat``, so joining, killing as a whole, emptiness events,
CPU accounting and removal all work; ``controllers`` is empty, so a memory, pids, cpu
or io limit raises ``MissingController`` and ``memory.peak`` is None. inotify on
``cgroup.events`` delivers IN_MODIFY on every change of ``populated`` (0 to 1 and 1 to
0) and ``frozen`` here (Linux 6.18). A Debian 12 systemd 252 container under
systemd-nspawn on this host gets cgroup2 too (hybrid at /sys/fs/cgroup/unified by
default, pure at /sys/fs/cgroup with SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1) but an empty
``cgroup.controllers`` in both: the controllers are bound to v1 on the host. There the
delegated set-up works end to end and every limit raises ``MissingController``.

Events without polling
----------------------
kernfs files such as ``cgroup.events`` are always readable for poll()/epoll EPOLLIN,
so ``loop.add_reader(events_fd)`` would busy-loop. kernfs signals a change as
POLLPRI|POLLERR (measured here: poll(POLLPRI) wakes on the change), and inotify
IN_MODIFY, which is what ``EventWatcher`` uses: one descriptor for every job, readable
only when something changed. If inotify cannot be had (``EventWatcher`` raises
``CgroupError``, e.g. fs.inotify.max_user_instances reached), the fallback is a
``select.poll()`` with POLLPRI on each leaf's ``cgroup.events`` descriptor, or the
main process's pidfd followed by re-reading ``populated()``.

Measured costs per job (this machine: 2 noisy cores, Linux 6.18, root, hybrid hierarchy
so no limit is written; medians of 300 jobs, three runs, by a throwaway script):
create 52 us, join (the child's write) 37 us, kill (the cgroup.kill write) 200 us,
stats 53 us, remove 105 us. From kill to the inotify wake-up that finds the leaf
empty: median 80 us, but about one time in eight some 15 ms (kernfs sends the
notification from a work queue); a busy loop on ``populated()`` saw it empty after
225 us. ``setup`` costs 13 to 30 ms once, most of it the probe's Python interpreter.
The notification being asynchronous is also why a watch must be followed by reading
``populated()``: the file is the truth, the event only says "look again".
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import signal
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


def _log_warning(msg: str, *args: object) -> None:
    # Imported here: the job keeper imports this module and never logs through it (set-up
    # is the agent's), and logging with its threading is a megabyte of its memory.
    import logging

    logging.getLogger(__name__).warning(msg, *args)


#: Controllers a job cgroup may use, in the order they are enabled.
JOB_CONTROLLERS: tuple[str, ...] = ("cpu", "io", "memory", "pids")
#: cpu.max period in microseconds (the kernel's default).
CPU_PERIOD_US = 100_000
#: Smallest cpu.max quota the kernel accepts, in microseconds.
CPU_MIN_QUOTA_US = 1_000
MODES = ("required", "auto", "off")
SUPERVISOR_LEAF = "supervisor"
JOBS_DIR = "jobs"
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")

_CGROUP2_PREFERRED = Path("/sys/fs/cgroup")
_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# "MAJ:MIN key=value ..." with the keys io.max knows.
_IO_MAX_LINE = re.compile(r"\d+:\d+( (rbps|wbps|riops|wiops)=(\d+|max))+")
_REMOVE_TIMEOUT = 2.0
_KILL_FALLBACK_TIMEOUT = 5.0


class CgroupError(Exception):
    """A cgroup operation failed; the message is one line a person can act on."""

    @property
    def errno(self) -> int | None:
        """The errno of the system call that failed (the OSError it was raised from, whose
        traceback ``from None`` hides), or None when no call failed."""
        cause = self.__context__
        return cause.errno if isinstance(cause, OSError) else None


class MissingController(CgroupError):
    """A limit needs a controller that is not enabled for job cgroups."""

    def __init__(self, controller: str) -> None:
        super().__init__(
            f"the {controller} controller is not available for job cgroups, "
            f"so a {controller} limit cannot be enforced"
        )
        self.controller = controller


# --------------------------------------------------------------------------- parsing


def parse_keyed(text: str) -> dict[str, int]:
    """Parse a flat-keyed cgroup file (``cpu.stat``, ``memory.events``, ``cgroup.events``).

    Lines that are not ``key integer`` are ignored.
    """
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _unescape_mountinfo(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def parse_cgroup2_mounts(mountinfo: str) -> list[Path]:
    """Mount points of cgroup2 file systems in a /proc/<pid>/mountinfo text."""
    mounts: list[Path] = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        fstype = right.split(" ", 1)[0]
        if fstype == "cgroup2":
            mounts.append(Path(_unescape_mountinfo(fields[4])))
    return mounts


def choose_cgroup2_mount(mounts: Iterable[Path]) -> Path | None:
    """/sys/fs/cgroup when it is cgroup2, else the first cgroup2 mount, else None."""
    found = list(mounts)
    if _CGROUP2_PREFERRED in found:
        return _CGROUP2_PREFERRED
    return found[0] if found else None


def parse_proc_cgroup(text: str) -> str | None:
    """The cgroup v2 path (the ``0::`` line) of a /proc/<pid>/cgroup text, or None."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def cgroup_dir(mount: Path, cgroup: str) -> Path:
    """The directory of a /proc/<pid>/cgroup path below ``mount``.

    Raises CgroupError for a path that is not below it: a process outside this cgroup
    namespace sees its cgroup as ``/../..``.
    """
    parts = cgroup.split("/")
    if not cgroup.startswith("/") or any(p in (".", "..") for p in parts):
        raise CgroupError(f"cgroup {cgroup!r} is outside this cgroup namespace")
    return mount.joinpath(*(p for p in parts if p))


def cpu_max_line(millicores: int, period_us: int = CPU_PERIOD_US) -> str:
    """The ``cpu.max`` value for a CPU share in millicores (1000 = one CPU, 50% = 500).

    Raises ValueError for a non-positive share.
    """
    if millicores <= 0:
        raise ValueError(f"cpu limit must be positive, got {millicores} millicores")
    quota = max(CPU_MIN_QUOTA_US, millicores * period_us // 1000)
    return f"{quota} {period_us}"


def valid_job_id(job_id: str) -> bool:
    """True for a lower-case canonical UUID string (the only names of job leaves)."""
    return _JOB_ID.fullmatch(job_id) is not None


# ---------------------------------------------------------------------- small file I/O


def _read(path: Path) -> str:
    # Raw descriptors, not open(): the spawner reads two or three of these files for
    # every job, and a text file object costs more than the reads themselves.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii")


def _write(path: Path, value: str) -> None:
    # One write() per value: cgroup files act on each write call.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)


def _pids(procs: Path) -> list[int]:
    return [int(x) for x in _read(procs).split()]


def _why(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        # What systemd's ProtectControlGroups=yes does to /sys/fs/cgroup, Delegate=yes or not.
        return "read-only file system (the unit must not set ProtectControlGroups=yes)"
    return exc.strerror or str(exc)


# ------------------------------------------------------------------------ discovery


def find_cgroup2_mount() -> Path | None:
    """Where cgroup2 is mounted: /sys/fs/cgroup if it is cgroup2, else another mount.

    On a hybrid host that is typically /sys/fs/cgroup/unified. None without cgroup2.
    """
    try:
        text = _read(Path("/proc/self/mountinfo"))
    except OSError:
        return None
    return choose_cgroup2_mount(parse_cgroup2_mounts(text))


def own_cgroup() -> str:
    """This process's cgroup v2 path (the ``0::`` line of /proc/self/cgroup), e.g. ``/``.

    Raises CgroupError when the kernel reports no cgroup v2 membership.
    """
    try:
        text = _read(Path("/proc/self/cgroup"))
    except OSError as exc:
        raise CgroupError(f"cannot read /proc/self/cgroup: {_why(exc)}") from None
    path = parse_proc_cgroup(text)
    if path is None:
        raise CgroupError("/proc/self/cgroup has no cgroup v2 (0::) line")
    return path


# ---------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """Limits of one job cgroup; None (or empty) means not limited."""

    memory_bytes: int | None = None
    pids: int | None = None
    cpu_millicores: int | None = None
    #: ``io.max`` lines, e.g. ``"8:0 rbps=1048576 wbps=max"``.
    io_max: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "pids", "cpu_millicores"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for line in self.io_max:
            if _IO_MAX_LINE.fullmatch(line) is None:
                raise ValueError(f"invalid io.max line {line!r}")

    def controllers(self) -> frozenset[str]:
        """The controllers these limits need."""
        needed: set[str] = set()
        if self.memory_bytes is not None:
            needed.add("memory")
        if self.pids is not None:
            needed.add("pids")
        if self.cpu_millicores is not None:
            needed.add("cpu")
        if self.io_max:
            needed.add("io")
        return frozenset(needed)


@dataclass(frozen=True)
class Stats:
    """Accounting of one job cgroup."""

    cpu_usage_seconds: float
    cpu_user_seconds: float
    cpu_system_seconds: float
    #: ``memory.peak`` in bytes; None without the memory controller (or before 5.19).
    memory_peak_bytes: int | None
    #: ``oom_kill`` / ``oom_group_kill`` of ``memory.events``; None where not reported.
    oom_kills: int | None
    oom_group_kills: int | None


# --------------------------------------------------------------------------- the job


def join(fd: int) -> None:
    """Move the calling process into the cgroup whose ``cgroup.procs`` is ``fd``.

    The forked child calls this first, before any other set-up and before exec.
    """
    os.write(fd, b"0")


@dataclass(frozen=True)
class JobCgroup:
    """The cgroup leaf of one job."""

    job_id: str
    path: Path

    @property
    def events_path(self) -> Path:
        """The leaf's ``cgroup.events`` (what ``EventWatcher`` watches)."""
        return self.path / "cgroup.events"

    def procs_fd(self) -> int:
        """Open ``cgroup.procs`` for the child's ``join``; the caller closes it after fork.

        Raises CgroupError.
        """
        try:
            return os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(f"cannot open {self.path}/cgroup.procs: {_why(exc)}") from None

    def pids(self) -> list[int]:
        """The pids now in the leaf (empty when it is gone)."""
        try:
            return _pids(self.path / "cgroup.procs")
        except FileNotFoundError:
            return []

    def populated(self) -> bool:
        """Whether any live process is in the leaf or below it (False once removed)."""
        try:
            return parse_keyed(_read(self.events_path)).get("populated", 0) != 0
        except FileNotFoundError:
            return False

    def kill(self) -> None:
        """SIGKILL every process of the job, through ``cgroup.kill`` where it exists.

        Without ``cgroup.kill`` (Linux < 5.14) falls back to ``kill_by_signal``.
        Returns at once with ``cgroup.kill``; wait for ``populated()`` to turn False.
        Raises CgroupError.
        """
        try:
            _write(self.path / "cgroup.kill", "1")
        except FileNotFoundError:
            if not self.path.is_dir():
                return
            self.kill_by_signal()
        except OSError as exc:
            raise CgroupError(f"cannot kill {self.path}: {_why(exc)}") from None

    def kill_by_signal(self, timeout: float = _KILL_FALLBACK_TIMEOUT) -> None:
        """Freeze the leaf (when ``cgroup.freeze`` exists) and SIGKILL each pid until empty.

        The fallback of ``kill`` for kernels without ``cgroup.kill``. Frozen processes
        cannot fork, and SIGKILL still ends them. Raises CgroupError when the leaf is
        not empty within ``timeout`` seconds.
        """
        freeze = self.path / "cgroup.freeze"
        frozen = False
        with contextlib.suppress(FileNotFoundError):
            _write(freeze, "1")
            frozen = True
        deadline = time.monotonic() + timeout
        delay = 0.001
        try:
            while True:
                pids = self.pids()
                if not pids and not self.populated():
                    return
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if time.monotonic() > deadline:
                    raise CgroupError(f"{self.path} still has processes after SIGKILL")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        finally:
            if frozen:
                with contextlib.suppress(FileNotFoundError):
                    _write(freeze, "0")

    def stats(self, memory: bool = True) -> Stats:
        """CPU, peak memory and OOM counts of the leaf. Raises CgroupError.

        ``memory=False``: the memory controller is not enabled for the leaf, so
        ``memory.peak`` and ``memory.events`` do not exist and are not looked for.
        """
        try:
            cpu = parse_keyed(_read(self.path / "cpu.stat"))
        except OSError as exc:
            raise CgroupError(f"cannot read {self.path}/cpu.stat: {_why(exc)}") from None
        peak: int | None = None
        oom: int | None = None
        oom_group: int | None = None
        if memory:
            with contextlib.suppress(FileNotFoundError):
                peak = int(_read(self.path / "memory.peak"))
            with contextlib.suppress(FileNotFoundError):
                events = parse_keyed(_read(self.path / "memory.events"))
                oom = events.get("oom_kill")
                oom_group = events.get("oom_group_kill")
        return Stats(
            cpu_usage_seconds=cpu.get("usage_usec", 0) / 1e6,
            cpu_user_seconds=cpu.get("user_usec", 0) / 1e6,
            cpu_system_seconds=cpu.get("system_usec", 0) / 1e6,
            memory_peak_bytes=peak,
            oom_kills=oom,
            oom_group_kills=oom_group,
        )

    def remove(self, timeout: float = _REMOVE_TIMEOUT) -> None:
        """rmdir the leaf (and empty cgroups the job made inside it); gone is fine.

        Retries while the kernel is still tearing the cgroup down (EBUSY).
        Raises CgroupError if it still cannot be removed after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                self._rmdir_tree()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove {self.path}: {_why(exc)}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _rmdir_tree(self) -> None:
        # The usual leaf has no cgroups of its own: one rmdir, no directory walk.
        try:
            os.rmdir(self.path)
            return
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
        # Only directories, deepest first: on cgroupfs rmdir removes an empty cgroup
        # and nothing else (its interface files go with it).
        for top, dirs, _files in os.walk(self.path, topdown=False):
            for name in dirs:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(os.path.join(top, name))
        os.rmdir(self.path)


# --------------------------------------------------------------------------- subtree


@dataclass(frozen=True)
class Subtree:
    """The cgroup subtree the agent owns; job leaves are created in ``jobs``."""

    jobs: Path
    controllers: frozenset[str] = field(default_factory=frozenset)

    def missing(self, needed: Iterable[str]) -> list[str]:
        """The controllers of ``needed`` not enabled for job cgroups, sorted."""
        return sorted(set(needed) - self.controllers)

    def job(self, job_id: str) -> JobCgroup:
        """The leaf of ``job_id`` (not created). Raises ValueError for an invalid id."""
        if not valid_job_id(job_id):
            raise ValueError(f"invalid job id {job_id!r} (a lower-case UUID is required)")
        return JobCgroup(job_id, self.jobs / job_id)

    def create(self, job_id: str, limits: Limits) -> JobCgroup:
        """Create the leaf of ``job_id`` and write its limits.

        Raises ValueError for an invalid job id, MissingController (before anything is
        created) when a limit's controller is not enabled, CgroupError otherwise.
        """
        job = self.job(job_id)
        missing = self.missing(limits.controllers())
        if missing:
            raise MissingController(missing[0])
        try:
            os.mkdir(job.path, 0o755)
        except OSError as exc:
            raise CgroupError(f"cannot create {job.path}: {_why(exc)}") from None
        try:
            _write_limits(job.path, limits)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(job.path)
            raise
        return job

    def leftovers(self) -> list[JobCgroup]:
        """Job leaves still present (after a crash); the caller kills and removes them."""
        try:
            names = sorted(os.listdir(self.jobs))
        except FileNotFoundError:
            return []
        return [
            JobCgroup(name, self.jobs / name)
            for name in names
            if valid_job_id(name) and (self.jobs / name).is_dir()
        ]


def _write_limits(path: Path, limits: Limits) -> None:
    values: list[tuple[str, str]] = []
    if limits.memory_bytes is not None:
        values.append(("memory.max", str(limits.memory_bytes)))
        # The whole job dies on OOM rather than one arbitrary process of it.
        values.append(("memory.oom.group", "1"))
        # Absent without swap accounting; then there is no swap to limit.
        if (path / "memory.swap.max").exists():
            values.append(("memory.swap.max", "0"))
    if limits.pids is not None:
        values.append(("pids.max", str(limits.pids)))
    if limits.cpu_millicores is not None:
        values.append(("cpu.max", cpu_max_line(limits.cpu_millicores)))
    values.extend(("io.max", line) for line in limits.io_max)
    for name, value in values:
        try:
            _write(path / name, value)
        except OSError as exc:
            raise CgroupError(f"cannot write {value!r} to {path}/{name}: {_why(exc)}") from None


# ----------------------------------------------------------------------------- setup


def setup(mode: str, configured: Path | None, *, under_systemd: bool) -> Subtree | None:
    """Prepare the agent's cgroup subtree.

    ``mode`` is ``"required"`` (failure raises CgroupError, one line: the caller exits
    2), ``"auto"`` (failure is logged once and None returned) or ``"off"`` (None).
    With ``configured`` that directory (and missing parents) is used; else, under
    systemd, the agent's own delegated cgroup (see the module docstring). Raises
    ValueError for an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"cgroup mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return None
    try:
        return _setup(configured, under_systemd=under_systemd)
    except CgroupError as exc:
        if mode == "required":
            raise
        _log_warning("job cgroups disabled: %s", exc)
        return None


def _setup(configured: Path | None, *, under_systemd: bool) -> Subtree:
    mounts = _cgroup2_mounts()
    if configured is not None:
        subtree = _setup_configured(configured, mounts)
    elif under_systemd:
        subtree = _setup_delegated(mounts)
    else:
        raise CgroupError("no cgroup path configured and not running under systemd")
    _probe(subtree)
    return subtree


def _cgroup2_mounts() -> list[Path]:
    try:
        mounts = parse_cgroup2_mounts(_read(Path("/proc/self/mountinfo")))
    except OSError as exc:
        raise CgroupError(f"cannot read /proc/self/mountinfo: {_why(exc)}") from None
    if not mounts:
        raise CgroupError("no cgroup2 file system is mounted")
    return mounts


def _mount_of(path: Path, mounts: list[Path]) -> Path | None:
    best: Path | None = None
    for mount in mounts:
        inside = path == mount or mount in path.parents
        if inside and (best is None or len(mount.parts) > len(best.parts)):
            best = mount
    return best


def _setup_configured(configured: Path, mounts: list[Path]) -> Subtree:
    if not configured.is_absolute():
        raise CgroupError(f"cgroup path {configured} is not absolute")
    path = Path(os.path.realpath(configured))
    mount = _mount_of(path, mounts)
    if mount is None:
        where = ", ".join(str(m) for m in mounts)
        raise CgroupError(f"cgroup path {configured} is not inside a cgroup2 mount ({where})")
    if path.exists() and not path.is_dir():
        raise CgroupError(f"cgroup path {configured} exists and is not a directory")
    # Missing directories, outermost first; each one mkdir'd is a new cgroup.
    todo = [d for d in (*reversed(path.parents), path) if mount in d.parents and not d.is_dir()]
    for directory in todo:
        try:
            os.mkdir(directory, 0o755)
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {directory}: {_why(exc)}") from None
    if not (path / "cgroup.procs").exists():
        raise CgroupError(f"cgroup path {configured} is not a cgroup (no cgroup.procs)")
    # Enable controllers down the chain this module created, never in an ancestor
    # that existed before.
    for directory in todo or [path]:
        _enable_controllers(directory)
    return Subtree(path, _enabled(path))


def _setup_delegated(mounts: list[Path]) -> Subtree:
    mount = choose_cgroup2_mount(mounts)
    assert mount is not None  # _cgroup2_mounts refuses an empty list
    own = own_cgroup()
    if own == "/":
        raise CgroupError(
            "the agent runs in the root cgroup, not a delegated one (set Delegate=yes "
            "in the unit, or configure a cgroup path)"
        )
    own_dir = cgroup_dir(mount, own)
    if not own_dir.is_dir():
        raise CgroupError(f"own cgroup {own_dir} not found (is the cgroup namespace private?)")
    if not _is_delegated(own_dir):
        raise CgroupError(
            f"own cgroup {own_dir} is not delegated (set Delegate=yes in the unit; "
            "systemd 251+ marks it with the trusted.delegate xattr)"
        )
    supervisor = own_dir / SUPERVISOR_LEAF
    jobs = own_dir / JOBS_DIR
    try:
        os.makedirs(supervisor, mode=0o755, exist_ok=True)
        _move_all(own_dir / "cgroup.procs", supervisor / "cgroup.procs")
        _enable_controllers(own_dir)
        os.makedirs(jobs, mode=0o755, exist_ok=True)
        _enable_controllers(jobs)
    except OSError as exc:
        raise CgroupError(f"cannot prepare delegated cgroup {own_dir}: {_why(exc)}") from None
    return Subtree(jobs, _enabled(jobs))


def _is_delegated(directory: Path) -> bool:
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(directory, name).strip() in (b"1", b"yes", b"true"):
                return True
        except OSError:
            continue
    return False


def _move_all(source: Path, dest: Path) -> None:
    # A process may fork while we move: repeat until the source is empty.
    for _ in range(100):
        pids = _pids(source)
        if not pids:
            return
        for pid in pids:
            try:
                _write(dest, str(pid))
            except ProcessLookupError:
                continue
    raise CgroupError(f"processes keep appearing in {source.parent}")


def _enable_controllers(directory: Path) -> None:
    try:
        available = set(_read(directory / "cgroup.controllers").split())
    except OSError as exc:
        raise CgroupError(f"cannot read {directory}/cgroup.controllers: {_why(exc)}") from None
    wanted = [c for c in JOB_CONTROLLERS if c in available]
    for controller in wanted:
        try:
            _write(directory / "cgroup.subtree_control", f"+{controller}")
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupError(
                    f"cannot enable {controller} in {directory}: it has processes of its own "
                    "(cgroup v2 allows controllers only above leaves)"
                ) from None
            # Still usable without this controller; create() refuses limits needing it.
            _log_warning("cannot enable %s in %s: %s", controller, directory, _why(exc))


def _enabled(directory: Path) -> frozenset[str]:
    try:
        enabled = set(_read(directory / "cgroup.subtree_control").split())
    except OSError as exc:
        raise CgroupError(f"cannot read {directory}/cgroup.subtree_control: {_why(exc)}") from None
    return frozenset(enabled & set(JOB_CONTROLLERS))


def _probe(subtree: Subtree) -> None:
    """Create a leaf, move a real process into it, kill it as a whole, remove it."""
    import subprocess  # the agent's set-up only (see _log_warning)

    # Probe leaves of an earlier run that died mid-probe (empty, so rmdir works).
    for stale in subtree.jobs.glob("probe-*"):
        with contextlib.suppress(OSError):
            os.rmdir(stale)
    probe = JobCgroup("probe", subtree.jobs / f"probe-{os.getpid()}")
    try:
        os.mkdir(probe.path, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CgroupError(f"cannot create a cgroup in {subtree.jobs}: {_why(exc)}") from None
    try:
        if not (probe.path / "cgroup.kill").exists():
            if not (probe.path / "cgroup.freeze").exists():
                raise CgroupError("the kernel has neither cgroup.kill nor cgroup.freeze")
            _log_warning("no cgroup.kill (Linux < 5.14): jobs are killed by freeze and SIGKILL")
        # A process that waits for its stdin to close.
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", "import sys; sys.stdin.buffer.read(1)"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        try:
            try:
                _write(probe.path / "cgroup.procs", str(child.pid))
            except OSError as exc:
                raise CgroupError(f"cannot move a process into {probe.path}: {_why(exc)}") from None
            if child.pid not in probe.pids():
                raise CgroupError(f"a process written to {probe.path}/cgroup.procs is not in it")
            probe.kill()
            try:
                status = child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                status = None
            if status != -signal.SIGKILL:
                raise CgroupError(f"killing {probe.path} did not kill its process")
        finally:
            assert child.stdin is not None
            child.stdin.close()
            if child.poll() is None:
                child.kill()
            child.wait()
        probe.remove()
    finally:
        with contextlib.suppress(OSError):
            probe.remove()


# --------------------------------------------------------------------------- events

_IN_MODIFY = 0x00000002
_IN_IGNORED = 0x00008000
_IN_Q_OVERFLOW = 0x00004000
_EVENT = struct.Struct("iIII")


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    return libc


class EventWatcher:
    """One inotify instance watching the ``cgroup.events`` of many job leaves.

    ``fileno()`` becomes readable when a watched file changed (``populated`` or
    ``frozen``, either way); ``drain()`` then tells which. Check ``populated()`` after
    a watch fires, and once right after ``watch()``.
    """

    def __init__(self) -> None:
        """Raises CgroupError when inotify is unavailable."""
        self._libc = _libc()
        fd: int = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise CgroupError(f"inotify_init1 failed: {os.strerror(err)}")
        self._fd = fd
        self._watched: set[int] = set()

    def fileno(self) -> int:
        """The inotify descriptor, for a selector or ``loop.add_reader``."""
        return self._fd

    def watch(self, job: JobCgroup) -> int:
        """Watch ``job``'s ``cgroup.events``; returns the watch descriptor.

        Raises CgroupError.
        """
        wd: int = self._libc.inotify_add_watch(self._fd, os.fsencode(job.events_path), _IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            raise CgroupError(f"cannot watch {job.events_path}: {os.strerror(err)}")
        self._watched.add(wd)
        return wd

    def unwatch(self, wd: int) -> None:
        """Stop watching ``wd``; a watch the kernel already dropped (rmdir) is fine."""
        self._watched.discard(wd)
        # EINVAL when the file is gone: the kernel removed the watch itself.
        self._libc.inotify_rm_watch(self._fd, wd)

    def drain(self) -> list[int]:
        """Read all pending events; the watch descriptors that fired, each once.

        On queue overflow every watched descriptor is returned.
        """
        fired: dict[int, None] = {}
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    fired.update(dict.fromkeys(sorted(self._watched)))
                elif mask & _IN_IGNORED:
                    self._watched.discard(wd)
                elif mask & _IN_MODIFY and wd in self._watched:
                    fired[wd] = None
        return list(fired)

    def close(self) -> None:
        """Close the inotify descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EventWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
