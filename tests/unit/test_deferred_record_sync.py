"""A close of a small file waits for its journal record to be written, not for its fsync.

What the close promises (gstore.write.staging): the record carrying the file's
bytes is in place before the close returns, so a crash of the daemon loses
nothing; the record sync thread fsyncs it and the directory soon after; an
fsync(2) still returns only once the record is on disk; a file too large to
carry its bytes still fsyncs data and record before its close returns.

The record sync thread is held back here by a gate on ``os.fsync`` of final
record names, so "returned before the fsync" is observed, not timed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gstore.write import staging as staging_module
from gstore.write.staging import EXPECT_ABSENT, INLINE_LIMIT, StagedFile, StagingArea


class FsyncGate:
    """Wraps ``os.fsync`` for the staging module: records which files were fsynced, and holds
    fsyncs of final record files (``<id>.json``, only the record sync thread fsyncs those)
    until opened."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.held = threading.Event()  # the record sync thread is waiting at the gate
        self.synced: list[str] = []
        self._lock = threading.Lock()
        self._real = os.fsync

    def fsync(self, fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.endswith(".json") and not name.startswith("."):
            self.held.set()
            assert self.open.wait(30), "gate never opened"
        self._real(fd)
        with self._lock:
            self.synced.append(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.synced)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[FsyncGate]:
    g = FsyncGate()
    monkeypatch.setattr(staging_module.os, "fsync", g.fsync)
    try:
        yield g
    finally:
        g.open.set()  # never leave the thread stuck


def new_file(staging: StagingArea, path: str, data: bytes) -> StagedFile:
    staged = staging.create(path, base=None, expect=EXPECT_ABSENT, size=0, keep_open=True)
    StagingArea.write(staged, 0, data)
    return staged


def close_commit(staging: StagingArea, staged: StagedFile, *, durable: bool) -> bool:
    """``staging.commit`` under trio, failing (not hanging) if it waits for the gate."""
    async def main() -> bool:
        with trio.fail_after(10):
            return await staging.commit(staged, durable=durable)

    return trio.run(main)


def test_a_close_returns_once_the_record_is_written_and_a_restart_finds_it(
        tmp_path: Path, gate: FsyncGate) -> None:
    staging = StagingArea(tmp_path / "staging")
    data = os.urandom(4096)
    staged = new_file(staging, "small.bin", data)
    assert close_commit(staging, staged, durable=False) is False, "the record's fsync is still pending"
    assert gate.held.wait(10), "the record sync thread took the record"
    assert f"{staged.id}.json" not in gate.names()
    # A crash of the daemon now: the page cache has the record, which a new start reads.
    StagingArea.close_fd(staged)
    [found] = StagingArea(tmp_path / "staging").load()
    assert (found.path, found.size) == ("small.bin", len(data))
    assert StagingArea.read_local(found, 0, found.size) == data
    gate.open.set()
    assert staging.wait_records_synced(10)
    names = gate.names()
    assert f"{staged.id}.json" in names and "staging" in names, "record, then the directory, fsynced"
    assert names.index(f"{staged.id}.json") < len(names) - 1 - names[::-1].index("staging")


def test_an_fsync_waits_for_its_record_even_while_the_sync_thread_is_held(
        tmp_path: Path, gate: FsyncGate) -> None:
    staging = StagingArea(tmp_path / "staging")
    staged = new_file(staging, "f.txt", b"hello")
    assert close_commit(staging, staged, durable=False) is False
    assert gate.held.wait(10)
    before = len(gate.names())
    assert close_commit(staging, staged, durable=True) is True
    after = gate.names()[before:]
    assert any(n.startswith(f".{staged.id}.") and n.endswith(".json.tmp") for n in after), after
    assert "staging" in after, "the directory fsynced for the durable record"
    StagingArea.close_fd(staged)


def test_a_file_too_large_to_carry_its_bytes_is_durable_when_its_close_returns(
        tmp_path: Path, gate: FsyncGate) -> None:
    staging = StagingArea(tmp_path / "staging")
    staged = new_file(staging, "large.bin", os.urandom(INLINE_LIMIT + 1))
    assert close_commit(staging, staged, durable=False) is True
    names = gate.names()
    assert f"{staged.id}.data" in names, "its data file fsynced"
    assert any(n.startswith(f".{staged.id}.") for n in names) and "staging" in names
    assert not gate.held.is_set(), "nothing left for the record sync thread"
    StagingArea.close_fd(staged)


def test_a_record_written_again_during_a_sync_pass_stays_queued_until_synced_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass took the queue, then the record was replaced by a newer close before the
    pass finished: that newer record may have missed the fsync, so it stays queued."""
    staging = StagingArea(tmp_path / "staging")
    staged = new_file(staging, "f.txt", b"one")
    real = os.fsync
    rewritten = threading.Event()
    passes: list[int] = []

    def fsync(fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name == f"{staged.id}.json":
            passes.append(1)
            if not rewritten.is_set():
                rewritten.set()
                staging._sync_records_soon([staged.id])  # noqa: SLF001 - a newer close's queueing
        real(fd)

    monkeypatch.setattr(staging_module.os, "fsync", fsync)
    assert close_commit(staging, staged, durable=False) is False
    assert staging.wait_records_synced(10)
    assert len(passes) == 2, "a second pass fsynced the record written again during the first"
    StagingArea.close_fd(staged)


def closed_small_file_record(tmp_path: Path) -> Path:
    """The synced record of a small file closed in a new staging area."""
    staging = StagingArea(tmp_path / "staging")
    staged = new_file(staging, "f.txt", b"x" * 3000)
    close_commit(staging, staged, durable=False)
    assert staging.wait_records_synced(10)
    StagingArea.close_fd(staged)
    return staging.root / f"{staged.id}.json"


def test_a_record_torn_by_a_power_loss_is_left_alone_not_loaded(tmp_path: Path) -> None:
    """What a power loss can leave of a record whose fsync was pending: nothing is made of it."""
    record = closed_small_file_record(tmp_path)
    whole = record.read_bytes()
    for torn in (whole[:len(whole) // 2], b"\0" * len(whole)):
        record.write_bytes(torn)
        assert StagingArea(tmp_path / "staging").load() == []
        assert record.exists(), "left in place for inspection"


def test_an_empty_record_is_removed_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A record renamed in place whose bytes never reached the disk (a power loss before its
    fsync) is empty: nothing to restore or inspect, so it is not reported at every start."""
    record = closed_small_file_record(tmp_path)
    record.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="gstore.write.staging"):
        assert StagingArea(tmp_path / "staging").load() == []
    assert not record.exists()
    assert any("is empty" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_close_lets_the_background_threads_finish_and_leaves_the_folder_still(tmp_path: Path) -> None:
    """A stop must not leave threads unlinking or creating staging files: the next core over
    the same folder (or removing it) would race with them (found as a FileNotFoundError in
    rmtree of a stopped core's state)."""
    staging = StagingArea(tmp_path / "staging")
    files = [new_file(staging, f"f{i}.bin", b"x" * (i + 1)) for i in range(3)]
    for staged in files:
        close_commit(staging, staged, durable=False)
    staging.remove(files[0])
    assert wait_for(lambda: not files[0].data_path.exists())
    staging.remove(files[1])  # the removal thread now pauses before its directory fsync
    assert staging.close(timeout=10)
    with staging._removals_lock, staging._record_sync_lock, staging._spares_lock:  # noqa: SLF001
        assert not (staging._removals_syncing or staging._records_syncing or staging._filling)  # noqa: SLF001
    assert not files[1].data_path.exists(), "the removal was carried out before close returned"
    assert staging.wait_records_synced(0), "records fsynced before close returned"
    StagingArea.close_fd(files[2])


def wait_for(condition) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``condition`` (a hang guard, not a timing assertion)."""
    import time

    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return bool(condition())


# -- the close of a small file on the trio thread (StagingArea._commit_here) -----------------


def test_a_small_close_is_recorded_on_the_trio_thread_from_a_spare_with_no_worker_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No trip to a worker thread, and no open(O_CREAT) on the trio thread: the temporary
    record is a spare data file renamed."""
    staging = StagingArea(tmp_path / "staging")
    staged = new_file(staging, "small.bin", b"first")  # starts the spare thread
    assert wait_for(lambda: len(staging._spares) >= staging_module.SPARE_LOW)  # noqa: SLF001
    StagingArea.write(staged, 0, b"second")
    trio_thread = threading.get_ident()
    creates: list[str] = []
    real_open = os.open

    def spying_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_CREAT and threading.get_ident() == trio_thread:
            creates.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(staging_module.os, "open", spying_open)
    spares = len(staging._spares)  # noqa: SLF001
    batches = staging.commits.batches
    assert close_commit(staging, staged, durable=False) is False
    assert staging.commits.batches == batches, "no group commit, so no worker thread"
    assert creates == [], "no inode created on the trio thread"
    assert len(staging._spares) == spares - 1, "the temporary record was a spare"  # noqa: SLF001
    assert not list(staging.root.glob(".*.tmp")), "renamed in place"
    StagingArea.close_fd(staged)
    [found] = StagingArea(tmp_path / "staging").load()
    assert StagingArea.read_local(found, 0, found.size) == b"second"
    assert staging.wait_records_synced(10), "and queued for the record sync thread"


def test_a_small_close_waits_in_the_group_commit_while_a_worker_holds_the_records_lock(
        tmp_path: Path) -> None:
    """A worker holds ``_records_lock`` through a record's fsync: the trio thread never waits
    for it; the close goes to a worker thread, which does."""
    staging = StagingArea(tmp_path / "staging")
    staged = new_file(staging, "small.bin", b"data")
    batches = staging.commits.batches
    taken, release = threading.Event(), threading.Event()

    def worker_holding_the_lock() -> None:
        with staging._records_lock:  # noqa: SLF001
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=worker_holding_the_lock)
    holder.start()
    try:
        assert taken.wait(10)

        async def main() -> bool:
            async with trio.open_nursery() as nursery:
                async def close() -> None:
                    nursery.result = await staging.commit(staged, durable=False)  # type: ignore[attr-defined]

                nursery.start_soon(close)
                await trio.sleep(0.05)
                assert staging.commits.busy, "the close waits in a worker thread, not on the trio thread"
                release.set()
            return True

        trio.run(main)
    finally:
        release.set()
        holder.join(10)
    assert staging.commits.batches == batches + 1
    StagingArea.close_fd(staged)
    [found] = StagingArea(tmp_path / "staging").load()
    assert StagingArea.read_local(found, 0, found.size) == b"data"


def test_a_record_of_an_older_generation_never_replaces_a_newer_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker (a chmod's persist) read the file; meanwhile a write and its close recorded a
    newer generation on the trio thread. Renamed last, the worker's record would take the
    write back after a crash: it is not written, and the newer record is fsynced for it."""
    staging = StagingArea(tmp_path / "staging")
    staged = new_file(staging, "f.txt", b"old bytes")
    real_read = StagingArea.read_local
    interleaved: list[int] = []

    def read_then_a_newer_close(target: StagedFile, offset: int, length: int) -> bytes:
        data = real_read(target, offset, length)
        if not interleaved:  # the worker has read; now the trio thread writes and closes
            interleaved.append(target.generation)
            StagingArea.write(target, 0, b"new bytes!")
            outcome = staging._persist_one(target, True, defer_sync=True, on_trio_thread=True)  # noqa: SLF001
            assert outcome == "deferred"
        return data

    monkeypatch.setattr(StagingArea, "read_local", staticmethod(read_then_a_newer_close))
    staging.persist(staged)  # the worker's (durable) persist of the older generation
    assert interleaved, "the interleaving happened"
    StagingArea.close_fd(staged)
    [found] = StagingArea(tmp_path / "staging").load()
    assert found.size == len(b"new bytes!")
    assert real_read(found, 0, found.size) == b"new bytes!"
    assert staging.wait_records_synced(10)
