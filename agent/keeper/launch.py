"""How the job keeper is started: its command line and its files in ``[jobs] state_dir``.

The keeper's side of starting it, so that both who start one (the agent, for its own
child keeper; ``agent keeper``, the keeper as a service) build the same command line.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only types: this module stays light (the agent and the keeper import it)
    import subprocess
    from collections.abc import Mapping, Sequence

    from agent.keeper.cgroups import Subtree

# The directory holding the ``agent`` package: a helper process (the keeper, its policy
# loader, the bare spawner) runs this very code in a fresh interpreter in isolated mode
# (-I: no environment, no user site), with only this directory on its path.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What a helper keeps of its starter's environment: the spawn path's choice (fork, vfork
# or auto: agent.keeper.vspawn.ENV_VAR, not imported: this module stays light).
SPAWN_ENV = "WORKER_AGENT_SPAWN"
KEEPER_SOCKET = "keeper.sock"  # in [jobs] state_dir
KEEPER_ENDED = "keeper-ended.json"  # in [jobs] state_dir: ends a stopped keeper service kept


def python_main(module: str, function: str) -> str:
    """The ``-c`` code of a helper process: ``PACKAGE_ROOT`` (its first argument) on the
    path, then ``module.function(argv)`` as its exit status."""
    return (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        f"from {module} import {function}; sys.exit({function}(sys.argv[1:]))"
    )


KEEPER_MAIN = python_main("agent.keeper.keeper", "main")


def interpreter() -> str:
    """This very interpreter: sys.executable, or its binary when that path is out of
    reach of the agent's user (a venv under /root for an agent run as nobody)."""
    return sys.executable if os.access(sys.executable, os.X_OK) else "/proc/self/exe"


def helper_argv(main: str, *args: str) -> list[str]:
    """The command line of a helper process running ``main`` (a :func:`python_main`) with
    ``args``: a fresh interpreter in isolated mode."""
    return [sys.executable, "-I", "-c", main, PACKAGE_ROOT, *args]


def start_helper(
    argv: list[str],
    fd: int,
    *,
    more_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a helper process (the agent's keeper, the bare spawner): ``argv`` run by this
    interpreter, with descriptor ``fd`` (and ``more_fds``) passed on and no other, "/" as
    its working directory and nothing of this process's environment but
    :data:`SPAWN_ENV` (and ``env``), so that neither changes what the helper imports or
    does; it finds the ``agent`` package where this process found it (``PACKAGE_ROOT``)."""
    import subprocess  # only here: the keeper imports this module and never starts a helper

    return subprocess.Popen(
        argv,
        executable=interpreter(),
        pass_fds=[fd, *more_fds],
        close_fds=True,
        stdin=subprocess.DEVNULL,
        env={**{k: v for k, v in os.environ.items() if k == SPAWN_ENV}, **(env or {})},
        cwd="/",
    )


def keeper_argv(
    listen_fd: int,
    output_dir: str,
    subtree: Subtree | None,
    *,
    config: str | None = None,
    agent_uid: int | None = None,
    service: bool = False,
    ended_file: str = "",
    stored: str = "",
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
    if stored:
        # The jobs' pipes the agent kept for it (its descriptor store: agent.daemon.pipestore).
        args += ["--stored", stored]
    return helper_argv(KEEPER_MAIN, *args)
