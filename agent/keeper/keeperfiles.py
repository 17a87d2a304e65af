"""What the job keeper leaves for the keeper after it: its journal of the running jobs,
each job's pipe in systemd's descriptor store, and the ends the agent has not recorded.

The journal (``<output_dir>/keeper.journal``): one line a job, appended when the job
runs in a cgroup, with what a keeper that adopts it after this one's death needs (its
deadline, cap, grace, record, dynamic uid). One file and one ``write()`` a job, not a
file created and removed a job: that create and unlink were the keeper's largest cost a
job after its spawn. A job's end writes nothing (the next keeper looks up only the jobs
whose cgroup leaf is still there, so a record of an ended job is simply never read), and
the journal is rewritten with the running jobs' lines only once it has grown past
:data:`JOURNAL_COMPACT` (or twice its size after the last rewrite). The output directory
is out of every job's reach (Landlock), so a job cannot forge its own deadline or
record. A keeper of the previous release wrote one ``<job id>.keeper`` file a job
instead: such a file is still read for a job the journal does not name (an upgrade
across a keeper's death), and removed at that job's end. Where the keeper is a service
whose unit keeps a descriptor store, each job's pipe (read end) is there too, named by
the job id, so the next keeper reads on. A keeper that stops cleanly with ends the agent
has not recorded leaves them in the ended file for the next keeper's hello.

:func:`parse_job_file`, :func:`index_journal` and :func:`parse_ends` are pure (bytes in,
data or ValueError out).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.keeper.keeperlog import log, notify_address
from agent.keeper.keptjobs import JOB_ID

if TYPE_CHECKING:
    from agent.keeper.keeperconn import AgentLink
    from agent.keeper.keptjobs import KeptJob

JOURNAL = "keeper.journal"  # in the output folder: the running jobs' records
JOURNAL_COMPACT = 4 << 20  # bytes: rewritten past this (or twice its last rewrite's size)
JOURNAL_READ_MAX = 256 << 20  # bytes: what an adoption reads of it at most (its end)
# seconds: how long an ended job's record (its command and arguments, secret ones hidden)
# may stay in the journal before a rewrite takes it out, however little the keeper does.
JOURNAL_KEEP = 60.0
JOB_FILE = ".keeper"  # <job id>.keeper: a job's record as the previous release kept it
JOB_FILE_MAX = 2 << 20  # bytes (a record is at most RECORD_MAX)
ENDED_FILE_MAX = 64 << 20  # bytes: the ends a stopped keeper leaves for the next


def parse_job_file(data: bytes) -> dict[str, Any]:
    """A job's record (a journal line, or a .keeper file's content), checked (ValueError,
    KeyError, TypeError or AttributeError when it is not one)."""
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


def index_journal(data: bytes) -> tuple[dict[str, bytes], int]:
    """The last line of each job in journal ``data`` (newline included, as written: the
    record of a job is its last), and how many lines were skipped: not JSON (a line torn
    by a full disk or a kill -9), or without a valid job id. Empty lines are nothing."""
    index: dict[str, bytes] = {}
    skipped = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            got = json.loads(line)
        except ValueError:  # UnicodeDecodeError too
            skipped += 1
            continue
        job_id = got.get("job") if isinstance(got, dict) else None
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            skipped += 1
            continue
        index[job_id] = line + b"\n"
    return index, skipped


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
    """The running jobs' journal in ``output_dir`` (a job's legacy .keeper file where the
    previous release left one) and their pipes in systemd's descriptor store
    (``fdstore``: the unit keeps one, see :meth:`push`). ``running`` is the keeper's
    running jobs by id (:attr:`agent.keeper.keptjobs.Kept.jobs`): what a rewrite keeps."""

    def __init__(
        self, output_dir: str, running: Mapping[str, object], *, agent_store: bool = False
    ) -> None:
        self.output_dir = output_dir
        self.running = running
        self.journal = os.path.join(output_dir, JOURNAL)
        # The journal, opened at the first write (a re-exec closes it: O_CLOEXEC).
        self.fd = -1
        self.size = 0  # what it holds, as far as this keeper knows (its only writer)
        self.compact_at = JOURNAL_COMPACT
        # The next line starts with a newline: the journal may end in a torn line (a
        # write cut short), which must not swallow the next record.
        self.newline = False
        # Each running job's line in the journal (its newline included): what a rewrite
        # keeps, without reading the journal back. Only after a re-exec can a running
        # job's line be in the journal and not here: the first rewrite then reads the
        # journal once (``indexed`` False until then).
        self.lines: dict[str, bytes] = {}
        self.indexed = False
        self.index: dict[str, bytes] | None = None  # the journal as an adoption read it
        # Running jobs with a <job id>.keeper file: the previous release's, or this
        # keeper's where the journal could not be used. Removed at the job's end.
        self.per_job: set[str] = set()
        self.journal_failing = False  # the journal cannot be used (said once)
        # When the keeper's loop rewrites the journal (monotonic; 0: nothing due): at most
        # JOURNAL_KEEP after a job's end, so no ended job's record outstays that.
        self.rewrite_due = 0.0
        self.fdstore = False
        # The store is the agent whose child this keeper is (agent.daemon.pipestore), not
        # a service manager: an agent that asks for "pipe-with-start" gets each job's pipe
        # with its start's answer, and drops it at the job's "finished" (pipes_told).
        # (A keeper that is no service is the agent's child: see Keeper.)
        self.agent_store = agent_store
        self.notify_sock: socket.socket | None = None
        self.store_failing = False  # the last write to the store failed (said once)

    def path(self, job_id: str) -> str:
        return os.path.join(self.output_dir, job_id + JOB_FILE)

    def write(self, job: KeptJob, uid: int | None, user: tuple[int, int] | None) -> None:
        """What a keeper that adopts this job after our death needs: one line appended to
        the journal with one write() (no fsync: it must outlive this process, not the
        machine, and the cgroup does not outlive a reboot either)."""
        timeout = job.life.timeout_seconds
        data = {
            "job": job.id,
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
            line = json.dumps(data, separators=(",", ":")).encode() + b"\n"
        except (TypeError, ValueError) as e:
            log(f"job {job.id}: cannot record it (a keeper that adopts it will not know its "
                f"timeout): {e}")  # fmt: skip
            return
        fd = self.journal_fd()
        if fd < 0:
            self.write_file(job.id, line)
            return
        out = b"\n" + line if self.newline else line
        try:
            # One write() with O_APPEND: the line lands whole at the end, and a kill -9 of
            # this keeper leaves the journal as it was or with the line. (A line across a
            # page boundary can still be cut at the boundary by a fatal signal, as can any
            # write by a full disk: the next keeper opens with ``newline`` set for that.)
            n = os.write(fd, out)
        except OSError as e:
            log(f"job {job.id}: cannot write its record to {self.journal} (a keeper that "
                f"adopts it will not know its timeout): {e}")  # fmt: skip
            return
        self.size += n
        if n < len(out):
            self.newline = True
            log(
                f"job {job.id}: its record in {self.journal} was cut short ({n} of "
                f"{len(out)} bytes; a keeper that adopts it will not know its timeout)"
            )
            return
        self.newline = False
        self.lines[job.id] = line
        if self.size >= self.compact_at:
            self.compact()

    def journal_fd(self) -> int:
        """The journal, open for appending (-1: it cannot be used, said once)."""
        if self.fd >= 0:
            return self.fd
        try:
            # O_NOFOLLOW and the check below: a link or anything but a regular file of ours
            # is never written through (the output folder is out of every job's reach, by
            # Landlock, but this holds if that ever changes). O_NONBLOCK only for the open
            # (a FIFO must not hold the keeper up); O_CLOEXEC: no job inherits it.
            fd = os.open(
                self.journal,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                | os.O_NONBLOCK,
                0o600,
            )  # fmt: skip
        except OSError as e:
            self.journal_unusable(str(e))
            return -1
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"not a regular file (mode {st.st_mode:o})")
            os.set_blocking(fd, True)
        except OSError as e:
            os.close(fd)
            self.journal_unusable(str(e))
            return -1
        if self.journal_failing:
            log(f"{self.journal}: in use again")
        self.journal_failing = False
        self.fd, self.size = fd, st.st_size
        # Written by a keeper that may have died in a write: its last line may be torn.
        self.newline = st.st_size > 0
        return fd

    def journal_unusable(self, why: str) -> None:
        if not self.journal_failing:
            log(f"cannot use {self.journal} ({why}): each job's record goes in a "
                f"<job id>{JOB_FILE} file instead (said once until it works again)")  # fmt: skip
        self.journal_failing = True

    def write_file(self, job_id: str, line: bytes) -> None:
        """A job's record in a file of its own (the journal cannot be used)."""
        try:
            fd = os.open(
                self.path(job_id),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            self.per_job.add(job_id)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            log(
                f"job {job_id}: cannot write its {JOB_FILE} file (a keeper that adopts it "
                f"will not know its timeout): {e}"
            )

    def compact(self) -> None:
        """Rewrite the journal with the running jobs' lines only (into a new file, renamed
        over it: a kill -9 at any point leaves the old journal or the new one whole).
        Failing, it is said and the journal appended to as it is, tried again later."""
        self.rewrite_due = 0.0
        keep = self.running_lines()
        data = b"".join(keep.values())
        tmp = f"{self.journal}.tmp"
        fd = -1
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # left by a keeper killed in a rewrite
            # O_EXCL and O_NOFOLLOW: a file that appeared meanwhile is never written through.
            # O_APPEND: once renamed, this descriptor is the journal's, written on as it.
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                | os.O_CLOEXEC,
                0o600,
            )  # fmt: skip
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.replace(tmp, self.journal)
        except OSError as e:
            log(f"cannot rewrite {self.journal} (appended to as it is): {e}")
            if fd >= 0:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self.compact_at = self.size + JOURNAL_COMPACT
            return
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.size, self.newline = fd, len(data), False
        self.compact_at = max(JOURNAL_COMPACT, 2 * len(data))
        self.lines, self.indexed = keep, True

    def running_lines(self) -> dict[str, bytes]:
        """The journal's line of each running job that has one."""
        if not self.indexed and any(j not in self.lines for j in self.running):
            # After a re-exec: the jobs' lines are in the journal, not here (read once).
            index = self.index if self.index is not None else self.read_index()
            self.lines = {**index, **self.lines}
            self.indexed = True
        return {j: self.lines[j] for j in self.running if j in self.lines}

    def forget(self, job: KeptJob, *, dropped: bool = False) -> None:
        """A finished job's pipe goes out of the store (``dropped``: the agent drops it
        itself at the "finished" it was just told). Its journal line stays until the next
        rewrite: nothing is written at a job's end (a keeper that adopts reads only the
        records of jobs whose cgroup leaf is left, and a finished job's is gone)."""
        if self.lines.pop(job.id, None) is not None and not self.rewrite_due:
            self.rewrite_due = time.monotonic() + JOURNAL_KEEP
        if job.id in self.per_job:
            self.per_job.discard(job.id)
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
        """The record of ``job_id``: its last line in the journal, else its .keeper file
        (a keeper of the previous release); None: missing or not one (said)."""
        if self.index is None:
            self.index = self.read_index()
        line = self.index.get(job_id)
        if line is None:
            return self.read_file(job_id)
        try:
            return parse_job_file(line)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log(f"job {job_id}: its record in {self.journal} is not one ({e}); ignored")
            return None

    def read_index(self) -> dict[str, bytes]:
        """The journal's last line of each job (:func:`index_journal`), read once at an
        adoption: at most its last JOURNAL_READ_MAX bytes (what is before is said)."""
        try:
            # As for the writes: O_NOFOLLOW and a regular file only (and never a wait
            # on a FIFO), so a journal that is not ours gives no deadline, cap or record.
            fd = os.open(self.journal, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}
        except OSError as e:
            log(f"cannot read {self.journal}: {e}")
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError("not a regular file")
            # Its end: a job's last line is its record, and the newest are last.
            start = max(0, st.st_size - JOURNAL_READ_MAX)
            got = bytearray()
            while start + len(got) < st.st_size:
                chunk = os.pread(fd, st.st_size - start - len(got), start + len(got))
                if not chunk:
                    break
                got += chunk
            data = bytes(got)
        except OSError as e:
            log(f"cannot read {self.journal}: {e}")
            return {}
        finally:
            os.close(fd)
        if start:
            log(f"{self.journal}: its first {start} bytes ignored (past {JOURNAL_READ_MAX} bytes)")
            data = data[data.find(b"\n") + 1 :]  # a line begun before
        index, skipped = index_journal(data)
        if skipped:
            log(f"{self.journal}: {skipped} line(s) that are no job's record skipped")
        return index

    def read_file(self, job_id: str) -> dict[str, Any] | None:
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
        """After an adoption: the journal rewritten with the running jobs' lines only, and
        the .keeper files of jobs no keeper holds removed (killed with their cgroup after
        a stop, or by hand): nothing will read them."""
        try:
            names = os.listdir(self.output_dir)
        except OSError:
            names = []
        for name in names:
            job_id = name[: -len(JOB_FILE)]
            if not name.endswith(JOB_FILE) or not JOB_ID.match(job_id):
                continue
            if job_id in running:
                self.per_job.add(job_id)  # removed at its end
            else:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.output_dir, name))
        try:
            st = os.lstat(self.journal)
        except FileNotFoundError:
            self.index, self.indexed = None, True  # nothing in it to keep
            return
        except OSError as e:
            log(f"cannot rewrite {self.journal}: {e}")
            return
        if not stat.S_ISREG(st.st_mode):
            self.journal_unusable("not a regular file")
            return
        index = self.index if self.index is not None else self.read_index()
        self.lines = {j: index[j] for j in running if j in index}
        self.index, self.indexed = None, True
        self.compact()

    def note_job_files(self, running: Mapping[str, object]) -> None:
        """After a re-exec: which running jobs have a .keeper file (the previous code's,
        perhaps the previous release's), to be removed at their end."""
        self.per_job.update(j for j in running if os.path.lexists(self.path(j)))

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
