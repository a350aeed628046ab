"""What the mount shows at a path: the backend's view with this mount's pending writes over it.

One object answers "what is at this path, what is in this folder, what are its
bytes" for everyone who asks: the namespace layer (:mod:`.filesystem`), the
virtual files (:mod:`.virtual_files`) and the xattrs (:mod:`.xattrs`). It also
handles the pending-files owner's *published* event: when a file's upload is
confirmed and its last handle closed, the uploaded object's attributes replace
the local ones here in the same synchronous step, so nothing steps back.
"""

from __future__ import annotations

import dataclasses
import errno
import time

import cachetools

from gstore.backends.base import ObjectInfo, StorageBackend
from gstore.cache.reader import BlockReader, ReadStream
from gstore.vfs.inodes import InodeTable, parent_path
from gstore.vfs.metadata import MetadataCache
from gstore.write.pending import PendingFiles
from gstore.write.staging import StagedFile


class MountContent:
    """Attributes, listings and bytes of one mount's paths."""

    def __init__(self, backend: StorageBackend, metadata: MetadataCache, reader: BlockReader, inodes: InodeTable,
                 pending: PendingFiles | None) -> None:
        self.backend = backend
        self.metadata = metadata
        self.reader = reader
        self.inodes = inodes
        self.pending = pending
        self.mounted_at = time.time()
        # MD5s of what this mount uploaded, per (path, ETag): multipart ETags are not
        # MD5s, and the user.md5 xattr should not cost a download to answer.
        self.known_md5: cachetools.LRUCache[tuple[str, str], str] = cachetools.LRUCache(maxsize=100_000)
        if pending is not None:
            pending.on_published(self._published)

    @property
    def read_only(self) -> bool:
        return self.pending is None

    def staged(self, path: str) -> StagedFile | None:
        return self.pending.get(path) if self.pending is not None else None

    async def stat_path(self, path: str) -> ObjectInfo:
        staged = self.staged(path)
        if staged is not None:
            return staged.info()
        return await self.metadata.stat(path)

    async def exists(self, path: str) -> bool:
        try:
            await self.stat_path(path)
            return True
        except FileNotFoundError:
            return False

    async def list_dir(self, path: str) -> dict[str, ObjectInfo]:
        """The folder's children: the backend listing with pending writes laid over it."""
        listing = await self.metadata.list_dir(path)
        if self.pending is None:
            return listing.entries
        return self.pending.overlay(path, listing.entries)

    async def read_staged(self, staged: StagedFile, offset: int, size: int) -> bytes:
        assert self.pending is not None
        return await self.pending.read(staged, offset, size)

    def open_stream(self, path: str, info: ObjectInfo) -> ReadStream:
        return self.reader.open_stream(path, info)

    async def read_stream(self, stream: ReadStream, offset: int, size: int) -> bytes:
        return await self.reader.read(stream, offset, size)

    async def set_content_type(self, path: str, content_type: str) -> ObjectInfo | None:
        """user.mimetype: a pending file takes it at upload, a remote object gets it in place."""
        staged = self.staged(path)
        if staged is not None:
            assert self.pending is not None
            await self.pending.set_attributes(staged, content_type=content_type)
            return None
        if not self.backend.capabilities.content_type:
            raise OSError(errno.ENOTSUP, f"{path}: this backend cannot change an object's Content-Type")
        info = await self.backend.set_content_type(path, content_type)
        self.metadata.remember(path, info)
        inode = self.inodes.by_path(path)
        if inode is not None:
            self.inodes.refresh(inode, info)
        return info

    def _published(self, path: str, info: ObjectInfo | None, md5: str | None) -> None:
        """A pending file was retired: the backend's object is what ``path`` shows from now on.

        ``info`` is the object as the upload confirmed it, or None when the path now
        holds another writer's object this mount has not seen (a keep-both conflict):
        then the next access asks the backend.
        """
        if info is None:
            self.metadata.forget_path(path)
            self.metadata.forget_path(parent_path(path))  # its listing holds our old entry
            inode = self.inodes.by_path(path)
            if inode is not None:
                inode.info_time = 0.0
            return
        if md5 and info.etag:
            self.known_md5[(path, info.etag)] = md5
        if info.etag and info.mtime:
            self.metadata.mtimes.set(path, info.etag, info.mtime)
        self.metadata.forget_path(path)
        self.metadata.remember(path, info)
        inode = self.inodes.by_path(path)
        if inode is not None:
            self.inodes.refresh(inode, dataclasses.replace(info, name=path.rsplit("/", 1)[-1]))


__all__ = ["MountContent"]
