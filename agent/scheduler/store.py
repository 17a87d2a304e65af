"""Where the scheduler keeps its state: the workers it knows and its fan-out runs.

:class:`Store` is the seam: the registry (through
:class:`~agent.scheduler.registry.WorkerStore`) and the run executor
(:mod:`agent.scheduler.runs`) ask only what it names, so another store (etcd,
shared by several schedulers) can stand in without touching them.
:class:`SQLiteStore` is the embedded default: one SQLite file in WAL mode, so a
restarted scheduler still lists its workers (with when they were last seen)
and its runs with every host's job id and result.

Every host's start is written twice: as STARTING before StartJob is sent and
as RUNNING with the job id once the worker answered. A host found STARTING
after a crash may or may not have received the job, so it is never started
again blindly: the run's next driver (this scheduler restarted, with SQLite, or
another one taking over, with etcd) asks that worker first (see takeover.py).

Finished runs are pruned past ``[runs]`` (:func:`prunable`, the rule of every
store; a RUNNING run never is).

Plain data in, plain data out: the job and the targets are kept as the wire
messages' bytes (a StartJobReq with secret arguments already redacted, a
TargetSelector), so what is stored is exactly what is shown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.scheduler.registry import Worker, WorkerStore
from agent.vocabulary import HostState, RunState

__all__ = ["HostRecord", "RunRecord", "SQLiteStore", "Store", "StoreError", "prunable"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, identity TEXT NOT NULL, address TEXT NOT NULL,
    legacy INTEGER NOT NULL, labels TEXT NOT NULL, registered_at REAL NOT NULL,
    last_seen REAL NOT NULL, live INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, owner TEXT NOT NULL, state INTEGER NOT NULL,
    job BLOB NOT NULL, targets BLOB NOT NULL, max_concurrency INTEGER NOT NULL,
    max_errors INTEGER NOT NULL, created_at REAL NOT NULL, end_time REAL);
CREATE TABLE IF NOT EXISTS run_cancels (run_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS run_hosts (
    run_id TEXT NOT NULL, position INTEGER NOT NULL, worker_id TEXT NOT NULL,
    address TEXT NOT NULL, identity TEXT NOT NULL, state INTEGER NOT NULL,
    job_id TEXT NOT NULL, exit_code INTEGER, error TEXT NOT NULL,
    start_time REAL, end_time REAL, PRIMARY KEY (run_id, worker_id));
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_at);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state);
"""


_PUT_HOST = "INSERT OR REPLACE INTO run_hosts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _host_row(run_id: str, h: HostRecord) -> tuple[object, ...]:
    return (
        run_id,
        h.position,
        h.worker_id,
        h.address,
        h.identity,
        h.state.value,
        h.job_id,
        h.exit_code,
        h.error,
        h.start_time,
        h.end_time,
    )


def prunable(
    heads: Iterable[tuple[str, float, float | None, RunState]], ended_before: float, keep: int
) -> list[str]:
    """The runs to prune, of (run id, created at, end time, state): finished ones that ended
    before ``ended_before`` (0: none by age) or are not among the newest ``keep`` finished
    ones (0: none by count). A RUNNING run is never pruned. The one rule of every store.
    """
    done = sorted(
        (h for h in heads if h[3] is not RunState.RUNNING), key=lambda h: (h[1], h[0]), reverse=True
    )
    return [
        run_id
        for i, (run_id, created, ended, _) in enumerate(done)
        if (ended_before and (created if ended is None else ended) < ended_before)
        or (keep and i >= keep)
    ]


class StoreError(Exception):
    """The store cannot be opened or used (the message names the file)."""


@dataclass
class HostRecord:
    """One target host of a run."""

    worker_id: str
    address: str
    identity: str
    position: int = 0  # its place in the run's target order
    state: HostState = HostState.PENDING
    job_id: str = ""
    exit_code: int | None = None
    error: str = ""
    start_time: float | None = None  # when the worker answered StartJob
    end_time: float | None = None


@dataclass
class RunRecord:
    """One fan-out run; ``job`` and ``targets`` are wire bytes (see module doc)."""

    run_id: str
    owner: str
    job: bytes
    targets: bytes
    max_concurrency: int
    max_errors: int
    created_at: float
    state: RunState = RunState.RUNNING
    end_time: float | None = None
    hosts: list[HostRecord] = field(default_factory=list)


class Store(WorkerStore, Protocol):
    """Workers (see WorkerStore) and runs, kept across restarts.

    ``shared``: other schedulers use the same store (etcd): workers come and go
    through it (leases), and runs are owned through :meth:`claim_run`.
    """

    shared: bool

    def keep_alive(self) -> bool:
        """Renew this scheduler's ownership of its runs; False if it was lost."""
        ...

    def claim_run(self, run_id: str) -> bool:
        """Become the owner of a run nobody owns; False if another scheduler does."""
        ...

    def release_run(self, run_id: str) -> None:
        """Give up owning a run (it ended, or this scheduler stops)."""
        ...

    def orphaned_runs(self) -> list[RunRecord]:
        """Unfinished runs that no live scheduler owns (to take over)."""
        ...

    def save_run(self, run: RunRecord) -> None:
        """Insert or replace a run's own fields and every one of its hosts."""
        ...

    def save_host(self, run_id: str, host: HostRecord) -> None:
        """Insert or replace one host of a run (durable once :meth:`flushed` returns)."""
        ...

    async def flushed(self) -> None:
        """Wait until every host written so far is durable (StoreError if it cannot be)."""
        ...

    def runs(self, limit: int) -> list[RunRecord]:
        """The newest ``limit`` runs, newest first, with their hosts."""
        ...

    def run(self, run_id: str) -> RunRecord | None:
        """One run with its hosts, or None."""
        ...

    def unfinished_runs(self) -> list[RunRecord]:
        """The runs recorded as RUNNING (at start-up: what a previous process left)."""
        ...

    def prune_runs(self, ended_before: float, keep: int) -> int:
        """Delete the finished runs :func:`prunable` names, with their hosts; how many."""
        ...

    def request_cancel(self, run_id: str) -> None:
        """Record that the run is to be cancelled (durable: the scheduler driving it, this
        one after a restart or another sharing the store, cancels it)."""
        ...

    def cancel_requests(self) -> set[str]:
        """The runs whose cancel was requested (finished ones may be among them)."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...


class SQLiteStore:
    """The embedded store: one SQLite file (WAL), used from the event loop's thread.

    Each write is its own transaction, but for the hosts of runs: a fan-out
    changes thousands of them, and a commit each was a tenth of the
    scheduler's CPU. Their rows are queued and committed together at the end
    of the event loop's turn (:meth:`flush`, scheduled with ``call_soon``);
    what must be on disk before something is sent (a host's STARTING, before
    its StartJob) awaits :meth:`flushed`. Every read commits the queue first.
    WAL with ``synchronous = NORMAL`` survives a crash of the scheduler process
    at any point but for the host rows of the turn it died in; a power loss
    may lose the last commits (see docs/fleet.md).
    """

    shared = False  # one scheduler: it owns every run, none is ever orphaned

    def __init__(self, path: Path) -> None:
        """Open (creating it and its folder, private to this user) the store at ``path``."""
        self.path = path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA busy_timeout = 5000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: written by a newer scheduler (schema {version}, "
                    f"this one knows {SCHEMA_VERSION})"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{path}: cannot open the store: {e}") from None
        self._queued: dict[tuple[str, str], tuple[object, ...]] = {}  # host rows to commit
        self._flush_at: asyncio.Handle | None = None  # the commit of the queue, scheduled
        self._committed: asyncio.Future[None] | None = None  # for flushed(): that commit

    def flush(self) -> None:
        """Commit the queued host rows, in one transaction."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        waiter, self._committed = self._committed, None
        rows, self._queued = list(self._queued.values()), {}
        try:
            if rows:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany(_PUT_HOST, rows)
        except sqlite3.Error as e:
            err = StoreError(f"{self.path}: cannot write {len(rows)} hosts of runs: {e}")
            if waiter is None or waiter.done():
                raise err from None
            waiter.set_exception(err)
            return
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush_queued(self) -> None:
        """The scheduled commit: a failure is the waiters' to see, else logged."""
        self._flush_at = None
        try:
            self.flush()
        except StoreError as e:
            log.error("%s", e)

    async def flushed(self) -> None:
        """Wait for the commit of the host rows queued so far (at the end of this turn)."""
        if not self._queued:
            return
        if self._committed is None:
            self._committed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._committed)

    # ------------------------------------------------------------ workers

    def workers(self) -> list[tuple[Worker, bool]]:
        """Every stored worker, with whether it was live (else forgotten)."""
        rows = self._db.execute(
            "SELECT worker_id, identity, address, registered_at, last_seen, legacy, labels, live"
            " FROM workers ORDER BY registered_at"
        ).fetchall()
        return [
            (Worker(r[0], r[1], r[2], r[3], r[4], bool(r[5]), json.loads(r[6])), bool(r[7]))
            for r in rows
        ]

    def save_worker(self, w: Worker, *, live: bool) -> None:
        """Insert or replace one worker."""
        self._db.execute(
            "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                w.worker_id,
                w.identity,
                w.address,
                int(w.legacy),
                json.dumps(w.labels, sort_keys=True),
                w.registered_at,
                w.last_seen,
                int(live),
            ),
        )

    def delete_worker(self, worker_id: str) -> None:
        """Forget a worker for good."""
        self._db.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    # ------------------------------------------------------------ runs

    def save_run(self, run: RunRecord) -> None:
        """Insert or replace a run's own fields and every one of its hosts."""
        self.flush()
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.run_id,
                    run.owner,
                    run.state.value,
                    run.job,
                    run.targets,
                    run.max_concurrency,
                    run.max_errors,
                    run.created_at,
                    run.end_time,
                ),
            )
            self._db.executemany(_PUT_HOST, [_host_row(run.run_id, h) for h in run.hosts])

    def save_host(self, run_id: str, host: HostRecord) -> None:
        """Queue one host of a run, committed at the end of this turn of the event loop
        (at once without a running loop); :meth:`flushed` waits for it."""
        self._queued[(run_id, host.worker_id)] = _host_row(run_id, host)
        if self._flush_at is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_at = loop.call_soon(self._flush_queued)

    def runs(self, limit: int) -> list[RunRecord]:
        """The newest ``limit`` runs, newest first, with their hosts."""
        ids = self._db.execute(
            "SELECT run_id FROM runs ORDER BY created_at DESC LIMIT ?", (limit,)
        ).fetchall()
        return [r for (i,) in ids if (r := self.run(i)) is not None]

    def run(self, run_id: str) -> RunRecord | None:
        """One run with its hosts, or None."""
        self.flush()
        r = self._db.execute(
            "SELECT run_id, owner, job, targets, max_concurrency, max_errors, created_at,"
            " state, end_time FROM runs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if r is None:
            return None
        run = RunRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], RunState(r[7]), r[8])
        for h in self._db.execute(
            "SELECT worker_id, address, identity, position, state, job_id, exit_code, error,"
            " start_time, end_time FROM run_hosts WHERE run_id = ? ORDER BY position",
            (run_id,),
        ):
            run.hosts.append(
                HostRecord(h[0], h[1], h[2], h[3], HostState(h[4]), h[5], h[6], h[7], h[8], h[9])
            )
        return run

    def unfinished_runs(self) -> list[RunRecord]:
        """The runs recorded as RUNNING, oldest first."""
        ids = self._db.execute(
            "SELECT run_id FROM runs WHERE state = ? ORDER BY created_at", (RunState.RUNNING.value,)
        ).fetchall()
        return [r for (i,) in ids if (r := self.run(i)) is not None]

    def prune_runs(self, ended_before: float, keep: int) -> int:
        """Delete the finished runs :func:`prunable` names and their hosts, in one
        transaction (a RUNNING run stays: this process is its only writer)."""
        self.flush()
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                heads = self._db.execute("SELECT run_id, created_at, end_time, state FROM runs")
                ids = [
                    (i,)
                    for i in prunable(
                        ((r[0], r[1], r[2], RunState(r[3])) for r in heads), ended_before, keep
                    )
                ]
                self._db.executemany("DELETE FROM run_hosts WHERE run_id = ?", ids)
                self._db.executemany("DELETE FROM run_cancels WHERE run_id = ?", ids)
                self._db.executemany("DELETE FROM runs WHERE run_id = ?", ids)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot prune runs: {e}") from None
        return len(ids)

    def request_cancel(self, run_id: str) -> None:
        """Record the run's cancel (its own transaction, committed now)."""
        self.flush()
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("INSERT OR IGNORE INTO run_cancels VALUES (?)", (run_id,))
        except sqlite3.Error as e:
            raise StoreError(
                f"{self.path}: cannot record the cancel of run {run_id}: {e}"
            ) from None

    def cancel_requests(self) -> set[str]:
        """The runs whose cancel was requested."""
        return {r for (r,) in self._db.execute("SELECT run_id FROM run_cancels")}

    def keep_alive(self) -> bool:
        """Nothing to renew: this process owns the file."""
        return True

    def claim_run(self, run_id: str) -> bool:
        """Always this scheduler's."""
        return True

    def release_run(self, run_id: str) -> None:
        """Nothing to release."""

    def orphaned_runs(self) -> list[RunRecord]:
        """None: an unfinished run of a previous process is resumed at start-up."""
        return []

    def close(self) -> None:
        """Close the database."""
        self.flush()
        self._db.close()
