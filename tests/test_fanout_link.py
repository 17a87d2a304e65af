"""Fan-out runs over the workers' links, with real parts: one scheduler process, agents on
loopback ports, mTLS.

Three agents accept the scheduler's calls on their link (``[scheduler] calls_as =
"scheduler"``) and advertise an address where nothing listens: a run can reach them only
down the link they opened. A fourth has no ``calls_as`` and is reached as before, by a
connection to its address. Both kinds in one run; the linked agents audit each call with
the link as its peer, under the identity ``calls_as`` names and their own access rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_fanout import Fleet, started_fleet

from helpers import (
    Certs,
    free_port,
)

pytestmark = pytest.mark.slow

LINKED = 3


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs, standard_policy: str
) -> Iterator[Fleet]:
    regs: list[dict[str, Any]] = []
    for i in range(LINKED + 1):
        extra: dict[str, Any] = {"labels": {"n": str(i)}}
        if i < LINKED:
            # Nothing listens there: only the link reaches this agent.
            extra |= {"calls_as": "scheduler", "advertise_addr": f"127.0.0.1:{free_port()}"}
        regs.append(extra)
    base = tmp_path_factory.mktemp("fanout-link")
    with started_fleet(base, certs, standard_policy, regs) as f:
        yield f


def test_a_run_reaches_linked_agents_down_their_links_and_the_others_directly(
    fleet: Fleet, script_dir: Path
) -> None:
    """Every host succeeds, its output labelled: the linked ones (whose advertised address
    answers nothing) through their links, the fourth through a connection of its own."""
    r = fleet.scheduler.cli(
        "run", "--select", "id:*", "--", "bash", f"{script_dir}/hello.sh", "linked"
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"ok {LINKED + 1} failed 0 not-started 0 unreachable 0" in r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == LINKED + 1 and all(ln.endswith("] hello linked") for ln in lines), lines


def test_a_linked_agent_audits_the_call_as_calls_as_with_the_link_as_peer(
    fleet: Fleet, script_dir: Path
) -> None:
    """The StartJob that came down the link is in the agent's audit log: the identity its
    calls_as names, the link as the peer."""
    r = fleet.scheduler.cli(
        "run", "--select", "label:n=0", "--", "bash", f"{script_dir}/hello.sh", "audited"
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    starts = [
        e
        for e in fleet.agents[0].audit_lines()
        if e.get("event") == "job_start" and "audited" in json.dumps(e.get("args", []))
    ]
    assert len(starts) == 1, fleet.agents[0].audit_lines()[-5:]
    assert starts[0]["identity"] == "scheduler"
    # The run's key for this host (run id / worker id): a second start of it, by a
    # takeover, would answer this job.
    assert str(starts[0]["request_key"]).count("/") == 1, starts[0]
    assert str(starts[0]["peer"]).startswith("link:"), starts[0]


def test_a_command_the_agent_refuses_is_refused_down_the_link_too(fleet: Fleet) -> None:
    """The agent's own policy decides a call that came down the link: a program it does not
    allow fails on every host (PERMISSION_DENIED), linked or not, and nothing runs."""
    r = fleet.scheduler.cli("run", "--select", "id:*", "--max-errors", "100%", "--", "/bin/su")
    assert r.returncode != 0
    assert f"ok 0 failed {LINKED + 1}" in r.stderr, r.stderr
    assert "PERMISSION_DENIED" in r.stdout + r.stderr
