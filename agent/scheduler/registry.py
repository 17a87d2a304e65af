"""The scheduler's worker registry: who is registered, under which id, until when.

The seam between the service and wherever registrations live. The service
asks only what :class:`WorkerRegistry` names (register, heartbeat,
deregister, get, live, expire); :class:`Registry` answers from memory and is
pure (time comes from its ``clock``), so another implementation (a shared
store, a fleet of schedulers) can stand in without touching the service.

Ids are stable for an (identity, address, legacy) triple: a worker that
re-registers, for example after a network cut made the scheduler forget it,
gets its old id back, so jobs started through the scheduler stay
addressable. A worker not heard from for ``expire_seconds`` is forgotten but
remembered for a while, so a call naming it can say when it was last seen.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["LEGACY_IDENTITY", "Registry", "UnknownWorker", "Worker", "WorkerRegistry"]

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


class UnknownWorker(Exception):
    """No such worker; ``forgotten`` tells whether it was known recently."""

    def __init__(self, worker_id: str, forgotten: Worker | None) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.forgotten = forgotten


class WorkerRegistry(Protocol):
    """What the scheduler's service and its serving loop ask of a registry."""

    def register(self, identity: str, address: str, *, legacy: bool = False) -> Worker:
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

    def __init__(self, expire_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.expire_seconds = expire_seconds
        self.clock = clock
        self._workers: dict[str, Worker] = {}
        self._forgotten: dict[str, Worker] = {}  # expired, kept for messages and stable ids

    def register(self, identity: str, address: str, *, legacy: bool = False) -> Worker:
        """Add or refresh the worker for (identity, address); ids are stable."""
        now = self.clock()
        for w in list(self._workers.values()) + list(self._forgotten.values()):
            if w.identity == identity and w.address == address and w.legacy == legacy:
                self._forgotten.pop(w.worker_id, None)
                w.last_seen = now
                if w.worker_id not in self._workers:
                    w.registered_at = now
                self._workers[w.worker_id] = w
                return w
        w = Worker(str(uuid.uuid4()), identity, address, now, now, legacy)
        self._workers[w.worker_id] = w
        return w

    def heartbeat(self, worker_id: str, identity: str) -> bool:
        """Refresh; False if the scheduler does not know this worker (re-register)."""
        w = self._workers.get(worker_id)
        if w is None or w.identity != identity:
            return False
        w.last_seen = self.clock()
        return True

    def deregister(self, worker_id: str, identity: str) -> bool:
        """Remove a worker; only its own identity may."""
        w = self._workers.get(worker_id)
        if w is None or w.identity != identity:
            return False
        del self._workers[worker_id]
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

    def expire(self) -> list[Worker]:
        """Forget workers not heard from within expire_seconds."""
        cutoff = self.clock() - self.expire_seconds
        # Original workers send no heartbeats (the original never expired them).
        gone = [w for w in self._workers.values() if w.last_seen < cutoff and not w.legacy]
        for w in gone:
            del self._workers[w.worker_id]
            self._forgotten[w.worker_id] = w
        if len(self._forgotten) > FORGOTTEN_MAX:
            oldest = sorted(self._forgotten, key=lambda i: self._forgotten[i].last_seen)
            for k in oldest[:FORGOTTEN_DROP]:
                del self._forgotten[k]
        return gone
