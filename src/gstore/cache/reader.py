"""The read path: blocks from the on-disk cache, fetched once, read ahead when sequential.

A read is split into fixed-size blocks. A cached block is read straight from
its file (a pread on the trio thread: page-cache fast, cheaper than a thread
hop). A missing block is fetched with one ranged GET; concurrent readers of the
same block wait for that one fetch. Each open handle carries its own
:class:`ReadStream`, so two programs reading the same file do not spoil each
other's sequential detection. Sequential streams get a readahead window that
doubles each time the reader enters a new block, up to ``readahead`` bytes;
prefetches run in a mount-wide nursery and are never cancelled by a seek, so a
program that reads the head, jumps to the tail and comes back (ffprobe) keeps
what was already fetched. Random reads fetch only the blocks they touch.

Offline (the backend's circuit open), cached blocks are served as always: a
block's key is the object's identity (VersionId, ETag, size), so what is
served is exactly what the cache holds for the version the handle opened. A
missing block fails at once with EIO (no request is sent), and every fetch of
one ``read`` shares one ``--request-timeout``
(:func:`~gstore.backends.resilience.request_scope`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
from dataclasses import dataclass, field

import trio

from gstore.backends.base import ObjectInfo, ReadingBackend
from gstore.backends.resilience import request_scope
from gstore.cache.blockstore import BlockStore
from gstore.errors import BackendError, is_transient

log = logging.getLogger(__name__)

FAILURE_MEMORY = 0.5  # seconds a block whose fetch failed for good fails at once


def object_cache_key(backend_key: str, identity: str) -> str:
    """The block store key of one version of one object."""
    return hashlib.sha256(f"{backend_key}\0{identity}".encode("utf-8", "surrogateescape")).hexdigest()[:40]


@dataclass(slots=True)
class ReadStream:
    """Per-handle read state: which version is read and how sequentially."""

    path: str
    info: ObjectInfo
    cache_key: str
    next_offset: int = 0  # where a sequential reader would read next
    window: int = 0  # readahead window in blocks (0: random access)
    last_block: int = -1
    prefetched_to: int = -1  # highest block index already scheduled for prefetch
    sequential_hits: int = 0


@dataclass
class ReaderStats:
    bytes_fetched: int = 0
    fetches: int = 0
    prefetches: int = 0
    hit_bytes: int = 0
    miss_bytes: int = 0
    fetch_errors: int = 0


@dataclass
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


class BlockReader:
    """Serves reads of remote objects through the block store."""

    def __init__(
        self,
        store: BlockStore,
        backend: ReadingBackend,
        *,
        block_size: int,
        readahead: int,
        fetch_concurrency: int,
    ) -> None:
        self._store = store
        self._backend = backend
        self.block_size = block_size
        self._max_window = max(0, readahead // block_size)
        self._fetch_limiter = trio.CapacityLimiter(max(1, fetch_concurrency))
        # Prefetch may use at most this many of the fetch slots, so demand reads
        # of another program are never stuck behind someone's readahead.
        self._prefetch_limiter = trio.CapacityLimiter(max(1, fetch_concurrency * 3 // 4))
        self._inflight: dict[tuple[str, int], _Fetch] = {}
        # Blocks whose fetch just failed for good (retries spent): the kernel retries a
        # failed read at once with a smaller request, which must not cost a second
        # --request-timeout. (key, index) -> (error, trio time until which it stands).
        self._recent_failures: dict[tuple[str, int], tuple[OSError, float]] = {}
        self._nursery: trio.Nursery | None = None
        self.stats = ReaderStats()

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the reader the nursery its prefetch tasks live in."""
        self._nursery = nursery

    def open_stream(self, path: str, info: ObjectInfo) -> ReadStream:
        key = object_cache_key(self._backend.cache_key(path), info.identity)
        return ReadStream(path=path, info=info, cache_key=key)

    # -- reads ---------------------------------------------------------------------

    async def read(self, stream: ReadStream, offset: int, size: int) -> bytes:
        total = stream.info.size
        if offset >= total or size <= 0:
            return b""
        end = min(total, offset + size)
        first, last = offset // self.block_size, (end - 1) // self.block_size
        self._track_pattern(stream, offset, end, first, last)

        pieces: list[bytes] = []
        with request_scope():  # a read spanning blocks waits one --request-timeout at most
            for index in range(first, last + 1):
                block_start = index * self.block_size
                lo = max(offset, block_start) - block_start
                hi = min(end, block_start + self.block_size) - block_start
                pieces.append(await self._read_block(stream, index, lo, hi))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _read_block(self, stream: ReadStream, index: int, lo: int, hi: int) -> bytes:
        expected = self._block_len(stream.info, index)
        data = self._store.read(stream.cache_key, index, lo, hi - lo, expected)
        if data is not None:
            self.stats.hit_bytes += len(data)
            return data
        self.stats.miss_bytes += hi - lo
        block = await self._fetch(stream, index)
        return block[lo:hi]

    def _block_len(self, info: ObjectInfo, index: int) -> int:
        start = index * self.block_size
        return max(0, min(self.block_size, info.size - start))

    # -- fetching ------------------------------------------------------------------

    async def _fetch(self, stream: ReadStream, index: int) -> bytes:
        """The block's bytes, fetched once however many readers want them."""
        key = (stream.cache_key, index)
        failed = self._recent_failures.get(key)
        if failed is not None:
            if failed[1] > trio.current_time():
                error = failed[0]
                raise BackendError(error.errno or errno.EIO, f"{error} (reported again)", transient=True)
            del self._recent_failures[key]
        running = self._inflight.get(key)
        if running is not None:
            await running.done.wait()
            if running.data is not None:
                return running.data
            # That fetch failed or was cancelled; its error belongs to its own
            # caller (never re-raise another task's Cancelled): try again here.
            return await self._fetch(stream, index)
        job = _Fetch()
        self._inflight[key] = job
        try:
            job.data = await self._download(stream, index)
            return job.data
        except BaseException as exc:
            job.error = exc
            if isinstance(exc, OSError) and is_transient(exc):
                self._remember_failure(key, exc)
            raise
        finally:
            del self._inflight[key]
            job.done.set()

    def _remember_failure(self, key: tuple[str, int], exc: OSError) -> None:
        now = trio.current_time()
        if len(self._recent_failures) >= 1024:
            self._recent_failures = {k: v for k, v in self._recent_failures.items() if v[1] > now}
        self._recent_failures[key] = (exc, now + FAILURE_MEMORY)

    async def _download(self, stream: ReadStream, index: int) -> bytes:
        start = index * self.block_size
        end = start + self._block_len(stream.info, index)
        async with self._fetch_limiter:
            data = await self._backend.read_range(stream.path, start, end, stream.info)
        if len(data) != end - start:
            # Whatever the backend layer did, a short body never becomes a cached block.
            self.stats.fetch_errors += 1
            raise BackendError(errno.EIO, f"short read of block {index} of {stream.path}: "
                               f"{len(data)} of {end - start} bytes", transient=True)
        self.stats.fetches += 1
        self.stats.bytes_fetched += len(data)
        try:
            await trio.to_thread.run_sync(self._store.put, stream.cache_key, index, data)
        except OSError as exc:
            # The bytes are good; only keeping them failed (cache disk full...).
            log.warning("could not cache block %d of %s: %s", index, stream.path, exc)
        return data

    # -- access pattern and readahead ---------------------------------------------

    def _track_pattern(self, stream: ReadStream, offset: int, end: int, first: int, last: int) -> None:
        # The kernel issues its own readahead requests concurrently, so a
        # sequential stream may arrive slightly out of order: allow one block of slack.
        sequential = stream.next_offset > 0 and abs(offset - stream.next_offset) <= self.block_size
        if offset == 0 and stream.next_offset == 0:
            sequential = True
        if sequential:
            stream.sequential_hits += 1
            if last > stream.last_block:
                # Entering a new block while streaming: widen the window.
                stream.window = 1 if stream.window == 0 else min(self._max_window, stream.window * 2)
        else:
            stream.sequential_hits = 0
            stream.window = 0
            stream.prefetched_to = last
        stream.next_offset = max(end, stream.next_offset if sequential else end)
        stream.last_block = max(last, stream.last_block) if sequential else last
        if stream.window and stream.sequential_hits >= 2:
            self._schedule_prefetch(stream, last)

    def _schedule_prefetch(self, stream: ReadStream, last: int) -> None:
        if self._nursery is None or self._max_window == 0:
            return
        final_block = (stream.info.size - 1) // self.block_size
        target = min(final_block, last + stream.window)
        start = max(last + 1, stream.prefetched_to + 1)
        for index in range(start, target + 1):
            if self._store.contains(stream.cache_key, index) or (stream.cache_key, index) in self._inflight:
                continue
            self.stats.prefetches += 1
            self._nursery.start_soon(self._prefetch_one, stream, index)
        stream.prefetched_to = max(stream.prefetched_to, target)

    async def _prefetch_one(self, stream: ReadStream, index: int) -> None:
        # The prefetch takes its slot *before* it registers as in flight, so a
        # demand read of a block still waiting for a slot fetches it itself
        # instead of queueing behind every other prefetch.
        async with self._prefetch_limiter:
            if self._store.contains(stream.cache_key, index) or (stream.cache_key, index) in self._inflight:
                return
            try:
                await self._fetch(stream, index)
            except Exception as exc:  # noqa: BLE001 - a demand read will retry and report
                self.stats.fetch_errors += 1
                log.debug("prefetch of block %d of %s failed: %s", index, stream.path, exc)
