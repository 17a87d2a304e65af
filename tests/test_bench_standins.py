"""The stand-in workers of the fleet benchmark (bench/standins.py) work with a real scheduler.

Twenty stand-ins in one process register with a real scheduler over mTLS and
answer a fan-out like agents: every host succeeds and sends its line; and the
fleet step itself runs end to end on five. This keeps ``python -m bench
--steps fleet`` from rotting; the figures themselves are the benchmark's,
never asserted here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.client import RunInfo, SchedulerClient
from agent.client.runs import RunOutputLine

from helpers import Certs, SchedulerProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
N = 20


@pytest.mark.parametrize("link", [True, False], ids=["link", "no-link"])
def test_twenty_stand_ins_register_and_answer_a_fan_out(
    tmp_path: Path, certs: Certs, link: bool
) -> None:
    """Twenty stand-ins register, a fan-out to them all succeeds with each host's output:
    over their links (the default), or with --no-link over connections to their ports."""
    # A copy of bench/ alone on the path: the scheduler and the client are the installed package.
    shutil.copytree(ROOT / "bench", tmp_path / "src" / "bench")
    sched = SchedulerProcess(tmp_path / "sched", certs, heartbeat=1, expire=30.0).start()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.standins",
            "--count",
            str(N),
            "--scheduler",
            sched.addr,
            "--certs",
            str(certs.dir),
            "--port-base",
            # Below the ephemeral range and above the benchmark's (from 12000);
            # a port someone holds is skipped.
            str(random.randrange(24000, 31000)),
            *([] if link else ["--no-link"]),
        ],
        cwd=tmp_path / "src",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with SchedulerClient(sched.addr, certs.tls("admin"), timeout=10) as c:
            wait_for(lambda: len(c.workers()) == N, timeout=180)
            assert {w.labels.get("bench") for w in c.workers()} == {"standin"}
            run = c.start_run("label:bench=standin", "true")
            events = list(c.follow_run(run.run_id, timeout=120))
        final = events[-1]
        assert isinstance(final, RunInfo)
        assert final.all_succeeded, final.summary
        assert len(final.hosts) == N
        lines = [e for e in events if isinstance(e, RunOutputLine)]
        assert sorted(e.host for e in lines) == sorted(h.address for h in final.hosts)
        assert {e.line for e in lines} == {b"ok"}
        # Every stand-in's link accepts calls: the scheduler's summary of its links (one
        # line at most every 10 s, agent.scheduler.linklog) says so.
        if link:
            wait_for(lambda: f"worker links: {N} open ({N} accept calls)" in sched.log(), 30)
        else:
            assert "worker links:" not in sched.log()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        sched.stop()
    assert proc.returncode == 0, err[-2000:]
    assert f"jobs {N}" in out


@pytest.mark.slow
def test_the_fleet_step_measures_a_small_fleet(tmp_path: Path) -> None:
    """``python -m bench.fleet`` with five stand-ins writes one record with every figure."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "bench", src / "bench")
    shutil.copytree(ROOT / "scripts", src / "scripts")  # gen_certs.sh
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    out = tmp_path / "results"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fleet",
            "--fleet-sizes",
            "5",
            "--heartbeat",
            "1",
            "--port-base",
            str(random.randrange(24000, 31000)),
            "--out",
            str(out),
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    [rec] = json.loads((out / "fleet.json").read_text())["results"]
    assert rec["workers"] == 5 and rec["fanout"]["summary"]["succeeded"] == 5
    for key in ("rss_per_worker_kib", "register_s", "restart_all_heard_s", "storm_span_s"):
        assert key in rec
    assert "| storm: first to last re-registration (s) |" in (out / "fleet.md").read_text()
