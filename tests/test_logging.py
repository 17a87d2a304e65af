"""The operational log: journald priority prefixes and JSON lines."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from agent.daemon.cli import (
    JournalFormatter,
    JournalJsonFormatter,
    JsonFormatter,
    stderr_is_journal,
)

from helpers import AgentFactory


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("agent.x", level, __file__, 1, msg, None, None)


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    """JOURNAL_STREAM matches only the descriptor it describes."""
    f = tmp_path / "s"
    with open(f, "w") as fh:
        st = os.fstat(fh.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(env, fh.fileno())
        assert not stderr_is_journal(
            {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fh.fileno()
        )
        assert not stderr_is_journal({}, fh.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fh.fileno())


@pytest.mark.parametrize(
    ("level", "prio"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
    ],
)
def test_journal_lines_carry_the_syslog_priority(level: int, prio: int) -> None:
    """Every line starts with <priority>, so journalctl -p filters by level."""
    out = JournalFormatter("%(levelname)s %(message)s").format(_record(level, "a\nb"))
    assert out.split("\n") == [f"<{prio}>{logging.getLevelName(level)} a", f"<{prio}>b"]


def test_json_lines_for_log_shippers() -> None:
    """format = "json": one object per line with time, level, logger, message, pid."""
    out = JsonFormatter().format(_record(logging.ERROR, "disk full: /var"))
    obj = json.loads(out)
    assert obj["level"] == "error" and obj["logger"] == "agent.x"
    assert obj["message"] == "disk full: /var" and obj["pid"] == os.getpid()
    assert obj["time"].endswith("Z") and "\n" not in out
    assert JournalJsonFormatter().format(_record(logging.ERROR, "x")).startswith("<3>{")


def test_agent_logs_json_when_configured(make_agent: AgentFactory) -> None:
    """A real agent with [logging] format = "json" writes only JSON lines."""
    a = make_agent(logging={"format": "json"})
    a.client().list()
    lines = [ln for ln in a.log().splitlines() if ln.strip()]
    objs = [json.loads(ln) for ln in lines]
    assert any("listening on" in o["message"] for o in objs)


def test_agent_under_journal_prefixes_priorities(make_agent: AgentFactory, tmp_path: Path) -> None:
    """With JOURNAL_STREAM naming its stderr, the agent's lines carry <N> prefixes."""
    a = make_agent(start=False)
    a.log_path.touch()
    st = os.stat(a.log_path)
    a.env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    a.start()
    a.client().list()
    lines = [ln for ln in a.log().splitlines() if "listening on" in ln]
    assert lines and lines[0].startswith("<6>INFO ")
