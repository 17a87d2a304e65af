"""The limits vocabulary says what enforces each limit, and admission checks only that.

The vocabulary mapped ``memory_bytes`` to RLIMIT_AS and ``processes`` to
RLIMIT_NPROC, and admission refused them above the agent's own RLIMIT_AS and
RLIMIT_NPROC, while a job cgroup's memory.max and pids.max enforce them.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys

from agent.keeper.cgroups import Limits
from agent.vocabulary import (
    CGROUP_FIELDS,
    CGROUP_LIMITS,
    LIMITS,
    RLIMIT_HARD_EXTRA,
    RLIMITS,
    Enforcer,
)


def test_each_limit_names_what_enforces_it() -> None:
    """Memory and processes: the job cgroup's files; CPU and files: rlimits; output: the agent."""
    enforced = {lim.name: (lim.enforcer, lim.control, lim.controller) for lim in LIMITS}
    assert enforced == {
        "cpu_seconds": (Enforcer.RLIMIT, "RLIMIT_CPU", ""),
        "memory_bytes": (Enforcer.CGROUP, "memory.max", "memory"),
        "open_files": (Enforcer.RLIMIT, "RLIMIT_NOFILE", ""),
        "processes": (Enforcer.CGROUP, "pids.max", "pids"),
        "output_bytes": (Enforcer.AGENT, "output cap", ""),
    }
    assert RLIMITS == {"cpu_seconds": "RLIMIT_CPU", "open_files": "RLIMIT_NOFILE"}
    assert CGROUP_LIMITS == {
        "memory_bytes": ("memory.max", "memory"),
        "processes": ("pids.max", "pids"),
    }
    assert all(hasattr(resource, r) for r in RLIMITS.values())
    # Which cgroups.Limits field writes each cgroup limit, and the CPU limit's grace.
    assert CGROUP_FIELDS == {"memory_bytes": "memory_bytes", "processes": "pids"}
    assert set(CGROUP_FIELDS.values()) <= {f.name for f in dataclasses.fields(Limits)}
    assert RLIMIT_HARD_EXTRA == {"cpu_seconds": 2, "open_files": 0}
    # The help a person reads (config reference, agentctl --limit) names the same mechanism.
    for lim in LIMITS:
        assert lim.control in lim.help and lim.controller in lim.help, lim.name


# Run with the agent's own hard limits lowered (in a child: a hard limit cannot be raised
# again): cgroup limits above them are not the kernel's business, rlimits above them are.
_ADMIT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
resource.setrlimit(resource.RLIMIT_NPROC, (1000, 1000))
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from agent.keeper import admission
from agent.keeper.errors import InvalidArgument
out = {}
for name, value in json.loads(sys.argv[1]).items():
    try:
        admission.check_kernel_limits({name: value}, admission.kernel_hard_limits([name]))
        out[name] = "admitted"
    except InvalidArgument as e:
        out[name] = e.message
print(json.dumps(out))
"""


def test_admission_bounds_only_rlimits_by_the_agents_own() -> None:
    """memory_bytes above the agent's RLIMIT_AS and processes above its RLIMIT_NPROC pass."""
    asked = {"memory_bytes": 8 << 30, "processes": 5000, "open_files": 512}
    r = subprocess.run(
        [sys.executable, "-c", _ADMIT, json.dumps(asked)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["memory_bytes"] == out["processes"] == "admitted"
    # Control: an rlimit above the agent's own hard limit is still refused.
    assert "open_files = 512 is above the agent's own hard limit of 256" in out["open_files"]
