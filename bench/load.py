"""A load-generating client process, driven by ``bench.run``.

``python -m bench.load SPEC_JSON``: connects (``tls`` ``mtls``, the default,
``tls`` with only a CA, or ``plain``; a channel with default options, as an
original client would), makes one warm-up call (``warmup``: ``list``
ListJobs, ``query`` QueryJob of an unknown id, its error ignored, for a peer
without ListJobs, or ``unary`` the bare server's empty method),
prints ``ready``, then waits for one line ``go {...}`` on stdin naming the
start, warm-up end and end instants (``time.monotonic``, which is the same
clock in every process of the machine) and, for streams, the job id. It
runs its threads, then prints one JSON object with raw timings and its own
CPU time over the measurement window, and exits.

Kinds:

* ``jobs``: each thread starts ``/bin/true`` and waits for it to be done,
  over and over. ``protocol`` ``original``: StartJob, then QueryJob every
  ``poll_ms`` until done (what an unmodified original client does);
  ``wait``: StartJob then one WaitJob long-poll. ``run``: one RunJob call
  (start and wait in one round trip). Until ``end`` or
  ``count`` jobs per thread, whichever comes first.
* ``query``: each thread calls QueryJob on one job id back to back.
* ``unary``: each thread calls the empty method of ``bench.bare`` back to
  back (records shaped like ``query``).
* ``stream``: one StreamJobOutput(follow=true, offset=0); counts bytes and
  checks that offsets are contiguous.

Every loop is bounded (a deadline and a count).
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc

JOB_DEADLINE = 30.0  # a /bin/true job taking longer than this is an error
RPC_TIMEOUT = 30.0
MAX_POLLS = 100_000


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sleep_until(t: float) -> None:
    while True:
        d = t - time.monotonic()
        if d <= 0:
            return
        time.sleep(min(d, 0.5))


class CpuWindow:
    """This process's CPU seconds between two instants (a sampling thread)."""

    def __init__(self, t_from: float, t_to: float) -> None:
        self.values: list[float] = []
        self._t = threading.Thread(target=self._run, args=(t_from, t_to), daemon=True)
        self._t.start()

    def _run(self, t_from: float, t_to: float) -> None:
        _sleep_until(t_from)
        self.values.append(_cpu())
        _sleep_until(t_to)
        self.values.append(_cpu())

    def result(self) -> float | None:
        self._t.join(timeout=5)
        return self.values[1] - self.values[0] if len(self.values) == 2 else None


def channel(spec: dict[str, Any]) -> grpc.Channel:
    """A channel with default options: mTLS, server-only TLS or plaintext."""
    tls = spec.get("tls", "mtls")
    if tls == "plain":
        return grpc.insecure_channel(spec["addr"])
    if tls == "tls":
        return grpc.secure_channel(
            spec["addr"],
            grpc.ssl_channel_credentials(root_certificates=Path(spec["ca"]).read_bytes()),
        )
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(spec["ca"]).read_bytes(),
        private_key=Path(spec["key"]).read_bytes(),
        certificate_chain=Path(spec["cert"]).read_bytes(),
    )
    return grpc.secure_channel(spec["addr"], creds)


def run_jobs(
    stub: pb_grpc.WorkerStub, spec: dict[str, Any], go: dict[str, Any], out: list[dict[str, Any]]
) -> None:
    """One thread of the ``jobs`` kind; appends one dict of raw timings to ``out``."""
    end = go["end"]
    count = int(spec.get("count") or 1 << 30)
    poll = spec.get("poll_ms", 1.0) / 1000.0
    original = spec["protocol"] == "original"
    starts: list[float] = []
    dones: list[float] = []
    start_rpc: list[float] = []
    query_rpc: list[float] = []
    polls: list[int] = []
    failed = 0
    errors: list[str] = []
    req = pb.StartJobReq(command=spec.get("command", "/bin/true"), path=spec.get("path", ""))
    _sleep_until(go["start"])
    for _ in range(count):
        t0 = time.monotonic()
        if t0 >= end:
            break
        try:
            if spec["protocol"] == "run":
                # RunJob: start and wait in one round trip.
                res = stub.RunJob(req, timeout=JOB_DEADLINE + 5)
                job_id = res.jobID
                t1 = time.monotonic()
                start_rpc.append(t1 - t0)
            else:
                job_id = stub.StartJob(req, timeout=RPC_TIMEOUT).jobID
                t1 = time.monotonic()
                start_rpc.append(t1 - t0)
            n = 0
            if spec["protocol"] == "run":
                n = 1
            elif original:
                while n < MAX_POLLS:
                    q0 = time.monotonic()
                    res = stub.QueryJob(pb.QueryJobReq(jobID=job_id), timeout=RPC_TIMEOUT)
                    q1 = time.monotonic()
                    query_rpc.append(q1 - q0)
                    n += 1
                    if res.done or q1 - t0 > JOB_DEADLINE:
                        break
                    time.sleep(poll)
            else:
                res = stub.WaitJob(
                    pb.WaitJobReq(jobID=job_id, waitMillis=int(JOB_DEADLINE * 1000)),
                    timeout=JOB_DEADLINE + 5,
                )
                n = 1
            t2 = time.monotonic()
            if not res.done:
                errors.append(f"job {job_id} not done after {t2 - t0:.1f}s")
                continue
            if res.error:
                failed += 1
                if len(errors) < 5:
                    errors.append(f"job {job_id}: {res.errorText}")
            starts.append(t0)
            dones.append(t2)
            polls.append(n)
        except grpc.RpcError as e:
            if len(errors) < 20:
                errors.append(f"{e.code().name}: {e.details()}")
            time.sleep(0.01)
    out.append(
        {
            "starts": starts,
            "dones": dones,
            "start_rpc": start_rpc,
            "query_rpc": query_rpc,
            "polls": polls,
            "failed": failed,
            "errors": errors,
        }
    )


def run_query(
    stub: pb_grpc.WorkerStub, spec: dict[str, Any], go: dict[str, Any], out: list[dict[str, Any]]
) -> None:
    """One thread of the ``query`` kind."""
    req = pb.QueryJobReq(jobID=spec["job_id"])
    _call_loop(lambda: stub.QueryJob(req, timeout=RPC_TIMEOUT), spec, go, out)


def run_unary(
    call: grpc.UnaryUnaryMultiCallable,
    spec: dict[str, Any],
    go: dict[str, Any],
    out: list[dict[str, Any]],
) -> None:
    """One thread of the ``unary`` kind: ``call`` is the bare server's empty method."""
    _call_loop(lambda: call(b"", timeout=RPC_TIMEOUT), spec, go, out)


def _call_loop(
    call: Any, spec: dict[str, Any], go: dict[str, Any], out: list[dict[str, Any]]
) -> None:
    end = go["end"]
    lat: list[float] = []
    at: list[float] = []
    errors: list[str] = []
    _sleep_until(go["start"])
    for _ in range(int(spec.get("count") or 1 << 30)):
        t0 = time.monotonic()
        if t0 >= end:
            break
        try:
            call()
        except grpc.RpcError as e:
            if len(errors) < 20:
                errors.append(f"{e.code().name}: {e.details()}")
            continue
        t1 = time.monotonic()
        lat.append(t1 - t0)
        at.append(t0)
    out.append({"lat": lat, "at": at, "errors": errors})


def run_stream(
    stub: pb_grpc.WorkerStub, spec: dict[str, Any], go: dict[str, Any], out: list[dict[str, Any]]
) -> None:
    """The ``stream`` kind: follow a job's output from offset 0 to its end."""
    _sleep_until(go["start"])
    t0 = time.monotonic()
    got = 0
    messages = 0
    first: float | None = None
    errors: list[str] = []
    try:
        for msg in stub.StreamJobOutput(
            pb.StreamJobOutputReq(jobID=go["job_id"], offset=0, follow=True),
            timeout=spec.get("timeout", 600),
        ):
            if msg.offset != got:
                errors.append(f"offset {msg.offset} where {got} was expected")
                break
            if first is None:
                first = time.monotonic()
            got += len(msg.data)
            messages += 1
    except grpc.RpcError as e:
        errors.append(f"{e.code().name}: {e.details()}")
    t1 = time.monotonic()
    out.append(
        {
            "bytes": got,
            "messages": messages,
            "t0": t0,
            "t1": t1,
            "first_byte_s": (first - t0) if first else None,
            "errors": errors,
        }
    )


KINDS = {"jobs": run_jobs, "query": run_query, "unary": run_unary, "stream": run_stream}
BARE_METHOD = "/bench.Bare/Empty"  # bench.bare.METHOD (this module stays gRPC-stub only)


def warm_up(ch: grpc.Channel, stub: pb_grpc.WorkerStub, how: str) -> None:
    """One call, so the TLS handshake and HTTP/2 set-up happen before the clock runs."""
    if how == "unary":
        ch.unary_unary(BARE_METHOD)(b"", timeout=RPC_TIMEOUT)
    elif how == "query":
        try:  # a peer without ListJobs: an unknown id answers an error, and that is fine
            stub.QueryJob(pb.QueryJobReq(jobID="bench-warm-up"), timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
    else:
        stub.ListJobs(pb.ListJobsReq(pageSize=1), timeout=RPC_TIMEOUT)


def main(argv: list[str]) -> int:
    """Entry point: one JSON spec argument; the protocol on stdin/stdout is above."""
    spec = json.loads(argv[0])
    ch = channel(spec)
    stub = pb_grpc.WorkerStub(ch)  # type: ignore[no-untyped-call]
    warm_up(ch, stub, spec.get("warmup", "list"))
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line.startswith("go "):
        return 1
    go = json.loads(line[3:])
    body: Any = KINDS[spec["kind"]]
    target: Any = ch.unary_unary(BARE_METHOD) if spec["kind"] == "unary" else stub
    # A timed run reports CPU over exactly the measurement window; a counted
    # one (or a stream) over the whole run.
    timed = spec["kind"] != "stream" and not go.get("counted")
    win = CpuWindow(go["warm"], go["end"]) if timed else None
    c0 = _cpu()
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=body, args=(target, spec, go, results), daemon=True)
        for _ in range(int(spec.get("threads", 1)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=go["end"] - time.monotonic() + JOB_DEADLINE + 60)
    cpu_total = _cpu() - c0
    ch.close()
    print(
        json.dumps(
            {
                "threads": results,
                "cpu_window_s": win.result() if win else None,
                "cpu_total_s": cpu_total,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
