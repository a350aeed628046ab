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
what was already fetched. Readahead fetches runs of consecutive blocks, one
ranged GET each, streamed from the socket into the blocks' files
(:class:`_RunSink`), so the bytes in flight cost no memory; a demand fetch keeps
its one block in memory, since its reader wants the bytes at once. Random reads
fetch only the blocks they touch, until they turn out dense: once one handle has missed ``max(DENSE_MIN_MISSES,
blocks / DENSE_FRACTION)`` distinct blocks of an object that fits in a quarter
of the cache (fio, a database scanning its file), the rest of the object is
fetched in the background, DENSE_PARALLEL blocks at a time, in the prefetch
slots: one GET stream per block is then cheaper than a miss, and a wait, per
block.

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
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from gstore.backends.base import ObjectInfo, ReadingBackend
from gstore.backends.resilience import request_scope
from gstore.cache.blockstore import BlockStore
from gstore.errors import BackendError, is_transient

log = logging.getLogger(__name__)

FAILURE_MEMORY = 0.5  # seconds a block whose fetch failed for good fails at once
DENSE_MIN_MISSES = 8  # random misses of one handle before its object may count as dense
DENSE_FRACTION = 8  # ... and at least this fraction (1/N) of the object's blocks
DENSE_PARALLEL = 4  # GETs one background fill has in flight (within the prefetch slots)
# Bytes one readahead GET asks for: consecutive blocks of a sequential stream go in
# one ranged GET, streamed into the blocks' files as it lands (read_range_into), each
# block released to its readers as soon as it is complete. Each request costs a fixed
# amount of CPU (measured: ~3 ms of botocore request building, signing and parsing, a
# new connection on an endpoint that closes them), so fewer, larger GETs keep a cold
# stream at the wire on 2 cores; a run costs no memory (see PREFETCH_BYTES).
FETCH_RUN = 16 * 1024 * 1024
#: Readahead bytes requested and not yet landed, mount-wide: at most this many / FETCH_RUN
#: runs in flight (4). Not memory: a run's bytes go from the socket to the block files,
#: so a GET in flight holds only its receive buffer (backends.s3.STREAM_BUFFER, 2 MiB at
#: most). Several streams keep a store whose per-connection bandwidth is capped (real S3,
#: ``scripts/bench --bandwidth``) busy; the readahead window (--readahead) bounds it too.
PREFETCH_BYTES = 64 * 1024 * 1024


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
    random_misses: int = 0  # blocks fetched on demand outside a sequential run


@dataclass
class ReaderStats:
    bytes_fetched: int = 0
    fetches: int = 0
    prefetches: int = 0
    hit_bytes: int = 0
    miss_bytes: int = 0
    fetch_errors: int = 0
    dense_fills: int = 0  # objects fetched whole in the background after dense random reads


@dataclass
class _Fetch:
    """One block being fetched; waiters wake on ``done``. Trio thread only."""

    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None  # a demand fetch: the block's bytes
    stored: bool = False  # a readahead run: the block is in the store, read it there
    error: BaseException | None = None


class _RunSink:
    """Splits the byte stream of one readahead run into its blocks' files in the store.

    Each piece goes straight from the HTTP receive buffer to the block's temp file,
    its CRC updated on the way (``zlib.crc32(piece, crc)``): no join, no second
    buffer, one pass over the bytes besides the write. A block is put in the store
    (:meth:`BlockStore.put_temp`: length checked, then renamed) the moment its last
    byte is written, and ``landed(index)`` is called.

    Concurrency: ``write`` runs on whichever thread receives the body (for S3 the
    asyncio loop thread), one call at a time; ``landed`` must therefore only hand
    over (``TrioToken.run_sync_soon``). The trio task that owns the run touches the
    sink only after ``read_range_into`` returned or raised, when no write runs or
    will run (``SinkGate``): then :meth:`close` discards a partial block, so a
    fetch that fails mid-stream never leaves one in the store.

    A block whose file cannot be written (disk full, I/O error) is dropped, not
    kept in memory: its waiters fetch it for themselves (``BlockReader._fetch``),
    through ``BlockStore.put`` which makes room when the disk is full.
    """

    def __init__(self, store: BlockStore, key: str, first: int, lengths: list[int],
                 landed: Callable[[int], None]) -> None:
        self._store = store
        self._key = key
        self._first = first
        self._lengths = lengths
        self._landed = landed
        self._index = first  # the block the next byte belongs to
        self._filled = 0  # bytes of that block received
        self._fd = -1  # its temp file (-1: not opened yet, or dropped)
        self._tmp = ""
        self._crc = 0
        self._dropped = False  # writing it failed: its remaining bytes are skipped
        self.stored: list[int] = []  # blocks put in the store, in order

    def write(self, piece: bytes | memoryview) -> None:
        view = memoryview(piece)
        while view:
            if self._index - self._first >= len(self._lengths):
                raise ValueError(f"more bytes than the {len(self._lengths)} blocks of the run")
            length = self._lengths[self._index - self._first]
            part = view[: length - self._filled]
            view = view[len(part):]
            if not self._dropped:
                self._write_part(part)
            self._filled += len(part)
            if self._filled == length:
                self._end_block(length)

    def close(self) -> None:
        """Discard a partially written block (the run ended early); idempotent."""
        self._discard()

    def _write_part(self, part: memoryview) -> None:
        try:
            if self._fd < 0:
                self._fd, self._tmp = self._store.new_temp(self._key)
            self._crc = zlib.crc32(part, self._crc)
            while part:
                part = part[os.write(self._fd, part):]
        except OSError as exc:
            log.warning("could not cache block %d (%s): %s", self._index, self._key, exc)
            self._discard()
            self._dropped = True

    def _end_block(self, length: int) -> None:
        """The block's last byte is written: put it in the store, then start the next one."""
        index, fd, tmp, crc, dropped = self._index, self._fd, self._tmp, self._crc, self._dropped
        self._index += 1
        self._filled, self._fd, self._tmp, self._crc, self._dropped = 0, -1, "", 0, False
        if dropped:
            return
        try:
            os.close(fd)
        except OSError as exc:
            log.warning("could not cache block %d (%s): %s", index, self._key, exc)
            _unlink_quietly(tmp)
            return
        try:
            kept = self._store.put_temp(self._key, index, tmp, length, crc)
        except (OSError, ValueError) as exc:
            log.warning("could not cache block %d (%s): %s", index, self._key, exc)
            return
        if kept:
            self.stored.append(index)
            self._landed(index)

    def _discard(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            _unlink_quietly(self._tmp)
        self._fd, self._tmp = -1, ""


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("could not remove the partial block %s: %s", path, exc)


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
        self._run_blocks = max(1, FETCH_RUN // block_size)
        # Prefetch may use at most this many of the fetch slots, so demand reads
        # of another program are never stuck behind someone's readahead; each slot
        # carries a run of up to _run_blocks blocks.
        by_slots = max(1, fetch_concurrency * 3 // 4)
        by_bytes = max(2, PREFETCH_BYTES // (self._run_blocks * block_size))
        self._prefetch_limiter = trio.CapacityLimiter(min(by_slots, by_bytes))
        self._inflight: dict[tuple[str, int], _Fetch] = {}
        # Blocks whose fetch just failed for good (retries spent): the kernel retries a
        # failed read at once with a smaller request, which must not cost a second
        # --request-timeout. (key, index) -> (error, trio time until which it stands).
        self._recent_failures: dict[tuple[str, int], tuple[OSError, float]] = {}
        self._nursery: trio.Nursery | None = None
        # Objects (cache keys) being fetched whole in the background: one fill each.
        self._filling: set[str] = set()
        # Blocks found at startup whose CRC a worker thread is checking (after a
        # reboot): the kernel sends several reads of one block at once, and the
        # first checks it while the others wait on its event, so a block is read
        # whole once, off the trio thread. Only changed on the trio thread.
        self._verifying: dict[tuple[str, int], trio.Event] = {}
        self.stats = ReaderStats()

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the reader the nursery its prefetch tasks live in."""
        self._nursery = nursery

    def open_stream(self, path: str, info: ObjectInfo) -> ReadStream:
        key = object_cache_key(self._backend.cache_key(path), info.identity)
        return ReadStream(path=path, info=info, cache_key=key)

    # -- reads ---------------------------------------------------------------------

    def read_cached(self, stream: ReadStream, offset: int, size: int) -> bytes | None:
        """The bytes if every block they touch is in the store, else None (and nothing recorded).

        The cache-hit path, called by the FUSE adapter before anything async: an
        index lookup and one ``pread`` per block on an fd the store keeps open; no
        ``await``, so no task switch, and no allocation but the reply (one block:
        the pread's own bytes object). A None costs nothing but the lookups: the
        caller then awaits :meth:`read`, which records the access once.
        """
        # Written for the interpreter: every builtin call (min, max) and lookup here is
        # paid on each cached read.
        total = stream.info.size
        end = offset + size
        if end > total:
            end = total
        if offset >= end:
            return None  # EOF, an empty read: the slow path answers them
        bs = self.block_size
        first = offset // bs
        start = first * bs
        if end - start <= bs:  # one block: nearly every read (the kernel asks at most 1 MiB)
            expected = total - start
            if expected > bs:
                expected = bs
            data = self._store.read_hit(stream.cache_key, first, offset - start, end - offset, expected)
            if data is None:
                data = self._store.read(stream.cache_key, first, offset - start, end - offset, expected,
                                        count_miss=False, verify=False)
                if data is None:
                    return None
            last = first
        else:
            last = (end - 1) // bs
            data = self._read_cached_blocks(stream, offset, end, first, last)
            if data is None:
                return None
        self.stats.hit_bytes += len(data)
        self._track_pattern(stream, offset, end, first, last)
        return data

    def _read_cached_blocks(
        self, stream: ReadStream, offset: int, end: int, first: int, last: int,
    ) -> bytes | None:
        """read_cached() of a range over several blocks: all of them cached, or None."""
        store = self._store
        key = stream.cache_key
        bs = self.block_size
        total = stream.info.size
        for index in range(first, last + 1):
            if not store.contains(key, index):
                return None
        pieces: list[bytes] = []
        for index in range(first, last + 1):
            start = index * bs
            piece = store.read(key, index, max(offset, start) - start, min(end, start + bs) - max(offset, start),
                               min(bs, total - start), verify=False)
            if piece is None:
                return None  # gone since contains(): the slow path fetches it
            pieces.append(piece)
        return b"".join(pieces)

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
        data = self._store.read(stream.cache_key, index, lo, hi - lo, expected, verify=False)
        if data is None and self._store.contains(stream.cache_key, index):
            data = await self._checked_read(stream.cache_key, index, lo, hi - lo, expected)
        if data is not None:
            self.stats.hit_bytes += len(data)
            return data
        self.stats.miss_bytes += hi - lo
        if stream.window == 0:
            stream.random_misses += 1
            self._maybe_fill(stream)
        block = await self._fetch(stream, index)
        if block is None:  # a readahead run put it in the store: read it there
            data = self._store.read(stream.cache_key, index, lo, hi - lo, expected, count_miss=False)
            if data is not None:
                return data
            # Evicted already (a cache smaller than the readahead): fetch it for this read.
            block = await self._fetch(stream, index, stored_will_do=False)
            assert block is not None
        return block[lo:hi]

    async def _checked_read(self, key: str, index: int, offset: int, length: int, expected: int) -> bytes | None:
        """A read of a block still to be verified: its CRC is checked in a worker thread.

        Checking reads the whole block (4 MiB, a disk read after a reboot); on the
        trio thread that would stall every other request. One task checks, the
        others wait for it and then read the verified block with a pread. None: the
        block turned out corrupt or vanished (a miss; the caller fetches it).
        """
        k = (key, index)
        while True:
            running = self._verifying.get(k)
            if running is None:
                done = self._verifying[k] = trio.Event()
                try:
                    return await trio.to_thread.run_sync(
                        lambda: self._store.read(key, index, offset, length, expected))
                finally:
                    del self._verifying[k]
                    done.set()
            await running.wait()
            data = self._store.read(key, index, offset, length, expected, verify=False, count_miss=False)
            if data is not None or not self._store.contains(key, index):
                return data
            # Still there and unverified (the checker's open failed, e.g. EMFILE): check it ourselves.

    def _block_len(self, info: ObjectInfo, index: int) -> int:
        start = index * self.block_size
        return max(0, min(self.block_size, info.size - start))

    # -- fetching ------------------------------------------------------------------

    async def _fetch(self, stream: ReadStream, index: int, *, stored_will_do: bool = True) -> bytes | None:
        """The block, fetched once however many readers want it: its bytes, or None when a
        readahead run put it in the store (``stored_will_do``; else fetched again)."""
        key = (stream.cache_key, index)
        while True:
            failed = self._recent_failures.get(key)
            if failed is not None:
                if failed[1] > trio.current_time():
                    error = failed[0]
                    raise BackendError(error.errno or errno.EIO, f"{error} (reported again)", transient=True)
                del self._recent_failures[key]
            running = self._inflight.get(key)
            if running is None:
                break
            await running.done.wait()
            if running.data is not None:
                return running.data
            if running.stored and stored_will_do:
                return None
            # That fetch failed, was cancelled, or could not keep the block; its error
            # belongs to its own caller (never re-raise another task's Cancelled): look again.
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
            self._finish(key[0], index, job)

    def _remember_failure(self, key: tuple[str, int], exc: OSError) -> None:
        now = trio.current_time()
        if len(self._recent_failures) >= 1024:
            self._recent_failures = {k: v for k, v in self._recent_failures.items() if v[1] > now}
        self._recent_failures[key] = (exc, now + FAILURE_MEMORY)

    async def _download(self, stream: ReadStream, index: int) -> bytes:
        """A demand fetch: the block's bytes in memory, for the reader waiting on them (a
        slice is its reply), and put in the store in a worker thread."""
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
        # The random case is the short branch: it runs on every cached random read.
        expected = stream.next_offset
        bs = self.block_size
        if (expected > 0 and -bs <= offset - expected <= bs) or (offset == 0 and expected == 0):
            self._track_sequential(stream, end, last)
        else:
            stream.sequential_hits = stream.window = 0
            stream.prefetched_to = stream.last_block = last
            stream.next_offset = end

    def _track_sequential(self, stream: ReadStream, end: int, last: int) -> None:
        """One more read of a sequential stream: widen the window, prefetch when it is due."""
        stream.sequential_hits += 1
        if last > stream.last_block:
            # Entering a new block while streaming: widen the window.
            stream.window = 1 if stream.window == 0 else min(self._max_window, stream.window * 2)
            stream.last_block = last
        if end > stream.next_offset:
            stream.next_offset = end
        if stream.window and stream.sequential_hits >= 2:
            self._schedule_prefetch(stream, last)

    def _schedule_prefetch(self, stream: ReadStream, last: int) -> None:
        if self._nursery is None or self._max_window == 0:
            return
        final_block = (stream.info.size - 1) // self.block_size
        target = min(final_block, last + stream.window)
        start = max(last + 1, stream.prefetched_to + 1)
        if target < final_block and target - start + 1 < min(self._run_blocks, stream.window):
            return  # wait until a whole run is due: one GET per run, not one per block
        for first, run_last in self._runs(stream, start, target):
            self.stats.prefetches += run_last - first + 1
            self._nursery.start_soon(self._prefetch_run, stream, first, run_last)
        stream.prefetched_to = max(stream.prefetched_to, target)

    def _missing(self, stream: ReadStream, index: int) -> bool:
        return not self._store.contains(stream.cache_key, index) and (stream.cache_key, index) not in self._inflight

    def _runs(self, stream: ReadStream, first: int, last: int) -> list[tuple[int, int]]:
        """Missing blocks of [first, last] as runs of consecutive blocks, each one GET."""
        runs: list[tuple[int, int]] = []
        for index in range(first, last + 1):
            if not self._missing(stream, index):
                continue
            if runs and runs[-1][1] == index - 1 and index - runs[-1][0] < self._run_blocks:
                runs[-1] = (runs[-1][0], index)
            else:
                runs.append((index, index))
        return runs

    async def _prefetch_run(self, stream: ReadStream, first: int, last: int) -> None:
        # The prefetch takes its slot *before* it registers as in flight, so a
        # demand read of a block still waiting for a slot fetches it itself
        # instead of queueing behind every other prefetch.
        async with self._prefetch_limiter:
            while True:
                # What is still missing *now*: no await between this look and the
                # registration at the top of _fetch_run.
                runs = self._runs(stream, first, last)
                if not runs:
                    return
                run_first, run_last = runs[0]
                first = run_last + 1
                try:
                    await self._fetch_run(stream, run_first, run_last)
                except Exception as exc:  # noqa: BLE001 - a demand read will retry and report
                    self.stats.fetch_errors += 1
                    log.debug("prefetch of blocks %d-%d of %s failed: %s", run_first, run_last, stream.path, exc)

    async def _fetch_run(self, stream: ReadStream, first: int, last: int) -> None:
        """Blocks first..last with one ranged GET streamed into their files (:class:`_RunSink`),
        each in flight (demand reads wait for it) from the start and released to its
        waiters as soon as it is in the store.

        Trio tasks interleave at every await: the blocks are registered in
        ``_inflight`` before the first one, and each entry is removed only by
        this task and only while it is still this task's job. The sink reports a
        landed block from the receiving thread through ``run_sync_soon``, so
        ``_landed`` runs here on the trio thread; the sweep after the GET covers
        the reports still queued then (``_landed`` ignores a job already done).
        """
        key = stream.cache_key
        jobs = {index: _Fetch() for index in range(first, last + 1)}
        for index, job in jobs.items():
            self._inflight[(key, index)] = job
        lengths = [self._block_len(stream.info, index) for index in jobs]
        start = first * self.block_size
        end = start + sum(lengths)
        token = trio.lowlevel.current_trio_token()

        def landed(index: int) -> None:  # on the receiving thread: hand over only
            try:
                token.run_sync_soon(self._landed, key, index, jobs[index])
            except trio.RunFinishedError:
                pass

        sink = _RunSink(self._store, key, first, lengths, landed)
        failure: BaseException | None = None
        try:
            async with self._fetch_limiter:
                await self._backend.read_range_into(stream.path, start, end, stream.info, sink)
            self.stats.fetches += 1
            self.stats.bytes_fetched += end - start
        except BaseException as exc:
            failure = exc
            raise
        finally:
            # read_range_into has returned or raised: no write runs or will run any more.
            sink.close()  # a partial block is dropped, never stored
            for index in sink.stored:  # those landed before a failure are good blocks
                self._landed(key, index, jobs[index])
            for index, job in jobs.items():
                if not job.done.is_set():
                    if failure is not None:
                        job.error = failure
                        if isinstance(failure, OSError) and is_transient(failure):
                            self._remember_failure((key, index), failure)
                    self._finish(key, index, job)

    def _landed(self, key: str, index: int, job: _Fetch) -> None:
        """Block ``index`` of a run is in the store: wake its waiters (trio thread)."""
        if not job.done.is_set():
            job.stored = True
            self._finish(key, index, job)

    def _finish(self, key: str, index: int, job: _Fetch) -> None:
        if self._inflight.get((key, index)) is job:
            del self._inflight[(key, index)]
        job.done.set()

    # -- dense random reads: the rest of the object in the background ----------------

    def _maybe_fill(self, stream: ReadStream) -> None:
        if self._nursery is None or self._max_window == 0 or stream.cache_key in self._filling:
            return
        size = stream.info.size
        blocks = (size + self.block_size - 1) // self.block_size
        if stream.random_misses < max(DENSE_MIN_MISSES, blocks // DENSE_FRACTION):
            return
        if size > self._store.capacity // 4:
            return  # fetching it whole would push most of the cache out
        self._filling.add(stream.cache_key)
        self.stats.dense_fills += 1
        log.debug("%s: dense random reads (%d blocks missed), fetching the other %d blocks in the background",
                  stream.path, stream.random_misses, blocks)
        self._nursery.start_soon(self._fill, stream)

    async def _fill(self, stream: ReadStream) -> None:
        """Fetch every block of the object not cached yet, DENSE_PARALLEL runs at a time."""
        slots = trio.Semaphore(DENSE_PARALLEL)

        async def one(first: int, last: int) -> None:
            try:
                await self._prefetch_run(stream, first, last)
            finally:
                slots.release()

        try:
            async with trio.open_nursery() as nursery:
                final_block = (stream.info.size - 1) // self.block_size
                for first in range(0, final_block + 1, self._run_blocks):
                    last = min(final_block, first + self._run_blocks - 1)
                    if not any(self._missing(stream, index) for index in range(first, last + 1)):
                        continue
                    await slots.acquire()
                    nursery.start_soon(one, first, last)
        finally:
            self._filling.discard(stream.cache_key)
