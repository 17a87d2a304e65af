"""Who jobs run as and what starting one needs from the configuration: the settings
the keeper decides with and the agent records with, and the id of an installation.

A module of its own, with nothing heavy, so that both the keeper (agent.keeper.decision)
and the agent's start-up and supervisor import it without importing each other.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.keeper import admission, cgroups

INSTANCE_ENV = "AGENT_INSTANCE"
JOB_ID_ENV = "AGENT_JOB_ID"  # the agent's procfs.JOB_ID_ENV


@dataclass(frozen=True)
class JobUser:
    """Who jobs run as."""

    uid: int | None  # None: the agent's own user (no switch)
    gid: int | None
    name: str
    home: str


@dataclass(frozen=True)
class Settings:
    """What starting a job needs from the configuration (no defaults: config has them)."""

    output_dir: Path
    instance: str  # marks every job's environment, see Recovery
    user: JobUser
    umask: int
    stop_grace: float
    on_output_cap: str
    path_env: str
    rules: admission.Rules
    # The agent's job cgroup subtree; None: jobs run without a cgroup.
    cgroups: cgroups.Subtree | None = None
    cpu_millicores: int = 0  # [cgroups] cpu_millicores: cpu.max of every job

    # Each job's scratch directory (cwd, HOME, TMPDIR) is created below this; None: none.
    scratch_dir: Path | None = None
    # [jobs] dynamic_uid_min, dynamic_uid_max when each job gets a uid of its own (the
    # keeper can switch users); None: jobs run as `user` (or their entry's).
    dynamic_users: tuple[int, int] | None = None


def instance_id(state_dir: Path) -> str:
    """A stable id for an agent installation (its canonical state directory)."""
    data = str(state_dir.resolve()).encode()
    # The interpreter's own SHA-256 where it has one: hashlib would load libcrypto
    # (3.7 MB of the job keeper's memory) for these few bytes.
    for name in ("_sha256", "_sha2", "hashlib"):
        try:
            sha256: Any = importlib.import_module(name).sha256
        except (ImportError, AttributeError):
            continue
        return str(sha256(data).hexdigest())[:16]
    raise RuntimeError("no SHA-256 in this interpreter")
