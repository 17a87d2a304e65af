"""The pure rules of a fan-out run: which workers, how many at once, how many errors.

No I/O and no protobuf: plain values in, plain values or a
:class:`TargetError` out, so every rule (and its rounding) is unit-tested on
its own (tests/test_fanout_rules.py). The run executor
(:mod:`agent.scheduler.runs`) asks :func:`may_start` before each start.

The arithmetic, as AWS SSM Run Command does it: a concurrency given as a
percentage rounds *up* (25% of 10 hosts is 3 at once, never 0: at least one
host runs); an error budget given as a percentage rounds *down* (10% of 15
hosts tolerates 1 error), because a budget is a promise of safety and must
not grow by rounding. The budget is the number of errors tolerated: once
errors exceed it, nothing new starts.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.scheduler.registry import Worker

__all__ = [
    "Quantity",
    "Selector",
    "TargetError",
    "budget_exceeded",
    "error_budget",
    "max_concurrency",
    "may_start",
    "select",
]


class TargetError(ValueError):
    """The request cannot be planned; ``kind`` says which status fits it."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        """``kind``: "invalid" (the request) or "none" (nothing matches it now)."""
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Quantity:
    """A number of hosts, or a percentage of the targets (exactly one is set)."""

    count: int | None = None
    percent: int | None = None

    def check(self, what: str, *, zero_ok: bool) -> None:
        """TargetError unless exactly one of count and percent is set and in range."""
        if (self.count is None) == (self.percent is None):
            raise TargetError(f"{what}: give a count or a percentage")
        if self.percent is not None and not 1 <= self.percent <= 100:
            raise TargetError(f"{what}: a percentage must be 1-100, got {self.percent}")
        if self.count is not None and (self.count < 0 or (self.count == 0 and not zero_ok)):
            raise TargetError(f"{what}: must be at least {0 if zero_ok else 1}, got {self.count}")


@dataclass(frozen=True)
class Selector:
    """How a run chooses its targets (exactly one way is set)."""

    identity_pattern: str | None = None
    labels: Mapping[str, str] | None = None
    names: Sequence[str] | None = None


def select(selector: Selector, workers: Sequence[Worker]) -> list[Worker]:
    """The registered workers ``selector`` names, in registration order.

    TargetError "invalid" for a malformed selector or a listed name that is no
    registered worker (a list is a promise: a typo must not shrink the run
    silently); "none" when a pattern or labels match no worker.
    """
    given = [
        x for x in (selector.identity_pattern, selector.labels, selector.names) if x is not None
    ]
    if len(given) != 1:
        raise TargetError("choose the targets one way: an identity pattern, labels or a list")
    if selector.names is not None:
        return _by_names(selector.names, workers)
    if selector.identity_pattern is not None:
        pattern = selector.identity_pattern
        if not pattern:
            raise TargetError("the identity pattern is empty")
        chosen = [w for w in workers if fnmatch.fnmatchcase(w.identity, pattern)]
        what = f"identity pattern {pattern!r}"
    else:
        labels = selector.labels or {}
        if not labels:
            raise TargetError("the label selector is empty")
        chosen = [w for w in workers if all(w.labels.get(k) == v for k, v in labels.items())]
        what = "labels " + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    if not chosen:
        raise TargetError(f"no registered worker matches {what}", kind="none")
    return chosen


def _by_names(names: Sequence[str], workers: Sequence[Worker]) -> list[Worker]:
    if not names:
        raise TargetError("the list of workers is empty")
    chosen: list[Worker] = []
    for name in names:
        match = [w for w in workers if name in (w.worker_id, w.address)]
        if not match:
            raise TargetError(f"{name!r} is not a registered worker (id or address)")
        for w in match:
            if w not in chosen:
                chosen.append(w)
    return chosen


def max_concurrency(q: Quantity | None, targets: int) -> int:
    """Hosts running at once: all when unset; a percentage rounds up; at least 1."""
    if q is None:
        return max(1, targets)
    q.check("max concurrency", zero_ok=False)
    if q.count is not None:
        return max(1, min(q.count, targets))
    assert q.percent is not None
    return max(1, math.ceil(q.percent * targets / 100))


def error_budget(q: Quantity | None, targets: int) -> int:
    """Errors tolerated: 0 when unset; a percentage rounds down."""
    if q is None:
        return 0
    q.check("max errors", zero_ok=True)
    if q.count is not None:
        return q.count
    assert q.percent is not None
    return q.percent * targets // 100


def budget_exceeded(errors: int, budget: int) -> bool:
    """Past the budget: more errors than tolerated."""
    return errors > budget


def may_start(*, running: int, errors: int, concurrency: int, budget: int, cancelled: bool) -> bool:
    """Whether the next host may start now (a free slot, budget left, not cancelled)."""
    return not cancelled and running < concurrency and not budget_exceeded(errors, budget)
