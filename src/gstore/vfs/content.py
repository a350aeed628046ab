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
import os
import stat
import time
from collections.abc import Callable

import cachetools

from gstore.backends.base import Listing, ObjectInfo, StorageBackend
from gstore.cache.reader import BlockReader, ReadStream
from gstore.vfs.inodes import InodeTable, parent_path
from gstore.vfs.metadata import MetadataCache
from gstore.write.pending import PendingFiles
from gstore.write.staging import StagedFile


def _nothing_staged(path: str) -> None:
    """``staged_at`` of a read-only mount: nothing is ever staged."""
    return None


class MountContent:
    """Attributes, listings and bytes of one mount's paths."""

    def __init__(self, backend: StorageBackend, metadata: MetadataCache, reader: BlockReader, inodes: InodeTable,
                 pending: PendingFiles | None) -> None:
        self.backend = backend
        self.metadata = metadata
        self.reader = reader
        self.inodes = inodes
        self.pending = pending
        #: :meth:`staged` without its Python frame (a builtin call), for the cache-hit read path.
        self.staged_at: Callable[[str], StagedFile | None] = (
            pending.staged_at if pending is not None else _nothing_staged)
        self.mounted_at = time.time()
        # MD5s of what this mount uploaded, per (path, ETag): multipart ETags are not
        # MD5s, and the user.md5 xattr should not cost a download to answer.
        self.known_md5: cachetools.LRUCache[tuple[str, str], str] = cachetools.LRUCache(maxsize=100_000)
        # Folders whose attributes changed here (chmod/chown/utimens, and mtime/ctime when an
        # entry was created, removed or renamed): laid over what listings say, for the life
        # of the mount (chmod and friends also reach the folder's marker object).
        self._folders: cachetools.LRUCache[str, ObjectInfo] = cachetools.LRUCache(maxsize=100_000)
        if pending is not None:
            pending.on_published(self._published)

    # -- folders ---------------------------------------------------------------------

    def decorate(self, path: str, info: ObjectInfo) -> ObjectInfo:
        """``info`` with what this mount changed about the folder ``path``."""
        if not info.is_dir:
            return info
        known = self._folders.get(path)
        if known is None:
            return info
        return dataclasses.replace(info, mtime=known.mtime, mode=known.mode if known.mode is not None else info.mode,
                                   uid=known.uid if known.uid is not None else info.uid,
                                   gid=known.gid if known.gid is not None else info.gid,
                                   ctime=known.ctime, atime=known.atime if known.atime is not None else info.atime,
                                   xattrs=known.xattrs if known.xattrs is not None else info.xattrs,
                                   detailed=known.detailed or info.detailed)

    def set_folder_attributes(self, path: str, current: ObjectInfo, *, mode: int | None = None,
                              uid: int | None = None, gid: int | None = None, atime: float | None = None,
                              mtime: float | None = None, xattr: tuple[str, bytes | None] | None = None,
                              ) -> ObjectInfo:
        now = time.time()
        base = self.decorate(path, current)
        if xattr is not None:
            name, value = xattr
            table = dict(base.xattrs or ())
            if value is None:
                if name not in table:
                    raise OSError(errno.ENODATA, "No data available", name)
                del table[name]
            else:
                table[name] = value
            base = dataclasses.replace(base, xattrs=tuple(sorted(table.items())) or None)
        info = dataclasses.replace(
            base, mode=stat.S_IFDIR | (mode & 0o7777) if mode is not None else base.mode,
            uid=uid if uid is not None else base.uid, gid=gid if gid is not None else base.gid,
            atime=atime if atime is not None else base.atime, mtime=mtime if mtime is not None else base.mtime or now,
            ctime=now, detailed=True)
        self._folders[path] = info
        if path:
            self.metadata.remember(path, info)
        return info

    def forget_folder(self, path: str) -> None:
        """The folder is gone (rmdir, or renamed away): a new one of that name starts afresh."""
        prefix = path + "/"
        for known in [p for p in self._folders if p == path or p.startswith(prefix)]:
            self._folders.pop(known, None)

    def learned_folder(self, path: str, info: ObjectInfo) -> None:
        """A folder's stored attributes, read from its marker object: kept for the mount's life."""
        if path not in self._folders:
            self._folders[path] = info

    def folder_changed(self, path: str) -> None:
        """An entry of folder ``path`` was created, removed or renamed: its mtime and ctime move."""
        now = time.time()
        known = self._folders.get(path) or ObjectInfo(name=path.rsplit("/", 1)[-1], is_dir=True)
        self._folders[path] = dataclasses.replace(known, mtime=now, ctime=now)
        inode = self.inodes.by_path(path)
        if inode is not None and inode.info.is_dir:
            self.inodes.refresh(inode, self.decorate(path, inode.info))

    @property
    def read_only(self) -> bool:
        return self.pending is None

    def staged(self, path: str) -> StagedFile | None:
        return self.staged_at(path)

    async def stat_path(self, path: str) -> ObjectInfo:
        staged = self.staged(path)
        if staged is not None:
            return staged.info()
        queued = self.pending.namespace if self.pending is not None else None
        if queued is not None and len(queued):
            effect = queued.effect(path)
            if effect == "absent":
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            if effect == "dir":
                try:
                    info = await self.metadata.stat(path)
                except (FileNotFoundError, OSError):
                    info = None
                if info is None or not info.is_dir:
                    info = ObjectInfo(name=path.rsplit("/", 1)[-1], is_dir=True)
                return self.decorate(path, info)
        return self.decorate(path, await self.metadata.stat(path))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat_path(path)
            return True
        except FileNotFoundError:
            return False

    async def list_dir(self, path: str) -> dict[str, ObjectInfo]:
        """The folder's children: the backend listing with pending writes laid over it."""
        queued = self.pending.namespace if self.pending is not None else None
        if queued is not None and queued.effect(path) == "dir":
            try:  # made by this mount while the backend was unreachable: maybe unknown there yet
                listing = await self.metadata.list_dir(path)
            except OSError:
                listing = Listing()
        else:
            listing = await self.metadata.list_dir(path)
        entries = listing.entries
        if queued is not None and len(queued):
            entries = queued.overlay(path, entries)
        if self.pending is not None:
            entries = self.pending.overlay(path, entries)
        if self._folders:
            prefix = f"{path}/" if path else ""
            entries = {name: self.decorate(prefix + name, info) if info.is_dir else info
                       for name, info in entries.items()}
        return entries

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
                inode.info_time = float("-inf")
            return
        if md5 and info.etag:
            self.known_md5[(path, info.etag)] = md5
        if info.etag:
            self.metadata.mtimes.set(path, info.etag, info.mtime, info)
        self.metadata.forget_path(path)
        self.metadata.remember(path, info)
        inode = self.inodes.by_path(path)
        if inode is not None:
            self.inodes.refresh(inode, dataclasses.replace(info, name=path.rsplit("/", 1)[-1]))


__all__ = ["MountContent"]
