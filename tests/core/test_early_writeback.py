"""Appending to a large staged file starts its disk writes before the close's fsync.

gstore.write.early_writeback asks the kernel (sync_file_range, in a worker thread)
to start writing each completed step of a file a program appends to. These check
when it asks (appends only, whole steps, never for rewrites in place), that it
opens the data file itself, and that nothing about the bytes changes: the file
reads back and uploads exactly as written.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from gstore.write import early_writeback
from gstore.write.early_writeback import EarlyWriteback, steps_completed

from .conftest import open_core
from .model import pattern

STEP = 64 * 1024  # small steps: the rules are the same, the test writes kilobytes


def test_only_an_append_that_crosses_a_step_boundary_completes_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(early_writeback, "STEP", STEP)
    assert steps_completed(0, 0, STEP - 1) is None
    assert steps_completed(STEP - 10, STEP - 10, STEP) == (0, STEP)
    assert steps_completed(STEP, STEP, STEP + 5) is None  # a new step begun, none completed
    assert steps_completed(10, 10, 3 * STEP + 1) == (0, 3 * STEP)
    assert steps_completed(2 * STEP + 3, 2 * STEP + 3, 4 * STEP) == (2 * STEP, 4 * STEP)
    # Not an append (a rewrite inside, or a write past the end leaving a hole): nothing.
    assert steps_completed(3 * STEP, 10, 2 * STEP) is None
    assert steps_completed(10, 20, 3 * STEP) is None


class Recorder:
    """Stands in for libc's sync_file_range: records (file name, start, length) and calls it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[tuple[str, int, int]] = []
        self.threads: set[str] = set()

    def __call__(self, fd: int, start: int, length: int, flags: int) -> int:
        self.calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), start, length))
        self.threads.add(threading.current_thread().name)
        return self.real(fd, start, length, flags) if self.real is not None else 0


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder(early_writeback._sync_file_range)
    monkeypatch.setattr(early_writeback, "_sync_file_range", rec)
    monkeypatch.setattr(early_writeback, "STEP", STEP)
    return rec


async def _settled(writeback: EarlyWriteback) -> None:
    with trio.fail_after(10):
        while writeback.busy():
            await trio.sleep(0.005)


async def test_appending_starts_writeback_of_each_completed_step_and_changes_no_byte(
        tmp_path: Path, recorder: Recorder) -> None:
    data = pattern("w", 3 * STEP + 1234)
    async with open_core(tmp_path, write_back_delay=60.0) as h:
        k = h.kernel
        fd = await k.open("big.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for offset in range(0, len(data), 10_000):
            await k.pwrite(fd, data[offset:offset + 10_000], offset)
        writeback = h.core.writeback.staging.early_writeback
        await _settled(writeback)
        assert [(start, length) for _, start, length in recorder.calls] == [(0, STEP), (STEP, STEP), (2 * STEP, STEP)]
        assert {name for name, _, _ in recorder.calls} == {h.core.writeback.get("big.bin").data_path.name}
        assert recorder.threads == {"gstore early writeback"}  # never the trio thread
        # Rewrites in place and writes into the last step ask for nothing more.
        await k.pwrite(fd, b"X" * 100, 5)
        data = data[:5] + b"X" * 100 + data[105:]
        await _settled(writeback)
        assert len(recorder.calls) == 3
        await k.close(fd)
        assert await k.read_file("big.bin") == data
        assert await h.drain() == []
        assert h.backend_files()["big.bin"] == data


async def test_a_file_removed_before_its_writeback_starts_is_skipped(tmp_path: Path, recorder: Recorder) -> None:
    writeback = EarlyWriteback()
    gone = tmp_path / "gone.data"
    kept = tmp_path / "kept.data"
    kept.write_bytes(pattern("k", 2 * STEP))
    writeback.appended(gone, 0, 0, STEP)
    writeback.appended(kept, STEP, STEP, 2 * STEP)
    await _settled(writeback)
    assert recorder.calls == [("kept.data", STEP, STEP)]
    assert writeback.started == 1


async def test_after_close_nothing_is_started(tmp_path: Path, recorder: Recorder) -> None:
    writeback = EarlyWriteback()
    target = tmp_path / "f.data"
    target.write_bytes(pattern("f", STEP))
    writeback.close()
    writeback.appended(target, 0, 0, STEP)
    assert not writeback.busy()
    await trio.sleep(0.05)
    assert recorder.calls == []
