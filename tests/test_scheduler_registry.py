"""The scheduler's worker registry (agent.scheduler.registry), pure, with a fake clock.

Stable ids and expiry are pinned in tests/test_scheduler.py; these pin the rest of
the narrow interface the service relies on (``live``, legacy workers, the bound on
what is remembered) and that Registry satisfies the WorkerRegistry protocol.
"""

from __future__ import annotations

import pytest

from agent.scheduler import registry
from agent.scheduler.registry import LEGACY_IDENTITY, Registry, UnknownWorker, WorkerRegistry


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_live_lists_workers_oldest_registration_first() -> None:
    """live() is every registered worker, oldest first; a refresh keeps its place."""
    clock = Clock()
    r: WorkerRegistry = Registry(expire_seconds=10, clock=clock)
    a = r.register("a", "10.0.0.1:1")
    clock.t += 1
    b = r.register("b", "10.0.0.2:1")
    clock.t += 1
    r.register("a", "10.0.0.1:1")  # a refresh, not a new registration
    assert [w.worker_id for w in r.live()] == [a.worker_id, b.worker_id]
    assert r.deregister(a.worker_id, "a")
    assert [w.worker_id for w in r.live()] == [b.worker_id]


def test_a_worker_is_its_identity_address_and_listener() -> None:
    """The same address under another identity, or on the legacy listener, is another worker."""
    r = Registry(expire_seconds=10, clock=Clock())
    w = r.register("a", "127.0.0.1:1")
    assert r.register("b", "127.0.0.1:1").worker_id != w.worker_id
    legacy = r.register(LEGACY_IDENTITY, "127.0.0.1:1", legacy=True)
    assert legacy.worker_id != w.worker_id and legacy.legacy


def test_legacy_workers_never_expire() -> None:
    """Original workers send no heartbeats: expiry passes them over."""
    clock = Clock()
    r = Registry(expire_seconds=10, clock=clock)
    old = r.register(LEGACY_IDENTITY, "127.0.0.1:30000", legacy=True)
    new = r.register("agent", "127.0.0.1:30001")
    clock.t += 3600
    assert [w.worker_id for w in r.expire()] == [new.worker_id]
    assert r.get(old.worker_id) is old


def test_a_forgotten_worker_that_comes_back_is_registered_anew() -> None:
    """Re-registering after expiry keeps the id but starts its registration time afresh."""
    clock = Clock()
    r = Registry(expire_seconds=10, clock=clock)
    w = r.register("a", "10.0.0.1:1")
    clock.t += 20
    r.expire()
    back = r.register("a", "10.0.0.1:1")
    assert back.worker_id == w.worker_id and back.registered_at == clock.t


def test_what_is_remembered_of_forgotten_workers_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the cap the longest silent forgotten workers are dropped: unknown, not forgotten."""
    monkeypatch.setattr(registry, "FORGOTTEN_MAX", 4)
    monkeypatch.setattr(registry, "FORGOTTEN_DROP", 2)
    clock = Clock()
    r = Registry(expire_seconds=10, clock=clock)
    ids = []
    for i in range(5):
        ids.append(r.register(f"w{i}", f"10.0.0.{i}:1").worker_id)
        clock.t += 1
    clock.t += 100
    assert len(r.expire()) == 5
    for dropped in ids[:2]:
        with pytest.raises(UnknownWorker) as e:
            r.get(dropped)
        assert e.value.forgotten is None
    for kept in ids[2:]:
        with pytest.raises(UnknownWorker) as e:
            r.get(kept)
        assert e.value.forgotten is not None
