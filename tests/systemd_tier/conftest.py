"""Fixtures shared by the systemd tier's modules: step timings and the cached rootfs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import nspawn


@dataclass
class Timings:
    """Wall-clock seconds of the slow steps, printed at module teardown (-s or -rP)."""

    steps: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, started: float) -> float:
        """Record the time since ``started`` (a time.monotonic() value); return it."""
        took = round(time.monotonic() - started, 3)
        self.steps[name] = took
        return took


@pytest.fixture(scope="module")
def timings(request: pytest.FixtureRequest) -> Iterator[Timings]:
    """Collect step timings and print them when the module is done."""
    collected = Timings()
    started = time.monotonic()
    yield collected
    collected.add("module_total", started)
    name = request.module.__name__.rsplit(".", 1)[-1]
    print(f"\n{name} timings (s):", json.dumps(collected.steps, indent=1))


@pytest.fixture(scope="module")
def rootfs(timings: Timings) -> Path:
    """The cached Debian rootfs (built by debootstrap on first use)."""
    reason = nspawn.skip_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    path = nspawn.ensure_rootfs()
    timings.add("ensure_rootfs", started)
    return path
