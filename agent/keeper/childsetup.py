"""The job's set-up in its forked child (the spawner's Python fork path), and the limits check.

Used when ``WORKER_AGENT_SPAWN=fork`` or the C extension cannot be imported (see
:mod:`agent.keeper.spawner`); the default C path (:mod:`agent.keeper.vspawn`,
``_vspawn.c``) runs the same steps, in the same order, with the same error texts
(tests/test_vspawn.py compares the two). A change to the order here must be made there.

The steps (:meth:`_Setup.steps`): keep only the descriptors the job needs; setsid; join
the cgroup; rlimits; umask; chdir; user switch and capabilities; default signal
dispositions and an empty mask; stdin /dev/null, stdout and stderr the output pipe, a
pinned script on fd 3 (and the pinned program after it); close every other descriptor;
Landlock (or no_new_privs alone); seccomp; ``execve`` of the path, or ``fexecve`` of the
pinned program's sealed copy. Never execvp, never a shell, no PATH lookup.

A failing step writes ``step\\0errno`` to the close-on-exec error pipe and the child
exits 127; end of file without data on that pipe means the exec succeeded.

Standard library only besides the spawner's own modules: the spawner never imports grpc.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import socket
from typing import Any, NoReturn

from agent.keeper import capabilities as caps_mod
from agent.keeper import landlock, seccomp
from agent.keeper import spawnproto as proto
from agent.vocabulary import RLIMIT_HARD_EXTRA, RLIMITS

# The limits an rlimit enforces (agent.vocabulary says which): name -> (the resource
# number, its name, what the hard limit adds to the soft one).
RLIMIT_RESOURCES: dict[str, tuple[int, str, int]] = {
    name: (getattr(resource, control), control, RLIMIT_HARD_EXTRA[name])
    for name, control in RLIMITS.items()
}
CAP_SYS_RESOURCE = 24
# Descriptors the job receives: 0 /dev/null, 1-2 output, 3 script (or the
# program), 4 the program when there is a script too. Everything the child
# keeps is first moved above them.
FIRST_FREE_FD = 5


def has_cap(bit: int) -> bool:
    """Whether this process holds the capability ``bit`` in its effective set."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def nr_open() -> int:
    """fs.nr_open: the most RLIMIT_NOFILE can be."""
    try:
        with open("/proc/sys/fs/nr_open", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def check_limits(limits: dict[str, Any], *, privileged: bool, nr_open: int) -> str:
    """Why the kernel would refuse these rlimits in a child of this process ("" if not)."""
    for name, value in limits.items():
        if name not in RLIMIT_RESOURCES:
            return f"unknown limit {name!r}"
        res, rname, extra = RLIMIT_RESOURCES[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value <= 0
            or value + extra >= 1 << 63
        ):
            return proto.error_text(f"setrlimit {rname}", errno.EINVAL)
        hard = resource.getrlimit(res)[1]
        # Raising a hard limit needs CAP_SYS_RESOURCE; RLIMIT_NOFILE can never
        # exceed fs.nr_open. Both fail with EPERM in the child: say so now.
        if (hard != resource.RLIM_INFINITY and value + extra > hard and not privileged) or (
            res == resource.RLIMIT_NOFILE and value > nr_open
        ):
            return proto.error_text(f"setrlimit {rname}", errno.EPERM)
    return ""


def switch_user(plan: dict[str, Any], root: bool, last_cap: int) -> str:
    """The user/caps block of the child (see agent.keeper.capabilities for the order).

    Returns the last step started, for the error report; raises OSError.
    """
    uid, gid = plan.get("uid"), plan.get("gid")
    caps: list[int] = plan.get("capabilities", [])
    if not root:
        holds, switcher = caps_mod.held()
        if uid is not None and uid != os.geteuid():
            # A keeper with CAP_SETUID and CAP_SETGID (the standard unit, dynamic users:
            # its own seccomp filter keeps the ids in their range) switches; an
            # unprivileged one can only "switch" to itself (the policy refuses other
            # users at load).
            if not switcher:
                raise PermissionError(errno.EPERM, "setresuid")
            gid = uid if gid is None else gid
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            caps_mod.new_session_keyring()  # vspawn.KEYRING_STEP: not the keeper's
        if holds:
            # A switch between two non-zero uids keeps every capability, and ambient
            # ones survive execve: the job gets none of the keeper's.
            caps_mod.drop_all()
        return "capabilities" if holds else "setresuid"
    # ``root``: a root keeper, or one of another user that gives capabilities
    # (capabilities.gives_capabilities): the same steps.
    euid = os.geteuid()
    target = euid if uid is None else uid
    if uid is not None:
        gid = uid if gid is None else gid
        # Groups first, then the gid, then the uid: after setresuid the
        # process could no longer drop the others.
        os.setgroups([])
        os.setresgid(gid, gid, gid)
    if caps and target != 0:
        caps_mod.keep_caps()
    # Before setresuid: dropping from the bounding set needs CAP_SETPCAP. A job of a
    # root spawner never gets back a capability its entry does not name, not even
    # through a set-uid root program.
    caps_mod.drop_bounding(caps, last_cap)
    if uid is not None:
        os.setresuid(uid, uid, uid)
        if uid != euid:  # vspawn.user_ops: a user other than the keeper's
            caps_mod.new_session_keyring()
    if target == 0 or caps or euid != 0:
        # Root keeps its full permitted set across setresuid(0), a keeper of another
        # user its own (ambient ones would survive execve): cut it to the entry's.
        caps_mod.set_caps(caps, ambient=target != 0)
    return "capabilities"


def close_all_but(keep: set[int], lo: int) -> None:
    """Close every descriptor from ``lo`` up except ``keep``."""
    for fd in sorted(k for k in keep if k >= lo):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, os.sysconf("SC_OPEN_MAX"))


def send_listener(sock_fd: int, listener: int) -> None:
    """Hand the filter's user-notification listener to the spawner (the child's side)."""
    with socket.socket(fileno=sock_fd) as sock:
        socket.send_fds(sock, [b"L"], [listener])
    os.close(listener)


def child(
    plan: dict[str, Any],
    fds: dict[str, int],
    err_w: int,
    reset: list[int],
    confine: landlock.Ruleset | None = None,
    root: bool = False,
    last_cap: int = 40,
    scratch_fd: int = -1,
    filt: seccomp.Filter | None = None,
    notify_sock: int = -1,
) -> NoReturn:
    """Set up and exec the job in the forked child; never returns.

    ``fds`` are the job's descriptors by role (stdout, and maybe script, exec, cgroup),
    ``err_w`` the error pipe, ``reset`` the signals whose disposition goes back to the
    default. Nothing may escape from here into the spawner's code: every way out is an
    exec or ``os._exit``.
    """
    try:
        setup = _Setup(plan, err_w, reset, confine, root, last_cap, scratch_fd, filt, notify_sock)
    except BaseException:
        _fail(err_w, "setup", errno.EINVAL)
    setup.run(fds)


def _fail(err_w: int, step: str, code: int) -> NoReturn:
    """Report the failed step and its errno on the error pipe, and exit 127."""
    try:
        os.write(err_w, f"{step}\0{code}".encode())
    finally:
        os._exit(127)


class _Setup:
    """The forked child on its way to the exec: the step it is at (named in the report of a
    failure) and the descriptors it keeps."""

    def __init__(
        self,
        plan: dict[str, Any],
        err_w: int,
        reset: list[int],
        confine: landlock.Ruleset | None,
        root: bool,
        last_cap: int,
        scratch_fd: int,
        filt: seccomp.Filter | None,
        notify_sock: int,
    ) -> None:
        self.plan, self.err_w, self.reset = plan, err_w, reset
        self.confine, self.filt = confine, filt
        self.root, self.last_cap = root, last_cap
        self.scratch_fd, self.notify_sock = scratch_fd, notify_sock
        self.step = "setup"
        # The job's descriptors by role, once moved above FIRST_FREE_FD.
        self.moved: dict[str, int] = {}
        # Kept where they are until the exec (close-on-exec), see keep_only().
        self.in_place: set[int] = set()
        self.program: int | str = plan.get("path", "")
        self.top = 3  # the first number above the job's own descriptors

    def run(self, fds: dict[str, int]) -> NoReturn:
        """The set-up and exec; a failure is reported on the error pipe (exit 127)."""
        try:
            self.steps(fds)
        except landlock.LandlockStepError as e:
            step, code = f"landlock: {e.step}", e.errno or errno.EIO
        except caps_mod.CapError as e:
            step, code = e.step, e.errno or errno.EIO
        except OSError as e:
            step, code = self.step, e.errno or errno.EIO
        except BaseException:
            step, code = self.step, errno.EINVAL
        _fail(self.err_w, step, code)

    def steps(self, fds: dict[str, int]) -> None:
        """The set-up, in its order (vspawn.build and _vspawn.c follow it step by step)."""
        self.keep_only(fds)
        self.step = "setsid"
        os.setsid()
        # Right after setsid, before anything else: no process of the job ever runs
        # outside its cgroup (its limits bind from here on).
        self.join_cgroup()
        self.set_limits()
        os.umask(self.plan["umask"])  # cannot fail: no step of its own
        self.step = "chdir"
        os.chdir(self.plan["cwd"])
        # While still privileged enough to switch: after the user switch the child could
        # no longer drop groups or capabilities (see switch_user).
        self.user_and_caps()
        self.reset_signals()
        self.wire_descriptors()
        self.step = "close descriptors"
        close_all_but({self.err_w, *self.in_place}, self.top)
        # Landlock last before the exec: everything the child opens itself is open, and
        # the domain (with no_new_privs) also binds whatever the job execs.
        self.restrict()
        # Seccomp after no_new_privs (required without CAP_SYS_ADMIN) and Landlock: from
        # here on the filter binds the child, and all it still does is exec.
        self.install_filter()
        self.step = "execve"
        os.execve(self.program, self.plan["argv"], self.plan["env"])  # noqa: S606 - no shell, by design

    def keep_only(self, fds: dict[str, int]) -> None:
        """Keep only what the job needs, moved above the numbers it will get.

        The spawner's own descriptors (other jobs' pidfds, the socket) may sit anywhere,
        even above the job's RLIMIT_NOFILE. The prepared Landlock descriptors stay where
        they are: the ruleset's rules name them by number (all close-on-exec, and above
        the job's numbers); so do the scratch directory's and the listener socket.
        """
        in_place = set(self.confine.descriptors()) if self.confine is not None else set()
        if self.scratch_fd >= 0:
            in_place.add(self.scratch_fd)
        if self.notify_sock >= 0:
            in_place.add(self.notify_sock)
        self.in_place = in_place
        keep = sorted({self.err_w, *fds.values()})
        close_all_but({*keep, *in_place}, 0)
        self.moved = {
            k: fcntl.fcntl(v, fcntl.F_DUPFD_CLOEXEC, FIRST_FREE_FD) for k, v in fds.items()
        }
        self.err_w = fcntl.fcntl(self.err_w, fcntl.F_DUPFD_CLOEXEC, FIRST_FREE_FD)
        for fd in keep:
            os.close(fd)

    def join_cgroup(self) -> None:
        if "cgroup" in self.moved:
            self.step = "cgroup join"
            os.write(self.moved["cgroup"], b"0")

    def set_limits(self) -> None:
        for name, value in sorted(self.plan.get("limits", {}).items()):
            res, rname, extra = RLIMIT_RESOURCES[name]
            self.step = f"setrlimit {rname}"
            # prlimit, not setrlimit: setrlimit turns the kernel's EPERM into a
            # ValueError (reported as EINVAL); prlimit keeps the errno, which is
            # what check_limits predicts and the C path reports.
            resource.prlimit(0, res, (value, value + extra))

    def user_and_caps(self) -> None:
        self.step = "user switch"
        # (vspawn.spawn_args: a keeper holding capabilities drops them in every job.)
        if self.plan.get("uid") is not None or self.root or caps_mod.held()[0]:
            switch_user(self.plan, self.root, self.last_cap)

    def reset_signals(self) -> None:
        self.step = "signals"
        for sig in self.reset:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

    def wire_descriptors(self) -> None:
        """stdin /dev/null, stdout and stderr the output, the script on 3, the program next."""
        self.step = "open /dev/null"
        opened = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        # Above the job's numbers too: dup2 onto itself would keep CLOEXEC.
        null = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, FIRST_FREE_FD)
        os.close(opened)
        self.step = "dup2"
        os.dup2(null, 0)
        os.dup2(self.moved["stdout"], 1)
        os.dup2(self.moved["stdout"], 2)
        if "script" in self.moved:
            os.dup2(self.moved["script"], 3)  # argv names /proc/self/fd/3
            self.top = 4
        if "exec" in self.moved:
            # Not CLOEXEC: a #! program run by fexecve is handed to its
            # interpreter as /dev/fd/N, which must still be open then.
            os.dup2(self.moved["exec"], self.top)
            self.program = self.top
            self.top += 1

    def restrict(self) -> None:
        """Landlock (its no_new_privs included), or no_new_privs alone."""
        if self.confine is not None:
            self.step = "landlock"
            dirs = [self.scratch_fd] if self.scratch_fd >= 0 else []
            self.confine.restrict(extra_write_dirs=dirs)
        elif self.plan.get("no_new_privs", True) or self.filt is not None:
            self.step = "no_new_privs"
            caps_mod.no_new_privs()

    def install_filter(self) -> None:
        if self.filt is not None:
            self.step = "seccomp"
            listener = self.filt.install()
            if listener >= 0:
                send_listener(self.notify_sock, listener)
