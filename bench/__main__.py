"""``python -m bench``: see bench/README.md."""

from __future__ import annotations

import json
import os
import stat
import sys
from importlib import metadata
from urllib.parse import unquote, urlparse


def editable_source() -> str | None:
    """The source folder of an editable install (``pip install -e``) of the agent, or None."""
    # Every one found: run from the checkout, its worker_agent.egg-info comes first.
    for dist in metadata.distributions(name="worker-agent"):
        try:
            info = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        url = urlparse(info.get("url", ""))
        if info.get("dir_info", {}).get("editable") and url.scheme == "file":
            return unquote(url.path)
    return None


def hidden_from_others(path: str) -> str | None:
    """The first folder on the way to ``path`` other users cannot search (or path itself
    if they cannot read it), or None if every user reaches it."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)[1:]
    for i in range(len(parts)):
        here = os.sep + os.sep.join(parts[: i + 1])
        try:
            mode = os.stat(here).st_mode
        except OSError:
            return here
        last = i == len(parts) - 1
        if (stat.S_ISDIR(mode) or not last) and not mode & stat.S_IXOTH:
            return here
        if last and not mode & stat.S_IROTH:
            return here
    return None


def editable_warning() -> str | None:
    """Why agents the bench starts cannot import an editable install of the agent, or None.

    The bench runs the installed agent from outside the checkout, as root and as
    nobody; when nobody cannot run this venv's Python it runs every agent with the
    system Python and this venv's site-packages on PYTHONPATH (bench/interp.py).
    An editable install is an import hook in a .pth file, which Python reads only
    from its own site-packages, never from PYTHONPATH; and nobody must be able to
    read the checkout it points to. Either way the agent dies at start with only
    "No module named agent".
    """
    src = editable_source()
    if src is None:
        return None
    why = []
    python = os.path.realpath(sys.executable)
    if (blocked := hidden_from_others(python)) is not None:
        why.append(
            f"other users cannot reach this venv's Python ({python}: {blocked}), so the bench "
            "runs every agent with the system Python and this venv's site-packages on "
            "PYTHONPATH, where the import hook of an editable install does not run"
        )
    if (blocked := hidden_from_others(src)) is not None:
        why.append(f"the unprivileged modes' user cannot read the checkout ({blocked})")
    if not why:
        return None
    return (
        f"bench: the agent is installed editable (pip install -e) from {src}, and the agents "
        f"the bench starts will fail with 'No module named agent': {'; '.join(why)}. Install "
        "a copy instead, e.g. in a venv of its own: python3 -m venv ~/bench-venv && "
        "~/bench-venv/bin/pip install '.[bench]' && ~/bench-venv/bin/python -m bench"
    )


if __name__ == "__main__":
    warning = editable_warning()
    if warning:
        print(warning, file=sys.stderr)

    from bench.run import main

    sys.exit(main())
