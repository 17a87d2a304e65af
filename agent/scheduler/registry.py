"""The scheduler's worker registry: who is registered, under which id, until when.

The seam between the service and wherever registrations live. The service
asks only what :class:`WorkerRegistry` names (register, heartbeat,
deregister, get, live, expire); :class:`Registry` answers from memory and is
pure (time comes from its ``clock``), so another implementation (a shared
store, a fleet of schedulers) can stand in without touching the service.
Given a :class:`WorkerStore`, it writes every change through to it and
starts from what the store remembers, so a restarted scheduler still knows
its workers (they stay known while their heartbeats keep coming).

Ids are stable for an (identity, address, legacy) triple: a worker that
re-registers, for example after a network cut made the scheduler forget it,
gets its old id back, so jobs started through the scheduler stay
addressable. A worker not heard from for ``expire_seconds`` is forgotten but
remembered for a while, so a call naming it can say when it was last seen.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "LEGACY_IDENTITY",
    "Registry",
    "UnknownWorker",
    "Worker",
    "WorkerRegistry",
    "WorkerStore",
]

# The identity of every worker registered on the legacy (plaintext) listener.
LEGACY_IDENTITY = "(legacy, no certificate)"

# Forgotten workers kept for messages and stable ids; past the cap the
# longest silent are dropped, a batch at a time so the sort is rare.
FORGOTTEN_MAX = 10000
FORGOTTEN_DROP = 1000


@dataclass
class Worker:
    """One registered worker."""

    worker_id: str
    identity: str
    address: str
    registered_at: float
    last_seen: float
    legacy: bool = False  # registered on the plaintext listener: never expires
    labels: dict[str, str] = field(default_factory=dict)  # as the worker advertised them


class UnknownWorker(Exception):
    """No such worker; ``forgotten`` tells whether it was known recently."""

    def __init__(self, worker_id: str, forgotten: Worker | None) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.forgotten = forgotten


class WorkerStore(Protocol):
    """Where a registry keeps its workers across restarts (see agent.scheduler.store)."""

    def workers(self) -> list[tuple[Worker, bool]]:
        """Every stored worker, with whether it was live (else forgotten)."""
        ...

    def save_worker(self, w: Worker, *, live: bool) -> None:
        """Insert or replace one worker."""
        ...

    def delete_worker(self, worker_id: str) -> None:
        """Forget a worker for good (it deregistered)."""
        ...


class WorkerRegistry(Protocol):
    """What the scheduler's service and its serving loop ask of a registry."""

    def register(
        self,
        identity: str,
        address: str,
        *,
        legacy: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> Worker:
        """Add or refresh the worker for (identity, address); ids are stable."""
        ...

    def heartbeat(self, worker_id: str, identity: str) -> bool:
        """Refresh; False if the registry does not know this worker (re-register)."""
        ...

    def deregister(self, worker_id: str, identity: str) -> bool:
        """Remove a worker; only its own identity may. False if nothing was removed."""
        ...

    def get(self, worker_id: str) -> Worker:
        """A live worker, or UnknownWorker (saying whether it was forgotten recently)."""
        ...

    def live(self) -> list[Worker]:
        """The registered workers, oldest registration first."""
        ...

    def expire(self) -> list[Worker]:
        """Forget the workers not heard from within the expiry; return them."""
        ...


class Registry:
    """Workers by id, with expiry, in memory. Pure: time comes from the ``clock``."""

    def __init__(
        self,
        expire_seconds: float,
        clock: Callable[[], float] = time.time,
        store: WorkerStore | None = None,
    ) -> None:
        """An empty registry, or one that starts from what ``store`` remembers."""
        self.expire_seconds = expire_seconds
        self.clock = clock
        self.store = store
        self._workers: dict[str, Worker] = {}
        self._forgotten: dict[str, Worker] = {}  # expired, kept for messages and stable ids
        # Live and forgotten ids by (identity, address, legacy): a registration
        # finds its old id without a scan (a storm of N would cost N squared).
        self._ids: dict[tuple[str, str, bool], str] = {}
        for w, live in store.workers() if store else ():
            (self._workers if live else self._forgotten)[w.worker_id] = w
            if live or (w.identity, w.address, w.legacy) not in self._ids:
                self._ids[(w.identity, w.address, w.legacy)] = w.worker_id

    def _unindex(self, w: Worker) -> None:
        key = (w.identity, w.address, w.legacy)
        if self._ids.get(key) == w.worker_id:
            del self._ids[key]

    def _save(self, w: Worker, live: bool = True) -> None:
        if self.store is not None:
            self.store.save_worker(w, live=live)

    def register(
        self,
        identity: str,
        address: str,
        *,
        legacy: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> Worker:
        """Add or refresh the worker for (identity, address); ids are stable."""
        now = self.clock()
        known = self._ids.get((identity, address, legacy))
        if known is not None:
            w = self._workers.get(known) or self._forgotten.pop(known)
            w.last_seen = now
            w.labels = dict(labels or {})
            if w.worker_id not in self._workers:
                w.registered_at = now
            self._workers[w.worker_id] = w
            self._save(w)
            return w
        w = Worker(str(uuid.uuid4()), identity, address, now, now, legacy, dict(labels or {}))
        self._workers[w.worker_id] = w
        self._ids[(identity, address, legacy)] = w.worker_id
        self._save(w)
        return w

    def heartbeat(self, worker_id: str, identity: str) -> bool:
        """Refresh; False if the scheduler does not know this worker (re-register)."""
        w = self._workers.get(worker_id)
        if w is None or w.identity != identity:
            return False
        w.last_seen = self.clock()
        self._save(w)
        return True

    def deregister(self, worker_id: str, identity: str) -> bool:
        """Remove a worker; only its own identity may."""
        w = self._workers.get(worker_id)
        if w is None or w.identity != identity:
            return False
        del self._workers[worker_id]
        self._unindex(w)
        if self.store is not None:
            self.store.delete_worker(worker_id)
        return True

    def get(self, worker_id: str) -> Worker:
        """A live worker or UnknownWorker."""
        w = self._workers.get(worker_id)
        if w is None:
            raise UnknownWorker(worker_id, self._forgotten.get(worker_id))
        return w

    def live(self) -> list[Worker]:
        """The registered workers, oldest registration first."""
        return sorted(self._workers.values(), key=lambda w: w.registered_at)

    def sync(self, stored: list[Worker]) -> list[Worker]:
        """Make the live workers those of a shared store (etcd); return those that went.

        With several schedulers the store is the truth: a worker registered
        with another scheduler appears here, one whose lease expired goes
        (kept as forgotten, for messages and stable ids).
        """
        current = {w.worker_id: w for w in stored}
        gone = [w for i, w in self._workers.items() if i not in current]
        for w in gone:
            del self._workers[w.worker_id]
            self._forgotten[w.worker_id] = w
        for i, w in current.items():
            self._forgotten.pop(i, None)
            self._workers[i] = w
            self._ids[(w.identity, w.address, w.legacy)] = i
        if len(self._forgotten) > FORGOTTEN_MAX:
            oldest = sorted(self._forgotten, key=lambda i: self._forgotten[i].last_seen)
            for k in oldest[:FORGOTTEN_DROP]:
                # The store forgot them already (their lease); so does the index.
                self._unindex(self._forgotten.pop(k))
        return gone

    def expire(self) -> list[Worker]:
        """Forget workers not heard from within expire_seconds."""
        cutoff = self.clock() - self.expire_seconds
        # Original workers send no heartbeats (the original never expired them).
        gone = [w for w in self._workers.values() if w.last_seen < cutoff and not w.legacy]
        for w in gone:
            del self._workers[w.worker_id]
            self._forgotten[w.worker_id] = w
            self._save(w, live=False)
        if len(self._forgotten) > FORGOTTEN_MAX:
            oldest = sorted(self._forgotten, key=lambda i: self._forgotten[i].last_seen)
            for k in oldest[:FORGOTTEN_DROP]:
                self._unindex(self._forgotten.pop(k))
                if self.store is not None:
                    self.store.delete_worker(k)
        return gone
