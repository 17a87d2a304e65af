"""The audit log (agent.daemon.audit), directly: one JSON object a line, append-only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from agent.daemon.audit import AuditLog, env_names


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_json_line_per_record_with_empty_fields_left_out(tmp_path: Path) -> None:
    """Each record is one JSON line; optional fields and empty extras are omitted."""
    log = AuditLog(tmp_path / "audit.log")
    log.record("rpc", decision="deny", identity="mallory", rpc="StartJob", rule="r", reason="no")
    log.record("job_start", decision="allow", job_id="j1", command="true", env=[], pid=7)
    log.close()
    first, second = _lines(tmp_path / "audit.log")
    assert first["event"] == "rpc" and first["decision"] == "deny"
    assert first["identity"] == "mallory" and first["rule"] == "r" and first["reason"] == "no"
    assert "job_id" not in first and "command" not in first
    assert second["job_id"] == "j1" and second["pid"] == 7 and "env" not in second
    assert str(first["time"]).endswith("+00:00")


def test_file_is_private_and_appended_to(tmp_path: Path) -> None:
    """0600, and an existing log is appended to, never truncated."""
    path = tmp_path / "audit.log"
    path.write_text('{"old":1}\n')
    os.chmod(path, 0o600)
    log = AuditLog(path)
    log.record("x", decision="ok")
    log.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert [next(iter(e)) for e in _lines(path)] == ["old", "time"]
    (tmp_path / "new.log").unlink(missing_ok=True)
    fresh = AuditLog(tmp_path / "new.log")
    fresh.close()
    assert (tmp_path / "new.log").stat().st_mode & 0o777 == 0o600


def test_lines_are_ascii_even_for_other_text(tmp_path: Path) -> None:
    """Non-ASCII and control characters are escaped: one line stays one line."""
    log = AuditLog(tmp_path / "audit.log")
    log.record("rpc", decision="deny", identity="ädmin\nevent=forged")
    log.close()
    raw = (tmp_path / "audit.log").read_bytes()
    assert raw.count(b"\n") == 1 and raw.isascii()
    assert _lines(tmp_path / "audit.log")[0]["identity"] == "ädmin\nevent=forged"


def test_reopen_follows_a_rotation(tmp_path: Path) -> None:
    """After an external rename, reopen() writes to a new file at the original path."""
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record("before", decision="ok")
    path.rename(tmp_path / "audit.log.1")
    log.reopen()
    log.record("after", decision="ok")
    log.close()
    assert [e["event"] for e in _lines(tmp_path / "audit.log.1")] == ["before"]
    assert [e["event"] for e in _lines(path)] == ["after"]


def test_a_failed_write_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """A write that fails (a full disk: /dev/full) is logged loudly and does not raise."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    log = AuditLog(Path("/dev/full"))
    with caplog.at_level(logging.ERROR, logger="agent.daemon.audit"):
        log.record("x", decision="ok")
    log.close()
    assert "write failed" in caplog.text


def test_every_record_reaches_the_hook_after_it_is_written(tmp_path: Path) -> None:
    """``on_record`` (the metrics' hook) sees (event, decision, rule) of each record,
    once it is in the file."""
    path = tmp_path / "audit.log"
    seen: list[tuple[str, str, str, int]] = []

    def hook(event: str, decision: str, rule: str) -> None:
        seen.append((event, decision, rule, len(_lines(path))))

    log = AuditLog(path, on_record=hook)
    log.record("rpc", decision="deny", rule="no-rule-matched")
    log.record("policy_reload", decision="ok")
    log.close()
    assert seen == [("rpc", "deny", "no-rule-matched", 1), ("policy_reload", "ok", "", 2)]


def test_env_names_are_names_only() -> None:
    """Environment values may be secrets: only the sorted names are kept."""
    assert env_names({"TOKEN": "s3cret", "A": "1"}) == ["A", "TOKEN"]
