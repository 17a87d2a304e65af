"""The installed package: what a user gets from `pip install`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _installed() -> bool:
    r = subprocess.run(
        [sys.executable, "-I", "-c", "import agent, sys; print(agent.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    return r.returncode == 0 and "site-packages" in r.stdout


@pytest.mark.skipif(not _installed(), reason="package not installed (run scripts/test.sh)")
def test_installed_package_has_stubs_and_commands() -> None:
    """pip install gives the stubs and the agent, agentctl commands, without a generator."""
    r = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import agent._proto.jobscheduler_pb2_grpc as g, agent.client, "
            "agent.daemon.server; print(g.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    assert "site-packages" in r.stdout
    bindir = Path(sys.executable).parent
    for cmd in ("agent", "agentctl"):
        exe = bindir / cmd
        assert exe.exists() or shutil.which(cmd), cmd
        out = subprocess.run(
            [str(exe), "--help"],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=""),
        )
        assert out.returncode == 0, out.stderr
    v = subprocess.run([str(bindir / "agent"), "--version"], capture_output=True, text=True)
    assert v.stdout.startswith("agent ")
    m = subprocess.run(
        [sys.executable, "-I", "-m", "agent", "--version"], capture_output=True, text=True, cwd="/"
    )
    assert m.returncode == 0 and m.stdout.startswith("agent ")
