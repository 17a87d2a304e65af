"""The etcd store: workers and runs shared by several schedulers (``[store] backend = "etcd"``).

It speaks etcd's v3 gRPC API with the generated stubs of ``aetcd`` (the
optional ``etcd`` extra; its own client speaks only plaintext, so the channel
here is grpcio's, with mTLS) and keeps the synchronous :class:`Store` seam:
each call is one blocking round trip to the cluster (a few milliseconds on a
LAN), made from the scheduler's event loop.

Keys, under ``prefix``:

- ``workers/ID``: a worker (JSON), attached to a lease of ``worker_ttl``
  seconds that each heartbeat renews: a worker that stops renewing
  disappears from the cluster, hence from every scheduler's registry;
- ``runs/ID`` and ``hosts/ID/POSITION``: a run and each of its hosts (JSON);
- ``cancels/ID``: a cancel requested of the run, at any scheduler (its driver cancels it);
- ``owners/ID``: the scheduler that drives the run, attached to that
  scheduler's session lease. When the owner dies, its lease expires, the key
  goes, and another scheduler claims the run (a transaction that only
  succeeds while the key is absent) and takes it over.

Writes of a run and of its hosts are fenced: they succeed only while the run's owner
key is attached to this scheduler's lease, so a scheduler that lost its run (cut off
from etcd, or frozen, past its lease) cannot overwrite what the new owner writes. What
it may still have on its way to a worker, a start, is made harmless by the host's
StartJob requestKey (agent.daemon.startkeys): the agent answers the new owner's job.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from agent.scheduler.registry import Worker
from agent.scheduler.store import HostRecord, RunRecord, StoreError, prunable
from agent.vocabulary import HostState, RunState

__all__ = ["EtcdStore"]

log = logging.getLogger(__name__)

RETRIES = 8  # a call that found a member gone is tried again up to this many times
RETRY_PAUSE_S = 0.1
ATTEMPT_S = 1.0  # one attempt's deadline (a healthy cluster answers in milliseconds)
# While the cluster is known not to answer, a thread asks it this often, each question
# in flight up to ATTEMPT_S: the first answer ends the failing at once, within about
# PROBE_S of the cluster's return (one question at a time would wait out the one sent
# before the return).
PROBE_S = 0.1


def _rpc() -> Any:
    try:
        from aetcd import rpc  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise StoreError(
            "[store] backend = etcd needs the aetcd package: pip install 'worker-agent[etcd]'"
        ) from None
    return rpc


def _end(prefix: bytes) -> bytes:
    """The range end of every key that starts with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdStore:
    """Workers and runs in an etcd cluster, over mTLS (see the module doc)."""

    shared = True

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: Path,
        crt_file: Path,
        key_file: Path,
        prefix: str = "/agent-scheduler/",
        server_name: str = "",
        worker_ttl: float = 30.0,
        session_ttl: int = 10,
        timeout: float = 5.0,
    ) -> None:
        """Connect (lazily, grpc) to ``endpoints``; StoreError names what is wrong."""
        self._rpc = _rpc()
        try:
            creds = grpc.ssl_channel_credentials(
                ca_file.read_bytes(), key_file.read_bytes(), crt_file.read_bytes()
            )
        except OSError as e:
            raise StoreError(f"etcd certificates: {e}") from None
        # Several members: grpc's static resolver, switching member when one fails.
        target = endpoints[0] if len(endpoints) == 1 else "ipv4:" + ",".join(endpoints)
        # grpc checks the certificate against the target's authority, which is
        # not a host name for a list: the first endpoint's host, unless named.
        name = server_name or endpoints[0].rsplit(":", 1)[0].strip("[]")
        options: list[tuple[str, Any]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.ssl_target_name_override", name),
        ]
        self._channel = grpc.secure_channel(target, creds, options=options)
        self._kv = self._rpc.KVStub(self._channel)
        self._lease = self._rpc.LeaseStub(self._channel)
        self.prefix = prefix.encode()
        self.timeout = timeout
        self.worker_ttl = max(1, math.ceil(worker_ttl))
        self.session_ttl = session_ttl
        self._worker_leases: dict[str, int] = {}
        self.session = 0  # this scheduler's lease (owns its runs); 0 until opened
        self.endpoints = list(endpoints)
        self._down = ""  # why calls fail at once (the cluster did not answer), or ""
        self._down_lock = threading.Lock()
        self._closed = threading.Event()

    # ------------------------------------------------------------ plumbing

    def _call(self, method: Any, request: Any) -> Any:
        """One call; UNAVAILABLE (a member went away) or no answer within ATTEMPT_S (a
        write lost with a dead leader waits for etcd's own request timeout, about 7 s)
        is tried again, on another member if need be, for at most ``timeout`` in all.

        Every call made here is safe to repeat (puts of whole values, reads,
        lease renewals; :meth:`claim_run` checks what a lost answer did).

        A call that got no answer for all that time marks the cluster down: until a probe
        (a thread, every PROBE_S) finds it answering again, calls fail at once. Each call
        is made from the scheduler's event loop and blocks it: without a quorum, every
        heartbeat and registration would hold the loop ``timeout`` in turn, and nothing
        (a RegisterWorker, a run's follower) would be answered at all, not even "the
        store is unavailable".
        """
        down = self._down
        if down:
            raise StoreError(down)
        deadline = time.monotonic() + self.timeout
        retry = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        for attempt in range(RETRIES + 1):
            left = deadline - time.monotonic()
            try:
                return method(request, timeout=max(0.1, min(ATTEMPT_S, left)))
            except grpc.RpcError as e:
                if e.code() not in retry or attempt == RETRIES or left < ATTEMPT_S:
                    why = f"etcd {','.join(self.endpoints)}: {e.code().name}: {e.details()}"
                    if e.code() in retry:
                        self._mark_down(why)
                    raise StoreError(why) from None
                time.sleep(RETRY_PAUSE_S)
        raise AssertionError("unreachable")

    def _mark_down(self, why: str) -> None:
        """The cluster did not answer a whole call's time: fail calls at once until the
        probe thread gets an answer (a linearizable read: it needs a quorum, as writes do)."""
        with self._down_lock:
            if self._down or self._closed.is_set():
                return
            self._down = f"{why} (calls fail at once until it answers again)"
        log.warning("etcd does not answer: %s; asking it again every %.1f s", why, PROBE_S)
        threading.Thread(target=self._probe, name="etcd-probe", daemon=True).start()

    def _probe(self) -> None:
        """Ask until an answer comes (or the store is closed). Whatever a question raises,
        the thread goes on: if it ended, calls would fail at once for good."""
        request = self._rpc.RangeRequest(key=self.prefix, limit=1)
        while self._down and not self._closed.wait(PROBE_S):
            try:
                self._kv.Range.future(request, timeout=ATTEMPT_S).add_done_callback(self._answered)
            except Exception as e:  # a closed channel: ValueError; anything else: said
                if not self._closed.is_set():
                    log.warning("etcd probe: %s", e)

    def _answered(self, f: Any) -> None:
        # (A question cancelled, by the store's close, is no answer.)
        if self._down and not f.cancelled() and f.exception() is None:
            self._down = ""
            log.warning("etcd answers again")

    def _put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        self._call(self._kv.Put, self._rpc.PutRequest(key=key, value=value, lease=lease))

    def _range(self, prefix: bytes) -> list[Any]:
        r = self._call(self._kv.Range, self._rpc.RangeRequest(key=prefix, range_end=_end(prefix)))
        return list(r.kvs)

    def _grant(self, ttl: int) -> int:
        return int(self._call(self._lease.LeaseGrant, self._rpc.LeaseGrantRequest(TTL=ttl)).ID)

    def _refresh(self, lease: int) -> bool:
        """Renew a lease once; False when it has expired."""

        def keepalive(req: Any, timeout: float) -> int:
            for reply in self._lease.LeaseKeepAlive(iter([req]), timeout=timeout):
                return int(reply.TTL)
            return 0

        return bool(self._call(keepalive, self._rpc.LeaseKeepAliveRequest(ID=lease)) > 0)

    def _key(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    # ------------------------------------------------------------ session

    def keep_alive(self) -> bool:
        """Open or renew this scheduler's session lease; False if it had expired.

        An expired session means this scheduler's runs may have been taken over:
        the caller abandons them. A new session is opened at once.
        """
        if self.session and self._refresh(self.session):
            return True
        lost = bool(self.session)
        self.session = self._grant(self.session_ttl)
        return not lost

    def claim_run(self, run_id: str) -> bool:
        """Become the owner of a run whose owner key is absent (a transaction)."""
        rpc = self._rpc
        key = self._key("owners", run_id)
        r = self._call(
            self._kv.Txn,
            rpc.TxnRequest(
                compare=[
                    rpc.Compare(
                        result=rpc.Compare.EQUAL,
                        target=rpc.Compare.CREATE,
                        key=key,
                        create_revision=0,
                    )
                ],
                success=[
                    rpc.RequestOp(
                        request_put=rpc.PutRequest(key=key, value=b"owned", lease=self.session)
                    )
                ],
            ),
        )
        if r.succeeded:
            return True
        # An answer lost on the way and the claim retried: it may be ours already.
        r = self._call(self._kv.Range, rpc.RangeRequest(key=key))
        return bool(r.kvs) and int(r.kvs[0].lease) == self.session

    def release_run(self, run_id: str) -> None:
        """Drop the ownership of a finished run."""
        key = self._key("owners", run_id)
        self._call(self._kv.DeleteRange, self._rpc.DeleteRangeRequest(key=key))

    def orphaned_runs(self) -> list[RunRecord]:
        """RUNNING runs whose owner's lease has expired (no owner key), and those owned
        by this scheduler's session (the caller skips the ones it drives), oldest first."""
        head = self._key("owners", "")
        others = {
            kv.key[len(head) :].decode()
            for kv in self._range(head)
            if int(kv.lease) != self.session
        }
        return [r for r in self.unfinished_runs() if r.run_id not in others]

    # ------------------------------------------------------------ workers

    def workers(self) -> list[tuple[Worker, bool]]:
        """Every live worker (forgotten ones are not kept: their lease took them)."""
        out = []
        for kv in self._range(self._key("workers", "")):
            d = json.loads(kv.value)
            out.append((Worker(**d), True))
        return sorted(out, key=lambda t: t[0].registered_at)

    def save_worker(self, w: Worker, *, live: bool) -> None:
        """Write a live worker under its lease (renewed here), or delete a forgotten one."""
        if not live:
            self.delete_worker(w.worker_id)
            return
        lease = self._worker_leases.get(w.worker_id, 0)
        if not lease or not self._refresh(lease):
            lease = self._grant(self.worker_ttl)
            self._worker_leases[w.worker_id] = lease
        self._put(self._key("workers", w.worker_id), json.dumps(asdict(w)).encode(), lease)

    def delete_worker(self, worker_id: str) -> None:
        """Forget a worker for good."""
        self._worker_leases.pop(worker_id, None)
        key = self._key("workers", worker_id)
        self._call(self._kv.DeleteRange, self._rpc.DeleteRangeRequest(key=key))

    # ------------------------------------------------------------ runs

    def save_run(self, run: RunRecord) -> None:
        """Write a run's own fields, then every one of its hosts."""
        d = {k: v for k, v in asdict(run).items() if k != "hosts"}
        d["job"] = base64.b64encode(run.job).decode()
        d["targets"] = base64.b64encode(run.targets).decode()
        d["state"] = run.state.value
        # Fenced like its hosts: a frozen owner that wakes after a takeover cannot mark the
        # run DONE (or anything) under the scheduler that now drives it.
        self._owned_put(run.run_id, self._key("runs", run.run_id), json.dumps(d).encode())
        for h in run.hosts:
            self.save_host(run.run_id, h)

    async def flushed(self) -> None:
        """Nothing to wait for: each write is made (one round trip) when it is called."""

    def save_host(self, run_id: str, host: HostRecord) -> None:
        """Write one host, only while this scheduler owns the run (fenced, see module doc)."""
        d = asdict(host)
        d["state"] = host.state.value
        key = self._key("hosts", run_id, f"{host.position:08d}")
        self._owned_put(run_id, key, json.dumps(d).encode())

    def _owned_put(self, run_id: str, key: bytes, value: bytes) -> None:
        """Put ``key`` in one transaction with the check that this scheduler's session still
        owns ``run_id``; StoreError when it does not (taken over)."""
        rpc = self._rpc
        owner = self._key("owners", run_id)
        r = self._call(
            self._kv.Txn,
            rpc.TxnRequest(
                compare=[
                    rpc.Compare(
                        result=rpc.Compare.EQUAL,
                        target=rpc.Compare.LEASE,
                        key=owner,
                        lease=self.session,
                    )
                ],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))],
            ),
        )
        if not r.succeeded:
            raise StoreError(f"run {run_id}: no longer owned by this scheduler (taken over)")

    def runs(self, limit: int) -> list[RunRecord]:
        """The newest ``limit`` runs, newest first, with their hosts."""
        heads = [json.loads(kv.value) for kv in self._range(self._key("runs", ""))]
        heads.sort(key=lambda d: d["created_at"], reverse=True)
        return [self._with_hosts(d) for d in heads[:limit]]

    def run(self, run_id: str) -> RunRecord | None:
        """One run with its hosts, or None."""
        r = self._call(self._kv.Range, self._rpc.RangeRequest(key=self._key("runs", run_id)))
        return self._with_hosts(json.loads(r.kvs[0].value)) if r.kvs else None

    def _with_hosts(self, d: dict[str, Any]) -> RunRecord:
        d = dict(d)
        d["job"] = base64.b64decode(d["job"])
        d["targets"] = base64.b64decode(d["targets"])
        d["state"] = RunState(d["state"])
        run = RunRecord(**d)
        for kv in self._range(self._key("hosts", run.run_id, "")):
            h = json.loads(kv.value)
            h["state"] = HostState(h["state"])
            run.hosts.append(HostRecord(**h))
        return run

    def unfinished_runs(self) -> list[RunRecord]:
        """The runs recorded as RUNNING, oldest first."""
        runs = [r for r in self.runs(1 << 30) if r.state is RunState.RUNNING]
        return sorted(runs, key=lambda r: r.created_at)

    def prune_runs(self, ended_before: float, keep: int) -> int:
        """Delete the finished runs :func:`~agent.scheduler.store.prunable` names, each
        with its hosts (by prefix) in one transaction that succeeds only while nobody owns
        the run and its record is as read (another scheduler may prune at the same time)."""
        heads = {}
        for kv in self._range(self._key("runs", "")):
            d = json.loads(kv.value)
            heads[d["run_id"]] = (kv, d)
        ids = prunable(
            (
                (i, d["created_at"], d["end_time"], RunState(d["state"]))
                for i, (_, d) in heads.items()
            ),
            ended_before,
            keep,
        )
        pruned = 0
        for run_id in ids:
            txn = _prune_txn(self._rpc, heads[run_id][0], self._key, run_id)
            pruned += int(self._call(self._kv.Txn, txn).succeeded)
        return pruned

    def request_cancel(self, run_id: str) -> None:
        """Record the run's cancel (``cancels/ID``, no lease: it outlives the requester;
        pruned with the run): the scheduler that drives the run sees it at its next beat."""
        self._put(self._key("cancels", run_id), b"1")

    def cancel_requests(self) -> set[str]:
        """The runs whose cancel was requested."""
        head = self._key("cancels", "")
        return {kv.key[len(head) :].decode() for kv in self._range(head)}

    def close(self) -> None:
        """Close the channel (leases are left to expire: a takeover needs that)."""
        self._closed.set()
        self._channel.close()


def _prune_txn(rpc: Any, head: Any, key: Callable[..., bytes], run_id: str) -> Any:
    """The transaction that deletes a finished run (its ``head`` as read), its hosts and its
    cancel request, only while nobody owns it and its record is as read."""
    hosts = key("hosts", run_id, "")

    def delete(k: bytes, end: bytes = b"") -> Any:
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k, range_end=end))

    return rpc.TxnRequest(
        compare=[
            rpc.Compare(
                result=rpc.Compare.EQUAL,
                target=rpc.Compare.CREATE,
                key=key("owners", run_id),
                create_revision=0,
            ),
            rpc.Compare(
                result=rpc.Compare.EQUAL,
                target=rpc.Compare.MOD,
                key=head.key,
                mod_revision=head.mod_revision,
            ),
        ],
        success=[delete(head.key), delete(hosts, _end(hosts)), delete(key("cancels", run_id))],
    )
