"""The cache-hit read path (what fuse_ops.Operations.read tries before any await) against
the changes that must take it out of play: a write through another descriptor, and blocks
evicted or replaced under an open reader. Each test first shows the fast path answering,
so a fast path that stopped working could not pass them by never being used."""

from __future__ import annotations

import os

from .conftest import open_core

BLOCK = 4096  # default_options: small blocks


def hit(h, k, fd: int, offset: int, size: int) -> bytes | None:
    """What the FUSE adapter's cache-hit path answers for this descriptor, without the slow path."""
    return h.fs.handle_at(k._file(fd).fh).read_cached(offset, size)  # noqa: SLF001


async def test_a_cached_read_follows_a_write_through_another_descriptor(tmp_path):
    old = bytes(range(256)) * 64  # 4 blocks
    async with open_core(tmp_path, seed_files={"f": old}) as h:
        k = h.kernel
        reader = await k.open("f", os.O_RDONLY)
        assert await k.pread(reader, len(old), 0) == old
        assert hit(h, k, reader, 100, 200) == old[100:300]  # cached: the fast path answers
        writer = await k.open("f", os.O_WRONLY)
        await k.pwrite(writer, b"new!" * 10, 120)
        assert hit(h, k, reader, 100, 200) is None  # staged now: never the cached old bytes
        want = old[:120] + b"new!" * 10 + old[160:]
        assert await k.pread(reader, 200, 100) == want[100:300]
        await k.close(writer)
        await k.close(reader)


async def test_a_cached_read_of_an_evicted_block_is_fetched_again(tmp_path):
    data = os.urandom(6 * BLOCK)
    async with open_core(tmp_path, seed_files={"f": data}) as h:
        k = h.kernel
        fd = await k.open("f", os.O_RDONLY)
        assert await k.pread(fd, len(data), 0) == data
        assert hit(h, k, fd, BLOCK + 5, 100) == data[BLOCK + 5: BLOCK + 105]
        h.core.store.reserve(h.core.store.capacity)  # evicts every block (their fds too)
        assert hit(h, k, fd, BLOCK + 5, 100) is None
        h.core.store.reserve(0)
        assert await k.pread(fd, 100, BLOCK + 5) == data[BLOCK + 5: BLOCK + 105]  # fetched again
        assert hit(h, k, fd, BLOCK + 300, 100) == data[BLOCK + 300: BLOCK + 400]
        assert hit(h, k, fd, 2 * BLOCK - 50, 100) is None  # block 2 is not back yet
        await k.close(fd)
