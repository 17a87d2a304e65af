"""The stand-in workers of the fleet benchmark (bench/standins.py) work with a real scheduler.

Twenty stand-ins in one process register with a real scheduler over mTLS and
answer a fan-out like agents: every host succeeds and sends its line. This
keeps ``python -m bench --steps fleet`` from rotting; the figures themselves
are the benchmark's, never asserted here.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from agent.client import RunInfo, SchedulerClient
from agent.client.runs import RunOutputLine

from helpers import Certs, SchedulerProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
N = 20


def test_twenty_stand_ins_register_and_answer_a_fan_out(tmp_path: Path, certs: Certs) -> None:
    """Twenty stand-ins register, a fan-out to them all succeeds with each host's output."""
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
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        sched.stop()
    assert proc.returncode == 0, err[-2000:]
    assert f"jobs {N}" in out
