"""The job spawner: a small single-threaded process that forks, sets up and execs every job.

Why it exists (the design notes, "Facts measured on these machines"): no
Python code may run between fork and exec in the gRPC process, and exec'ing
util-linux trampolines is unsafe (their execvp() hands an ENOEXEC file to
/bin/sh). This process never imports grpc (nor asyncio, nor yaml) and has
one thread, so its forked child may run Python freely before ``execve``.

It is started by the agent (:class:`agent.daemon.spawn.SpawnerOps`) as a
fresh isolated interpreter (``python -I``) running :func:`main` with ``FD PARENT_PID
[CGROUP_JOBS_DIR CONTROLLERS]``, with
one end of a ``socketpair(AF_UNIX, SOCK_SEQPACKET)`` as FD; the protocol is
in :mod:`agent.daemon.spawnproto`. The agent sends fully resolved plans; the
spawner checks what it can check before forking (an absolute path or a
descriptor, limits the kernel will accept) and answers with the pid once
``execve`` has succeeded, or with the step and errno that failed.

The child's set-up, in this order: setsid; join the cgroup (``cgroup``
descriptor: write "0"); rlimits; umask; chdir; user switch (setgroups([]),
setresgid, setresuid); default signal dispositions and an empty mask; stdin
/dev/null, stdout and stderr the output pipe, a pinned script on fd 3;
close every other descriptor; (Landlock: later); ``execve`` of the path, or
``fexecve`` of the pinned program's sealed copy. Never execvp, never a shell,
no PATH lookup: ENOEXEC is a start failure like any other.

Two ways to run that set-up, the same steps in the same order with the same
error texts (tests/test_vspawn.py compares them):

* the C vfork path (:mod:`agent.daemon.vspawn`, ``_vspawn.c``), used when the
  extension is built: ``clone(CLONE_VM | CLONE_VFORK)`` on a stack of its own,
  every array prepared before, only system calls in the child. The spawner
  sleeps until the child has exec'd or failed, so the answer goes out at once;
  a failing step leaves its index and errno in the spawner's memory and the
  child exits 127.
* the Python fork path (:func:`_child`), when the extension cannot be imported
  or ``WORKER_AGENT_SPAWN=fork``: ``os.fork()`` and the set-up in Python. A
  failing step writes ``step\\0errno`` to a CLOEXEC pipe and exits 127; end
  of file without data on that pipe means the exec succeeded; the answer goes
  out when the pipe says so, so the next job can be forked meanwhile.

The first message the spawner sends says which (``{"op": "hello", "spawn":
"vfork" | "fork", "why": ...}``); the agent logs it. Measured (``python -m
bench.spawncost --jobs 1000 --rounds 3``, as root, /bin/true, 2 shared cores):
the C path 901 jobs/s and 1.25 ms start-to-exit at 1 in flight, 1037 jobs/s at
16, spawner CPU 0.19-0.24 ms a job; the fork path in the same run 253 jobs/s
and 5.2 ms, 333 jobs/s, 0.72-0.78 ms (docs/benchmarks.md).

Job cgroups (:mod:`agent.daemon.cgroups`): the spawner owns each job's
cgroup from creation to removal, and the agent asks by job id. A plan with
``cgroup: {"id": JOB_ID, "memory_bytes": N, "pids": N, "cpu_millicores": N}``
makes the spawner create the leaf ``<jobs>/<JOB_ID>`` with those limits and
open its ``cgroup.procs`` before the fork; the child joins it right after
setsid, before anything else, so no process of the job ever runs outside
it. Why here and not in the agent: the spawner is the process that forks,
the writes are blocking file operations that stay off the agent's event
loop, and it is the half that will keep privileges when the agent drops
them. ``signal`` reaches every process of the leaf (through pidfds, so a
reused pid is never hit) and SIGKILL is ``cgroup.kill``.

The spawner is the jobs' parent, so it reaps them: a pidfd per job in one
selector with the control socket, no polling. When a job's leader exits it
first kills the rest of the leader's process group (the leader is a zombie
until reaped, so its group id cannot have been reused), then ``wait4`` gives
the status. With a cgroup it then kills the whole leaf (``cgroup.kill``:
setsid'd and double-forked processes too) and waits, through inotify on
``cgroup.events`` in the same selector, until the leaf is unpopulated; only
then does it read ``cpu.stat``, ``memory.peak`` and ``memory.events``,
remove the leaf and report the exit. Peak memory is the leaf's
``memory.peak`` or nothing: ``ru_maxrss`` of a forked child keeps the
spawner's own high-water mark.

It exits when the agent closes the socket or asks it to, and dies with the
agent (PR_SET_PDEATHSIG). Jobs still running then are left alone: the
agent's next start finds them (by their cgroups, or without cgroups by
AGENT_INSTANCE) and reports them LOST, as it does after an agent crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gc
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any, NoReturn

from agent.daemon import capabilities as caps_mod
from agent.daemon import cgroups, landlock, seccomp, uids, vspawn
from agent.daemon import scratch as scratch_mod
from agent.daemon import spawnproto as proto
from agent.daemon.spawnplan import CGROUP_REQUEST_KEYS, check_plan
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
PR_SET_PDEATHSIG = 1
# Prepared Landlock rulesets kept (one per distinct entry spec; a reload adds new ones).
LANDLOCK_CACHE = 64


def _has_cap(bit: int) -> bool:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def _nr_open() -> int:
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


def seccomp_spec(sc: dict[str, Any]) -> seccomp.SeccompSpec:
    """The SeccompSpec of a plan's (checked) "seccomp" object."""
    return seccomp.SeccompSpec(udp=sc["udp"], allow=tuple(sorted(sc["allow"])), listen=sc["listen"])


def _send_listener(sock_fd: int, listener: int) -> None:
    """Hand the filter's user-notification listener to the spawner (the child's side)."""
    with socket.socket(fileno=sock_fd) as sock:
        socket.send_fds(sock, [b"L"], [listener])
    os.close(listener)


def _take_listener(sock: socket.socket) -> int:
    """The listener a child sent before its exec (the spawner's side); -1 if none came."""
    try:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1, socket.MSG_DONTWAIT)
    except OSError:
        return -1
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds[0] if fds else -1


def landlock_spec(ll: dict[str, Any]) -> landlock.LandlockSpec:
    """The LandlockSpec of a plan's "landlock" object; raises LandlockError if malformed."""

    def paths(key: str) -> tuple[str, ...]:
        v = ll.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise landlock.LandlockError([f"{key}: not a list of paths"])
        return tuple(v)

    def ports(key: str) -> tuple[int, ...] | None:
        v = ll.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, int) for x in v):
            raise landlock.LandlockError([f"{key}: not a list of ports"])
        return tuple(v)

    return landlock.LandlockSpec(
        read_exec=paths("read_exec"),
        read=paths("read"),
        write=paths("write"),
        connect_tcp=ports("connect_tcp"),
        bind_tcp=ports("bind_tcp"),
        scope_signals=ll.get("scope_signals") is not False,
        scope_abstract_unix=ll.get("scope_abstract_unix") is not False,
        deny=paths("deny"),
    )


def _switch_user(plan: dict[str, Any], root: bool, last_cap: int) -> str:
    """The user/caps block of the child (see agent.daemon.capabilities for the order).

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


def _other_user(plan: dict[str, Any] | None, root: bool) -> tuple[int, int] | None:
    """(uid, gid) of a job a non-root keeper runs as another user (an entry's user under
    the privileged unit, a dynamic one under the standard unit): it has no CAP_KILL, so a
    helper of that uid signals the job (Spawner.signal). None otherwise."""
    uid = None if plan is None or root else plan.get("uid")
    if uid is None or uid == os.geteuid():
        return None
    gid = plan.get("gid") if plan is not None else None
    return uid, uid if gid is None else gid


def _close_all_but(keep: set[int], lo: int) -> None:
    """Close every descriptor from ``lo`` up except ``keep``."""
    for fd in sorted(k for k in keep if k >= lo):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, os.sysconf("SC_OPEN_MAX"))


def _child(
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
    """Set up and exec the job in the forked child; never returns."""
    step = "setup"
    try:
        # Keep only what the job needs, moved above the numbers it will get:
        # the spawner's own descriptors (other jobs' pidfds, the socket) may
        # sit anywhere, even above the job's RLIMIT_NOFILE.
        # The prepared Landlock descriptors stay where they are: the ruleset's rules
        # name them by number (all close-on-exec, and above the job's numbers).
        ruleset_fds = set(confine.descriptors()) if confine is not None else set()
        if scratch_fd >= 0:
            ruleset_fds.add(scratch_fd)
        if notify_sock >= 0:
            ruleset_fds.add(notify_sock)
        keep = sorted({err_w, *fds.values()})
        _close_all_but({*keep, *ruleset_fds}, 0)
        moved = {k: fcntl.fcntl(v, fcntl.F_DUPFD_CLOEXEC, FIRST_FREE_FD) for k, v in fds.items()}
        err_w = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, FIRST_FREE_FD)
        for fd in keep:
            os.close(fd)
        step = "setsid"
        os.setsid()
        if "cgroup" in moved:
            step = "cgroup join"
            os.write(moved["cgroup"], b"0")
        for name, value in sorted(plan.get("limits", {}).items()):
            res, rname, extra = RLIMIT_RESOURCES[name]
            step = f"setrlimit {rname}"
            # prlimit, not setrlimit: setrlimit turns the kernel's EPERM into a
            # ValueError (reported as EINVAL); prlimit keeps the errno, which is
            # what check_limits predicts and the C path reports.
            resource.prlimit(0, res, (value, value + extra))
        os.umask(plan["umask"])
        step = "chdir"
        os.chdir(plan["cwd"])
        # --- user and capabilities ---
        step = "user switch"
        # (vspawn.spawn_args: a keeper holding capabilities drops them in every job.)
        if plan.get("uid") is not None or root or caps_mod.held()[0]:
            _switch_user(plan, root, last_cap)
        step = "signals"
        for sig in reset:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        step = "open /dev/null"
        opened = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        # Above the job's numbers too: dup2 onto itself would keep CLOEXEC.
        null = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, FIRST_FREE_FD)
        os.close(opened)
        step = "dup2"
        os.dup2(null, 0)
        os.dup2(moved["stdout"], 1)
        os.dup2(moved["stdout"], 2)
        top = 3
        if "script" in moved:
            os.dup2(moved["script"], 3)  # argv names /proc/self/fd/3
            top = 4
        program: int | str = plan.get("path", "")
        if "exec" in moved:
            # Not CLOEXEC: a #! program run by fexecve is handed to its
            # interpreter as /dev/fd/N, which must still be open then.
            os.dup2(moved["exec"], top)
            program = top
            top += 1
        step = "close descriptors"
        _close_all_but({err_w, *ruleset_fds}, top)
        # --- Landlock ---
        # Last before exec: everything the child opens itself is open, and the domain
        # (with no_new_privs) also binds whatever the job execs.
        if confine is not None:
            step = "landlock"
            confine.restrict(extra_write_dirs=[scratch_fd] if scratch_fd >= 0 else [])
        elif plan.get("no_new_privs", True) or filt is not None:
            step = "no_new_privs"
            caps_mod.no_new_privs()
        # --- seccomp ---
        # Last, after no_new_privs (required without CAP_SYS_ADMIN) and Landlock: from
        # here on the filter binds the child, and all it still does is exec.
        if filt is not None:
            step = "seccomp"
            listener = filt.install()
            if listener >= 0:
                _send_listener(notify_sock, listener)
        step = "execve"
        os.execve(program, plan["argv"], plan["env"])  # noqa: S606 - no shell, by design
    except landlock.LandlockStepError as e:
        step, code = f"landlock: {e.step}", e.errno or errno.EIO
    except caps_mod.CapError as e:
        step, code = e.step, e.errno or errno.EIO
    except OSError as e:
        code = e.errno or errno.EIO
    except BaseException:
        code = errno.EINVAL
    try:
        os.write(err_w, f"{step}\0{code}".encode())
    finally:
        os._exit(127)


class Starting:
    """A forked child whose exec is not yet known to have succeeded."""

    __slots__ = ("cg", "fd", "notify", "pid", "plan", "report", "rid", "scratch")

    def __init__(
        self,
        pid: int,
        rid: Any,
        fd: int,
        cg: cgroups.JobCgroup | None = None,
        scratch: str | None = None,
    ) -> None:
        self.pid, self.rid, self.fd, self.cg = pid, rid, fd, cg
        self.report = b""
        self.scratch = scratch
        self.notify: socket.socket | None = None  # where the child sends its listener
        self.plan: dict[str, Any] = {}


class Draining:
    """A reaped job whose cgroup still has processes (being killed)."""

    __slots__ = ("cg", "msg", "wd")

    def __init__(self, cg: cgroups.JobCgroup, msg: dict[str, Any], wd: int) -> None:
        self.cg, self.msg, self.wd = cg, msg, wd


class Spawner:
    """The spawner's state: its children (unreaped pids) and the control socket."""

    def __init__(
        self,
        sock: socket.socket | None,
        subtree: cgroups.Subtree | None = None,
        path: tuple[str, str, Any] = ("fork", "default", None),
    ) -> None:
        # The agent's channel (None: the job keeper, whose agent comes and goes).
        self.sock = sock
        # "vfork" (the C child of agent.daemon._vspawn) or "fork" (_child), and why.
        self.path, self.path_why, self._vspawn = path
        self.sel = selectors.DefaultSelector()
        if sock is not None:
            self.sel.register(sock, selectors.EVENT_READ, None)
        self.children: dict[int, int] = {}  # pid -> pidfd, until reaped
        self.subtree = subtree
        self.cgroups: dict[int, cgroups.JobCgroup] = {}  # pid -> its job's leaf, until reported
        self.draining: dict[int, Draining] = {}  # inotify wd -> job being emptied
        self.watcher: cgroups.EventWatcher | None = None
        self.privileged = _has_cap(CAP_SYS_RESOURCE)
        self.nr_open = _nr_open()
        self.reset_signals: list[int] = []
        self.running = True
        # --- confinement ---
        self.root = os.geteuid() == 0
        # Sets jobs up as root does (any user, the entry's capabilities): root, or a keeper
        # of another user with CAP_SETUID, CAP_SETGID and CAP_SETPCAP (the privileged unit).
        self.gives = self.root or caps_mod.gives_capabilities()
        self.last_cap = caps_mod.last_cap()
        self.rulesets: dict[str, landlock.Ruleset] = {}  # spec (JSON) -> prepared, per entry
        self.scratch: dict[int, str] = {}  # pid -> its scratch directory, removed at exit
        self.scratch_roots: dict[str, str] = {}  # scratch root -> its canonical path
        self.scratch_owners: dict[str, tuple[int, int]] = {}  # path -> job's (uid, gid)
        # --- seccomp ---
        self.filters: dict[str, seccomp.Filter] = {}  # spec (JSON) -> compiled, per entry
        self.guards: dict[int, seccomp.ListenGuard] = {}  # pid -> its listen() checks
        # pid -> (uid, gid) of a running job of another uid than a non-root keeper's (its
        # dynamic user): signalled through a helper of that uid (no CAP_KILL here).
        self.job_users: dict[int, tuple[int, int]] = {}
        # Hold every number below FIRST_FREE_FD: a prepared ruleset's descriptors must
        # never land where the child puts the job's own (0-4) with dup2.
        while (low := os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)) < FIRST_FREE_FD:
            pass
        os.close(low)

    def ruleset(self, ll: dict[str, Any], scratch: str | None) -> landlock.Ruleset:
        """The prepared ruleset of an entry's spec (and scratch root), built once; raises
        LandlockError or OSError.

        The scratch root is denied like the agent's own files: no rule of the entry may
        cover it (a grant of /tmp is hole-punched around /tmp/agent-scratch-UID), so a
        job can neither list it nor reach another job's directory below it, whatever
        that directory's modes (every job of an entry has the same uid). Each job's own
        directory is then granted by descriptor, in its child (make_scratch, _child).
        Done here rather than in the policy's deny list: this is the process that
        enforces, it alone knows the canonical root of every plan, and a plan from any
        caller gets it.
        """
        root = None
        if scratch:
            parent = os.path.dirname(scratch)
            root = self.scratch_roots.get(parent)
            if root is None:  # canonical, as the kernel will see it
                root = self.scratch_roots[parent] = os.path.realpath(parent)
        key = json.dumps([ll, root], sort_keys=True)
        prepared = self.rulesets.get(key)
        if prepared is None:
            spec = landlock_spec(ll)
            if root is not None:
                # A job's directory must never hold (or be) a path the entry denies.
                top = root.rstrip("/") + "/"
                for d in {*spec.deny, *map(os.path.realpath, spec.deny)}:
                    if (d.rstrip("/") + "/").startswith(top) or top.startswith(d.rstrip("/") + "/"):
                        raise landlock.LandlockError([f"scratch root {root}: overlaps {d}"])
                spec = dataclasses.replace(spec, deny=(*spec.deny, root))
            rules = landlock.plan_rules(spec)
            prepared = landlock.prepare(rules, spec, ll["abi"])
            if len(self.rulesets) >= LANDLOCK_CACHE:  # oldest first: entries of old policies
                self.rulesets.pop(next(iter(self.rulesets))).close()
            self.rulesets[key] = prepared
        return prepared

    def filter(self, sc: dict[str, Any]) -> seccomp.Filter:
        """The compiled filter of an entry's seccomp spec, built once; raises OSError."""
        key = json.dumps(sc, sort_keys=True)
        prepared = self.filters.get(key)
        if prepared is None:
            prepared = seccomp.prepare(seccomp_spec(sc))
            if len(self.filters) >= LANDLOCK_CACHE:  # oldest first: entries of old policies
                self.filters.pop(next(iter(self.filters)))
            self.filters[key] = prepared
        return prepared

    def remove_scratch(self, path: str | None) -> None:
        """Remove a job's scratch directory completely, whatever the job did to its modes
        (agent.daemon.scratch: one rmdir when it is empty). What cannot be removed is
        logged in one line and left."""
        if path is None:
            return
        owner = self.scratch_owners.pop(path, None)
        try:
            scratch_mod.remove(path, owner)
        except OSError as e:
            what = e.filename or path
            print(
                f"agent spawner: scratch directory {path} not removed: {what}: {e.strerror or e}",
                file=sys.stderr,
            )

    def make_scratch(self, plan: dict[str, Any]) -> tuple[str | None, int]:
        """Create the job's scratch directory, 0700 and owned by the job's user; returns it
        and an O_PATH descriptor of it (-1 without one) for the child's Landlock rule."""
        path: str | None = plan.get("scratch")
        if path is None:
            return None, -1
        os.mkdir(path, 0o700)  # never an existing one: it could be someone else's
        fd = -1
        try:
            # The directory just made, not whatever the path names later: the job's
            # read and write rule lands on this inode. Its parent, the scratch root, is
            # denied in every job's rules (ruleset()).
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            uid = plan.get("uid")
            if uid is not None and (self.root or uid != os.geteuid()):
                gid = plan.get("gid")
                gid = uid if gid is None else gid
                try:
                    os.chown(path, uid, gid, follow_symlinks=False)
                except PermissionError:
                    if self.root:
                        raise
                    # A keeper without CAP_CHOWN (the standard unit: its exposure stays
                    # at 2.0): the directory stays the keeper's, 0700, and an access ACL
                    # gives the job's uid, and only it besides the keeper, all rights.
                    os.setxattr(
                        path, "system.posix_acl_access", _acl_for(uid), follow_symlinks=False
                    )
                # Whose files will be in it: remove_scratch may need to act as that user.
                self.scratch_owners[path] = (uid, gid)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.rmdir(path)
            raise
        return path, fd

    def setup_signals(self) -> None:
        """Survive the terminal's and the service manager's signals; note what the child resets."""
        # The agent decides when the spawner ends (closing the socket): a
        # Ctrl-C or systemd's SIGTERM to the whole group must not take the
        # spawner away while the agent stops its jobs.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for sig in signal.valid_signals():
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                if signal.getsignal(sig) != signal.SIG_DFL:
                    self.reset_signals.append(sig)
            except (OSError, ValueError):
                continue

    def send(self, msg: dict[str, Any]) -> None:
        if self.sock is None:
            return
        try:
            proto.send(self.sock, msg)
        except OSError:
            self.running = False  # the agent is gone

    def serve(self) -> None:
        """Run until the agent closes the socket or says exit."""
        while self.running:
            asked = False
            for key, _ in self.sel.select():
                if key.data is None:
                    asked = True
                else:
                    self.dispatch(key.data)
                if not self.running:
                    break
            # One request per turn, after every exit that is ready: a job that
            # ended is reported before the next start, not behind a queue of
            # them (each start holds this loop while its child sets up and
            # execs, so under load exits waited many milliseconds, and
            # original-protocol clients polled for them meanwhile).
            if asked and self.running:
                self.on_socket()

    def dispatch(self, what: Any) -> None:
        """Handle one ready descriptor of a job (its pidfd, start report, listen() checks)
        or the cgroup watcher.

        A bug in one of these must not take the spawner down: its death kills every
        running job. It is logged with its traceback (the agent's log) and the loop
        goes on.
        """
        try:
            if what is self.watcher:
                self.on_cgroup_events()
            elif isinstance(what, Starting):
                self.on_started(what)
            elif isinstance(what, seccomp.ListenGuard):
                what.handle()
            else:
                self.on_exit(what)
        except Exception:
            import traceback

            print(
                f"agent spawner: internal error handling {what!r}:\n{traceback.format_exc()}",
                file=sys.stderr,
            )

    def on_socket(self) -> None:
        """Take one request from the agent (the socket stays readable for the rest)."""
        assert self.sock is not None
        try:
            data, fds = proto.recv(self.sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except proto.ProtocolError as e:
            print(f"agent spawner: bad message: {e}", file=sys.stderr)
            return
        except OSError:
            self.running = False
            return
        if not data:
            self.running = False  # end of file: the agent closed or died
            return
        try:
            msg, byrole = proto.decode(data, fds)
        except proto.ProtocolError as e:
            print(f"agent spawner: bad message: {e}", file=sys.stderr)
            return
        op = msg["op"]
        try:
            if op == "spawn":
                self.spawn(msg, byrole)
            elif op == "signal":
                self.signal(msg)
            elif op == "exit":
                self.running = False
        except Exception:
            # As in dispatch(): logged, and the start (if it was one) answered as failed,
            # so the agent never waits for it.
            import traceback

            print(
                f"agent spawner: internal error in {op}:\n{traceback.format_exc()}", file=sys.stderr
            )
            if op == "spawn":
                error = "internal error in the job spawner (see the agent's log)"
                self.send(
                    {"op": "spawned", "id": msg.get("id"), "error": error, "errno": errno.EIO}
                )
        for fd in byrole.values():
            with contextlib.suppress(OSError):  # spawn() may have closed them already
                os.close(fd)

    def spawn(self, msg: dict[str, Any], fds: dict[str, int]) -> None:
        rid, plan = msg.get("id"), msg.get("plan")
        err = check_plan(plan, fds)  # the one schema (agent.daemon.spawnplan)
        if not err:
            assert isinstance(plan, dict)
            err = check_limits(
                plan.get("limits", {}), privileged=self.privileged, nr_open=self.nr_open
            )
        if not err and isinstance(plan, dict) and plan.get("capabilities") and not self.gives:
            err = "capabilities: the job spawner does not run as root"
        if err or not isinstance(plan, dict):
            self.send({"op": "spawned", "id": rid, "error": err, "errno": errno.EINVAL})
            return
        cg: cgroups.JobCgroup | None = None
        if plan.get("cgroup") is not None:
            try:
                cg = self.create_cgroup(plan["cgroup"])
                # Opened before the fork: the child's first act is the join.
                fds["cgroup"] = cg.procs_fd()
            except (cgroups.CgroupError, ValueError) as e:
                if cg is not None:
                    self.remove_cgroup(cg)
                self.send({"op": "spawned", "id": rid, "error": str(e), "errno": errno.EIO})
                return
        # --- confinement: ruleset and scratch, before the fork ---
        confine: landlock.Ruleset | None = None
        filt: seccomp.Filter | None = None
        scratch: str | None = None
        scratch_fd = -1
        try:
            if plan.get("landlock") is not None:
                step = "landlock"
                confine = self.ruleset(plan["landlock"], plan.get("scratch"))
            if plan.get("seccomp") is not None:
                step = "seccomp"
                filt = self.filter(plan["seccomp"])
            step = "scratch directory"
            scratch, scratch_fd = self.make_scratch(plan)
        except (landlock.LandlockError, OSError) as e:
            code = getattr(e, "errno", None) or errno.EPERM
            text = f"{step}: {e}" if isinstance(e, landlock.LandlockError) else None
            if cg is not None:
                self.remove_cgroup(cg)
            self.send(
                {
                    "op": "spawned",
                    "id": rid,
                    "error": text or proto.error_text(step, code),
                    "errno": code,
                }
            )
            return
        # A job whose listen() calls the spawner checks: its filter's listener comes back
        # over this pair (see seccomp.ListenGuard), sent by the child before its exec.
        notify: tuple[socket.socket, socket.socket] | None = None
        if filt is not None and filt.listen_guard:
            notify = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        if self._vspawn is not None:
            self.spawn_vfork(rid, plan, fds, cg, confine, scratch, scratch_fd, filt, notify)
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as e:
            if notify is not None:
                notify[0].close()
                notify[1].close()
            self.remove_scratch(scratch)
            if scratch_fd >= 0:
                os.close(scratch_fd)
            os.close(r)
            os.close(w)
            code = e.errno or errno.EIO
            if cg is not None:
                self.remove_cgroup(cg)
            self.send(
                {"op": "spawned", "id": rid, "error": proto.error_text("fork", code), "errno": code}
            )
            return
        if pid == 0:
            _child(
                plan,
                fds,
                w,
                self.reset_signals,
                confine,
                self.gives,
                self.last_cap,
                scratch_fd,
                filt,
                notify[1].fileno() if notify is not None else -1,
            )
        os.close(w)
        st = Starting(pid, rid, r, cg, scratch)
        st.plan = plan  # started(): its listen() checks, and its user for signals
        if notify is not None:
            notify[1].close()
            st.notify = notify[0]
        if scratch_fd >= 0:
            os.close(scratch_fd)
        for fd in fds.values():
            os.close(fd)
        fds.clear()
        # Not waited for here: the answer goes out when the error pipe reaches
        # end of file (exec done) or carries a report, so the next job can be
        # forked while this one is still setting up.
        self.sel.register(r, selectors.EVENT_READ, st)

    def spawn_vfork(
        self,
        rid: Any,
        plan: dict[str, Any],
        fds: dict[str, int],
        cg: cgroups.JobCgroup | None,
        confine: landlock.Ruleset | None,
        scratch: str | None,
        scratch_fd: int,
        filt: seccomp.Filter | None = None,
        notify: tuple[socket.socket, socket.socket] | None = None,
    ) -> None:
        """The C path: the spawner sleeps until the child has exec'd or failed, so the
        answer goes out at once (no error pipe, no Starting)."""
        listener = -1
        try:
            pid, error, code = vspawn.spawn(
                self._vspawn,
                plan,
                fds,
                self.reset_signals,
                confine,
                self.gives,
                self.last_cap,
                scratch_fd,
                RLIMIT_RESOURCES,
                filt,
                notify[1].fileno() if notify is not None else -1,
            )
            if notify is not None and not error:
                listener = _take_listener(notify[0])
        except OSError as e:
            pid, code = 0, e.errno or errno.EIO
            error = proto.error_text("fork", code)
        except (ValueError, TypeError, OverflowError) as e:
            # Arrays the extension refuses (none a checked plan makes): no child, and
            # the spawner carries on.
            pid, code = 0, errno.EINVAL
            error = f"setup: {e}"
        finally:
            if scratch_fd >= 0:
                os.close(scratch_fd)
            for fd in fds.values():
                os.close(fd)
            fds.clear()
            if notify is not None:
                notify[0].close()
                notify[1].close()
        if error:
            self.start_failed(pid, rid, cg, scratch, error, code)
            return
        self.started(pid, rid, cg, scratch, listener, plan)

    def start_failed(
        self,
        pid: int,
        rid: Any,
        cg: cgroups.JobCgroup | None,
        scratch: str | None,
        error: str,
        code: int,
    ) -> None:
        """A child that could not exec (or none at all, pid 0): reap it, undo its box, say why."""
        if pid:
            os.waitpid(pid, 0)  # it has exited 127
        if cg is not None:
            self.remove_cgroup(cg)
        self.remove_scratch(scratch)
        self.send({"op": "spawned", "id": rid, "error": error, "errno": code})

    def started(
        self,
        pid: int,
        rid: Any,
        cg: cgroups.JobCgroup | None,
        scratch: str | None,
        listener: int = -1,
        plan: dict[str, Any] | None = None,
    ) -> None:
        """The job's program runs: watch its pidfd (and its listen() checks) and answer
        with the pid."""
        if listener >= 0 and plan is not None:
            who = plan.get("uid"), plan.get("gid"), plan.get("capabilities", [])
            guard = self.guards[pid] = seccomp.ListenGuard(listener, *who)
            self.sel.register(listener, selectors.EVENT_READ, guard)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = pidfd
        user = _other_user(plan, self.root)
        if user is not None:
            self.job_users[pid] = user
        if cg is not None:
            self.cgroups[pid] = cg
        if scratch is not None:
            self.scratch[pid] = scratch
        self.sel.register(pidfd, selectors.EVENT_READ, pid)
        self.send({"op": "spawned", "id": rid, "pid": pid})

    def create_cgroup(self, req: dict[str, Any]) -> cgroups.JobCgroup:
        """The job's leaf with its limits; raises CgroupError (MissingController) or ValueError."""
        if self.subtree is None:
            raise cgroups.CgroupError("the agent has no cgroup subtree for jobs")
        limits = cgroups.Limits(**{k: req[k] for k in CGROUP_REQUEST_KEYS if k in req})
        return self.subtree.create(req["id"], limits)

    def remove_cgroup(self, cg: cgroups.JobCgroup) -> None:
        try:
            cg.kill()
            cg.remove()
        except cgroups.CgroupError as e:
            # Left for the agent's next start (it kills and removes leftovers).
            print(f"agent spawner: {e}", file=sys.stderr)

    def on_started(self, st: Starting) -> None:
        try:
            chunk = os.read(st.fd, 512)
        except InterruptedError:
            return
        if chunk:
            st.report += chunk
            return
        self.sel.unregister(st.fd)
        os.close(st.fd)
        listener = -1
        if st.notify is not None:
            listener = -1 if st.report else _take_listener(st.notify)
            st.notify.close()
        if st.report:
            step, _, number = st.report.decode("utf-8", "replace").partition("\0")
            try:
                num = int(number)
            except ValueError:
                num = errno.EIO
            self.start_failed(st.pid, st.rid, st.cg, st.scratch, proto.error_text(step, num), num)
            return
        self.started(st.pid, st.rid, st.cg, st.scratch, listener, st.plan)

    def signal(self, msg: dict[str, Any]) -> None:
        pid, sig = msg.get("pid"), msg.get("sig")
        # Only a child not yet reaped: its pid (the group id) is still ours.
        if (
            not isinstance(pid, int)
            or pid <= 1
            or pid not in self.children
            or not isinstance(sig, int)
        ):
            return
        cg = self.cgroups.get(pid)
        user = self.job_users.get(pid)
        if user is not None and not self.root:
            # A job of its own uid: this keeper has no CAP_KILL (and is not given it), so
            # a helper of the job's uid signals, as the job itself could. SIGKILL with a
            # cgroup needs none: cgroup.kill is the keeper's file.
            if sig == signal.SIGKILL and cg is not None:
                self._kill_leaf(cg)
                return
            uids.signal_as(*user, sig, pid, None if cg is None else cg.pids)
            return
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
        if cg is None:
            return
        if sig == signal.SIGKILL:
            self._kill_leaf(cg)
            return
        signal_leaf(cg, sig)

    def _kill_leaf(self, cg: cgroups.JobCgroup) -> None:
        try:
            cg.kill()
        except cgroups.CgroupError as e:
            print(f"agent spawner: {e}", file=sys.stderr)

    def on_exit(self, pid: int) -> None:
        # The leader is a zombie: its group id cannot have been reused yet,
        # so this is the last safe moment to kill what the job left behind.
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        _, status, ru = os.wait4(pid, 0)
        ended = time.time()  # the job's own end, whenever the agent gets to hear of it
        pidfd = self.children.pop(pid)
        self.job_users.pop(pid, None)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        guard = self.guards.pop(pid, None)
        if guard is not None:
            # What is left of the job is killed next; a listen() of it meanwhile fails.
            self.sel.unregister(guard.fd)
            guard.close()
        if pid not in self.cgroups:
            # Without a cgroup the group kill above is all there is; with one, the scratch
            # goes once the leaf is empty (cgroup_done): a process that left the job's
            # group could otherwise still be writing into it while it is removed.
            self.remove_scratch(self.scratch.pop(pid, None))
        code = os.waitstatus_to_exitcode(status)
        msg: dict[str, Any] = {
            "op": "exited",
            "pid": pid,
            "code": code if code >= 0 else None,
            "signal": -code if code < 0 else None,
            "utime": ru.ru_utime,
            "stime": ru.ru_stime,
            # Never ru_maxrss: a forked child keeps the spawner's high-water
            # mark across exec. The job's own peak comes from its cgroup.
            "maxrss": 0,
            "oom": 0,
            "ended": ended,
        }
        cg = self.cgroups.get(pid)
        if cg is None:
            self.send(msg)
            return
        # The usual case: nothing of the job is left (the zombie leader does
        # not count), so no kill and no watch are needed.
        if not cg.populated():
            self.cgroup_done(pid, cg, msg)
            return
        # The whole job ends with its leader: processes that left its session
        # or process group are still in its cgroup.
        try:
            cg.kill()
            wd = self.watch(cg)
        except cgroups.CgroupError as e:
            print(f"agent spawner: {e}", file=sys.stderr)
            self.cgroup_done(pid, cg, msg)
            return
        # Watch first, then look: an emptying before the watch is not missed.
        if wd is None or not cg.populated():
            if wd is not None:
                self.unwatch(wd)
            self.cgroup_done(pid, cg, msg)
            return
        self.draining[wd] = Draining(cg, msg, wd)

    def watch(self, cg: cgroups.JobCgroup) -> int | None:
        """Watch the leaf's cgroup.events; None when inotify cannot be had."""
        if self.watcher is None:
            try:
                self.watcher = cgroups.EventWatcher()
            except cgroups.CgroupError as e:
                print(f"agent spawner: {e}; killing jobs synchronously", file=sys.stderr)
                cg.kill_by_signal()
                return None
            self.sel.register(self.watcher.fileno(), selectors.EVENT_READ, self.watcher)
        return self.watcher.watch(cg)

    def unwatch(self, wd: int) -> None:
        if self.watcher is not None:
            self.watcher.unwatch(wd)

    def on_cgroup_events(self) -> None:
        assert self.watcher is not None
        self.leaves_fired(self.watcher.drain())

    def leaves_fired(self, fired: list[int]) -> None:
        """The leaves whose cgroup.events changed (inotify watch descriptors)."""
        # A watch the kernel dropped (the leaf vanished) shows up as nothing:
        # check every draining leaf that fired, and any whose file is gone.
        for wd in list(self.draining):
            d = self.draining[wd]
            if (wd in fired or not d.cg.events_path.exists()) and not d.cg.populated():
                del self.draining[wd]
                self.unwatch(wd)
                self.cgroup_done(d.msg["pid"], d.cg, d.msg)

    def cgroup_done(self, pid: int, cg: cgroups.JobCgroup, msg: dict[str, Any]) -> None:
        """The leaf is empty: account from it, remove it and the scratch, report the exit."""
        self.cgroups.pop(pid, None)
        self.remove_scratch(self.scratch.pop(pid, None))
        try:
            stats = cg.stats(memory=self.subtree is None or "memory" in self.subtree.controllers)
        except cgroups.CgroupError as e:
            print(f"agent spawner: {e}", file=sys.stderr)
        else:
            # cpu.stat covers every process the job ever had, not only the
            # ones wait4 saw; but without the cpu controller its user/system
            # split is tick-sampled and can fall short of wait4's exact
            # figure for the processes it did see: take the larger of each.
            msg["utime"] = max(msg["utime"], stats.cpu_user_seconds)
            msg["stime"] = max(msg["stime"], stats.cpu_system_seconds)
            msg["maxrss"] = stats.memory_peak_bytes or 0
            msg["oom"] = (stats.oom_kills or 0) + (stats.oom_group_kills or 0)
        try:
            cg.remove()
        except cgroups.CgroupError as e:
            print(f"agent spawner: {e}", file=sys.stderr)
        self.send(msg)


_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_NO_ID = 0xFFFFFFFF


def _acl_for(uid: int) -> bytes:
    """The binary system.posix_acl_access of a directory for its owner and ``uid`` (rwx
    each), nobody else: user::rwx, user:UID:rwx, group::---, mask::rwx, other::---."""
    entries = [
        (_ACL_USER_OBJ, 7, _ACL_NO_ID),
        (_ACL_USER, 7, uid),
        (_ACL_GROUP_OBJ, 0, _ACL_NO_ID),
        (_ACL_MASK, 7, _ACL_NO_ID),
        (_ACL_OTHER, 0, _ACL_NO_ID),
    ]
    return struct.pack("=I", _ACL_VERSION) + b"".join(struct.pack("=HHI", *e) for e in entries)


def signal_leaf(cg: cgroups.JobCgroup, sig: int) -> None:
    """Send ``sig`` to every process in the leaf, never to a pid reused meanwhile.

    Each pid is pinned with a pidfd first and signalled only if it is still in
    the leaf after that (a process cannot leave the leaf for a pid's new owner).
    """
    pinned: dict[int, int] = {}
    try:
        for pid in cg.pids():
            try:
                pinned[pid] = os.pidfd_open(pid)
            except OSError:
                continue
        still = set(cg.pids())
        for pid, pidfd in pinned.items():
            if pid in still:
                try:
                    signal.pidfd_send_signal(pidfd, sig)
                except OSError:
                    pass
    finally:
        for pidfd in pinned.values():
            os.close(pidfd)


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the agent died before the prctl
        os._exit(0)


def main(argv: list[str]) -> int:
    """``python -m agent.daemon.spawner FD PARENT_PID [CGROUP_JOBS_DIR CONTROLLERS]``.

    CONTROLLERS is a comma-separated list (may be empty) of the controllers
    enabled for job cgroups in CGROUP_JOBS_DIR.
    """
    if len(argv) not in (2, 4):
        print(
            "usage: python -m agent.daemon.spawner FD PARENT_PID [CGROUP_JOBS_DIR CONTROLLERS]",
            file=sys.stderr,
        )
        return 2
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    subtree = None
    if len(argv) == 4:
        from pathlib import Path

        subtree = cgroups.Subtree(Path(argv[2]), frozenset(c for c in argv[3].split(",") if c))
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    try:
        path = vspawn.choose(os.environ)
    except RuntimeError as e:
        print(f"agent spawner: {e}", file=sys.stderr)
        return 2
    sp = Spawner(sock, subtree, path)
    sp.setup_signals()
    # First message: which spawn path this spawner uses (the agent logs it).
    sp.send({"op": "hello", "spawn": sp.path, "why": sp.path_why})
    # Fewer copy-on-write faults in each forked child: the collector never
    # walks (and so never dirties) the spawner's long-lived objects.
    gc.freeze()
    sp.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
