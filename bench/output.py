"""Where measurements go: one JSON line each on stdout, progress on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any


def clean(v: Any) -> Any:
    """Round floats, NaN and infinities to None, recursively (for JSON)."""
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return None
        return round(v, 4)
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


def emit(rec: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Keep a measurement record and print it as one JSON line on stdout."""
    records.append(rec)
    print(json.dumps(clean(rec), separators=(",", ":")), flush=True)


def note(msg: str) -> None:
    """Progress on stderr."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)
