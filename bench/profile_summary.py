"""Summarise a py-spy ``--format raw`` profile of the agent (collapsed stacks).

``python -m bench.profile_summary FILE`` prints where the agent's main
thread (the asyncio loop, where all the Python work happens) spends its
samples: busy against idle, by category (spawning, SQLite, audit, policy,
/proc reads, gRPC glue, ...), the inclusive share of the functions that
matter, and the hottest leaf functions. Standard library only.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

# Leaf frames that mean "waiting", not working.
IDLE_LEAVES = (
    "EpollSelector.select",
    "Condition.wait",
    "Event.wait",
    "Thread.run",
    "_poll_wrapper",
    "Lock.acquire",
    "select (selectors.py",
)

# (category, regex over one frame), matched from the leaf towards the root:
# the frame nearest the leaf that matches a category decides.
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("spawn: subprocess.Popen (fork/vfork + exec)", re.compile(r"\(subprocess\.py")),
    (
        "spawn: the job spawner's channel (spawn.py)",
        re.compile(r"\(agent/keeper/spawn(proto)?\.py"),
    ),
    ("SQLite history (history.py)", re.compile(r"\(agent/daemon/history\.py")),
    ("audit log (audit.py)", re.compile(r"\(agent/daemon/audit\.py")),
    (
        "policy decision (policy.py, filetrust.py)",
        re.compile(r"\(agent/daemon/(policy|trust|admission)\.py"),
    ),
    ("/proc reads (procfs.py)", re.compile(r"\(agent/daemon/procfs\.py")),
    ("uuid4", re.compile(r"\(uuid\.py")),
    ("client identity (tls.py)", re.compile(r"\(agent/tls\.py")),
    ("metrics (metrics.py)", re.compile(r"\(agent/daemon/metrics\.py|prometheus_client/")),
    ("logging", re.compile(r"\(logging/")),
    ("QueryJobRes building (record_to_pb)", re.compile(r"^record_to_pb ")),
    (
        "supervisor: exit/output/finish",
        re.compile(
            r"Supervisor\.(_exited|_finish|_on_output|_record_output|_close_output|_handle|_apply)"
        ),
    ),
    ("supervisor: start/_spawn (own code)", re.compile(r"Supervisor\.(start|_spawn)")),
    ("servicer (service.py)", re.compile(r"\(agent/daemon/service\.py")),
    ("gRPC aio (cython glue)", re.compile(r"grpc/_cython|\.pyx:|grpc/aio|cygrpc")),
    ("asyncio event loop", re.compile(r"\(asyncio/")),
]

KEY_FUNCTIONS = [
    "WorkerService.StartJob",
    "WorkerService.QueryJob",
    "WorkerService.WaitJob",
    "WorkerService._run",
    "WorkerService.identify",
    "Supervisor.start",
    "Supervisor._spawn",
    "SpawnerOps.spawn",
    "SpawnerOps._readable",
    "admit",
    "decide",
    "check_file",
    "Store.insert",
    "Store.update",
    "Store.get",
    "History.insert_new",
    "AuditLog.record",
    "read_stat",
    "uuid4",
    "Supervisor._exited",
    "Supervisor._finish",
    "Supervisor._on_output",
    "Supervisor._close_output",
    "record_to_pb",
    "identity_from_cert",
    "ServicerContext.peer",
    "_deserializer",
    "Supervisor.get",
]


def _func(frame: str) -> str:
    return frame.split(" (", 1)[0]


def parse(text: str) -> list[tuple[list[str], int]]:
    """(frames root..leaf, count) per line."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        try:
            count = int(n)
        except ValueError:
            continue
        out.append((stack.split(";"), count))
    return out


def is_main(frames: list[str]) -> bool:
    """The agent's main thread runs the asyncio loop from runpy."""
    return any(f.startswith("_run_module_as_main") for f in frames[:2]) or any(
        "BaseEventLoop.run_forever" in f for f in frames
    )


def is_idle(frames: list[str]) -> bool:
    leaf = frames[-1]
    return any(leaf.startswith(x) or x in leaf for x in IDLE_LEAVES)


def categorize(frames: list[str]) -> str:
    for f in reversed(frames):
        for name, rx in CATEGORIES:
            if rx.search(f):
                return name
    return "other: " + _func(frames[-1])


def summarize(text: str, top: int = 25) -> str:
    """The human summary (see module docstring)."""
    stacks = parse(text)
    total = sum(c for _, c in stacks)
    main = [(f, c) for f, c in stacks if is_main(f)]
    main_total = sum(c for _, c in main) or 1
    busy = [(f, c) for f, c in main if not is_idle(f)]
    busy_total = sum(c for _, c in busy)
    other_busy = sum(c for f, c in stacks if not is_main(f) and not is_idle(f))
    lines = [
        f"samples: {total} (all threads); main thread: {main_total}, of which busy "
        f"{busy_total} ({100 * busy_total / main_total:.0f}%), idle in epoll "
        f"{main_total - busy_total} ({100 * (main_total - busy_total) / main_total:.0f}%); "
        f"busy samples in other Python threads: {other_busy}",
        "",
        "main-thread busy samples by category (% of main-thread samples):",
    ]
    cats: Counter[str] = Counter()
    for f, c in busy:
        cats[categorize(f)] += c
    for name, c in cats.most_common(top):
        lines.append(f"  {100 * c / main_total:5.1f}%  {name}")
    lines += ["", "inclusive share of key functions (% of main-thread samples):"]
    incl: Counter[str] = Counter()
    for f, c in busy:
        for fn in {_func(x) for x in f}:
            incl[fn] += c
    for fn in KEY_FUNCTIONS:
        if incl.get(fn):
            lines.append(f"  {100 * incl[fn] / main_total:5.1f}%  {fn}")
    lines += ["", "hottest leaf frames, main thread busy (% of main-thread samples):"]
    leaves: Counter[str] = Counter()
    for f, c in busy:
        leaves[f[-1]] += c
    for fr, c in leaves.most_common(top):
        lines.append(f"  {100 * c / main_total:5.1f}%  {fr}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Entry point: one file argument."""
    with open(argv[0], encoding="utf-8", errors="replace") as f:
        print(summarize(f.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
