"""The spawner's pure parts, directly: the exit's message and accounting, the fork child's
report, a plan's Landlock object, the scratch directory's ACL, the place's descriptors."""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import struct
from pathlib import Path

import pytest

from agent.keeper import cgroups, landlock
from agent.keeper.childexec import Starting, report_error
from agent.keeper.childsetup import RLIMIT_RESOURCES, check_limits
from agent.keeper.jobplace import Place, acl_for, landlock_spec
from agent.keeper.jobreap import add_stats, exit_message


def _reaped(
    exit_with: int | None = None, kill_with: int | None = None
) -> tuple[int, int, resource.struct_rusage]:
    """A real child's pid, wait4 status and usage: it exits with ``exit_with`` or is killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        if kill_with is not None:
            os.kill(os.getpid(), kill_with)
        os._exit(exit_with or 0)
    _, status, ru = os.wait4(pid, 0)
    return pid, status, ru


def test_exit_message_of_an_exit_code_and_of_a_signal() -> None:
    pid, status, ru = _reaped(exit_with=3)
    msg = exit_message(pid, status, ru, 1234.5)
    assert msg["op"] == "exited" and msg["pid"] == pid
    assert (msg["code"], msg["signal"], msg["ended"]) == (3, None, 1234.5)
    # Never ru_maxrss (the spawner's own high-water mark survives the fork).
    assert (msg["maxrss"], msg["oom"]) == (0, 0)
    pid, status, ru = _reaped(kill_with=signal.SIGTERM)
    msg = exit_message(pid, status, ru, 0.0)
    assert (msg["code"], msg["signal"]) == (None, signal.SIGTERM)


def test_the_leafs_accounting_takes_the_larger_cpu_times_and_its_own_peak() -> None:
    msg = {"utime": 2.0, "stime": 0.5, "maxrss": 0, "oom": 0}
    stats = cgroups.Stats(
        cpu_usage_seconds=2.0,
        cpu_user_seconds=1.5,  # tick-sampled, short of wait4's exact figure
        cpu_system_seconds=0.75,  # a process wait4 never saw
        memory_peak_bytes=4096,
        oom_kills=1,
        oom_group_kills=2,
    )
    add_stats(msg, stats)
    assert msg == {"utime": 2.0, "stime": 0.75, "maxrss": 4096, "oom": 3}
    bare = cgroups.Stats(1.0, 0.0, 0.0, None, None, None)  # no memory controller
    add_stats(msg, bare)
    assert (msg["maxrss"], msg["oom"]) == (0, 0)


def test_a_fork_childs_report_becomes_the_error_text_and_errno() -> None:
    assert report_error(b"execve\x008") == (
        "execve: Exec format error (ENOEXEC)",
        errno.ENOEXEC,
    )
    assert report_error(b"setrlimit RLIMIT_NOFILE\x001")[1] == errno.EPERM
    # A torn or odd report is still an answer, never an exception.
    text, num = report_error(b"chdir")
    assert num == errno.EIO and text.startswith("chdir: ")
    assert report_error(b"\xff\x00x")[1] == errno.EIO


def test_check_limits_says_what_the_child_would_be_refused() -> None:
    assert check_limits({}, privileged=False, nr_open=1024) == ""
    assert check_limits({"nope": 1}, privileged=True, nr_open=1024) == "unknown limit 'nope'"
    name, (_, rname, _) = next(iter(RLIMIT_RESOURCES.items()))
    for bad in (0, -1, True, "1", 1 << 63):
        assert check_limits({name: bad}, privileged=True, nr_open=1 << 20) == (
            f"setrlimit {rname}: Invalid argument (EINVAL)"
        )
    nofile = next(n for n, (_, r, _) in RLIMIT_RESOURCES.items() if r == "RLIMIT_NOFILE")
    refused = check_limits({nofile: 2048}, privileged=True, nr_open=1024)
    assert refused == "setrlimit RLIMIT_NOFILE: Operation not permitted (EPERM)"
    assert check_limits({nofile: 512}, privileged=True, nr_open=1024) == ""


def test_landlock_spec_of_a_plans_object() -> None:
    spec = landlock_spec({"read": ["/etc"], "write": ["/tmp/x"], "connect_tcp": [443]})
    assert (spec.read, spec.write, spec.read_exec, spec.deny) == (("/etc",), ("/tmp/x",), (), ())
    assert (spec.connect_tcp, spec.bind_tcp) == ((443,), None)
    assert spec.scope_signals and spec.scope_abstract_unix
    assert not landlock_spec({"scope_signals": False}).scope_signals
    with pytest.raises(landlock.LandlockError, match="read: not a list of paths"):
        landlock_spec({"read": "/etc"})
    with pytest.raises(landlock.LandlockError, match="bind_tcp: not a list of ports"):
        landlock_spec({"bind_tcp": ["80"]})


def test_the_scratch_acl_gives_the_job_uid_and_the_owner_rwx_and_nobody_else() -> None:
    acl = acl_for(4242)
    (version,) = struct.unpack_from("=I", acl)
    entries = [struct.unpack_from("=HHI", acl, 4 + 8 * i) for i in range((len(acl) - 4) // 8)]
    no_id = 0xFFFFFFFF
    assert version == 2
    # user::rwx, user:4242:rwx, group::---, mask::rwx, other::---
    assert entries == [(1, 7, no_id), (2, 7, 4242), (4, 0, no_id), (16, 7, no_id), (32, 0, no_id)]


def test_a_places_descriptors_are_closed_after_the_fork(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    place = Place(scratch=str(tmp_path), scratch_fd=fd, notify=pair)
    assert place.child_notify_fd() == pair[1].fileno()
    ours = place.close_descriptors(keep_notify=True)
    assert ours is pair[0] and ours.fileno() >= 0 and pair[1].fileno() == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    assert (place.scratch_fd, place.notify, place.child_notify_fd()) == (-1, None, -1)
    assert place.close_descriptors() is None  # twice: nothing left to close
    # A child that failed sent no listener: the spawner's end is closed, -1 is the answer.
    st = Starting(1, "rid", -1)
    st.notify, st.report = ours, b"execve\x002"
    assert st.take_listener() == -1 and ours.fileno() == -1


def test_a_place_that_cannot_be_finished_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors at the last step (the listen() checks' socket pair, made after
    the scratch directory): the refusal says so and the directory and its descriptor go."""
    from agent.keeper import jobplace

    places = jobplace.JobPlaces(None, os.geteuid() == 0)
    scratch = tmp_path / "job"
    plan = {"scratch": str(scratch), "seccomp": {"udp": False, "allow": [], "listen": "bound"}}

    def no_more(*_: object) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(socket, "socketpair", no_more)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(jobplace.PlaceError) as caught:
        places.prepare(plan, {})
    assert caught.value.code == errno.EMFILE and "listen() checks" in caught.value.text
    assert not scratch.exists()
    assert set(os.listdir("/proc/self/fd")) <= before
