"""Prints the configuration reference table (README "Configuration reference").

tests/test_docs.py fails when the README's table differs from this output,
so the documentation always matches the code. Regenerate with:

    python scripts/config_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.keeper.config import describe


def table() -> str:
    """The markdown table."""
    lines = ["| section | key | default | meaning |", "|---|---|---|---|"]
    for section, key, default, text in describe():
        d = f"`{default}`" if default else ""
        lines.append(f"| `[{section}]` | `{key}` | {d} | {text.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
