"""The staging journal's cheaper paths keep its promises.

* A small file's record carries its bytes: a close fsyncs no data file, and a
  start restores the bytes whatever a power loss left in the data file.
* An uploaded generation's record is removed only while it is still that
  generation's (a newer one keeps it); a removal unlinks a record left at once
  and the data file soon after, in the removal thread.
* The commit that reads a small body for the record keeps it for the upload, for
  that generation only, within a byte budget.
* Data files come from spares made by a worker thread: each is new, empty,
  mode 0600, held open by nobody, and spares left at a stop are orphans.
* The If-None-Match probe never leaves its scratch object behind, even when the
  upload probing is cancelled during its first PUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from gstore.backends.base import Capabilities
from gstore.write import staging as staging_module
from gstore.write.conditional import PROBE_DIR, CreateCheck
from gstore.write.staging import EXPECT_ABSENT, INLINE_LIMIT, StagedFile, StagingArea


def new_file(staging: StagingArea, path: str, data: bytes) -> StagedFile:
    staged = staging.create(path, base=None, expect=EXPECT_ABSENT, size=0, keep_open=True)
    StagingArea.write(staged, 0, data)
    return staged


def record_of(staging: StagingArea, staged: StagedFile) -> dict[str, Any] | None:
    path = staging.root / f"{staged.id}.json"
    return json.loads(path.read_text()) if path.exists() else None


def commit(staging: StagingArea, *files: StagedFile) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for staged in files:
                nursery.start_soon(staging.commit, staged)

    trio.run(main)


def wait_until(condition: Any) -> bool:
    """Poll ``condition`` (a hang guard, not a timing assertion)."""
    async def main() -> bool:
        with trio.move_on_after(10):
            while not condition():
                await trio.sleep(0.01)
        return bool(condition())

    return trio.run(main)


def test_a_small_file_record_carries_its_bytes_and_its_close_fsyncs_no_data_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = StagingArea(tmp_path / "staging")
    synced: list[str] = []
    real_sync = StagingArea._sync_data  # noqa: SLF001 - counting data fsyncs
    monkeypatch.setattr(StagingArea, "_sync_data", staticmethod(lambda s: (synced.append(s.path), real_sync(s))))
    small = new_file(staging, "small.bin", os.urandom(4096))
    large = new_file(staging, "large.bin", os.urandom(INLINE_LIMIT + 1))
    commit(staging, small, large)
    assert synced == ["large.bin"], "only the file too large to carry its bytes fsyncs its data file"
    small_record, large_record = record_of(staging, small), record_of(staging, large)
    assert small_record is not None and "inline" in small_record
    assert large_record is not None and "inline" not in large_record
    for staged in (small, large):
        StagingArea.close_fd(staged)


@pytest.mark.parametrize("loss", ["emptied", "garbled", "gone"])
def test_a_start_restores_the_bytes_a_record_carries(tmp_path: Path, loss: str) -> None:
    """A power loss may leave the data file of a closed small file empty, garbled or missing
    (its bytes were never fsynced): the record's copy is what the next start sees."""
    staging = StagingArea(tmp_path / "staging")
    data = os.urandom(3000)
    staged = new_file(staging, "f.txt", data)
    commit(staging, staged)
    StagingArea.close_fd(staged)
    if loss == "emptied":
        os.truncate(staged.data_path, 0)
    elif loss == "garbled":
        staged.data_path.write_bytes(b"\0" * 5000)
    else:
        staged.data_path.unlink()
    [found] = StagingArea(tmp_path / "staging").load()
    assert found.path == "f.txt" and found.size == len(data)
    assert StagingArea.read_local(found, 0, found.size) == data
    assert found.data_path.stat().st_size == len(data)


def test_an_attribute_change_record_also_carries_the_bytes(tmp_path: Path) -> None:
    """A record written without a data fsync (chmod, rename) must still never point at bytes
    that are not durable: a small file's carries them."""
    staging = StagingArea(tmp_path / "staging")
    staged = new_file(staging, "f.txt", b"hello")
    staging.persist(staged, sync_data=False)
    StagingArea.close_fd(staged)
    staged.data_path.write_bytes(b"")
    [found] = StagingArea(tmp_path / "staging").load()
    assert StagingArea.read_local(found, 0, found.size) == b"hello"


def test_forget_removes_only_the_record_of_the_confirmed_generation(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "staging")
    done, changed = new_file(staging, "done.txt", b"a"), new_file(staging, "changed.txt", b"b")
    commit(staging, done, changed)
    confirmed = {s.id: s.generation for s in (done, changed)}
    StagingArea.write(changed, 1, b"more")  # written again after the upload was sent

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for staged in (done, changed):
                nursery.start_soon(staging.forget, staged, confirmed[staged.id])

    trio.run(main)
    assert record_of(staging, done) is None and not done.recorded
    assert record_of(staging, changed) is not None and changed.recorded, "a newer generation keeps its record"
    assert staging.forgets.batches >= 1 and staging.forgets.items == 2
    for staged in (done, changed):
        StagingArea.close_fd(staged)


def test_remove_unlinks_a_record_at_once_and_the_data_file_in_the_removal_thread(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "staging")
    staged = new_file(staging, "gone.txt", b"bytes")
    commit(staging, staged)
    staging.remove(staged)
    assert record_of(staging, staged) is None, "a removed file's record must never outlive the call"
    assert staged.fd is None and staged.removed
    assert wait_until(lambda: not staged.data_path.exists())
    staging.persist(staged)  # a late persist of a removed file writes nothing
    assert record_of(staging, staged) is None


def test_data_files_come_from_spares_new_empty_private_and_not_held_open(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "staging")
    first = staging.create("first", base=None, expect=EXPECT_ABSENT, size=0)  # starts the spare thread
    # The first batch, whole (no second one starts while more than SPARE_LOW are left).
    assert wait_until(lambda: len(list(staging.root.glob("*.data"))) == 1 + staging_module.SPARE_BATCH)
    files = [staging.create(f"f{i}", base=None, expect=EXPECT_ABSENT, size=0) for i in range(10)]
    ids = {s.id for s in files} | {first.id}
    assert len(ids) == 11
    for staged in files:
        info = staged.data_path.stat()
        assert info.st_size == 0 and stat.S_IMODE(info.st_mode) == 0o600
        assert staged.fd is None
    opened = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
              if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in opened if p.startswith(str(staging.root))], "spares hold no descriptor"
    spares = {p.stem for p in staging.root.glob("*.data")} - ids
    assert spares, "spares are waiting"
    assert {p.stem for p in StagingArea(staging.root).orphans(ids)} == spares, "left spares are orphans at a start"


def test_a_close_record_written_through_a_spare_is_whole_even_if_the_spare_was_not_empty(
        tmp_path: Path) -> None:
    """A close's record goes into a spare opened without O_TRUNC (a spare is empty: on ext4
    the truncation would make the close write the record's blocks at once); should a spare
    ever hold bytes, the record written there still ends where it ends."""
    staging = StagingArea(tmp_path / "staging")
    first = staging.create("first", base=None, expect=EXPECT_ABSENT, size=0)  # starts the spare thread
    assert wait_until(lambda: len(list(staging.root.glob("*.data"))) == 1 + staging_module.SPARE_BATCH)
    for spare in set(staging.root.glob("*.data")) - {first.data_path}:
        spare.write_bytes(b"}garbage" * 4096)
    data = os.urandom(3000)
    staged = new_file(staging, "f.txt", data)

    async def close() -> bool:
        return await staging.commit(staged, durable=False)

    trio.run(close)
    record = record_of(staging, staged)  # parses: no tail left behind
    assert record is not None and record["path"] == "f.txt"
    StagingArea.close_fd(staged)
    staged.data_path.write_bytes(b"")
    found = [s for s in StagingArea(tmp_path / "staging").load() if s.path == "f.txt"]
    assert [StagingArea.read_local(s, 0, s.size) for s in found] == [data]
    assert staging.wait_records_synced()


@pytest.mark.parametrize("umask", [0, 0o022, 0o077, 0o277, 0o777])
def test_spares_and_data_files_are_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """The chmod after each create is skipped where the umask cannot take owner bits away:
    the files are 0600 either way (a spare, and one made on the trio thread when none is left)."""
    old = os.umask(umask)
    try:
        staging = StagingArea(tmp_path / "staging")
        first = staging.create("first", base=None, expect=EXPECT_ABSENT, size=0)  # no spare yet: made here
        assert wait_until(lambda: len(list(staging.root.glob("*.data"))) == 1 + staging_module.SPARE_BATCH)
        second = staging.create("second", base=None, expect=EXPECT_ABSENT, size=0)  # a spare
    finally:
        os.umask(old)
    for path in [first.data_path, second.data_path, *staging.root.glob("*.data")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (oct(umask), path.name)


class _ProbeBackend:
    """Just what CreateCheck uses; the probe's first PUT hangs until cancelled."""

    display = "probe-test"
    capabilities = Capabilities(conditional_writes=True)

    def __init__(self) -> None:
        self.objects: set[str] = set()
        self.put_started = trio.Event()

    async def list_dir(self, path: str) -> None:
        return None

    async def put_bytes(self, path: str, data: bytes, **kwargs: Any) -> None:
        self.objects.add(path)  # it lands at once; the answer never comes
        self.put_started.set()
        await trio.sleep_forever()

    async def delete(self, path: str) -> None:
        self.objects.discard(path)


def test_a_probe_cancelled_during_its_first_put_deletes_its_scratch_object() -> None:
    backend = _ProbeBackend()
    check = CreateCheck(backend)  # type: ignore[arg-type]

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(check.atomic)
                await backend.put_started.wait()
                scope.cancel()

    trio.run(main)
    assert check.probes == 1 and check.known is None
    assert not [p for p in backend.objects if p.startswith(PROBE_DIR)], backend.objects


def test_a_record_that_stops_carrying_the_bytes_fsyncs_the_data_file_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed small (its bytes only in the record), then grown past the limit without a close
    and chmod-ed (a record written with no data fsync): the data file is fsynced then, or
    the bytes promised at the close would hang on a data file never synced."""
    staging = StagingArea(tmp_path / "staging")
    synced: list[str] = []
    real_sync = StagingArea._sync_data  # noqa: SLF001 - counting data fsyncs
    monkeypatch.setattr(StagingArea, "_sync_data", staticmethod(lambda s: (synced.append(s.path), real_sync(s))))
    staged = new_file(staging, "grows.bin", b"small")
    commit(staging, staged)
    assert synced == [] and staged.recorded_inline
    StagingArea.write(staged, 5, os.urandom(INLINE_LIMIT))
    staging.persist(staged, sync_data=False)
    assert synced == ["grows.bin"] and not staged.recorded_inline
    record = record_of(staging, staged)
    assert record is not None and "inline" not in record
    staging.persist(staged, sync_data=False)
    assert synced == ["grows.bin"], "once synced, an attribute change needs no data fsync (as before)"
    StagingArea.close_fd(staged)


def test_a_commit_keeps_a_small_body_for_its_upload_and_only_for_its_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = StagingArea(tmp_path / "staging")
    kept = new_file(staging, "kept.txt", b"body of kept")
    changed = new_file(staging, "changed.txt", b"first")
    removed = new_file(staging, "removed.txt", b"gone soon")
    large = new_file(staging, "large.bin", os.urandom(INLINE_LIMIT + 1))
    commit(staging, kept, changed, removed, large)
    StagingArea.write(changed, 0, b"FIRST")  # after the commit: its kept body is stale
    staging.remove(removed)
    body = staging.take_body(kept, kept.generation)
    assert body is not None and body[0] == b"body of kept"
    assert body[1] == hashlib.md5(b"body of kept").hexdigest()
    assert staging.take_body(kept, kept.generation) is None, "taken once"
    assert staging.take_body(changed, changed.generation) is None, "the bytes of another generation"
    assert staging.take_body(removed, removed.generation) is None
    assert staging.take_body(large, large.generation) is None, "only files whose record carries them"
    # At most BODY_CACHE_LIMIT bytes are kept in all.
    monkeypatch.setattr(staging_module, "BODY_CACHE_LIMIT", 10)
    small = new_file(staging, "small.txt", b"12345678")
    over = new_file(staging, "over.txt", b"abcdefgh")
    commit(staging, small)
    commit(staging, over)
    assert staging.take_body(small, small.generation) is not None
    assert staging.take_body(over, over.generation) is None
    for staged in (kept, changed, large, small, over):
        StagingArea.close_fd(staged)
