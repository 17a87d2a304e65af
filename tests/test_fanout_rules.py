"""The pure rules of fan-out runs: target selection, concurrency and error-budget arithmetic,
and the command line's selector and quantity syntax."""

from __future__ import annotations

import pytest

from agent.client.runs import describe_targets, parse_quantity, parse_selector
from agent.scheduler.registry import Worker
from agent.scheduler.targets import (
    Quantity,
    Selector,
    TargetError,
    budget_exceeded,
    error_budget,
    max_concurrency,
    may_start,
    select,
)


def _w(i: int, identity: str = "agent", **labels: str) -> Worker:
    return Worker(f"id-{i}", identity, f"10.0.0.{i}:50000", float(i), float(i), labels=labels)


FLEET = [
    _w(1, "web1.example.com", role="web", zone="a"),
    _w(2, "web2.example.com", role="web", zone="b"),
    _w(3, "db1.example.com", role="db", zone="a"),
    _w(4, "agent"),
]

# ---------------------------------------------------------------- selection


def test_labels_select_workers_carrying_every_label() -> None:
    """A label selector keeps the workers that carry all of its labels, in registration order."""
    assert [w.worker_id for w in select(Selector(labels={"role": "web"}), FLEET)] == [
        "id-1",
        "id-2",
    ]
    chosen = select(Selector(labels={"role": "web", "zone": "a"}), FLEET)
    assert [w.worker_id for w in chosen] == ["id-1"]


def test_identity_pattern_is_a_glob_on_the_certificate_identity() -> None:
    """id:PATTERN matches the identity with a shell-style glob, case-sensitively."""
    assert [w.worker_id for w in select(Selector(identity_pattern="web*"), FLEET)] == [
        "id-1",
        "id-2",
    ]
    assert [w.worker_id for w in select(Selector(identity_pattern="*"), FLEET)] == [
        "id-1",
        "id-2",
        "id-3",
        "id-4",
    ]
    with pytest.raises(TargetError) as e:
        select(Selector(identity_pattern="WEB*"), FLEET)
    assert e.value.kind == "none"


def test_a_list_names_ids_or_addresses_and_refuses_an_unknown_one() -> None:
    """list: takes ids and addresses, without duplicates; a name that is no worker is refused."""
    chosen = select(Selector(names=["10.0.0.3:50000", "id-1", "id-3"]), FLEET)
    assert [w.worker_id for w in chosen] == ["id-3", "id-1"]
    with pytest.raises(TargetError, match="'nope' is not a registered worker") as e:
        select(Selector(names=["id-1", "nope"]), FLEET)
    assert e.value.kind == "invalid"


@pytest.mark.parametrize(
    "selector",
    [
        Selector(),
        Selector(identity_pattern="*", labels={"a": "b"}),
        Selector(identity_pattern=""),
        Selector(labels={}),
        Selector(names=[]),
    ],
)
def test_malformed_selectors_are_invalid(selector: Selector) -> None:
    """None, two ways at once, or an empty one: an invalid request, never "everything"."""
    with pytest.raises(TargetError) as e:
        select(selector, FLEET)
    assert e.value.kind == "invalid"


def test_no_match_is_its_own_kind() -> None:
    """Labels that match nobody are "none" (FAILED_PRECONDITION), not a malformed request."""
    with pytest.raises(TargetError, match="no registered worker matches labels role=cache") as e:
        select(Selector(labels={"role": "cache"}), FLEET)
    assert e.value.kind == "none"


# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    ("q", "targets", "expected"),
    [
        (None, 7, 7),
        (None, 0, 1),
        (Quantity(count=10), 7, 7),
        (Quantity(count=3), 7, 3),
        (Quantity(percent=25), 10, 3),  # 2.5 rounds up
        (Quantity(percent=25), 8, 2),
        (Quantity(percent=1), 5, 1),  # never 0: at least one host runs
        (Quantity(percent=100), 9, 9),
        (Quantity(percent=50), 1, 1),
    ],
)
def test_max_concurrency(q: Quantity | None, targets: int, expected: int) -> None:
    """A count is capped at the targets; a percentage rounds up; never below 1."""
    assert max_concurrency(q, targets) == expected


@pytest.mark.parametrize(
    ("q", "targets", "expected"),
    [
        (None, 10, 0),
        (Quantity(count=0), 10, 0),
        (Quantity(count=3), 10, 3),
        (Quantity(percent=10), 15, 1),  # 1.5 rounds down: a budget never grows by rounding
        (Quantity(percent=10), 9, 0),
        (Quantity(percent=50), 5, 2),
        (Quantity(percent=100), 4, 4),
    ],
)
def test_error_budget(q: Quantity | None, targets: int, expected: int) -> None:
    """Unset tolerates nothing; a percentage rounds down."""
    assert error_budget(q, targets) == expected


@pytest.mark.parametrize(
    ("q", "zero_ok"),
    [
        (Quantity(), True),
        (Quantity(count=1, percent=1), True),
        (Quantity(percent=0), True),
        (Quantity(percent=101), True),
        (Quantity(count=-1), True),
        (Quantity(count=0), False),
    ],
)
def test_bad_quantities_are_refused(q: Quantity, zero_ok: bool) -> None:
    """Neither or both set, a percentage out of 1-100, a negative count, a zero concurrency."""
    with pytest.raises(TargetError):
        (error_budget if zero_ok else max_concurrency)(q, 10)


def test_the_budget_is_the_number_of_errors_tolerated() -> None:
    """Errors up to the budget go on; one more stops new starts."""
    assert not budget_exceeded(0, 0)
    assert budget_exceeded(1, 0)
    assert not budget_exceeded(2, 2)
    assert budget_exceeded(3, 2)


def test_may_start() -> None:
    """A free slot, budget left and no cancel: all three are needed."""
    ok = {"running": 1, "errors": 0, "concurrency": 2, "budget": 0, "cancelled": False}
    assert may_start(**ok)  # type: ignore[arg-type]
    assert not may_start(**(ok | {"running": 2}))  # type: ignore[arg-type]
    assert not may_start(**(ok | {"errors": 1}))  # type: ignore[arg-type]
    assert not may_start(**(ok | {"cancelled": True}))  # type: ignore[arg-type]


# ---------------------------------------------------------------- command-line syntax


@pytest.mark.parametrize(
    "text", ["label:role=web", "label:role=web,zone=a", "id:*.example.com", "list:a,b"]
)
def test_selector_syntax_round_trips(text: str) -> None:
    """The selector syntax parses to the wire form and prints back the same."""
    assert describe_targets(parse_selector(text)) == text


@pytest.mark.parametrize(
    "text",
    ["role=web", "label:", "label:role", "label:=web", "label:a=1,a=2", "list:a,,b", "host:x"],
)
def test_bad_selector_syntax(text: str) -> None:
    """Each malformed selector is a ValueError naming it."""
    with pytest.raises(ValueError, match="selector"):
        parse_selector(text)


def test_quantity_syntax() -> None:
    """A count, a percentage, or nothing; anything else is a ValueError."""
    assert parse_quantity(None) is None
    assert parse_quantity(10) is not None and parse_quantity(10).count == 10  # type: ignore[union-attr]
    q = parse_quantity("25%")
    assert q is not None and q.WhichOneof("kind") == "percent" and q.percent == 25
    q = parse_quantity("0")
    assert q is not None and q.WhichOneof("kind") == "count" and q.count == 0
    for bad in ("", "x", "-1", "0%", "101%", "2.5", "%"):
        with pytest.raises(ValueError):
            parse_quantity(bad)
