"""Removing a scratch directory (agent.keeper.scratch) on real temporary trees.

Modes are no obstacle to root with its capabilities, so the tests that must show the
walk making directories accessible again run it in a fresh interpreter as their owner
without privileges: root with an empty capability set (the files are root's), or the
test user itself when not root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.keeper import scratch

from helpers import IS_ROOT

NOBODY = 65534
DENIED = (errno.EACCES, errno.EPERM)
# Runs scratch.remove(path, owner) and prints the outcome as JSON.
REMOVE = """
import json, sys
from agent.keeper import scratch
owner = json.loads(sys.argv[2])
try:
    scratch.remove(sys.argv[1], tuple(owner) if owner else None)
    print(json.dumps(None))
except OSError as e:
    print(json.dumps([type(e).__name__, e.errno, e.filename]))
"""


def _remove_in_child(path: Path, *, caps: str, owner: tuple[int, int] | None = None) -> object:
    """scratch.remove in a fresh interpreter, as root with ``caps`` as its bounding set
    (setpriv syntax, e.g. "-all"), or as this user when not root."""
    cmd = [sys.executable, "-c", REMOVE, str(path), json.dumps(owner)]
    if IS_ROOT:
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _fds() -> dict[str, str]:
    """This process's open descriptors and what each names."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own, closed by now
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _opened_since(before: dict[str, str]) -> dict[str, str]:
    """Descriptors open now that were not before (what another object closes meanwhile,
    a channel of an earlier test collected, is no concern of the code under test)."""
    return {fd: what for fd, what in _fds().items() if before.get(fd) != what}


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files and a directory beside the scratch directory that must all survive."""
    out = tmp_path / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "dir" / "kept").write_text("kept\n")
    (out / "file").write_text("file\n")
    os.chmod(out / "dir", 0o555)  # a walk that followed a link would have to chmod it
    return out


def _assert_outside_intact(out: Path) -> None:
    assert (out / "file").read_text() == "file\n"
    assert (out / "dir" / "kept").read_text() == "kept\n"
    assert _mode(out / "dir") == 0o555


def _messy_tree(top: Path, out: Path) -> None:
    """Nested directories and files, links out of the tree, everything made mode 000."""
    (top / "a" / "b" / "c").mkdir(parents=True)
    (top / "d").mkdir()
    (top / "a" / "b" / "c" / "f").write_text("x")
    (top / "a" / "f").write_text("y")
    (top / "d" / "f").write_text("z")
    (top / "a" / "b" / "to-file").symlink_to(out / "file")
    (top / "a" / "b" / "to-dir").symlink_to(out / "dir")  # a symlinked directory
    (top / "d" / "to-outside").symlink_to(out)
    (top / "d" / "dangling").symlink_to(top / "nowhere")
    os.mkfifo(top / "d" / "fifo")
    for p in ("a/b/c/f", "a/b/c", "a/b", "a/f", "a", "d/f", "d/fifo", "d", "."):
        os.chmod(top / p, 0)


def test_missing_and_empty_directories() -> None:
    """A missing path is no error; an empty directory, even mode 000, is removed."""
    with tempfile.TemporaryDirectory() as d:
        scratch.remove(os.path.join(d, "never-made"))
        os.mkdir(os.path.join(d, "empty"), 0)
        scratch.remove(os.path.join(d, "empty"))
        assert os.listdir(d) == []


def test_modes_000_are_no_obstacle_to_the_owner(tmp_path: Path, outside: Path) -> None:
    """The owner without privileges removes a tree of 000 files and directories (its
    top too), deleting the symlinks and nothing they point to."""
    top = tmp_path / "job"
    top.mkdir()
    _messy_tree(top, outside)
    assert _remove_in_child(top, caps="-all") is None
    assert not top.exists() and not top.is_symlink()
    _assert_outside_intact(outside)


def test_symlinks_are_removed_never_followed(tmp_path: Path, outside: Path) -> None:
    """Links to a file, to directories, dangling ones: removed as names; what they name
    keeps its contents and its mode."""
    top = tmp_path / "job"
    top.mkdir()
    _messy_tree(top, outside)
    fds = _fds()
    scratch.remove(str(top))
    assert not top.exists() and _opened_since(fds) == {}
    _assert_outside_intact(outside)


def test_a_top_that_is_a_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    """The path itself is never followed: a symlink to a directory is NotADirectoryError."""
    link = tmp_path / "job"
    link.symlink_to(outside / "dir")
    with pytest.raises(NotADirectoryError):
        scratch.remove(str(link))
    assert link.is_symlink()
    _assert_outside_intact(outside)


def _deep(top: Path, depth: int) -> None:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir("d", dir_fd=fd)
            if i % 100 == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


def test_deep_nesting_takes_no_more_descriptors(tmp_path: Path) -> None:
    """A tree deeper than the recursion limit and than MAX_DEPTH descriptors is removed,
    and no descriptor is left open."""
    top = tmp_path / "job"
    top.mkdir()
    depth = max(sys.getrecursionlimit(), scratch.MAX_DEPTH) + 500
    _deep(top, depth)
    fds = _fds()
    scratch.remove(str(top))
    assert not top.exists() and _opened_since(fds) == {}


def test_deep_nesting_of_mode_000_directories_as_the_owner(tmp_path: Path) -> None:
    """Deep and 000 at every level: directories moved up are made accessible too."""
    top = tmp_path / "job"
    top.mkdir()
    _deep(top, scratch.MAX_DEPTH * 3)
    for dirpath, _dirs, files in list(os.walk(top, topdown=True)):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0)
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
        os.chmod(dirpath, 0)
    assert _remove_in_child(top, caps="-all") is None
    assert not top.exists()


def test_what_remains_is_named(tmp_path: Path) -> None:
    """What cannot be removed raises an OSError naming it; the rest is removed."""
    if not IS_ROOT:
        pytest.skip("needs a tree of another user")
    top = tmp_path / "job"
    (top / "ok").mkdir(parents=True)
    (top / "locked" / "in").mkdir(parents=True)
    (top / "locked" / "in" / "f").write_text("f")
    os.chown(top / "locked", NOBODY, NOBODY)
    os.chmod(top / "locked", 0)
    got = _remove_in_child(top, caps="-all")
    assert isinstance(got, list) and got[0] == "PermissionError" and got[1] in DENIED
    assert got[2] == str(top / "locked")
    assert sorted(os.listdir(top)) == ["locked"]


@pytest.fixture
def nobodys_tree() -> Iterator[tuple[Path, Path]]:
    """A 0711 root-owned parent (as the scratch root) holding a messy tree of nobody's."""
    parent = Path(tempfile.mkdtemp(prefix="scratch-test-"))
    os.chmod(parent, 0o711)
    out = parent / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "dir" / "kept").write_text("kept\n")
    (out / "file").write_text("file\n")
    os.chmod(out / "dir", 0o555)
    top = parent / "job"
    top.mkdir()
    _messy_tree(top, out)
    for dirpath, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            os.chown(os.path.join(dirpath, name), NOBODY, NOBODY, follow_symlinks=False)
    os.chown(top, NOBODY, NOBODY)
    yield top, out
    subprocess.run(["rm", "-rf", "--one-file-system", str(parent)], check=False)


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_root_without_dac_override_falls_back_to_the_owner(
    nobodys_tree: tuple[Path, Path],
) -> None:
    """Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH/CAP_FOWNER (a hardened unit)
    cannot enter nobody's 000 directories: given the owner, a child switched to nobody
    empties the tree and root removes it; without the owner, the refusal is named."""
    top, out = nobodys_tree
    caps = "-dac_override,-dac_read_search,-fowner"
    got = _remove_in_child(top, caps=caps)
    assert isinstance(got, list) and got[0] == "PermissionError" and got[1] in DENIED
    assert got[2] == str(top) and top.exists()
    assert _remove_in_child(top, caps=caps, owner=(NOBODY, NOBODY)) is None
    assert not top.exists()
    _assert_outside_intact(out)
