"""Each job its own user (issue 24, items 2 and 3): ``[jobs] dynamic_users``.

Real keeper processes (tests/test_keeper_protocol.py's Keeper, as root, so it may switch
users) with a small uid range; real jobs that look at their own ids, at another job's
/proc entry and scratch directory, and leave IPC objects and keys behind; and the
keeper's own seccomp filter, installed by the same function in a child of the test.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_keeper_protocol import POLICY, Conn, Keeper, job_file

from agent.keeper import uids, vspawn
from agent.keeper.spawn import SPAWN_ENV

from helpers import IS_ROOT, cgroup2_mount, job_subtree, make_safe_dir

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="switching jobs to their own uids needs root")

LO, HI = 60600, 60602
PY = """  - name: python
    command: /usr/bin/python3
    aliases: [python3]
    args: {max_count: 8, max_length: 8192}
    syscalls: {allow: [sysv_ipc, keyring]}
"""


@pytest.fixture
def dyn(tmp_path: Path) -> Iterator[Callable[..., Keeper]]:
    """Keepers with dynamic users in LO..HI (or the range given); ``cgroup_jobs``: the
    jobs' cgroup subtree (none by default)."""
    made: list[Keeper] = []

    def make(lo: int = LO, hi: int = HI, cgroup_jobs: Path | None = None) -> Keeper:
        d = tmp_path / f"keeper{len(made)}"
        d.mkdir()
        jobs = {"dynamic_users": True, "dynamic_uid_min": lo, "dynamic_uid_max": hi}
        k = Keeper(d, policy=POLICY + PY, jobs=jobs, cgroup_jobs=cgroup_jobs)
        made.append(k)
        return k

    try:
        yield make
    finally:
        for k in made:
            k.stop()


@pytest.fixture(params=["no cgroup", "job cgroups"])
def where(request: pytest.FixtureRequest) -> Iterator[Path | None]:
    """Where jobs run: no cgroup (the uid's cleanup looks for its processes in /proc), or
    a job subtree of the test's own (a leaf emptied at the job's end: the cleanup knows no
    process of the uid is left and skips that scan)."""
    if request.param == "no cgroup":
        yield None
        return
    if cgroup2_mount() is None:
        pytest.skip("no cgroup2 mount")
    with job_subtree("agent-test-users") as top:
        yield top


NOBODY = 65534


@pytest.fixture(params=["vfork", "fork"])
def standard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Keeper]:
    """A keeper as the standard unit runs it: not root (nobody here), CAP_SETUID and
    CAP_SETGID as ambient capabilities and nothing else; by each spawn path."""
    monkeypatch.setenv(SPAWN_ENV, request.param)
    base = make_safe_dir()
    jobs = {"dynamic_users": True, "dynamic_uid_min": LO, "dynamic_uid_max": HI}
    k = Keeper(base, policy=POLICY + PY, jobs=jobs, run_as=NOBODY)
    try:
        yield k
    finally:
        k.stop()
        shutil.rmtree(base, ignore_errors=True)


def status_of(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (values stripped)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines())}


def test_the_standard_keeper_runs_each_job_as_its_own_uid_with_no_capabilities(
    standard: Keeper,
) -> None:
    """The standard deployment's keeper (not root, CAP_SETUID/CAP_SETGID only): its own
    seccomp filter is in force (and no_new_privs); a job runs as a uid of the range with
    CapEff, CapPrm, CapAmb and CapInh all zero; its scratch directory (the keeper's, 0700,
    no CAP_CHOWN) is its to write; a stop's SIGTERM reaches it (through a helper of its
    uid: the keeper has no CAP_KILL)."""
    k = standard
    c, _ = k.attach()
    keeper = status_of(k.proc.pid)
    assert (keeper["Uid"].split()[0], keeper["Seccomp"], keeper["NoNewPrivs"]) == (
        str(NOBODY),
        "2",
        "1",
    ), k.log()
    assert int(keeper["CapAmb"], 16) == 0xC0  # CAP_SETGID, CAP_SETUID
    script = (
        "grep -E '^Cap(Eff|Prm|Amb|Inh)' /proc/self/status; id -u; "
        'echo x > "$HOME/f" && stat -c %u "$HOME/f"'
    )
    fin = c.run(["sh", "-c", script])
    out = job_file(k, fin["job"]).decode()
    assert fin["state"] == "SUCCEEDED", (fin, out, k.log())
    lines = out.split("\n")
    assert {ln.split(":")[1].strip() for ln in lines[:4]} == {"0000000000000000"}, out
    uid = int(lines[4])
    assert LO <= uid <= HI and int(lines[5]) == uid
    job = c.start(["sleep", "30"])
    pid = started_pid(c, job)
    assert LO <= ids_of(pid)[0][0] <= HI
    c.send({"op": "stop", "job": job, "how": "stop"})
    fin = c.finished(job)
    assert (fin["state"], fin["exit"]["signal"]) == ("STOPPED", 15), fin


def ids_of(pid: int) -> tuple[list[int], list[int]]:
    """The real, effective, saved and fs uids and gids of a process (/proc, as root)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return [int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()]


def started_pid(c: Conn, job: str) -> int:
    got = c.started(job)
    assert "pid" in got, got
    pid: int = got["pid"]
    return pid


def test_concurrent_jobs_get_different_uids_from_the_range(dyn: Callable[..., Keeper]) -> None:
    """Two jobs running at once: each a uid (and the gid of the same number) of the range,
    all four ids of each, no supplementary groups; not the same uid."""
    k = dyn()
    c, _ = k.attach()
    a, b = c.start(["sleep", "30"]), c.start(["sleep", "30"])
    pa, pb = started_pid(c, a), started_pid(c, b)
    (ua, ga), (ub, gb) = ids_of(pa), ids_of(pb)
    assert len(set(ua)) == len(set(ga)) == len(set(ub)) == len(set(gb)) == 1
    assert ua == ga and ub == gb and ua[0] != ub[0]
    assert {ua[0], ub[0]} <= set(range(LO, HI + 1))
    groups = [
        ln for ln in Path(f"/proc/{pa}/status").read_text().splitlines() if ln[:7] == "Groups:"
    ]
    assert [g.split(":")[1].strip() for g in groups] == [""]
    for job in (a, b):
        c.send({"op": "stop", "job": job, "how": "stop"})
        assert c.finished(job)["state"] == "STOPPED"


def test_a_job_of_a_dynamic_user_has_no_capabilities(dyn: Callable[..., Keeper]) -> None:
    """CapEff, CapPrm and CapAmb of the job are all zero (and id says the range's uid)."""
    k = dyn()
    c, _ = k.attach()
    fin = c.run(["sh", "-c", "grep -E '^Cap(Eff|Prm|Amb|Inh)' /proc/self/status; id -u; id -G"])
    assert fin["state"] == "SUCCEEDED", fin
    out = job_file(k, fin["job"]).decode().split("\n")
    caps = dict(line.split(":\t") for line in out[:4])
    assert {v for v in caps.values()} == {"0000000000000000"}, caps
    uid, groups = int(out[4]), out[5].split()
    assert LO <= uid <= HI and groups == [str(uid)]


def test_uids_are_reused_only_after_release_and_never_leave_the_range(
    dyn: Callable[..., Keeper],
) -> None:
    """With a range of two: two running jobs hold both uids, a third start is refused
    (RESOURCE_EXHAUSTED, nothing started); once one has ended its uid is given again,
    and never one outside the range (many short jobs, two at a time)."""
    k = dyn(LO, LO + 1)
    c, _ = k.attach()
    a, b = c.start(["sleep", "30"]), c.start(["sleep", "30"])
    ua, ub = ids_of(started_pid(c, a))[0][0], ids_of(started_pid(c, b))[0][0]
    assert {ua, ub} == {LO, LO + 1}
    refused = c.refused(["sleep", "1"])
    assert (refused["kind"], refused["rule"]) == ("RESOURCE_EXHAUSTED", "dynamic-users-exhausted")
    c.send({"op": "stop", "job": a, "how": "kill"})
    c.finished(a)
    again = c.start(["sleep", "30"])
    assert ids_of(started_pid(c, again))[0][0] == ua
    for job in (b, again):
        c.send({"op": "stop", "job": job, "how": "kill"})
        c.finished(job)
    seen = set()
    for _ in range(6):
        jobs = [c.start(["sh", "-c", "id -u"]) for _ in range(2)]
        for job in jobs:
            fin = c.finished(job)
            assert fin["state"] == "SUCCEEDED", fin
            seen.add(int(job_file(k, job)))
    assert seen <= {LO, LO + 1}


def test_a_job_cannot_read_another_jobs_proc_entry_or_scratch(dyn: Callable[..., Keeper]) -> None:
    """Job B cannot read job A's /proc/PID/environ (ptrace's check: another uid) nor list
    A's scratch directory (0700, A's uid); A itself can (the control)."""
    k = dyn()
    c, _ = k.attach()
    a = c.start(["sleep", "30"])
    pa = started_pid(c, a)
    scratch = k.safe / "scratch" / a
    st = scratch.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (
        *ids_of(pa)[0][:1],
        ids_of(pa)[1][0],
        0o700,
    )
    probe = (
        "import os, sys\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        (os.listdir if p.startswith('/var') else lambda q: open(q, 'rb').read())(p)\n"
        "        print('read', p)\n"
        "    except PermissionError:\n"
        "        print('denied', p)\n"
    )
    targets = [f"/proc/{pa}/environ", str(scratch)]
    fin = c.run(["python3", "-c", probe, *targets])
    assert fin["state"] == "SUCCEEDED", fin
    assert job_file(k, fin["job"]).decode().split() == ["denied", targets[0], "denied", targets[1]]
    c.send({"op": "stop", "job": a, "how": "kill"})
    c.finished(a)


SYSV_AND_KEY = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
assert libc.shmget(0x5eed0001, 4096, 0o1600) >= 0, ctypes.get_errno()
assert libc.msgget(0x5eed0002, 0o1600) >= 0, ctypes.get_errno()
assert libc.semget(0x5eed0003, 1, 0o1600) >= 0, ctypes.get_errno()
key = libc.syscall(248, b"user", b"agent-test", b"secret", 6, -4)  # add_key to @u
assert key > 0, ctypes.get_errno()
print(os.getuid())
"""


def _sysv_owned(uid: int) -> list[str]:
    """The System V objects of ``uid`` (as /proc/sysvipc lists them to root)."""
    left = []
    for kind in ("shm", "msg", "sem"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        head = lines[0].split()
        for line in lines[1:]:
            row = dict(zip(head, line.split(), strict=False))
            if int(row["uid"]) == uid or int(row["cuid"]) == uid:
                left.append(f"{kind} {row['key']}")
    return left


def _user_keyring_size(uid: int) -> int:
    """The bytes of the user keyring of ``uid`` (its key ids), read as that uid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            libc = ctypes.CDLL(None, use_errno=True)
            buf = ctypes.create_string_buffer(4096)
            n = libc.syscall(250, 11, -4, buf, 4096)  # keyctl(KEYCTL_READ, @u)
            os.write(w, str(n).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return int(data)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers of x86-64")
def test_a_jobs_ipc_objects_and_keys_are_gone_before_its_uid_is_given_again(
    dyn: Callable[..., Keeper], where: Path | None
) -> None:
    """A job leaves a shared memory segment, a message queue, a semaphore set and a key in
    its uid's keyring: none is left once the next job is given the uid (a range of one:
    the next start waits for the cleanup, which runs beside the keeper's loop after the
    end is told). The control: the same made by hand as that uid (and a POSIX shared
    memory file, which a job's Landlock domain keeps it from making) are seen by these
    checks, and are gone after the same clean-up."""
    k = dyn(LO, LO, cgroup_jobs=where)
    c, _ = k.attach()
    fin = c.run(["python3", "-c", SYSV_AND_KEY])
    assert fin["state"] == "SUCCEEDED", (fin, job_file(k, fin["job"]))
    uid = int(job_file(k, fin["job"]))
    assert uid == LO
    nxt = c.start(["sleep", "30"])
    assert ids_of(started_pid(c, nxt))[0][0] == uid
    assert _sysv_owned(uid) == []
    assert _user_keyring_size(uid) == 0
    c.send({"op": "stop", "job": nxt, "how": "kill"})
    c.finished(nxt)
    # The control: the same objects made by hand as a uid of the range that this keeper
    # does not use (its own cleanups would race this one) are seen by these checks, and
    # gone after the same cleanup, in both of its ways.
    other = LO + 1
    cleanups: list[Callable[[], bool]] = [
        lambda: uids.reclaim(other, contained=False),  # the /proc scan
        lambda: uids.reclaim(other, contained=True),  # a forked helper, no scan
    ]
    module = vspawn.choose({})[2]
    if module is not None:  # the C child the keeper uses for a contained job
        cleanups.append(lambda: uids.reclaim_contained(module, other))
    for cleanup in cleanups:
        assert uids.as_user(other, other, lambda: exec(
            SYSV_AND_KEY.replace("print(os.getuid())", ""), {"__name__": "x"}))  # fmt: skip
        shm = Path("/dev/shm/agent-test-dynamic-user")
        assert uids.as_user(other, other, shm.touch)
        assert len(_sysv_owned(other)) == 3 and _user_keyring_size(other) > 0 and shm.exists()
        assert cleanup()
        assert _sysv_owned(other) == [] and _user_keyring_size(other) == 0
        assert not shm.exists()


def test_a_dynamic_users_leftover_processes_are_gone_before_its_uid_is_given_again(
    dyn: Callable[..., Keeper], where: Path | None
) -> None:
    """A job that leaves a process behind in a session of its own: the process is killed
    (by the uid's cleanup, or with the job's cgroup) before the uid is given again (a
    range of one uid: the next job's). Zombies aside: they hold nothing."""
    k = dyn(LO, LO, cgroup_jobs=where)
    c, _ = k.attach()
    fin = c.run(
        [
            "python3",
            "-c",
            "import os, time\nif os.fork() == 0:\n  os.setsid()\n  time.sleep(60)\n"
            "print(os.getuid())",
        ]
    )
    assert fin["state"] == "SUCCEEDED", fin
    nxt = c.start(["sleep", "30"])
    nxt_pid = started_pid(c, nxt)
    assert ids_of(nxt_pid)[0][0] == LO

    def others_left() -> list[int]:
        found = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and int(p.name) != nxt_pid:
                try:
                    stat = (p / "stat").read_bytes()
                    zombie = stat[stat.rfind(b")") + 2 :][:1] in (b"Z", b"X")
                    if ids_of(int(p.name))[0][0] == LO and not zombie:
                        found.append(int(p.name))
                except (OSError, KeyError):
                    continue
        return found

    assert others_left() == []
    c.send({"op": "stop", "job": nxt, "how": "kill"})
    c.finished(nxt)


# ---------------------------------------------------------------- the keeper's own filter


def _in_filtered_child(check: Callable[[], Any]) -> Any:
    """Run ``check`` in a child that installed the keeper's filter for LO..HI; its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            uids.install_keeper_filter(LO, HI)
            os.write(w, repr(check()).encode())
        except BaseException as e:
            os.write(w, repr(f"error: {e}").encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    import ast

    return ast.literal_eval(data.decode())


def _errno_of(call: Callable[[], Any]) -> int:
    try:
        call()
    except OSError as e:
        return e.errno or -1
    return 0


def test_the_keepers_filter_refuses_uid_0_and_ids_outside_the_range() -> None:
    """After the filter: setresuid(0,0,0), setuid(0), a uid above the range, setresgid(0),
    a value whose low 32 bits are 0 (uid 0 to the kernel), setgroups of one group and a
    chown to root all fail with EPERM; -1, in-range ids and setgroups([]) work, and the
    switch to an in-range uid really happens."""

    def check() -> dict[str, int | list[int]]:
        libc = ctypes.CDLL(None, use_errno=True)
        nr = {"x86_64": 117, "aarch64": 147}.get(os.uname().machine, -1)  # setresuid

        def raw_high() -> None:
            if nr < 0:
                raise OSError(errno.EPERM, "skipped")
            big = ctypes.c_ulong(1 << 32)  # uid 0 to the kernel
            if libc.syscall(ctypes.c_long(nr), big, big, big) < 0:
                raise OSError(ctypes.get_errno(), "setresuid")

        with open("/tmp/.agent-test-chown", "w"):
            pass
        out: dict[str, int | list[int]] = {
            "setresuid 0": _errno_of(lambda: os.setresuid(0, 0, 0)),
            "setuid 0": _errno_of(lambda: os.setuid(0)),
            "setresuid above": _errno_of(lambda: os.setresuid(HI + 1, HI + 1, HI + 1)),
            "setresuid below": _errno_of(lambda: os.setresuid(LO - 1, -1, -1)),
            "setresgid 0": _errno_of(lambda: os.setresgid(0, 0, 0)),
            "setresuid 1<<32": _errno_of(raw_high),
            "setgroups [0]": _errno_of(lambda: os.setgroups([0])),
            "chown root": _errno_of(lambda: os.chown("/tmp/.agent-test-chown", 0, 0)),
            "chown in range": _errno_of(lambda: os.chown("/tmp/.agent-test-chown", LO, LO)),
            "setgroups []": _errno_of(lambda: os.setgroups([])),
            "setresgid in range": _errno_of(lambda: os.setresgid(LO, LO, -1)),
            "setresuid in range": _errno_of(lambda: os.setresuid(HI, HI, HI)),
        }
        out["uids"] = list(os.getresuid())
        out["back to 0"] = _errno_of(lambda: os.setresuid(0, 0, 0))
        return out

    got = _in_filtered_child(check)
    os.unlink("/tmp/.agent-test-chown")
    eperm = errno.EPERM
    assert got == {
        "setresuid 0": eperm,
        "setuid 0": eperm,
        "setresuid above": eperm,
        "setresuid below": eperm,
        "setresgid 0": eperm,
        "setresuid 1<<32": eperm,
        "setgroups [0]": eperm,
        "chown root": eperm,
        "chown in range": 0,
        "setgroups []": 0,
        "setresgid in range": 0,
        "setresuid in range": 0,
        "uids": [HI, HI, HI],
        "back to 0": eperm,
    }


def test_the_c_cleanup_of_a_uid_is_bound_by_the_keepers_filter() -> None:
    """The C child that cleans up after a contained job switches to the uid with the
    keeper's rights: under the keeper's filter a uid outside the range (root here) is
    refused (its user switch fails, the cleanup says so and the uid would stay out of
    use) and one inside it runs."""
    module = vspawn.choose({})[2]
    if module is None:
        pytest.skip("agent.keeper._vspawn is not built")
    got = _in_filtered_child(
        lambda: [uids.reclaim_contained(module, 0), uids.reclaim_contained(module, LO)]
    )
    assert got == [False, True]


def test_the_filter_program_is_what_the_kernel_runs() -> None:
    """The program is whole instructions with forward jumps only (the kernel would refuse
    anything else), for this architecture's numbers."""
    from agent.keeper import seccomp

    numbers = {n: seccomp.syscall_number(n) for n in (*uids.ID_CALLS, *uids.GROUP_CALLS)}
    prog = uids.keeper_filter(LO, HI, seccomp.native_arch(), numbers)
    assert len(prog) % 8 == 0 and 0 < len(prog) // 8 < 4096
    for code, jt, jf, _k in struct.iter_unpack("=HBBI", prog):
        assert code in (0x20, 0x15, 0x35, 0x25, 0x06) and jt >= 0 and jf >= 0


def test_pool_round_robin_and_release() -> None:
    """The pool hands out each uid of its range once, then None; a released uid comes
    back only after the others that were free; bad ranges are refused."""
    p = uids.Pool(10, 12)
    assert [p.take(), p.take(), p.take(), p.take()] == [10, 11, 12, None]
    p.release(11)
    p.release(10)
    assert p.take() == 10 and p.take() == 11 and p.take() is None
    p.release(12)
    assert p.take() == 12 and 12 in p and 13 not in p
    with pytest.raises(ValueError):
        uids.Pool(0, 5)
    with pytest.raises(ValueError):
        uids.Pool(5, 4)


def test_the_scratch_acl_gives_the_directory_to_the_jobs_uid_only(tmp_path: Path) -> None:
    """A keeper without CAP_CHOWN (the standard unit) gives a job's scratch directory to
    the job's uid by an access ACL: that uid may create and list in it, another uid of the
    range may not (the directory stays the keeper's, nothing for group or others)."""
    from agent.keeper.jobplace import acl_for

    d = Path("/var/lib/agent-tests") / f"acl-{os.getpid()}"
    d.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    d.mkdir(mode=0o700)
    try:
        try:
            os.setxattr(d, "system.posix_acl_access", acl_for(LO), follow_symlinks=False)
        except OSError as e:
            pytest.skip(f"no POSIX ACLs on {d.parent}: {e}")
        assert uids.as_user(LO, LO, lambda: (d / "mine").write_text("x"))
        assert uids.as_user(LO, LO, lambda: os.listdir(d))
        assert not uids.as_user(LO + 1, LO + 1, lambda: os.listdir(d))
        assert (d / "mine").stat().st_uid == LO
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def test_without_root_or_capabilities_jobs_keep_one_uid_and_it_is_said(tmp_path: Path) -> None:
    """The development quick start as a normal user: a keeper that is neither root nor
    holds CAP_SETUID/CAP_SETGID cannot switch users; dynamic_users is then ignored with a
    warning naming the key and the user every job runs as (and the range is None)."""
    from agent.keeper import capabilities, config, decision

    path = tmp_path / "config.toml"
    path.write_text(
        "[grpc_server]\nuse_tls = false\nallow_plaintext_loopback = true\n"
        "[auth]\nallow_anonymous = true\n"
        '[jobs]\npolicy_file = "policy.yaml"\ndynamic_users = true\n'
    )
    cfg = config.load(path)
    assert decision.dynamic_range(cfg) == ((60600, 61099), [])  # root: the default range

    def as_nobody() -> object:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        capabilities.held.cache_clear()
        return decision.dynamic_range(cfg)

    rng, warnings = _in_child(as_nobody)
    assert rng is None and len(warnings) == 1, warnings
    assert "[jobs] dynamic_users = true is ignored" in warnings[0] and "'nobody'" in warnings[0]


def _in_child(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child (its result by repr)."""
    import ast

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, repr(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return ast.literal_eval(data.decode())


@pytest.mark.parametrize("path", ["vfork", "fork"])
def test_a_keeper_with_capabilities_drops_them_in_jobs_of_its_own_user(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard unit's keeper without dynamic users (jobs of its own uid, no switch):
    the job still has no CapEff, CapPrm, CapAmb or CapInh (regression: the keeper's
    ambient CAP_SETUID/CAP_SETGID reached such jobs, seen in the real-systemd tier)."""
    monkeypatch.setenv(SPAWN_ENV, path)
    base = make_safe_dir()
    k = Keeper(base, policy=POLICY, run_as=NOBODY)
    try:
        c, _ = k.attach()
        fin = c.run(["sh", "-c", "grep -E '^Cap(Eff|Prm|Amb|Inh)' /proc/self/status; id -u"])
        out = job_file(k, fin["job"]).decode().split("\n")
        assert fin["state"] == "SUCCEEDED", (fin, out, k.log())
        assert {ln.split(":")[1].strip() for ln in out[:4]} == {"0000000000000000"}, out
        assert out[4] == str(NOBODY)
    finally:
        k.stop()
        shutil.rmtree(base, ignore_errors=True)


# The privileged unit's entries: a root one without capabilities, and one of another
# user (daemon) with CAP_NET_BIND_SERVICE.
PRIVILEGED_POLICY = (
    POLICY
    + """  - name: rootsh
    command: /bin/sh
    aliases: [rootsh]
    user: root
    allow_root: true
    capabilities: []
  - name: daemonsh
    command: /bin/sh
    aliases: [daemonsh]
    user: daemon
    capabilities: [CAP_NET_BIND_SERVICE]
"""
)
CAPS = "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; id -u"
# CAP_SETGID 6, CAP_SETUID 7, CAP_SETPCAP 8, CAP_NET_BIND_SERVICE 10
NET_BIND = 1 << 10


def _caps_and_uid(k: Keeper, c: Conn, argv: list[str]) -> tuple[dict[str, int], int]:
    fin = c.run(argv)
    out = job_file(k, fin["job"]).decode()
    assert fin["state"] == "SUCCEEDED", (fin, out, k.log())
    lines = out.split("\n")
    caps = {ln.split(":")[0]: int(ln.split(":")[1], 16) for ln in lines[:5]}
    return caps, int(lines[5])


def _privileged_keeper(base: Path) -> Keeper:
    """The privileged unit's keeper (nobody here) with PRIVILEGED_POLICY, given by its
    unit CAP_NET_RAW too, which no entry names."""
    return Keeper(
        base,
        policy=PRIVILEGED_POLICY,
        run_as=NOBODY,
        caps="+setuid,+setgid,+setpcap,+net_bind_service,+net_raw",
        keeper={"mode": "service", "agent_user": "root"},
        daemon={"on_shutdown": "keep"},
    )


@pytest.mark.parametrize("path", ["vfork", "fork"])
def test_the_privileged_keeper_gives_each_job_its_entrys_user_and_capabilities(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The privileged unit's keeper: not root (nobody here) but CAP_SETUID, CAP_SETGID,
    CAP_SETPCAP and the CAP_NET_BIND_SERVICE an entry gives, as ambient capabilities;
    CAP_NET_RAW, which its unit (a too wide drop-in) gives but no entry names, it drops
    at its start from every set, bounding set included. A root entry's job is uid 0
    with every capability set empty; the daemon entry's has exactly
    CAP_NET_BIND_SERVICE, ambient included; a job of the keeper's own user has none of
    the keeper's; a stop's SIGTERM reaches a root job (through a helper of uid 0: the
    keeper has no CAP_KILL)."""
    monkeypatch.setenv(SPAWN_ENV, path)
    base = make_safe_dir()
    k = _privileged_keeper(base)
    try:
        c, hello = k.attach()
        assert hello.get("gives") is True, hello
        keeper = status_of(k.proc.pid)
        assert keeper["Uid"].split()[0] == str(NOBODY), k.log()
        # SETGID, SETUID, SETPCAP, NET_BIND; not NET_RAW (13)
        sets = {name: int(keeper[name], 16) for name in ("CapAmb", "CapPrm", "CapBnd")}
        assert sets == dict.fromkeys(sets, 0x5C0), (sets, k.log())
        assert "dropped CAP_NET_RAW" in k.log(), k.log()
        caps, uid = _caps_and_uid(k, c, ["rootsh", "-c", CAPS])
        assert (uid, set(caps.values())) == (0, {0}), caps
        caps, uid = _caps_and_uid(k, c, ["daemonsh", "-c", CAPS])
        assert uid == pwd.getpwnam("daemon").pw_uid, uid
        assert caps == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), NET_BIND)
        caps, uid = _caps_and_uid(k, c, ["sh", "-c", CAPS])
        assert (uid, set(caps.values())) == (NOBODY, {0}), caps
        job = c.start(["rootsh", "-c", "sleep 30"])
        assert ids_of(started_pid(c, job))[0][0] == 0
        c.send({"op": "stop", "job": job, "how": "stop"})
        try:
            fin = c.finished(job)
        except TimeoutError:
            raise AssertionError(k.log()) from None
        assert (fin["state"], fin["exit"]["signal"]) == ("STOPPED", 15), (fin, k.log())
    finally:
        k.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_reload_that_brings_a_capability_the_privileged_keeper_dropped_is_refused() -> None:
    """The privileged keeper keeps, from its start, only the capabilities its entries
    give: a reloaded policy whose entry gives another (CAP_NET_RAW, which its unit gave
    but it dropped) is accepted with a warning naming the entry, the capability and the
    restart it needs, in the answer and in the keeper's log; that entry's starts are
    refused (FAILED_PRECONDITION, nothing started), not failed at the job's capset; the
    other entries run on."""
    base = make_safe_dir()
    k = _privileged_keeper(base)
    try:
        c, hello = k.attach()
        assert hello.get("gives") is True, hello
        assert "dropped CAP_NET_RAW" in k.log(), k.log()
        k.policy_path.write_text(
            PRIVILEGED_POLICY
            + "  - name: rawsh\n    command: /bin/sh\n    aliases: [rawsh]\n"
            + "    user: daemon\n    capabilities: [CAP_NET_RAW]\n"
        )
        c.send({"op": "reload", "id": 5})
        answer = c.wait(lambda m: m["op"] == "reloaded")
        entries = PRIVILEGED_POLICY.count("- name:") + 1
        assert (answer["error"], answer["entries"]) == ("", entries), answer
        (warning,) = [w for w in answer["warnings"] if "rawsh" in w]
        assert "CAP_NET_RAW" in warning and "restarted" in warning, warning
        assert warning in k.log(), k.log()
        refusal = c.refused(["rawsh", "-c", CAPS])
        assert (refusal["kind"], refusal["rule"]) == (
            "FAILED_PRECONDITION",
            "capabilities-not-held",
        ), refusal
        assert "'rawsh'" in refusal["message"] and "CAP_NET_RAW" in refusal["message"]
        caps, _ = _caps_and_uid(k, c, ["daemonsh", "-c", CAPS])
        assert caps["CapEff"] == NET_BIND, caps
    finally:
        k.stop()
        shutil.rmtree(base, ignore_errors=True)


SESSION_KEY = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
ring = libc.syscall(250, 0, -3, 0)  # keyctl(KEYCTL_GET_KEYRING_ID, @s)
found = libc.syscall(250, 10, -3, b"user", b"agent-test-session", 0)  # KEYCTL_SEARCH
if sys.argv[1] == "leave":
    assert libc.syscall(248, b"user", b"agent-test-session", b"secret", 6, -3) > 0
print(ring, found)
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers of x86-64")
def test_jobs_of_their_own_uids_do_not_share_the_keepers_session_keyring(
    standard: Keeper,
) -> None:
    """Each job switched to its own uid joins a session keyring of its own: not the one
    the keeper (and, under the unit, KeyringMode=private) would hand every job, so a key
    one job leaves in its session keyring is not found by the next."""
    libc = ctypes.CDLL(None, use_errno=True)
    mine = libc.syscall(250, 0, -3, 0)
    c, _ = standard.attach()
    rings = []
    for what in ("leave", "look"):
        fin = c.run(["python3", "-c", SESSION_KEY, what])
        out = job_file(standard, fin["job"]).decode()
        assert fin["state"] == "SUCCEEDED", (fin, out)
        ring, found = (int(x) for x in out.split())
        assert found == -1, out  # ENOKEY: nothing left by an earlier job
        rings.append(ring)
    assert rings[0] != rings[1] and mine not in rings and min(rings) > 0


LISTEN_PROBE = r"""
import errno, socket, sys
def attempt(name, fn):
    try:
        fn()
        print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
attempt("unbound", lambda: socket.socket().listen())
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
attempt("bound", lambda: s.listen(5))
"""
ATTACH_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1]); s.settimeout(5)
    print("GOT", len(s.recv(65536)))
except OSError as e:
    print("REFUSED", type(e).__name__)
"""


def test_the_standard_keeper_checks_a_dynamic_users_listen_and_refuses_its_attach() -> None:
    """Under the standard keeper (nobody, CAP_SETUID/CAP_SETGID, its own filter): a job of
    a dynamic uid whose entry lists a bind_tcp port gets listen() on its bound socket and
    EPERM on an unbound one (the keeper takes the socket with pidfd_getfd through a helper
    of the job's uid, within the range its filter allows); and the job cannot attach to
    the keeper's socket (refused by its uid, or no access to the socket at all)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    entry = PY.replace("    syscalls:", f"    landlock: {{bind_tcp: [{port}]}}\n    syscalls:")
    base = make_safe_dir()
    jobs = {"dynamic_users": True, "dynamic_uid_min": LO, "dynamic_uid_max": HI}
    k = Keeper(base, policy=POLICY + entry, jobs=jobs, run_as=NOBODY)
    try:
        c, _ = k.attach()
        fin = c.run(["python3", "-c", LISTEN_PROBE, str(port)])
        out = job_file(k, fin["job"]).decode()
        assert fin["state"] == "SUCCEEDED", (fin, out, k.log())
        assert out.split("\n")[:2] == ["unbound EPERM", "bound ok"], (out, k.log())
        fin = c.run(["python3", "-c", ATTACH_PROBE, k.path])
        out = job_file(k, fin["job"]).decode()
        assert out.startswith("REFUSED") or out == "GOT 0\n", out
        assert k.alive()
    finally:
        k.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_released_uid_stays_held_until_its_cleanup_has_ended() -> None:
    """The cleanup at a job's end runs beside the keeper's loop: until its helper has
    ended well (its pidfd readable, then reaped), the uid stays held; a start that finds
    every uid held only by cleanups waits for them instead of being refused."""
    import select

    from agent.keeper.keeperuids import Reclaim, UidHolds

    watched: list[tuple[int, Reclaim]] = []
    unwatched: list[int] = []
    pool = uids.Pool(HI, HI)
    holds = UidHolds(pool, watch=lambda fd, r: watched.append((fd, r)), unwatch=unwatched.append)
    uid = holds.take("a")
    assert uid == HI
    holds.release("a", ran=True)
    assert HI in pool.held and len(watched) == 1 and set(holds.reclaiming) == {watched[0][1].pid}
    fd, r = watched[0]
    select.select([fd], [], [], 30)
    holds.reclaimed(r)
    assert HI not in pool.held and unwatched == [fd] and not holds.reclaiming
    # Every uid held by a cleanup still running: the start waits for it.
    assert holds.take("b") == HI
    holds.release("b", ran=True)
    assert holds.take("c") == HI and not holds.reclaiming
    holds.release("c", ran=False)  # nothing of it ran: free at once
    assert HI not in pool.held
