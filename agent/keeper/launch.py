"""How the job keeper is started: its command line and its files in ``[jobs] state_dir``.

The keeper's side of starting it, so that both who start one (the agent, for its own
child keeper; ``agent keeper``, the keeper as a service) build the same command line.
"""

from __future__ import annotations

import sys

from agent.keeper.cgroups import Subtree
from agent.keeper.keeperstate import KEEPER_MAIN, PACKAGE_ROOT

KEEPER_SOCKET = "keeper.sock"  # in [jobs] state_dir
KEEPER_ENDED = "keeper-ended.json"  # in [jobs] state_dir: ends a stopped keeper service kept


def keeper_argv(
    listen_fd: int,
    output_dir: str,
    subtree: Subtree | None,
    *,
    config: str | None = None,
    agent_uid: int | None = None,
    service: bool = False,
    ended_file: str = "",
) -> list[str]:
    """The keeper's command line (a fresh interpreter in isolated mode), listening on the
    inherited socket ``listen_fd``."""
    args = ["--listen-fd", str(listen_fd), "--output-dir", output_dir]
    if config is not None:
        # The keeper reads the policy itself, from this config file.
        args += ["--config", config]
    if subtree is not None:
        args += [
            "--cgroup-jobs",
            str(subtree.jobs),
            "--controllers",
            ",".join(sorted(subtree.controllers)),
        ]
    if agent_uid is not None:
        args += ["--agent-uid", str(agent_uid)]
    if service:
        args += ["--service", "1"]
    if ended_file:
        args += ["--ended-file", ended_file]
    return [sys.executable, "-I", "-c", KEEPER_MAIN, PACKAGE_ROOT, *args]
