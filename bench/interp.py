"""Which Python runs the agent, the floor, the bare servers and the clients.

The agent is always the *installed* one (``PYTHON -m agent`` from a folder
outside the source tree, nothing of the source tree on its path). The
bench's own helper processes (``bench.load``, ``bench.floor``,
``bench.bare``) import a copy of the bench package made in the run's
temporary folder (:func:`helper_lib`), so they run as an unprivileged user
who may not be able to read the checkout, and they too get the installed
``agent._proto``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Interpreter:
    """How to run Python for every process of the run."""

    argv: tuple[str, ...]
    sitepath: str  # extra site-packages on PYTHONPATH ("" for none)
    version: str
    note: str = ""


def env(pythonpath: str, home: str) -> dict[str, str]:
    """A small, explicit environment for a child process."""
    out = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": home,
        "PYTHONDONTWRITEBYTECODE": "1",
        **{k: v for k, v in os.environ.items() if k.startswith("AGENT_")},
    }
    if pythonpath:
        out["PYTHONPATH"] = pythonpath
    return out


def helper_lib(base: Path) -> Path:
    """Copy the bench package to ``base/lib/bench`` (readable by all); return ``base/lib``."""
    lib = base / "lib"
    dst = lib / "bench"
    dst.mkdir(parents=True)
    for src in BENCH_DIR.glob("*.py"):
        shutil.copyfile(src, dst / src.name)
        os.chmod(dst / src.name, 0o644)
    for d in (lib, dst):
        os.chmod(d, 0o755)
    return lib


def helper_path(lib: Path, interp: Interpreter) -> str:
    """PYTHONPATH of a helper process: the bench copy, then the extra site-packages."""
    return os.pathsep.join(x for x in (str(lib), interp.sitepath) if x)


def _probe(prefix: list[str], argv: tuple[str, ...], pythonpath: str) -> str:
    code = (
        "import sys, grpc, os; print(sys.version.split()[0], "
        "os.path.realpath(sys.executable), sys.prefix, grpc.__version__)"
    )
    try:
        r = subprocess.run(
            [*prefix, *argv, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=env(pythonpath, home="/"),
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    return r.stdout.strip() if r.returncode == 0 else f"error: {r.stderr.strip()[-200:]}"


def other(path: str) -> Interpreter:
    """Another interpreter as it is (its own site-packages only): ``--baseline-python``."""
    argv = (path,)
    got = _probe([], argv, "")
    if got.startswith("error"):
        raise SystemExit(f"bench: {path}: {got}")
    return Interpreter(argv, "", got.split()[0])


def choose(choice: str, user_prefix: list[str] | None) -> Interpreter:
    """The same interpreter for every agent mode.

    ``auto``: this venv's Python if the other user runs it identically;
    otherwise (a venv on an interpreter the other user cannot read, as with
    a pyenv Python under /root) the system Python of the same version with
    this venv's site-packages on PYTHONPATH, for every mode, so the
    modes differ only in the user switch.
    """
    paths = sysconfig.get_paths()
    site = os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    if choice not in ("auto", "venv"):
        argv = (choice,)
        return Interpreter(argv, site, _probe([], argv, site).split()[0])
    mine = _probe([], (sys.executable,), "")
    if choice == "venv" or user_prefix is None:
        return Interpreter((sys.executable,), "", mine.split()[0])
    theirs = _probe(user_prefix, (sys.executable,), "")
    if theirs == mine:
        return Interpreter((sys.executable,), "", mine.split()[0])
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    system = f"/usr/bin/python{minor}"
    if os.path.exists(system):
        a = _probe([], (system,), site)
        b = _probe(user_prefix, (system,), site)
        if a == b and not a.startswith("error"):
            return Interpreter(
                (system,),
                site,
                a.split()[0],
                note=(
                    f"{sys.executable} runs differently as the job user ({theirs!r} vs "
                    f"{mine!r}); every agent mode, the floor and the clients use {system} "
                    "with this venv's site-packages instead"
                ),
            )
    return Interpreter(
        (sys.executable,),
        "",
        mine.split()[0],
        note=(
            f"WARNING: the unprivileged agent runs a different Python ({theirs!r}) than the "
            f"root agent ({mine!r}); the two modes are not directly comparable"
        ),
    )
