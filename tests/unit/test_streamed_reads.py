"""Streamed range reads (``read_range_into``): socket -> block file -> reply.

The sink gate (no piece after the read gave up), the retry layer resuming where
the sink stopped, the reader's runs landing block by block without a partial
block ever in the store, the block store adopting a caller's temp file, and the
S3 backend against the local endpoint (pieces as received, versions pinned).
"""

from __future__ import annotations

import errno
import io
import os
import random
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gstore.backends import make_backend
from gstore.backends.base import ObjectInfo, SinkClosedError, SinkGate, feed_sink
from gstore.backends.resilience import ResiliencePolicy, ResilientBackend
from gstore.cache.blockstore import BlockStore
from gstore.cache.reader import BlockReader
from gstore.errors import BackendError, classify

from tests.unit.test_reader import BS, RangeBackend, info_for

MiB = 1024 * 1024
INFO = ObjectInfo(name="f", is_dir=False, size=100, etag="abc")


class Pieces:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.buffer = io.BytesIO()

    def write(self, piece: bytes | memoryview) -> None:
        self.sizes.append(len(piece))
        self.buffer.write(piece)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp.*")]


# -- the gate ----------------------------------------------------------------------------


def test_gate_passes_pieces_until_closed_then_refuses() -> None:
    sink = io.BytesIO()
    gate = SinkGate(sink)
    gate.write(b"abc")
    gate.close()
    with pytest.raises(SinkClosedError):
        gate.write(b"late")
    assert sink.getvalue() == b"abc"


def test_gate_close_waits_for_a_write_in_progress() -> None:
    """close() returning means the sink is the closer's again: a write under way finishes first."""
    entered, release = threading.Event(), threading.Event()
    finished: list[float] = []

    class Slow:
        def write(self, piece: bytes | memoryview) -> None:
            entered.set()
            release.wait(5)
            finished.append(time.monotonic())

    gate = SinkGate(Slow())
    writer = threading.Thread(target=gate.write, args=(b"x",))
    writer.start()
    assert entered.wait(5)
    threading.Timer(0.1, release.set).start()
    gate.close()
    closed = time.monotonic()
    writer.join(5)
    assert finished and finished[0] <= closed


# -- the retry layer ---------------------------------------------------------------------


class Streaming:
    """A backend whose read_range_into delivers ``cut`` bytes and then fails, per attempt."""

    display = "fake://"
    cache_namespace = "fake"

    def __init__(self, data: bytes, cuts: list[int | None]) -> None:
        self.data = data
        self.cuts = cuts  # per attempt: bytes delivered before a reset (None: all of them)
        self.calls: list[tuple[int, int]] = []

    def cache_key(self, path: str) -> str:
        return "fake|" + path

    async def read_range_into(self, path: str, start: int, end: int, expect: ObjectInfo, sink: Any) -> None:
        self.calls.append((start, end))
        cut = self.cuts.pop(0) if self.cuts else None
        if cut is None:
            feed_sink(sink, self.data[start:end])
            return
        feed_sink(sink, self.data[start:start + cut])
        raise ConnectionResetError(errno.ECONNRESET, "reset mid-body")


def wrap(inner: Any, **kw: Any) -> ResilientBackend:
    policy = ResiliencePolicy(**{"retries": 4, "deadline": 5.0, "base_delay": 0.001, "max_delay": 0.002,
                                 "breaker_threshold": 50, **kw})
    return ResilientBackend(inner, policy, rng=random.Random(3))


def test_a_retry_is_the_same_request_and_the_sink_gets_each_byte_once() -> None:
    data = bytes(range(100))

    async def main() -> None:
        inner = Streaming(data, [30, 0, 55, None])
        backend = wrap(inner)
        sink = Pieces()
        await backend.read_range_into("f", 10, 90, INFO, sink)
        assert sink.buffer.getvalue() == data[10:90]
        assert sum(sink.sizes) == 80  # nothing written twice
        assert inner.calls == [(10, 90)] * 4  # every retry asks for the same range (the same request)
        assert backend.retries == 3

    trio.run(main)


def test_a_stream_that_keeps_failing_ends_in_eio_with_what_arrived_kept_by_the_caller() -> None:
    data = bytes(range(100))

    async def main() -> None:
        inner = Streaming(data, [10, 20, 30, 40, 50])
        backend = wrap(inner, retries=2)
        sink = io.BytesIO()
        with pytest.raises(BackendError) as failed:
            await backend.read_range_into("f", 0, 100, INFO, sink)
        assert failed.value.errno == errno.EIO
        assert sink.getvalue() == data[:30]  # three attempts; the sink saw each byte once
        assert inner.calls == [(0, 100)] * 3

    trio.run(main)


def test_a_short_stream_without_an_error_is_retried() -> None:
    data = bytes(range(100))

    class Short(Streaming):
        async def read_range_into(self, path: str, start: int, end: int, expect: ObjectInfo, sink: Any) -> None:
            self.calls.append((start, end))
            cut = 40 if len(self.calls) == 1 else end - start  # a body cut short, no exception
            feed_sink(sink, self.data[start:start + cut])

    async def main() -> None:
        inner = Short(data, [])
        sink = Pieces()
        await wrap(inner).read_range_into("f", 0, 100, INFO, sink)
        assert sink.buffer.getvalue() == data and sum(sink.sizes) == 100
        assert inner.calls == [(0, 100), (0, 100)]

    trio.run(main)


# -- the block store adopting a caller's file --------------------------------------------


def test_put_temp_adopts_a_complete_file_and_refuses_a_wrong_length(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks", 16 * BS)
    key = "ab" * 20
    block = os.urandom(BS)
    fd, tmp = store.new_temp(key)
    os.write(fd, block)
    os.close(fd)
    assert os.stat(tmp).st_mode & 0o777 == 0o600
    assert store.put_temp(key, 3, tmp, BS, zlib.crc32(block))
    assert store.read(key, 3, 0, BS, BS) == block
    assert not os.path.exists(tmp)

    fd, tmp = store.new_temp(key)
    os.write(fd, block[:100])
    os.close(fd)
    with pytest.raises(OSError):
        store.put_temp(key, 4, tmp, BS, zlib.crc32(block))
    assert not store.contains(key, 4) and temp_files(tmp_path) == []

    store.close()
    fd, tmp = store.new_temp(key)
    os.close(fd)
    assert store.put_temp(key, 5, tmp, 0, 0) is False  # a closed store keeps nothing
    assert temp_files(tmp_path) == []


def test_a_block_put_from_a_temp_file_is_found_again_after_a_restart(tmp_path: Path) -> None:
    key = "cd" * 20
    block = os.urandom(BS)
    with BlockStore(tmp_path / "blocks", 16 * BS) as store:
        fd, tmp = store.new_temp(key)
        os.write(fd, block)
        os.close(fd)
        store.put_temp(key, 0, tmp, BS, zlib.crc32(block))
    with BlockStore(tmp_path / "blocks", 16 * BS) as again:
        assert again.read(key, 0, 0, BS, BS) == block  # its CRC (checked on this first read) matches


# -- the reader's runs -------------------------------------------------------------------


def make(tmp_path: Path, backend: Any, *, readahead: int = 16 * BS) -> tuple[BlockStore, BlockReader]:
    import gstore.cache.reader as reader_module

    store = BlockStore(tmp_path / "blocks", 256 * BS)
    old = reader_module.FETCH_RUN
    reader_module.FETCH_RUN = 4 * BS
    try:
        reader = BlockReader(store, backend, block_size=BS, readahead=readahead, fetch_concurrency=8)
    finally:
        reader_module.FETCH_RUN = old
    return store, reader


class Trickle(RangeBackend):
    """Streams a range in small pieces, optionally failing after ``fail_after`` bytes, and
    waiting on ``hold`` (if set) once ``hold_after`` bytes of a run were delivered."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__(objects)
        self.piece = 7000
        self.fail_after: int | None = None
        self.hold: trio.Event | None = None
        self.hold_after = 0
        self.streams: list[tuple[int, int]] = []

    async def read_range_into(self, path: str, start: int, end: int, expect: ObjectInfo, sink: Any) -> None:
        self.streams.append((start, end))
        data = self.objects[path]
        sent = 0
        for offset in range(start, end, self.piece):
            piece = data[offset:min(end, offset + self.piece)]
            if self.fail_after is not None and sent + len(piece) > self.fail_after:
                raise BackendError(errno.EIO, "connection reset mid-body", transient=True)
            sink.write(piece)
            sent += len(piece)
            if self.hold is not None and sent >= self.hold_after:
                await self.hold.wait()
            await trio.sleep(0)


def test_a_run_that_fails_mid_stream_leaves_no_partial_block_and_reports_the_error(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(8 * BS)

    async def main() -> None:
        backend = Trickle({"f": data})
        backend.fail_after = BS + BS // 2  # block 0 complete, block 1 half-way
        store, reader = make(tmp_path, backend)
        stream = reader.open_stream("f", info_for(data))
        with pytest.raises(BackendError):
            await reader._fetch_run(stream, 0, 3)
        key = stream.cache_key
        assert store.contains(key, 0)  # complete before the failure: a good block
        assert not any(store.contains(key, i) for i in (1, 2, 3))
        assert temp_files(tmp_path) == []  # the half-written block was removed
        assert store.read(key, 0, 0, BS, BS) == data[:BS]
        # The failure is remembered briefly (the kernel retries at once) as an errno, then
        # a later read fetches the block again and gets the exact bytes.
        with pytest.raises(OSError) as again:
            await reader.read(stream, BS + 10, 100)
        assert classify(again.value)[0] == errno.EIO
        backend.fail_after = None
        await trio.sleep(0.6)
        assert await reader.read(stream, BS + 10, 100) == data[BS + 10:BS + 110]

    trio.run(main)


def test_blocks_of_a_run_reach_their_waiters_as_each_lands(tmp_path: Path) -> None:
    data = random.Random(6).randbytes(8 * BS)

    async def main() -> None:
        backend = Trickle({"f": data})
        backend.hold = trio.Event()
        backend.hold_after = BS  # block 0 lands, then the GET stalls
        store, reader = make(tmp_path, backend)
        stream = reader.open_stream("f", info_for(data))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader._fetch_run, stream, 0, 3)
            while (stream.cache_key, 3) not in reader._inflight:  # the run has registered its blocks
                await trio.sleep(0)
            with trio.fail_after(5):
                assert await reader.read(reader.open_stream("f", info_for(data)), 100, 200) == data[100:300]
            assert backend.streams == [(0, 4 * BS)]  # served by the run, not a second GET
            assert not store.contains(stream.cache_key, 1)
            backend.hold.set()
        assert all(store.contains(stream.cache_key, i) for i in range(4))
        assert temp_files(tmp_path) == []

    trio.run(main)


def test_a_cancelled_run_leaves_no_partial_block(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(8 * BS)

    async def main() -> None:
        backend = Trickle({"f": data})
        backend.hold = trio.Event()
        backend.hold_after = BS + 5 * 7000  # mid-way through block 1
        store, reader = make(tmp_path, backend)
        stream = reader.open_stream("f", info_for(data))
        with trio.move_on_after(0.2):
            await reader._fetch_run(stream, 0, 3)
        assert store.contains(stream.cache_key, 0) and not store.contains(stream.cache_key, 1)
        assert temp_files(tmp_path) == []
        assert reader._inflight == {}

    trio.run(main)


def test_sequential_reads_through_streamed_runs_return_exact_bytes(tmp_path: Path) -> None:
    data = random.Random(8).randbytes(30 * BS + 999)

    async def main() -> None:
        backend = Trickle({"f": data})
        store, reader = make(tmp_path, backend)
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            stream = reader.open_stream("f", info_for(data))
            out = bytearray()
            for offset in range(0, len(data), 20000):
                out += await reader.read(stream, offset, 20000)
            assert bytes(out) == data
            nursery.cancel_scope.cancel()
        assert len(backend.streams) < 30  # runs of several blocks, not one GET per block
        assert temp_files(tmp_path) == []

    trio.run(main)


def test_a_block_that_cannot_be_written_is_fetched_by_its_reader(tmp_path: Path, monkeypatch: Any) -> None:
    data = random.Random(9).randbytes(4 * BS)

    async def main() -> None:
        backend = Trickle({"f": data})
        store, reader = make(tmp_path, backend)
        stream = reader.open_stream("f", info_for(data))
        real_new_temp = store.new_temp

        def full(key: str) -> tuple[int, str]:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store, "new_temp", full)
        await reader._fetch_run(stream, 0, 1)  # the GET succeeds; keeping the blocks does not
        assert not store.contains(stream.cache_key, 0)
        monkeypatch.setattr(store, "new_temp", real_new_temp)
        assert await reader.read(stream, 5, 10) == data[5:15]  # a demand fetch of its own
        assert backend.requests[-1] == ("f", 0, BS)

    trio.run(main)


# -- the S3 backend ----------------------------------------------------------------------


@pytest.fixture
def bucket(s3_server: Any) -> Iterator[str]:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    yield name


def s3(server: Any, root: str, resilient: bool = True) -> Any:
    options = {"endpoint_url": server.endpoint_url, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    return make_backend("s3", root, options, request_timeout=20, resilient=resilient)


def test_s3_streams_a_range_in_pieces_as_received(s3_server: Any, bucket: str) -> None:
    data = random.Random(10).randbytes(3 * MiB + 17)
    s3_server.client().put_object(Bucket=bucket, Key="big", Body=data)

    async def main() -> None:
        backend = s3(s3_server, bucket)
        info = await backend.stat("big")
        sink = Pieces()
        await backend.read_range_into("big", 5, 3 * MiB + 10, info, sink)
        assert sink.buffer.getvalue() == data[5:3 * MiB + 10]
        assert len(sink.sizes) > 1 and max(sink.sizes) <= 1 * MiB  # never joined into one body
        await backend.read_range_into("big", 7, 7, info, sink)  # an empty range: no request, nothing
        assert sink.buffer.getvalue() == data[5:3 * MiB + 10]
        await backend.aclose()

    trio.run(main)


def test_s3_stream_of_a_changed_object_is_estale_and_writes_nothing(s3_server: Any, bucket: str) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="obj", Body=b"a" * 1000)

    async def main() -> None:
        backend = s3(s3_server, bucket)
        old = await backend.stat("obj")
        s3_server.client().put_object(Bucket=bucket, Key="obj", Body=b"b" * 1000)
        sink = Pieces()
        with pytest.raises(OSError) as stale:
            await backend.read_range_into("obj", 0, 1000, old, sink)
        assert classify(stale.value)[0] == errno.ESTALE
        assert sink.sizes == []
        with pytest.raises(FileNotFoundError):
            await backend.read_range_into("missing", 0, 10, old, sink)
        await backend.aclose()

    trio.run(main)


def test_s3_stream_given_up_writes_nothing_after_it_returned(s3_server: Any, bucket: str) -> None:
    """A read cancelled on the trio side: the asyncio request may run on for a moment, but no
    piece reaches the sink once read_range_into has returned (the gate is closed)."""
    data = random.Random(11).randbytes(4 * MiB)
    s3_server.client().put_object(Bucket=bucket, Key="slow", Body=data)

    async def main() -> None:
        backend = s3(s3_server, bucket, resilient=False)
        info = await backend.stat("slow")
        got: list[int] = []
        returned = threading.Event()
        late: list[int] = []

        class SlowSink:
            def write(self, piece: bytes | memoryview) -> None:
                if returned.is_set():
                    late.append(len(piece))
                got.append(len(piece))
                time.sleep(0.01)  # a slow disk: the body arrives faster than it is written

        with trio.move_on_after(0.05):
            await backend.read_range_into("slow", 0, len(data), info, SlowSink())
        returned.set()
        await trio.sleep(0.3)  # time for a late piece to arrive, if one could
        assert late == [] and sum(got) < len(data)
        await backend.aclose()

    trio.run(main)
