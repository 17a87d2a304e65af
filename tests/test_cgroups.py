"""Job cgroups: real cgroup v2 leaves where the kernel has them, pure parsers on samples.

The pytest process is never forked: children are started with subprocess and join
their cgroup themselves through the descriptor they inherit (``pass_fds``).
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.keeper import cgroups
from agent.keeper.cgroups import (
    CgroupError,
    EventWatcher,
    JobCgroup,
    Limits,
    MissingController,
    Subtree,
)

ROOT = Path(__file__).resolve().parent.parent
MOUNT = cgroups.find_cgroup2_mount()
DEADLINE = 10.0


def _own() -> str | None:
    try:
        return cgroups.own_cgroup()
    except CgroupError:
        return None


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    if MOUNT is None:
        return "no cgroup2 file system is mounted"
    return None


real = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _destroy(path: Path) -> None:
    """Kill and rmdir every cgroup at or below ``path``, deepest first (test cleanup)."""
    if not path.is_dir():
        return
    dirs = [Path(top) for top, _d, _f in os.walk(path)]
    for directory in reversed(dirs):
        job = JobCgroup("cleanup", directory)
        if (directory / "cgroup.kill").exists():
            job.kill()
        deadline = time.monotonic() + DEADLINE
        while job.populated() and time.monotonic() < deadline:
            time.sleep(0.01)
        job.remove()


@pytest.fixture
def base() -> Iterator[Path]:
    """A unique, not yet existing directory in the cgroup2 hierarchy, destroyed after."""
    assert MOUNT is not None
    path = MOUNT / f"agent-test-{uuid.uuid4().hex[:12]}"
    yield path
    _destroy(path)


@pytest.fixture
def subtree(base: Path) -> Subtree:
    """A subtree set up in required mode at a fresh test directory."""
    result = cgroups.setup("required", base, under_systemd=False)
    assert result is not None
    return result


def _new_id() -> str:
    return str(uuid.uuid4())


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _spawn(job: JobCgroup, body: str) -> subprocess.Popen[str]:
    """Start a Python child that joins ``job`` first, then runs ``body``."""
    fd = job.procs_fd()
    script = f"from agent.keeper.cgroups import join\njoin({fd})\n" + textwrap.dedent(body)
    try:
        return subprocess.Popen(
            [sys.executable, "-c", script],
            pass_fds=[fd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
    finally:
        os.close(fd)


def _wait_empty(job: JobCgroup) -> None:
    deadline = time.monotonic() + DEADLINE
    while job.populated():
        assert time.monotonic() < deadline, f"{job.path} still populated: {job.pids()}"
        time.sleep(0.01)


def _gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


# A job that escapes in every usual way: its own session, a double fork that ignores
# SIGTERM, an `env -i` child in another session, and a `set -m` background job.
ESCAPER = """
    import os, signal, subprocess, sys, time
    pids = []
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(w, str(os.getpid()).encode().ljust(16))
            while True:
                time.sleep(1)
        os._exit(0)
    os.wait()
    pids.append(int(os.read(r, 16)))
    env_i = subprocess.Popen(["env", "-i", "sleep", "300"], start_new_session=True)
    pids.append(env_i.pid)
    bash = subprocess.Popen(
        ["bash", "-c", "set -m; (trap '' TERM; exec sleep 300) & echo $!; wait"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids.append(int(bash.stdout.readline()))
    pids.append(bash.pid)
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(300)
"""


# ------------------------------------------------------------------- pure parsing

CPU_STAT = """\
usage_usec 2500000
user_usec 2000000
system_usec 500000
nr_periods 0
nr_throttled 0
throttled_usec 0
core_sched.force_idle_usec 0
"""

MEMORY_EVENTS = """\
low 0
high 0
max 12
oom 2
oom_kill 3
oom_group_kill 1
"""

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

PURE_MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
26 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
90 22 0:40 / /srv/my\\040cg rw,relatime shared:50 - cgroup2 none rw
"""


def test_parse_keyed_cpu_stat() -> None:
    """cpu.stat's usage/user/system microseconds are read as integers, odd keys kept."""
    stat = cgroups.parse_keyed(CPU_STAT)
    assert stat["usage_usec"] == 2_500_000
    assert stat["user_usec"] == 2_000_000
    assert stat["system_usec"] == 500_000
    assert stat["core_sched.force_idle_usec"] == 0


def test_parse_keyed_memory_events_and_garbage() -> None:
    """memory.events counters are parsed; lines that are not `key int` are ignored."""
    events = cgroups.parse_keyed(MEMORY_EVENTS + "junk\nkey notanumber\n")
    assert events["oom_kill"] == 3
    assert events["oom_group_kill"] == 1
    assert "junk" not in events and "key" not in events


def test_mountinfo_hybrid_finds_unified() -> None:
    """On a hybrid host only the cgroup2 mount (/sys/fs/cgroup/unified) is found."""
    mounts = cgroups.parse_cgroup2_mounts(HYBRID_MOUNTINFO)
    assert mounts == [Path("/sys/fs/cgroup/unified")]
    assert cgroups.choose_cgroup2_mount(mounts) == Path("/sys/fs/cgroup/unified")


def test_mountinfo_pure_prefers_sys_fs_cgroup_and_unescapes() -> None:
    """/sys/fs/cgroup is preferred; escaped spaces in mount points are decoded."""
    mounts = cgroups.parse_cgroup2_mounts(PURE_MOUNTINFO)
    assert mounts == [Path("/sys/fs/cgroup"), Path("/srv/my cg")]
    reordered = list(reversed(mounts))
    assert cgroups.choose_cgroup2_mount(reordered) == Path("/sys/fs/cgroup")
    assert cgroups.choose_cgroup2_mount([]) is None


def test_proc_cgroup_v2_line() -> None:
    """The `0::` line gives the v2 path in hybrid and pure layouts; v1-only gives None."""
    hybrid = "9:name=systemd:/\n4:memory:/x/y\n0::/\n"
    pure = "0::/system.slice/worker-agent.service\n"
    assert cgroups.parse_proc_cgroup(hybrid) == "/"
    assert cgroups.parse_proc_cgroup(pure) == "/system.slice/worker-agent.service"
    assert cgroups.parse_proc_cgroup("4:memory:/x\n1:cpu:/\n") is None


def test_cgroup_dir_stays_below_the_mount() -> None:
    """A cgroup path maps below the mount; `/../..` (outside the namespace) is refused."""
    mount = Path("/sys/fs/cgroup")
    service = "/system.slice/worker-agent.service"
    assert cgroups.cgroup_dir(mount, service) == mount / service[1:]
    assert cgroups.cgroup_dir(mount, "/") == mount
    for bad in ("/../..", "/a/../../etc", "relative", "/a/./b"):
        with pytest.raises(CgroupError, match="outside"):
            cgroups.cgroup_dir(mount, bad)


def test_cpu_max_line() -> None:
    """Millicores become `quota period`, at least the kernel's 1 ms minimum quota."""
    assert cgroups.cpu_max_line(500) == "50000 100000"
    assert cgroups.cpu_max_line(2500) == "250000 100000"
    assert cgroups.cpu_max_line(1) == "1000 100000"
    with pytest.raises(ValueError):
        cgroups.cpu_max_line(0)


def test_limits_controllers_and_validation() -> None:
    """Each limit names its controller; non-positive values and bad io.max lines fail."""
    assert Limits().controllers() == frozenset()
    limits = Limits(memory_bytes=1, pids=2, cpu_millicores=3, io_max=("8:0 wbps=1048576",))
    assert limits.controllers() == {"memory", "pids", "cpu", "io"}
    with pytest.raises(ValueError):
        Limits(pids=0)
    with pytest.raises(ValueError):
        Limits(io_max=("8:0 wbps=1\n8:1 rbps=2",))


@pytest.mark.parametrize(
    "job_id",
    [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "supervisor",
        "jobs",
        "probe-1",
        "ABCDEF01-2345-4678-9ABC-DEF012345678",
        str(uuid.UUID(int=1)) + "\n",
        "/" + str(uuid.UUID(int=1)),
        str(uuid.UUID(int=1)) + "/..",
        uuid.UUID(int=1).hex,
    ],
)
def test_invalid_job_ids_refused(job_id: str, tmp_path: Path) -> None:
    """Anything but a lower-case canonical UUID is refused before touching the disk."""
    subtree = Subtree(tmp_path)
    with pytest.raises(ValueError, match="invalid job id"):
        subtree.create(job_id, Limits())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- setup


def test_setup_off_does_nothing(tmp_path: Path) -> None:
    """Mode off returns None without creating the configured path."""
    path = tmp_path / "never"
    assert cgroups.setup("off", path, under_systemd=False) is None
    assert not path.exists()


def test_setup_unknown_mode() -> None:
    """An unknown mode is a programming error (ValueError), not a silent off."""
    with pytest.raises(ValueError, match="mode"):
        cgroups.setup("maybe", None, under_systemd=False)


@real
@pytest.mark.parametrize("kind", ["tmp_dir", "tmp_file", "cgroup_file", "relative"])
def test_setup_required_refuses_unusable_path(kind: str, tmp_path: Path) -> None:
    """Required mode refuses a non-cgroup2 directory, a file, a relative path: one line."""
    assert MOUNT is not None
    regular = tmp_path / "file"
    regular.write_text("x")
    path = {
        "tmp_dir": tmp_path,
        "tmp_file": regular,
        "cgroup_file": MOUNT / "cgroup.procs",
        "relative": Path("agent-jobs"),
    }[kind]
    with pytest.raises(CgroupError) as info:
        cgroups.setup("required", path, under_systemd=False)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    assert not Path("agent-jobs").exists()


@real
def test_setup_auto_returns_none_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Auto mode turns a failure into None and one warning naming the reason."""
    with caplog.at_level(logging.WARNING, logger="agent.keeper.cgroups"):
        assert cgroups.setup("auto", tmp_path, under_systemd=False) is None
    records = [r for r in caplog.records if r.name == "agent.keeper.cgroups"]
    assert len(records) == 1
    assert "not inside a cgroup2 mount" in records[0].getMessage()


@real
def test_setup_creates_nested_path_and_cleans_its_probe(base: Path) -> None:
    """Required mode creates missing parents, probes, and leaves no probe leaf behind."""
    path = base / "a" / "b"
    subtree = cgroups.setup("required", path, under_systemd=False)
    assert subtree is not None
    assert subtree.jobs == path
    assert (path / "cgroup.procs").exists()
    assert [p.name for p in path.iterdir() if p.is_dir()] == []


@real
@pytest.mark.skipif(_own() != "/", reason="needs to run in the root cgroup")
def test_setup_systemd_refuses_root_cgroup() -> None:
    """Under systemd the root cgroup is never taken as the agent's delegated one."""
    with pytest.raises(CgroupError, match="root cgroup"):
        cgroups.setup("required", None, under_systemd=True)


@real
@pytest.mark.skipif(_own() != "/", reason="needs to run in the root cgroup")
def test_setup_no_path_not_systemd_auto_is_none() -> None:
    """Without a path and without systemd there is nothing to use: auto gives None."""
    assert cgroups.setup("auto", None, under_systemd=False) is None


_DELEGATED_CHILD = """
    import sys, time
    from agent.keeper import cgroups
    try:
        subtree = cgroups.setup("required", None, under_systemd=True)
    except cgroups.CgroupError as exc:
        print("ERROR", exc, flush=True)
    else:
        print("JOBS", subtree.jobs, flush=True)
    sys.stdin.readline()
"""


@real
@pytest.mark.parametrize("delegated", [True, False])
def test_setup_systemd_delegation(base: Path, delegated: bool) -> None:
    """Under systemd every process of the own cgroup moves to supervisor; jobs/ is made.

    Without the delegation mark systemd set (trusted.delegate) the cgroup is refused.
    """
    own = base / "worker-agent.service"
    os.makedirs(own)
    if delegated:
        os.setxattr(own, "trusted.delegate", b"1")
    own_job = JobCgroup("own", own)
    sibling = _spawn(own_job, "import sys; print('up', flush=True); sys.stdin.readline()")
    assert sibling.stdout is not None
    assert sibling.stdout.readline() == "up\n"
    agent = _spawn(own_job, _DELEGATED_CHILD)
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline().split(maxsplit=1)
        if not delegated:
            assert line[0] == "ERROR" and "not delegated" in line[1]
            assert not (own / "jobs").exists()
            return
        assert line == ["JOBS", f"{own / 'jobs'}\n"]
        supervisor = JobCgroup("supervisor", own / "supervisor")
        assert sorted(supervisor.pids()) == sorted([sibling.pid, agent.pid])
        assert own_job.pids() == []
        assert (own / "jobs").is_dir()
    finally:
        for child in (sibling, agent):
            assert child.stdin is not None
            child.stdin.close()
            child.wait(DEADLINE)


# --------------------------------------------------------------------------- jobs


@real
def test_join_puts_child_in_the_cgroup(subtree: Subtree) -> None:
    """A child that writes 0 to the inherited cgroup.procs descriptor is in the leaf."""
    job = subtree.create(_new_id(), Limits())
    child = _spawn(job, "print(open('/proc/self/cgroup').read(), 'END', flush=True); input()")
    try:
        assert child.stdout is not None
        lines = list(iter(child.stdout.readline, " END\n"))
        assert job.pids() == [child.pid]
        assert job.populated()
        assert MOUNT is not None
        assert f"0::/{job.path.relative_to(MOUNT)}\n" in lines
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(DEADLINE)
    _wait_empty(job)
    job.remove()
    assert not job.path.exists()


@real
def test_create_refuses_existing_leaf(subtree: Subtree) -> None:
    """Creating the leaf of a job id twice fails instead of sharing a cgroup."""
    job_id = _new_id()
    subtree.create(job_id, Limits())
    with pytest.raises(CgroupError, match="cannot create"):
        subtree.create(job_id, Limits())


@real
@pytest.mark.parametrize("method", ["kill", "kill_by_signal"])
def test_kill_ends_every_escaped_process(subtree: Subtree, method: str) -> None:
    """setsid, double-fork, `env -i` and `set -m` children all die with the cgroup."""
    job = subtree.create(_new_id(), Limits())
    child = _spawn(job, ESCAPER)
    assert child.stdout is not None
    escaped = [int(p) for p in child.stdout.readline().split()]
    assert len(escaped) == 4
    members = set(job.pids())
    assert {child.pid, *escaped} <= members
    getattr(job, method)()
    _wait_empty(job)
    assert child.wait(DEADLINE) == -9
    assert job.pids() == []
    for pid in escaped:
        assert _gone_or_zombie(pid), pid
    job.remove()


@real
def test_watcher_fires_when_cgroup_becomes_empty(subtree: Subtree) -> None:
    """inotify on cgroup.events wakes a selector when the last process exits."""
    job = subtree.create(_new_id(), Limits())
    other = subtree.create(_new_id(), Limits())
    with EventWatcher() as watcher:
        wd = watcher.watch(job)
        other_wd = watcher.watch(other)
        assert wd != other_wd
        child = _spawn(job, "import sys; print('up', flush=True); sys.stdin.readline()")
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "up\n"
        selector = selectors.DefaultSelector()
        selector.register(watcher, selectors.EVENT_READ)
        # kernfs delivers the notification from a work queue, a little after the change.
        assert selector.select(DEADLINE) != []
        assert watcher.drain() == [wd]  # populated 0 -> 1
        assert job.populated()
        assert selector.select(0) == []
        child.stdin.close()
        assert selector.select(DEADLINE) != []
        assert watcher.drain() == [wd]
        assert not job.populated()
        assert selector.select(0) == []
        child.wait(DEADLINE)
        watcher.unwatch(wd)
        job.remove()
        watcher.unwatch(other_wd)
        selector.close()


@real
def test_stats_cpu_seconds_of_a_busy_loop(subtree: Subtree) -> None:
    """cpu.stat accounts the job's CPU time: at least its busy loop, user+system=usage."""
    job = subtree.create(_new_id(), Limits())
    busy = """
        import time
        joined = time.process_time()
        while time.process_time() - joined < 0.3:
            pass
        print(time.process_time() - joined, flush=True)
    """
    started = time.monotonic()
    child = _spawn(job, busy)
    out, _ = child.communicate(timeout=60)
    wall = time.monotonic() - started
    own_cpu = float(out)
    stats = job.stats()
    assert stats.cpu_usage_seconds >= own_cpu >= 0.3
    assert stats.cpu_usage_seconds <= wall * (os.cpu_count() or 1) + 0.1
    assert stats.cpu_user_seconds > 0
    parts = stats.cpu_user_seconds + stats.cpu_system_seconds
    assert abs(parts - stats.cpu_usage_seconds) < 0.05
    job.remove()


@real
def test_stats_without_memory_controller_reads_only_cpu_stat(subtree: Subtree) -> None:
    """stats(memory=False) (no memory controller) gives the CPU and no memory figures;
    with the controller absent it equals what the full read finds."""
    job = subtree.create(_new_id(), Limits())
    child = _spawn(job, "pass")
    child.wait(DEADLINE)
    lean = job.stats(memory=False)
    assert lean.memory_peak_bytes is None and lean.oom_kills is None
    assert lean.oom_group_kills is None
    if "memory" not in subtree.controllers:
        full = job.stats()
        assert (full.memory_peak_bytes, full.oom_kills, full.oom_group_kills) == (None,) * 3
        assert full.cpu_usage_seconds >= lean.cpu_usage_seconds
    job.remove()


@real
def test_memory_peak_is_the_leafs_own(subtree: Subtree) -> None:
    """memory.peak is None without the memory controller, never a parent's figure."""
    job = subtree.create(_new_id(), Limits())
    child = _spawn(job, "pass")
    child.wait(DEADLINE)
    stats = job.stats()
    if "memory" not in subtree.controllers:
        assert stats.memory_peak_bytes is None
        assert stats.oom_kills is None
    else:
        assert stats.memory_peak_bytes is not None and stats.memory_peak_bytes > 0
        parent = subtree.jobs / "memory.peak"
        assert stats.memory_peak_bytes <= int(parent.read_text())
        assert stats.oom_kills == 0
    job.remove()


@real
@pytest.mark.parametrize(
    ("controller", "limits"),
    [
        ("memory", Limits(memory_bytes=64 << 20)),
        ("pids", Limits(pids=32)),
        ("cpu", Limits(cpu_millicores=500)),
        ("io", Limits(io_max=("8:0 wbps=1048576",))),
    ],
)
def test_missing_controller_refused_before_create(
    subtree: Subtree, controller: str, limits: Limits
) -> None:
    """A limit whose controller is not enabled raises MissingController, creating nothing."""
    if controller in subtree.controllers:
        pytest.skip(f"the {controller} controller is enabled here")
    before = sorted(subtree.jobs.iterdir())
    with pytest.raises(MissingController) as info:
        subtree.create(_new_id(), limits)
    assert info.value.controller == controller
    assert controller in str(info.value)
    assert subtree.missing(limits.controllers()) == [controller]
    assert sorted(subtree.jobs.iterdir()) == before


@real
def test_limits_written_where_controllers_exist(subtree: Subtree) -> None:
    """Enabled controllers get their limit files written (memory also oom.group=1)."""
    wanted = {
        "memory": ("memory.max", str(64 << 20)),
        "pids": ("pids.max", "32"),
        "cpu": ("cpu.max", "50000 100000"),
    }
    present = [c for c in wanted if c in subtree.controllers]
    if not present:
        pytest.skip("no memory, pids or cpu controller for job cgroups here")
    limits = Limits(
        memory_bytes=64 << 20 if "memory" in present else None,
        pids=32 if "pids" in present else None,
        cpu_millicores=500 if "cpu" in present else None,
    )
    job = subtree.create(_new_id(), limits)
    for controller in present:
        name, value = wanted[controller]
        assert (job.path / name).read_text().strip() == value
    if "memory" in present:
        assert (job.path / "memory.oom.group").read_text().strip() == "1"
    job.remove()


@real
def test_leftovers_found_and_cleaned_after_restart(subtree: Subtree) -> None:
    """After a restart leftovers() lists job leaves only; kill + remove clears them."""
    job = subtree.create(_new_id(), Limits())
    child = _spawn(job, "import time; print('up', flush=True); time.sleep(300)")
    assert child.stdout is not None
    assert child.stdout.readline() == "up\n"
    stranger = subtree.jobs / "not-a-job"
    os.mkdir(stranger)
    again = cgroups.setup("required", subtree.jobs, under_systemd=False)
    assert again is not None
    found = again.leftovers()
    assert found == [JobCgroup(job.job_id, job.path)]
    for leftover in found:
        leftover.kill()
        _wait_empty(leftover)
        leftover.remove()
    assert child.wait(DEADLINE) == -9
    assert again.leftovers() == []
    assert stranger.is_dir()


@real
def test_remove_takes_nested_cgroups_but_not_a_live_one(subtree: Subtree) -> None:
    """remove() takes empty cgroups the job made, and refuses while a process lives."""
    job = subtree.create(_new_id(), Limits())
    os.makedirs(job.path / "inner" / "deeper")
    child = _spawn(job, "import sys; print('up', flush=True); sys.stdin.readline()")
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline() == "up\n"
    with pytest.raises(CgroupError, match="cannot remove"):
        job.remove(timeout=0.05)
    assert job.path.is_dir()
    child.stdin.close()
    child.wait(DEADLINE)
    _wait_empty(job)
    job.remove()
    assert not job.path.exists()
    job.remove()  # already gone: fine


@real
def test_kill_and_populated_of_a_removed_leaf(subtree: Subtree) -> None:
    """A leaf that is already gone is not populated and kill() is a no-op."""
    job = subtree.create(_new_id(), Limits())
    job.remove()
    assert not job.populated()
    job.kill()
    assert job.pids() == []
    with pytest.raises(CgroupError):
        job.stats()
