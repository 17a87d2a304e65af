"""Job status as text and as JSON-ready data (agentctl and agent-scheduler)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from agent.client.model import JobStatus

__all__ = ["format_status", "status_json"]


def format_status(st: JobStatus) -> str:
    """Human-readable status lines."""
    lines = [f"job        {st.job_id}", f"state      {st.state}"]
    if st.error_text:
        lines.append(f"error      {st.error_text}")
    if st.exit_code is not None:
        lines.append(f"exit code  {st.exit_code}")
    if st.signal is not None:
        lines.append(f"signal     {st.signal}")
    lines += [
        f"command    {st.command} {st.path} {' '.join(st.args)}".rstrip(),
        f"owner      {st.owner}",
        f"pid        {st.pid}",
    ]
    if st.start_time:
        lines.append(f"started    {st.start_time:%Y-%m-%d %H:%M:%S.%f} UTC")
    if st.end_time:
        lines.append(f"ended      {st.end_time:%Y-%m-%d %H:%M:%S.%f} UTC")
    if st.done:
        lines.append(
            f"cpu        user {st.user_cpu:.3f}s system {st.system_cpu:.3f}s, "
            f"max rss {st.max_rss // 1024} KiB"
        )
    lines.append(
        f"output     {st.output_bytes} bytes"
        + (" (truncated at the cap)" if st.output_truncated else "")
    )
    return "\n".join(lines)


def status_json(st: JobStatus) -> dict[str, Any]:
    """A status as JSON-ready data."""
    d = asdict(st)
    for k in ("start_time", "end_time"):
        d[k] = d[k].isoformat() if d[k] else None
    d["args"] = list(st.args)
    return d
