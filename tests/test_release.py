"""The source release and the wheel carry what they promise."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIP = {".git", ".venv", ".venv-test", ".venv-check", "state", "certs", "build", "dist"}


def _copy_checkout(dst: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {
            n
            for n in names
            if n in SKIP
            or n.endswith((".egg-info", ".pyc"))
            or n in ("__pycache__", ".mypy_cache", ".ruff_cache", ".hypothesis", ".test-tmp")
        }

    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An sdist and a wheel built from a copy of this checkout."""
    if not (REPO / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    src = _copy_checkout(tmp_path_factory.mktemp("rel") / "src")
    out = src.parent / "dist"
    out.mkdir()
    names = []
    # One build per process: setuptools keeps state between the two hooks.
    for hook in ("build_sdist", "build_wheel"):
        code = (
            "import sys; from setuptools import build_meta as b; "
            f"print('BUILT', b.{hook}(sys.argv[1]))"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-3000:]
        names.append(r.stdout.split("BUILT ")[-1].strip())
    sdist, wheel = names
    return out / sdist, out / wheel


def test_sdist_carries_what_the_repository_needs(built: tuple[Path, Path]) -> None:
    """The sdist has the license, proto, systemd units, scripts, examples, docs and tests."""
    with tarfile.open(built[0]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for need in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "proto/jobscheduler.proto",
        "systemd/worker-agent.service",
        "scripts/run-agent.sh",
        "scripts/test.sh",
        "scripts/gen_certs.sh",
        "examples/scripts/count.sh",
        "examples/grafana-dashboard.json",
        "examples/prometheus-alerts.yaml",
        "docs/security.md",
        "tests/conftest.py",
        "tests/helpers.py",
        "tests/test_release.py",
        "config.toml",
        "policy.yaml",
        "agentctl.toml",
        ".ci/run",
    ):
        assert need in names, need
    assert not any(n.endswith(".key") for n in names)


def test_wheel_ships_the_proto_and_the_license(built: tuple[Path, Path]) -> None:
    """The wheel has agent/_proto/jobscheduler.proto (identical to proto/) and the LICENSE."""
    with zipfile.ZipFile(built[1]) as z:
        names = set(z.namelist())
        assert "agent/_proto/jobscheduler.proto" in names
        assert (
            z.read("agent/_proto/jobscheduler.proto")
            == (REPO / "proto" / "jobscheduler.proto").read_bytes()
        )
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "Requires-Dist: prometheus_client" in text or "prometheus-client" in text


def test_license_is_apache_2() -> None:
    """LICENSE is the Apache License 2.0 the metadata names."""
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
