"""What a refresh forgets, in the FUSE-free core (the kernel side is a recording fake),
and the ``.gstore/refresh`` control file protocol. End to end: tests/fuse/test_refresh.py."""

from __future__ import annotations

import json

import pytest
import trio

from gstore.backends import make_backend
from gstore.config import MountOptions
from gstore.core import build_core
from gstore.vfs.control import REFRESH_FILE, ControlFiles, ControlHandle
from gstore.vfs.refresh import Refresher, normalize_refresh_path


class RecordingKernel:
    def __init__(self) -> None:
        self.entries: list[tuple[int, str]] = []
        self.inodes: list[tuple[int, bool]] = []

    async def invalidate(self, entries, inodes) -> None:  # type: ignore[no-untyped-def]
        self.entries += entries
        self.inodes += inodes


def test_refresh_forgets_attributes_listings_and_negatives_but_not_pending_files(tmp_path):
    store = tmp_path / "store"
    (store / "d").mkdir(parents=True)
    (store / "d" / "a.txt").write_bytes(b"old")

    async def main() -> None:
        backend = make_backend("file", str(store), {}, request_timeout=30)
        core = build_core(backend, tmp_path / "state", MountOptions(
            cache_dir=tmp_path / "cache", attr_ttl=3600, dir_cache_ttl=3600, negative_ttl=3600))
        fs = core.fs
        async with trio.open_nursery() as nursery:
            await nursery.start(core.run)
            d = await fs.lookup(1, "d")
            a = await fs.lookup(d.ino, "a.txt")
            with pytest.raises(FileNotFoundError):
                await fs.lookup(d.ino, "new.txt")
            assert sorted(await fs.list_dir("d")) == ["a.txt"]
            # Behind the mount's back:
            (store / "d" / "a.txt").write_bytes(b"new and longer")
            (store / "d" / "new.txt").write_bytes(b"hello")
            assert (await fs.getattr(a.ino)).info.size == 3  # trusted for an hour
            with pytest.raises(FileNotFoundError):
                await fs.lookup(d.ino, "new.txt")

            kernel = RecordingKernel()
            refresher = Refresher(fs, kernel)
            verdict = await refresher(["d/a.txt", "/d/new.txt/", "../escape", ".gstore/flush"])
            assert verdict["refreshed"] == ["d/a.txt", "d/new.txt"]
            assert verdict["ok"] is False and len(verdict["errors"]) == 2
            assert {(d.ino, "a.txt"), (d.ino, "new.txt")} <= set(kernel.entries)
            assert (a.ino, False) in kernel.inodes and (d.ino, True) in kernel.inodes
            assert (await fs.getattr(a.ino)).info.size == len(b"new and longer")
            assert (await fs.lookup(d.ino, "new.txt")).info.size == 5
            assert sorted(await fs.list_dir("d")) == ["a.txt", "new.txt"]

            # A folder: everything below it. The whole mount: ".".
            (store / "d" / "b.txt").write_bytes(b"b")
            assert sorted(await fs.list_dir("d")) == ["a.txt", "new.txt"]
            assert (await refresher(["d"]))["ok"]
            assert sorted(await fs.list_dir("d")) == ["a.txt", "b.txt", "new.txt"]
            (store / "top.txt").write_bytes(b"t")
            await fs.list_dir("")
            assert (await refresher(["."]))["refreshed"] == ["."]
            assert "top.txt" in await fs.list_dir("")

            # A pending file keeps its local bytes through a refresh.
            pending = core.pending
            assert pending is not None
            fh, _, _ = await fs.open((await fs.lookup(d.ino, "a.txt")).ino, 2)  # O_RDWR
            await fs.write(fh, 0, b"LOCAL")
            (store / "d" / "a.txt").write_bytes(b"remote change")
            assert (await refresher(["d/a.txt"]))["ok"]
            assert await fs.read(fh, 0, 100) == b"LOCALnd longer"
            await fs.release(fh)
            nursery.cancel_scope.cancel()
        core.close()

    trio.run(main)


def test_normalize_refresh_path():
    assert normalize_refresh_path("/a//b/./c/") == "a/b/c"
    assert normalize_refresh_path(".") == ""
    for bad in ("a/../b", "..", ".gstore", ".gstore/refresh", "a\0b"):
        with pytest.raises(ValueError):
            normalize_refresh_path(bad)


def test_control_file_refreshes_on_read_or_on_close():
    asked: list[list[str]] = []

    async def refresh(paths: list[str]) -> dict:
        asked.append(paths)
        return {"ok": True, "refreshed": paths, "errors": []}

    async def flush(paths):  # type: ignore[no-untyped-def]
        return []

    files = ControlFiles(status=dict, flush=flush, refresh=refresh)

    async def main() -> None:
        read_handle = ControlHandle(REFRESH_FILE)
        ControlFiles.write(read_handle, b"a/b\n.\n")
        verdict = json.loads(await files.read(read_handle, 0, 65536))
        assert verdict["refreshed"] == ["a/b", ""] and asked == [["a/b", ""]]
        await files.closing(read_handle)  # already done: not twice
        assert len(asked) == 1

        closed = ControlHandle(REFRESH_FILE)
        ControlFiles.write(closed, b"x\n")
        await files.closing(closed)  # echo x > .gstore/refresh: done at close
        assert asked[-1] == ["x"]

        empty = ControlHandle(REFRESH_FILE)
        assert json.loads(await files.read(empty, 0, 65536)) == {"ok": True, "refreshed": [], "errors": []}
        assert len(asked) == 2

    trio.run(main)
