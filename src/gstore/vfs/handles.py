"""Open files: one class per kind, each knowing how to read, write, flush, fsync and release.

The namespace layer (:mod:`.filesystem`) decides which kind an open gets;
after that, every request on the handle goes to its own methods instead of
being dispatched by type at each call site.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from gstore.backends.base import ObjectInfo
from gstore.cache.reader import ReadStream
from gstore.errors import StaleObjectError
from gstore.vfs.content import MountContent
from gstore.vfs.control import ControlFiles, ControlHandle
from gstore.vfs.inodes import Inode, InodeTable
from gstore.vfs.virtual_files import VirtualReader
from gstore.write.pending import PendingFiles
from gstore.write.staging import StagedFile


def _err(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


class FileHandle:
    """The base: read-only, nothing to flush."""

    inode: Inode

    async def read(self, offset: int, size: int) -> bytes:
        raise _err(errno.EBADF, self.inode.path)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """The bytes when they can be had at once (no await, no backend), else None.

        The FUSE adapter tries this before :meth:`read`; None means "ask read()",
        never "no data". It must record nothing when it returns None.
        """
        return None

    async def write(self, offset: int, data: bytes) -> int:
        raise _err(errno.EBADF, self.inode.path)

    async def flush(self) -> None:
        """close(2) of one descriptor."""

    async def fsync(self) -> None:
        """fsync(2)."""

    async def release(self, inodes: InodeTable) -> None:
        """The last descriptor of this open is gone."""
        inodes.closed(self.inode)


class ObjectHandle(FileHandle):
    """A file opened for reading with no pending changes: bytes of one pinned object version.

    If the path gets pending changes while this is open (another handle writes),
    reads follow them, as they would on a local disk.
    """

    def __init__(self, inode: Inode, content: MountContent, stream: ReadStream, identity: str) -> None:
        self.inode = inode
        self._content = content
        self.stream = stream
        self.identity = identity
        # Bound once: the cache-hit path runs on every read, and each layer of calls and
        # lookups costs it more than the pread it ends in.
        self._staged_at = content.staged_at
        self._read_block_cached = content.reader.read_cached

    def read_cached(self, offset: int, size: int) -> bytes | None:
        # The same order as read(): pending changes win over the pinned version.
        if self._staged_at(self.inode.path) is not None:
            return None
        return self._read_block_cached(self.stream, offset, size)

    async def read(self, offset: int, size: int) -> bytes:
        staged = self._content.staged(self.inode.path)
        if staged is not None:
            return await self._content.read_staged(staged, offset, size)
        try:
            return await self._content.read_stream(self.stream, offset, size)
        except StaleObjectError:
            # The object changed under this handle: the next open must see the new version.
            self._content.metadata.forget_path(self.inode.path)
            self.inode.info_time = float("-inf")
            raise

    async def release(self, inodes: InodeTable) -> None:
        counts = self.inode.open_identities
        counts[self.identity] = counts.get(self.identity, 1) - 1
        if counts[self.identity] <= 0:
            del counts[self.identity]
        inodes.closed(self.inode)


class StagedHandle(FileHandle):
    """A file with pending changes: shares the path's one StagedFile with every other handle."""

    def __init__(self, inode: Inode, pending: PendingFiles, staged: StagedFile, *, writable: bool) -> None:
        self.inode = inode
        self._pending = pending
        self.staged = staged
        self.writable = writable

    async def read(self, offset: int, size: int) -> bytes:
        return await self._pending.read(self.staged, offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise _err(errno.EBADF, self.inode.path)
        return self._pending.write(self.staged, offset, data)

    async def flush(self) -> None:
        if self.writable:
            await self._pending.persist(self.staged)

    async def fsync(self) -> None:
        failures = await self._pending.fsync(self.staged)
        if failures:
            raise _err(errno.EIO, "; ".join(failures))

    async def release(self, inodes: InodeTable) -> None:
        inodes.closed(self.inode)
        await self._pending.release(self.staged, writer=self.writable)

    def attributes(self) -> ObjectInfo:
        return self.staged.info()


@dataclass
class VirtualHandle(FileHandle):
    inode: Inode
    reader: VirtualReader

    async def read(self, offset: int, size: int) -> bytes:
        return await self.reader.read(offset, size)


@dataclass
class ControlFileHandle(FileHandle):
    inode: Inode
    control: ControlHandle
    files: ControlFiles = field(repr=False)

    async def read(self, offset: int, size: int) -> bytes:
        return await self.files.read(self.control, offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        return ControlFiles.write(self.control, data)

    async def flush(self) -> None:
        await self.files.closing(self.control)


@dataclass(slots=True)
class DirHandle:
    inode: Inode
    # A snapshot taken at opendir: positions in it are stable readdir cookies.
    entries: list[tuple[str, ObjectInfo]] = field(default_factory=list)


__all__ = ["ControlFileHandle", "DirHandle", "FileHandle", "ObjectHandle", "StagedHandle", "VirtualHandle"]
