"""Stale if unreachable (no network): the metadata cache answers from what it last knew,
however old, while the backend cannot answer; the block cache serves only what it holds
for the opened version; both are back to normal as soon as the backend answers."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from gstore.backends.base import Listing, ObjectInfo
from gstore.backends.resilience import CircuitOpenError
from gstore.cache.blockstore import BlockStore
from gstore.cache.reader import BlockReader
from gstore.errors import BackendError
from gstore.vfs.metadata import MetadataCache

TTL = 0.05


def info(name: str, size: int = 3, etag: str = "e1", is_dir: bool = False) -> ObjectInfo:
    return ObjectInfo(name=name, is_dir=is_dir, size=size, etag=etag)


class Remote:
    """A backend of a few folders that can be switched off (every call: circuit open)."""

    display = "fake://"
    cache_namespace = "fake"

    def __init__(self) -> None:
        self.folders: dict[str, dict[str, ObjectInfo]] = {
            "": {"dir": info("dir", is_dir=True), "top.txt": info("top.txt")},
            "dir": {"a.txt": info("a.txt"), "b.txt": info("b.txt", 5)},
        }
        self.down: BaseException | None = None
        self.requests = 0
        self.data: dict[str, bytes] = {}

    def _check(self) -> None:
        self.requests += 1
        if self.down is not None:
            raise self.down

    async def stat(self, path: str) -> ObjectInfo:
        self._check()
        folder, _, name = path.rpartition("/")
        found = self.folders.get(folder, {}).get(name)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, path)
        return found

    async def list_dir(self, path: str, *, max_pages: int | None = None) -> Listing | None:
        self._check()
        if path not in self.folders:
            raise FileNotFoundError(errno.ENOENT, path)
        return Listing(entries=dict(self.folders[path]))

    def cache_key(self, path: str) -> str:
        return "fake|" + path

    async def read_range(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        self._check()
        return self.data[path][start:end]


OFF = CircuitOpenError("backend unavailable (circuit open)")


def cache(remote: Remote, **kw: int) -> MetadataCache:
    return MetadataCache(remote, attr_ttl=TTL, dir_ttl=TTL, negative_ttl=TTL,  # type: ignore[arg-type]
                         max_entries=kw.get("max_entries", 1000))


def test_offline_answers_come_from_the_last_known_listing_however_old() -> None:
    async def main() -> None:
        remote = Remote()
        meta = cache(remote)
        assert set((await meta.list_dir("dir")).entries) == {"a.txt", "b.txt"}
        assert (await meta.stat("top.txt")).size == 3
        remote.down = OFF
        await trio.sleep(3 * TTL)  # every TTL has run out
        assert set((await meta.list_dir("dir")).entries) == {"a.txt", "b.txt"}
        assert (await meta.stat("dir/b.txt")).size == 5
        assert (await meta.stat("top.txt")).size == 3
        with pytest.raises(FileNotFoundError):  # not in dir's last listing: a new file may go there
            await meta.stat("dir/new.txt")
        with pytest.raises(BackendError) as unknown:  # nothing known: the failure, never ENOENT
            await meta.stat("elsewhere/x")
        assert unknown.value.errno == errno.EIO
        with pytest.raises(BackendError):
            await meta.list_dir("never-listed")
        assert meta.stats["stale_answers"] == 4 and meta.stats["unanswered"] == 2

        # Back: the normal TTLs apply at once, and changes made elsewhere show.
        remote.down = None
        remote.folders["dir"]["c.txt"] = info("c.txt")
        assert set((await meta.list_dir("dir")).entries) == {"a.txt", "b.txt", "c.txt"}
        assert (await meta.stat("dir/c.txt")).name == "c.txt"

    trio.run(main)


def test_any_transient_failure_falls_back_but_a_definite_answer_does_not() -> None:
    async def main() -> None:
        remote = Remote()
        meta = cache(remote)
        await meta.list_dir("dir")
        await trio.sleep(3 * TTL)
        remote.down = ConnectionRefusedError(errno.ECONNREFUSED, "refused")  # breaker still closed
        assert (await meta.stat("dir/a.txt")).size == 3
        remote.down = BackendError(errno.ETIMEDOUT, "no answer", transient=True)
        assert set((await meta.list_dir("dir")).entries) == {"a.txt", "b.txt"}
        # Gone for real (the backend says so): never answered from the old listing.
        remote.down = None
        del remote.folders["dir"]["a.txt"]
        with pytest.raises(FileNotFoundError):
            await meta.stat("dir/a.txt")
        # Denied: a definite answer too.
        remote.down = PermissionError(errno.EACCES, "denied")
        await trio.sleep(3 * TTL)
        with pytest.raises(PermissionError):
            await meta.stat("dir/b.txt")

    trio.run(main)


def test_the_newest_of_attributes_and_listing_wins() -> None:
    async def main() -> None:
        remote = Remote()
        meta = cache(remote)
        await meta.list_dir("dir")  # a.txt: size 3
        await trio.sleep(3 * TTL)
        remote.folders["dir"]["a.txt"] = info("a.txt", 7, "e2")
        assert (await meta.stat("dir/a.txt")).size == 7  # a later single answer
        remote.down = OFF
        await trio.sleep(3 * TTL)
        assert (await meta.stat("dir/a.txt")).size == 7
        remote.down = None
        await meta.list_dir("dir")  # a listing newer still (size 7 too, but from the listing)
        del remote.folders["dir"]["a.txt"]
        remote.folders["dir"]["a.txt"] = info("a.txt", 9, "e3")
        await trio.sleep(3 * TTL)
        await meta.list_dir("dir")
        remote.down = OFF
        await trio.sleep(3 * TTL)
        assert (await meta.stat("dir/a.txt")).size == 9

    trio.run(main)


def test_changes_made_here_update_what_is_last_known() -> None:
    async def main() -> None:
        remote = Remote()
        meta = cache(remote)
        await meta.list_dir("dir")
        await meta.stat("top.txt")
        remote.down = OFF
        await trio.sleep(3 * TTL)
        meta.remember("dir/new.txt", info("new.txt", 11))  # an upload confirmed (before the outage)
        meta.remember_missing("dir/a.txt")  # an unlink
        await trio.sleep(3 * TTL)
        assert set((await meta.list_dir("dir")).entries) == {"b.txt", "new.txt"}
        assert (await meta.stat("dir/new.txt")).size == 11
        with pytest.raises(FileNotFoundError):
            await meta.stat("dir/a.txt")
        meta.remember_empty_dir("fresh")
        await trio.sleep(3 * TTL)
        assert (await meta.list_dir("fresh")).entries == {}
        meta.forget_tree("dir")  # a directory rename: nothing below is known any more
        with pytest.raises(BackendError):
            await meta.list_dir("dir")
        meta.clear()  # fresh answers go, what was last known stays for outages
        assert (await meta.stat("top.txt")).size == 3

    trio.run(main)


def test_the_last_known_store_is_bounded() -> None:
    async def main() -> None:
        remote = Remote()
        for i in range(50):
            remote.folders[f"d{i}"] = {f"f{j}": info(f"f{j}") for j in range(10)}
        meta = cache(remote, max_entries=100)
        for i in range(50):
            await meta.list_dir(f"d{i}")
        assert meta.last_known_count() <= 100 + 25
        remote.down = OFF
        await trio.sleep(3 * TTL)
        assert len((await meta.list_dir("d49")).entries) == 10  # the most recent are kept
        with pytest.raises(BackendError):
            await meta.list_dir("d0")  # the oldest went

    trio.run(main)


def test_a_failed_listing_for_coming_lookups_does_not_fail_the_lookups() -> None:
    async def main() -> None:
        remote = Remote()
        meta = cache(remote)
        await meta.list_dir("dir")
        remote.down = OFF
        await trio.sleep(3 * TTL)
        for name in ("a.txt", "b.txt", "x1", "x2", "x3"):  # the 4th name would list the folder
            try:
                await meta.stat(f"dir/{name}")
            except FileNotFoundError:
                assert name.startswith("x")

    trio.run(main)


def test_offline_the_block_cache_serves_only_the_version_it_holds(tmp_path: Path) -> None:
    async def main() -> None:
        remote = Remote()
        remote.data["f"] = b"0123456789" * 100
        store = BlockStore(tmp_path / "blocks", 1 << 20)
        reader = BlockReader(store, remote, block_size=256, readahead=0, fetch_concurrency=2)  # type: ignore[arg-type]
        v1 = ObjectInfo(name="f", is_dir=False, size=1000, etag="v1")
        stream = reader.open_stream("f", v1)
        assert await reader.read(stream, 0, 1000) == remote.data["f"]
        remote.down = OFF
        again = reader.open_stream("f", v1)
        assert await reader.read(again, 100, 500) == remote.data["f"][100:600]  # from the cache
        other = reader.open_stream("f", ObjectInfo(name="f", is_dir=False, size=1000, etag="v2"))
        with pytest.raises(OSError) as failed:  # another version: never the old bytes
            await reader.read(other, 0, 10)
        assert failed.value.errno == errno.EIO
        store.close()

    trio.run(main)
