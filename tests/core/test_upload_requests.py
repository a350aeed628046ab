"""Uploads with fewer requests and in parallel, with conflicts still detected.

* A new file goes up with one conditional PUT (If-None-Match: *) and no HEAD,
  on a store that was probed (once per mount) to refuse that header on an
  existing key; another writer's object created meanwhile is still a conflict.
* On a store that ignores the header (a wrapper that drops it, over the same
  real S3 endpoint), the probe says so and the HEAD stays.
* Multipart uploads of several files run at once (one mount-wide part limiter);
  ``user.md5`` of each is known at once (computed beside the parts), and right
  when the file was written while its parts went up.
* The staging file's descriptor stays open while the file is open, and only then.
* Once an upload is confirmed its journal record is gone before the file is retired:
  a crash afterwards recovers nothing, and a file removed after its upload stays removed.
* A flush of many files looks at each file a bounded number of times, not once per upload.
* A closed small file's upload sends the bytes its close's commit read: no read again.
* An earlier upload of a file whose answer was lost (the object landed, the file changed
  since) is recognised as this file's own by the id it carries, not taken for a conflict.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from gstore.backends.filebody import FileRegion
from gstore.errors import BackendError
from gstore.write import pending as pending_module
from gstore.write.conditional import PROBE_DIR
from gstore.write.pending import PendingFiles
from gstore.write.uploader import Uploader

from .conftest import open_core
from .model import pattern
from .posix_kernel import PosixKernel

NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def conflict_keys(keys: list[str], name: str) -> list[str]:
    return [k for k in keys if k.startswith(f"{name}.conflict-")]


class IgnoresIfNoneMatch:
    """A store that declares conditional writes but ignores If-None-Match: * (the header is
    dropped before the request goes to the real S3 endpoint below)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put_bytes(self, path: str, data: bytes, **kwargs: Any) -> Any:
        kwargs["if_none_match"] = False
        return await self._inner.put_bytes(path, data, **kwargs)


async def test_new_files_go_up_with_one_put_each_and_no_head(tmp_path: Path) -> None:
    async with open_core(tmp_path, backend="s3", write_back_delay=3600) as h:
        assert h.bucket is not None
        files = {f"f{i:02d}.bin": pattern(f"f{i}", 3000 + i) for i in range(24)}
        for path, data in files.items():
            await h.kernel.write_file(path, data)
        stats = h.bucket.server.stats
        stats.reset()
        assert await h.drain() == []
        counts = stats.snapshot()
        uploader = h.core.pending.uploader
        assert uploader.create_check.probes == 1, "the probe runs once per mount, not per file"
        assert uploader.create_check.known is True, "moto refuses If-None-Match: * on an existing key"
        assert counts["HEAD"] == 0, counts
        assert counts["PUT"] == len(files) + 2, counts  # + the probe's two PUTs
        assert counts["DELETE"] == 1, counts  # the probe's scratch object
        assert h.bucket.files() == files, "exactly the files, and no probe object left behind"
        assert not any(k.startswith(PROBE_DIR) for k in h.bucket.keys())
        # A second batch: no new probe, still no HEAD.
        stats.reset()
        await h.kernel.write_file("later.txt", b"later")
        assert await h.drain() == []
        assert stats.snapshot()["HEAD"] == 0 and uploader.create_check.probes == 1


async def _created_elsewhere_meanwhile(h: Any, name: str) -> tuple[bytes, bytes]:
    """Open a new file here, let another writer create the same key, then write ours and close."""
    ours, theirs = pattern("ours", 5000), pattern("theirs", 4000)
    fd = await h.kernel.open(name, NEW)
    h.bucket.put(name, theirs)
    await h.kernel.pwrite(fd, ours, 0)
    await h.kernel.close(fd)
    return ours, theirs


async def test_a_new_file_created_elsewhere_meanwhile_is_still_a_conflict(tmp_path: Path) -> None:
    async with open_core(tmp_path, backend="s3", conflict="keep-both") as h:
        assert h.bucket is not None
        await h.kernel.write_file("warmup.txt", b"x")  # the probe runs here
        assert await h.drain() == []
        skipped = h.core.pending.uploader.heads_skipped
        ours, theirs = await _created_elsewhere_meanwhile(h, "new.txt")
        assert await h.drain() == []
        assert h.core.pending.uploader.heads_skipped == skipped + 1, "the PUT went first, with no HEAD"
        files = h.bucket.files()
        assert files["new.txt"] == theirs, "the other writer's object is never overwritten"
        [conflict] = conflict_keys(list(files), "new.txt")
        assert files[conflict] == ours, "ours went to the conflict name"


async def test_a_conflict_on_a_new_file_with_policy_fail_keeps_ours_staged(tmp_path: Path) -> None:
    async with open_core(tmp_path, backend="s3", conflict="fail") as h:
        assert h.bucket is not None
        ours, theirs = await _created_elsewhere_meanwhile(h, "new.txt")
        failures = await h.drain(timeout=10)
        assert failures and "new.txt" in failures[0], failures
        assert h.bucket.files() == {"new.txt": theirs}
        assert await h.kernel.read_file("new.txt") == ours, "ours stays staged and visible here"


async def test_a_store_that_ignores_if_none_match_keeps_the_head(tmp_path: Path) -> None:
    async with open_core(tmp_path, backend="s3", conflict="keep-both", wrap_backend=IgnoresIfNoneMatch) as h:
        assert h.bucket is not None
        await h.kernel.write_file("warmup.txt", b"x")
        h.bucket.server.stats.reset()
        assert await h.drain() == []
        uploader = h.core.pending.uploader
        assert uploader.create_check.known is False, "the probe saw the second PUT succeed"
        assert uploader.heads_skipped == 0
        assert h.bucket.server.stats.snapshot()["HEAD"] >= 1
        ours, theirs = await _created_elsewhere_meanwhile(h, "new.txt")
        assert await h.drain() == []
        files = h.bucket.files()
        assert files["new.txt"] == theirs, "the HEAD found the other writer's object"
        [conflict] = conflict_keys(list(files), "new.txt")
        assert files[conflict] == ours
        assert not any(k.startswith(PROBE_DIR) for k in files)


async def test_multipart_uploads_of_several_files_at_once(tmp_path: Path) -> None:
    """Three files above the single-PUT limit upload together: every part of each lands in its
    own object (the part limiter is shared by every upload of the mount)."""
    size = 12 * 1024 * 1024
    async with open_core(tmp_path, backend="s3", write_back_delay=3600) as h:
        assert h.bucket is not None
        files = {f"big{i}.bin": pattern(f"big{i}", size) for i in range(3)}
        for path, data in files.items():
            await h.kernel.write_file(path, data)
        h.bucket.server.stats.reset()
        assert await h.drain(timeout=120) == []
        assert h.bucket.server.stats.snapshot()["POST"] >= 6, "three multipart uploads (create + complete)"
        assert h.bucket.files() == files
        for path, data in files.items():
            assert await h.kernel.read_file(path) == data
            assert await user_md5(h, path) == hashlib.md5(data).hexdigest()
        assert h.fs.xattrs.md5_computed == 0, "the uploads' own digests answered, no object was read again"


async def user_md5(h: Any, path: str) -> str:
    return (await PosixKernel.of(h).getxattr(path, "user.md5")).decode()


class PausesInItsFirstPart:
    """The first part upload of the mount waits (after ``reached``) until ``resume`` is set."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.reached = trio.Event()
        self.resume = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def upload_part(self, *args: Any, **kwargs: Any) -> Any:
        if not self.reached.is_set():
            self.reached.set()
            await self.resume.wait()
        return await self._inner.upload_part(*args, **kwargs)


@asynccontextmanager
async def core_with_one_part_slot(tmp_path: Path) -> AsyncIterator[tuple[Any, Callable[[], PausesInItsFirstPart]]]:
    """A core on S3 with one part slot, whose backend holds the first part upload; the
    getter returns the wrapper of the backend in use."""
    wrappers: list[PausesInItsFirstPart] = []

    def wrap(inner: Any) -> Any:
        wrappers.append(PausesInItsFirstPart(inner))
        return wrappers[-1]

    async with open_core(tmp_path, backend="s3", write_back_delay=3600, wrap_backend=wrap,
                         part_concurrency=1) as h:
        assert h.bucket is not None
        yield h, lambda: wrappers[-1]


async def test_a_write_during_a_multipart_upload_leaves_no_stale_whole_md5(tmp_path: Path) -> None:
    """The whole-object digest is read beside the parts, at other moments: a write while they
    go up falls between the passes (here: after the whole-object pass and the second part's,
    while the first part is held), and ``user.md5`` must then be that of the bytes."""
    size = 12 * 1024 * 1024
    async with core_with_one_part_slot(tmp_path) as (h, paused):
        first = pattern("first", size)
        await h.kernel.write_file("big.bin", first)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.drain, 120)
            with trio.fail_after(60):
                await paused().reached.wait()
                await trio.sleep(1)  # the whole-object pass (its own thread) is done by now
            fd = await h.kernel.open("big.bin", os.O_WRONLY)
            await h.kernel.pwrite(fd, b"changed", size - 100)
            await h.kernel.close(fd)
            paused().resume.set()
        assert await h.drain(timeout=120) == []
        second = first[:size - 100] + b"changed" + first[size - 93:]
        assert h.bucket.files() == {"big.bin": second}
        assert await user_md5(h, "big.bin") == hashlib.md5(second).hexdigest()


async def test_parts_are_hashed_ahead_of_their_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one part slot, held by the first part, the second is already hashed: when the
    slot frees it is sent at once, not after 8 MiB more of hashing. No more than one part
    per slot waits hashed (the third is not read yet)."""
    size = 20 * 1024 * 1024  # three parts of 8 MiB
    hashed: list[int] = []
    original = FileRegion.hashed.__func__  # type: ignore[attr-defined]

    def counting(cls: type[FileRegion], path: str, start: int, length: int) -> FileRegion:
        hashed.append(start)
        return original(cls, path, start, length)

    monkeypatch.setattr(FileRegion, "hashed", classmethod(counting))
    async with core_with_one_part_slot(tmp_path) as (h, paused):
        data = pattern("ahead", size)
        await h.kernel.write_file("big.bin", data)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.drain, 120)
            with trio.fail_after(60):
                await paused().reached.wait()
                while len(hashed) < 2:
                    await trio.sleep(0.01)
            await trio.sleep(0.5)  # room for a third hash, were the look-ahead unbounded
            assert hashed == [0, 8 * 1024 * 1024], "the next part hashed while the first holds the slot"
            paused().resume.set()
        assert h.bucket.files() == {"big.bin": data}


class LosesOneAnswer:
    """Once ``armed``, the next PUT lands, then waits for ``resume`` and fails as if its answer
    had been lost (a reset after the store took it)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.armed = False
        self.landed = trio.Event()
        self.resume = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put_bytes(self, path: str, data: Any, **kwargs: Any) -> Any:
        info = await self._inner.put_bytes(path, data, **kwargs)
        if self.armed and not self.landed.is_set():
            self.landed.set()
            await self.resume.wait()
            raise BackendError(errno.ECONNRESET, f"put {path}: connection reset", transient=True)
        return info


async def test_an_earlier_upload_whose_answer_was_lost_is_not_a_conflict(tmp_path: Path) -> None:
    """v2's PUT lands but its answer is lost, and the file is rewritten (v3) meanwhile: the
    next upload finds v2 where it expected v1. v2 carries this staged file's id, so it is
    ours: v3 replaces it, and no conflict copy appears (nothing compares v2 with v3 bytes)."""
    wrappers: list[LosesOneAnswer] = []

    def wrap(inner: Any) -> Any:
        wrappers.append(LosesOneAnswer(inner))
        return wrappers[-1]

    async with open_core(tmp_path, backend="s3", write_back_delay=3600, wrap_backend=wrap) as h:
        assert h.bucket is not None
        await h.kernel.write_file("a", pattern("v1", 5000))
        assert await h.drain() == []
        fd = await h.kernel.open("a", os.O_WRONLY)
        await h.kernel.pwrite(fd, pattern("v2", 6000), 0)
        wrappers[-1].armed = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.drain, 120)
            await h.kernel.close(fd)
            with trio.fail_after(60):
                await wrappers[-1].landed.wait()
            assert h.bucket.files() == {"a": pattern("v2", 6000)}, "v2 landed"
            fd = await h.kernel.open("a", os.O_WRONLY)
            await h.kernel.pwrite(fd, pattern("v3", 7000), 0)
            await h.kernel.close(fd)
            wrappers[-1].resume.set()
        assert await h.drain(timeout=120) == []
        assert h.bucket.files() == {"a": pattern("v3", 7000)}, "no conflict copy; v3 at the path"


def staging_fds(staging_dir: Path) -> list[str]:
    """The descriptors of this process open on staging data files."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue
        if target.startswith(str(staging_dir)) and target.endswith(".data"):
            found.append(target)
    return found


async def test_the_staging_descriptor_is_open_while_the_file_is_open_and_only_then(tmp_path: Path) -> None:
    async with open_core(tmp_path, write_back_delay=3600) as h:
        fd = await h.kernel.open("a.bin", NEW)
        for i in range(20):
            await h.kernel.pwrite(fd, pattern(str(i), 4096), i * 4096)
        assert len(staging_fds(h.staging_dir)) == 1, "one descriptor serves every write"
        await h.kernel.close(fd)
        await h.kernel.released()
        assert staging_fds(h.staging_dir) == [], "closed with the last handle (the file is still pending)"
        for i in range(30):
            await h.kernel.write_file(f"many{i}", b"x" * 100)
        await h.kernel.released()
        assert staging_fds(h.staging_dir) == [], "pending files hold no descriptor"
        assert await h.kernel.read_file("a.bin") == b"".join(pattern(str(i), 4096) for i in range(20))
        assert await h.drain() == []
        with trio.fail_after(5):
            assert staging_fds(h.staging_dir) == []


async def test_no_record_outlives_a_confirmed_upload(tmp_path: Path) -> None:
    """Retiring an uploaded file must not leave its record for a crash to find: the upload
    removes it before the retire (a worker thread, batched), so nothing is uploaded again."""
    async with open_core(tmp_path, backend="s3", write_back_delay=3600) as h:
        assert h.bucket is not None
        files = {f"f{i:02d}.bin": pattern(f"f{i}", 2000 + i) for i in range(20)}
        for path, data in files.items():
            await h.kernel.write_file(path, data)
        await h.kernel.released()
        assert await h.drain() == []
        assert h.core.pending.pending() == [], "every uploaded, closed file is retired"
        assert not list(h.staging_dir.glob("*.json")), "and none of their records is left"
        await h.crash()
        assert h.recovered == []
        assert h.bucket.files() == files


async def test_a_file_removed_after_its_upload_stays_removed_after_a_crash(tmp_path: Path) -> None:
    async with open_core(tmp_path, backend="s3", write_back_delay=3600) as h:
        assert h.bucket is not None
        await h.kernel.write_file("kept.txt", b"kept")
        await h.kernel.write_file("gone.txt", b"gone")
        await h.kernel.released()
        assert await h.drain() == []
        await h.kernel.unlink("gone.txt")
        await h.crash()
        assert h.recovered == []
        assert await h.kernel.listdir() == ["kept.txt"]
        assert await h.drain() == []
        assert h.bucket.files() == {"kept.txt": b"kept"}


async def test_a_flush_looks_at_each_file_a_bounded_number_of_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for n uploads costs O(n) checks, not one pass over every file per upload
    (7-12% of the trio thread's time while 1,000 small files went up)."""
    monkeypatch.setattr(pending_module, "FLUSH_RESCAN", 3600.0)  # only the cursor between passes
    looked = 0
    real_state = PendingFiles._flush_state  # noqa: SLF001 - counting the flush's checks

    def counting_state(self: PendingFiles, *args: Any) -> str:
        nonlocal looked
        looked += 1
        return real_state(self, *args)

    monkeypatch.setattr(PendingFiles, "_flush_state", counting_state)
    count = 150
    async with open_core(tmp_path, write_back_delay=3600) as h:
        files = {f"f{i:03d}": pattern(f"f{i}", 100) for i in range(count)}
        for path, data in files.items():
            await h.kernel.write_file(path, data)
        await h.kernel.released()
        assert await h.drain() == []
        assert h.backend_files() == files
    # Two full passes and one cursor walk over every file, plus one look per wake-up (a few
    # per upload); one full pass per upload would be count * count / 2 = 11,250.
    assert looked <= 10 * count, looked


async def test_a_closed_small_file_goes_up_with_the_bytes_its_close_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real_read = Uploader._read_hashed  # noqa: SLF001 - counting reads for uploads

    def counting_read(staged: Any, start: int, length: int) -> tuple[bytes, str]:
        reads.append(staged.path)
        return real_read(staged, start, length)

    monkeypatch.setattr(Uploader, "_read_hashed", staticmethod(counting_read))
    async with open_core(tmp_path, backend="s3", write_back_delay=3600) as h:
        assert h.bucket is not None
        files = {f"f{i:02d}.txt": pattern(f"f{i}", 1000 + 300 * i) for i in range(12)}
        for path, data in files.items():
            await h.kernel.write_file(path, data)
        fd = await h.kernel.open("f00.txt", os.O_WRONLY)
        await h.kernel.pwrite(fd, b"CHANGED", 0)  # after its close: what that commit read is stale
        await h.kernel.close(fd)
        files["f00.txt"] = b"CHANGED" + files["f00.txt"][7:]
        await h.kernel.released()
        assert await h.drain() == []
        assert h.bucket.files() == files, "every upload sent the bytes of its generation"
        assert reads == [], "each closed small file went up with the bytes its last close kept"
