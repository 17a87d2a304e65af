"""What every client call sends and how it is retried (agent.client._calls), directly.

Both clients (sync and asyncio) only carry out these Call values, so the rule that a
start is never retried, and the retry budget within a deadline, live here.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from agent.client import _calls
from agent.client.errors import NotFound, Unavailable
from agent.client.model import RetryPolicy


class RpcError(grpc.RpcError):  # type: ignore[misc]
    """A failed call as grpc raises it: a code and details."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_starts_are_never_retried_and_the_rest_are() -> None:
    """StartJob, RunJob and DispatchStartJob are not safe to repeat; every other call is."""
    req = _calls.start_request("true", "")
    never: list[_calls.Call[Any]] = [
        _calls.start(req, 1),
        _calls.run(req, 1),
        _calls.dispatch_start("w", req, 1),
    ]
    assert [c.retry for c in never] == [False, False, False]
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
    assert all(c.retry for c in safe)


def test_start_request_sets_limits_by_wire_name() -> None:
    """Limits by their config name land in the wire field; an unknown name is refused."""
    req = _calls.start_request(
        "bash",
        "/x.sh",
        ["a"],
        {"K": "v"},
        timeout_seconds=5,
        limits={"memory_bytes": 1 << 20},
        secret_args=[0],
    )
    assert req.limits.memoryBytes == 1 << 20 and req.timeoutSeconds == 5
    assert list(req.args) == ["a"] and dict(req.env) == {"K": "v"} and list(req.secretArgs) == [0]
    assert not _calls.start_request("true", "").HasField("timeoutSeconds")
    with pytest.raises(ValueError, match="unknown limit 'rss'"):
        _calls.start_request("true", "", limits={"rss": 1})


def test_list_request_takes_state_names() -> None:
    """States by name (any case) become their wire numbers; an unknown one is refused."""
    assert list(_calls.list_request(["running", "FAILED"]).states) == [1, 3]
    with pytest.raises(ValueError, match="unknown job state"):
        _calls.list_request(["sleeping"])


def test_wait_asks_the_agent_for_less_than_the_call_deadline() -> None:
    """WaitJob asks for the wait in ms and gives the call a margin beyond it."""
    call = _calls.wait("j", 3.0)
    assert call.request.waitMillis == 3000
    assert call.timeout == 3.0 + _calls.WAIT_MARGIN_S


def test_a_single_attempt_raises_the_converted_error() -> None:
    """No policy (a start): the first failure is raised, named after its status."""
    attempts = _calls.Attempts(None, 10)
    with pytest.raises(Unavailable):
        attempts.after(RpcError(grpc.StatusCode.UNAVAILABLE, "down"))


def test_only_retryable_codes_are_retried_within_the_policy() -> None:
    """UNAVAILABLE gets a delay up to attempts - 1 times; NOT_FOUND is raised at once."""
    attempts = _calls.Attempts(RetryPolicy(attempts=3, initial=0.01, maximum=0.02), 10)
    assert 0 <= attempts.after(RpcError(grpc.StatusCode.UNAVAILABLE)) <= 0.01
    with pytest.raises(NotFound, match="no job"):
        attempts.after(RpcError(grpc.StatusCode.NOT_FOUND, "no job"))
    assert 0 <= attempts.after(RpcError(grpc.StatusCode.UNAVAILABLE)) <= 0.02
    with pytest.raises(Unavailable):
        attempts.after(RpcError(grpc.StatusCode.UNAVAILABLE))


def test_no_retry_past_the_deadline() -> None:
    """A delay that would end after the deadline is not slept: the error is raised."""
    attempts = _calls.Attempts(RetryPolicy(attempts=10, initial=5.0, maximum=5.0), 0.001)
    with pytest.raises(Unavailable):
        for _ in range(10):
            attempts.after(RpcError(grpc.StatusCode.UNAVAILABLE))


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
