"""Streaming a job's output file (agent.daemon.output), directly, with a stand-in writer.

The test writes the file the way the keeper records a job's pipe and moves the job's
LiveOutput along; the stream must deliver every byte once, in order, from any offset,
and end exactly when the output is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.daemon import output
from agent.daemon.output import LiveOutput, stream_file
from agent.keeper.errors import FailedPrecondition


async def _collect(it: AsyncIterator[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [chunk async for chunk in it]


def test_a_finished_job_streams_from_any_offset(tmp_path: Path) -> None:
    """Without a live job: the file from ``offset`` to its end, with each chunk's offset."""
    path = tmp_path / "j.out"
    path.write_bytes(b"0123456789")
    got = asyncio.run(_collect(stream_file(str(path), "j", 4, True, 10, lambda: None)))
    assert got == [(4, b"456789")]
    assert asyncio.run(_collect(stream_file(str(path), "j", 10, False, 10, lambda: None))) == []


def test_large_output_comes_in_bounded_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No chunk is larger than STREAM_CHUNK; together they are the whole file."""
    monkeypatch.setattr(output, "STREAM_CHUNK", 3)
    path = tmp_path / "j.out"
    path.write_bytes(b"abcdefgh")
    got = asyncio.run(_collect(stream_file(str(path), "j", 0, False, 8, lambda: None)))
    assert got == [(0, b"abc"), (3, b"def"), (6, b"gh")]


def test_following_a_running_job_until_its_output_closes(tmp_path: Path) -> None:
    """A follower waits for more (even for the file's first byte) and ends at the close."""
    path = tmp_path / "j.out"
    live = LiveOutput()

    async def writer() -> None:
        for piece in (b"one ", b"two ", b"three"):
            await asyncio.sleep(0.01)
            with path.open("ab") as f:
                f.write(piece)
            live.size += len(piece)
            live.followers.wake()
        await asyncio.sleep(0.01)
        live.closed = True
        live.followers.wake()

    async def main() -> list[tuple[int, bytes]]:
        task = asyncio.create_task(writer())
        got = await asyncio.wait_for(
            _collect(stream_file(str(path), "j", 0, True, 0, lambda: live)), 10
        )
        await task
        return got

    got = asyncio.run(main())
    assert b"".join(d for _, d in got) == b"one two three"
    offsets = [o for o, _ in got]
    assert offsets == [sum(len(d) for _, d in got[:i]) for i in range(len(got))]
    assert len(live.followers) == 0  # nobody left waiting


def test_without_follow_a_running_job_streams_what_exists(tmp_path: Path) -> None:
    """follow=False: what is in the file now, then the end; no file yet: nothing."""
    path = tmp_path / "j.out"
    live = LiveOutput()
    assert asyncio.run(_collect(stream_file(str(path), "j", 0, False, 0, lambda: live))) == []
    path.write_bytes(b"so far")
    live.size = 6
    got = asyncio.run(_collect(stream_file(str(path), "j", 0, False, 6, lambda: live)))
    assert got == [(0, b"so far")]


def test_output_that_was_recorded_but_is_gone_is_a_refusal(tmp_path: Path) -> None:
    """The history says bytes were recorded but the file is gone (retention):
    FAILED_PRECONDITION, not an empty stream that looks like a silent job."""
    with pytest.raises(FailedPrecondition) as e:
        asyncio.run(_collect(stream_file(str(tmp_path / "gone"), "j", 0, False, 5, lambda: None)))
    assert e.value.rule == "output-missing" and "job j" in e.value.message


def test_a_symlink_in_place_of_the_file_is_not_followed(tmp_path: Path) -> None:
    """The output file is opened with O_NOFOLLOW: a planted link is an error, not a read."""
    (tmp_path / "secret").write_bytes(b"key")
    (tmp_path / "j.out").symlink_to(tmp_path / "secret")
    with pytest.raises(OSError):
        asyncio.run(_collect(stream_file(str(tmp_path / "j.out"), "j", 0, False, 3, lambda: None)))
