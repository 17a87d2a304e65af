"""Job status as text and as JSON-ready data (agentctl and agent-scheduler)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.client.model import JobStatus

__all__ = ["format_status", "job_table", "status_json"]

_HEADER = ("JOB ID", "STATE", "STARTED", "OWNER", "COMMAND")


def _shown(text: str) -> str:
    """``text`` on one line: a control character in it would break the table."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def job_table(rows: Iterable[JobStatus]) -> str:
    """Jobs as a table (``agentctl list``): a header line, then one line per job.

    Each column is as wide as its widest cell, so a long owner (a
    certificate's full name) moves the columns after it instead of running
    into them; COMMAND comes last and is never padded.
    """
    import shlex  # only agentctl list needs it

    cells = [_HEADER]
    for s in rows:
        when = f"{s.start_time:%Y-%m-%d %H:%M:%S}" if s.start_time else "-"
        command = " ".join(shlex.quote(w) for w in (s.command, s.path, *s.args) if w)
        cells.append((s.job_id, s.state, when, _shown(s.owner) or "-", _shown(command)))
    widths = [max(len(row[i]) for row in cells) for i in range(len(_HEADER) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in cells
    )


def _state(st: JobStatus) -> str:
    if st.state != "UNSPECIFIED":
        return st.state
    # A worker of the original protocol: only done and error.
    outcome = "succeeded" if st.succeeded else "failed" if st.done else "not done"
    return f"{outcome} (the worker reports done/error only, no state)"


def format_status(st: JobStatus) -> str:
    """Human-readable status lines."""
    lines = [f"job        {st.job_id}", f"state      {_state(st)}"]
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
