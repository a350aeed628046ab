"""Request bodies streamed from a region of a local file (a staging file).

Why: a part sent as one ``bytes`` object costs its size in RSS, and the HTTP
stack under s3fs (aiohttp on asyncio) keeps a second copy of whatever the
socket has not taken yet: measured, about twice the part size per request in
flight (8 parts of 8 MiB took the daemon from 67 to 199 MiB). A
:class:`FileRegion` names the bytes instead; the backend opens a
:class:`RegionReader` per attempt and the HTTP stack pulls it in chunks
(aiohttp reads 256 KiB at a time in its executor), so a request costs a few
chunks whatever the part size.

Integrity: the region's MD5 is computed first, in one pass over the file
(:meth:`FileRegion.hashed`, a worker thread), and the request carries it as
Content-MD5. The file may change between that pass and the send (a program
writes while an upload is under way: see ``scheduler.cancel(running=False)``);
the server then refuses the body (BadDigest, retried) instead of storing bytes
nobody hashed. Backends that do not send Content-MD5 use
:meth:`FileRegion.read_verified`, which compares the MD5 itself.

Reading follows ``StagingArea.read_local``: bytes past the end of the file read
as zeros, so the body is exactly what ``read_local`` would have returned.

Concurrency: a ``FileRegion`` is immutable and may be used from any thread. A
``RegionReader`` is read from aiohttp's executor threads and from the asyncio
thread (botocore hashes bodies there) and closed from the asyncio thread; one
lock serialises ``read``/``seek``/``close``, so a read still running in an
executor thread when its request is cancelled never touches a closed (and
perhaps reused) descriptor.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import os
import threading
from dataclasses import dataclass
from typing import Any

from gstore.errors import BackendError

#: Size of each read of the hashing pass: large enough that the pass costs few syscalls,
#: small enough that it costs no memory worth counting.
HASH_CHUNK = 1024 * 1024


def _pread_padded(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; past the end of the file, zeros (as ``read_local``)."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        # A regular file's pread is short only at its end: the rest reads as zeros.
        data += bytes(length - len(data))
    return data


@dataclass(frozen=True, slots=True)
class FileRegion:
    """``length`` bytes of the local file ``path`` from ``start``, with their MD5 when hashed."""

    path: str
    start: int
    length: int
    md5: bytes  # the 16-byte digest of the region, as read by the hashing pass

    @classmethod
    def hashed(cls, path: str, start: int, length: int) -> FileRegion:
        """Read the region once and remember its MD5 (blocking: a worker thread)."""
        digest = _md5_of_region(path, start, length, None)
        assert digest is not None  # nothing can stop this pass
        return cls(path, start, length, digest.digest())

    def __len__(self) -> int:
        return self.length

    @property
    def md5_hex(self) -> str:
        return self.md5.hex()

    @property
    def md5_b64(self) -> str:
        """The Content-MD5 header value."""
        return base64.b64encode(self.md5).decode()

    def open(self) -> RegionReader:
        """A reader positioned at the region's start (one per request attempt)."""
        return RegionReader(self)

    def read_verified(self) -> bytes:
        """The region's bytes, refused if they no longer have the hashed MD5 (blocking).

        For backends that take ``bytes`` and send no Content-MD5: the check the
        server would otherwise make.
        """
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = _pread_padded(fd, self.length, self.start)
        finally:
            os.close(fd)
        if hashlib.md5(data).digest() != self.md5:
            raise BackendError(errno.EIO, f"{self.path} changed while it was being uploaded "
                               f"([{self.start}, {self.start + self.length}))", transient=True)
        return data


class RegionReader(io.RawIOBase):
    """A seekable, read-only file object over one :class:`FileRegion` (see the module docstring).

    Positions are relative to the region's start; ``seek(0, SEEK_END)`` gives its
    length, which is how botocore finds a body's Content-Length. It has no
    ``fileno`` and no ``name``, so aiohttp neither sizes it from the whole file
    nor adds a Content-Disposition.
    """

    def __init__(self, region: FileRegion) -> None:
        super().__init__()
        self._region = region
        self._lock = threading.Lock()
        self._pos = 0
        self._fd: int | None = os.open(region.path, os.O_RDONLY | os.O_CLOEXEC)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        with self._lock:
            if self._fd is None:
                raise ValueError("seek of a closed region reader")
            base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._region.length}[whence]
            if base + offset < 0:
                raise OSError(errno.EINVAL, "negative seek position")
            self._pos = base + offset
            return self._pos

    def read(self, size: int | None = -1) -> bytes:
        with self._lock:
            if self._fd is None:
                raise ValueError("read of a closed region reader")
            left = self._region.length - self._pos
            if left <= 0:
                return b""
            want = left if size is None or size < 0 else min(size, left)
            data = _pread_padded(self._fd, want, self._region.start + self._pos)
            self._pos += len(data)
            return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        super().close()


def md5_of_file(path: str, length: int, stop: threading.Event) -> str | None:
    """The MD5 of the first ``length`` bytes of ``path`` (blocking), or None once ``stop`` is set.

    The whole object's digest of a multipart upload, computed beside the parts'
    own (see ``Uploader._multipart``): MD5 runs at ~420 MiB/s here, and feeding
    both digests from one pass made that pass (two digests per byte, ~200 MiB/s)
    the limit of every large upload. ``stop`` is checked between chunks, so a
    cancelled upload leaves this thread within one chunk.
    """
    digest = _md5_of_region(path, 0, length, stop)
    return None if digest is None else digest.hexdigest()


def _md5_of_region(path: str, start: int, length: int, stop: threading.Event | None) -> Any:
    """The hashlib MD5 of ``length`` bytes of ``path`` from ``start`` (zeros past its end, as
    ``read_local``), read in ``HASH_CHUNK`` pieces; None once ``stop`` is set."""
    digest = hashlib.md5()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < length:
            if stop is not None and stop.is_set():
                return None
            chunk = _pread_padded(fd, min(HASH_CHUNK, length - done), start + done)
            digest.update(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return digest


__all__ = ["FileRegion", "RegionReader", "md5_of_file"]
