"""Admission (agent.keeper.admission) on plain data: capacity, limits, timeout, the order.

No process and no server: the policy is a real parsed one (its file checks run on
/bin/true), the kernel's limits are either read from this process or given by hand.
How the limits vocabulary names what enforces each limit is
tests/test_limits_vocabulary.py; that admit reads the kernel's limits only for the
limits asked for is tests/test_rpc_caches.py.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Mapping
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.keeper import admission, policyfile
from agent.keeper.admission import (
    CPU_HARD_EXTRA,
    MAX_STORED_INT,
    MAX_TIMEOUT_SECONDS,
    RLIM_MAX,
    Rules,
    StartRequest,
)
from agent.keeper.errors import (
    AgentError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from agent.vocabulary import LIMIT_NAMES, RLIMITS, Kind

POLICY = policyfile.parse(
    """
version: 1
entries:
  - name: "true"
    command: /bin/true
    aliases: ["true"]
    args: {max_count: 3}
"""
)
RULES = Rules(
    max_running=2,
    default_timeout=60,
    max_timeout=3600,
    default_limits={"cpu_seconds": 10},
    max_limits={"cpu_seconds": 100},
)


def _refusal(call: Callable[[], object]) -> AgentError:
    """The AgentError a zero-argument callable raises."""
    with pytest.raises(AgentError) as e:
        call()
    return e.value


def _req(
    command: str = "true",
    path: str = "x",
    args: tuple[str, ...] = (),
    limits: Mapping[str, int | None] | None = None,
    secret_args: tuple[int, ...] = (),
) -> StartRequest:
    return StartRequest("alice", command, path, args, limits=limits or {}, secret_args=secret_args)


# ---------------------------------------------------------------- capacity


def test_capacity_admits_below_max_running() -> None:
    """Fewer busy jobs than max_running: the start may go on."""
    admission.capacity(RULES, busy=0, accepting=True)
    admission.capacity(RULES, busy=RULES.max_running - 1, accepting=True)


@pytest.mark.parametrize("busy", [2, 3, 100])
def test_capacity_refuses_at_max_running(busy: int) -> None:
    """max_running busy jobs (or more): RESOURCE_EXHAUSTED naming the count and the limit."""
    e = _refusal(lambda: admission.capacity(RULES, busy=busy, accepting=True))
    assert isinstance(e, ResourceExhausted) and e.kind is Kind.RESOURCE_EXHAUSTED
    assert e.rule == "max-running"
    assert e.message.startswith(f"{busy} jobs are running, the limit is 2;")


def test_a_stopping_agent_refuses_before_counting() -> None:
    """Shutting down is UNAVAILABLE, whether or not there is room."""
    for busy in (0, 5):
        e = _refusal(partial(admission.capacity, RULES, busy=busy, accepting=False))
        assert isinstance(e, Unavailable) and e.rule == "shutting-down"
        assert e.message == "the agent is shutting down and accepts no new jobs"


# ---------------------------------------------------------------- limits


def test_resolve_limits_takes_defaults_then_requests() -> None:
    """Every limit name is in the result: the request's value, else the default, else 0."""
    out = admission.resolve_limits({"open_files": 64}, {"cpu_seconds": 10, "open_files": 5}, {})
    assert set(out) == set(LIMIT_NAMES)
    assert out["cpu_seconds"] == 10 and out["open_files"] == 64
    assert all(out[n] == 0 for n in LIMIT_NAMES if n not in ("cpu_seconds", "open_files"))


def test_resolve_limits_none_means_the_default_and_zero_means_none() -> None:
    """A None in the request takes the default; an explicit 0 asks for no limit."""
    assert (
        admission.resolve_limits({"cpu_seconds": None}, {"cpu_seconds": 7}, {})["cpu_seconds"] == 7
    )
    assert admission.resolve_limits({"cpu_seconds": 0}, {"cpu_seconds": 7}, {})["cpu_seconds"] == 0


def test_resolve_limits_ignores_names_it_does_not_know() -> None:
    """Only the vocabulary's limits come out (the wire message has no others)."""
    assert "bogus" not in admission.resolve_limits({"bogus": 5}, {}, {})


def test_a_limit_at_its_maximum_is_admitted_and_above_is_refused() -> None:
    """The maximum itself is allowed; one more is INVALID_ARGUMENT naming limit and maximum."""
    assert admission.resolve_limits({"cpu_seconds": 100}, {}, {"cpu_seconds": 100}) == {
        **dict.fromkeys(LIMIT_NAMES, 0),
        "cpu_seconds": 100,
    }
    e = _refusal(lambda: admission.resolve_limits({"cpu_seconds": 101}, {}, {"cpu_seconds": 100}))
    assert isinstance(e, InvalidArgument) and e.rule == "limit-above-maximum"
    assert e.message == "limits: cpu_seconds = 101 is above the maximum of 100"


def test_no_limit_is_above_any_maximum() -> None:
    """With a maximum configured, "unlimited" (0, asked or by default) is refused."""
    e = _refusal(lambda: admission.resolve_limits({"cpu_seconds": 0}, {}, {"cpu_seconds": 100}))
    assert e.message == "limits: cpu_seconds = unlimited is above the maximum of 100"
    e = _refusal(lambda: admission.resolve_limits({}, {}, {"memory_bytes": 1 << 20}))
    assert "memory_bytes = unlimited" in e.message


def test_a_default_above_the_maximum_is_refused_too() -> None:
    """The default is held to the maximum like a request (config may check it, admit does)."""
    e = _refusal(lambda: admission.resolve_limits({}, {"cpu_seconds": 9}, {"cpu_seconds": 5}))
    assert "cpu_seconds = 9 is above the maximum of 5" in e.message


def test_negative_limits_are_refused() -> None:
    """A negative limit is INVALID_ARGUMENT ("must not be negative"), maximum or not."""
    e = _refusal(lambda: admission.resolve_limits({"open_files": -1}, {}, {}))
    assert e.message == "limits: open_files must not be negative"


def test_every_limit_problem_is_named_at_once() -> None:
    """Several bad limits: one refusal naming each of them, in the vocabulary's order."""
    e = _refusal(
        lambda: admission.resolve_limits(
            {"cpu_seconds": 101, "open_files": -3}, {}, {"cpu_seconds": 100}
        )
    )
    assert e.message == (
        "limits: cpu_seconds = 101 is above the maximum of 100; open_files must not be negative"
    )


@given(
    want=st.one_of(st.none(), st.integers(min_value=0, max_value=1000)),
    default=st.integers(min_value=0, max_value=1000),
    maximum=st.integers(min_value=0, max_value=1000),
)
def test_resolved_limits_never_exceed_their_maximum(
    want: int | None, default: int, maximum: int
) -> None:
    """Property: a resolved limit is within its maximum (and not "none" under one), or refused."""
    try:
        out = admission.resolve_limits(
            {"cpu_seconds": want}, {"cpu_seconds": default}, {"cpu_seconds": maximum}
        )
    except InvalidArgument:
        value = default if want is None else want
        assert maximum and (value == 0 or value > maximum)
        return
    assert out["cpu_seconds"] == (default if want is None else want)
    if maximum:
        assert 0 < out["cpu_seconds"] <= maximum


# ---------------------------------------------------------------- the kernel's limits


def test_kernel_hard_limits_reads_only_rlimits() -> None:
    """The agent's own hard limits, for the limits enforced as rlimits only; unlimited is
    RLIM_MAX."""
    got = admission.kernel_hard_limits(LIMIT_NAMES)
    assert set(got) == set(RLIMITS)
    for name, kernel in RLIMITS.items():
        hard = resource.getrlimit(getattr(resource, kernel))[1]
        assert got[name] == (RLIM_MAX if hard == resource.RLIM_INFINITY else hard)
    assert admission.kernel_hard_limits([]) == {}


HARD = {"open_files": 1024, "cpu_seconds": 1000}


def _kernel(limits: Mapping[str, int], hard: Mapping[str, int] = HARD) -> None:
    admission.check_kernel_limits(limits, hard)


def test_limits_up_to_the_agents_hard_limit_pass() -> None:
    """open_files at the hard limit, cpu_seconds at the hard limit minus the SIGKILL margin."""
    _kernel({"open_files": 1024, "cpu_seconds": 1000 - CPU_HARD_EXTRA})


def test_an_rlimit_above_the_agents_hard_limit_is_refused() -> None:
    """One above the hard limit: INVALID_ARGUMENT naming the limit and the agent's own."""
    e = _refusal(lambda: _kernel({"open_files": 1025}))
    assert isinstance(e, InvalidArgument) and e.rule == "limit-above-kernel"
    assert e.message == "limits: open_files = 1025 is above the agent's own hard limit of 1024"


def test_cpu_seconds_counts_the_margin_for_sigkill() -> None:
    """The job's CPU hard limit is the request + 2, so that sum must fit under the agent's."""
    e = _refusal(lambda: _kernel({"cpu_seconds": 1000 - CPU_HARD_EXTRA + 1}))
    assert e.message == (
        "limits: cpu_seconds = 999 is above the agent's own hard limit of 1000 "
        "(the job's hard limit is cpu_seconds + 2)"
    )


def test_zero_is_not_checked_against_the_kernel() -> None:
    """0 ("no limit") is the maxima's question, not the kernel's."""
    _kernel({"open_files": 0, "cpu_seconds": 0}, {"open_files": 1, "cpu_seconds": 1})


@pytest.mark.parametrize("value", [RLIM_MAX, RLIM_MAX + 5])
def test_an_rlimit_that_would_mean_unlimited_is_refused(value: int) -> None:
    """A value whose kernel form is RLIM_INFINITY or beyond is refused even with no hard limit
    (cpu_seconds within 2 of it too: its hard limit would overflow); just below it, the
    value is still too large for the history."""
    unlimited = {"open_files": RLIM_MAX, "cpu_seconds": RLIM_MAX}
    e = _refusal(lambda: _kernel({"open_files": value}, unlimited))
    assert "does not fit in the kernel's limit type (it would mean unlimited)" in e.message
    e = _refusal(lambda: _kernel({"cpu_seconds": RLIM_MAX - CPU_HARD_EXTRA}, unlimited))
    assert "cpu_seconds" in e.message and "does not fit" in e.message
    e = _refusal(lambda: _kernel({"open_files": RLIM_MAX - 1}, unlimited))
    assert "is too large" in e.message


def test_limits_must_fit_the_history() -> None:
    """With no hard limit, and for limits that are no rlimit, the value must fit SQLite."""
    unlimited = {"open_files": RLIM_MAX}
    _kernel({"open_files": MAX_STORED_INT}, unlimited)
    _kernel({"memory_bytes": MAX_STORED_INT}, {})
    e = _refusal(lambda: _kernel({"open_files": MAX_STORED_INT + 1}, unlimited))
    assert (
        e.message
        == f"limits: open_files = {MAX_STORED_INT + 1} is too large (at most {MAX_STORED_INT})"
    )
    e = _refusal(lambda: _kernel({"memory_bytes": MAX_STORED_INT + 1}, {}))
    assert "memory_bytes" in e.message and "too large" in e.message


def test_every_kernel_problem_is_named_at_once() -> None:
    """Several limits the kernel cannot give: one refusal naming each."""
    e = _refusal(lambda: _kernel({"open_files": 2000, "memory_bytes": MAX_STORED_INT + 1}))
    assert "open_files = 2000" in e.message and "memory_bytes" in e.message
    assert e.message.count(";") == 1


# ---------------------------------------------------------------- timeout


def test_the_timeout_defaults_and_is_bounded_by_the_maximum() -> None:
    """None takes the default; the maximum itself passes; one more second is refused."""
    assert admission.resolve_timeout(None, 60, 3600) == 60
    assert admission.resolve_timeout(3600, 60, 3600) == 3600
    e = _refusal(lambda: admission.resolve_timeout(3601, 60, 3600))
    assert isinstance(e, InvalidArgument) and e.rule == "timeout-above-maximum"
    assert e.message == "timeoutSeconds = 3601 is above the maximum of 3600"


def test_no_timeout_is_above_a_maximum() -> None:
    """0 (none), asked or by default, is refused when a maximum is configured."""
    e = _refusal(lambda: admission.resolve_timeout(0, 60, 3600))
    assert e.message == "timeoutSeconds = none is above the maximum of 3600"
    assert isinstance(_refusal(lambda: admission.resolve_timeout(None, 0, 10)), InvalidArgument)


def test_without_a_maximum_any_timeout_the_wire_can_carry_passes() -> None:
    """No maximum: 0 and the largest uint32 pass; more is refused as too large."""
    assert admission.resolve_timeout(0, 60, 0) == 0
    assert admission.resolve_timeout(None, 0, 0) == 0
    assert admission.resolve_timeout(MAX_TIMEOUT_SECONDS, 0, 0) == MAX_TIMEOUT_SECONDS
    e = _refusal(lambda: admission.resolve_timeout(MAX_TIMEOUT_SECONDS + 1, 0, 0))
    assert e.rule == "timeout-above-maximum"
    assert e.message == (
        f"timeoutSeconds = {MAX_TIMEOUT_SECONDS + 1} is too large (at most {MAX_TIMEOUT_SECONDS})"
    )


# ---------------------------------------------------------------- admit


def test_admit_gives_the_plan_limits_and_timeout() -> None:
    """An allowed request: the policy's plan, the resolved limits and the default timeout."""
    got = admission.admit(_req(args=("a",)), RULES, POLICY)
    try:
        assert got.plan.executable == os.path.realpath("/bin/true")
        assert got.plan.argv[1:] == ("x", "a")
        assert got.limits["cpu_seconds"] == 10 and set(got.limits) == set(LIMIT_NAMES)
        assert got.timeout == 60
    finally:
        got.plan.close()


def test_admit_refuses_what_the_policy_refuses() -> None:
    """A command the policy does not list is the policy's refusal (PERMISSION_DENIED)."""
    e = _refusal(lambda: admission.admit(_req(command="/bin/sh"), RULES, POLICY))
    assert isinstance(e, PermissionDenied)
    e = _refusal(lambda: admission.admit(_req(args=("a", "b", "c")), RULES, POLICY))
    assert e.message.startswith("not started:")


@pytest.mark.parametrize("index", [-1, 1, 5])
def test_a_secret_index_must_name_an_argument(index: int) -> None:
    """secretArgs indexes outside the arguments are INVALID_ARGUMENT (bad-secret-index)."""
    e = _refusal(lambda: admission.admit(_req(args=("a",), secret_args=(index,)), RULES, POLICY))
    assert isinstance(e, InvalidArgument) and e.rule == "bad-secret-index"
    assert e.message == f"secretArgs: index {index} is not an argument index"


def test_a_secret_index_of_an_argument_is_admitted() -> None:
    """An index of an existing argument passes."""
    admission.admit(_req(args=("a", "b"), secret_args=(1, 0)), RULES, POLICY).plan.close()


def test_admit_checks_capacity_first() -> None:
    """A full or stopping agent refuses before it looks at anything else of the request."""
    bad = _req(command="/bin/sh", limits={"cpu_seconds": -1}, secret_args=(9,))
    e = _refusal(lambda: admission.admit(bad, RULES, POLICY, busy=2))
    assert isinstance(e, ResourceExhausted)
    e = _refusal(lambda: admission.admit(bad, RULES, POLICY, accepting=False))
    assert isinstance(e, Unavailable)


def test_admit_checks_in_order_secrets_limits_kernel_timeout_policy() -> None:
    """Each check answers before the next one: a request wrong in several ways gets the
    refusal of the first check it fails (capacity, secret indexes, maxima, the kernel, the
    timeout, the policy)."""
    rules = Rules(1, 60, 3600, {}, {"cpu_seconds": 100})

    def wrong(limits: Mapping[str, int], secret_args: tuple[int, ...] = ()) -> StartRequest:
        """A request wrong in every way from the given check on."""
        return StartRequest(
            "alice", "/bin/sh", "", limits=limits, timeout_seconds=3601, secret_args=secret_args
        )

    cases = [
        (wrong({"cpu_seconds": 101}, secret_args=(9,)), "bad-secret-index"),
        (wrong({"cpu_seconds": 101}), "limit-above-maximum"),
        (wrong({"cpu_seconds": 1, "memory_bytes": MAX_STORED_INT + 1}), "limit-above-kernel"),
        (wrong({"cpu_seconds": 1}), "timeout-above-maximum"),
    ]
    for req, rule in cases:
        assert _refusal(partial(admission.admit, req, rules, POLICY)).rule == rule
    last = StartRequest("alice", "/bin/sh", "", limits={"cpu_seconds": 1})
    assert isinstance(_refusal(partial(admission.admit, last, rules, POLICY)), PermissionDenied)
