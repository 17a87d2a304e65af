"""A job's output file (agent.keeper.outputfile) and the agent's side of it (agent.daemon.output).

The file as the keeper writes it: made at the first byte (0600, never over an existing
name), capped, a write error failing only the job, its reservation and its state across
the keeper's re-execution; and the waiting of followers. Real files in tmp_path, no
process. Streaming a file from an offset is tests/test_output_stream.py; this adds the
cases it leaves out (resuming, a live job whose file went, waiting for the first byte).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.daemon.output import Followers, LiveOutput, stream_file
from agent.keeper.errors import FailedPrecondition, ResourceExhausted, SpawnFailure
from agent.keeper.outputfile import OutputFile, describe_oserror


async def _collect(it: AsyncIterator[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [chunk async for chunk in it]


# ---------------------------------------------------------------- the file


def test_no_file_until_the_first_byte(tmp_path: Path) -> None:
    """A job that prints nothing costs no file, reserved or not; an empty write makes none."""
    for name, reserve in (("a.out", False), ("b.out", True)):
        out = OutputFile(str(tmp_path / name), 0)
        if reserve:
            out.reserve()
        assert not (tmp_path / name).exists()
        out.close()
        out.close()  # idempotent
        assert not (tmp_path / name).exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("reserve", [False, True])
def test_the_first_byte_makes_a_private_file(tmp_path: Path, reserve: bool) -> None:
    """The file appears at the first byte, mode 0600, holding exactly what was written."""
    path = tmp_path / "j.out"
    out = OutputFile(str(path), 0)
    if reserve:
        out.reserve()
    assert out.write(b"hello ").written == 6
    assert out.write(b"world").written == 5
    out.close()
    assert path.read_bytes() == b"hello world"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert out.size == 11 and not out.truncated


@pytest.mark.parametrize("reserve", [False, True])
def test_an_existing_name_is_never_replaced(tmp_path: Path, reserve: bool) -> None:
    """A file already at the path is left alone: the job's write fails, naming EEXIST."""
    path = tmp_path / "j.out"
    path.write_bytes(b"not yours")
    out = OutputFile(str(path), 0)
    if reserve:
        out.reserve()
    r = out.write(b"data")
    out.close()
    assert r.written == 0 and not r.cap_reached
    assert r.failure == "its output file could not be created: File exists (EEXIST)"
    assert path.read_bytes() == b"not yours"


@pytest.mark.parametrize("reserve", [False, True])
def test_a_planted_symlink_is_not_followed(tmp_path: Path, reserve: bool) -> None:
    """A symlink at the path (even a dangling one) is not written through."""
    target = tmp_path / "target"
    path = tmp_path / "j.out"
    path.symlink_to(target)
    out = OutputFile(str(path), 0)
    if reserve:
        out.reserve()
    r = out.write(b"data")
    out.close()
    assert r.written == 0 and "EEXIST" in r.failure
    assert not target.exists()


def test_a_missing_directory_fails_the_first_byte_not_the_reservation(tmp_path: Path) -> None:
    """A reservation that cannot be made (no directory) is left to the first byte, which
    fails the job with the reason; a silent job would still succeed."""
    out = OutputFile(str(tmp_path / "gone" / "j.out"), 0)
    out.reserve()  # does not raise
    r = out.write(b"x")
    out.close()
    assert r.failure == ("its output file could not be created: No such file or directory (ENOENT)")


def test_a_keeper_out_of_descriptors_refuses_the_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE at the reservation is the agent's condition (RESOURCE_EXHAUSTED), before the
    job starts."""

    def no_fds(*a: object, **kw: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", no_fds)
    out = OutputFile(str(tmp_path / "j.out"), 0)
    with pytest.raises(ResourceExhausted) as e:
        out.reserve()
    assert e.value.rule == "agent-resources"


def test_the_cap_truncates_and_says_so(tmp_path: Path) -> None:
    """The write that crosses the cap keeps what fits and reports cap_reached; later writes
    keep nothing; the file holds exactly ``cap`` bytes."""
    path = tmp_path / "j.out"
    out = OutputFile(str(path), 10)
    a, b, c = out.write(b"123456"), out.write(b"7890abc"), out.write(b"more")
    out.close()
    assert (a.written, a.cap_reached) == (6, False)
    assert (b.written, b.cap_reached) == (4, True)
    assert (c.written, c.cap_reached) == (0, True)
    assert path.read_bytes() == b"1234567890"
    assert out.size == 10 and out.truncated


def test_a_write_that_ends_at_the_cap_is_not_truncated(tmp_path: Path) -> None:
    """Exactly ``cap`` bytes: everything is kept and nothing was cut."""
    out = OutputFile(str(tmp_path / "j.out"), 4)
    r = out.write(b"abcd")
    out.close()
    assert (r.written, r.cap_reached, out.truncated) == (4, False, False)


@settings(max_examples=50, deadline=None)
@given(
    cap=st.integers(min_value=0, max_value=64),
    chunks=st.lists(st.binary(max_size=20), max_size=8),
)
def test_the_file_is_the_prefix_of_what_was_written(
    tmp_path_factory: pytest.TempPathFactory, cap: int, chunks: list[bytes]
) -> None:
    """Property: whatever the chunks, the file holds the first ``cap`` bytes of their
    concatenation (all of it with no cap), and size and the written counts agree."""
    path = tmp_path_factory.mktemp("cap") / "j.out"
    out = OutputFile(str(path), cap)
    written = sum(out.write(c).written for c in chunks)
    out.close()
    whole = b"".join(chunks)
    want = whole[:cap] if cap else whole
    assert (path.read_bytes() if path.exists() else b"") == want
    assert written == out.size == len(want)
    assert out.truncated == (bool(cap) and len(whole) > cap)


def test_a_full_disk_fails_the_write_not_the_keeper(tmp_path: Path) -> None:
    """ENOSPC while writing: a failure naming it, no exception, what was written counted."""
    out = OutputFile(str(tmp_path / "j.out"), 0)
    assert out.write(b"ok").written == 2
    assert out._fd is not None
    os.close(out._fd)
    out._fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    r = out.write(b"lost")
    out.close()
    assert r.written == 0 and out.size == 2
    assert r.failure == "its output could not be written: No space left on device (ENOSPC)"


def test_state_round_trips_and_the_file_goes_on(tmp_path: Path) -> None:
    """state() -> from_state() keeps path, cap, size, truncation, owner and the descriptor;
    the restored file appends where the first one stopped."""
    path = tmp_path / "j.out"
    out = OutputFile(str(path), 8, owner=-1)
    out.write(b"abc")
    st_ = out.state()
    assert st_ == {
        "path": str(path),
        "cap": 8,
        "size": 3,
        "truncated": False,
        "fd": out._fd,
        "unnamed": False,
        "owner": -1,
    }
    again = OutputFile.from_state(st_)
    assert (again.path, again.cap, again.size, again.truncated) == (str(path), 8, 3, False)
    r = again.write(b"defghij")
    again.close()
    assert r.cap_reached and path.read_bytes() == b"abcdefgh"


def test_an_unnamed_reservation_survives_the_state(tmp_path: Path) -> None:
    """A reserved, not yet linked file stays unnamed through state() and is named by the
    restored object's first byte; no descriptor yet is -1."""
    assert OutputFile(str(tmp_path / "x.out"), 0).state()["fd"] == -1
    path = tmp_path / "j.out"
    out = OutputFile(str(path), 0)
    out.reserve()
    st_ = out.state()
    assert st_["unnamed"] is True and st_["fd"] >= 0
    again = OutputFile.from_state(st_)
    assert not path.exists()
    again.write(b"late")
    again.close()
    assert path.read_bytes() == b"late"


def test_describe_oserror() -> None:
    """Text and errno name; no errno: the text alone; a spawn failure: its own reason."""
    assert describe_oserror(OSError(errno.ENOENT, "No such file")) == "No such file (ENOENT)"
    assert describe_oserror(OSError("plain")) == "plain"
    reason = "execve: Exec format error (ENOEXEC)"
    assert describe_oserror(SpawnFailure(errno.ENOEXEC, reason)) == reason


# ---------------------------------------------------------------- followers


def test_wake_releases_every_waiter_and_forgets_them() -> None:
    """All current waiters return at one wake; none is left registered."""

    async def main() -> None:
        f = Followers()
        waiters = [asyncio.create_task(f.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(f) == 3
        f.wake()
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert len(f) == 0
        f.wake()  # nobody waiting: nothing happens

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_no_trace() -> None:
    """A follower that goes away (the client hung up) is removed at once, not at the next wake."""

    async def main() -> None:
        f = Followers()
        t = asyncio.create_task(f.wait())
        await asyncio.sleep(0)
        assert len(f) == 1
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert len(f) == 0

    asyncio.run(main())


def test_wait_beyond_returns_at_once_when_there_is_more_or_it_closed() -> None:
    """Output beyond the offset, or a closed output: no wait; else a wait until either."""

    async def main() -> None:
        live = LiveOutput()
        live.size = 5
        await asyncio.wait_for(live.wait_beyond(4), 1)
        t = asyncio.create_task(live.wait_beyond(5))
        await asyncio.sleep(0)
        assert not t.done()
        live.followers.wake()  # a wake without new output: still waiting
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not t.done()
        live.closed = True
        live.followers.wake()
        await asyncio.wait_for(t, 1)
        await asyncio.wait_for(live.wait_beyond(100), 1)  # closed: never waits

    asyncio.run(main())


# ---------------------------------------------------------------- streaming


def test_a_stream_resumes_at_any_offset_with_the_same_bytes(tmp_path: Path) -> None:
    """Reading from every offset gives the file's tail there: a client that lost the
    connection at byte n asks again from n and misses and repeats nothing."""
    data = bytes(range(256)) * 3
    path = tmp_path / "j.out"
    path.write_bytes(data)
    for offset in (0, 1, 255, 767, 768, 1000):
        got = asyncio.run(
            _collect(stream_file(str(path), "j", offset, False, len(data), lambda: None))
        )
        assert b"".join(d for _, d in got) == data[offset:]
        assert all(o >= offset for o, _ in got)


def test_a_running_job_whose_file_went_is_a_refusal(tmp_path: Path) -> None:
    """The live job has written bytes but the file is gone: FAILED_PRECONDITION, once its
    output closed; a closed output with nothing written is an empty stream."""
    live = LiveOutput()
    live.size, live.closed = 3, True
    with pytest.raises(FailedPrecondition):
        asyncio.run(_collect(stream_file(str(tmp_path / "x"), "j", 0, True, 0, lambda: live)))
    empty = LiveOutput()
    empty.closed = True
    assert (
        asyncio.run(_collect(stream_file(str(tmp_path / "x"), "j", 0, True, 0, lambda: empty)))
        == []
    )


def test_a_follower_waits_for_the_file_to_appear(tmp_path: Path) -> None:
    """Following a job with no file yet: the stream waits, then reads the file once it is
    made, and ends when the output closes."""
    path = tmp_path / "j.out"
    live = LiveOutput()

    async def main() -> list[tuple[int, bytes]]:
        task = asyncio.create_task(_collect(stream_file(str(path), "j", 0, True, 0, lambda: live)))
        await asyncio.sleep(0.01)
        assert not task.done() and len(live.followers) == 1
        out = OutputFile(str(path), 0)
        out.write(b"first")
        out.close()
        live.size = 5
        live.closed = True
        live.followers.wake()
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(main()) == [(0, b"first")]
