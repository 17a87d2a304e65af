"""The job box, attacked from inside, in the style of systemd's test-execute.

One test per policy knob and per attack class. Each runs real jobs on a real agent (mTLS,
the real spawner): ``boxprobe.py`` (tests/box_probes) under a whitelisted /usr/bin/python3
tries the attack and prints what the kernel answered, and the test checks the errno, and
a control that the allowed neighbour still works. Every test runs in both deployments the
docs describe (a root agent with per-entry users and capabilities; an unprivileged agent
as its own user in a delegated cgroup2 subtree), each on the spawner's C vfork path and
its Python fork fallback: one agent each, many jobs (tests/boxworld.py).

Refusals must return an errno and never kill the job: every probe job must print its
results and DONE and exit 0. x86_64 only (system call numbers).
"""

from __future__ import annotations

import os
import platform
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.keeper import landlock

import boxworld
from boxworld import GROUPS, Deployment
from helpers import IS_ROOT, Certs, vspawn_expected

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="needs root (users, delegated cgroups)"),
    pytest.mark.skipif(
        landlock.abi_version() < 6, reason="needs Landlock ABI 6 (scoped signals and sockets)"
    ),
    pytest.mark.skipif(
        platform.machine() != "x86_64", reason="the probes use x86_64 system call numbers"
    ),
]

DEPLOYMENTS = [
    pytest.param(("root", "vfork"), id="root-vfork"),
    pytest.param(("root", "fork"), id="root-fork"),
    pytest.param(("user", "vfork"), id="user-vfork"),
    pytest.param(("user", "fork"), id="user-fork"),
]


@pytest.fixture(scope="module")
def agent_user() -> Iterator[pwd.struct_passwd]:
    """The unprivileged agent's own system user (made lazily, deleted at the end)."""
    with boxworld.system_user() as pw:
        yield pw


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def box(request: pytest.FixtureRequest, certs: Certs) -> Iterator[Deployment]:
    """One running agent per deployment and spawn path."""
    kind, spawn = request.param
    if spawn == "vfork" and not vspawn_expected():
        pytest.skip("no C compiler: the spawner's vfork extension was not built")
    if boxworld.cgroup2_root() is None:
        pytest.skip("no cgroup2 hierarchy to put the agents' jobs in")
    user = request.getfixturevalue("agent_user") if kind == "user" else None
    try:
        with boxworld.deployment(kind, spawn, certs, user) as d:
            yield d
    except LookupError as e:
        pytest.skip(str(e))


def need_seccomp_keys(box: Deployment) -> None:
    """Fail (not skip): the knob under test is part of the box's contract."""
    if not box.seccomp:
        pytest.fail("the policy has no `udp`/`syscalls` entry keys: the seccomp layer is missing")


def root_only(box: Deployment) -> None:
    """Skip in the unprivileged deployment (it refuses per-entry users at load)."""
    if box.kind != "root":
        pytest.skip("per-entry users and capabilities need a root agent")


def test_deployment_is_what_it_claims(box: Deployment) -> None:
    """The agent runs as the deployment says (root, or its own user in its delegated
    leaf) on the spawn path asked for; jobs run as the job user, root ones without
    capabilities."""
    status = Path(f"/proc/{box.agent.pid}/status").read_text()
    agent_uid = int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])
    environ = Path(f"/proc/{box.agent.pid}/environ").read_bytes().split(b"\0")
    assert f"WORKER_AGENT_SPAWN={box.spawn}".encode() in environ
    agent_cgroup = Path(f"/proc/{box.agent.pid}/cgroup").read_text()
    assert ("agent-box-" in agent_cgroup) == (box.kind == "user"), agent_cgroup
    out = box.run("box", "status:Uid", "read:/proc/self/cgroup")
    out.check({"status:Uid": "ok", "read:/proc/self/cgroup": "ok"})
    assert f"0::/agent-box-{os.getpid()}-{box.kind}-{box.spawn}/" in out.output
    job_uid = int(out.detail("status:Uid").split()[0])
    if box.kind == "root":
        assert agent_uid == 0 and job_uid == pwd.getpwnam("nobody").pw_uid
        out = box.run("rootbox", "status:Uid", "status:CapEff")
        out.check({"status:Uid": "ok", "status:CapEff": "ok"})
        assert out.detail("status:Uid").split()[0] == "0"
        assert int(out.detail("status:CapEff"), 16) == 0
    else:
        assert agent_uid != 0 and job_uid == agent_uid


# ------------------------------------------------------------------ the filter itself


def test_every_job_runs_under_a_seccomp_filter(box: Deployment) -> None:
    """/proc/self/status of a job says Seccomp: 2 (filter mode) and NoNewPrivs: 1."""
    for entry in box.default_entries:
        out = box.run(entry, "status:Seccomp", "status:NoNewPrivs")
        out.check({"status:Seccomp": "ok", "status:NoNewPrivs": "ok"})
        assert out.detail("status:Seccomp") == "2", out.output
        assert out.detail("status:NoNewPrivs") == "1", out.output


def test_refusals_never_kill_the_job(box: Deployment) -> None:
    """Refused system calls return an errno in the job itself: it goes on and ends normally."""
    attacks = {
        "socket:inet:stream:mptcp": "EPERM",
        "socket:netlink:raw": "EAFNOSUPPORT",
        "tcp_listen_unbound": "EPERM",
        "clone3": "ENOSYS",
        "bpf": "EPERM",
        "io_uring_setup": "EPERM",
        "keyctl": "EPERM",
        "shmget": "EPERM",
        "mount": "EPERM",
        "always:reboot": "EPERM",
        "unshare:user": "EPERM",
    }
    out = box.run("box", *attacks, inline=True)
    out.check(attacks)
    assert out.status.signal is None or out.status.signal == 0


# ------------------------------------------------------------------ sockets

ALLOWED_SOCKETS = [
    "socket:unix:stream",
    "socket:unix:dgram",
    "socket:unix:seqpacket",
    "socket:inet:stream",
    "socket:inet:stream:tcp",
    "socket:inet6:stream",
    "socket:inet6:stream:tcp",
    "socket:inet:stream|nonblock|cloexec",
    "socket:inet6:stream|cloexec:tcp",
    "socketpair",
]
OTHER_FAMILIES = [
    "socket:netlink:raw",
    "socket:netlink:dgram",
    "socket:packet:raw",
    "socket:packet:dgram",
    "socket:vsock:stream",
    "socket:alg:seqpacket",
    "socket:bluetooth:raw",
    "socket:key:raw",
    "socket:xdp:raw",
    "socket:can:raw",
    "socket:tipc:rdm",
    "socket:rds:seqpacket",
    "socket:smc:stream",
    "socket:kcm:dgram",
    "socket:qipcrtr:dgram",
    "socket:mctp:dgram",
    "socket:llc:dgram",
    "socket:appletalk:dgram",
    "socket:ax25:seqpacket",
    "socket:x25:seqpacket",
]
# AF_INET/AF_INET6 beyond plain TCP: refused with EPERM in every entry without `udp`.
OTHER_PROTOCOLS = [
    "socket:inet:stream:mptcp",
    "socket:inet6:stream:mptcp",
    "socket:inet:stream|nonblock:mptcp",
    "socket:inet:stream:sctp",
    "socket:inet6:stream:sctp",
    "socket:inet:seqpacket:sctp",
    "socket:inet:seqpacket",
    "socket:inet:raw:raw",
    "socket:inet:raw:icmp",
    "socket:inet6:raw:icmpv6",
    "socket:inet:packet",
    "socket:inet:stream:udp",
    "socket:inet:dccp:dccp",
    "socket:inet:dgram:icmp",
    "socket:inet:dgram:udplite",
]
DATAGRAMS = ["socket:inet:dgram", "socket:inet:dgram:udp", "socket:inet6:dgram", "udp_self"]


def test_socket_families_other_than_unix_and_inet_are_refused(box: Deployment) -> None:
    """Every family but AF_UNIX, AF_INET and AF_INET6 fails with EAFNOSUPPORT (netlink,
    packet, vsock, alg, bluetooth, key, xdp, can, tipc, rds, smc, ...); control: unix
    sockets of every type and plain TCP sockets, flags included, are created."""
    expected = {s: "ok" for s in ALLOWED_SOCKETS} | {s: "EAFNOSUPPORT" for s in OTHER_FAMILIES}
    for entry in box.default_entries:
        box.run(entry, *expected).check(expected)


def test_inet_sockets_other_than_tcp_are_refused(box: Deployment) -> None:
    """AF_INET/AF_INET6 sockets that are not plain TCP fail with EPERM: multipath TCP, SCTP,
    raw, packet, seqpacket, DCCP, ping, datagrams; control: plain TCP is created."""
    expected = {s: "EPERM" for s in OTHER_PROTOCOLS + DATAGRAMS}
    expected["socket:inet:stream:tcp"] = "ok"
    for entry in box.default_entries:
        box.run(entry, *expected).check(expected)


def test_socket_arguments_with_high_bits_set_are_refused(box: Deployment) -> None:
    """socket() reads ints: a family or protocol with bits above 32 set (the kernel sees
    AF_INET and IPPROTO_MPTCP) is refused, not mistaken for an allowed value; control:
    the same call with clean registers is plain TCP."""
    expected = {
        "socket_raw:0x100000002:1:262": "EAFNOSUPPORT|EPERM",
        "socket_raw:2:1:0x100000106": "EPERM",
        "socket_raw:2:0x100000001:262": "EPERM",
        "socket_raw:0xffffffff00000010:3:0": "EAFNOSUPPORT|EPERM",
        "socket_raw:2:1:6": "ok",
    }
    box.run("box", *expected).check(expected)


def test_multipath_tcp_reaches_nothing(box: Deployment) -> None:
    """An MPTCP socket cannot be made to reach the agent's gRPC port or a listener, even
    from an entry whose connect_tcp allows that listener (Landlock does not cover MPTCP);
    control: plain TCP reaches the allowed listener and not the agent."""
    p = box.ports
    box.run(
        "box",
        f"mptcp_connect:{box.agent.port}",
        f"mptcp_connect:{p.connect}",
        f"tcp_connect:{box.agent.port}",
    ).check(
        {
            f"mptcp_connect:{box.agent.port}": "EPERM",
            f"mptcp_connect:{p.connect}": "EPERM",
            f"tcp_connect:{box.agent.port}": "EACCES",
        }
    )
    box.run("net", f"mptcp_connect:{p.connect}", f"tcp_connect:{p.connect}").check(
        {f"mptcp_connect:{p.connect}": "EPERM", f"tcp_connect:{p.connect}": "ok"}
    )


def test_tcp_fast_open_follows_connect_tcp(box: Deployment) -> None:
    """sendto(MSG_FASTOPEN), connect() by another name, reaches only what connect_tcp
    allows (EACCES elsewhere); control: it reaches the allowed listener."""
    p = box.ports
    box.run("box", f"tcp_fastopen:{p.other}", f"tcp_fastopen:{p.connect}").check(
        {f"tcp_fastopen:{p.other}": "EACCES", f"tcp_fastopen:{p.connect}": "EACCES"}
    )
    box.run("net", f"tcp_fastopen:{p.connect}", f"tcp_fastopen:{p.other}").check(
        {f"tcp_fastopen:{p.connect}": "ok", f"tcp_fastopen:{p.other}": "EACCES"}
    )


def test_datagram_sockets_are_refused_by_default(box: Deployment) -> None:
    """Without `udp: true` a job gets no UDP socket (EPERM) and sends nothing."""
    p = box.udp_sink.getsockname()[1]
    box.run("box", "udp_self", "udp_self:inet6", f"udp_send:{p}").check(
        {"udp_self": "EPERM", "udp_self:inet6": "EPERM", f"udp_send:{p}": "EPERM"}
    )
    box.udp_sink.setblocking(False)
    with pytest.raises(BlockingIOError):
        box.udp_sink.recv(64)


def test_udp_knob_allows_udp_and_nothing_else(box: Deployment) -> None:
    """`udp: true`: UDP datagrams work (to itself, v4 and v6, and to a loopback socket the
    test owns); raw, multipath TCP, SCTP, ping and UDP-Lite sockets and other families
    stay refused."""
    need_seccomp_keys(box)
    p = box.udp_sink.getsockname()[1]
    expected = {
        "udp_self": "ok",
        "udp_self:inet6": "ok",
        "socket:inet:dgram": "ok",
        "socket:inet6:dgram:udp": "ok",
        f"udp_send:{p}": "ok",
        "socket:inet:raw:raw": "EPERM",
        "socket:inet:stream:mptcp": "EPERM",
        "socket:inet:seqpacket:sctp": "EPERM",
        "socket:inet:dgram:icmp": "EPERM",
        "socket:inet:dgram:udplite": "EPERM",
        "socket:inet:packet": "EPERM",
        "socket:netlink:raw": "EAFNOSUPPORT",
        "socket:packet:dgram": "EAFNOSUPPORT",
    }
    box.run("udp", *expected).check(expected)
    box.udp_sink.settimeout(5)
    assert box.udp_sink.recv(64) == b"box-udp"


# ------------------------------------------------------------------ listen, bind, connect


def test_listen_is_refused_without_bind_tcp(box: Deployment) -> None:
    """An entry without bind_tcp cannot listen(): not on an unbound TCP socket (which would
    take an ephemeral port on all interfaces), not on a unix socket; control: it binds the
    unix socket in its scratch directory."""
    expected = {
        "tcp_listen_unbound": "EPERM",
        "tcp_listen_unbound:inet6": "EPERM",
        "unix_listen": "EPERM",
        "unix_listen_unbound": "EPERM",
        "unix_bind": "ok",
    }
    for entry in box.default_entries:
        box.run(entry, *expected).check(expected)


def serve(box: Deployment, how: str, *more: str) -> boxworld.Outcome:
    """Run ``how:PORT`` (tcp_serve, tcp_serve_thread) and ``more`` in the `net` entry,
    connecting from outside once it says READY."""
    port = box.ports.bind
    job = box.start("net", f"{how}:{port}", *more)
    try:
        if "failed" not in box.wait_line(job, "READY "):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.settimeout(10)
                assert s.recv(64) == b"box-hello\n"
        st = box.client.wait(job, timeout=boxworld.JOB_TIMEOUT)
    except BaseException:
        box.end(job)
        raise
    return box.outcome("net", st)


def test_bind_tcp_entry_serves_its_port_and_only_that(box: Deployment) -> None:
    """An entry with bind_tcp listens on its port and accepts a connection from outside
    the box; listen() on an unbound socket (autobind to an ephemeral port, v4 or v6), an
    unbound unix socket or a socket whose port came from connect() is refused."""
    refused = ("tcp_listen_unbound", "tcp_listen_unbound:inet6", "unix_listen_unbound")
    # An ephemeral port taken by connect() is no way to listen either (the kernel's own
    # EINVAL, or the spawner's EPERM).
    sneaky = f"connect_then_listen:{box.ports.connect}"
    expected = {f"tcp_serve:{box.ports.bind}": "ok", sneaky: "EPERM|EINVAL"}
    serve(box, "tcp_serve", *refused, sneaky).check(expected | {r: "EPERM" for r in refused})


def test_bind_tcp_entry_listens_from_any_thread(box: Deployment) -> None:
    """listen() on the entry's bound port works from a thread that is not the process's
    first (servers in Go, Java or a Python thread listen from any thread)."""
    serve(box, "tcp_serve_thread").check({f"tcp_serve_thread:{box.ports.bind}": "ok"})


def test_tcp_connect_and_bind_follow_the_entry(box: Deployment) -> None:
    """The old Landlock controls: connect and bind only to the entry's ports (EACCES
    elsewhere); the default box connects to and binds nothing."""
    p = box.ports
    allowed = {
        f"tcp_connect:{p.connect}": "ok",
        f"tcp_connect:{p.other}": "EACCES",
        f"tcp_bind:{p.bind}": "ok",
        f"tcp_bind:{p.bind_other}": "EACCES",
    }
    box.run("net", *allowed).check(allowed)
    refused = {f"tcp_connect:{p.connect}": "EACCES", f"tcp_bind:{p.bind}": "EACCES"}
    for entry in box.default_entries:
        box.run(entry, *refused).check(refused)


def test_capability_entry_binds_its_low_port(box: Deployment) -> None:
    """CAP_NET_BIND_SERVICE with bind_tcp: the job (as nobody) binds its port below 1024
    with plain TCP, and no other; without the capability the same port is refused."""
    root_only(box)
    p = box.ports
    box.run("capbind", f"tcp_bind:{p.low}", f"tcp_bind:{p.low_other}").check(
        {f"tcp_bind:{p.low}": "ok", f"tcp_bind:{p.low_other}": "EACCES"}
    )
    box.run("box", f"tcp_bind:{p.low}").check({f"tcp_bind:{p.low}": "EACCES"})


def test_capability_without_bind_tcp_gets_no_multipath_socket(box: Deployment) -> None:
    """CAP_NET_BIND_SERVICE without bind_tcp: no MPTCP socket to bind port 80 with (EPERM
    at socket()), no listen, and plain TCP binds refused by Landlock (EACCES)."""
    root_only(box)
    low = box.ports.low_other
    expected = {
        f"mptcp_bind:{low}": "EPERM",
        "tcp_listen_unbound": "EPERM",
        f"tcp_bind:{low}": "EACCES",
    }
    box.run("capnobind", *expected).check(expected)


# ------------------------------------------------------------------ namespaces, mounts

NAMESPACE_ATTACKS = {
    **{
        f"unshare:{ns}": "EPERM"
        for ns in ("user", "ns", "net", "ipc", "uts", "pid", "cgroup", "time", "user+net")
    },
    **{f"setns:{ns}": "EPERM" for ns in ("net", "user", "mnt", "ipc", "uts", "cgroup")},
    **{f"clone_ns:{ns}": "EPERM" for ns in ("user", "user+net", "net")},
    "clone3": "ENOSYS",
    "clone3:user": "ENOSYS",
}


def test_namespaces_are_refused(box: Deployment) -> None:
    """unshare, setns and clone with a namespace flag fail with EPERM; clone3 with ENOSYS
    (its flags are out of a filter's reach); control: threads, fork and subprocess work
    (glibc falls back to clone)."""
    expected = NAMESPACE_ATTACKS | {"thread": "ok", "fork": "ok", "subprocess": "ok"}
    for entry in box.default_entries:
        box.run(entry, *expected).check(expected)


MOUNT_ATTACKS = {
    s: "EPERM"
    for s in (
        "mount",
        "umount2",
        "pivot_root",
        "open_tree",
        "move_mount",
        "fsopen",
        "fsmount",
        "fspick",
        "mount_setattr",
        "userns_mount",
        "userns_fsopen",
    )
}


def test_mount_calls_are_refused(box: Deployment) -> None:
    """mount, umount2, pivot_root and the new mount API (open_tree, move_mount, fsopen,
    fsmount, fspick, mount_setattr) fail with EPERM, inside a user namespace too."""
    for entry in box.default_entries:
        box.run(entry, *MOUNT_ATTACKS).check(MOUNT_ATTACKS)


# ------------------------------------------------------------------ kernel interfaces

KERNEL_ATTACKS = {
    s: "EPERM"
    for s in (
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
    )
}
KEYRING_ATTACKS = {s: "EPERM" for s in ("keyctl", "add_key", "request_key")}
SYSV_ATTACKS = {
    s: "EPERM"
    for s in (
        "shmget",
        "msgget",
        "semget",
        *(
            f"ipc_other:{c}"
            for c in (
                "shmat",
                "shmctl",
                "shmdt",
                "semop",
                "semctl",
                "semtimedop",
                "msgsnd",
                "msgrcv",
                "msgctl",
            )
        ),
    )
}
PTRACE_ATTACKS = {
    s: "EPERM"
    for s in (
        "ptrace_traceme",
        "ptrace_child",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_getfd",
    )
}
ALWAYS = {
    f"always:{s}": "EPERM"
    for s in (
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "reboot",
        "swapon",
        "swapoff",
        "acct",
        "settimeofday",
        "iopl",
        "ioperm",
        "open_by_handle_at",
    )
}
QUEUE_AND_CLOCK_ATTACKS = {"mq_open": "EPERM", "clock_settime": "EPERM"}


def test_bpf_perf_userfaultfd_and_io_uring_are_refused(box: Deployment) -> None:
    """bpf, perf_event_open, userfaultfd and io_uring_setup/enter/register fail with EPERM
    (io_uring would be a way around the socket rules)."""
    for entry in box.default_entries:
        box.run(entry, *KERNEL_ATTACKS).check(KERNEL_ATTACKS)


def test_keyrings_are_refused(box: Deployment) -> None:
    """keyctl, add_key and request_key fail with EPERM."""
    for entry in box.default_entries:
        box.run(entry, *KEYRING_ATTACKS).check(KEYRING_ATTACKS)


def test_system_v_ipc_is_refused(box: Deployment) -> None:
    """shmget, msgget, semget and the rest of System V IPC fail with EPERM."""
    for entry in box.default_entries:
        box.run(entry, *SYSV_ATTACKS).check(SYSV_ATTACKS)


def test_posix_queues_and_clock_setting_are_refused(box: Deployment) -> None:
    """mq_open (POSIX message queues outlive the job) and clock_settime fail with EPERM."""
    for entry in box.default_entries:
        box.run(entry, *QUEUE_AND_CLOCK_ATTACKS).check(QUEUE_AND_CLOCK_ATTACKS)


def test_ptrace_is_refused(box: Deployment) -> None:
    """PTRACE_TRACEME, attaching to the job's own child, process_vm_readv/writev and
    pidfd_getfd of it fail with EPERM."""
    for entry in box.default_entries:
        box.run(entry, *PTRACE_ATTACKS).check(PTRACE_ATTACKS)


def test_system_administration_calls_are_refused(box: Deployment) -> None:
    """kexec, module loading, reboot, swap, acct, settimeofday, iopl/ioperm and
    open_by_handle_at fail with EPERM."""
    for entry in box.default_entries:
        box.run(entry, *ALWAYS).check(ALWAYS)


def test_system_administration_calls_stay_refused_with_every_group(box: Deployment) -> None:
    """An entry that allows every syscall group (and UDP) still gets EPERM for kexec,
    modules, reboot, swap, acct, settimeofday, iopl/ioperm and open_by_handle_at."""
    need_seccomp_keys(box)
    box.run("wide", *ALWAYS).check(ALWAYS)


def test_process_accounting_stays_refused_with_its_capability(box: Deployment) -> None:
    """An entry granted CAP_SYS_PACCT still cannot call acct() (EPERM from the filter;
    with the capability the kernel would switch on accounting of every process)."""
    root_only(box)
    box.run("pacct", "always:acct").check({"always:acct": "EPERM"})


def _perf_allowed() -> str:
    try:
        paranoid = int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
    except (OSError, ValueError):
        return "!EPERM"
    return "ok" if paranoid <= 2 else "!EPERM"


# group -> (controls that work with the group allowed, an attack of another group that
# must stay refused there)
GROUP_CONTROLS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "namespaces": (
        {"unshare:user": "ok", "unshare:user+net": "ok", "clone_ns:user": "ok"},
        {"userns_fsopen": "EPERM", "userns_mount": "EPERM", "keyctl": "EPERM"},
    ),
    "mount": ({"userns_fsopen": "ok"}, {"shmget": "EPERM", "bpf": "EPERM"}),
    "sysv_ipc": (
        {"shmget": "ok", "msgget": "ok", "semget": "ok"},
        {"keyctl": "EPERM", "unshare:user": "EPERM"},
    ),
    "keyring": (
        {"keyctl": "ok", "add_key": "ok", "request_key": "!EPERM"},
        {"io_uring_setup": "EPERM"},
    ),
    "io_uring": ({"io_uring_setup": "ok"}, {"bpf": "EPERM", "socket:netlink:raw": "EAFNOSUPPORT"}),
    "bpf": ({"bpf": "!EPERM"}, {"perf_event_open": "EPERM"}),
    "perf_event": ({"perf_event_open": "PERF"}, {"userfaultfd": "EPERM"}),
    "userfaultfd": ({"userfaultfd": "ok"}, {"ptrace_traceme": "EPERM"}),
    "ptrace": (
        {
            "ptrace_traceme": "ok",
            "ptrace_child": "ok",
            "process_vm_readv": "ok",
            "process_vm_writev": "ok",
            "pidfd_getfd": "ok",
        },
        {"socket:netlink:raw": "EAFNOSUPPORT", "unshare:user": "EPERM"},
    ),
    "netlink": (
        {"socket:netlink:raw": "ok", "socket:netlink:dgram": "ok"},
        {"socket:packet:raw": "EAFNOSUPPORT", "socket:inet:stream:mptcp": "EPERM"},
    ),
    # The queue is a file of the mqueue file system: Landlock refuses to create it (EACCES).
    "mqueue": ({"mq_open": "!EPERM"}, {"shmget": "EPERM", "clock_settime": "EPERM"}),
    # Setting a clock needs CAP_SYS_TIME too: the kernel's own answer shows the filter let
    # the call through (EINVAL: CLOCK_MONOTONIC cannot be set).
    "clock": ({"clock_settime": "!EPERM"}, {"mq_open": "EPERM", "always:reboot": "EPERM"}),
}


@pytest.mark.parametrize("group", GROUPS)
def test_syscall_group_knob_opens_that_group_only(box: Deployment, group: str) -> None:
    """`syscalls: {allow: [GROUP]}`: the group's calls work (where the kernel lets the
    job's user make them) and another group's stay refused."""
    need_seccomp_keys(box)
    works, refused = GROUP_CONTROLS[group]
    expected = {s: _perf_allowed() if w == "PERF" else w for s, w in works.items()} | refused
    box.run(f"grp-{group}", *expected).check(expected)


# ------------------------------------------------------------------ foreign ABIs


def test_foreign_system_call_abis_are_refused(box: Deployment) -> None:
    """An x32 system call (nr | 0x40000000) and an i386 one (int $0x80) are refused with
    EPERM or ENOSYS, without killing the job and without a real answer."""
    if box.foreign is None:
        pytest.skip("no gcc to build the foreign-ABI probe")
    st = box.client.run("foreign", timeout=boxworld.JOB_TIMEOUT)
    box.outcome("foreign", st).check({"x32": "EPERM|ENOSYS", "i386": "EPERM|ENOSYS"})


# ------------------------------------------------------------------ other jobs


def test_scratch_root_is_not_listable(box: Deployment) -> None:
    """A job cannot list the scratch root, even with read granted on its parent;
    control: it writes and reads its own scratch directory, and the grant reads the
    parent's other files."""
    box.run("box", "scratch_root", "own_scratch").check(
        {"scratch_root": "EACCES", "own_scratch": "ok"}
    )
    public = f"read:{box.spool}/public.txt"
    box.run("snoop", "scratch_root", "own_scratch", public).check(
        {"scratch_root": "EACCES", "own_scratch": "ok", public: "ok"}
    )


def test_job_cannot_read_another_jobs_scratch(box: Deployment) -> None:
    """A job (same user) cannot read or list another running job's scratch directory,
    whatever its modes, found by id or through /proc/*/cgroup, even with read granted on
    the scratch root's parent; control: its own."""
    holder = box.start("box", "hold:60")
    try:
        home = box.wait_line(holder, "READY ").split(" ", 1)[1]
        assert Path(home).parent == box.scratch_root
        secret = f"{home}/secret.txt"
        expected = {
            f"read:{secret}": "EACCES",
            f"list:{home}": "EACCES",
            "steal_scratch:secret.txt": "EACCES",
            "own_scratch": "ok",
        }
        for entry in ("box", "snoop"):
            box.run(entry, *expected).check(expected)
    finally:
        box.end(holder)


def test_job_cannot_read_another_jobs_process_files(box: Deployment) -> None:
    """A job cannot read another job's /proc/<pid>/environ, mem, cwd, root or descriptors
    (both under the same user), nor the agent's; control: its own."""
    holder = box.start("box", "hold:60")
    try:
        box.wait_line(holder, "READY ")
        pid = box.client.query(holder).pid
        assert pid > 0
        # Listing /proc/<pid>/fd needs only the same uid (no ptrace check): the numbers
        # are visible, what they point to is not.
        targets = ("environ", "mem", "cwd", "root", "fd/0", "fd/1")
        expected = {f"proc:{p}:{w}": "EACCES" for p in (pid, box.agent.pid) for w in targets}
        expected |= {f"proc:self:{w}": "ok" for w in targets}
        box.run("box", *expected).check(expected)
    finally:
        box.end(holder)
