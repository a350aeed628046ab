"""BlockReader: the cache-hit fast path, readahead runs (one GET for several blocks), dense random fills,
and the block store's open fds. In-process fake backend, real on-disk BlockStore."""

from __future__ import annotations

import os
import random

import pytest
import trio

from gstore.cache import blockstore
from gstore.cache.blockstore import BlockStore
from gstore.cache.reader import BlockReader

from tests.unit.test_reader import BS, RangeBackend, info_for


def make(tmp_path, objects, *, readahead=64 * BS, capacity=256 * BS, delay=0.0, run=4 * BS):
    import gstore.cache.reader as reader_module

    backend = RangeBackend(objects, delay)
    store = BlockStore(tmp_path / "blocks", capacity)
    old = reader_module.FETCH_RUN
    reader_module.FETCH_RUN = run
    try:
        reader = BlockReader(store, backend, block_size=BS, readahead=readahead, fetch_concurrency=8)
    finally:
        reader_module.FETCH_RUN = old
    return backend, store, reader


def test_read_cached_is_none_on_a_miss_and_records_nothing(tmp_path):
    data = random.Random(1).randbytes(4 * BS)

    async def main():
        backend, store, reader = make(tmp_path, {"f": data}, readahead=0)
        stream = reader.open_stream("f", info_for(data))
        assert reader.read_cached(stream, 10, 100) is None
        assert (stream.next_offset, stream.window, backend.requests) == (0, 0, [])
        assert store.stats().misses == 0  # the slow path counts the miss, once
        assert await reader.read(stream, 10, 100) == data[10:110]
        assert store.stats().misses == 1
        # Now cached: exact bytes from the fast path, across blocks too, with no request.
        for off, size in [(10, 100), (BS - 5, 10), (0, 4 * BS), (3 * BS + 7, BS)]:
            await reader.read(stream, off, size)
            assert reader.read_cached(stream, off, size) == data[off : off + size]
        assert len(backend.requests) == 4

    trio.run(main)


def test_sequential_readahead_fetches_runs_of_blocks_with_exact_bytes(tmp_path):
    data = random.Random(2).randbytes(40 * BS + 123)

    async def main():
        backend, store, reader = make(tmp_path, {"f": data}, run=4 * BS)
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            stream = reader.open_stream("f", info_for(data))
            off = 0
            while off < len(data):
                got = reader.read_cached(stream, off, 32 * 1024)
                if got is None:
                    got = await reader.read(stream, off, 32 * 1024)
                assert got == data[off : off + 32 * 1024], off
                off += len(got)
            nursery.cancel_scope.cancel()
        sizes = [e - s for _, s, e in backend.requests]
        assert max(sizes) == 4 * BS, "readahead should ask for runs of blocks"
        assert all(size <= 4 * BS for size in sizes)
        # Every byte fetched once.
        covered = sorted((s, e) for _, s, e in backend.requests)
        assert sum(e - s for s, e in covered) == len(data)
        assert all(a[1] <= b[0] for a, b in zip(covered, covered[1:], strict=False))
        for index in range(41):
            assert store.read(reader_key(reader, stream), index, 0, BS, min(BS, len(data) - index * BS)) == \
                data[index * BS : (index + 1) * BS]

    trio.run(main)


def reader_key(reader, stream):
    return stream.cache_key


def test_demand_read_waits_for_the_run_in_flight_instead_of_fetching_again(tmp_path):
    data = random.Random(3).randbytes(16 * BS)

    async def main():
        backend, store, reader = make(tmp_path, {"f": data}, delay=0.05, run=8 * BS)
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            stream = reader.open_stream("f", info_for(data))
            nursery.start_soon(reader._prefetch_run, stream, 2, 9)  # noqa: SLF001
            await trio.sleep(0.01)
            other = reader.open_stream("f", info_for(data))
            assert await reader.read(other, 5 * BS + 3, 10) == data[5 * BS + 3 : 5 * BS + 13]
            nursery.cancel_scope.cancel()
        assert backend.requests == [("f", 2 * BS, 10 * BS)]

    trio.run(main)


def test_dense_random_reads_fill_the_object_sparse_ones_do_not(tmp_path):
    data = random.Random(4).randbytes(64 * BS)

    async def main():
        backend, store, reader = make(tmp_path, {"f": data, "g": data})
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            sparse = reader.open_stream("g", info_for(data, "g"))
            for block in (60, 2, 33, 17, 48, 9, 40):  # 7 < DENSE_MIN_MISSES
                assert await reader.read(sparse, block * BS + 1, 10) == data[block * BS + 1 : block * BS + 11]
            dense = reader.open_stream("f", info_for(data))
            for block in (60, 2, 33, 17, 48, 9, 40, 25):  # the eighth distinct miss: 64 / 8 = 8
                assert await reader.read(dense, block * BS + 1, 10) == data[block * BS + 1 : block * BS + 11]
            with trio.fail_after(30):
                while not all(store.contains(dense.cache_key, i) for i in range(64)):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert reader.stats.dense_fills == 1
        assert len([r for r in backend.requests if r[0] == "g"]) == 7
        fetched = sorted((s, e) for p, s, e in backend.requests if p == "f")
        assert sum(e - s for s, e in fetched) == len(data), "some block of the dense object was fetched twice"

    trio.run(main)


# -- the block store's open fds -----------------------------------------------------------------


def key(i: int) -> str:
    return f"{i:040x}"


def test_hits_reuse_one_open_fd_and_eviction_closes_it(tmp_path, monkeypatch):
    store = BlockStore(tmp_path, 3 * 100)
    store.put(key(1), 0, b"a" * 100)
    opens = []
    real_open = blockstore.os.open
    monkeypatch.setattr(blockstore.os, "open", lambda path, flags, *a: opens.append(path) or real_open(path, flags, *a))
    for i in range(50):
        assert store.read(key(1), 0, i, 10, 100) == b"a" * 10
    assert len(opens) == 1
    (fd_entry,) = store._open.values()  # noqa: SLF001
    fd = fd_entry.fd
    os.fstat(fd)
    for i in range(2, 6):
        store.put(key(i), 0, bytes([i]) * 100)  # evicts key(1)
    assert not store.contains(key(1), 0)
    with pytest.raises(OSError):  # closed with the block (no fd number was reused: puts close theirs)
        os.fstat(fd)


def test_replaced_block_is_never_served_from_the_old_fd(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(key(1), 0, b"a" * 100)
    assert store.read(key(1), 0, 0, 100, 100) == b"a" * 100
    store.put(key(1), 0, b"b" * 100)
    assert store.read(key(1), 0, 0, 100, 100) == b"b" * 100


def test_open_fds_are_bounded(tmp_path):
    store = BlockStore(tmp_path, 10_000, max_open=4)
    for i in range(20):
        store.put(key(i), 0, bytes([i]) * 10)
    for _round in range(3):
        for i in range(20):
            assert store.read(key(i), 0, 0, 10, 10) == bytes([i]) * 10
            assert len(store._open) <= 4  # noqa: SLF001
    store.close()
    assert store._open == {}  # noqa: SLF001
