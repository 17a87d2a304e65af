"""The scheduler's worker registry (agent.scheduler.registry), pure, with a fake clock.

Stable ids, expiry, and the rest of the narrow interface the service relies on
(``live``, legacy workers, the bound on what is remembered); Registry is used
through the WorkerRegistry protocol where the service would.
"""

from __future__ import annotations

import pytest

from agent.scheduler import registry
from agent.scheduler.registry import LEGACY_IDENTITY, Registry, UnknownWorker, WorkerRegistry

from helpers import FakeClock


def test_registry_ids_are_stable_and_expiry_forgets() -> None:
    """Same identity+address keeps its id, also after being forgotten; heartbeats renew."""
    clock = FakeClock()
    r = Registry(expire_seconds=10, clock=clock)
    w = r.register("agent-1", "10.0.0.1:50000")
    assert r.register("agent-1", "10.0.0.1:50000").worker_id == w.worker_id
    other = r.register("agent-2", "10.0.0.2:50000")
    assert other.worker_id != w.worker_id
    clock.t += 8
    assert r.heartbeat(w.worker_id, "agent-1")
    assert not r.heartbeat(w.worker_id, "agent-2")  # someone else's id
    clock.t += 5
    assert [x.worker_id for x in r.expire()] == [other.worker_id]
    with pytest.raises(UnknownWorker) as e:
        r.get(other.worker_id)
    assert e.value.forgotten is not None
    assert not r.heartbeat(other.worker_id, "agent-2")  # tells it to register again
    assert r.register("agent-2", "10.0.0.2:50000").worker_id == other.worker_id
    assert not r.deregister(w.worker_id, "agent-2")
    assert r.deregister(w.worker_id, "agent-1")
    with pytest.raises(UnknownWorker) as e2:
        r.get(w.worker_id)
    assert e2.value.forgotten is None


def test_live_lists_workers_oldest_registration_first() -> None:
    """live() is every registered worker, oldest first; a refresh keeps its place."""
    clock = FakeClock()
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
    r = Registry(expire_seconds=10, clock=FakeClock())
    w = r.register("a", "127.0.0.1:1")
    assert r.register("b", "127.0.0.1:1").worker_id != w.worker_id
    legacy = r.register(LEGACY_IDENTITY, "127.0.0.1:1", legacy=True)
    assert legacy.worker_id != w.worker_id and legacy.legacy


def test_legacy_workers_never_expire() -> None:
    """Original workers send no heartbeats: expiry passes them over."""
    clock = FakeClock()
    r = Registry(expire_seconds=10, clock=clock)
    old = r.register(LEGACY_IDENTITY, "127.0.0.1:30000", legacy=True)
    new = r.register("agent", "127.0.0.1:30001")
    clock.t += 3600
    assert [w.worker_id for w in r.expire()] == [new.worker_id]
    assert r.get(old.worker_id) is old


def test_a_forgotten_worker_that_comes_back_is_registered_anew() -> None:
    """Re-registering after expiry keeps the id but starts its registration time afresh."""
    clock = FakeClock()
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
    clock = FakeClock()
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


def test_ids_follow_the_index_after_deregistering_and_dropping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deregistered worker, or one dropped from the forgotten, registers under a new id;
    a forgotten one still kept gets its old id back (the index by identity and address)."""
    monkeypatch.setattr(registry, "FORGOTTEN_MAX", 2)
    monkeypatch.setattr(registry, "FORGOTTEN_DROP", 1)
    clock = FakeClock()
    r = Registry(expire_seconds=10, clock=clock)
    gone = r.register("agent", "10.0.0.9:1")
    assert r.deregister(gone.worker_id, "agent")
    assert r.register("agent", "10.0.0.9:1").worker_id != gone.worker_id
    ids = []
    for i in range(3):
        ids.append(r.register("agent", f"10.0.0.{i}:1").worker_id)
        clock.t += 1
    clock.t += 100
    r.register("agent", "10.0.0.9:1")  # stays live
    assert len(r.expire()) == 3  # the longest silent (10.0.0.0) is dropped
    assert r.register("agent", "10.0.0.0:1").worker_id != ids[0]
    assert r.register("agent", "10.0.0.1:1").worker_id == ids[1]
    assert {w.address for w in r.live()} == {"10.0.0.9:1", "10.0.0.0:1", "10.0.0.1:1"}


def test_sync_makes_the_shared_store_the_truth() -> None:
    """With a shared store (etcd), sync lists a worker another scheduler registered, forgets
    one whose lease expired (kept for messages), and re-registering keeps its id."""
    clock = FakeClock()
    mine = Registry(30.0, clock=clock)
    other = Registry(30.0, clock=clock)
    a = other.register("agent", "127.0.0.1:1")
    b = other.register("agent", "127.0.0.1:2")
    assert mine.sync([a, b]) == []
    assert [w.worker_id for w in mine.live()] == [a.worker_id, b.worker_id]
    gone = mine.sync([a])  # b's lease expired
    assert [w.worker_id for w in gone] == [b.worker_id]
    with pytest.raises(UnknownWorker) as e:
        mine.get(b.worker_id)
    assert e.value.forgotten is not None
    assert mine.register("agent", "127.0.0.1:1").worker_id == a.worker_id
    assert mine.register("agent", "127.0.0.1:2").worker_id == b.worker_id


def test_sync_bounds_what_is_remembered_of_forgotten_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers a shared store dropped are remembered up to the same cap as expired ones."""
    monkeypatch.setattr(registry, "FORGOTTEN_MAX", 10)
    monkeypatch.setattr(registry, "FORGOTTEN_DROP", 4)
    clock = FakeClock()
    other = Registry(30.0, clock=clock)
    ws = [other.register("agent", f"127.0.0.1:{i}") for i in range(11)]
    mine = Registry(30.0, clock=clock)
    mine.sync(ws)
    assert len(mine.sync([])) == 11
    assert len(mine._forgotten) == 7
