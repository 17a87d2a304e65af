"""What one ``agentctl`` command costs, beside the interpreter's own floor.

``python -m bench.agentctlcost [--rounds N] [--baseline TREE] [--user NAME]``

Starts one idle agent (the installed package, mTLS on loopback, jobs as
``--user``) and runs whole commands as new processes, interleaved: every
round runs each command once, in a shuffled order, and takes its wall time
and its CPU (the child's rusage). Per command: the medians over the rounds
and the best wall time.

- ``python -c pass`` and ``python -c 'import grpc'``: the interpreter's start
  and the floor any gRPC client pays; ``+ stubs`` adds the protocol's
  generated modules (protobuf), which a call cannot do without;
- ``agentctl --version`` and ``agentctl start --wait /bin/true`` of the
  installed package, through its console script (what a user runs);
- with ``--baseline TREE``, the same two commands of another source tree (for
  instance ``git worktree add /tmp/wt-head HEAD``: the last commit), its
  ``agent`` package first on PYTHONPATH, and the installed one through the
  same launcher: old and new in the same run.

Ratios are the median of each round's own ratio (a round's runs are close in
time, so load that comes and goes on a shared machine cancels) and the best
run over the best run. The goal: ``start --wait`` at most 0.7 of
the baseline's. :func:`measure` is the step itself, for a run that already has
an agent; :func:`summary` its text.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.output import emit, note

GOAL_RATIO = 0.7
# The job: the bench policy's /bin/true (bench.targets.policy_text).
JOB = "/bin/true"
# The console script's own lines, for a tree that has no installed script:
# the new agentctl ends in console(), an older one returns from main().
LAUNCH = (
    "import sys\n"
    "from agent.client import cli\n"
    "sys.argv[0] = 'agentctl'\n"
    "sys.exit(getattr(cli, 'console', cli.main)())\n"
)
# The commands' names in the records.
FLOOR = "python -c 'import grpc'"
START = "agentctl start --wait"
BASE_START = "baseline: agentctl start --wait"
SAME_LAUNCHER = "installed, baseline's launcher: start --wait"


@dataclass(frozen=True)
class Command:
    """One command line to time, and the PYTHONPATH it runs with ('' for none)."""

    name: str
    argv: tuple[str, ...]
    pythonpath: str = ""


def _env(pythonpath: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "AGENTCTL_CONFIG") and not k.startswith("GRPC_")
    }
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def run_once(cmd: Command, cwd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run; RuntimeError if it failed."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd.argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(cmd.pythonpath),
        cwd=cwd,
    )
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stderr.close()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd.name}: exit {p.returncode}: {err.decode(errors='replace')}")
    return wall, ru.ru_utime + ru.ru_stime


def commands(
    python: str, agentctl: str, flags: Sequence[str], baseline: str | None
) -> list[Command]:
    """The floors, the installed agentctl and (with ``baseline``) the old one beside it."""
    start = (*flags, "start", "--wait", JOB)
    out = [
        Command("python -c pass", (python, "-c", "pass")),
        Command(FLOOR, (python, "-c", "import grpc")),
        Command(
            "python -c 'import grpc' + stubs",
            (python, "-c", "import grpc, agent._proto.jobscheduler_pb2_grpc"),
        ),
        Command("agentctl --version", (agentctl, "--version")),
        Command(START, (agentctl, *start)),
    ]
    if baseline:
        launch = (python, "-c", LAUNCH)
        out += [
            Command("baseline: agentctl --version", (*launch, "--version"), baseline),
            Command(BASE_START, (*launch, *start), baseline),
            Command(SAME_LAUNCHER, (*launch, *start)),
        ]
    return out


def _ratios(samples: dict[str, list[tuple[float, float]]], num: str, den: str) -> dict[str, Any]:
    a, b = samples[num], samples[den]
    return {
        "bench": "agentctlcost",
        "ratio": f"{num} / {den}",
        "wall": statistics.median(x[0] / y[0] for x, y in zip(a, b, strict=True)),
        "cpu": statistics.median(x[1] / y[1] for x, y in zip(a, b, strict=True)),
        "best_wall": min(x[0] for x in a) / min(y[0] for y in b),
    }


def measure(
    addr: str,
    certs: Path,
    *,
    rounds: int,
    baseline: str | None = None,
    python: str = sys.executable,
    agentctl: str | None = None,
) -> list[dict[str, Any]]:
    """Time every command ``rounds`` times, interleaved: a record per command, then ratios.

    ``certs``: a folder with ca.crt, client.crt and client.key for ``addr``;
    ``agentctl``: the script to run (default: the one next to ``python``).
    """
    script = agentctl or shutil.which("agentctl", path=str(Path(python).parent))
    if not script:
        raise RuntimeError(f"no agentctl script next to {python}")
    flags = ["--addr", addr, "--ca", str(certs / "ca.crt")]
    flags += ["--cert", str(certs / "client.crt"), "--key", str(certs / "client.key")]
    cmds = commands(python, script, flags, baseline)
    samples: dict[str, list[tuple[float, float]]] = {c.name: [] for c in cmds}
    cwd = tempfile.mkdtemp(prefix="agentctlcost-cwd-")  # no ./agentctl.toml, no source tree
    try:
        for c in cmds:  # warm-up: bytecode caches, the page cache
            run_once(c, cwd)
        for r in range(rounds):
            order = list(cmds)
            random.shuffle(order)
            for c in order:
                samples[c.name].append(run_once(c, cwd))
            note(f"agentctlcost: round {r + 1}/{rounds}")
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    out: list[dict[str, Any]] = [
        {
            "bench": "agentctlcost",
            "command": c.name,
            "rounds": rounds,
            "wall_ms": 1000 * statistics.median(w for w, _ in samples[c.name]),
            "cpu_ms": 1000 * statistics.median(u for _, u in samples[c.name]),
            "wall_ms_min": 1000 * min(w for w, _ in samples[c.name]),
        }
        for c in cmds
    ]
    out.append(_ratios(samples, START, FLOOR))
    if baseline:
        out += [_ratios(samples, START, BASE_START), _ratios(samples, SAME_LAUNCHER, BASE_START)]
    return out


def summary(records: list[dict[str, Any]]) -> list[str]:
    """The table and the ratios of :func:`measure`'s records, as lines of text."""
    lines = [f"{'command':<46} {'wall ms':>9} {'cpu ms':>8} {'min wall':>9}"]
    lines += [
        f"{r['command']:<46} {r['wall_ms']:>9.1f} {r['cpu_ms']:>8.1f} {r['wall_ms_min']:>9.1f}"
        for r in records
        if "command" in r
    ]
    lines.append("ratios (median of the rounds' own; best run over best run):")
    lines += [
        f"  {r['ratio']}: wall {r['wall']:.2f}, cpu {r['cpu']:.2f}, best wall {r['best_wall']:.2f}"
        + (f"  (goal: at most {GOAL_RATIO})" if r["ratio"].endswith(BASE_START) else "")
        for r in records
        if "ratio" in r
    ]
    return lines


def main(argv: list[str]) -> int:
    """Start an agent, measure, print; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.agentctlcost")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--user", default="nobody", help="the agent's and the jobs' user (as root)")
    p.add_argument(
        "--baseline",
        help="a source tree of another version (e.g. `git worktree add /tmp/wt-head HEAD`) "
        "to run beside the installed one",
    )
    args = p.parse_args(argv)
    if args.baseline and not (Path(args.baseline) / "agent" / "client" / "cli.py").exists():
        p.error(f"--baseline {args.baseline}: no agent/client/cli.py there")

    from bench import interp
    from bench.targets import Agent, gen_certs, make_modes

    base = Path(tempfile.mkdtemp(prefix="agentctlcost-"))
    os.chmod(base, 0o755)
    agent = None
    records: list[dict[str, Any]] = []
    try:
        certs = base / "certs"
        gen_certs(certs)
        [mode] = make_modes(["user"], args.user)
        head = os.path.realpath(shutil.which("head") or "/usr/bin/head")
        agent = Agent(mode, base, certs, interp.choose("auto", mode.prefix), head)
        agent.start()
        note(f"agentctlcost: agent on {agent.addr}; {args.rounds} rounds")
        for rec in measure(agent.addr, certs, rounds=args.rounds, baseline=args.baseline):
            emit(rec, records)
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(base, ignore_errors=True)
    for line in summary(records):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
