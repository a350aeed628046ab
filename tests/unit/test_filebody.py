"""Upload bodies streamed from a staging-file region (gstore.backends.filebody).

* A region is hashed in one pass; its reader yields exactly those bytes (zeros past
  the end of the file, as ``StagingArea.read_local``), seeks like a file of the
  region's length (how botocore finds Content-Length) and refuses use after close.
* The S3 backend sends a region as a reader, never as bytes, with the hashing pass's
  Content-MD5, and closes the reader when the request ends.
* Bytes that changed between the hashing pass and the send are never confirmed: a
  part is refused by its ETag (moto ignores Content-MD5), a fsspec backend refuses
  the region before storing it.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gstore.backends import make_backend
from gstore.backends.filebody import FileRegion, RegionReader, md5_of_file
from gstore.errors import classify

MiB = 1024 * 1024


def _write(path: Path, size: int, seed: int = 1) -> bytes:
    data = bytes((i * 7 + seed) % 251 for i in range(256)) * (size // 256) + b"x" * (size % 256)
    path.write_bytes(data)
    return data


def _open_fds_to(path: Path) -> int:
    target = str(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            continue
    return count


def test_region_is_hashed_in_one_pass_and_read_back_exactly(tmp_path: Path) -> None:
    data = _write(tmp_path / "f", 3 * MiB + 123)
    region = FileRegion.hashed(str(tmp_path / "f"), MiB + 5, 2 * MiB)
    expected = data[MiB + 5: 3 * MiB + 5]
    assert region.md5_hex == hashlib.md5(expected).hexdigest()
    assert region.md5_b64 == base64.b64encode(hashlib.md5(expected).digest()).decode()
    assert len(region) == 2 * MiB
    reader = region.open()
    try:
        assert reader.seek(0, os.SEEK_END) == 2 * MiB  # botocore's Content-Length
        reader.seek(0)
        chunks = []
        while chunk := reader.read(256 * 1024):
            chunks.append(chunk)
        assert b"".join(chunks) == expected
        assert reader.read(10) == b""
        reader.seek(-4, os.SEEK_END)
        assert reader.read() == expected[-4:] and reader.tell() == 2 * MiB
        buffer = bytearray(3)
        reader.seek(1)
        assert reader.readinto(buffer) == 3 and bytes(buffer) == expected[1:4]
        with pytest.raises(OSError):
            reader.fileno()  # aiohttp would size the body by the whole file otherwise
    finally:
        reader.close()
    with pytest.raises(ValueError):
        reader.read(1)
    assert _open_fds_to(tmp_path / "f") == 0


def test_bytes_past_the_end_of_the_file_read_as_zeros(tmp_path: Path) -> None:
    data = _write(tmp_path / "f", 1000)
    region = FileRegion.hashed(str(tmp_path / "f"), 900, 300)
    assert region.md5 == hashlib.md5(data[900:] + bytes(200)).digest()
    with region.open() as reader:
        assert reader.read() == data[900:] + bytes(200)


def test_read_verified_refuses_bytes_that_changed_after_hashing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = _write(path, 4096)
    region = FileRegion.hashed(str(path), 0, 4096)
    assert region.read_verified() == data
    with path.open("r+b") as f:
        f.seek(100)
        f.write(b"changed")
    with pytest.raises(OSError) as refused:
        region.read_verified()
    assert classify(refused.value) == (errno.EIO, True)  # retried, never stored


@pytest.fixture
def bucket(s3_server: Any) -> Iterator[str]:
    name = f"fb-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    yield name


def _s3_backend(server: Any, bucket: str) -> Any:
    options = {"endpoint_url": server.endpoint_url, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    return make_backend("s3", bucket, options, request_timeout=20, resilient=True)


def test_s3_streams_a_region_with_its_content_md5(s3_server: Any, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "staging.data"
    data = _write(path, 13 * MiB + 7)
    sent: list[tuple[str, type, str | None]] = []

    def before_send(request: Any, **_: Any) -> None:
        if request.method == "PUT":
            content_md5 = request.headers.get("Content-MD5")
            sent.append((request.method, type(request.body),
                         content_md5.decode() if isinstance(content_md5, bytes) else content_md5))

    async def main() -> None:
        backend = _s3_backend(s3_server, bucket)
        await backend.probe()
        fs = backend.inner._fs
        s3 = await backend.inner._bridge.run(fs.get_s3(bucket))
        s3.meta.events.register("before-send.s3", before_send)
        small = await trio.to_thread.run_sync(FileRegion.hashed, str(path), 0, 3 * MiB)
        info = await backend.put_bytes("small.bin", small)
        assert info.etag == small.md5_hex and info.size == 3 * MiB
        upload_id = await backend.start_multipart("big.bin")
        regions = [FileRegion.hashed(str(path), start, min(len(data), start + 8 * MiB) - start)
                   for start in range(0, len(data), 8 * MiB)]
        parts = [await backend.upload_part("big.bin", upload_id, n, r) for n, r in enumerate(regions, 1)]
        await backend.complete_multipart("big.bin", upload_id, parts, if_none_match=True)
        assert md5_of_file(str(path), len(data), threading.Event()) == hashlib.md5(data).hexdigest()
        head = await backend.head("big.bin")
        assert head is not None and head.size == len(data)
        assert await backend.read_range("big.bin", 8 * MiB - 3, 8 * MiB + 3, head) == data[8 * MiB - 3: 8 * MiB + 3]
        await backend.aclose()
        for region, (method, body_type, content_md5) in zip([small, *regions], sent, strict=True):
            assert method == "PUT" and body_type is RegionReader, "streamed, never a bytes body"
            assert content_md5 == region.md5_b64

    trio.run(main)
    assert s3_server.client().get_object(Bucket=bucket, Key="small.bin")["Body"].read() == data[:3 * MiB]
    assert _open_fds_to(path) == 0, "every reader is closed when its request ends"


def test_s3_hashes_an_uploaded_body_once(s3_server: Any, bucket: str, tmp_path: Path) -> None:
    """Content-MD5 only: no body SHA-256 for the signature, no extra CRC32 pass.

    botocore's defaults would hash every uploaded byte twice more on the asyncio
    thread; the signed Content-MD5 already binds the body to the request.
    """
    path = tmp_path / "staging.data"
    _write(path, 6 * MiB)
    sent: list[dict[str, str]] = []

    def before_send(request: Any, **_: Any) -> None:
        if request.method == "PUT":
            sent.append({k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()})

    async def main() -> None:
        backend = _s3_backend(s3_server, bucket)
        await backend.probe()
        s3 = await backend.inner._bridge.run(backend.inner._fs.get_s3(bucket))
        s3.meta.events.register("before-send.s3", before_send)
        region = await trio.to_thread.run_sync(FileRegion.hashed, str(path), 0, 6 * MiB)
        await backend.put_bytes("once.bin", region)
        upload_id = await backend.start_multipart("parts.bin")
        part = await trio.to_thread.run_sync(FileRegion.hashed, str(path), 0, 5 * MiB)
        etag = await backend.upload_part("parts.bin", upload_id, 1, part)
        await backend.complete_multipart("parts.bin", upload_id, [etag], if_none_match=True)
        await backend.aclose()

    trio.run(main)
    assert len(sent) == 2
    for headers in sent:
        assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert "content-md5" in headers and "content-md5" in headers["authorization"], "Content-MD5 is signed"
        assert not [k for k in headers if k.startswith("x-amz-checksum-") or k == "x-amz-sdk-checksum-algorithm"]
    assert s3_server.client().get_object(Bucket=bucket, Key="once.bin")["Body"].read() == path.read_bytes()


def test_s3_refuses_a_part_that_changed_after_hashing(s3_server: Any, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "staging.data"
    _write(path, 6 * MiB)

    async def main() -> None:
        backend = _s3_backend(s3_server, bucket)
        upload_id = await backend.start_multipart("torn.bin")
        region = await trio.to_thread.run_sync(FileRegion.hashed, str(path), 0, 6 * MiB)
        with path.open("r+b") as f:  # a program writes while the upload is under way
            f.seek(5 * MiB)
            f.write(b"new bytes")
        with pytest.raises(OSError) as refused:
            await backend.upload_part("torn.bin", upload_id, 1, region)
        assert classify(refused.value) == (errno.EIO, True)
        await backend.abort_multipart("torn.bin", upload_id)
        await backend.aclose()

    trio.run(main)
    assert _open_fds_to(path) == 0


def test_fsspec_backend_stores_a_region_only_with_its_hashed_bytes(tmp_path: Path) -> None:
    path = tmp_path / "staging.data"
    data = _write(path, 200_000)
    root = tmp_path / "backend"
    root.mkdir()

    async def main() -> None:
        backend = make_backend("file", str(root), {}, request_timeout=10, resilient=True)
        region = await trio.to_thread.run_sync(FileRegion.hashed, str(path), 0, len(data))
        info = await backend.put_bytes("a.bin", region)
        assert info.size == len(data) and (root / "a.bin").read_bytes() == data
        with path.open("r+b") as f:
            f.write(b"changed")
        with pytest.raises(OSError) as refused:
            await backend.put_bytes("b.bin", region)
        assert classify(refused.value) == (errno.EIO, True)
        assert not (root / "b.bin").exists()
        await backend.aclose()

    trio.run(main)


def test_whole_file_md5_stops_between_chunks_when_asked(tmp_path: Path) -> None:
    data = _write(tmp_path / "f", 3 * MiB + 7)
    assert md5_of_file(str(tmp_path / "f"), len(data), threading.Event()) == hashlib.md5(data).hexdigest()
    # Past the end of the file: zeros, as the staging file reads (a sparse tail).
    longer = len(data) + 100
    assert md5_of_file(str(tmp_path / "f"), longer, threading.Event()) == hashlib.md5(data + bytes(100)).hexdigest()
    stopped = threading.Event()
    stopped.set()
    assert md5_of_file(str(tmp_path / "f"), len(data), stopped) is None
