"""Smoke test of the benchmark harness (bench/): it runs, and says what it measured.

Runs ``python -m bench --quick`` against one real agent with tiny counts.
Timing figures are never asserted: this machine is shared and noisy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_prints_json_lines_and_writes_the_table(tmp_path: Path) -> None:
    """--quick emits one valid JSON object per stdout line and a markdown results table."""
    out = tmp_path / "results"
    # A copy of bench/ alone on the path: the agent it starts must be the
    # installed package, never ./agent of the checkout.
    shutil.copytree(ROOT / "bench", tmp_path / "src" / "bench")
    shutil.copytree(ROOT / "scripts", tmp_path / "src" / "scripts")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--modes",
            "user",
            "--no-docs",
            "--out",
            str(out),
        ],
        cwd=str(tmp_path / "src"),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(x, dict) and x.get("mode") and x.get("name") for x in records)
    names = {x["name"] for x in records}
    for expected in (
        "floor_serial",
        "floor_concurrent",
        "rss_idle",
        "query_rpc_running_job",
        "jobs_original",
        "jobs_wait",
        "query_qps",
        "rss_history",
        "rss_running",
        "stream",
        "cmp_jobs",
        "cmp_unary",
        "cmp_summary_jobs",
        "cmp_summary_unary",
        "target",
    ):
        assert expected in names, f"no {expected} measurement in {sorted(names)}"
    streams = [x for x in records if x["name"] == "stream"]
    assert all(x["verified"] for x in streams), streams
    jobs = [x for x in records if x["name"] in ("jobs_original", "jobs_wait")]
    assert all(x["jobs"] > 0 and x["failed"] == 0 for x in jobs), jobs
    assert all("client_cpu_cores" in x and "agent_cpu_cores" in x for x in jobs)

    unary = {x["target"]: x for x in records if x["name"] == "cmp_summary_unary"}
    assert set(unary) == {"bare_aio", "bare_sync", "agent_query"}, unary
    assert all(x["calls"] > 0 and not x["errors"] for x in records if x["name"] == "cmp_unary")

    table = (out / "latest.md").read_text()
    assert "### Targets" in table
    assert "| measurement | result |" in table
    data = json.loads((out / "latest.json").read_text())
    assert data["records"] and data["targets"]
