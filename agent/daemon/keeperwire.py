"""The keeper's answers and reports as the agent reads them (pure values, no I/O).

A refusal (:func:`refusal`), an admitted start (:class:`Admission`), how a job ended
(:class:`Finished`), and the hello a keeper says to an agent that attaches
(:func:`hello_from_wire`: :class:`Hello`, its running jobs :class:`Kept`). The agent's
side of the keeper (:mod:`agent.daemon.keeperclient`) reads them off the socket.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.keeper.cgroups import Subtree
from agent.keeper.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from agent.keeper.lifecycle import Exit
from agent.vocabulary import JobState, Kind

PROTOCOL = 2  # agent.keeper.keeper.PROTOCOL (not imported: the keeper's module)
# A refusal's kind, as the keeper names it, and the error it is raised as.
REFUSALS: dict[str, type[AgentError]] = {
    cls.kind.name: cls
    for cls in (
        InvalidArgument,
        NotFound,
        PermissionDenied,
        Unauthenticated,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
    )
}


def refusal(msg: dict[str, Any]) -> AgentError:
    """The AgentError of a keeper's "refused" answer (kind, rule, message)."""
    cls = REFUSALS.get(str(msg.get("kind")), AgentError)
    err = cls(str(msg.get("message", "refused by the job keeper")), rule=str(msg.get("rule", "")))
    if cls is AgentError:
        err.kind = Kind.INTERNAL
    return err


class Stopper(Protocol):
    """Who stops an admitted job the agent will not record (the keeper's client)."""

    def stop(self, job_id: str, how: str) -> None: ...


class Admission:
    """The keeper admitted a start: what the record needs, and the start's outcome to
    await (``started``: the pid, or a SpawnFailure naming the failed step)."""

    def __init__(
        self,
        client: Stopper,
        job_id: str,
        started: asyncio.Future[int],
        msg: dict[str, Any],
    ) -> None:
        self._client, self.job_id, self.started = client, job_id, started
        self.command = str(msg["command"])
        self.timeout = int(msg["timeout"])
        self.limits = {str(k): int(v) for k, v in dict(msg["limits"]).items()}
        self.entry = str(msg["entry"])

    def abandon(self) -> None:
        """The agent will not record this job: it must not run (stopped once started)."""
        if not self.started.done():
            self.started.cancel()  # the "started" answer then stops it (not_recorded)
        else:
            self._client.stop(self.job_id, "not_recorded")


@dataclass(frozen=True)
class Finished:
    """How a job ended, as the keeper decided it."""

    job_id: str
    state: JobState
    text: str
    exit: Exit
    size: int
    truncated: bool
    persist: bool = True
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Finished:
        """Raises KeyError/TypeError/ValueError on a malformed message."""
        ex = msg["exit"]
        return cls(
            job_id=str(msg["job"]),
            state=JobState[str(msg["state"])],
            text=str(msg["text"]),
            exit=Exit(
                exit_code=_opt_int(ex["code"]),
                signal=_opt_int(ex["signal"]),
                user_cpu=float(ex["utime"]),
                system_cpu=float(ex["stime"]),
                max_rss=int(ex["maxrss"]),
                oom_kills=int(ex.get("oom", 0)),
                start_failure=str(msg.get("start_failure", "")),
                end_time=None if ex.get("ended") is None else float(ex["ended"]),
            ),
            size=int(msg["size"]),
            truncated=bool(msg["truncated"]),
            persist=bool(msg.get("persist", True)),
            record=_dict(msg.get("record")),
        )


@dataclass(frozen=True)
class Kept:
    """A job the keeper was running when this agent attached."""

    job_id: str
    pid: int
    size: int
    truncated: bool
    ending: bool
    record: dict[str, Any]


@dataclass(frozen=True)
class Hello:
    """What the keeper said when this agent attached."""

    pid: int
    spawn: str
    why: str
    jobs: list[Kept]
    ended: list[Finished]
    # True when this agent started the keeper (no keeper answered): whatever is left of
    # earlier jobs is nobody's, and start-up recovery may kill it.
    fresh: bool
    # The keeper is a service of its own (`agent keeper`), not this agent's child.
    service: bool = False
    # The keeper's user (root: it can give entries their users and capabilities).
    uid: int = -1
    # It runs jobs as any user with their entries' capabilities: root, or (the privileged
    # unit) another user holding CAP_SETUID, CAP_SETGID and CAP_SETPCAP.
    gives: bool = False
    # Where the keeper puts job cgroups (None: jobs run without); for the agent's limits.
    cgroups: Subtree | None = None
    # What the keeper can do besides protocol 2's messages (agent.keeper.keeperconn's
    # FEATURES); the agent asks for those it understands (USED).
    features: frozenset[str] = frozenset()


# The keeper's features this agent understands and asks for when its hello lists them.
USED = frozenset({"admitted+started", "pipe-with-start"})
# Of those, what only an agent that is its keeper's descriptor store asks for.
STORE_ONLY = frozenset({"pipe-with-start"})


def hello_from_wire(msg: dict[str, Any], fresh: bool) -> Hello:
    """The keeper's first message, read. Raises OSError (EPROTO) when it is no hello of
    this protocol, KeyError/TypeError/ValueError when it is malformed."""
    if msg.get("op") != "hello" or msg.get("protocol") != PROTOCOL:
        raise OSError(errno.EPROTO, f"the job keeper speaks another protocol: {msg!r:.200}")
    where = msg.get("cgroups")
    return Hello(
        pid=int(msg["pid"]),
        spawn=str(msg["spawn"]),
        why=str(msg["why"]),
        jobs=[
            Kept(
                job_id=str(j["job"]),
                pid=int(j["pid"]),
                size=int(j["size"]),
                truncated=bool(j["truncated"]),
                ending=bool(j["ending"]),
                record=_dict(j["record"]),
            )
            for j in msg["jobs"]
        ],
        ended=[Finished.from_wire(f) for f in msg["ended"]],
        fresh=fresh,
        service=bool(msg.get("service", False)),
        uid=int(msg.get("uid", -1)),
        gives=bool(msg.get("gives", False)),
        cgroups=None
        if not isinstance(where, dict)
        else Subtree(Path(str(where["jobs"])), frozenset(map(str, where["controllers"]))),
        features=frozenset(str(f) for f in msg.get("features", ()) if isinstance(f, str)),
    )


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)
