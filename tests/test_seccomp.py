"""The seccomp layer: the pure plan, the policy keys, the start-up checks, and real filters
installed by the job spawner's child on both spawn paths (agent-level attacks from inside
jobs are in tests/test_box.py)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import startup
from agent.keeper import policy, policyfile, seccomp
from agent.keeper.lifecycle import Exit
from agent.keeper.seccomp import SeccompSpec
from agent.keeper.spawn import SpawnerOps, SpawnSpec

from helpers import Certs, default_config, make_safe_dir, spawn_and_read, spawn_spec

HAVE_SECCOMP = seccomp.unavailable(listen_check=True) == ""
needs_seccomp = pytest.mark.skipif(
    not HAVE_SECCOMP or os.uname().machine != "x86_64",
    reason="needs libseccomp, kernel seccomp, and x86-64 (the probes' syscall numbers)",
)

# The probe a filtered job runs: one line per attempt, "name ok" or "name ERRNAME".
PROBE = textwrap.dedent("""\
    import ctypes, errno, os, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    def attempt(name, fn):
        try:
            fn()
            print(name, "ok")
        except OSError as e:
            print(name, errno.errorcode.get(e.errno, e.errno))
    def sys_(nr, *args):
        r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    attempt("tcp", lambda: socket.socket().close())
    attempt("mptcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262).close())
    attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
    attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
    attempt("unshare", lambda: sys_(272, 0x10000000))
    attempt("shmget", lambda: sys_(29, 0, 4096, 0o1600))
    status = [l.split() for l in open("/proc/self/status") if l.startswith("Seccomp:")]
    print("status", status[0][1])
    """)


# ---------------------------------------------------------------- pure plan


def _syscalls(rules: list[seccomp.Rule]) -> set[str]:
    return {r.syscall for r in rules}


def test_default_plan_refuses_every_group_and_listen() -> None:
    """The default box refuses every group, the always-refused calls and listen()."""
    rules = seccomp.plan_rules(SeccompSpec())
    names = _syscalls(rules)
    for group, calls in seccomp.GROUPS.items():
        assert set(calls) <= names, group
    assert set(seccomp.ALWAYS) <= names
    listen = [r for r in rules if r.syscall == "listen"]
    assert listen == [seccomp.Rule("listen", seccomp.errno_action(errno.EPERM))]
    assert [r.action for r in rules if r.syscall == "clone3"] == [
        seccomp.errno_action(errno.ENOSYS)
    ]


def test_allowed_groups_and_listen_modes_drop_their_rules() -> None:
    """An allowed group loses its refusals; listen() is checked ("bound") or free ("any")."""
    rules = seccomp.plan_rules(SeccompSpec(allow=("namespaces", "sysv_ipc"), listen="bound"))
    names = _syscalls(rules)
    assert not names & {"setns", "unshare", "clone", "clone3", "shmget", "semop"}
    assert "mount" in names and "bpf" in names
    assert [r.action for r in rules if r.syscall == "listen"] == [seccomp.ACT_NOTIFY]
    assert "listen" not in _syscalls(seccomp.plan_rules(SeccompSpec(listen="any")))


def test_socket_rules_use_one_comparison_per_argument() -> None:
    """libseccomp refuses two comparisons of one argument in a rule: none is planned."""
    for spec in (SeccompSpec(), SeccompSpec(udp=True, allow=("netlink",))):
        for rule in seccomp.plan_rules(spec):
            args = [a[0] for a in rule.args]
            assert len(args) == len(set(args)), rule


@pytest.mark.parametrize("spec", [SeccompSpec(allow=("nope",)), SeccompSpec(listen="maybe")])
def test_plan_refuses_unknown_names(spec: SeccompSpec) -> None:
    """An unknown group or listen mode is a ValueError, never a wider filter."""
    with pytest.raises(ValueError):
        seccomp.plan_rules(spec)


# ---------------------------------------------------------------- policy keys


def _entry(extra: str) -> str:
    return "version: 1\nentries:\n  - name: e\n    command: /bin/echo\n" + textwrap.indent(
        textwrap.dedent(extra), "    "
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("udp: yes-please\n", "udp: must be true or false"),
        ("syscalls: [namespaces]\n", "syscalls: must be a mapping"),
        ("syscalls: {deny: [bpf]}\n", "syscalls: unknown key(s): deny"),
        ("syscalls: {allow: [raw_io]}\n", "unknown group(s) 'raw_io'"),
        ("syscalls: {allow: namespaces}\n", "syscalls: allow"),
    ],
)
def test_bad_seccomp_keys_are_refused(extra: str, message: str) -> None:
    """A bad `udp` or `syscalls` key names the entry and the key."""
    with pytest.raises(policy.PolicyError) as err:
        policyfile.parse(_entry(extra))
    assert message in str(err.value) and "entry #1 ('e')" in str(err.value)


@pytest.mark.parametrize(
    ("landlock", "listen"),
    [
        ("", "none"),
        ("landlock: {bind_tcp: [8080]}\n", "bound"),
        ("landlock: {bind_tcp: any}\n", "any"),
    ],
)
def test_listen_follows_bind_tcp(landlock: str, listen: str) -> None:
    """listen() is refused, checked or free as the entry's bind_tcp is empty, a list or any."""
    pol = policyfile.parse(_entry("udp: true\nsyscalls: {allow: [ptrace]}\n" + landlock))
    sc = pol.entries[0].confinement.seccomp
    assert sc == SeccompSpec(udp=True, allow=("ptrace",), listen=listen)


def _cfg(tmp_path: Path, certs: Certs, **confinement: Any) -> Any:
    from agent.keeper import config

    pol = tmp_path / "policy.yaml"
    pol.write_text("version: 1\nentries: []\n")
    path = tmp_path / "config.toml"
    path.write_text(
        default_config("127.0.0.1:1", certs, pol, tmp_path / "state", confinement=confinement)
    )
    return config.load(path)


def test_missing_libseccomp_fails_closed_unless_best_effort(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without libseccomp the policy load is refused; best effort runs and says what is lost."""
    pol = policyfile.parse(_entry(""))
    monkeypatch.setattr(seccomp, "LIBRARY", "libseccomp-missing.so.0")
    seccomp._lib.cache_clear()
    try:
        with pytest.raises(policy.PolicyError) as err:
            startup.confine_policy(pol, _cfg(tmp_path, certs), ())
        assert "entry 'e': needs seccomp filters but libseccomp-missing.so.0" in str(err.value)
        lax = _cfg(tmp_path, certs, landlock="best_effort")
        confined, warnings = startup.confine_policy(pol, lax, ())
        assert confined.entries[0].confinement.seccomp is None
        assert any("not enforced: seccomp" in w for w in warnings)
    finally:
        seccomp._lib.cache_clear()


@needs_seccomp
def test_no_new_privs_false_is_refused_where_seccomp_is_enforced(
    tmp_path: Path, certs: Certs
) -> None:
    """A root entry asking for no_new_privs: false is refused: the filter needs it."""
    pol = policyfile.parse(_entry("user: root\nallow_root: true\nno_new_privs: false\n"))
    with pytest.raises(policy.PolicyError, match="no_new_privs: false cannot be honoured"):
        startup.confine_policy(pol, _cfg(tmp_path, certs), ())


# ---------------------------------------------------------------- real filters


def _run(spec: SpawnSpec, timeout: float = 20) -> tuple[Exit, str]:
    async def go() -> tuple[Exit, str]:
        ops = SpawnerOps()
        try:
            _, ex, out = await spawn_and_read(ops, spec, timeout)
        finally:
            ops.close()
        return ex, out.decode()

    return asyncio.run(go())


def _probe_spec(
    tmp_path: Path, body: str, sc: SeccompSpec | None, *args: str, **kw: Any
) -> SpawnSpec:
    script = tmp_path / "probe.py"
    script.write_text(body)
    python = kw.pop("python", sys.executable)
    spec: SpawnSpec = spawn_spec([python, "-I", str(script), *args], seccomp=sc, **kw)
    return spec


def _results(out: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@needs_seccomp
@pytest.mark.usefixtures("spawn_path")
def test_filter_refuses_the_default_box_and_keeps_tcp(tmp_path: Path) -> None:
    """MPTCP, UDP, netlink, namespaces and SysV IPC are refused with an errno; TCP works."""
    ex, out = _run(_probe_spec(tmp_path, PROBE, SeccompSpec()))
    got = _results(out)
    assert ex.exit_code == 0, out
    assert got == {
        "tcp": "ok",
        "mptcp": "EPERM",
        "udp": "EPERM",
        "netlink": "EAFNOSUPPORT",
        "unshare": "EPERM",
        "shmget": "EPERM",
        "status": "2",
    }


@needs_seccomp
@pytest.mark.usefixtures("spawn_path")
def test_entry_keys_widen_the_filter(tmp_path: Path) -> None:
    """udp, netlink and sysv_ipc open exactly their calls; MPTCP stays refused."""
    sc = SeccompSpec(udp=True, allow=("netlink", "sysv_ipc"))
    got = _results(_run(_probe_spec(tmp_path, PROBE, sc))[1])
    assert (got["udp"], got["netlink"], got["shmget"]) == ("ok", "ok", "ok")
    assert (got["mptcp"], got["unshare"]) == ("EPERM", "EPERM")


@pytest.mark.usefixtures("spawn_path")
def test_without_a_filter_nothing_is_refused(tmp_path: Path) -> None:
    """The control: the same probe with no filter gets MPTCP and UDP sockets."""
    got = _results(_run(_probe_spec(tmp_path, PROBE, None))[1])
    assert (got["mptcp"], got["udp"], got["status"]) == ("ok", "ok", "0")


LISTEN = textwrap.dedent("""\
    import errno, socket, sys, time
    port = int(sys.argv[1])
    def attempt(name, fn):
        try:
            fn()
            print(name, "ok", flush=True)
        except OSError as e:
            print(name, errno.errorcode.get(e.errno, e.errno), flush=True)
    unbound = socket.socket()
    attempt("unbound", lambda: unbound.listen())
    u6 = socket.socket(socket.AF_INET6)
    attempt("unbound6", lambda: u6.listen(5))
    unix = socket.socket(socket.AF_UNIX)
    attempt("unix-unbound", lambda: unix.listen())
    bound = socket.socket()
    bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    bound.bind(("127.0.0.1", port))
    attempt("bound", lambda: bound.listen(-1))
    attempt("again", lambda: bound.listen(3))
    attempt("notasocket", lambda: socket.socket(fileno=0).listen())
    bound.settimeout(10)
    conn, _ = bound.accept()
    conn.sendall(b"served")
    conn.close()
    """)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@needs_seccomp
@pytest.mark.usefixtures("spawn_path")
def test_listen_is_checked_by_the_spawner(tmp_path: Path) -> None:
    """With bind_tcp ports, listen() works on a bound socket and is refused on an unbound
    one (which would take an ephemeral port past Landlock's bind rule)."""
    port = _free_port()
    got: dict[str, bytes] = {}

    def connect() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    got["data"] = c.recv(100)
                    return
            except OSError:
                time.sleep(0.05)

    t = threading.Thread(target=connect)
    t.start()
    ex, out = _run(_probe_spec(tmp_path, LISTEN, SeccompSpec(listen="bound"), str(port)))
    t.join()
    res = _results(out)
    assert res == {
        "unbound": "EPERM",
        "unbound6": "EPERM",
        "unix-unbound": "EPERM",
        "bound": "ok",
        "again": "ok",
        "notasocket": "ENOTSOCK",
    }, out
    assert got.get("data") == b"served" and ex.exit_code == 0


@needs_seccomp
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="root")
@pytest.mark.parametrize("caps", [(), (10,)], ids=["nobody", "nobody+CAP_NET_BIND_SERVICE"])
def test_listen_checks_of_another_users_job(caps: tuple[int, ...]) -> None:
    """A root spawner checks a `nobody` job's listen() as that user (and its capabilities),
    without CAP_SYS_PTRACE: bound works, unbound is refused."""
    from agent.keeper import capabilities

    d = make_safe_dir()
    script = textwrap.dedent("""\
        import errno, socket
        for bind in (False, True):
            s = socket.socket()
            if bind:
                s.bind(("127.0.0.1", 0))
            try:
                s.listen()
                print("bound" if bind else "unbound", "ok", flush=True)
            except OSError as e:
                print("bound" if bind else "unbound", errno.errorcode[e.errno], flush=True)
        """)
    spec = _probe_spec(
        d,
        script,
        SeccompSpec(listen="bound"),
        python="/usr/bin/python3",
        uid=65534,
        gid=65534,
        capabilities=caps,
    )
    # Without CAP_SYS_PTRACE, as under the privileged unit: the helper must still work.
    before = capabilities.last_cap()
    assert before > 0
    _, out = _run(spec)
    assert _results(out) == {"unbound": "EPERM", "bound": "ok"}, out


@needs_seccomp
@pytest.mark.usefixtures("spawn_path")
def test_listen_is_refused_without_bind_tcp(tmp_path: Path) -> None:
    """Without bind_tcp, listen() is refused even on a bound socket."""
    script = "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\n"
    script += "try:\n    s.listen()\n    print('listen ok')\nexcept OSError as e:\n"
    script += "    print('listen', e.errno)\n"
    _, out = _run(_probe_spec(tmp_path, script, SeccompSpec()))
    assert out.strip() == f"listen {errno.EPERM}"


@needs_seccomp
def test_listen_from_a_thread_is_checked_like_any_other(tmp_path: Path) -> None:
    """listen() from a thread other than the first (Go, Java, a Python thread) is checked
    too: the notification names the thread, whose socket table is the process's."""
    script = textwrap.dedent("""\
        import socket, threading
        def serve(bind):
            s = socket.socket()
            if bind:
                s.bind(("127.0.0.1", 0))
            try:
                s.listen()
                print("bound" if bind else "unbound", "ok", flush=True)
            except OSError as e:
                print("bound" if bind else "unbound", e.errno, flush=True)
        for bind in (False, True):
            t = threading.Thread(target=serve, args=(bind,))
            t.start()
            t.join()
        """)
    _, out = _run(_probe_spec(tmp_path, script, SeccompSpec(listen="bound")))
    assert _results(out) == {"unbound": str(errno.EPERM), "bound": "ok"}, out


def test_a_closed_listen_guard_is_nothing_to_do() -> None:
    """A guard closed at the job's exit, reported ready in the same turn, does nothing
    (it raised ValueError and took the spawner with every running job down)."""
    guard = seccomp.ListenGuard(os.dup(0))
    guard.close()
    guard.handle()
    assert guard.fd == -1


@needs_seccomp
def test_a_job_cannot_flood_the_spawner_with_listen_checks(tmp_path: Path) -> None:
    """listen() in a tight loop: the first calls are checked and served, the excess of a
    second is refused (EPERM) without work, so one job cannot hold up other starts."""
    script = textwrap.dedent("""\
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        got = []
        for _ in range(400):
            try:
                s.listen()
                got.append("ok")
            except OSError as e:
                got.append(str(e.errno))
        print("first", got[0])
        print("refused", sum(1 for g in got if g != "ok"))
        """)
    _, out = _run(_probe_spec(tmp_path, script, SeccompSpec(listen="bound")))
    res = _results(out)
    assert res["first"] == "ok" and int(res["refused"]) > 0, out


@needs_seccomp
def test_listen_checks_follow_the_jobs_children(tmp_path: Path) -> None:
    """A forked grandchild's listen() goes to the same check (the filter is inherited)."""
    script = textwrap.dedent("""\
        import os, socket
        pid = os.fork()
        if pid == 0:
            s = socket.socket()
            try:
                s.listen()
                print("child ok", flush=True)
            except OSError as e:
                print("child", e.errno, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        """)
    _, out = _run(_probe_spec(tmp_path, script, SeccompSpec(listen="bound")))
    assert out.strip() == f"child {errno.EPERM}"
