"""Unit tests of the pieces under the FUSE adapter: errno table, inodes, metadata cache."""

from __future__ import annotations

import errno

import pytest
import trio

from gstore.backends.base import Listing, ObjectInfo, check_relative_path, join_key, posix_name_problem
from gstore.errors import BackendError, classify, is_transient, to_errno
from gstore.vfs.inodes import ROOT_INODE, InodeTable, path_inode_number
from gstore.vfs.metadata import LIST_AFTER_LOOKUPS, MetadataCache


class FakeClientError(Exception):
    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (FileNotFoundError(errno.ENOENT, "x"), (errno.ENOENT, False)),
        (PermissionError(errno.EACCES, "x"), (errno.EACCES, False)),
        (FakeClientError("SlowDown", 503), (errno.EAGAIN, True)),
        (FakeClientError("InternalError", 500), (errno.EIO, True)),
        (FakeClientError("AccessDenied", 403), (errno.EACCES, False)),
        (FakeClientError("PreconditionFailed", 412), (errno.ESTALE, False)),
        (FakeClientError("Weird", 502), (errno.EIO, True)),
        (TimeoutError(), (errno.ETIMEDOUT, True)),
        (ConnectionResetError(), (errno.EIO, True)),
        (BackendError(errno.EIO, "short", transient=True), (errno.EIO, True)),
        (RuntimeError("bug"), (errno.EIO, False)),
    ],
)
def test_error_table(exc, expected):
    assert classify(exc) == expected
    assert to_errno(exc) == expected[0]
    assert is_transient(exc) == expected[1]


def test_wrapped_cause_is_classified():
    outer = OSError(errno.EIO, "wrapped")
    outer.__cause__ = FakeClientError("SlowDown", 503)
    assert classify(outer) == (errno.EAGAIN, True)


@pytest.mark.parametrize("bad", ["/abs", "a/../b", "..", "a//b", "a/", "./a", "a/\0"])
def test_relative_paths_cannot_escape(bad):
    with pytest.raises(PermissionError):
        check_relative_path(bad)
    with pytest.raises(PermissionError):
        join_key("bucket/prefix", bad)


def test_join_key():
    assert join_key("p", "") == "p"
    assert join_key("", "a/b") == "a/b"
    assert join_key("p/q/", "a") == "p/q/a"


def test_posix_name_problems():
    assert posix_name_problem("ok") is None
    assert posix_name_problem("") and posix_name_problem("..")
    assert posix_name_problem("é" * 128)  # 256 bytes
    assert posix_name_problem("é" * 127) is None


def test_inode_numbers_are_stable_and_forget_frees_memory():
    table = InodeTable(ObjectInfo("", True))
    info = ObjectInfo("a", False, size=1)
    first = table.remember("a", info)
    assert first.ino == path_inode_number("a") and first.ino != ROOT_INODE
    again = table.remember("a", info)
    assert again is first and first.lookups == 2
    table.forget(first.ino, 2)
    assert table.get(first.ino) is None and len(table) == 1
    assert table.remember("a", info).ino == first.ino  # same number after forget
    table.forget(ROOT_INODE, 100)
    assert table.get(ROOT_INODE) is not None


def test_open_inode_outlives_forget():
    table = InodeTable(ObjectInfo("", True))
    inode = table.remember("f", ObjectInfo("f", False))
    table.opened(inode)
    table.forget(inode.ino, 1)
    assert table.get(inode.ino) is inode
    table.closed(inode)
    assert table.get(inode.ino) is None


def test_kind_change_gets_a_new_inode():
    table = InodeTable(ObjectInfo("", True))
    file_inode = table.remember("x", ObjectInfo("x", False))
    dir_inode = table.remember("x", ObjectInfo("x", True))
    assert dir_inode.ino != file_inode.ino
    assert table.get(file_inode.ino) is file_inode  # still known to the kernel until forgotten
    table.forget(file_inode.ino, 1)
    assert table.get(file_inode.ino) is None and table.by_path("x") is dir_inode


class FakeBackend:
    def __init__(self) -> None:
        self.files = {"d/a": ObjectInfo("a", False, 3), "d/b": ObjectInfo("b", False, 4), "top": ObjectInfo("top", False, 1)}
        self.calls: list[tuple[str, str]] = []
        self.fail_with: Exception | None = None
        self.delay = 0.0

    async def stat(self, path):
        self.calls.append(("stat", path))
        await trio.sleep(self.delay)
        if self.fail_with:
            raise self.fail_with
        if path in self.files:
            return self.files[path]
        if any(k.startswith(path + "/") for k in self.files):
            return ObjectInfo(path.rsplit("/", 1)[-1], True)
        raise FileNotFoundError(errno.ENOENT, path)

    async def list_dir(self, path, max_pages=None):
        self.calls.append(("list", path))
        await trio.sleep(self.delay)
        if self.fail_with:
            raise self.fail_with
        prefix = f"{path}/" if path else ""
        listing = Listing()
        for key, info in self.files.items():
            if key.startswith(prefix) and "/" not in key[len(prefix):]:
                listing.entries[key[len(prefix):]] = info
        return listing


def make_cache(backend, **kw):
    params = dict(attr_ttl=60, dir_ttl=60, negative_ttl=60, max_entries=1000)
    params.update(kw)
    return MetadataCache(backend, **params)


def test_listing_answers_stats_and_negative_lookups_without_requests():
    async def main():
        backend = FakeBackend()
        cache = make_cache(backend)
        listing = await cache.list_dir("d")
        assert sorted(listing.entries) == ["a", "b"]
        assert (await cache.stat("d/a")).size == 3
        with pytest.raises(FileNotFoundError):
            await cache.stat("d/missing")
        assert backend.calls == [("list", "d")]

    trio.run(main)


def test_transient_errors_are_not_enoent_and_not_cached():
    async def main():
        backend = FakeBackend()
        cache = make_cache(backend)
        backend.fail_with = BackendError(errno.EAGAIN, "503 SlowDown", transient=True)
        with pytest.raises(BackendError) as info:
            await cache.stat("top")
        assert info.value.errno == errno.EAGAIN
        backend.fail_with = None
        assert (await cache.stat("top")).size == 1
        assert backend.calls == [("stat", "top"), ("stat", "top")]

    trio.run(main)


def test_concurrent_stats_share_one_request():
    async def main():
        backend = FakeBackend()
        backend.delay = 0.05
        cache = make_cache(backend)
        results = []
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(lambda: _collect(cache, results))
        assert len(results) == 10 and backend.calls == [("stat", "top")]

    async def _collect(cache, results):
        results.append(await cache.stat("top"))

    trio.run(main)


def test_negative_answers_expire():
    async def main():
        backend = FakeBackend()
        cache = make_cache(backend, negative_ttl=0.05)
        with pytest.raises(FileNotFoundError):
            await cache.stat("later")
        backend.files["later"] = ObjectInfo("later", False, 9)
        with pytest.raises(FileNotFoundError):
            await cache.stat("later")  # still cached
        await trio.sleep(0.1)
        assert (await cache.stat("later")).size == 9

    trio.run(main)


def test_metadata_memory_is_bounded():
    async def main():
        backend = FakeBackend()
        for i in range(5000):
            backend.files[f"big/{i}"] = ObjectInfo(str(i), False, i)
            backend.files[f"other{i}/x"] = ObjectInfo("x", False, 1)
        cache = make_cache(backend, max_entries=200)
        for i in range(300):
            await cache.list_dir(f"other{i}")
            await cache.stat(f"other{i}/x")
        await cache.list_dir("big")  # larger than the bound: served, not cached
        assert cache.entry_count() <= 200 + 2 * 50

    trio.run(main)


def test_many_lookups_in_an_unlisted_folder_become_one_listing():
    backend = FakeBackend()
    cache = make_cache(backend)

    async def main():
        for i in range(20):  # a program creating new names one by one (cp -r, tar x)
            with pytest.raises(FileNotFoundError):
                await cache.stat(f"d/new{i}")
        assert (await cache.stat("d/b")).size == 4

    trio.run(main)
    heads = [c for c in backend.calls if c[0] == "stat"]
    lists = [c for c in backend.calls if c[0] == "list"]
    assert lists == [("list", "d")]
    assert len(heads) == LIST_AFTER_LOOKUPS - 1
