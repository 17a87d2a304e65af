"""Admission: may this request start a job, and with what exactly?

Pure apart from the policy's file checks: capacity, limits against their
defaults and maxima, the timeout, secret-argument indexes and the policy's
decision, in that order, each refusal a domain error with its rule. What
comes out is an :class:`Admitted` plan the supervisor carries out unchanged.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.keeper import policy as policy_mod
from agent.keeper.errors import InvalidArgument, ResourceExhausted, Unavailable
from agent.vocabulary import LIMIT_NAMES, RLIMITS


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


def resolve_limits(
    requested: Mapping[str, int | None], defaults: Mapping[str, int], maxima: Mapping[str, int]
) -> dict[str, int]:
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


# rlim_t is an unsigned 64-bit integer and RLIM_INFINITY its largest value;
# the job's CPU hard limit is the requested value + 2 (SIGXCPU first, then
# SIGKILL two CPU seconds later), so that must fit too.
RLIM_MAX = (1 << 64) - 1
CPU_HARD_EXTRA = 2
# What the history (SQLite INTEGER) and the event loop's timers can hold.
MAX_STORED_INT = (1 << 63) - 1
MAX_TIMEOUT_SECONDS = (1 << 32) - 1  # the wire field is a uint32


def kernel_hard_limits(names: Iterable[str]) -> dict[str, int]:
    """The agent's own hard rlimits (RLIM_MAX for none) of those ``names`` that are rlimits.

    A job inherits them: an unprivileged process (the job user, or the
    agent when it is not root) cannot raise a hard limit, so a request
    above one would fail with EPERM after the job was accepted. Only the
    limits set as rlimits (:data:`agent.vocabulary.RLIMITS`) are bounded so:
    a cgroup's memory.max or pids.max owes nothing to the agent's RLIMIT_AS
    or RLIMIT_NPROC.
    """
    out: dict[str, int] = {}
    for name in names:
        kernel = RLIMITS.get(name)
        if kernel is None:
            continue
        hard = resource.getrlimit(getattr(resource, kernel))[1]
        out[name] = RLIM_MAX if hard == resource.RLIM_INFINITY or hard < 0 else hard
    return out


def check_kernel_limits(limits: Mapping[str, int], hard: Mapping[str, int]) -> None:
    """Refuse limits the kernel cannot give; InvalidArgument naming each one.

    ``hard``: the agent's hard rlimits of the rlimit limits asked for
    (:func:`kernel_hard_limits`). Every other limit (a cgroup's, the output
    cap) is only checked to fit the history; whether its cgroup controller
    is there is the supervisor's question. 0 means "no limit" in a request
    and is not checked here (the maxima of ``[limits]`` decide whether it
    is allowed).
    """
    problems: list[str] = []
    for name, value in limits.items():
        if not value:
            continue
        if name not in hard:
            if value > MAX_STORED_INT:
                problems.append(f"{name} = {value} is too large (at most {MAX_STORED_INT})")
            continue
        need = value + CPU_HARD_EXTRA if name == "cpu_seconds" else value
        if need >= RLIM_MAX:
            problems.append(
                f"{name} = {value} does not fit in the kernel's limit type "
                "(it would mean unlimited)"
            )
        elif hard[name] != RLIM_MAX and need > hard[name]:
            extra = (
                f" (the job's hard limit is {name} + {CPU_HARD_EXTRA})"
                if name == "cpu_seconds"
                else ""
            )
            problems.append(
                f"{name} = {value} is above the agent's own hard limit of {hard[name]}{extra}"
            )
        elif value > MAX_STORED_INT:
            problems.append(f"{name} = {value} is too large (at most {MAX_STORED_INT})")
    if problems:
        raise InvalidArgument("limits: " + "; ".join(problems), rule="limit-above-kernel")


def resolve_timeout(requested: int | None, default: int, maximum: int) -> int:
    """Timeout in seconds (0 = none); InvalidArgument above the maximum."""
    value = default if requested is None else requested
    if value > MAX_TIMEOUT_SECONDS:
        raise InvalidArgument(
            f"timeoutSeconds = {value} is too large (at most {MAX_TIMEOUT_SECONDS})",
            rule="timeout-above-maximum",
        )
    if maximum and (value == 0 or value > maximum):
        raise InvalidArgument(
            f"timeoutSeconds = {value or 'none'} is above the maximum of {maximum}",
            rule="timeout-above-maximum",
        )
    return value


def capacity(rules: Rules, *, busy: int, accepting: bool) -> None:
    """Refuse a start the agent cannot take now: it is stopping (UNAVAILABLE), or
    ``busy`` jobs are running or starting already (RESOURCE_EXHAUSTED)."""
    if not accepting:
        raise Unavailable(
            "the agent is shutting down and accepts no new jobs", rule="shutting-down"
        )
    if busy >= rules.max_running:
        raise ResourceExhausted(
            f"{busy} jobs are running, the limit is {rules.max_running}; try again when one "
            "has finished",
            rule="max-running",
        )


def admit(
    req: StartRequest,
    rules: Rules,
    policy: policy_mod.Policy,
    *,
    busy: int = 0,
    accepting: bool = True,
) -> Admitted:
    """Decide a start request; raise the AgentError that refuses it.

    The caller owns the plan's descriptors (``exec_fd``, ``script_fd``) and
    must close them; if this raises, no descriptor is left open.
    """
    capacity(rules, busy=busy, accepting=accepting)
    for i in req.secret_args:
        if not 0 <= i < len(req.args):
            raise InvalidArgument(
                f"secretArgs: index {i} is not an argument index", rule="bad-secret-index"
            )
    limits = resolve_limits(req.limits, rules.default_limits, rules.max_limits)
    # Against the kernel at request time (not only the configured maxima):
    # an rlimit it cannot give must be refused before anything starts.
    # (Only the limits set are read: check_kernel_limits looks at nothing
    # else, and the usual job has none or one.)
    asked = [name for name, value in limits.items() if value]
    if asked:
        check_kernel_limits(limits, kernel_hard_limits(asked))
    timeout = resolve_timeout(req.timeout_seconds, rules.default_timeout, rules.max_timeout)
    decision = policy_mod.decide(
        policy,
        policy_mod.JobRequest(
            command=req.command, path=req.path, args=req.args, env=req.env, identity=req.identity
        ),
    )
    if not decision.allowed:
        raise decision.error()
    plan = decision.plan
    if plan is None:  # an allowed decision always has a plan; fail closed anyway
        raise decision.error()
    try:
        return Admitted(plan, limits, timeout)
    except BaseException:
        # Nothing may fail after the decision without closing its sealed
        # copies: they would leak one descriptor per request.
        plan.close()
        raise
