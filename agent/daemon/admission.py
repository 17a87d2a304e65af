"""Admission: may this request start a job, and with what exactly?

Pure apart from the policy's file checks: capacity, limits against their
defaults and maxima, the timeout, secret-argument indexes and the policy's
decision, in that order, each refusal a domain error with its rule. What
comes out is an :class:`Admitted` plan the supervisor carries out unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.daemon import policy as policy_mod
from agent.daemon.errors import InvalidArgument, ResourceExhausted, Unavailable
from agent.vocabulary import LIMIT_NAMES


@dataclass(frozen=True)
class StartRequest:
    """A StartJob request as plain data."""

    identity: str
    command: str
    path: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: int | None = None
    limits: Mapping[str, int | None] = field(default_factory=dict)
    secret_args: tuple[int, ...] = ()


@dataclass(frozen=True)
class Rules:
    """The configured bounds admission applies (from ``[jobs]`` and ``[limits]``)."""

    max_running: int
    default_timeout: int
    max_timeout: int
    default_limits: Mapping[str, int]
    max_limits: Mapping[str, int]


@dataclass(frozen=True)
class Admitted:
    """What to run: the policy's plan, the resolved limits and timeout."""

    plan: policy_mod.Plan
    limits: Mapping[str, int]
    timeout: int


def resolve_limits(requested: Mapping[str, int | None], defaults: Mapping[str, int],
                   maxima: Mapping[str, int]) -> dict[str, int]:
    """Per-job limits from a request, the defaults and the maxima (0 = none).

    Raises InvalidArgument naming every limit above its maximum.
    """
    out: dict[str, int] = {}
    problems: list[str] = []
    for name in LIMIT_NAMES:
        want = requested.get(name)
        mx = maxima.get(name, 0)
        value = defaults.get(name, 0) if want is None else want
        if want is not None and want < 0:
            problems.append(f"{name} must not be negative")
        elif mx and (value == 0 or value > mx):
            problems.append(f"{name} = {value or 'unlimited'} is above the maximum of {mx}")
        out[name] = value
    if problems:
        raise InvalidArgument("limits: " + "; ".join(problems), rule="limit-above-maximum")
    return out


def resolve_timeout(requested: int | None, default: int, maximum: int) -> int:
    """Timeout in seconds (0 = none); InvalidArgument above the maximum."""
    value = default if requested is None else requested
    if maximum and (value == 0 or value > maximum):
        raise InvalidArgument(
            f"timeoutSeconds = {value or 'none'} is above the maximum of {maximum}",
            rule="timeout-above-maximum")
    return value


def admit(req: StartRequest, rules: Rules, policy: policy_mod.Policy, *, busy: int,
          accepting: bool) -> Admitted:
    """Decide a start request; raise the AgentError that refuses it.

    The caller owns ``plan.exec_fd`` of the result and must close it.
    """
    if not accepting:
        raise Unavailable("the agent is shutting down and accepts no new jobs",
                          rule="shutting-down")
    if busy >= rules.max_running:
        raise ResourceExhausted(
            f"{busy} jobs are running, the limit is {rules.max_running}; try again when one "
            "has finished", rule="max-running")
    for i in req.secret_args:
        if not 0 <= i < len(req.args):
            raise InvalidArgument(f"secretArgs: index {i} is not an argument index",
                                  rule="bad-secret-index")
    limits = resolve_limits(req.limits, rules.default_limits, rules.max_limits)
    timeout = resolve_timeout(req.timeout_seconds, rules.default_timeout, rules.max_timeout)
    decision = policy_mod.decide(
        policy, policy_mod.JobRequest(command=req.command, path=req.path, args=req.args,
                                      env=req.env, identity=req.identity))
    if not decision.allowed:
        raise decision.error()
    assert decision.plan is not None
    return Admitted(decision.plan, limits, timeout)
