"""Attacks from inside a job box, run by a whitelisted /usr/bin/python3 (tests/test_box.py).

    boxprobe.py [--inline] ATTACK[:PARAM...] ...

Each attack runs in a forked child (so an unshare or a PTRACE_TRACEME that works does
not change what the next attack sees, and a kill by a filter shows as ``killed``), or in
the probe itself with ``--inline``, and prints one line:

    RESULT <attack> ok [detail]       the attack (or control) worked
    RESULT <attack> errno <ENAME>     refused with that errno
    RESULT <attack> killed <SIGNAME>  the child died of a signal
    RESULT <attack> error <text>      the probe itself went wrong

then ``DONE`` once all attacks ran. System calls the standard library lacks go through
libc's ``syscall()`` with x86_64 numbers. Standard library only, Python 3.11.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

NR = {
    "socket": 41,
    "clone": 56,
    "ptrace": 101,
    "pivot_root": 155,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "shmget": 29,
    "shmat": 30,
    "shmctl": 31,
    "semget": 64,
    "semop": 65,
    "semctl": 66,
    "shmdt": 67,
    "msgget": 68,
    "msgsnd": 69,
    "msgrcv": 70,
    "msgctl": 71,
    "semtimedop": 220,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "setns": 308,
    "process_vm_readv": 310,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "mount_setattr": 442,
    "iopl": 172,
    "ioperm": 173,
    "clock_settime": 227,
    "mq_open": 240,
    "mq_unlink": 241,
    "open_by_handle_at": 304,
    "process_vm_writev": 311,
    "pidfd_open": 434,
    "pidfd_getfd": 438,
}

FAMILIES = {
    "unix": 1,
    "inet": 2,
    "ax25": 3,
    "ipx": 4,
    "appletalk": 5,
    "x25": 9,
    "inet6": 10,
    "key": 15,
    "netlink": 16,
    "packet": 17,
    "rds": 21,
    "llc": 26,
    "can": 29,
    "tipc": 30,
    "bluetooth": 31,
    "alg": 38,
    "vsock": 40,
    "kcm": 41,
    "qipcrtr": 42,
    "smc": 43,
    "xdp": 44,
    "mctp": 45,
}
TYPES = {"stream": 1, "dgram": 2, "raw": 3, "rdm": 4, "seqpacket": 5, "dccp": 6, "packet": 10}
TYPE_FLAGS = {"nonblock": 0o4000, "cloexec": 0o2000000}
PROTOCOLS = {
    "0": 0,
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "dccp": 33,
    "icmpv6": 58,
    "sctp": 132,
    "udplite": 136,
    "raw": 255,
    "mptcp": 262,
}
CLONE_FLAGS = {
    "time": 0x80,
    "ns": 0x20000,
    "cgroup": 0x02000000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "user": 0x10000000,
    "pid": 0x20000000,
    "net": 0x40000000,
}
IPPROTO_MPTCP = 262

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class Ok(Exception):
    """Raised by an attack to report success with a detail."""


Arg = int | bytes | None | ctypes.Array[ctypes.c_char] | ctypes.Structure


def sys_call(name: str, *args: Arg) -> int:
    """libc ``syscall(NR[name], args...)``; OSError with the errno on failure."""
    cargs: list[object] = []
    for a in args:
        if isinstance(a, int):
            cargs.append(ctypes.c_long(a))
        elif isinstance(a, bytes) or a is None:
            cargs.append(ctypes.c_char_p(a))
        else:
            cargs.append(ctypes.byref(a))
    ctypes.set_errno(0)
    r = int(_libc.syscall(ctypes.c_long(NR[name]), *cargs))
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def clone_flags(spec: str) -> int:
    """``user+net`` -> CLONE_NEWUSER | CLONE_NEWNET."""
    flags = 0
    for part in spec.split("+"):
        flags |= CLONE_FLAGS[part]
    return flags


def child_exits(pid: int) -> str:
    """Reap a child made by a raw clone; its status as text."""
    _, status = os.waitpid(pid, 0)
    return f"child {pid} status {status}"


# ------------------------------------------------------------------ sockets


def a_socket(family: str, kind: str, proto: str = "0") -> str:
    """socket(family, type[|flags], protocol), straight to the kernel."""
    base, *flags = kind.split("|")
    ty = TYPES[base]
    for f in flags:
        ty |= TYPE_FLAGS[f]
    fd = sys_call("socket", FAMILIES[family], ty, PROTOCOLS[proto])
    os.close(fd)
    return "created"


def a_socket_raw(family: str, kind: str, proto: str) -> str:
    """socket() with numbers as given (0x...), all 64 bits of each register."""
    fd = sys_call("socket", int(family, 0), int(kind, 0), int(proto, 0))
    os.close(fd)
    return "created"


def a_socketpair() -> str:
    a, b = socket.socketpair()
    a.sendall(b"x")
    ok = b.recv(1) == b"x"
    a.close()
    b.close()
    return "exchanged" if ok else "no data"


def a_tcp_connect(port: str, family: str = "inet") -> str:
    fam = socket.AF_INET6 if family == "inet6" else socket.AF_INET
    host = "::1" if family == "inet6" else "127.0.0.1"
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect((host, int(port)))
    return f"connected to {port}"


def a_mptcp_connect(port: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP) as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", int(port)))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return f"connected to {port} over MPTCP"


def a_tcp_bind(port: str) -> str:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port may be in TIME_WAIT
        s.bind(("127.0.0.1", int(port)))
    return f"bound {port}"


def a_mptcp_bind(port: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP) as s:
        s.bind(("127.0.0.1", int(port)))
        s.listen(1)
        return f"bound and listening on {port} over MPTCP"


def a_tcp_listen_unbound(family: str = "inet") -> str:
    with socket.socket(socket.AF_INET6 if family == "inet6" else socket.AF_INET) as s:
        s.listen(1)
        return f"listening on autobound port {s.getsockname()[1]}"


def a_connect_then_listen(port: str) -> str:
    """connect() (which takes an ephemeral port), disconnect (AF_UNSPEC), then listen."""
    with socket.socket() as s:
        s.connect(("127.0.0.1", int(port)))
        unspec = ctypes.create_string_buffer(16)
        if _libc.connect(s.fileno(), unspec, 16) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        s.listen(1)
        return f"listening on {s.getsockname()!r}"


def a_unix_listen_unbound() -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.listen(1)
        return f"listening on autobound {s.getsockname()!r}"


def a_tcp_fastopen(port: str) -> str:
    """connect() by sendto(MSG_FASTOPEN): TCP Fast Open's way around connect()."""
    with socket.socket() as s:  # blocking: sendto returns once the handshake is done
        s.sendto(b"box-tfo", socket.MSG_FASTOPEN, ("127.0.0.1", int(port)))
        return f"connected to {port} by fast open, peer {s.getpeername()!r}"


def a_unix_bind() -> str:
    path = os.path.join(os.environ["HOME"], f"bind-{os.getpid()}.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
    os.unlink(path)
    return "bound"


def a_unix_listen() -> str:
    path = os.path.join(os.environ["HOME"], f"listen-{os.getpid()}.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(path)
            s.listen(1)
            return "listening"
    finally:
        os.unlink(path)


def a_tcp_serve(port: str) -> str:
    """Bind, listen, say READY, accept one connection from outside and greet it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(port)))
        s.listen(1)
        os.write(1, f"READY {port}\n".encode())
        s.settimeout(15)
        conn, _ = s.accept()
        with conn:
            conn.sendall(b"box-hello\n")
    return f"served on {port}"


def a_tcp_serve_thread(port: str) -> str:
    """tcp_serve from a second thread (listen() from a thread that is not the leader)."""
    out: list[str] = []

    def serve() -> None:
        try:
            out.append("ok " + a_tcp_serve(port))
        except OSError as e:
            out.append(f"errno {errno.errorcode.get(e.errno or 0, str(e.errno))}")
            os.write(1, f"READY {port} (failed)\n".encode())

    t = threading.Thread(target=serve)
    t.start()
    t.join(30)
    kind, _, rest = (out or ["error thread hung"])[0].partition(" ")
    if kind == "errno":
        raise OSError(getattr(errno, rest), rest)
    return rest


def a_udp_self(family: str = "inet") -> str:
    fam = socket.AF_INET6 if family == "inet6" else socket.AF_INET
    host = "::1" if family == "inet6" else "127.0.0.1"
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        s.settimeout(5)
        s.sendto(b"self", s.getsockname())
        return "echoed" if s.recv(16) == b"self" else "lost"


def a_udp_send(port: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as s:
        s.sendto(b"box-udp", ("127.0.0.1", int(port)))
    return f"sent to {port}"


# ------------------------------------------------------------------ namespaces


def a_unshare(spec: str) -> str:
    sys_call("unshare", clone_flags(spec))
    return f"unshared {spec}"


def a_setns(kind: str) -> str:
    fd = os.open(f"/proc/self/ns/{kind}", os.O_RDONLY)
    try:
        sys_call("setns", fd, 0)
    finally:
        os.close(fd)
    return f"joined {kind}"


def a_clone_ns(spec: str) -> str:
    pid = sys_call("clone", clone_flags(spec) | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    return child_exits(pid)


class CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


def a_clone3(spec: str = "") -> str:
    args = CloneArgs()
    args.flags = clone_flags(spec) if spec else 0
    args.exit_signal = signal.SIGCHLD
    pid = sys_call("clone3", args, ctypes.sizeof(args))
    if pid == 0:
        os._exit(0)
    return child_exits(pid)


def a_thread() -> str:
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
    t.start()
    t.join(5)
    return "thread ran" if seen else "thread did not run"


def a_fork() -> str:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    return f"child exited {os.waitstatus_to_exitcode(status)}"


def a_subprocess() -> str:
    r = subprocess.run(["/bin/echo", "spawned"], capture_output=True, check=True, timeout=10)
    return r.stdout.decode().strip()


# ------------------------------------------------------------------ mounts


def a_mount() -> str:
    sys_call("mount", b"none", os.environ["HOME"].encode(), b"tmpfs", 0, None)
    return "mounted"


def a_umount2() -> str:
    sys_call("umount2", b"/nonexistent-box-probe", 0)
    return "unmounted"


def a_pivot_root() -> str:
    sys_call("pivot_root", b"/nonexistent-box-probe", b"/nonexistent-box-probe")
    return "pivoted"


def a_open_tree() -> str:
    fd = sys_call("open_tree", -100, b"/", 0)  # AT_FDCWD, no clone
    os.close(fd)
    return "opened"


def a_move_mount() -> str:
    sys_call("move_mount", -1, b"", -1, b"", 0)
    return "moved"


def a_fsopen() -> str:
    fd = sys_call("fsopen", b"tmpfs", 0)
    os.close(fd)
    return "fs context opened"


def a_fsmount() -> str:
    sys_call("fsmount", -1, 0, 0)
    return "mounted"


def a_fspick() -> str:
    fd = sys_call("fspick", -100, b"/", 0)
    os.close(fd)
    return "picked"


def a_mount_setattr() -> str:
    sys_call("mount_setattr", -1, b"", 0, None, 0)
    return "set"


def a_userns_mount() -> str:
    """In a user and mount namespace of its own (where it holds every capability)."""
    sys_call("unshare", clone_flags("user+ns"))
    return a_mount()


def a_userns_fsopen() -> str:
    sys_call("unshare", clone_flags("user+ns"))
    return a_fsopen()


# ------------------------------------------------------------------ kernel interfaces


def a_bpf() -> str:
    attr = ctypes.create_string_buffer(128)  # BPF_MAP_CREATE, zeroed attributes
    fd = sys_call("bpf", 0, attr, 128)
    os.close(fd)
    return "map created"


def a_perf_event_open() -> str:
    attr = ctypes.create_string_buffer(128)
    ctypes.c_uint32.from_buffer(attr, 0).value = 1  # PERF_TYPE_SOFTWARE
    ctypes.c_uint32.from_buffer(attr, 4).value = 128  # size
    ctypes.c_uint64.from_buffer(attr, 8).value = 0  # PERF_COUNT_SW_CPU_CLOCK
    ctypes.c_uint64.from_buffer(attr, 40).value = 1 | 1 << 5 | 1 << 6  # disabled, user only
    fd = sys_call("perf_event_open", attr, 0, -1, -1, 8)  # this process, any cpu, CLOEXEC
    os.close(fd)
    return "counter opened"


def a_userfaultfd() -> str:
    fd = sys_call("userfaultfd", os.O_CLOEXEC | 1)  # UFFD_USER_MODE_ONLY
    os.close(fd)
    return "opened"


def a_io_uring_setup() -> str:
    params = ctypes.create_string_buffer(120)
    fd = sys_call("io_uring_setup", 1, params)
    os.close(fd)
    return "ring created"


def a_io_uring_enter() -> str:
    sys_call("io_uring_enter", -1, 0, 0, 0, None, 0)
    return "entered"


def a_io_uring_register() -> str:
    sys_call("io_uring_register", -1, 0, None, 0)
    return "registered"


def a_keyctl() -> str:
    return f"session keyring {sys_call('keyctl', 0, -3, 1)}"  # KEYCTL_GET_KEYRING_ID


def a_add_key() -> str:
    return f"key {sys_call('add_key', b'user', b'boxprobe', b'x', 1, -2)}"  # process keyring


def a_request_key() -> str:
    return f"key {sys_call('request_key', b'user', b'boxprobe-none', None, 0)}"


# ------------------------------------------------------------------ System V IPC

IPC_PRIVATE, IPC_CREAT, IPC_RMID, IPC_STAT = 0, 0o1000, 0, 2


def a_shmget(keep: str = "") -> str:
    shmid = sys_call("shmget", IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
    if not keep:
        sys_call("shmctl", shmid, IPC_RMID, None)
    return f"shmid {shmid}"


def a_msgget() -> str:
    qid = sys_call("msgget", IPC_PRIVATE, IPC_CREAT | 0o600)
    sys_call("msgctl", qid, IPC_RMID, None)
    return f"msqid {qid}"


def a_semget() -> str:
    semid = sys_call("semget", IPC_PRIVATE, 1, IPC_CREAT | 0o600)
    sys_call("semctl", semid, 0, IPC_RMID, 0)
    return f"semid {semid}"


def a_ipc_other(name: str) -> str:
    """The rest of the family on an id that does not exist (EINVAL without a filter)."""
    args: dict[str, tuple[Arg, ...]] = {
        "shmat": (-1, 0, 0),
        "shmctl": (-1, IPC_STAT, None),
        "shmdt": (0,),
        "semop": (-1, None, 0),
        "semctl": (-1, 0, IPC_STAT, 0),
        "semtimedop": (-1, None, 0, None),
        "msgsnd": (-1, None, 0, 0),
        "msgrcv": (-1, None, 0, 0, 0),
        "msgctl": (-1, IPC_STAT, None),
    }
    sys_call(name, *args[name])
    return "called"


# ------------------------------------------------------------------ POSIX queues, clock


def a_mq_open() -> str:
    name = f"boxprobe-{os.getpid()}".encode()
    fd = sys_call("mq_open", name, os.O_CREAT | os.O_RDWR, 0o600, None)
    os.close(fd)
    sys_call("mq_unlink", name)
    return "queue created"


def a_clock_settime() -> str:
    ts = ctypes.create_string_buffer(16)  # CLOCK_MONOTONIC cannot be set: EINVAL unfiltered
    sys_call("clock_settime", 1, ts)
    return "set"


# ------------------------------------------------------------------ ptrace


def _sleeping_child() -> int:
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    return pid


def a_ptrace_traceme() -> str:
    sys_call("ptrace", 0, 0, 0, 0)  # PTRACE_TRACEME
    return "traced by parent"


def a_ptrace_child() -> str:
    pid = _sleeping_child()
    try:
        sys_call("ptrace", 16, pid, 0, 0)  # PTRACE_ATTACH
        os.waitpid(pid, 0)
        sys_call("ptrace", 17, pid, 0, 0)  # PTRACE_DETACH
        return f"attached to child {pid}"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def a_process_vm_readv() -> str:
    secret = ctypes.create_string_buffer(b"box-vm-secret")
    pid = _sleeping_child()
    try:
        mine = ctypes.create_string_buffer(16)
        local = IoVec(ctypes.addressof(mine), 13)
        remote = IoVec(ctypes.addressof(secret), 13)
        n = sys_call("process_vm_readv", pid, local, 1, remote, 1, 0)
        return f"read {n} bytes: {mine.value.decode()}"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def a_process_vm_writev() -> str:
    target = ctypes.create_string_buffer(16)
    pid = _sleeping_child()
    try:
        mine = ctypes.create_string_buffer(b"box-vm-write")
        local = IoVec(ctypes.addressof(mine), 12)
        remote = IoVec(ctypes.addressof(target), 12)
        return f"wrote {sys_call('process_vm_writev', pid, local, 1, remote, 1, 0)} bytes"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def a_pidfd_getfd() -> str:
    """Take a descriptor (stdout) out of the job's own child."""
    pid = _sleeping_child()
    try:
        pidfd = sys_call("pidfd_open", pid, 0)
        try:
            fd = sys_call("pidfd_getfd", pidfd, 1, 0)
            os.close(fd)
            return f"took fd 1 of child {pid}"
        finally:
            os.close(pidfd)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# ------------------------------------------------------------------ always refused


def a_always(name: str) -> str:
    """Called with arguments that do nothing even where allowed (bad magic, no file)."""
    args: dict[str, tuple[Arg, ...]] = {
        "kexec_load": (0, 0, None, 0xDEAD0000),
        "kexec_file_load": (-1, -1, 0, None, 0),
        "init_module": (None, 0, b""),
        "finit_module": (-1, b"", 0),
        "delete_module": (b"boxprobe_no_such_module", os.O_NONBLOCK),
        "reboot": (0, 0, 0, None),
        "swapon": (b"/nonexistent-box-probe", 0),
        "swapoff": (b"/nonexistent-box-probe",),
        "acct": (b"/nonexistent-box-probe",),
        "settimeofday": (None, None),
        "iopl": (3,),
        "ioperm": (0x80, 1, 1),
        "open_by_handle_at": (-1, None, 0),
    }
    sys_call(name, *args[name])
    return "called"


# ------------------------------------------------------------------ the box from /proc


def a_status(field: str) -> str:
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field:
                return value.strip()
    return "absent"


def a_proc(pid: str, what: str) -> str:
    """Another process's (or ``self``'s) environ, mem, cwd, root or fd/."""
    base = f"/proc/{pid}"
    if what in ("cwd", "root"):
        return os.readlink(f"{base}/{what}")
    if what == "fd":
        return f"{len(os.listdir(f'{base}/fd'))} descriptors"
    if what.startswith("fd/"):
        return os.readlink(f"{base}/{what}")
    with open(f"{base}/{what}", "rb") as f:
        if what == "mem":
            return "mem opened"
        return f"{len(f.read())} bytes"


def a_read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def a_list(path: str) -> str:
    return f"{len(os.listdir(path))} entries"


def a_scratch_root() -> str:
    return a_list(os.path.dirname(os.environ["HOME"]))


def a_own_scratch() -> str:
    path = os.path.join(os.environ["HOME"], "own.txt")
    with open(path, "w") as f:
        f.write("mine\n")
    return a_read(path)


def _unified_cgroup(pid: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next((ln[3:].strip() for ln in f if ln.startswith("0::")), "")


def a_steal_scratch(name: str) -> str:
    """Find the agent's other jobs as an attacker would (their cgroups, siblings of its
    own, named by job id, in /proc/*/cgroup) and read ``name`` in their scratch."""
    mine = _unified_cgroup("self")
    parent = mine.rsplit("/", 1)[0]
    root = os.path.dirname(os.environ["HOME"])
    ids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cg = _unified_cgroup(pid)
            except OSError:
                continue
            if cg != mine and cg.rsplit("/", 1)[0] == parent:
                ids.add(cg.rsplit("/", 1)[1])
    if not ids:
        raise OSError(errno.ESRCH, "no other job found in /proc/*/cgroup")
    errors: list[OSError] = []
    for job in sorted(ids):
        try:
            return f"read {job}: {a_read(os.path.join(root, job, name))}"
        except OSError as e:
            errors.append(e)
    raise next((e for e in errors if e.errno == errno.EACCES), errors[-1])


def a_hold(seconds: str) -> str:
    """Leave a secret in the scratch directory, readable by anyone, and stay alive."""
    home = os.environ["HOME"]
    secret = os.path.join(home, "secret.txt")
    with open(secret, "w") as f:
        f.write(f"box-secret-{os.environ.get('AGENT_JOB_ID', '')}\n")
    os.chmod(secret, 0o644)
    os.chmod(home, 0o755)
    os.write(1, f"READY {home}\n".encode())
    time.sleep(float(seconds))
    return "held"


ATTACKS: dict[str, Callable[..., str]] = {
    name[2:]: fn for name, fn in globals().items() if name.startswith("a_") and callable(fn)
}


def run(spec: str) -> str:
    """One attack -> ``ok detail`` or ``errno ENAME`` or ``error text``."""
    name, *params = spec.split(":")
    try:
        return "ok " + ATTACKS[name](*params)
    except OSError as e:
        if e.errno is None:
            return f"error {e!r}"
        return "errno " + errno.errorcode.get(e.errno, str(e.errno))
    except Exception as e:
        return f"error {e!r}"


def run_forked(spec: str) -> str:
    """``run`` in a child: a working attack cannot change the probe; a kill is seen."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.write(w, run(spec).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed " + signal.Signals(os.WTERMSIG(status)).name
    return out or "error no result"


def main(argv: list[str]) -> int:
    inline = argv[:1] == ["--inline"]
    for spec in argv[1:] if inline else argv:
        result = run(spec) if inline else run_forked(spec)
        print(f"RESULT {spec} {result.replace(chr(10), ' | ')}", flush=True)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
