"""The filesystem core: inodes, directories and open files, with no FUSE types.

:mod:`gstore.fuse_ops` converts kernel requests into calls on this class and
its results back into pyfuse3 structures; everything here can be driven from
a plain trio test. Errors are raised as ``OSError`` (with an errno) and turned
into FUSE errors only by the adapter.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

from gstore.backends.base import Backend, ObjectInfo
from gstore.cache.reader import BlockReader, ReadStream
from gstore.vfs.inodes import ROOT_INODE, Inode, InodeTable, parent_path
from gstore.vfs.metadata import ROOT_INFO, MetadataCache

log = logging.getLogger(__name__)


def _err(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


@dataclass(slots=True)
class DirHandle:
    inode: Inode
    # A snapshot taken at opendir: positions in it are stable readdir cookies.
    entries: list[tuple[str, ObjectInfo]] = field(default_factory=list)


@dataclass(slots=True)
class FileHandle:
    inode: Inode
    stream: ReadStream


class FileSystem:
    """Path-level operations of one mount."""

    def __init__(self, backend: Backend, metadata: MetadataCache, reader: BlockReader, *, attr_ttl: float) -> None:
        self.backend = backend
        self.metadata = metadata
        self.reader = reader
        self.inodes = InodeTable(ROOT_INFO)
        self._attr_ttl = attr_ttl
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_handle = itertools.count(1)
        self.mounted_at = time.time()

    # -- names and inodes ------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise _err(errno.ESTALE, f"inode {ino}")
        return inode

    @staticmethod
    def child_path(parent: Inode, name: str) -> str:
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise _err(errno.EINVAL, name)
        if len(name.encode("utf-8", "surrogateescape")) > 255:
            raise _err(errno.ENAMETOOLONG, name)
        return f"{parent.path}/{name}" if parent.path else name

    async def lookup(self, parent_ino: int, name: str) -> Inode:
        """Resolve ``name`` in a directory; adds one kernel reference to the result."""
        parent = self.inode(parent_ino)
        if not parent.info.is_dir:
            raise _err(errno.ENOTDIR, parent.path)
        if name == ".":
            return self.inodes.remember(parent.path, parent.info)
        if name == "..":
            path = parent_path(parent.path)
            known = self.inodes.by_path(path)
            info = known.info if known else await self.metadata.stat(path)
            return self.inodes.remember(path, info)
        path = self.child_path(parent, name)
        info = await self.metadata.stat(path)
        return self.inodes.remember(path, info)

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)

    async def getattr(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if ino != ROOT_INODE and time.monotonic() - inode.info_time >= self._attr_ttl:
            await self._refresh(inode)
        return inode

    async def _refresh(self, inode: Inode) -> None:
        try:
            info = await self.metadata.stat(inode.path)
        except FileNotFoundError:
            if inode.open_handles:
                return  # an open file keeps the version it opened
            raise
        self.inodes.refresh(inode, info)

    # -- directories -------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        inode = self.inode(ino)
        if not inode.info.is_dir:
            raise _err(errno.ENOTDIR, inode.path)
        listing = await self.metadata.list_dir(inode.path)
        handle = DirHandle(inode, sorted(listing.entries.items()))
        fh = next(self._next_handle)
        self._handles[fh] = handle
        return fh

    def dir_handle(self, fh: int) -> DirHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise _err(errno.EBADF, f"directory handle {fh}")
        return handle

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- files -----------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open for reading; returns the handle and whether the page cache may be kept."""
        inode = self.inode(ino)
        if inode.info.is_dir:
            raise _err(errno.EISDIR, inode.path)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise _err(errno.EROFS, inode.path)
        if time.monotonic() - inode.info_time >= self._attr_ttl:
            await self._refresh(inode)
        info = inode.info
        keep_cache = inode.page_cache_identity == info.identity
        inode.page_cache_identity = info.identity
        handle = FileHandle(inode, self.reader.open_stream(inode.path, info))
        self.inodes.opened(inode)
        fh = next(self._next_handle)
        self._handles[fh] = handle
        return fh, keep_cache

    def file_handle(self, fh: int) -> FileHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, FileHandle):
            raise _err(errno.EBADF, f"file handle {fh}")
        return handle

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.file_handle(fh)
        return await self.reader.read(handle.stream, offset, size)

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, FileHandle):
            self.inodes.closed(handle.inode)

    def open_handle_count(self) -> int:
        return sum(isinstance(h, FileHandle) for h in self._handles.values())
