"""What every client call sends and how it is retried (agent.client._calls), directly.

Both clients (sync and asyncio) only carry out these Call values, so the rule that a
start is never retried, and the retry budget within a deadline, are pinned here once
for both; the clients against real agents and a real scheduler are
tests/test_scheduler.py and tests/test_agentctl.py.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from agent.client import (
    STATES,
    AgentClientError,
    NotFound,
    PermissionDenied,
    RetryPolicy,
    Unavailable,
    _calls,
)
from agent.client.errors import convert
from agent.vocabulary import LIMITS, JobState


class _RpcError(grpc.RpcError):  # type: ignore[misc]  # grpc is untyped
    """A failed call as grpc raises it, without a channel."""

    def __init__(self, code: grpc.StatusCode, details: str = "gone") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_only_calls_safe_to_repeat_are_retried() -> None:
    """StartJob, RunJob and DispatchStartJob never retry; query/stop/wait/list/dispatch do."""
    req = _calls.start_request("true", "")
    never: list[_calls.Call[Any]] = [
        _calls.start(req, 1),
        _calls.run(req, 1),
        _calls.dispatch_start("w", req, 1),
    ]
    safe: list[_calls.Call[Any]] = [
        _calls.query("j", 1),
        _calls.query_pb("j", 1),
        _calls.stop("j", 1),
        _calls.wait("j", 1),
        _calls.list_page((), "", 0, "", 1),
        _calls.list_workers(1),
        _calls.dispatch_query("w", "j", 1),
        _calls.dispatch_stop("w", "j", 1),
    ]
    assert [c.retry for c in never] == [False] * 3
    assert all(c.retry for c in safe)
    assert _calls.wait("j", 5).timeout == 5 + _calls.WAIT_MARGIN_S  # deadline past the wait


def test_attempts_retry_unavailable_within_the_deadline_only() -> None:
    """One attempt without a policy; UNAVAILABLE retried until attempts or deadline end."""
    unavailable = _RpcError(grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(Unavailable):
        _calls.Attempts(None, 10).after(unavailable)
    policy = RetryPolicy(attempts=3, initial=0.01, maximum=0.02)
    a = _calls.Attempts(policy, 10)
    assert 0 <= a.after(unavailable) <= 0.01
    assert 0 <= a.after(unavailable) <= 0.02
    with pytest.raises(Unavailable):
        a.after(unavailable)  # attempts used up
    with pytest.raises(NotFound):
        _calls.Attempts(policy, 10).after(_RpcError(grpc.StatusCode.NOT_FOUND))
    with pytest.raises(Unavailable):  # a delay that would pass the deadline is not slept
        _calls.Attempts(RetryPolicy(initial=5.0, maximum=5.0), 0.0).after(unavailable)
    remaining = _calls.Attempts(policy, 10).remaining()
    assert remaining is not None and 9 < remaining <= 10
    assert _calls.Attempts(policy, None).remaining() is None


def test_errors_are_named_after_the_status() -> None:
    """A status without its own class keeps its code in AgentClientError."""
    assert isinstance(convert(_RpcError(grpc.StatusCode.PERMISSION_DENIED)), PermissionDenied)
    e = convert(_RpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert type(e) is AgentClientError and e.code is grpc.StatusCode.INTERNAL
    assert str(e) == "internal: boom"


def test_requests_take_names_from_the_vocabulary() -> None:
    """Limit and state names come from agent.vocabulary; unknown ones are ValueError."""
    req = _calls.start_request("true", "", limits={lim.name: i + 1 for i, lim in enumerate(LIMITS)})
    assert [getattr(req.limits, lim.wire) for lim in LIMITS] == list(range(1, len(LIMITS) + 1))
    with pytest.raises(ValueError, match="unknown limit"):
        _calls.start_request("true", "", limits={"bogus": 1})
    assert list(_calls.list_request(["running", "LOST"]).states) == [
        JobState.RUNNING.value,
        JobState.LOST.value,
    ]
    with pytest.raises(ValueError, match="unknown job state"):
        _calls.list_request(["sleeping"])
    assert {s.value: s.name for s in JobState} == STATES


def test_start_request_carries_every_field() -> None:
    """Arguments, environment, secret indexes and the timeout land in their wire fields;
    no timeout leaves the optional field unset (the agent's default applies)."""
    req = _calls.start_request(
        "bash", "/x.sh", ["a"], {"K": "v"}, timeout_seconds=5, secret_args=[0]
    )
    assert (req.command, req.path, req.timeoutSeconds) == ("bash", "/x.sh", 5)
    assert list(req.args) == ["a"] and dict(req.env) == {"K": "v"} and list(req.secretArgs) == [0]
    assert not _calls.start_request("true", "").HasField("timeoutSeconds")
    assert not _calls.start_request("true", "").HasField("limits")


def test_output_stream_resumes_from_the_last_byte() -> None:
    """After chunks are accepted, the next request starts where they ended."""
    s = _calls.OutputStream("j", 5, True, None)
    assert s.request().offset == 5

    class Chunk:
        offset = 5
        data = b"abc"

    assert s.accept(Chunk()) == b"abc"
    assert s.request().offset == 8 and s.request().follow
    assert _calls.stream_timeout(None, True, 30) is None
    assert _calls.stream_timeout(None, False, 30) == 30
    assert _calls.stream_timeout(2, True, 30) == 2


def test_channel_spec_needs_tls_unless_insecure() -> None:
    """No TLS files and not insecure: ValueError; insecure: plaintext with the options."""
    with pytest.raises(ValueError, match="tls is required"):
        _calls.channel_spec("127.0.0.1:1", None)
    spec = _calls.channel_spec("127.0.0.1:1", None, insecure=True, options=[("x", 1)])
    assert spec.credentials is None and ("x", 1) in spec.options
    assert spec.address == "127.0.0.1:1"
