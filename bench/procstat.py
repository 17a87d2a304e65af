"""Reading /proc for the bench: memory, CPU time and percentiles.

Standard library only, so the floor process (``bench.floor``) can import it
without pulling in gRPC.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000  # the bench reports decimal megabytes throughout


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def status_kb(pid: int) -> dict[str, int]:
    """The ``kB`` fields of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0])
    return out


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process in MB: rss, hwm (peak), anon, file."""
    s = status_kb(pid)
    return {
        "rss_mb": s.get("VmRSS", 0) * 1024 / MB,
        "hwm_mb": s.get("VmHWM", 0) * 1024 / MB,
        "anon_mb": s.get("RssAnon", 0) * 1024 / MB,
        "file_mb": s.get("RssFile", 0) * 1024 / MB,
    }


def _stat_fields(path: str) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    # comm may contain spaces and ')': split after the last ')'.
    return data[data.rfind(b")") + 2 :].decode().split()


@dataclass(frozen=True)
class ProcCPU:
    """CPU seconds of a process (all its threads) and of its reaped children."""

    self_s: float
    children_s: float

    def __sub__(self, other: ProcCPU) -> ProcCPU:
        return ProcCPU(self.self_s - other.self_s, self.children_s - other.children_s)


def proc_cpu(pid: int) -> ProcCPU:
    """utime+stime and cutime+cstime of /proc/PID/stat, in seconds."""
    f = _stat_fields(f"/proc/{pid}/stat")
    # Fields after comm start at index 0 = state (field 3 in proc(5)).
    utime, stime, cutime, cstime = (int(x) for x in f[11:15])
    return ProcCPU((utime + stime) / TICK, (cutime + cstime) / TICK)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of the same name summed)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as c:
                name = c.read().strip()
            f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        if tid == str(pid):
            name = "main (asyncio + Python)"
        out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / TICK
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        parts = f.readline().split()
    vals = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
    idle = vals[3] + vals[4]
    total = sum(vals)
    return (total - idle) / TICK, total / TICK


def children_of(pid: int) -> list[int]:
    """Direct children of a process (forked by any of its threads)."""
    try:
        found: list[int] = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                found += [int(x) for x in f.read().split()]
        return sorted(set(found))
    except FileNotFoundError as e:
        if e.filename and str(e.filename).endswith("/task"):
            return []  # the process is gone
    except OSError:
        pass
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            f2 = _stat_fields(f"/proc/{name}/stat")
        except OSError:
            continue
        if int(f2[1]) == pid:
            out.append(int(name))
    return out


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    a, b, c = os.getloadavg()
    return a, b, c
