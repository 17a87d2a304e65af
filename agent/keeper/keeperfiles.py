"""What the job keeper leaves for the keeper after it: each running job's ``.keeper``
file, its pipe in systemd's descriptor store, and the ends the agent has not recorded.

Beside each running job's output file (``<output_dir>/<job id>.keeper``), while it runs
in a cgroup: what a keeper that adopts it after this one's death needs (its deadline,
cap, grace, record). The output directory is out of every job's reach (Landlock), so a
job cannot forge its own deadline or record. Where the keeper is a service whose unit
keeps a descriptor store, each job's pipe (read end) is there too, named by the job id,
so the next keeper reads on. A keeper that stops cleanly with ends the agent has not
recorded leaves them in the ended file for the next keeper's hello.

:func:`parse_job_file` and :func:`parse_ends` are pure (bytes in, data or ValueError out).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from agent.keeper.keeperlog import log, notify_address
from agent.keeper.keptjobs import JOB_ID

if TYPE_CHECKING:
    from agent.keeper.keeperconn import AgentLink
    from agent.keeper.keptjobs import KeptJob

JOB_FILE = ".keeper"
JOB_FILE_MAX = 2 << 20  # bytes (a record is at most RECORD_MAX)
ENDED_FILE_MAX = 64 << 20  # bytes: the ends a stopped keeper leaves for the next


def parse_job_file(data: bytes) -> dict[str, Any]:
    """A .keeper file's content, checked (ValueError, KeyError, TypeError or
    AttributeError when it is not one)."""
    got = json.loads(data)
    run = got["run"]
    for key in ("timeout", "cpu_seconds", "memory_max", "cap"):
        if not isinstance(run.get(key) or 0, int):
            raise ValueError(f"run.{key}")
    float(run["grace"])
    if got.get("deadline") is not None:
        float(got["deadline"])
    if not isinstance(got.get("record"), dict) or not isinstance(got.get("pid"), int):
        raise ValueError("record or pid")
    return dict(got)


def parse_ends(data: str | bytes) -> dict[str, dict[str, Any]]:
    """The ends an ended file holds, by job id (ValueError when it is not one)."""
    got = json.loads(data)
    if not isinstance(got, list):
        raise ValueError("not a list")
    for msg in got:
        ok = isinstance(msg, dict) and msg.get("op") == "finished"
        if not ok or not isinstance(msg.get("job"), str) or not JOB_ID.match(msg["job"]):
            raise ValueError(f"not an end record: {str(msg)[:80]}")
    return {msg["job"]: msg for msg in got}


def save_ends(path: str, ended: dict[str, dict[str, Any]]) -> None:
    """At exit: the ends the agent has not recorded, for the next keeper's hello."""
    if not path or not ended:
        return
    tmp = f"{path}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(list(ended.values()), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        log(f"cannot keep {len(ended)} unrecorded end(s) in {path}: {e}")
        return
    log(f"kept {len(ended)} end(s) the agent has not recorded in {path}")


def load_ends(path: str) -> dict[str, dict[str, Any]]:
    """At start: the ends a previous keeper left (handed to the agent in the hello,
    forgotten once it acknowledges them; a bad file is said and set aside)."""
    if not path:
        return {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return {}
    except OSError as e:
        log(f"cannot read {path}: {e}")
        return {}
    got: dict[str, dict[str, Any]] = {}
    try:
        with os.fdopen(fd) as f:
            got = parse_ends(f.read(ENDED_FILE_MAX))
        os.unlink(path)
    except (OSError, ValueError) as e:
        log(f"{path}: {e}; set aside as {path}.bad")
        with contextlib.suppress(OSError):
            os.replace(path, f"{path}.bad")
        return got
    log(f"{len(got)} end(s) a previous keeper kept, for the agent to record")
    return got


def listen_fds() -> dict[str, int]:
    """The descriptors systemd passed this process (sd_listen_fds(3)), by name: the pipes
    of the jobs a dead keeper left, from the unit's descriptor store. Taken out of the
    environment (a re-exec must not take them again) and closed on exec (never a job's)."""
    env = os.environ
    names = env.pop("LISTEN_FDNAMES", "").split(":")
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    got: dict[str, int] = {}
    for i in range(min(int(count), 65536)):
        fd = 3 + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        name = names[i] if i < len(names) else ""
        if not JOB_ID.match(name) or name in got:
            log(f"descriptor store: an unexpected descriptor {name[:60]!r}; closed")
            os.close(fd)
            continue
        got[name] = fd
    return got


def stored_fds(arg: str) -> dict[str, int]:
    """``--stored JOB=FD,...``: the pipes the agent kept for this keeper (its child), by job
    id; like :func:`listen_fds`, closed on exec, and a malformed item is said and left."""
    got: dict[str, int] = {}
    for item in arg.split(",") if arg else []:
        name, _, fd = item.partition("=")
        if not JOB_ID.match(name) or not fd.isdigit() or int(fd) < 3 or name in got:
            log(f"descriptor store: an unexpected item {item[:60]!r}; ignored")
            continue
        try:
            os.set_inheritable(int(fd), False)
        except OSError:
            continue
        got[name] = int(fd)
    return got


class JobFiles:
    """Each running job's .keeper file in ``output_dir`` and its pipe in systemd's
    descriptor store (``fdstore``: the unit keeps one, see :meth:`push`)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.fdstore = False
        # The store is the agent whose child this keeper is (agent.daemon.pipestore), not
        # a service manager: an agent that asks for "pipe-with-start" gets each job's pipe
        # with its start's answer, and drops it at the job's "finished" (pipes_told).
        self.agent_store = False
        self.notify_sock: socket.socket | None = None
        self.store_failing = False  # the last write to the store failed (said once)

    def path(self, job_id: str) -> str:
        return os.path.join(self.output_dir, job_id + JOB_FILE)

    def write(self, job: KeptJob, uid: int | None, user: tuple[int, int] | None) -> None:
        """What a keeper that adopts this job after our death needs: one small file per
        job in a cgroup, written once (no fsync: it must outlive this process, not the
        machine, and the cgroup does not outlive a reboot either)."""
        timeout = job.life.timeout_seconds
        data = {
            "pid": job.pid,
            # Its dynamic uid: a keeper that adopts the job holds it until the job ends,
            # so that no other job is given the uid meanwhile.
            "uid": uid,
            # (uid, gid) of a job of another user than this keeper, not root (the
            # privileged unit's entries' users): who signals it after an adoption.
            "user": user,
            "deadline": time.time() + timeout if timeout else None,
            "run": job.run,
            "record": job.record,
        }
        try:
            fd = os.open(
                self.path(job.id),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                os.write(fd, json.dumps(data, separators=(",", ":")).encode())
            finally:
                os.close(fd)
        except (OSError, TypeError, ValueError) as e:
            log(
                f"job {job.id}: cannot write its {JOB_FILE} file (a keeper that adopts it "
                f"will not know its timeout): {e}"
            )

    def forget(self, job: KeptJob, *, dropped: bool = False) -> None:
        """A finished job's file goes, and its pipe out of the store (``dropped``: the
        agent drops it itself at the "finished" it was just told)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path(job.id))
        if job.stored:
            job.stored = False
            if not dropped:
                self.unstore(job.id)

    def pipes_told(self, link: AgentLink) -> bool:
        """Whether the attached agent is this keeper's store and takes the pipes in the
        messages (the "pipe-with-start" feature): then no datagram goes for them."""
        return (
            self.fdstore
            and self.agent_store
            and link.sock is not None
            and not link.deaf
            and "pipe-with-start" in link.features
        )

    def read(self, job_id: str) -> dict[str, Any] | None:
        """The .keeper file of ``job_id`` (None: missing or not one; said)."""
        try:
            # The output folder is out of every job's reach (Landlock); O_NOFOLLOW and the
            # checks below still hold if that ever changes: a link or a file that is not
            # ours gives no deadline, cap or record, it is said and ignored.
            fd = os.open(self.path(job_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            log(f"job {job_id}: cannot read its {JOB_FILE} file: {e}")
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                return parse_job_file(f.read(JOB_FILE_MAX))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log(f"job {job_id}: its {JOB_FILE} file is not one ({e}); ignored")
            return None

    def remove_stale(self, running: dict[str, Any]) -> None:
        """The .keeper files of jobs no keeper holds (killed with their cgroup after a
        stop, or by hand): nothing will read them."""
        try:
            names = os.listdir(self.output_dir)
        except OSError:
            return
        for name in names:
            job_id = name[: -len(JOB_FILE)]
            if name.endswith(JOB_FILE) and JOB_ID.match(job_id) and job_id not in running:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.output_dir, name))

    # ------------------------------------------------------------ descriptor store

    def push(self, job: KeptJob) -> None:
        """Hand a copy of the job's pipe (read end) to systemd's descriptor store, named
        by the job id, so a keeper restarted after this one's death reads on. FDPOLL=0:
        systemd must not drop it when the job closes its end (unread output would go)."""
        if job.rfd >= 0 and self.notify_fds(f"FDSTORE=1\nFDNAME={job.id}\nFDPOLL=0", [job.rfd]):
            job.stored = True

    def unstore(self, job_id: str) -> None:
        """Take a job's pipe out of the descriptor store."""
        self.notify_fds(f"FDSTOREREMOVE=1\nFDNAME={job_id}", [])

    def drop(self, stored: dict[str, int]) -> None:
        """Close the stored pipes no job takes (and take them out of the store)."""
        for job_id, fd in stored.items():
            os.close(fd)
            self.unstore(job_id)

    def notify_fds(self, state: str, fds: list[int]) -> bool:
        """sd_notify with descriptors (SCM_RIGHTS); False when it could not be sent."""
        if not self.fdstore:
            return False
        addr = notify_address()
        if not addr:
            return False
        try:
            if self.notify_sock is None:
                self.notify_sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            # Never waits: a store that does not read (an agent that is away or slow, as
            # the keeper's parent) must not hold up the jobs; the pipe is pushed again at
            # the next agent's hello.
            self.notify_sock.sendmsg(
                [state.encode()], anc if fds else [], socket.MSG_DONTWAIT, addr
            )
        except OSError as e:
            if not self.store_failing:
                log(f"descriptor store: {e} (said once until it works again)")
            self.store_failing = True
            return False
        self.store_failing = False
        return True
