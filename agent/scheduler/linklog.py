"""What the scheduler says about its workers' links: one line a period, not one a link.

A fleet's agents all open their links when the scheduler starts and all lose them at
once when the network between them breaks: one INFO line for each would be 10,000 lines
at a time. Each open and close is said at DEBUG; at INFO, one summary at most every
:data:`SUMMARY_EVERY` seconds while links come and go: how many are open, how many
opened and closed since the last one, and the commonest reasons they closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

SUMMARY_EVERY = 10.0  # seconds
REASONS_SAID = 3  # the commonest close reasons in a summary


class LinkLog:
    """Counts links opened and closed and says so, in summary (``open_now``: how many
    links are open now, and how many of them accept calls)."""

    def __init__(
        self,
        log: logging.Logger,
        open_now: Callable[[], tuple[int, int]],
        every: float = SUMMARY_EVERY,
    ) -> None:
        self.log, self.open_now, self.every = log, open_now, every
        self.opened = 0
        self.closed: Counter[str] = Counter()
        self.pending: asyncio.TimerHandle | None = None

    def opened_one(self, worker_id: str, peer: str, accepts_calls: bool) -> None:
        calls = "accepted" if accepts_calls else "not accepted"
        self.log.debug("worker %s: link open from %s (calls %s)", worker_id, peer, calls)
        self.opened += 1
        self._due()

    def closed_one(self, worker_id: str, peer: str, why: str) -> None:
        self.log.debug("worker %s: link from %s %s", worker_id, peer, why)
        self.closed[why] += 1
        self._due()

    def _due(self) -> None:
        if self.pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop: said at once)
            self.say()
            return
        self.pending = loop.call_later(self.every, self.say)

    def say(self) -> None:
        """The summary of what happened since the last one (nothing: nothing said)."""
        self.pending = None
        closed = sum(self.closed.values())
        if not self.opened and not closed:
            return
        reasons = ", ".join(f"{n} {why}" for why, n in self.closed.most_common(REASONS_SAID))
        now, calls = self.open_now()
        self.log.info(
            "worker links: %d open (%d accept calls); %d opened and %d closed in the last %.0f s%s",
            now,
            calls,
            self.opened,
            closed,
            self.every,
            f" ({reasons})" if reasons else "",
        )
        self.opened = 0
        self.closed.clear()

    def close(self) -> None:
        """The scheduler stops: what is left is said now."""
        if self.pending is not None:
            self.pending.cancel()
        self.say()
