"""BlockReader against an in-process fake backend and a real on-disk BlockStore."""

from __future__ import annotations

import random

import trio

from gstore.backends.base import ObjectInfo, feed_sink
from gstore.cache.blockstore import BlockStore
from gstore.cache.reader import BlockReader

BS = 64 * 1024


class RangeBackend:
    cache_namespace = "fake"

    def __init__(self, objects: dict[str, bytes], delay: float = 0.0) -> None:
        self.objects = objects
        self.delay = delay
        self.requests: list[tuple[str, int, int]] = []

    def cache_key(self, path: str) -> str:
        return f"fake|{path}"

    async def read_range(self, path, start, end, expect):
        self.requests.append((path, start, end))
        await trio.sleep(self.delay)
        return self.objects[path][start:end]

    async def read_range_into(self, path, start, end, expect, sink):
        # Through read_range (as the fsspec backend does), so subclasses that fail it fail both.
        feed_sink(sink, await self.read_range(path, start, end, expect))


def make(tmp_path, objects, *, readahead=8 * BS, capacity=64 * BS, delay=0.0):
    backend = RangeBackend(objects, delay)
    store = BlockStore(tmp_path / "blocks", capacity)
    reader = BlockReader(store, backend, block_size=BS, readahead=readahead, fetch_concurrency=8)
    return backend, store, reader


def info_for(data: bytes, etag: str = "e1") -> ObjectInfo:
    return ObjectInfo("f", False, size=len(data), etag=etag)


def test_reads_at_any_offset_return_exact_bytes(tmp_path):
    data = random.Random(1).randbytes(10 * BS + 77)

    async def main():
        backend, store, reader = make(tmp_path, {"f": data}, readahead=0)
        stream = reader.open_stream("f", info_for(data))
        rng = random.Random(2)
        for _ in range(200):
            off = rng.randrange(0, len(data) + 10)
            size = rng.choice([1, 100, 4096, BS, 3 * BS + 5])
            assert await reader.read(stream, off, size) == data[off : off + size]
        # every block fetched at most once
        assert len(backend.requests) == len(set(backend.requests)) <= 11

    trio.run(main)


def test_sequential_stream_prefetches_and_random_does_not(tmp_path):
    data = bytes(range(256)) * (40 * BS // 256)

    async def main():
        backend, store, reader = make(tmp_path, {"f": data, "g": data})
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            seq = reader.open_stream("f", info_for(data))
            for off in range(0, 4 * BS, 16 * 1024):
                assert await reader.read(seq, off, 16 * 1024) == data[off : off + 16 * 1024]
            # Prefetches run in the background: wait for them (bounded), not a fixed time.
            with trio.move_on_after(10):
                while max((e - 1) // BS for p, _, e in backend.requests if p == "f") <= 4:
                    await trio.sleep(0.01)
            # Readahead may fetch several blocks with one GET: count up to each request's end.
            fetched_f = {(e - 1) // BS for p, _, e in backend.requests if p == "f"}
            assert max(fetched_f) > 4, "sequential reading should have prefetched ahead"

            rnd = reader.open_stream("g", info_for(data, "e2"))
            for block in (30, 3, 17, 9):
                await reader.read(rnd, block * BS + 10, 100)
            await trio.sleep(0.05)
            fetched_g = sorted(s // BS for p, s, _ in backend.requests if p == "g")
            assert fetched_g == [3, 9, 17, 30]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_concurrent_readers_share_one_fetch_per_block(tmp_path):
    data = random.Random(3).randbytes(8 * BS)

    async def main():
        backend, store, reader = make(tmp_path, {"f": data}, readahead=0, delay=0.02)
        results = []

        async def one():
            stream = reader.open_stream("f", info_for(data))
            results.append(await reader.read(stream, 2 * BS, 2 * BS))

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
        assert all(r == data[2 * BS : 4 * BS] for r in results)
        assert sorted(backend.requests) == [("f", 2 * BS, 3 * BS), ("f", 3 * BS, 4 * BS)]

    trio.run(main)


def test_new_identity_never_reads_old_blocks(tmp_path):
    old = b"a" * (2 * BS)
    new = b"b" * (2 * BS)

    async def main():
        backend, store, reader = make(tmp_path, {"f": old}, readahead=0)
        s1 = reader.open_stream("f", info_for(old, "v1"))
        assert await reader.read(s1, 0, 10) == b"a" * 10
        backend.objects["f"] = new
        s2 = reader.open_stream("f", info_for(new, "v2"))
        assert await reader.read(s2, 0, 10) == b"b" * 10

    trio.run(main)


def test_backend_error_propagates_and_is_not_cached(tmp_path):
    data = b"x" * BS

    class Flaky(RangeBackend):
        fail = True

        async def read_range(self, path, start, end, expect):
            if self.fail:
                self.fail = False
                raise OSError(5, "boom")
            return await super().read_range(path, start, end, expect)

    async def main():
        backend = Flaky({"f": data})
        store = BlockStore(tmp_path / "b", 16 * BS)
        reader = BlockReader(store, backend, block_size=BS, readahead=0, fetch_concurrency=2)
        stream = reader.open_stream("f", info_for(data))
        try:
            await reader.read(stream, 0, 10)
        except OSError as exc:
            assert exc.errno == 5
        else:
            raise AssertionError("error swallowed")
        assert await reader.read(stream, 0, 10) == b"x" * 10

    trio.run(main)


def test_blocks_found_after_a_reboot_are_checked_once_off_the_trio_thread(tmp_path, monkeypatch):
    """After a reboot every block found on disk is unverified: its CRC is checked by
    reading it whole. That must happen in a worker thread (a 4 MiB disk read on the
    trio thread stalls every request) and once per block, however many reads of it
    the kernel sends at once; a corrupt block is fetched again, never served."""
    import threading

    from gstore.cache import blockstore

    data = random.Random(5).randbytes(4 * BS)
    root = tmp_path / "blocks"

    async def fill():
        backend = RangeBackend({"f": data})
        store = BlockStore(root, 64 * BS, boot_id=lambda: "boot-1")
        reader = BlockReader(store, backend, block_size=BS, readahead=0, fetch_concurrency=8)
        stream = reader.open_stream("f", info_for(data))
        assert await reader.read(stream, 0, len(data)) == data
        store.close()
        return stream.cache_key

    key = trio.run(fill)
    # Damage block 3 in place, same length: only its CRC can tell.
    (victim,) = list(root.glob(f"*/{key}.3.*"))
    raw = bytearray(victim.read_bytes())
    raw[7] ^= 0xFF
    victim.write_bytes(bytes(raw))

    whole_reads: list[tuple[int, str]] = []
    real_pread_exact = blockstore._pread_exact

    def recording_pread_exact(fd, length, offset):
        if length == BS:
            whole_reads.append((offset, threading.current_thread().name))
        return real_pread_exact(fd, length, offset)

    monkeypatch.setattr(blockstore, "_pread_exact", recording_pread_exact)

    async def after_reboot():
        backend = RangeBackend({"f": data})
        store = BlockStore(root, 64 * BS, boot_id=lambda: "boot-2")
        reader = BlockReader(store, backend, block_size=BS, readahead=0, fetch_concurrency=8)
        stream = reader.open_stream("f", info_for(data))
        assert reader.read_cached(stream, 0, 4096) is None, "unverified: the fast path must not check it"
        results = []

        async def one(offset):
            results.append((offset, await reader.read(stream, offset, 4096)))

        async with trio.open_nursery() as nursery:
            for block in range(4):
                for part in range(4):
                    nursery.start_soon(one, block * BS + part * 4096)
        for offset, got in results:
            assert got == data[offset:offset + 4096]
        assert backend.requests == [("f", 3 * BS, 4 * BS)], "only the corrupt block is fetched again"
        assert reader.read_cached(stream, BS, 4096) == data[BS:BS + 4096], "verified: a fast-path hit"
        store.close()

    trio.run(after_reboot)
    main = threading.main_thread().name
    assert whole_reads and all(thread != main for _offset, thread in whole_reads)
    # Each block read whole once (the kernel-like burst of 4 reads per block shares one check).
    assert sorted(offset for offset, _ in whole_reads) == [0, 0, 0, 0]
    assert len(whole_reads) == 4
