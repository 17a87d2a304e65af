"""Plain values of the client library: TLS files, job status, workers, retry policy."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent.channel import jittered_delays
from agent.vocabulary import JobState

__all__ = ["STATES", "JobStatus", "RetryPolicy", "TLSFiles", "WorkerInfo"]

# Wire number -> state name, derived from the one vocabulary.
STATES: dict[int, str] = {s.value: s.name for s in JobState}


@dataclass(frozen=True)
class TLSFiles:
    """CA bundle, client certificate and key (paths or PEM bytes)."""

    ca: str | os.PathLike[str] | bytes
    cert: str | os.PathLike[str] | bytes | None = None
    key: str | os.PathLike[str] | bytes | None = None
    server_name: str = ""  # expected name in the server certificate, if not the host

    def load(self) -> tuple[bytes, bytes | None, bytes | None]:
        """The three PEM blobs; OSError if a file cannot be read."""

        def rd(v: str | os.PathLike[str] | bytes | None) -> bytes | None:
            if v is None or isinstance(v, bytes):
                return v
            with open(v, "rb") as f:
                return f.read()

        ca = rd(self.ca)
        assert ca is not None
        return ca, rd(self.cert), rd(self.key)


def timestamp(m: Any, name: str) -> datetime.datetime | None:
    """The Timestamp field ``name`` of ``m`` as an aware datetime, None when unset."""
    if not m.HasField(name):
        return None
    return getattr(m, name).ToDatetime(datetime.timezone.utc)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class JobStatus:
    """A job's status as QueryJob / WaitJob / ListJobs report it."""

    job_id: str
    state: str  # a JobState name (RUNNING, SUCCEEDED, ...), or UNSPECIFIED
    done: bool
    error: bool
    error_text: str
    exit_code: int | None
    signal: int | None
    pid: int
    owner: str
    command: str
    path: str
    args: tuple[str, ...]
    start_time: datetime.datetime | None
    end_time: datetime.datetime | None
    user_cpu: float
    system_cpu: float
    max_rss: int
    output_bytes: int
    output_truncated: bool
    timeout_seconds: int
    request_key: str = ""  # StartJob's requestKey ("" when none, or an agent without keys)

    @property
    def succeeded(self) -> bool:
        """The job ended without error.

        Read from ``state`` when the worker sends one. A worker of the
        original protocol sends only ``done`` and ``error`` (``state`` is
        UNSPECIFIED): then done without error is success.
        """
        if self.state != "UNSPECIFIED":
            return self.state == JobState.SUCCEEDED.name
        return self.done and not self.error

    @classmethod
    def from_pb(cls, m: pb.QueryJobRes, job_id: str = "") -> JobStatus:
        """Build from a QueryJobRes (``job_id`` if the message names none)."""
        return cls(
            job_id=m.jobID or job_id,
            state=STATES.get(m.state, "UNSPECIFIED"),
            done=m.done,
            error=m.error,
            error_text=m.errorText,
            exit_code=m.exitCode if m.HasField("exitCode") else None,
            signal=m.signal if m.HasField("signal") else None,
            pid=m.pid,
            owner=m.owner,
            command=m.command,
            path=m.path,
            args=tuple(m.args),
            start_time=timestamp(m, "startTime"),
            end_time=timestamp(m, "endTime"),
            user_cpu=m.rusage.userCpuSeconds,
            system_cpu=m.rusage.systemCpuSeconds,
            max_rss=m.rusage.maxRssBytes,
            output_bytes=m.outputBytes,
            output_truncated=m.outputTruncated,
            timeout_seconds=m.timeoutSeconds,
            request_key=m.requestKey,
        )


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as the scheduler lists it."""

    worker_id: str
    address: str
    identity: str
    registered_at: datetime.datetime | None
    last_seen: datetime.datetime | None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class RetryPolicy:
    """Backoff for calls that are safe to repeat (never StartJob)."""

    attempts: int = 4
    initial: float = 0.1
    maximum: float = 2.0
    codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def delays(self) -> Iterator[float]:
        """Sleep times between attempts (full jitter)."""
        return jittered_delays(self.initial, self.maximum, attempts=self.attempts)
