"""Shared fixtures: a CA and certificates, safe script folders, agent processes.

The suite tests the installed package, never the source tree: the test
command runs the ``pytest`` script of a fresh virtual environment (so the
checkout is not on ``sys.path``), and every program the tests start runs in
a scratch working directory with ``PYTHONSAFEPATH`` set, so ``python -m
agent`` cannot pick up ``./agent`` either. The guard below fails the whole
run, loudly, if the package was imported from the checkout anyway.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent as agent_package

from helpers import (
    AgentFactory,
    AgentProcess,
    Certs,
    gen_certs,
    make_safe_dir,
    policy_for,
    vspawn_expected,
    write_script,
)

_CHECKOUT = Path(__file__).resolve().parent.parent
# The test venv may live inside the checkout (.venv-test): only ./agent itself is wrong.
if Path(agent_package.__file__).resolve().parent == _CHECKOUT / "agent":
    raise RuntimeError(
        f"the tests imported the source tree ({agent_package.__file__}), "
        "not the installed package: "
        "run scripts/test.sh (or the pytest script of a venv with the package installed)"
    )
os.environ["PYTHONSAFEPATH"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _outside_the_checkout() -> Iterator[None]:
    """Run every test (and every child it starts) from a scratch directory.

    Python 3.10 has no PYTHONSAFEPATH: `python -m` there puts the working
    directory on sys.path, so no child may start in the checkout.
    """
    before = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="agent-tests-cwd-"))
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(params=["vfork", "fork"])
def spawn_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on the job spawner's C vfork path and on its Python fork fallback.

    ``vfork`` is required, not asked for: a spawner that cannot load the extension
    refuses to start, so the test fails instead of passing on the fork path.
    """
    path: str = request.param
    if path == "vfork" and not vspawn_expected():
        pytest.skip("no C compiler: the extension was not built")
    monkeypatch.setenv("WORKER_AGENT_SPAWN", path)
    return path


SCRIPTS = {
    "hello.sh": """
        #!/bin/bash
        echo "hello $*"
        """,
    "fail.sh": """
        #!/bin/bash
        echo "failing with ${1:-3}" >&2
        exit "${1:-3}"
        """,
    "sleep.sh": """
        #!/bin/bash
        echo started
        sleep "${1:-30}"
        echo finished
        """,
    "tree.sh": """
        #!/bin/bash
        # children of its own, one of which ignores SIGTERM
        sleep 300 &
        sleep 300 &
        bash -c 'trap "" TERM; sleep 300' &
        echo "children started"
        wait
        """,
    "env.sh": """
        #!/bin/bash
        env | sort
        """,
    "count.sh": """
        #!/bin/bash
        for ((i = 1; i <= ${1:-5}; i++)); do echo "line $i"; sleep ${2:-0.1}; done
        """,
    "trapterm.sh": """
        #!/bin/bash
        trap 'echo got TERM; exit 0' TERM
        echo ready
        while true; do sleep 0.1; done
        """,
    "spew.sh": """
        #!/bin/bash
        # writes N bytes of output as fast as it can
        head -c "${1:-1000000}" /dev/zero | tr '\\0' 'x'
        """,
}


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Certificates made by scripts/gen_certs.sh (CA, server, clients)."""
    return gen_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def script_dir() -> Iterator[Path]:
    """A folder of test scripts that the StrictModes rule accepts."""
    d = make_safe_dir()
    for name, body in SCRIPTS.items():
        write_script(d, name, body)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def standard_policy(script_dir: Path) -> str:
    return policy_for(script_dir)


@pytest.fixture
def make_agent(tmp_path: Path, certs: Certs, standard_policy: str) -> Iterator[AgentFactory]:
    """Start agents (stopped at the end of the test)."""
    started: list[AgentProcess] = []

    def factory(
        policy: str | None = None, *, start: bool = True, name: str = "agent", **kw: Any
    ) -> AgentProcess:
        a = AgentProcess(
            tmp_path / f"{name}{len(started)}",
            certs,
            standard_policy if policy is None else policy,
            **kw,
        )
        started.append(a)
        if start:
            a.start()
        return a

    yield factory
    for a in started:
        try:
            a.stop()
        except Exception:
            pass
        # A job keeper outlives its agent (kill -9, on_shutdown = "keep"), with its jobs:
        # neither may outlive the test.
        try:
            a.cleanup()
        except Exception:
            pass


@pytest.fixture
def agent(make_agent: AgentFactory) -> AgentProcess:
    """One running agent with the standard policy."""
    return make_agent()
