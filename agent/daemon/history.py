"""Durable job history in SQLite.

One database file in the state directory, in WAL mode with
``synchronous=NORMAL``: every committed change survives a crash of the
agent (``kill -9``), because the WAL is written before the commit returns;
only a power loss can drop the last few commits, and it never corrupts the
file. History therefore lives on disk, not in the agent's memory (apart
from the last :data:`RECENT` finished records, which answer the final polls
of the original protocol without a query).

The store is used from the event loop's thread only (SQLite calls on a
primary key take tens of microseconds). :class:`Store` is the database;
:class:`History` is how the supervisor uses it: writes go into an open
transaction that is committed once per event-loop iteration (group commit),
StartJob answers only after the commit that holds its job, and a record
that could not be written is kept and retried rather than lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.keeper.errors import Unavailable
from agent.vocabulary import JobState

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_INCREMENTAL = 2  # PRAGMA auto_vacuum=INCREMENTAL
# Free pages one retention step gives back (4 KiB each): a bounded amount of I/O.
VACUUM_PAGES = 256
# Unsaved records are written again after this, doubling up to RETRY_MAX (seconds).
RETRY_FIRST, RETRY_MAX = 0.5, 10.0
# Finished records Store.get answers from memory (a few hundred bytes each).
RECENT = 128

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    owner            TEXT NOT NULL,
    command          TEXT NOT NULL,
    path             TEXT NOT NULL,
    args             TEXT NOT NULL,      -- JSON list, secret values redacted
    state            INTEGER NOT NULL,
    pid              INTEGER NOT NULL DEFAULT 0,
    leader_start     INTEGER NOT NULL DEFAULT 0,  -- /proc starttime ticks
    boot_id          TEXT NOT NULL DEFAULT '',
    start_time       REAL NOT NULL,
    end_time         REAL,
    exit_code        INTEGER,
    signal           INTEGER,
    error_text       TEXT NOT NULL DEFAULT '',
    user_cpu         REAL NOT NULL DEFAULT 0,
    system_cpu       REAL NOT NULL DEFAULT 0,
    max_rss          INTEGER NOT NULL DEFAULT 0,
    output_path      TEXT NOT NULL,
    output_bytes     INTEGER NOT NULL DEFAULT 0,
    output_truncated INTEGER NOT NULL DEFAULT 0,
    timeout_seconds  INTEGER NOT NULL DEFAULT 0,
    limits           TEXT NOT NULL DEFAULT '{}',
    request_key      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE INDEX IF NOT EXISTS jobs_end ON jobs(end_time);
"""
# How many finished jobs there are, kept by triggers: retention's max_jobs needs it every
# step, and COUNT(*) over 30,000 rows takes milliseconds on these machines (it scans an
# index). Additive: an older agent's writes keep it right too (the triggers are in the file).
_RUNNING = JobState.RUNNING.value
_COUNTS = f"""
CREATE TABLE IF NOT EXISTS finished_count (n INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS jobs_finished_insert AFTER INSERT ON jobs
    WHEN NEW.state <> {_RUNNING}
    BEGIN UPDATE finished_count SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS jobs_finished_update AFTER UPDATE OF state ON jobs
    WHEN (NEW.state <> {_RUNNING}) <> (OLD.state <> {_RUNNING})
    BEGIN UPDATE finished_count
        SET n = n + (CASE WHEN NEW.state <> {_RUNNING} THEN 1 ELSE -1 END); END;
CREATE TRIGGER IF NOT EXISTS jobs_finished_delete AFTER DELETE ON jobs
    WHEN OLD.state <> {_RUNNING}
    BEGIN UPDATE finished_count SET n = n - 1; END;
"""


# StartJob's requestKey (an additive column: a file of an older agent gets it on open, and
# an older agent opening this file writes its rows with the default, no key).
_KEYS = """
CREATE INDEX IF NOT EXISTS jobs_request_key ON jobs(owner, request_key) WHERE request_key <> '';
"""


class StoreError(Exception):
    """The database could not be opened or is not ours."""


@dataclass
class JobRecord:
    """Everything persisted about one job."""

    id: str
    owner: str
    command: str
    path: str
    args: list[str]
    state: JobState
    start_time: float
    output_path: str
    pid: int = 0
    leader_start: int = 0
    boot_id: str = ""
    end_time: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    error_text: str = ""
    user_cpu: float = 0.0
    system_cpu: float = 0.0
    max_rss: int = 0
    output_bytes: int = 0
    output_truncated: bool = False
    timeout_seconds: int = 0
    limits: dict[str, int] = field(default_factory=dict)
    request_key: str = ""  # StartJob's requestKey: a repeat with it answers this job
    seq: int = 0


_COLUMNS = [f.name for f in dataclasses.fields(JobRecord) if f.name != "seq"]


def record_to_wire(rec: JobRecord) -> dict[str, Any]:
    """A record as the job keeper keeps it for the agent (JSON; the state by name)."""
    d = {name: getattr(rec, name) for name in _COLUMNS}
    d["state"] = rec.state.name
    return d


def record_from_wire(d: dict[str, Any]) -> JobRecord:
    """The record the keeper handed back; raises ValueError when it is not one."""
    try:
        fields = {name: d[name] for name in _COLUMNS if name in d}
        fields["state"] = JobState[str(d["state"])]
        rec = JobRecord(**fields)
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a job record: {e}") from None
    if not isinstance(rec.id, str) or not isinstance(rec.args, list):
        raise ValueError("not a job record")
    return rec


class Store:
    """The job history database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            # Before anything else: a new file takes it only before its first page.
            self._db.execute(f"PRAGMA auto_vacuum={_INCREMENTAL}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            # A small page cache: lookups are by primary key or index, and
            # the agent's resident memory should not grow with the history.
            self._db.execute("PRAGMA cache_size=-1024")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{path}: written by a newer agent (schema {version})")
            # Free pages go back to the file system after retention (vacuum_step), so the
            # file shrinks with the history. A new file takes the setting as is; a file of
            # an older agent needs one VACUUM to switch, done once here.
            if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
                self._db.execute("VACUUM")  # an existing file switches only through one
            self._db.executescript(_SCHEMA)
            cols = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "request_key" not in cols:
                self._db.execute("ALTER TABLE jobs ADD COLUMN request_key TEXT NOT NULL DEFAULT ''")
            self._db.executescript(_KEYS)
            self._db.executescript(_COUNTS)
            if self._db.execute("SELECT COUNT(*) FROM finished_count").fetchone()[0] != 1:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM finished_count")
                self._db.execute(
                    "INSERT INTO finished_count SELECT COUNT(*) FROM jobs WHERE state <> ?",
                    (_RUNNING,),
                )
                self._db.execute("COMMIT")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise StoreError(f"{path}: {e}") from None
        self._insert_sql = (
            f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
        )
        upd = [
            c
            for c in _COLUMNS
            if c
            not in (
                "id",
                "owner",
                "command",
                "path",
                "args",
                "start_time",
                "output_path",
                "request_key",
            )
        ]
        self._update_cols = upd
        self._update_sql = f"UPDATE jobs SET {', '.join(c + '=?' for c in upd)} WHERE id=?"
        self._get_sql = f"SELECT seq, {', '.join(_COLUMNS)} FROM jobs WHERE id=?"
        # Recently finished jobs by id, as this connection sees them (its open
        # transaction included): the original protocol polls every job once
        # more after it ends, and pollers ask for the same finished job again
        # and again. Only finished records (they never change again; the
        # running ones live in the supervisor), at most RECENT of them (FIFO),
        # dropped again by delete() and by a rollback of the write that put
        # them here, so a get() answers exactly what the database would.
        self._recent: dict[str, JobRecord] = {}
        self._recent_tx: list[str] = []

    def close(self) -> None:
        """Commit, checkpoint and close."""
        try:
            self.commit()
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self._db.close()

    @staticmethod
    def _params(rec: JobRecord, cols: Sequence[str]) -> list[object]:
        out: list[object] = []
        for c in cols:
            v = getattr(rec, c)
            if c == "state":
                v = v.value
            elif c in ("args", "limits"):
                v = json.dumps(v, separators=(",", ":"))
            elif c == "output_truncated":
                v = int(v)
            out.append(v)
        return out

    def _begin(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN")

    def commit(self) -> None:
        """Commit the open transaction, if any."""
        if self._db.in_transaction:
            self._db.execute("COMMIT")
        self._recent_tx.clear()

    def rollback(self) -> None:
        """Abandon the open transaction, if any."""
        for job_id in self._recent_tx:  # what it wrote is no longer what the file holds
            self._recent.pop(job_id, None)
        self._recent_tx.clear()
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _remember(self, rec: JobRecord, *, written: bool) -> None:
        if not rec.state.done:
            return
        recent = self._recent
        recent.pop(rec.id, None)
        if len(recent) >= RECENT:
            del recent[next(iter(recent))]
        recent[rec.id] = rec
        if written:
            self._recent_tx.append(rec.id)

    def insert(self, rec: JobRecord) -> None:
        """Add a new job (uncommitted until :meth:`commit`)."""
        self._begin()
        cur = self._db.execute(self._insert_sql, self._params(rec, _COLUMNS))
        rec.seq = int(cur.lastrowid or 0)
        self._remember(rec, written=True)

    def update(self, rec: JobRecord) -> None:
        """Write a job's mutable fields (uncommitted until :meth:`commit`)."""
        self._begin()
        self._db.execute(self._update_sql, [*self._params(rec, self._update_cols), rec.id])
        self._remember(rec, written=True)

    def get(self, job_id: str) -> JobRecord | None:
        """One job by id (callers must not change the record: it may be shared)."""
        hit = self._recent.get(job_id)
        if hit is not None:
            return hit
        row = self._db.execute(self._get_sql, (job_id,)).fetchone()
        if not row:
            return None
        rec = _record(row)
        self._remember(rec, written=False)
        return rec

    def job_of_key(self, owner: str, key: str) -> str | None:
        """The id of the job ``owner`` started with StartJob's requestKey ``key`` (the
        newest), or None."""
        row = self._db.execute(
            "SELECT id FROM jobs WHERE owner=? AND request_key=? ORDER BY seq DESC LIMIT 1",
            (owner, key),
        ).fetchone()
        return str(row[0]) if row else None

    def running(self) -> list[JobRecord]:
        """Jobs recorded as running (after a crash: the ones to recover)."""
        rows = self._db.execute(
            f"SELECT seq, {', '.join(_COLUMNS)} FROM jobs WHERE state=?", (JobState.RUNNING.value,)
        ).fetchall()
        return [_record(r) for r in rows]

    def count(self) -> int:
        """How many jobs the history holds (for the metrics): the kept count of finished
        ones and the (few) running ones, never a scan of the table."""
        (finished,) = self._db.execute("SELECT n FROM finished_count").fetchone()
        (running,) = self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = ?", (_RUNNING,)
        ).fetchone()
        return int(finished) + int(running)

    def list_jobs(
        self,
        *,
        states: Iterable[JobState] = (),
        owner: str | None = None,
        before_seq: int | None = None,
        limit: int = 100,
    ) -> list[JobRecord]:
        """Jobs newest first, filtered; ``before_seq`` pages backwards."""
        where: list[str] = []
        params: list[object] = []
        st = [s.value for s in states]
        if st:
            where.append(f"state IN ({', '.join('?' for _ in st)})")
            params.extend(st)
        if owner is not None:
            where.append("owner=?")
            params.append(owner)
        if before_seq is not None:
            where.append("seq<?")
            params.append(before_seq)
        sql = f"SELECT seq, {', '.join(_COLUMNS)} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        return [_record(r) for r in self._db.execute(sql, params).fetchall()]

    def expired(
        self, *, max_age_seconds: int, max_jobs: int, now: float | None = None, batch: int = 500
    ) -> list[tuple[str, str]]:
        """(id, output_path) of finished jobs past the retention limits."""
        now = time.time() if now is None else now
        out: dict[str, str] = {}
        running = JobState.RUNNING.value
        if max_age_seconds:
            for job_id, outp in self._db.execute(
                "SELECT id, output_path FROM jobs WHERE state<>? AND end_time<? "
                "ORDER BY end_time LIMIT ?",  # index jobs_end: no scan of the history
                (running, now - max_age_seconds, batch),
            ):
                out[job_id] = outp
        if max_jobs:
            (finished,) = self._db.execute("SELECT n FROM finished_count").fetchone()
            excess = finished - max_jobs
            if excess > 0:
                for job_id, outp in self._db.execute(
                    "SELECT id, output_path FROM jobs WHERE state<>? ORDER BY seq LIMIT ?",
                    (running, min(excess, batch)),
                ):
                    out[job_id] = outp
        return list(out.items())

    def vacuum_step(self, pages: int = VACUUM_PAGES) -> int:
        """Give up to ``pages`` free pages back to the file system; returns how many free
        pages remain (0: nothing left to shrink)."""
        if self._db.in_transaction:
            return 0  # never inside a group commit: the next step does it
        # executescript: it steps the pragma to its end (execute() frees a single page).
        self._db.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
        (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
        return int(free)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove finished jobs by id (running ones are never removed)."""
        if not ids:
            return
        for i in ids:
            self._recent.pop(i, None)
        self._begin()
        self._db.executemany(
            "DELETE FROM jobs WHERE id=? AND state<>?", [(i, JobState.RUNNING.value) for i in ids]
        )
        self.commit()


def _record(row: Sequence[object]) -> JobRecord:
    seq, *values = row
    d = dict(zip(_COLUMNS, values, strict=False))
    d["state"] = JobState(d["state"])
    d["args"] = json.loads(str(d["args"]))
    d["limits"] = json.loads(str(d["limits"]))
    d["output_truncated"] = bool(d["output_truncated"])
    rec = JobRecord(**d)  # type: ignore[arg-type]
    rec.seq = int(seq)  # type: ignore[call-overload]
    return rec


def _unwritable(e: sqlite3.Error) -> Unavailable:
    return Unavailable(
        f"the job history cannot be written ({e}); the job was not started",
        rule="history-write-failed",
    )


class History:
    """The job history as the supervisor uses it: group commit and retries.

    ``unsaved`` holds records whose last write failed (disk full, I/O
    error); they are served from memory and written again by
    :meth:`retry_unsaved`, so no outcome is lost while the disk recovers.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.unsaved: dict[str, JobRecord] = {}
        self._batch: list[JobRecord] = []
        self._commit_future: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = RETRY_FIRST
        # Called with every group of records once committed (the supervisor tells the
        # keeper which finished jobs it may forget, retried ones included).
        self.on_commit: Callable[[list[JobRecord]], None] | None = None

    def count(self) -> int:
        """How many jobs the history holds (:meth:`Store.count`)."""
        return self.store.count()

    def list_jobs(
        self,
        *,
        states: Iterable[JobState] = (),
        owner: str | None = None,
        before_seq: int | None = None,
        limit: int = 100,
    ) -> list[JobRecord]:
        """A page of the stored records, newest first (:meth:`Store.list_jobs`); the
        caller answers each with :meth:`get` (a record may be newer in ``unsaved``)."""
        return self.store.list_jobs(states=states, owner=owner, before_seq=before_seq, limit=limit)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit in groups on ``loop`` from now on (before: every write commits)."""
        self._loop = loop

    def insert_new(self, rec: JobRecord) -> asyncio.Future[None]:
        """Insert a job now; returns its (shared) commit, to await with :meth:`committed`
        before the start is answered (durable before we answer).

        Raises Unavailable when the insert itself fails.
        """
        try:
            self.store.insert(rec)
        except sqlite3.Error as e:
            raise _unwritable(e) from None
        return self._commit_soon()

    def insert_now(self, rec: JobRecord) -> None:
        """Insert and commit a job at once (one the keeper kept and the history lost);
        raises Unavailable."""
        try:
            self.store.insert(rec)
            self.store.commit()
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self.store.rollback()
            raise _unwritable(e) from None

    async def committed(self, commit: asyncio.Future[None]) -> None:
        """Wait for a commit from :meth:`insert_new`; Unavailable if it failed."""
        try:
            await asyncio.shield(commit)
        except sqlite3.Error as e:
            raise _unwritable(e) from None

    async def record_change(self, rec: JobRecord) -> None:
        """Write a job's new state and wait for its commit (Unavailable if it fails)."""
        try:
            self.store.update(rec)
        except sqlite3.Error as e:
            raise _unwritable(e) from None
        await self.committed(self._commit_soon())

    def save(self, rec: JobRecord) -> asyncio.Future[None] | None:
        """Write a job's new state; on failure keep it for :meth:`retry_unsaved`.

        Returns the group commit it joined (on the loop), or None: written and committed
        already (outside the loop), or kept in ``unsaved`` for a retry.
        """
        try:
            self.store.update(rec)
        except sqlite3.Error as e:
            log.error("job %s: cannot write its state to the history (%s); will retry", rec.id, e)
            self.unsaved[rec.id] = rec
            self._retry_later()
            return None
        self._batch.append(rec)
        if self._loop is not None:
            return self._commit_soon()
        try:  # outside the loop (recovery at start-up): commit now
            self.store.commit()
            self._batch.clear()
            self.unsaved.pop(rec.id, None)
        except sqlite3.Error as e:
            log.error("cannot commit the job history (%s); will retry", e)
            self.unsaved[rec.id] = rec
        return None

    def retry_unsaved(self) -> None:
        """Write again every record whose last write failed."""
        for rec in list(self.unsaved.values()):
            self.save(rec)

    def _retry_later(self) -> None:
        """Retry the unsaved records on their own schedule (0.5 s, doubling to 10 s):
        not only when something else happens to write."""
        if self._loop is None or self._retry is not None:
            return
        self._retry = self._loop.call_later(self._retry_delay, self._retry_now)
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _retry_now(self) -> None:
        self._retry = None
        pending = len(self.unsaved)
        self.retry_unsaved()
        if self._batch and self._loop is not None:
            self._loop.call_soon(self._report_retry, pending)

    def _report_retry(self, pending: int) -> None:
        # After the group commit the retry joined (call_soon runs in order).
        if not self.unsaved:
            log.info("history: %d unsaved record(s) written", pending)
            self._retry_delay = RETRY_FIRST

    def job_of_key(self, owner: str, key: str) -> str | None:
        """The job ``owner`` started with requestKey ``key`` (:meth:`Store.job_of_key`)."""
        return self.store.job_of_key(owner, key)

    def get(self, job_id: str) -> JobRecord | None:
        """A finished job's record (a not yet written one first)."""
        return self.unsaved.get(job_id) or self.store.get(job_id)

    def close(self) -> None:
        """Commit what is pending and close the database."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.store.close()

    def _commit_soon(self) -> asyncio.Future[None]:
        """Group commit: every change made in this loop iteration, in one COMMIT."""
        if self._loop is None:  # a start, or a job's end: on the loop, whoever asks
            self._loop = asyncio.get_running_loop()
        if self._commit_future is None:
            self._commit_future = self._loop.create_future()
            self._loop.call_soon(self._do_commit)
        return self._commit_future

    def _do_commit(self) -> None:
        fut, self._commit_future = self._commit_future, None
        batch, self._batch = self._batch, []
        assert fut is not None
        try:
            self.store.commit()
        except sqlite3.Error as e:
            log.error("cannot commit the job history (%s); will retry", e)
            with contextlib.suppress(sqlite3.Error):
                self.store.rollback()
            for rec in batch:
                self.unsaved[rec.id] = rec
            self._retry_later()
            fut.set_exception(e)
            fut.exception()  # retrieved: updates are retried, starts were told
            return
        for rec in batch:
            self.unsaved.pop(rec.id, None)
        if not self.unsaved:
            self._retry_delay = RETRY_FIRST
        fut.set_result(None)
        if self.on_commit is not None and batch:
            self.on_commit(batch)
