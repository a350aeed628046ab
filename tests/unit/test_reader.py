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
