"""The job spawner's C vfork path (agent.keeper._vspawn) against its Python fork path."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.keeper import capabilities as caps_mod
from agent.keeper import childsetup, landlock, spawner, spawnproto, vspawn
from agent.keeper.lifecycle import Exit
from agent.keeper.spawn import SpawnerOps, SpawnFailure, SpawnSpec

from helpers import IS_ROOT, read_to_end, spawn_and_read, spawn_spec, vspawn_expected

try:
    from agent.keeper import _vspawn  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - only where no compiler was found
    _vspawn = None

needs_vspawn = pytest.mark.skipif(_vspawn is None, reason="agent.keeper._vspawn not built")
STATUS = "^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|SigBlk|SigIgn|SigCgt):"


def test_the_extension_is_built_where_a_compiler_is() -> None:
    """An install on a machine with a C compiler has the C path: nothing silently forks."""
    assert _vspawn is not None or not vspawn_expected()


# ---------------------------------------------------------------- the child, directly


def _plan(**kw: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "path": "/bin/true",
        "argv": ["/bin/true"],
        "env": {"PATH": "/usr/bin:/bin"},
        "cwd": "/",
        "umask": 0o077,
        "uid": None,
        "gid": None,
        "limits": {},
    }
    plan.update(kw)
    return plan


def _fork_report(plan: dict[str, Any], fds: dict[str, int]) -> str:
    """What the Python fork path (childsetup.child) reports for this plan ("" if it ran)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        childsetup.child(plan, dict(fds), w, [], None, IS_ROOT, caps_mod.last_cap())
    os.close(w)
    report = read_to_end(r)
    os.close(r)
    os.waitpid(pid, 0)
    if not report:
        return ""
    step, _, number = report.decode().partition("\0")
    return spawnproto.error_text(step, int(number))


def _vfork_report(plan: dict[str, Any], fds: dict[str, int]) -> str:
    """What the C path reports for this plan ("" if it ran)."""
    pid, error, _ = vspawn.spawn(
        _vspawn, plan, fds, [], None, IS_ROOT, caps_mod.last_cap(), -1, spawner.RLIMIT_RESOURCES
    )
    if pid:
        os.waitpid(pid, 0)
    return error


def _bad_fds(tmp_path: Path) -> dict[str, Callable[[], tuple[dict[str, Any], dict[str, int]]]]:
    def garbage() -> tuple[dict[str, Any], dict[str, int]]:
        f = tmp_path / "garbage"
        f.write_bytes(b"\x7fELF not really\n")
        f.chmod(0o755)
        return _plan(path=str(f), argv=[str(f)]), {}

    def bad_cgroup() -> tuple[dict[str, Any], dict[str, int]]:
        # cgroup.procs opened read-only: the join (a write) fails with EBADF.
        return _plan(), {"cgroup": os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)}

    def bad_exec_fd() -> tuple[dict[str, Any], dict[str, int]]:
        # A directory is not a program.
        return _plan(), {"exec": os.open("/", os.O_RDONLY | os.O_CLOEXEC)}

    return {
        "chdir": lambda: (_plan(cwd=str(tmp_path / "missing")), {}),
        "setrlimit": lambda: (_plan(limits={"open_files": childsetup.nr_open() + 1}), {}),
        "enoexec": garbage,
        "cgroup": bad_cgroup,
        "exec-fd": bad_exec_fd,
    }


FAILURES = {
    "chdir": "chdir: No such file or directory (ENOENT)",
    "setrlimit": "setrlimit RLIMIT_NOFILE: Operation not permitted (EPERM)",
    "enoexec": "execve: Exec format error (ENOEXEC)",
    "cgroup": "cgroup join: Bad file descriptor (EBADF)",
    "exec-fd": "execve: Permission denied (EACCES)",
}


@needs_vspawn
@pytest.mark.parametrize("case", sorted(FAILURES))
def test_each_failing_step_reports_its_step_and_errno_as_the_fork_path(
    case: str, tmp_path: Path
) -> None:
    """A failing set-up step gives the same "step: error (ERRNO)" text on both paths."""
    texts = []
    for report in (_vfork_report, _fork_report):
        plan, fds = _bad_fds(tmp_path)[case]()
        out = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        fds = {"stdout": out, **fds}
        try:
            texts.append(report(plan, fds))
        finally:
            for fd in fds.values():
                os.close(fd)
    assert texts == [FAILURES[case], FAILURES[case]]


@needs_vspawn
def test_a_descriptor_that_is_not_open_fails_setup() -> None:
    """An output descriptor that is not open: "setup" and EBADF, on both paths."""
    fd = 900  # below RLIMIT_NOFILE, never open here (a freed low number would be reused)
    assert not os.path.exists(f"/proc/self/fd/{fd}")
    assert _vfork_report(_plan(), {"stdout": fd}) == _fork_report(_plan(), {"stdout": fd})
    assert _vfork_report(_plan(), {"stdout": fd}) == "setup: Bad file descriptor (EBADF)"


@needs_vspawn
def test_empty_argv0_is_refused_as_the_fork_path_does() -> None:
    """os.execve refuses an empty argv[0] with EINVAL; the C path says the same."""
    out = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
    try:
        plan = _plan(argv=[""])
        assert _vfork_report(plan, {"stdout": out}) == _fork_report(plan, {"stdout": out})
    finally:
        os.close(out)


@needs_vspawn
def test_parent_signal_state_is_restored_and_the_job_starts_clean() -> None:
    """Signals blocked, ignored or handled in the spawner: default and unmasked in the job;
    the spawner's own mask and handlers are as before the spawn."""
    caught: list[int] = []
    old_usr2 = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    old_alrm = signal.signal(signal.SIGALRM, lambda s, f: caught.append(s))
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        # Read by the job itself, a shell built-in loop: not grep's own mask, and not the
        # shell's while it forks (dash blocks every signal around a fork).
        script = (
            "while read -r k v; do case $k in SigBlk:|SigIgn:) echo $k$v;; esac; "
            "done < /proc/self/status"
        )
        plan = _plan(path="/bin/sh", argv=["/bin/sh", "-c", script])
        # What Spawner.setup_signals collects: every disposition that is not the default
        # (SIGPIPE and SIGXFSZ, ignored by Python, SIGUSR2); SIGALRM's handler is not
        # listed, but no handler may survive in the child anyway.
        reset = [
            s
            for s in signal.valid_signals()
            if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGALRM)
            and signal.getsignal(s) not in (signal.SIG_DFL, None)
        ]
        assert signal.SIGUSR2 in reset
        pid, error, _ = vspawn.spawn(
            _vspawn, plan, {"stdout": w}, reset, None, IS_ROOT, 40, -1, spawner.RLIMIT_RESOURCES
        )
        os.close(w)
        w = -1
        assert error == ""
        out = read_to_end(r)
        os.waitpid(pid, 0)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == old_mask | {signal.SIGUSR1}
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGUSR2, old_usr2)
        signal.signal(signal.SIGALRM, old_alrm)
    fields = dict(line.split(":") for line in out.decode().splitlines())
    assert fields == {"SigBlk": "0" * 16, "SigIgn": "0" * 16}, out
    assert caught == []


# ---------------------------------------------------------------- through the spawner


async def _run(ops: SpawnerOps, spec: SpawnSpec) -> tuple[Exit, str]:
    _, ex, out = await spawn_and_read(ops, spec, 20)
    return ex, out.decode()


def _spec(script: str, **kw: Any) -> SpawnSpec:
    spec: SpawnSpec = spawn_spec(["/bin/sh", "-c", script], **kw)
    return spec


def _both_paths(
    monkeypatch: pytest.MonkeyPatch, specs: Callable[[], list[SpawnSpec]]
) -> dict[str, list[tuple[Exit, str]]]:
    """Run the same jobs on each path; results by path."""
    results: dict[str, list[tuple[Exit, str]]] = {}
    for path in ("vfork", "fork"):
        monkeypatch.setenv("WORKER_AGENT_SPAWN", path)

        async def go(path: str = path) -> list[tuple[Exit, str]]:
            ops = SpawnerOps()
            try:
                got = [await _run(ops, s) for s in specs()]
                assert ops.spawn_path == path
                return got
            finally:
                ops.close()

        results[path] = asyncio.run(go())
    return results


@needs_vspawn
def test_the_spawner_says_which_path_it_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the spawner uses the C path and says so; WORKER_AGENT_SPAWN=fork forks."""
    for env, want in ((None, "vfork"), ("fork", "fork"), ("vfork", "vfork")):
        if env is None:
            monkeypatch.delenv("WORKER_AGENT_SPAWN", raising=False)
        else:
            monkeypatch.setenv("WORKER_AGENT_SPAWN", env)

        async def go() -> str | None:
            ops = SpawnerOps()
            try:
                await _run(ops, _spec("true"))
                return ops.spawn_path
            finally:
                ops.close()

        assert asyncio.run(go()) == want


# Shell built-ins only: the job's leader itself must look (a /proc/self rule resolved in
# the child names the leader, not the programs it runs). The glob opens fd 3 to list.
FD_LIST = "echo /proc/self/fd/*"
STATUS_LINES = (
    "while read -r k v; do case $k in "
    "Uid:|Gid:|Groups:|Cap*|NoNewPrivs:|SigBlk:|SigIgn:) echo $k $v;; esac; "
    "done < /proc/self/status"
)


def _landlock(tmp_path: Path, *, proc_self: bool) -> dict[str, Any]:
    root = tmp_path / "scratch-root"  # tmp_path is made reachable to the job's user
    root.mkdir(exist_ok=True)
    (tmp_path / "secret").write_text("s\n")
    spec = landlock.LandlockSpec(
        read_exec=("/usr", "/lib", "/lib64", "/bin"),
        # /proc/self is resolved in the child (no shared ruleset); /proc is not.
        read=("/proc/self",) if proc_self else ("/proc",),
        write=("/dev/null",),
        connect_tcp=(),
        bind_tcp=(),
        deny=(),
    )
    n = len(list(root.iterdir()))
    return {
        "landlock": spec,
        "landlock_abi": landlock.abi_version(),
        "scratch": str(root / f"job{n}-{os.getpid()}"),
    }


PROBE = (
    FD_LIST + "; "
    "{{ read -r x < {secret}; }} 2>/dev/null && echo read-secret || echo no-secret; "
    '{{ echo x > "$SCRATCH/f"; }} 2>/dev/null && echo wrote-scratch || echo no-scratch; '
    "{{ echo x > {outside}; }} 2>/dev/null && echo wrote-outside || echo no-outside; "
    "{{ read -r x < /proc/self/status; }} 2>/dev/null && echo read-proc || echo no-proc; "
    # The scratch root: the job's own directory is granted, its parent never.
    '{{ set -- "$SCRATCH"/../*; [ -e "$1" ]; }} && echo listed-root || echo no-list-root; '
    + STATUS_LINES
)


@needs_vspawn
@pytest.mark.skipif(
    not IS_ROOT or landlock.abi_version() < 6, reason="needs root and Landlock ABI 6"
)
@pytest.mark.parametrize("proc_self", [False, True], ids=["opened-in-spawner", "proc-self"])
def test_the_job_is_confined_alike_on_both_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, proc_self: bool
) -> None:
    """Same uid/gid/groups, capability sets, no_new_privs, Landlock and descriptors."""
    # Reachable for the job's user: a directory outside pytest's private /tmp/pytest-of-*.
    tmp_path = Path(tempfile.mkdtemp(prefix="vspawn-"))
    os.chmod(tmp_path, 0o755)
    outside = tmp_path / "outside"
    probe = PROBE.format(secret=tmp_path / "secret", outside=outside)

    def specs() -> list[SpawnSpec]:
        out = []
        for user, caps in ((65534, (10,)), (None, ()), (65534, ())):
            ll = _landlock(tmp_path, proc_self=proc_self)
            out.append(
                _spec(
                    probe,
                    uid=user,
                    gid=user,
                    capabilities=caps,
                    env={"PATH": "/usr/bin:/bin", "SCRATCH": ll["scratch"]},
                    **ll,
                )
            )
        # And without Landlock: no_new_privs alone, or not even that.
        out.append(_spec(probe.replace("$SCRATCH", str(tmp_path)), uid=65534, gid=65534))
        out.append(_spec(probe.replace("$SCRATCH", str(tmp_path)), no_new_privs=False))
        return out

    got = _both_paths(monkeypatch, specs)
    assert [o for _, o in got["vfork"]] == [o for _, o in got["fork"]]
    shutil.rmtree(tmp_path, ignore_errors=True)
    first = got["vfork"][0][1].splitlines()
    # No ruleset, scratch or spawner descriptor reaches the job.
    assert first[0].split() == [f"/proc/self/fd/{n}" for n in range(4)]
    assert first[1:6] == ["no-secret", "wrote-scratch", "no-outside", "read-proc", "no-list-root"]
    status = {k: v for k, _, v in (line.partition(" ") for line in first[6:])}
    assert status["Uid:"] == status["Gid:"] == "65534 65534 65534 65534"
    assert status["Groups:"] == "" and status["NoNewPrivs:"] == "1"
    assert status["CapAmb:"] == status["CapEff:"] == status["CapBnd:"] == "0000000000000400"
    assert status["SigBlk:"] == status["SigIgn:"] == "0" * 16
    last = got["vfork"][4][1].splitlines()
    unconfined = {k: v for k, _, v in (line.partition(" ") for line in last[6:])}
    assert last[1:6] == [
        "read-secret",
        "wrote-scratch",
        "wrote-outside",
        "read-proc",
        "listed-root",
    ]
    assert unconfined["NoNewPrivs:"] == "0" and unconfined["Uid:"].split()[0] == "0"


@needs_vspawn
def test_a_thousand_rapid_spawns_leak_no_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 jobs (one in ten failing) 16 at a time: the spawner ends with the descriptors
    it started with, and reaps everything."""
    monkeypatch.setenv("WORKER_AGENT_SPAWN", "vfork")

    def fds_of(pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    async def go() -> None:
        ops = SpawnerOps()
        try:
            await _run(ops, _spec("true"))
            assert ops.spawn_path == "vfork"
            pid = ops.spawner_pid
            assert pid is not None
            before = fds_of(pid)
            loop = asyncio.get_running_loop()
            failures = 0

            async def one(i: int) -> None:
                nonlocal failures
                done: asyncio.Future[Exit] = loop.create_future()
                spec = SpawnSpec(
                    argv=["/bin/true"],
                    executable="/bin/true",
                    env={},
                    cwd="/" if i % 10 else "/nonexistent-dir",
                    stdout_fd=out,
                    uid=None,
                    gid=None,
                    umask=0o077,
                    limits={"open_files": 64},
                )
                try:
                    await ops.spawn(spec, done.set_result)
                except SpawnFailure as e:
                    assert str(e) == "chdir: No such file or directory (ENOENT)"
                    failures += 1
                    return
                assert (await done).exit_code == 0

            out = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
            try:
                for start in range(0, 1000, 16):
                    await asyncio.gather(*(one(i) for i in range(start, min(start + 16, 1000))))
            finally:
                os.close(out)
            assert failures == 100
            assert fds_of(pid) == before
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            assert children == []
        finally:
            ops.close()

    asyncio.run(go())


def test_bad_spawn_choice_is_refused() -> None:
    """WORKER_AGENT_SPAWN other than fork, vfork or auto: a clear error, not a guess."""
    with pytest.raises(RuntimeError, match="WORKER_AGENT_SPAWN='posix'"):
        vspawn.choose({"WORKER_AGENT_SPAWN": "posix"})
    assert vspawn.choose({"WORKER_AGENT_SPAWN": "fork"})[0] == "fork"


def test_rlimits_are_set_in_the_c_child_as_asked() -> None:
    """The C child's setrlimit uses the spawner's value and hard margin (cpu: +2 s)."""
    if _vspawn is None:
        pytest.skip("agent.keeper._vspawn not built")
    r, w = os.pipe2(os.O_CLOEXEC)
    plan = _plan(
        path="/bin/sh",
        argv=["/bin/sh", "-c", "ulimit -St; ulimit -Ht; ulimit -Sn; ulimit -Hn"],
        limits={"cpu_seconds": 7, "open_files": 99},
    )
    try:
        pid, error, _ = vspawn.spawn(
            _vspawn, plan, {"stdout": w}, [], None, IS_ROOT, 40, -1, spawner.RLIMIT_RESOURCES
        )
    finally:
        os.close(w)
    out = read_to_end(r)
    os.close(r)
    os.waitpid(pid, 0)
    assert (error, out.split()) == ("", [b"7", b"9", b"99", b"99"])
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] != 99  # the spawner's own: untouched


@needs_vspawn
@pytest.mark.skipif(
    not IS_ROOT or landlock.abi_version() < 6, reason="needs root and Landlock ABI 6"
)
def test_a_ruleset_of_many_descriptors_confines_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deny inside a granted tree (hole punching: one descriptor per rule, >64 here)."""
    etc = sorted(os.listdir("/etc"))
    assert len(etc) > 64
    denied = "/etc/" + next(n for n in etc if os.path.isfile("/etc/" + n) and n != "passwd")
    spec = landlock.LandlockSpec(
        read_exec=("/usr", "/lib", "/lib64", "/bin"),
        read=("/etc",),
        write=("/dev/null",),
        connect_tcp=(),
        bind_tcp=(),
        deny=(denied,),
    )
    probe = (
        "{ read -r x < /etc/passwd; } 2>/dev/null && echo passwd || echo no-passwd; "
        f"{{ read -r x < {denied}; }} 2>/dev/null && echo denied-read || echo denied-refused"
    )

    def specs() -> list[SpawnSpec]:
        return [_spec(probe, landlock=spec, landlock_abi=landlock.abi_version())]

    got = _both_paths(monkeypatch, specs)
    assert got["vfork"][0][1] == got["fork"][0][1] == "passwd\ndenied-refused\n"
