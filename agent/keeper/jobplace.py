"""A job's place, made by the spawner before the fork and undone after the job.

What a checked plan asks for besides the process itself: the job's cgroup leaf with its
limits (its ``cgroup.procs`` opened, for the child's first act), the prepared Landlock
ruleset and seccomp filter of its entry (built once per distinct spec and kept), the
socket pair its listen() checks come back over, and its scratch directory (0700, the
job's user's, or the keeper's with an access ACL for a dynamic uid). See
:mod:`agent.keeper.spawner` for why the spawner, not the agent, does all this.

Standard library only besides the spawner's own modules: the spawner never imports grpc.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import struct
import sys
from typing import Any

from agent.keeper import cgroups, landlock, seccomp
from agent.keeper import scratch as scratch_mod
from agent.keeper import spawnproto as proto
from agent.keeper.spawnplan import CGROUP_REQUEST_KEYS

# Prepared Landlock rulesets kept (one per distinct entry spec; a reload adds new ones).
LANDLOCK_CACHE = 64


class PlaceError(Exception):
    """The place could not be made (what was made of it is undone): the start's answer."""

    def __init__(self, text: str, code: int) -> None:
        super().__init__(text)
        self.text, self.code = text, code


@dataclasses.dataclass
class Place:
    """What the spawner made for one job before its fork."""

    cg: cgroups.JobCgroup | None = None
    confine: landlock.Ruleset | None = None
    filt: seccomp.Filter | None = None
    scratch: str | None = None
    scratch_fd: int = -1  # O_PATH, for the child's Landlock rule; the spawner's until the fork
    # A job whose listen() calls the spawner checks: its filter's listener comes back over
    # this pair (see seccomp.ListenGuard), sent by the child before its exec.
    notify: tuple[socket.socket, socket.socket] | None = None

    def child_notify_fd(self) -> int:
        """The child's end of the listener pair (-1 without one)."""
        return self.notify[1].fileno() if self.notify is not None else -1

    def close_descriptors(self, *, keep_notify: bool = False) -> socket.socket | None:
        """After the fork: close what only the child needed; returns the spawner's end of
        the listener pair when ``keep_notify`` (None without one, or when closed)."""
        if self.scratch_fd >= 0:
            os.close(self.scratch_fd)
            self.scratch_fd = -1
        ours = None
        if self.notify is not None:
            self.notify[1].close()
            if keep_notify:
                ours = self.notify[0]
            else:
                self.notify[0].close()
            self.notify = None
        return ours


def seccomp_spec(sc: dict[str, Any]) -> seccomp.SeccompSpec:
    """The SeccompSpec of a plan's (checked) "seccomp" object."""
    return seccomp.SeccompSpec(udp=sc["udp"], allow=tuple(sorted(sc["allow"])), listen=sc["listen"])


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


_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_NO_ID = 0xFFFFFFFF


def acl_for(uid: int) -> bytes:
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


def _log(text: str) -> None:
    print(f"agent spawner: {text}", file=sys.stderr)


class JobPlaces:
    """Makes and removes jobs' places; keeps the prepared rulesets and filters."""

    def __init__(self, subtree: cgroups.Subtree | None, root: bool) -> None:
        self.subtree = subtree
        self.root = root  # the spawner runs as root
        self.rulesets: dict[str, landlock.Ruleset] = {}  # spec (JSON) -> prepared, per entry
        self.filters: dict[str, seccomp.Filter] = {}  # spec (JSON) -> compiled, per entry
        self.scratch_roots: dict[str, str] = {}  # scratch root -> its canonical path
        self.scratch_owners: dict[str, tuple[int, int]] = {}  # path -> job's (uid, gid)

    def prepare(self, plan: dict[str, Any], fds: dict[str, int]) -> Place:
        """The place of a checked plan; adds the leaf's ``cgroup.procs`` to ``fds`` as
        "cgroup". Raises PlaceError, having undone what it made."""
        place = Place(cg=self.cgroup(plan, fds))
        step = "landlock"
        try:
            if plan.get("landlock") is not None:
                place.confine = self.ruleset(plan["landlock"], plan.get("scratch"))
            if plan.get("seccomp") is not None:
                step = "seccomp"
                place.filt = self.filter(plan["seccomp"])
            step = "scratch directory"
            place.scratch, place.scratch_fd = self.make_scratch(plan)
            if place.filt is not None and place.filt.listen_guard:
                step = "listen() checks"
                place.notify = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        except (landlock.LandlockError, OSError) as e:
            # Out of descriptors (EMFILE) among others: undo all that was made, so a
            # refused start leaves no leaf, directory or descriptor behind.
            code = getattr(e, "errno", None) or errno.EPERM
            text = f"{step}: {e}" if isinstance(e, landlock.LandlockError) else None
            place.close_descriptors()
            self.release(place.cg, place.scratch)
            raise PlaceError(text or proto.error_text(step, code), code) from e
        return place

    def cgroup(self, plan: dict[str, Any], fds: dict[str, int]) -> cgroups.JobCgroup | None:
        """The job's leaf, its cgroup.procs opened into ``fds`` (None: no cgroup asked)."""
        if plan.get("cgroup") is None:
            return None
        cg: cgroups.JobCgroup | None = None
        try:
            cg = self.create_cgroup(plan["cgroup"])
            # Opened before the fork: the child's first act is the join.
            fds["cgroup"] = cg.procs_fd()
        except (cgroups.CgroupError, ValueError) as e:
            if cg is not None:
                self.remove_cgroup(cg)
            # Out of descriptors or memory while the leaf is made or opened is the keeper's
            # own condition (RESOURCE_EXHAUSTED at the agent), not the job's start failure.
            failed = e.errno if isinstance(e, cgroups.CgroupError) else None
            code = failed if failed in (errno.EMFILE, errno.ENFILE, errno.ENOMEM) else errno.EIO
            raise PlaceError(str(e), code) from e
        return cg

    def release(self, cg: cgroups.JobCgroup | None, scratch: str | None) -> None:
        """Undo the place of a job that never ran (its child could not exec)."""
        if cg is not None:
            self.remove_cgroup(cg)
        self.remove_scratch(scratch)

    def ruleset(self, ll: dict[str, Any], scratch: str | None) -> landlock.Ruleset:
        """The prepared ruleset of an entry's spec (and scratch root), built once; raises
        LandlockError or OSError.

        The scratch root is denied like the agent's own files: no rule of the entry may
        cover it (a grant of /tmp is hole-punched around /tmp/agent-scratch-UID), so a
        job can neither list it nor reach another job's directory below it, whatever
        that directory's modes (every job of an entry has the same uid). Each job's own
        directory is then granted by descriptor, in its child (make_scratch,
        childsetup). Done here rather than in the policy's deny list: this is the
        process that enforces, it alone knows the canonical root of every plan, and a
        plan from any caller gets it.
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
                self._give_scratch(path, uid, uid if gid is None else gid)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.rmdir(path)
            raise
        return path, fd

    def _give_scratch(self, path: str, uid: int, gid: int) -> None:
        """Make the new scratch directory the job's user's (or open it to that user)."""
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except PermissionError:
            if self.root:
                raise
            # A keeper without CAP_CHOWN (the standard unit: its exposure stays at 2.0):
            # the directory stays the keeper's, 0700, and an access ACL gives the job's
            # uid, and only it besides the keeper, all rights.
            os.setxattr(path, "system.posix_acl_access", acl_for(uid), follow_symlinks=False)
        # Whose files will be in it: remove_scratch may need to act as that user.
        self.scratch_owners[path] = (uid, gid)

    def remove_scratch(self, path: str | None) -> None:
        """Remove a job's scratch directory completely, whatever the job did to its modes
        (agent.keeper.scratch: one rmdir when it is empty). What cannot be removed is
        logged in one line and left."""
        if path is None:
            return
        owner = self.scratch_owners.pop(path, None)
        try:
            scratch_mod.remove(path, owner)
        except OSError as e:
            what = e.filename or path
            _log(f"scratch directory {path} not removed: {what}: {e.strerror or e}")

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
            _log(str(e))
