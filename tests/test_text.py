"""Job status as text and JSON (agent.client.text), directly."""

from __future__ import annotations

import datetime
import json

from agent.client.model import JobStatus
from agent.client.text import format_status, job_table, status_json

T0 = datetime.datetime(2026, 12, 6, 18, 0, 0, tzinfo=datetime.timezone.utc)


def _status(**kw: object) -> JobStatus:
    base: dict[str, object] = {
        "job_id": "j1",
        "state": "SUCCEEDED",
        "done": True,
        "error": False,
        "error_text": "",
        "exit_code": 0,
        "signal": None,
        "pid": 42,
        "owner": "alice",
        "command": "bash",
        "path": "/opt/count.sh",
        "args": ("3",),
        "start_time": T0,
        "end_time": T0 + datetime.timedelta(seconds=2),
        "user_cpu": 0.5,
        "system_cpu": 0.25,
        "max_rss": 4096 * 1024,
        "output_bytes": 12,
        "output_truncated": False,
        "timeout_seconds": 0,
    }
    base.update(kw)
    return JobStatus(**base)  # type: ignore[arg-type]


def test_table_columns_grow_with_the_widest_cell() -> None:
    """A long owner moves the later columns instead of running into them; COMMAND is last."""
    rows = [_status(), _status(job_id="j2", owner="a-very-long-certificate-name")]
    lines = job_table(rows).splitlines()
    assert lines[0].split() == ["JOB", "ID", "STATE", "STARTED", "OWNER", "COMMAND"]
    starts = {line.index("bash /opt/count.sh 3") for line in lines[1:]}
    assert len(starts) == 1 and lines[0].index("COMMAND") == starts.pop()


def test_table_quotes_arguments_and_escapes_control_characters() -> None:
    """An argument with a space is quoted; an owner with a newline stays on its line."""
    table = job_table([_status(args=("a b",), owner="evil\nJOB", start_time=None)])
    lines = table.splitlines()
    assert len(lines) == 2
    assert "'a b'" in lines[1] and "evil\\nJOB" in lines[1] and " - " in lines[1]


def test_format_status_shows_what_the_job_did() -> None:
    """The status lines: state, exit, command, times, CPU and output."""
    text = format_status(_status(output_truncated=True))
    assert "state      SUCCEEDED" in text and "exit code  0" in text
    assert "command    bash /opt/count.sh 3" in text
    assert "started    2026-12-06 18:00:00.000000 UTC" in text
    assert "cpu        user 0.500s system 0.250s, max rss 4096 KiB" in text
    assert "output     12 bytes (truncated at the cap)" in text


def test_format_status_of_an_original_worker() -> None:
    """A worker of the original protocol sends no state: the outcome comes from done/error."""
    text = format_status(_status(state="UNSPECIFIED", done=True, error=True, exit_code=None))
    assert "state      failed (the worker reports done/error only, no state)" in text
    running = format_status(_status(state="UNSPECIFIED", done=False, exit_code=None))
    assert "not done" in running and "cpu" not in running


def test_status_json_is_json_ready() -> None:
    """Times become ISO strings (or None), arguments a list: json.dumps takes it as is."""
    d = status_json(_status(end_time=None))
    assert d["start_time"] == "2026-12-06T18:00:00+00:00" and d["end_time"] is None
    assert d["args"] == ["3"]
    assert json.loads(json.dumps(d))["job_id"] == "j1"
