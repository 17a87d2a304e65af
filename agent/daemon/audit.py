"""The audit log: one JSON object per line, per security decision and job action.

The file is opened with O_APPEND and never truncated, seeked or rewritten
by the agent (append-only from its side); rotate it with an external tool
and send SIGHUP so the agent reopens it. Argument values marked secret and
environment values are never written: only variable names are.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# One encoder for every line (json.dumps with these options builds a new one
# per call); the same output as json.dumps(entry, ensure_ascii=True,
# separators=(",", ":")).
_ENCODE = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
_UTC = datetime.timezone.utc


class AuditLog:
    """Appends JSON lines to a file."""

    def __init__(
        self, path: Path, *, on_record: Callable[[str, str, str], None] | None = None
    ) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = self._open()
        # Called with (event, decision, rule) after each record is written: the metrics'
        # hook (refusals by rule, reload results are audit events already).
        self._on_record = on_record

    def _open(self) -> int:
        # 0600: the audit log names identities and commands; only the
        # agent's user (and root) should read it.
        return os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )

    def reopen(self) -> None:
        """Reopen the file (after an external rotation)."""
        with self._lock:
            new = self._open()
            old, self._fd = self._fd, new
            os.close(old)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            os.close(self._fd)

    def record(
        self,
        event: str,
        *,
        decision: str,
        identity: str = "",
        peer: str = "",
        rpc: str = "",
        job_id: str = "",
        command: str = "",
        path: str = "",
        reason: str = "",
        rule: str = "",
        **extra: Any,
    ) -> None:
        """Write one event. ``decision`` is allow, deny, ok or error."""
        entry: dict[str, Any] = {
            "time": datetime.datetime.now(_UTC).isoformat(timespec="microseconds"),
            "event": event,
            "decision": decision,
            "identity": identity,
            "peer": peer,
            "rpc": rpc,
        }
        if job_id:
            entry["job_id"] = job_id
        if command:
            entry["command"] = command
        if path:
            entry["path"] = path
        if reason:
            entry["reason"] = reason
        if rule:
            entry["rule"] = rule
        for k, v in extra.items():
            if v not in (None, "", [], {}):
                entry[k] = v
        data = (_ENCODE(entry) + "\n").encode("ascii")
        with self._lock:
            try:
                os.write(self._fd, data)
            except OSError as e:
                # Losing an audit line must be loud, but must not take the
                # service down with it.
                log.error("audit log %s: write failed: %s", self.path, e)
        if self._on_record is not None:
            self._on_record(event, decision, rule)


def env_names(env: Mapping[str, str]) -> list[str]:
    """Environment variable names only (values may be secrets)."""
    return sorted(env)
