"""Smoke test of the benchmark harness (bench/): it runs, and says what it measured.

Runs ``python -m bench --quick`` with tiny counts against a real agent in the
``user`` mode and, as root, one running the shipped config.toml, compared in
the same interleaved rounds. Timing figures are never asserted: this machine
is shared and noisy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_bench_prints_json_lines_and_writes_the_table(tmp_path: Path) -> None:
    """--quick emits one JSON object per line, every mode's compare and box records, the table."""
    out = tmp_path / "results"
    # A copy of bench/ alone on the path: the agent it starts must be the
    # installed package, never ./agent of the checkout.
    shutil.copytree(ROOT / "bench", tmp_path / "src" / "bench")
    shutil.copytree(ROOT / "scripts", tmp_path / "src" / "scripts")
    shutil.copyfile(ROOT / "config.toml", tmp_path / "src" / "config.toml")  # the shipped mode's
    root = os.geteuid() == 0
    modes = ["user", "shipped"] if root else ["user"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--modes",
            ",".join(modes),
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
        "box",
    ):
        assert expected in names, f"no {expected} measurement in {sorted(names)}"
    streams = [x for x in records if x["name"] == "stream"]
    assert all(x["verified"] for x in streams), streams
    jobs = [x for x in records if x["name"] in ("jobs_original", "jobs_wait")]
    assert all(x["jobs"] > 0 and x["failed"] == 0 for x in jobs), jobs
    assert all("client_cpu_cores" in x and "agent_cpu_cores" in x for x in jobs)

    unary = {(x["mode"], x["target"]) for x in records if x["name"] == "cmp_summary_unary"}
    expected_unary = {("compare", "bare_aio"), ("compare", "bare_sync")}
    assert unary == expected_unary | {(m, "agent_query") for m in modes}, unary
    assert all(x["calls"] > 0 and not x["errors"] for x in records if x["name"] == "cmp_unary")
    # Every mode's agent in the same rounds: original protocol at 1 and at
    # the main level (4 with --quick), RunJob at the main level.
    summary = {
        (x["mode"], x["protocol"], x["in_flight"])
        for x in records
        if x["name"] == "cmp_summary_jobs" and x["target"] == "agent"
    }
    for m in modes:
        assert {(m, "original", 1), (m, "original", 4), (m, "run", 4)} <= summary, summary
    assert all(x.get("failed", 0) == 0 for x in records if x["name"] == "cmp_jobs")
    boxes = {x["mode"]: x for x in records if x["name"] == "box"}
    assert set(boxes) == set(modes), boxes
    for b in boxes.values():
        assert b["scratch_dir"] and b["job_user"] and "landlock" in b, b
        # As root the bench gives every agent a cgroup subtree of its own.
        assert b["cgroup_per_job"] or not root, b
    verdicts = {(t["mode"], t["target"]): t for t in records if t["name"] == "target"}
    assert any("0.9x the peer" in k[1] for k in verdicts), verdicts
    if root:
        shipped = [t for k, t in verdicts.items() if k[0] == "shipped" and "fastest" in k[1]]
        assert len(shipped) == 2 and all(t["value"] is not None for t in shipped), shipped
        # The users step (root agents only): each job's uid checked before the rounds.
        users = [x for x in records if x["name"] == "users_summary"]
        assert {x["mode"] for x in users} == {"shipped"}, users
        assert all(60600 <= x["job_uid"] <= 61099 != x["job_uid_fixed_user"] for x in users)
        assert all(x["failed"] == 0 and x["jobs_per_s_vs_fixed_user"] for x in users), users

    table = (out / "latest.md").read_text()
    assert "### Targets" in table
    assert "not measured (no peer)" in table
    assert "### The job box in force" in table
    assert "### Interleaved comparison" in table
    assert "| measurement | result |" in table
    data = json.loads((out / "latest.json").read_text())
    assert data["records"] and data["targets"]


def test_regenerating_the_docs_page_keeps_its_hand_written_tail(tmp_path: Path) -> None:
    """bench.report.write_docs_page replaces the generated part and keeps everything from
    the hand-written marker on (the notes of earlier runs are not lost)."""
    shutil.copytree(ROOT / "bench", tmp_path / "src" / "bench")
    page = tmp_path / "benchmarks.md"
    code = f"""
import json, sys
from pathlib import Path
from bench import report
page = Path({str(page)!r})
page.write_text("# old generated part\\n\\n" + report.HAND_WRITTEN + "\\n\\n## Notes\\nkept\\n")
report.docs_page = lambda result, has_plot: "# new generated part\\n"
report.write_docs_page(page, {{}}, False)
print(page.read_text())
"""
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(tmp_path / "src"),
        env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    text = page.read_text()
    assert text.startswith("# new generated part\n")
    assert "old generated part" not in text
    assert text.endswith("## Notes\nkept\n") and text.count("Written by hand") == 1
