"""How much of everything one run does (``--quick`` shrinks it all)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Params:
    """Counts, durations and levels of one run."""

    floor_serial: int = 2000
    floor_concurrent: int = 3000
    floor_in_flight: int = 16
    levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    wait_levels: tuple[int, ...] = (1, 16)
    warm: float = 1.0
    duration: float = 4.0
    rpc_duration: float = 2.0
    qps_callers: int = 16
    history: int = 10_000
    running: int = 500
    stream_bytes: int = 1_000_000_000
    stream_clients: tuple[int, ...] = (1, 4)
    poll_ms: float = 1.0
    main_level: int = 16  # the in-flight level the targets talk about
    compare_rounds: int = 3  # interleaved rounds of the comparison step
    unary_callers: int = 16  # concurrent callers of the empty-unary comparison
    baseline_history: int = 2000  # jobs per agent before the baseline step's second RSS

    def replace(self, **changes: Any) -> Params:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


FULL = Params()
QUICK = Params(
    floor_serial=100,
    floor_concurrent=200,
    levels=(1, 4),
    wait_levels=(1,),
    warm=0.1,
    duration=0.4,
    rpc_duration=0.25,
    qps_callers=4,
    history=60,
    running=10,
    stream_bytes=4_000_000,
    stream_clients=(1, 2),
    main_level=4,
    compare_rounds=1,
    unary_callers=4,
    baseline_history=60,
)
