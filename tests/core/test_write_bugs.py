"""Targeted write-path tests: each one states a piece of POSIX (or documented gstore) behaviour.

Every test drives the core like the kernel would (see kernel.py) and checks
three views where they apply: the live view (what programs on this host see
right away), the backend after a drain (what other hosts see), and the view
after a restart (a clean one, or a kill -9 and journal recovery).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
import time
import traceback
from pathlib import Path

import pytest
import trio

from gstore.vfs.inodes import ROOT_INODE
from gstore.write.staging import StagingArea

from .conftest import SlowMetadataBackend, open_core
from .model import pattern

RDWR, RDONLY = os.O_RDWR, os.O_RDONLY


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each test runs on a local-directory backend and on S3 (moto on 127.0.0.1: ETags,
    conditional writes, server-side copies)."""
    return request.param
CREAT_TRUNC = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def raised_at(exc: BaseException) -> str:
    """Where in gstore an error came from (the innermost frame under src/gstore)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/gstore/" in f.filename]
    return " < ".join(f"{f.filename.rsplit('/gstore/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames)) or "?"


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


async def assert_no_drain_failures(h) -> None:
    failures = await h.drain()
    assert failures == [], f"the drain could not upload everything: {failures}"


# --------------------------------------------------------------------------- concurrent opens, slow HEAD


async def test_concurrent_opens_for_write_with_slow_head_keep_both_regions(tmp_path: Path, backend: str) -> None:
    """Two programs open the same existing file for writing while the backend is slow to answer
    HEAD/stat; each writes its own region and closes: both regions are in the file (POSIX: one
    file, two writers of disjoint ranges), live, in the backend and after a restart."""
    base = pattern("base", 8000)
    wrappers: list[SlowMetadataBackend] = []

    def slow(backend):
        wrappers.append(SlowMetadataBackend(backend, delay=0.2))
        return wrappers[-1]

    async with open_core(tmp_path, backend=backend, wrap_backend=slow, seed_files={"shared.bin": base}) as h:
        k = h.kernel
        regions = {"first": (100, b"A" * 300), "second": (6000, b"B" * 500)}

        both_open = trio.Event()
        opened: list[int] = []

        async def writer(offset: int, data: bytes) -> None:
            fd = await k.open("shared.bin", RDWR)
            opened.append(fd)
            if len(opened) == len(regions):
                both_open.set()
            await both_open.wait()  # two handles open at once, then each writes its region
            assert await k.pwrite(fd, data, offset) == len(data)
            await k.close(fd)

        async with trio.open_nursery() as nursery:
            for offset, data in regions.values():
                nursery.start_soon(writer, offset, data)
        assert sum(wrappers[0].calls.values()) > 0, "the slow HEAD/stat was never in the way"
        wrappers[0].delay = 0.0  # the race is over: the checks below need no slow backend

        expected = bytearray(base)
        for offset, data in regions.values():
            expected[offset:offset + len(data)] = data
        expected = bytes(expected)

        live = await k.read_file("shared.bin")
        assert live == expected, "live view lost a region: " + _regions_report(live, regions, base)
        await assert_no_drain_failures(h)
        stored = h.backend_files().get("shared.bin", b"")
        assert stored == expected, "backend lost a region: " + _regions_report(stored, regions, base)
        assert sorted(h.backend_files()) == ["shared.bin"], "no conflict copies: both writers are this mount"
        await h.restart()
        assert await h.kernel.read_file("shared.bin") == expected


def _regions_report(data: bytes, regions: dict[str, tuple[int, bytes]], base: bytes) -> str:
    out = []
    for name, (offset, region) in regions.items():
        got = data[offset:offset + len(region)]
        state = "present" if got == region else ("base bytes" if got == base[offset:offset + len(region)] else "other")
        out.append(f"{name} region [{offset}, {offset + len(region)}): {state}")
    return f"{len(data)} bytes; " + "; ".join(out)


# --------------------------------------------------------------------------- atomic save


@pytest.mark.parametrize("stop", ["drain-and-restart", "crash"])
@pytest.mark.parametrize("target", ["uploaded", "pending"])
async def test_atomic_save_by_rename_over_the_target(tmp_path: Path, backend: str, target: str, stop: str) -> None:
    """The editor's save: write a temp file, fsync, close, rename it over the target. The target
    has the new content at once, in the backend after a drain, and after a restart or a crash.
    The target is either an uploaded object or a file this mount saved a moment ago (closed, its
    upload still to come)."""
    old, new = pattern("old", 3000), pattern("new", 4500)
    seeds = {"doc.txt": old} if target == "uploaded" else {}
    async with open_core(tmp_path, backend=backend, seed_files=seeds,
                         write_back_delay=0.05 if target == "uploaded" else 3600.0) as h:
        k = h.kernel
        if target == "pending":
            await k.write_file("doc.txt", old)
        assert await k.read_file("doc.txt") == old  # the old version was read (and cached) first
        fd = await k.open("doc.txt.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        await k.pwrite(fd, new, 0)
        await k.fsync(fd)
        await k.close(fd)
        await k.rename("doc.txt.tmp", "doc.txt")

        assert await k.read_file("doc.txt") == new
        assert (await k.stat("doc.txt")).size == len(new)
        assert await k.listdir() == ["doc.txt"]
        with pytest.raises(FileNotFoundError):
            await k.stat("doc.txt.tmp")

        if stop == "crash":
            await h.crash()
            assert await h.kernel.read_file("doc.txt") == new, "after the crash and recovery"
            assert await h.kernel.listdir() == ["doc.txt"]
            await assert_no_drain_failures(h)
            assert h.backend_files() == {"doc.txt": new}
        else:
            await assert_no_drain_failures(h)
            assert h.backend_files() == {"doc.txt": new}
            failures = await h.restart()
            assert failures == []
            assert await h.kernel.read_file("doc.txt") == new, "after the restart"
            assert await h.kernel.listdir() == ["doc.txt"]
        assert h.backend_files() == {"doc.txt": new}


# --------------------------------------------------------------------------- size right after an overwrite


async def test_overwrite_of_uploaded_file_shows_new_size_at_once_and_append_goes_after_it(tmp_path: Path, backend: str) -> None:
    """5,000 bytes written over an uploaded 1,000-byte file, fsync, release: getattr says 5,000
    at once, and an O_APPEND write lands at offset 5,000."""
    async with open_core(tmp_path, backend=backend, seed_files={"grow.bin": pattern("v1", 1000)}) as h:
        k, fs = h.kernel, h.fs
        # The kernel keeps the inode it looked up (its dentry cache) across the open and close.
        ino = (await fs.lookup(ROOT_INODE, "grow.bin")).ino
        assert (await fs.getattr(ino)).info.size == 1000

        data = pattern("v2", 5000)
        fd = await k.open("grow.bin", RDWR)
        await k.pwrite(fd, data, 0)
        await k.fsync(fd)
        await k.close(fd)
        await k.released()  # the release has been answered

        assert (await fs.getattr(ino)).info.size == 5000, "getattr on the inode the kernel holds"
        assert (await k.stat("grow.bin")).size == 5000, "lookup + getattr"
        assert h.backend_files()["grow.bin"] == data, "fsync returned: the backend has the file"

        fd = await k.open("grow.bin", os.O_WRONLY | os.O_APPEND)
        assert (await k.fstat(fd)).size == 5000
        await k.append(fd, b"tail!")
        await k.close(fd)
        assert await k.read_file("grow.bin") == data + b"tail!"
        fs.forget(ino, 1)
        await assert_no_drain_failures(h)
        assert h.backend_files()["grow.bin"] == data + b"tail!"


# --------------------------------------------------------------------------- a new file, at once


async def test_new_file_after_fsync_and_release_is_there_immediately(tmp_path: Path, backend: str) -> None:
    """create, write, fsync, close, then open it again right away (many times over, so an upload
    finishing in between is covered): it exists and has the bytes."""
    async with open_core(tmp_path, backend=backend) as h:
        k = h.kernel
        for i in range(12):
            name, data = f"new-{i}.dat", pattern(f"n{i}", 100 + 137 * i)
            fd = await k.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            await k.pwrite(fd, data, 0)
            await k.fsync(fd)
            await k.close(fd)
            if i % 2:
                await k.released()  # half the time the release is answered first, half the time not
            st = await k.stat(name)
            assert (st.is_dir, st.size) == (False, len(data)), f"{name} right after close"
            assert await k.read_file(name) == data, f"{name} right after close"
            if i % 4 == 3:
                await trio.sleep(0.1)  # let uploads of earlier files finish meanwhile
        expected = {f"new-{i}.dat": pattern(f"n{i}", 100 + 137 * i) for i in range(12)}
        assert sorted(await k.listdir()) == sorted(expected)
        await assert_no_drain_failures(h)
        assert h.backend_files() == expected


# --------------------------------------------------------------------------- unlink while open


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "uploaded-file"])
async def test_unlink_while_open_keeps_the_handle_working_and_nothing_reaches_the_backend(
        tmp_path: Path, backend: str, existing: bool) -> None:
    """POSIX: an unlinked file lives on for its open descriptors (reads and writes work) and is
    gone by name at once; nothing of it is uploaded, before or after the last close."""
    seeds = {"scratch.tmp": pattern("remote", 2000)} if existing else {}
    async with open_core(tmp_path, backend=backend, seed_files=seeds) as h:
        k = h.kernel
        fd = await k.open("scratch.tmp", os.O_RDWR | os.O_CREAT)
        await k.pwrite(fd, b"first part|", 0)
        await k.fsync(fd)  # it was in the backend at this point (that is allowed)
        await k.unlink("scratch.tmp")

        with pytest.raises(FileNotFoundError):
            await k.stat("scratch.tmp")
        assert await k.listdir() == []

        await k.pwrite(fd, b"second part", 11)
        expected = b"first part|second part" + (pattern("remote", 2000)[22:] if existing else b"")
        assert await k.pread(fd, 100_000, 0) == expected
        assert (await k.fstat(fd)).size == len(expected)
        await k.append(fd, b"<end>")
        assert await k.pread(fd, 100_000, 0) == expected + b"<end>"
        await k.ftruncate(fd, 5)
        assert await k.pread(fd, 100, 0) == b"first"
        await k.fsync(fd)  # fsync of an unlinked file: succeeds, and must not bring it back
        await trio.sleep(3 * h.options.write_back_delay + 0.1)
        assert "scratch.tmp" not in h.backend_files(), "an unlinked file reached the backend while open"
        await k.close(fd)

        with pytest.raises(FileNotFoundError):
            await k.stat("scratch.tmp")
        await trio.sleep(3 * h.options.write_back_delay + 0.1)
        await assert_no_drain_failures(h)
        assert h.backend_files() == {}, "an unlinked file reached the backend"
        await h.crash()
        assert await h.kernel.listdir() == []
        await assert_no_drain_failures(h)
        assert h.backend_files() == {}, "an unlinked file came back after a restart"


# --------------------------------------------------------------------------- rm and create racing


async def test_rm_and_create_of_one_name_interleaved(tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """One task keeps creating a file, another keeps deleting it (uploads running in between):
    no unexpected error; afterwards the journal has no record without its data, nothing was
    logged as an error, and the backend, the live view and a restarted core agree."""
    caplog.set_level(logging.WARNING)
    rng = random.Random(7)
    unexpected: list[str] = []
    rounds = 25
    async with open_core(tmp_path, backend=backend) as h:
        k = h.kernel

        async def pause() -> None:
            await trio.sleep(rng.choice([0, 0, 0, 0.01, 0.03, 0.07]))

        async def creator() -> None:
            for i in range(rounds):
                try:
                    fd = await k.open("busy.txt", CREAT_TRUNC)
                    await k.pwrite(fd, pattern(f"round{i}", 50 + i), 0)
                    if i % 3 == 0:
                        await k.fsync(fd)
                    await k.close(fd)
                except OSError as exc:
                    unexpected.append(f"create round {i}: {errno.errorcode.get(exc.errno)} {exc} "
                                      f"(raised at {raised_at(exc)})")
                await pause()

        async def remover() -> None:
            for i in range(rounds):
                try:
                    await k.unlink("busy.txt")
                except FileNotFoundError:
                    pass  # the creator had not made it (again) yet
                except OSError as exc:
                    unexpected.append(f"unlink round {i}: {errno.errorcode.get(exc.errno)} {exc} "
                                      f"(raised at {raised_at(exc)})")
                await pause()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(creator)
            nursery.start_soon(remover)
        assert not unexpected, "unexpected errors:\n" + "\n".join(unexpected)

        live = {name: await k.read_file(name) for name in await k.listdir()}
        await assert_no_drain_failures(h)
        assert h.backend_files() == live, "the backend differs from what the mount shows"
        assert h.journal_without_data() == []
        await h.restart()
        assert {name: await h.kernel.read_file(name) for name in await h.kernel.listdir()} == live
        assert h.journal_without_data() == [], f"journal records without data: {h.staging_entries()}"
        await h.crash()
        assert h.journal_without_data() == []
        assert {name: await h.kernel.read_file(name) for name in await h.kernel.listdir()} == live
    assert errors_logged(caplog) == []


# --------------------------------------------------------------------------- SQLite's rollback journal


async def test_sqlite_journal_create_write_fsync_close_unlink(tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """SQLite's rollback journal, once per transaction: create db-journal, write, fsync, close,
    unlink. Every call succeeds and the journal never lingers (live or in the backend)."""
    caplog.set_level(logging.WARNING)
    async with open_core(tmp_path, backend=backend) as h:
        k = h.kernel
        db = await k.open("app.db", os.O_RDWR | os.O_CREAT)
        for txn in range(5):
            journal = await k.open("app.db-journal", os.O_RDWR | os.O_CREAT)
            await k.pwrite(journal, pattern(f"journal{txn}", 512), 0)
            await k.fsync(journal)
            await k.pwrite(journal, pattern(f"header{txn}", 28), 0)
            await k.fsync(journal)
            await k.close(journal)
            await k.pwrite(db, pattern(f"page{txn}", 4096), txn * 4096)
            await k.fsync(db)
            await k.unlink("app.db-journal")
            with pytest.raises(FileNotFoundError):
                await k.stat("app.db-journal")
            if txn % 2:
                await trio.sleep(0.1)  # uploads of the journal (and of the db) run meanwhile
        await k.close(db)
        expected_db = b"".join(pattern(f"page{t}", 4096) for t in range(5))
        assert await k.listdir() == ["app.db"]
        assert await k.read_file("app.db") == expected_db
        await trio.sleep(0.2)
        await assert_no_drain_failures(h)
        assert h.backend_files() == {"app.db": expected_db}
    assert errors_logged(caplog) == []


# --------------------------------------------------------------------------- crash before the upload


async def test_closed_file_survives_a_crash_before_upload_and_is_uploaded_after_recovery(tmp_path: Path, backend: str) -> None:
    """Write and close (no fsync), then kill -9 before the upload: the next start recovers the
    journal, shows the bytes, and uploads them by itself (no drain needed)."""
    old = pattern("old", 3000)
    async with open_core(tmp_path, backend=backend, seed_files={"edited.txt": old}, write_back_delay=3600.0) as h:
        k = h.kernel
        await k.write_file("fresh.txt", pattern("fresh", 2500))
        fd = await k.open("edited.txt", RDWR)
        await k.pwrite(fd, b"PATCH", 1000)
        await k.close(fd)
        expected = {"fresh.txt": pattern("fresh", 2500), "edited.txt": old[:1000] + b"PATCH" + old[1005:]}
        await trio.sleep(0.1)
        assert h.backend_files() == {"edited.txt": old}, "nothing should be uploaded yet (delay 3600 s)"

        await h.crash()
        assert sorted(h.recovered) == sorted(expected), "recover() should take over both files"
        for name, data in expected.items():
            assert await h.kernel.read_file(name) == data, f"{name} after recovery"
        with trio.move_on_after(20):  # a hang guard; the upload is due at once after recovery
            while h.backend_files() != expected:
                await trio.sleep(0.05)
        assert h.backend_files() == expected, "recovered files were not uploaded by themselves"
        await assert_no_drain_failures(h)
        assert h.staging_entries() == [] or h.journal_without_data() == []


# --------------------------------------------------------------------------- descriptors follow their file


async def test_reader_sees_writes_to_its_file_after_the_name_is_unlinked(tmp_path: Path, backend: str) -> None:
    """POSIX: two descriptors of one file see one file, whatever happens to its name. A reader
    and a writer (O_TRUNC) of an uploaded file; the name is unlinked; the reader sees the
    truncation and then the writer's bytes (found by the model test, shrunk)."""
    async with open_core(tmp_path, backend=backend, seed_files={"a": pattern("old", 3000)}) as h:
        k = h.kernel
        reader = await k.open("a", RDONLY)
        writer = await k.open("a", os.O_WRONLY | os.O_TRUNC)
        assert await k.pread(reader, 100, 0) == b"", "the reader sees the truncation (name still there)"
        await k.unlink("a")
        assert await k.pread(reader, 100, 0) == b"", "the reader sees the truncation after the unlink"
        await k.pwrite(writer, b"new bytes", 0)
        assert await k.pread(reader, 100, 0) == b"new bytes", "the reader sees the writer's bytes"
        assert (await k.fstat(reader)).size == 9
        await k.close(writer)
        assert await k.pread(reader, 100, 0) == b"new bytes", "... also after the writer closed"
        await k.close(reader)
        await assert_no_drain_failures(h)
        assert h.backend_files() == {}


@pytest.mark.parametrize("when", ["during", "after"])
@pytest.mark.parametrize("how", ["open-trunc", "truncate-path"])
async def test_truncate_while_the_closed_file_is_being_uploaded_is_kept(
        tmp_path: Path, backend: str, how: str, when: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed file is being uploaded; open(O_TRUNC) (or truncate(2)) of it runs meanwhile and
    the upload of the old content is confirmed afterwards: the truncation wins, live and in the
    backend; that upload must not retire the file (found by the model test: the mount showed
    the uploaded 4,227 bytes after open(O_TRUNC), and the truncation was never uploaded)."""
    sending, release = trio.Event(), trio.Event()

    class GatedBackend:
        """PUTs wait for ``release`` (the first one says it is on its way)."""

        def __init__(self, inner):  # type: ignore[no-untyped-def]
            self._inner = inner
            self.display, self.cache_namespace = inner.display, inner.cache_namespace

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            attr = getattr(self._inner, name)
            if name not in ("put_bytes", "put_local_file"):
                return attr

            async def gated(*args, **kwargs):  # type: ignore[no-untyped-def]
                sending.set()
                await release.wait()
                return await attr(*args, **kwargs)
            return gated

    async with open_core(tmp_path, backend=backend, wrap_backend=GatedBackend, write_back_delay=0.01) as h:
        k = h.kernel
        await k.write_file("f", pattern("old", 4227))
        await k.released()
        with trio.fail_after(10):
            await sending.wait()  # the upload of the 4,227 bytes is under way
        if when == "during":
            # The upload is confirmed while the truncation is being done (where that work
            # may let other tasks run, they run now).
            original = StagingArea.truncate

            def confirm_meanwhile(staged, size):  # type: ignore[no-untyped-def]
                try:
                    trio.from_thread.run_sync(release.set)
                    time.sleep(0.3)  # in a worker thread: the trio tasks (the upload) go on
                except RuntimeError:  # on the trio thread itself: nothing else can run now
                    release.set()
                original(staged, size)

            monkeypatch.setattr(StagingArea, "truncate", staticmethod(confirm_meanwhile))
        if how == "open-trunc":
            fd = await k.open("f", os.O_WRONLY | os.O_TRUNC)
            assert (await k.fstat(fd)).size == 0
            release.set()
            await trio.sleep(0.2)  # the old upload is confirmed while the file is open
            await k.close(fd)
        else:
            await k.truncate("f", 0)
            release.set()
            await trio.sleep(0.2)  # the old upload is confirmed after the truncation
        monkeypatch.undo()
        assert (await k.stat("f")).size == 0
        await assert_no_drain_failures(h)
        assert h.backend_files() == {"f": b""}
        assert await k.read_file("f") == b""


async def test_shrinking_back_to_the_first_size_after_an_fsync_uploads_the_bytes(tmp_path: Path, backend: str) -> None:
    """An empty file grows, is fsynced (uploaded), shrinks back to empty and is fsynced again
    while still open: the second fsync must upload, not take "same size as when opened, no
    dirty bytes" for an attribute-only change against the version it opened (found by the
    model test: fsync gave EIO, "b changed on the backend")."""
    async with open_core(tmp_path, backend=backend, seed_files={"b": b""}) as h:
        k = h.kernel
        fd = await k.open("b", RDWR)
        await k.ftruncate(fd, 2998)
        await k.fsync(fd)
        assert h.backend_files()["b"] == bytes(2998)
        await k.ftruncate(fd, 0)
        await k.fsync(fd)
        assert h.backend_files()["b"] == b""
        await k.close(fd)
        await assert_no_drain_failures(h)
        assert await k.read_file("b") == b""


@pytest.mark.parametrize("change", ["truncate", "write", "chmod"])
async def test_reader_opened_before_a_change_reads_the_new_bytes_after_the_upload(
        tmp_path: Path, backend: str, change: str) -> None:
    """POSIX: a descriptor opened before another one (or truncate(2) by name) changes the file
    reads the changed file, also once the change has been uploaded; never the version it
    opened (found by the model test, shrunk: open r, truncate, drain, pread)."""
    old = pattern("old", 10_252)
    async with open_core(tmp_path, backend=backend, seed_files={"sub/c": old}) as h:
        k = h.kernel
        reader = await k.open("sub/c", RDONLY)
        assert await k.pread(reader, 100, 0) == old[:100]
        if change == "truncate":
            await k.truncate("sub/c", 9099)
            expected = old[:9099]
        elif change == "write":
            writer = await k.open("sub/c", RDWR)
            await k.pwrite(writer, b"EDIT", 9000)
            await k.close(writer)
            expected = old[:9000] + b"EDIT" + old[9004:]
        else:
            ino = (await k.stat("sub/c")).ino
            await h.fs.setattr(ino, mode=stat.S_IFREG | 0o600)  # chmod: the kernel adds the type bits
            expected = old
        await assert_no_drain_failures(h)
        assert await k.pread(reader, 5477, 9000) == expected[9000:9000 + 5477]
        assert await k.pread(reader, 20_000, 0) == expected
        assert (await k.fstat(reader)).size == len(expected)
        await k.close(reader)
        await assert_no_drain_failures(h)
        assert h.backend_files() == {"sub/c": expected}
        assert await k.read_file("sub/c") == expected


@pytest.mark.parametrize("source_open", [False, True], ids=["source-closed", "source-open-for-writing"])
async def test_reader_of_a_replaced_file_keeps_reading_the_old_file(tmp_path: Path, backend: str,
                                                                     source_open: bool) -> None:
    """POSIX: rename(new, target) replaces the *name*; a descriptor open on the old target still
    reads the old file, and the name gives the new one (found by the model test, shrunk)."""
    old, new = pattern("old", 3000), pattern("new", 2000)
    async with open_core(tmp_path, backend=backend, seed_files={"target": old, "incoming": new}) as h:
        k = h.kernel
        reader = await k.open("target", RDONLY)
        writer = await k.open("incoming", RDWR) if source_open else None
        await k.rename("incoming", "target")
        assert await k.pread(reader, 10_000, 0) == old, "the open descriptor reads the replaced file"
        assert (await k.fstat(reader)).size == len(old)
        assert await k.read_file("target") == new, "the name gives the new file"
        if writer is not None:
            await k.pwrite(writer, b"EDIT", 0)  # the moved file, through its own descriptor
            await k.close(writer)
            new = b"EDIT" + new[4:]
            assert await k.read_file("target") == new
            assert await k.pread(reader, 10_000, 0) == old, "the old file does not change"
        await k.close(reader)
        await assert_no_drain_failures(h)
        assert h.backend_files() == {"target": new}
