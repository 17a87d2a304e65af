"""The README's quick start, done as a new user does it, from three places.

A copy of this checkout in /tmp/x (a sticky, world-writable parent), in
/root/x as root (a private parent: jobs cannot run as nobody there) and in a
normal user's home as that user: ``scripts/run-agent.sh``, the worked
example with agentctl, and ``scripts/test.sh`` (on a small part of the suite:
the whole suite is its own CI step). Only the ports are changed, so the
test does not collide with a development agent on this machine.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import IS_ROOT, free_port

REPO = Path(__file__).resolve().parent.parent
SKIP = {".git", ".venv", ".venv-test", ".venv-check", "state", "certs", "build", "dist"}
SKIP_SUFFIXES = (".egg-info", ".pyc", ".run-agent.toml")
CACHES = {"__pycache__", ".mypy_cache", ".ruff_cache", ".hypothesis", ".test-tmp", "bench"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not IS_ROOT, reason="needs root (a throwaway user, /root)"),
    pytest.mark.skipif(
        not (REPO / "scripts" / "run-agent.sh").exists(), reason="not a source checkout"
    ),
]

# The README's worked example, checked step by step (set -e: any failure stops it).
EXAMPLE = r"""
set -eu
. .venv/bin/activate
out=$(agentctl start --wait bash "$PWD/examples/scripts/count.sh" 3 2>&1)
echo "$out"
echo "$out" | grep -q "count 3 of 3"
echo "$out" | grep -q ": SUCCEEDED"
job=$(agentctl start bash "$PWD/examples/scripts/count.sh" 100)
agentctl status "$job" | grep -q RUNNING
agentctl stop "$job"
agentctl wait "$job" --timeout 30 >/dev/null || true
agentctl status "$job" | grep -q STOPPED
agentctl list | grep -q "$job"
status=0
agentctl start --wait bash "$PWD/examples/scripts/fail.sh" 4 >/dev/null 2>&1 || status=$?
test "$status" -eq 1
status=0
agentctl start /bin/sh -c id 2>err.txt || status=$?
test "$status" -eq 1
grep -q command-not-allowed err.txt
echo EXAMPLE-OK
"""


def _copy(dst: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIP or n in CACHES or n.endswith(SKIP_SUFFIXES)}

    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)


def _use_free_ports(checkout: Path) -> None:
    port, mport = free_port(), free_port()
    for name in ("config.toml", "agentctl.toml"):
        p = checkout / name
        text = p.read_text().replace("127.0.0.1:50000", f"127.0.0.1:{port}")
        p.write_text(text.replace("127.0.0.1:9464", f"127.0.0.1:{mport}"))


def _run_as(user: str | None, script: str, cwd: Path) -> list[str]:
    if user is None:
        return ["sh", "-c", script]
    pw = pwd.getpwnam(user)
    env = f"HOME={pw.pw_dir} USER={user} LOGNAME={user} PATH=/usr/local/bin:/usr/bin:/bin"
    return ["runuser", "-u", user, "--", "env", "-i", *env.split(), "sh", "-c", script]


def _quick_start(checkout: Path, user: str | None) -> None:
    """The two commands and the worked example, in ``checkout``, as ``user``."""
    log = checkout.parent / f"run-agent-{uuid.uuid4().hex[:6]}.log"
    env = dict(os.environ) if user is None else None
    with open(log, "wb") as fh:
        agent = subprocess.Popen(
            _run_as(user, "exec scripts/run-agent.sh", checkout),
            cwd=checkout,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_clean_env(env),
        )
    try:
        deadline = time.monotonic() + 600
        while "listening on" not in log.read_text(errors="replace"):
            assert agent.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        r = subprocess.run(
            _run_as(user, EXAMPLE, checkout),
            cwd=checkout,
            capture_output=True,
            text=True,
            env=_clean_env(env),
            timeout=300,
        )
        assert "EXAMPLE-OK" in r.stdout, (r.stdout, r.stderr, log.read_text(errors="replace"))
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=60)
    assert "ERROR" not in log.read_text(errors="replace"), log.read_text(errors="replace")
    r = subprocess.run(
        _run_as(user, "exec scripts/test.sh -q tests/test_policy.py", checkout),
        cwd=checkout,
        capture_output=True,
        text=True,
        env=_clean_env(env),
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])


def _clean_env(env: dict[str, str] | None) -> dict[str, str] | None:
    if env is None:
        return None
    # The new user's shell does not run inside this test's virtual environment.
    out = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    out["PATH"] = (
        ":".join(p for p in out.get("PATH", "").split(":") if "venv" not in p and ".pyenv" not in p)
        or "/usr/bin:/bin"
    )
    return out


@pytest.fixture
def place() -> Iterator[Callable[[str], Path]]:
    """A fresh, unique folder name to clone into (removed afterwards)."""
    made: list[Path] = []

    def new(base: str) -> Path:
        d = Path(base) / f"agent-quickstart-{uuid.uuid4().hex[:8]}"
        made.append(d)
        return d

    yield new
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def test_quick_start_from_tmp(place: Callable[[str], Path]) -> None:
    """From a clone under /tmp (mode 1777 parent) the quick start works."""
    x = place("/tmp")
    _copy(x)
    _use_free_ports(x)
    _quick_start(x, None)


def test_quick_start_from_root_home_as_root(place: Callable[[str], Path]) -> None:
    """From a clone under /root, as root, the quick start works (jobs cannot run as nobody)."""
    x = place("/root")
    _copy(x)
    _use_free_ports(x)
    _quick_start(x, None)


def test_quick_start_from_a_users_home_as_that_user() -> None:
    """From a clone in a normal user's home, as that user, the quick start works."""
    user = f"qs{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", user], check=True)
    try:
        pw = pwd.getpwnam(user)
        x = Path(pw.pw_dir) / "x"
        _copy(x)
        _use_free_ports(x)
        subprocess.run(["chown", "-R", f"{user}:", str(x)], check=True)
        _quick_start(x, user)
    finally:
        subprocess.run(["userdel", "-r", "-f", user], capture_output=True)
