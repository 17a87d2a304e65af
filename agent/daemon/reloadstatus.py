"""The outcome of each reload, written by the agent, awaited by ``agent reload``.

systemd 252 has no ``Type=notify-reload``: ``ExecReload=`` runs synchronously
and its exit status is the reload's result. ``kill -HUP`` exits at once, so
``systemctl reload`` reported success for a policy the agent then rejected.
``agent reload`` (the units' ``ExecReload=``) sends SIGHUP and waits for this
record instead, and fails when the agent rejected something.

The record is one small JSON file in the state directory (the one directory
the unit lets the agent write and its ExecReload= command read), replaced
atomically after every reload. A reload is matched to the signal by the
agent's pid and by its start time on the system-wide monotonic clock: a
reload that began after the signal was sent is the one that handled it,
however many SIGHUPs coalesced or other reloads ran meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from agent.daemon.lockfile import LockFile

FILE_NAME = "reload-status.json"


class ReloadError(Exception):
    """No outcome: the agent is not running, exited, or did not answer in time."""


@dataclass(frozen=True)
class Outcome:
    """One reload as the agent carried it out."""

    pid: int
    generation: int
    started: float  # time.monotonic() in the agent when the reload began
    rejected: tuple[tuple[str, str], ...]  # (what, why): "policy", "config", "certificates"...

    @property
    def ok(self) -> bool:
        """Whether everything the reload read was accepted."""
        return not self.rejected


def path(state_dir: Path) -> Path:
    """Where the agent of ``state_dir`` records its reloads."""
    return state_dir / FILE_NAME


def write(state_dir: Path, outcome: Outcome) -> None:
    """Replace the record atomically (raises OSError; the caller logs it)."""
    target = path(state_dir)
    tmp = target.with_name(f".{FILE_NAME}.{os.getpid()}")
    data = {
        "pid": outcome.pid,
        "generation": outcome.generation,
        "started": outcome.started,
        "rejected": [list(r) for r in outcome.rejected],
    }
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read(state_dir: Path) -> Outcome | None:
    """The last record, or None if there is none (or it cannot be read yet)."""
    try:
        data = json.loads(path(state_dir).read_text())
        return Outcome(
            pid=int(data["pid"]),
            generation=int(data["generation"]),
            started=float(data["started"]),
            rejected=tuple((str(w), str(y)) for w, y in data["rejected"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def agent_pid(state_dir: Path) -> int:
    """The pid of the agent holding ``state_dir`` (from its lock file); raises ReloadError."""
    lock = LockFile.state_dir(state_dir).path  # holds the running agent's pid
    try:
        text = lock.read_text().strip()
    except OSError as e:
        raise ReloadError(f"no agent found: cannot read {lock}: {e.strerror}") from None
    if not text.isdigit():
        raise ReloadError(f"no agent found: {lock} names no pid")
    pid = int(text)
    if not _alive(pid):
        raise ReloadError(f"no agent is running for {state_dir} (pid {pid} in {lock} is gone)")
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: kill() says so
    # A zombie (exited, not yet reaped by its parent) still takes signals.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def request(state_dir: Path, pid: int, *, timeout: float, interval: float = 0.05) -> Outcome:
    """SIGHUP ``pid`` and return the outcome of the reload that handles it.

    Raises :class:`ReloadError` if the signal cannot be sent, the agent exits
    first, or no such reload is recorded within ``timeout`` seconds.
    """
    sent = time.monotonic()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        raise ReloadError(f"cannot signal the agent (pid {pid}): {e.strerror}") from None
    deadline = sent + timeout
    while True:
        outcome = read(state_dir)
        if outcome is not None and outcome.pid == pid and outcome.started >= sent:
            return outcome
        if not _alive(pid):
            raise ReloadError(f"the agent (pid {pid}) exited before it reloaded")
        if time.monotonic() >= deadline:
            raise ReloadError(
                f"the agent (pid {pid}) recorded no reload in {path(state_dir)} within "
                f"{timeout:g} s (see its log)"
            )
        time.sleep(interval)
