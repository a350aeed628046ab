"""The namespace of one mount: inodes, lookups, folders, opens and changes to names, with no FUSE types.

:mod:`gstore.fuse_ops` converts kernel requests into calls on this class and
its results back into pyfuse3 structures; everything here can be driven from
a plain trio test (tests/core). Errors are raised as ``OSError`` (with an
errno) and turned into FUSE errors only by the adapter.

Who owns what:
* :class:`~gstore.vfs.inodes.InodeTable` (here): inode numbers and kernel references;
* :class:`~gstore.vfs.content.MountContent`: what a path shows (backend view + pending overlay);
* :class:`~gstore.write.pending.PendingFiles`: every file with changes not yet uploaded;
* :mod:`gstore.vfs.handles`: what an open file does on read/write/flush/fsync/release.

Concurrency rule: every change to a name (create, open for writing, truncate,
unlink, rename, mkdir, rmdir) runs with the lock of each path it touches held
(``self.locks``, one trio lock per path, taken in sorted order), from the first
check to the last change, so two requests on one path never interleave their
check-then-act. Reads and writes of open files take no lock.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator

import trio

from gstore.backends import objectmeta
from gstore.backends.base import ObjectInfo, StorageBackend
from gstore.cache.reader import BlockReader
from gstore.errors import BackendError, classify, is_transient
from gstore.vfs.content import MountContent
from gstore.vfs.control import (
    CONTROL_DIR,
    CONTROL_FILES,
    WRITABLE_CONTROL_FILES,
    ControlFiles,
    ControlHandle,
    control_path,
    is_control_path,
)
from gstore.vfs.handles import ControlFileHandle, DirHandle, FileHandle, ObjectHandle, StagedHandle, VirtualHandle
from gstore.vfs.inodes import ROOT_INODE, Inode, InodeTable, file_kind, parent_path
from gstore.vfs.metadata import ROOT_INFO, MetadataCache
from gstore.vfs.virtual_files import VirtualFiles
from gstore.vfs.xattrs import Xattrs
from gstore.virtual import VirtualNames, VirtualRef  # noqa: F401
from gstore.write.namespace_queue import NamespaceQueue, QueuedChange, Settled
from gstore.write.pending import PathLocks, PendingFiles
from gstore.write.staging import StagedFile

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
#: An open within this many seconds of the last look at the object trusts it (no HEAD).
CLOSE_TO_OPEN_WINDOW = 1.0
#: Folders with at most this many files not yet described get one HEAD per file at opendir.
LISTING_DETAIL_LIMIT = 1000
LISTING_DETAIL_CONCURRENCY = 16


def _err(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


class FileSystem:
    """Path-level operations of one mount."""

    def __init__(
        self,
        backend: StorageBackend,
        metadata: MetadataCache,
        reader: BlockReader,
        *,
        attr_ttl: float,
        pending: PendingFiles | None = None,
        virtual_names: VirtualNames | None = None,
    ) -> None:
        self.backend = backend
        self.metadata = metadata
        self.reader = reader
        self.pending = pending
        self.locks = pending.locks if pending is not None else PathLocks()
        self.inodes = InodeTable(ROOT_INFO)
        self.content = MountContent(backend, metadata, reader, self.inodes, pending)
        self._attr_ttl = attr_ttl
        self._handles: dict[int, FileHandle | DirHandle] = {}
        #: The handle open as ``fh``, or None: the table's own ``get`` (one builtin call) for
        #: the cache-hit read path (fuse_ops.Operations.read). ``_handles`` is never rebound.
        self.handle_at: Callable[[int], FileHandle | DirHandle | None] = self._handles.get
        self._next_handle = itertools.count(1)
        self.control: ControlFiles | None = None
        # Inodes whose attributes changed behind the kernel's cache (another writer's new
        # version, seen at open): the adapter invalidates them (take_kernel_invalidations).
        self._kernel_stale: set[int] = set()
        self.virtual = VirtualFiles(self.content, virtual_names or VirtualNames(), ttl=attr_ttl)
        self.xattrs = Xattrs(self.content, self.virtual, ttl=attr_ttl, store=self._store_xattr)
        if pending is not None and pending.namespace is not None:
            pending.namespace.on_settled(self._namespace_settled)

    @property
    def read_only(self) -> bool:
        return self.pending is None

    @property
    def mounted_at(self) -> float:
        return self.content.mounted_at

    @property
    def known_md5(self):  # noqa: ANN201 - the content layer's table
        return self.content.known_md5

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
        if is_control_path(parent.path) or (parent.path == "" and name == CONTROL_DIR):
            raise _err(errno.EPERM, f"{CONTROL_DIR} is gstore's control directory")
        if len(name.encode("utf-8", "surrogateescape")) > 255:
            raise _err(errno.ENAMETOOLONG, name)
        return f"{parent.path}/{name}" if parent.path else name

    def is_control(self, inode: Inode) -> bool:
        return self.control is not None and is_control_path(inode.path)

    def virtual_ref(self, inode: Inode) -> VirtualRef | None:
        """What a virtual inode is (None for ordinary files and directories)."""
        return self.virtual.parse(inode.path) if inode.virtual else None

    def _modifiable_path(self, parent: Inode, name: str) -> str:
        """``name`` in ``parent`` for a change: never inside or onto a virtual name, never a
        key longer than the backend takes (ENAMETOOLONG now, not a failed upload later)."""
        path = self.child_path(parent, name)
        if parent.virtual or self.virtual.is_virtual_name(name):
            raise _err(errno.EROFS, f"{path}: virtual files are read-only")
        limit = self.backend.capabilities.max_key_bytes
        if limit is not None and self.backend.key_bytes(path) > limit:
            raise _err(errno.ENAMETOOLONG, f"{path}: the object key would exceed {limit} bytes")
        return path

    def _remember_virtual(self, path: str, info: ObjectInfo) -> Inode:
        inode = self.inodes.remember(path, info)
        inode.virtual = True
        return inode

    def dir_entry_inode(self, handle: DirHandle, path: str, info: ObjectInfo) -> Inode:
        """Register a readdir entry (with one kernel reference) as the kind of inode it is."""
        if handle.inode.virtual:
            return self._remember_virtual(path, info)
        return self.inodes.remember(path, info)

    def _staged(self, path: str) -> StagedFile | None:
        return self.content.staged(path)

    async def stat_path(self, path: str) -> ObjectInfo:
        return await self.content.stat_path(path)

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
        if parent.path == "" and name == CONTROL_DIR:
            if self.control is None:
                raise _err(errno.ENOENT, name)  # reserved (see opendir)
            return self.inodes.remember(control_path(), ObjectInfo(CONTROL_DIR, True, mtime=self.mounted_at))
        if parent.path == CONTROL_DIR:
            if name not in CONTROL_FILES:
                raise _err(errno.ENOENT, name)
            return self.inodes.remember(control_path(name), ObjectInfo(name, False, mtime=self.mounted_at))
        path = self.child_path(parent, name)
        if parent.virtual or self.virtual.is_virtual_name(name):
            ref = self.virtual.parse(path)
            if ref is not None:
                return self._remember_virtual(path, await self.virtual.stat(ref))
        info = await self.stat_path(path)
        verified = False
        if not info.detailed and self.content.staged(path) is None:
            info, verified = await self._detailed(path, info)
        inode = self.inodes.remember(path, info)
        if verified:
            inode.verified_at = time.monotonic()
        return inode

    async def _detailed(self, path: str, info: ObjectInfo) -> tuple[ObjectInfo, bool]:
        """A name looked up on its own gets its stored attributes (one HEAD, remembered per
        object version): a listing carries none, and ``ls -l`` must stay one LIST."""
        if not self.backend.capabilities.user_metadata:
            return info, False
        try:
            if info.is_dir:
                marker = await self.backend.head_folder(path)
                self.content.learned_folder(path, marker or dataclasses.replace(info, detailed=True))
                return self.content.decorate(path, info), False
            fresh = await self.backend.head(path)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or classify(exc)[1]:
                return info, False  # gone meanwhile, or unreachable: what the listing said
            raise
        if fresh is None or fresh.is_dir != info.is_dir:
            return info, False
        fresh = dataclasses.replace(fresh, name=info.name)
        if fresh.is_dir:
            self.content.learned_folder(path, fresh)
        else:
            self.metadata.remember(path, fresh)
            if fresh.etag:
                self.metadata.mtimes.set(path, fresh.etag, fresh.mtime, fresh)
        return self.content.decorate(path, fresh), not fresh.is_dir

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)

    async def getattr(self, ino: int) -> Inode:
        inode = self.inode(ino)
        staged = inode.staged if inode.unlinked else self._staged(inode.path)
        if isinstance(staged, StagedFile) and staged.unlinked and not inode.open_handles:
            staged = None
        if is_control_path(inode.path):
            pass
        elif inode.virtual:
            if time.monotonic() - inode.info_time >= self._attr_ttl:
                ref = self.virtual.parse(inode.path)
                if ref is not None:
                    self.inodes.refresh(inode, await self.virtual.stat(ref))
        elif isinstance(staged, StagedFile):
            self.inodes.refresh(inode, staged.info())
        elif inode.unlinked and inode.open_handles:
            pass  # an open file keeps the version it opened
        elif ino != ROOT_INODE and time.monotonic() - inode.info_time >= self._attr_ttl:
            await self._refresh(inode)
        return inode

    async def _refresh(self, inode: Inode) -> None:
        try:
            info = self.content.decorate(inode.path, await self.metadata.stat(inode.path))
        except FileNotFoundError:
            if inode.open_handles:
                return  # an open file keeps the version it opened
            raise
        if file_kind(info) != file_kind(inode.info):
            # The kernel must never see an inode change kind: this number is gone,
            # the path gets a new one at its next lookup.
            self.inodes.detach_path(inode.path)
            raise _err(errno.ENOENT, inode.path)
        self.inodes.refresh(inode, info)

    # -- directories -------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        inode = self.inode(ino)
        if not inode.info.is_dir:
            raise _err(errno.ENOTDIR, inode.path)
        ref = self.virtual_ref(inode)
        if inode.path == CONTROL_DIR:
            entries = {name: ObjectInfo(name, False, mtime=self.mounted_at) for name in CONTROL_FILES}
        elif ref is not None:
            entries = await self.virtual.list_dir(ref)
        else:
            entries = dict(await self.list_dir(inode.path))
            self.virtual.hide_shadowed(inode.path, entries)
            if inode.path == "":
                # Reserved, whether or not control files are served: the backend's keys under it
                # (the conditional-write probe's scratch key) are gstore's, never a user's.
                entries.pop(CONTROL_DIR, None)
            await self._detail_listing(inode.path, entries)
        handle = DirHandle(inode, sorted(entries.items()))
        fh = next(self._next_handle)
        self._handles[fh] = handle
        return fh

    async def _detail_listing(self, folder: str, entries: dict[str, ObjectInfo]) -> None:
        """Attributes a listing cannot carry, for the files of a folder this mount knows nothing of.

        A listing shows neither modes nor owners, nor whether a small object is a symlink
        or a FIFO; readdirplus hands the kernel an inode whose type must never change
        afterwards, and ``tar c`` or ``cp -a`` take modes from it. So the files of a folder
        not described before (by this mount's writes, earlier HEADs or the attribute store
        across restarts) get one HEAD each, in parallel, once per object version. A folder
        with more than ``LISTING_DETAIL_LIMIT`` such files is shown as listed (defaults), so
        ``ls -l`` of a large bucket folder stays one paginated LIST (docs/semantics.md).
        """
        if not self.backend.capabilities.user_metadata:
            return
        unknown = [name for name, info in entries.items() if not info.detailed]
        if not unknown or len(unknown) > LISTING_DETAIL_LIMIT:
            return
        limiter = trio.CapacityLimiter(LISTING_DETAIL_CONCURRENCY)
        prefix = f"{folder}/" if folder else ""

        async def detail(name: str) -> None:
            async with limiter:
                listed = entries[name]
                path = prefix + name
                try:
                    if listed.is_dir:
                        marker = await self.backend.head_folder(path)
                        # No marker: an implicit folder, nothing stored (remembered as such).
                        found = marker or dataclasses.replace(listed, detailed=True)
                        self.content.learned_folder(path, found)
                        entries[name] = self.content.decorate(path, listed)
                        return
                    fresh = await self.backend.head(path)
                except OSError as exc:
                    if isinstance(exc, FileNotFoundError) or classify(exc)[1]:
                        return  # gone, or unreachable: shown as listed
                    raise
                if fresh is None or fresh.etag != listed.etag or self.content.staged(path) is not None:
                    return  # changed since the listing: the next lookup sees it
                fresh = dataclasses.replace(fresh, name=name)
                self.metadata.remember(path, fresh)
                if fresh.etag:
                    self.metadata.mtimes.set(path, fresh.etag, fresh.mtime, fresh)
                entries[name] = fresh

        async with trio.open_nursery() as nursery:
            for name in unknown:
                nursery.start_soon(detail, name)

    async def list_dir(self, path: str) -> dict[str, ObjectInfo]:
        """The directory's children: the backend listing with pending writes laid over it."""
        return await self.content.list_dir(path)

    def dir_handle(self, fh: int) -> DirHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise _err(errno.EBADF, f"directory handle {fh}")
        return handle

    def readdir(self, fh: int, start_id: int) -> Iterator[tuple[str, Inode, int]]:
        """Entries from cookie ``start_id`` on: (name, inode with one new reference, next cookie).

        The inode is registered before the kernel sees its number (a kind change
        moves a path to a new number); :meth:`readdir_not_taken` undoes an entry
        the kernel's buffer could not take.
        """
        handle = self.dir_handle(fh)
        parent = handle.inode.path
        for position in range(start_id, len(handle.entries)):
            name, info = handle.entries[position]
            path = f"{parent}/{name}" if parent else name
            yield name, self.dir_entry_inode(handle, path, info), position + 1

    def readdir_not_taken(self, inode: Inode) -> None:
        self.inodes.forget(inode.ino, 1)

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- opening files -----------------------------------------------------------------------

    def _require_writable(self, what: str) -> PendingFiles:
        if self.pending is None:
            raise _err(errno.EROFS, what)
        return self.pending

    def _add_handle(self, handle: FileHandle | DirHandle) -> int:
        fh = next(self._next_handle)
        self._handles[fh] = handle
        return fh

    def _staged_handle(self, inode: Inode, staged: StagedFile, *, writable: bool) -> int:
        assert self.pending is not None
        inode.page_cache_identity = None
        inode.staged = staged
        self.inodes.opened(inode)
        self.inodes.refresh(inode, staged.info())
        return self._add_handle(StagedHandle(inode, self.pending, staged, writable=writable))

    async def open(self, ino: int, flags: int) -> tuple[int, bool, bool]:
        """Open a file; returns the handle, whether the kernel page cache may be kept, direct_io."""
        inode = self.inode(ino)
        if inode.info.is_dir:
            raise _err(errno.EISDIR, inode.path)
        if is_control_path(inode.path):
            name = inode.path.rsplit("/", 1)[-1]
            if flags & _WRITE_FLAGS and name not in WRITABLE_CONTROL_FILES:
                raise _err(errno.EACCES, inode.path)
            assert self.control is not None
            self.inodes.opened(inode)
            return self._add_handle(ControlFileHandle(inode, ControlHandle(name), self.control)), False, True
        writing = bool(flags & _WRITE_FLAGS) or bool(flags & os.O_TRUNC)
        if inode.virtual:
            return await self._open_virtual(inode, writing)
        if inode.unlinked:
            # open("/proc/self/fd/N") of an unlinked file: only its pending bytes remain.
            staged = inode.staged
            if not isinstance(staged, StagedFile) or not inode.open_handles:
                raise _err(errno.ESTALE, inode.path)  # the kernel looks the name up again
            if writing:
                staged.writers += 1
            else:
                staged.readers += 1
            return self._staged_handle(inode, staged, writable=writing), False, False
        if writing:
            pending = self._require_writable(inode.path)
            path = inode.path
            async with self.locks.hold(path):
                staged = await pending.open_for_write(path, lambda: self._fresh_info(path),
                                                      truncate=bool(flags & os.O_TRUNC))
                self._readers_follow(path, staged)
            return self._staged_handle(inode, staged, writable=True), False, False
        if self.pending is not None:
            staged = self.pending.open_for_read(inode.path)
            if staged is not None:
                return self._staged_handle(inode, staged, writable=False), False, False
        if time.monotonic() - inode.verified_at >= CLOSE_TO_OPEN_WINDOW:
            await self._revalidate(inode)
            if self.pending is not None:  # re-check after the await: a writer may have staged it
                staged = self.pending.open_for_read(inode.path)
                if staged is not None:
                    return self._staged_handle(inode, staged, writable=False), False, False
        info = inode.info
        identity = info.identity
        other_versions_open = any(n and i != identity for i, n in inode.open_identities.items())
        if other_versions_open:
            # Another handle still reads the previous version through the page
            # cache: this one bypasses it, and nobody keeps it afterwards.
            keep_cache, direct_io = False, True
            inode.page_cache_identity = None
        else:
            keep_cache, direct_io = inode.page_cache_identity == identity, False
            inode.page_cache_identity = identity
        inode.open_identities[identity] = inode.open_identities.get(identity, 0) + 1
        self.inodes.opened(inode)
        handle = ObjectHandle(inode, self.content, self.content.open_stream(inode.path, info), identity)
        return self._add_handle(handle), keep_cache, direct_io

    async def _revalidate(self, inode: Inode) -> None:
        """Close-to-open consistency: an open sees the object as it is now (one HEAD), as NFS
        users expect, unless its attributes were fetched within CLOSE_TO_OPEN_WINDOW."""
        try:
            fresh = await self.backend.head(inode.path)
        except OSError as exc:
            if classify(exc)[1]:
                return  # unreachable: what this mount knows (see docs/reliability.md)
            raise
        if fresh is None:
            self.metadata.remember_missing(inode.path)
            raise _err(errno.ESTALE, inode.path)  # the kernel looks the name up again
        fresh = dataclasses.replace(fresh, name=inode.info.name)
        if file_kind(fresh) != file_kind(inode.info):
            self.metadata.remember(inode.path, fresh)
            self.inodes.detach_path(inode.path)
            raise _err(errno.ESTALE, inode.path)  # the kernel looks the name up again: a new inode
        if fresh.identity != inode.info.identity:
            # The kernel's cached size and times are of the old version: the adapter tells it.
            self._kernel_stale.add(inode.ino)
        if fresh.identity != inode.info.identity or not inode.info.detailed:
            self.metadata.remember(inode.path, fresh)
            if fresh.etag:
                self.metadata.mtimes.set(inode.path, fresh.etag, fresh.mtime, fresh)
        self.inodes.refresh(inode, fresh)
        inode.verified_at = time.monotonic()

    async def _open_virtual(self, inode: Inode, writing: bool) -> tuple[int, bool, bool]:
        if writing:
            raise _err(errno.EROFS, f"{inode.path}: virtual files are read-only")
        ref = self.virtual.parse(inode.path)
        if ref is None:
            raise _err(errno.ENOENT, inode.path)
        reader = await self.virtual.open(ref)
        if reader.size != inode.info.size:
            self.inodes.refresh(inode, dataclasses.replace(inode.info, size=reader.size))
        self.inodes.opened(inode)
        # No page cache kept across opens: each open resolves the parts again.
        return self._add_handle(VirtualHandle(inode, reader)), False, False

    async def _fresh_info(self, path: str) -> ObjectInfo:
        """The remote object a change applies to: its freshest ETag (and VersionId).

        Gone since the kernel looked it up (removed by another request meanwhile):
        ESTALE, on which the kernel's VFS looks the name up again and retries once,
        so ``open(O_CREAT)`` creates it, as on a local disk.
        """
        try:
            info = await self.metadata.stat(path)
        except FileNotFoundError:
            raise _err(errno.ESTALE, path) from None
        if info.is_dir:
            raise _err(errno.EISDIR, path)
        try:
            fresh = await self.backend.head(path)
        except OSError as exc:
            if not is_transient(exc):
                raise
            # Unreachable: the version this mount last saw. Safe to build on: the upload's
            # If-Match on its ETag (and the identity check of every base read) catches a
            # change made meanwhile (docs/reliability.md, "Offline").
            log.debug("%s: backend unavailable (%s); changing the last known version", path, exc)
            return info
        if fresh is None:
            self.metadata.remember_missing(path)
            raise _err(errno.ESTALE, path)
        return fresh

    async def _info_or_none(self, path: str) -> ObjectInfo | None:
        try:
            info = await self.metadata.stat(path)
        except FileNotFoundError:
            return None
        if info.is_dir:
            raise _err(errno.EISDIR, path)
        return info

    async def create(self, parent_ino: int, name: str, mode: int, flags: int, *,
                     owner: tuple[int, int] | None = None) -> tuple[int, Inode]:
        """open(O_CREAT): a new file, or (without O_EXCL) the existing one; opened for writing."""
        parent = self.inode(parent_ino)
        pending = self._require_writable(name)
        path = self._modifiable_path(parent, name)
        async with self.locks.hold(path):
            existed = pending.get(path) is not None or await self.content.exists(path)
            staged = await pending.create(path, mode, lambda: self._info_or_none(path),
                                          exclusive=bool(flags & os.O_EXCL), truncate=bool(flags & os.O_TRUNC),
                                          owner=owner)
            self._readers_follow(path, staged)
        self.metadata.forget_path(path)
        if not existed:
            self.content.folder_changed(parent.path)
        inode = self.inodes.remember(path, staged.info())
        return self._staged_handle(inode, staged, writable=True), inode

    def take_kernel_invalidations(self) -> list[int]:
        stale, self._kernel_stale = sorted(self._kernel_stale), set()
        return stale

    def file_handle(self, fh: int) -> FileHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, FileHandle):
            raise _err(errno.EBADF, f"file handle {fh}")
        return handle

    # -- reading and writing (no lock: see the module docstring) ----------------------------------

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return await self.file_handle(fh).read(offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self.file_handle(fh).write(offset, data)

    async def flush(self, fh: int) -> None:
        """close(2) of a descriptor: what was written is in the journal (gstore.write.staging)."""
        await self.file_handle(fh).flush()

    async def fsync(self, fh: int) -> None:
        """fsync(2): return only once the backend has the file."""
        await self.file_handle(fh).fsync()

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, FileHandle):
            await handle.release(self.inodes)
            if isinstance(handle, StagedHandle) and not handle.inode.open_handles:
                handle.inode.staged = None

    async def read_staged(self, staged: StagedFile, offset: int, size: int) -> bytes:
        return await self.content.read_staged(staged, offset, size)

    # -- attributes -----------------------------------------------------------------------------

    async def setattr(
        self, ino: int, *, size: int | None = None, mode: int | None = None, uid: int | None = None,
        gid: int | None = None, atime: float | None = None, mtime: float | None = None, fh: int | None = None,
    ) -> Inode:
        """truncate, chmod, chown, utimens (any of them at once); ctime moves with each."""
        inode = self.inode(ino)
        if inode.virtual or is_control_path(inode.path):
            raise _err(errno.EROFS, f"{inode.path}: virtual files are read-only")
        pending = self._require_writable(inode.path)
        changes_attributes = any(v is not None for v in (mode, uid, gid, atime, mtime))
        if inode.info.is_dir:
            if size is not None:
                raise _err(errno.EISDIR, inode.path)
            if changes_attributes:
                async with self.locks.hold(inode.path):
                    info = await self._set_folder_attributes(inode, mode=mode, uid=uid, gid=gid, atime=atime,
                                                             mtime=mtime)
                self.inodes.refresh(inode, info)
            return inode
        handle = self._handles.get(fh) if fh is not None else None
        staged: StagedFile | None = handle.staged if isinstance(handle, StagedHandle) else None
        if staged is None and inode.unlinked and isinstance(inode.staged, StagedFile):
            staged = inode.staged
        detached = staged is not None and (staged.unlinked or staged.path != inode.path)
        if detached:
            assert staged is not None
            if size is not None:
                await pending.truncate(staged, size)
            if changes_attributes:
                await pending.set_attributes(staged, mode=mode, uid=uid, gid=gid, atime=atime, mtime=mtime)
        else:
            path = inode.path
            async with self.locks.hold(path):
                if size is not None:
                    staged = await pending.truncate_path(path, size, lambda: self._fresh_info(path))
                if changes_attributes:
                    staged = await pending.stage_attributes(path, lambda: self._fresh_info(path))
                    await pending.set_attributes(staged, mode=mode, uid=uid, gid=gid, atime=atime, mtime=mtime)
                staged = staged or pending.get(path)
                if staged is not None:
                    self._readers_follow(path, staged)
        if staged is not None:
            self.inodes.refresh(inode, staged.info())
        return inode

    async def _set_folder_attributes(self, inode: Inode, **changes: object) -> ObjectInfo:
        """chmod/chown/utimens/setxattr of a folder: kept on its marker object (made if the
        folder had none). E2BIG (nothing changed) beyond the object's metadata limit."""
        before = self.content.decorate(inode.path, inode.info)
        info = self.content.set_folder_attributes(inode.path, inode.info, **changes)  # type: ignore[arg-type]
        if inode.path and self.backend.capabilities.user_metadata:
            try:
                metadata = objectmeta.encode(objectmeta.PosixMeta(
                    mode=info.mode, uid=info.uid, gid=info.gid, mtime=info.mtime, ctime=info.ctime,
                    atime=info.atime, xattrs=info.xattrs))
            except OSError:
                self.content.set_folder_attributes(inode.path, before)  # undo
                raise
            await self.backend.make_dir(inode.path, metadata=metadata)
        return info

    async def _store_xattr(self, inode: Inode, name: str, value: bytes | None) -> None:
        """setxattr (``value``) or removexattr (None) of a user.* name kept with the file."""
        pending = self._require_writable(inode.path)
        if inode.info.is_dir:
            async with self.locks.hold(inode.path):
                self.inodes.refresh(inode, await self._set_folder_attributes(inode, xattr=(name, value)))
            return
        if inode.unlinked and isinstance(inode.staged, StagedFile):
            await pending.set_attributes(inode.staged, xattr=(name, value))
            self.inodes.refresh(inode, inode.staged.info())
            return
        path = inode.path
        async with self.locks.hold(path):
            staged = await pending.stage_attributes(path, lambda: self._fresh_info(path))
            await pending.set_attributes(staged, xattr=(name, value))
            self._readers_follow(path, staged)
        self.inodes.refresh(inode, staged.info())

    async def readlink(self, ino: int) -> str:
        inode = self.inode(ino)
        if inode.info.mode is None or not stat.S_ISLNK(inode.info.mode):
            raise _err(errno.EINVAL, inode.path)
        staged = inode.staged if inode.unlinked else self._staged(inode.path)
        if isinstance(staged, StagedFile):
            data = await self.content.read_staged(staged, 0, staged.size)
        else:
            stream = self.content.open_stream(inode.path, inode.info)
            data = await self.content.read_stream(stream, 0, inode.info.size)
        return data.decode("utf-8", "surrogateescape")

    # -- namespace changes (path locks held: see the module docstring) ------------------------------

    async def mkdir(self, parent_ino: int, name: str, mode: int = 0o777, *,
                    owner: tuple[int, int] | None = None) -> Inode:
        parent = self.inode(parent_ino)
        self._require_writable(name)
        path = self._modifiable_path(parent, name)
        async with self.locks.hold(path):
            if await self.content.exists(path):
                raise _err(errno.EEXIST, path)
            limit = self.backend.capabilities.max_key_bytes
            if limit is not None and self.backend.key_bytes(path) + 1 > limit:  # its marker is "path/"
                raise _err(errno.ENAMETOOLONG, f"{path}: the folder's key would exceed {limit} bytes")
            now = time.time()
            uid, gid = owner if owner is not None else (None, None)
            info = ObjectInfo(name=name, is_dir=True, mtime=now, mode=stat.S_IFDIR | (mode & 0o7777), uid=uid,
                              gid=gid, ctime=now, detailed=True)
            metadata = None
            if self.backend.capabilities.user_metadata:
                metadata = objectmeta.encode(objectmeta.PosixMeta(mode=info.mode, uid=uid, gid=gid, mtime=now,
                                                                  ctime=now))
            await self._apply_or_queue(QueuedChange("make_dir", path, metadata=dict(metadata) if metadata else None),
                                       lambda: self.backend.make_dir(path, metadata=metadata))
            self.metadata.forget_path(path)
            self.content.forget_folder(path)
            self.content.set_folder_attributes(path, info)
            self.metadata.remember(path, info)
            self.metadata.remember_empty_dir(path)  # exists() just saw nothing under it
        self.content.folder_changed(parent.path)
        return self.inodes.remember(path, info)

    async def symlink(self, parent_ino: int, name: str, target: str, *,
                      owner: tuple[int, int] | None = None) -> Inode:
        """A symbolic link: a small object whose bytes are the target (s3fs-fuse's layout)."""
        return await self._make_node(parent_ino, name, stat.S_IFLNK, 0o777, owner=owner,
                                     content=target.encode("utf-8", "surrogateescape"))

    async def mknod(self, parent_ino: int, name: str, mode: int, rdev: int = 0, *,
                    owner: tuple[int, int] | None = None) -> Inode:
        """A regular file, FIFO, socket or device node: an empty object carrying mode and rdev."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise _err(errno.EINVAL, name)
        return await self._make_node(parent_ino, name, kind, mode & 0o7777, owner=owner,
                                     rdev=rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0)

    async def _make_node(self, parent_ino: int, name: str, kind: int, mode: int, *,
                         owner: tuple[int, int] | None, rdev: int = 0, content: bytes = b"") -> Inode:
        parent = self.inode(parent_ino)
        pending = self._require_writable(name)
        path = self._modifiable_path(parent, name)
        async with self.locks.hold(path):
            if await self.content.exists(path):
                raise _err(errno.EEXIST, path)
            staged = await pending.make_node(path, kind, mode, owner=owner, rdev=rdev, content=content)
        self.metadata.forget_path(path)
        self.content.folder_changed(parent.path)
        return self.inodes.remember(path, staged.info())

    async def link(self, ino: int, new_parent_ino: int, new_name: str) -> Inode:
        raise _err(errno.EOPNOTSUPP, f"{new_name}: hard links cannot be kept in an object store")

    async def unlink(self, parent_ino: int, name: str) -> None:
        parent = self.inode(parent_ino)
        pending = self._require_writable(name)
        path = self._modifiable_path(parent, name)
        async with self.locks.hold(path):
            staged = pending.get(path)
            removal = QueuedChange("delete", path)  # what the backend gets, now or when it answers
            remote_may_exist = True
            if staged is None:
                info = await self.metadata.stat(path)
                if info.is_dir:
                    raise _err(errno.EISDIR, path)
                removal.etag, removal.size, removal.mtime = info.etag, info.size, info.mtime
            staged = await self._keep_for_open_handles(path, staged) or staged
            if staged is not None:
                await pending.drop(staged)
                # Asked only now: an upload may have been confirmed (or cancelled half-sent)
                # while drop waited for it.
                remote_may_exist = pending.remote_may_exist(staged)
                if staged.expect and staged.expect.startswith("etag:"):
                    removal.etag = staged.expect[5:]
            if remote_may_exist:
                await self._apply_or_queue(removal, lambda: self.backend.delete(path))
                self.metadata.mtimes.drop(path)
            self.metadata.forget_path(path)
            self.metadata.remember_missing(path)
            known = self.inodes.by_path(path)
            if known is not None and staged is not None:
                known.staged = staged
            self.inodes.detach_path(path)
        self.content.folder_changed(parent.path)
        await self._keep_directory(parent_path(path))

    async def _keep_for_open_handles(self, path: str, staged: StagedFile | None) -> StagedFile | None:
        """``path`` is about to be unlinked or replaced (its lock held): descriptors still open
        on it keep reading its bytes, as on a local disk. Read handles of the remote object
        move to the pending file (a local copy is made when there is none); returns it."""
        assert self.pending is not None
        inode = self.inodes.by_path(path)
        if inode is None or not inode.open_handles:
            return None
        readers = [(fh, h) for fh, h in self._handles.items() if isinstance(h, ObjectHandle) and h.inode is inode]
        if readers and staged is None:
            info = await self._fresh_info(path)
            staged = await self.pending.copy_for_readers(path, info)
        if staged is None:
            return None
        self._readers_follow(path, staged)
        return staged

    def _readers_follow(self, path: str, staged: StagedFile) -> None:
        """``path`` has just been staged (its lock held): descriptors that opened the remote
        object read the pending file from now on, as readers of a local file see a writer's
        bytes at once. They count as its readers, so it stays (and is read) until they close,
        instead of them falling back, after the upload, to the version they opened."""
        assert self.pending is not None
        inode = self.inodes.by_path(path)
        if inode is None or not inode.open_handles:
            return
        for fh, handle in list(self._handles.items()):
            if not isinstance(handle, ObjectHandle) or handle.inode is not inode:
                continue
            counts = inode.open_identities
            counts[handle.identity] = counts.get(handle.identity, 1) - 1
            if counts[handle.identity] <= 0:
                del counts[handle.identity]
            staged.readers += 1
            self._handles[fh] = StagedHandle(inode, self.pending, staged, writable=False)
            inode.page_cache_identity = None
        inode.staged = staged

    @property
    def _queue(self) -> NamespaceQueue | None:
        return self.pending.namespace if self.pending is not None else None

    async def _apply_or_queue(self, change: QueuedChange, apply: Callable[[], Awaitable[object]]) -> None:
        """A namespace change: made in the backend now, or queued when it cannot be reached.

        While earlier changes are queued this one goes behind them, never straight to the
        backend: "rmdir d; mkdir d" or "rm a; create a" must arrive in order.
        """
        queue = self._queue
        if queue is not None and len(queue):
            await queue.enqueue(change)
            return
        try:
            await apply()
        except OSError as exc:
            if queue is None or not is_transient(exc):
                raise
            log.warning("%s of %s: the backend cannot be reached (%s); queued, replayed when it answers",
                        change.describe(), change.path, exc)
            await queue.enqueue(change)

    def _namespace_settled(self, settled: Settled) -> None:
        """A queued change left the queue: the caches must not bring back what it hid (a
        listing fetched before it was replayed), nor hide what the backend kept instead."""
        path = settled.change.path
        if settled.outcome == "applied":
            if settled.change.kind == "make_dir":
                self.metadata.expire(parent_path(path))
            elif self.pending is None or self.pending.get(path) is None:
                self.metadata.remember_missing(path)
        else:  # not applied: what the backend has decides, at the next access
            self.metadata.forget_path(path)
            self.metadata.expire(parent_path(path))
            self.content.folder_changed(parent_path(path))

    async def _backend_namespace_settled(self, what: str) -> None:
        """Changes that cannot be queued (a folder rename walks the backend) wait for the queue,
        so they never act on a backend that is missing earlier changes; EIO while unreachable."""
        queue = self._queue
        if queue is None or not len(queue):
            return
        queue.retry_now()
        with trio.move_on_after(10):
            await queue.wait_empty_or_failing()
        if len(queue):
            raise BackendError(errno.EIO, f"{what}: {len(queue)} earlier change(s) are not in the backend yet "
                               f"({queue.last_error or 'being replayed'}); try again later", transient=True)

    async def _keep_directory(self, path: str) -> None:
        """A directory that exists only as a key prefix vanishes with its last key:
        POSIX says it stays until rmdir, so it gets a marker object then."""
        if path == "":
            return
        async with self.locks.hold(path):
            queue = self._queue
            try:
                if await self.list_dir(path):
                    return
                if queue is not None and len(queue):
                    raise BackendError(errno.EAGAIN, "earlier changes queued", transient=True)  # in order
                try:
                    await self.backend.stat(path)
                except FileNotFoundError:
                    await self.backend.make_dir(path)
            except OSError as exc:
                if queue is None or not is_transient(exc):
                    raise
                if queue.effect(path) != "dir":
                    await queue.enqueue(QueuedChange("make_dir", path))  # a marker is harmless if one exists

    async def rmdir(self, parent_ino: int, name: str) -> None:
        parent = self.inode(parent_ino)
        self._require_writable(name)
        path = self._modifiable_path(parent, name)
        async with self.locks.hold(path):
            info = await self.stat_path(path)
            if not info.is_dir:
                raise _err(errno.ENOTDIR, path)
            self.metadata.expire(path)  # a fresh listing decides (the last known one while unreachable)
            if await self.list_dir(path):
                raise _err(errno.ENOTEMPTY, path)
            await self._apply_or_queue(QueuedChange("remove_dir", path),
                                       lambda: self.backend.remove_dir_marker(path))
            self.metadata.forget_path(path)
            self.metadata.remember_missing(path)
            self.content.forget_folder(path)
            self.inodes.detach_path(path)
        self.content.folder_changed(parent.path)

    async def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int) -> None:
        pending = self._require_writable(old_name)
        old = self._modifiable_path(self.inode(old_parent), old_name)
        new = self._modifiable_path(self.inode(new_parent), new_name)
        if flags & 2:  # RENAME_EXCHANGE: an object store cannot swap two keys atomically
            raise _err(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        async with self.locks.hold(old, new):
            source = await self.stat_path(old)
            try:
                target: ObjectInfo | None = await self.stat_path(new)
            except FileNotFoundError:
                target = None
            if old == new:
                return
            if target is not None:
                if flags & 1:  # RENAME_NOREPLACE
                    raise _err(errno.EEXIST, new)
                if source.is_dir and not target.is_dir:
                    raise _err(errno.ENOTDIR, new)
                if not source.is_dir and target.is_dir:
                    raise _err(errno.EISDIR, new)
                if target.is_dir and await self.list_dir(new):
                    raise _err(errno.ENOTEMPTY, new)
            if source.is_dir:
                if new.startswith(old + "/"):
                    raise _err(errno.EINVAL, f"cannot move {old} into itself")
                await self._rename_dir(pending, old, new)
                shown = source
            else:
                shown = await self._rename_file(pending, old, new, source)
            self.metadata.forget_path(old)
            self.metadata.forget_path(new)
            self.metadata.remember_missing(old)
            self.metadata.remember(new, dataclasses.replace(shown, name=new.rsplit("/", 1)[-1], version_id=None))
            self.inodes.rename_path(old, new)
        self.content.folder_changed(parent_path(old))
        self.content.folder_changed(parent_path(new))
        if parent_path(old) != parent_path(new):
            await self._keep_directory(parent_path(old))

    async def _rename_file(self, pending: PendingFiles, old: str, new: str, source: ObjectInfo) -> ObjectInfo:
        """Move one file (both path locks held); returns what ``new`` shows afterwards."""
        # Descriptors open on the file being replaced keep reading it (it becomes pending,
        # then dropped below: their handles hold its bytes).
        await self._keep_for_open_handles(new, pending.get(new))
        staged = pending.get(old)
        if staged is not None:
            # Held (no await before this) so that an upload confirmed meanwhile cannot retire
            # it half-way through the move (the move would then go to a file nobody uploads).
            pending.hold(staged)
            try:
                return await self._rename_pending_file(pending, staged, old, new)
            finally:
                await pending.let_go(staged)
        if staged is None:
            replaced = pending.get(new)
            if replaced is not None:
                await pending.drop(replaced)
            moved = await self._rename_remote_file(old, new, source)
            if moved is not None:
                return moved
            # The backend cannot be reached: the file moves as a pending file (below).
            staged = await self._local_copy(old, source)
        return await self._rename_pending_file(pending, staged, old, new)

    async def _rename_pending_file(self, pending: PendingFiles, staged: StagedFile, old: str, new: str) -> ObjectInfo:
        """The pending file takes the new name; the old object (if any) is removed, or queued."""
        # The target as the backend has it now, or will once queued changes are in: the If-Match.
        target_remote = None if pending.get(new) is not None else await self._remote_after_queue(new)
        remote_old, old_etag = await pending.move(staged, new, target_remote)
        if remote_old:
            await self._apply_or_queue(QueuedChange("delete", old, etag=old_etag), lambda: self.backend.delete(old))
            self.metadata.mtimes.drop(old)
        return staged.info()

    async def _remote_after_queue(self, path: str) -> ObjectInfo | None:
        """What the backend has at file ``path`` (HEAD), as the queued changes will leave it;
        the last known answer while it cannot be reached."""
        queue = self._queue
        if queue is not None and queue.effect(path) is not None:
            return None  # removed (or a folder) by a queued change: nothing there once replayed
        try:
            return await self.backend.head(path)
        except OSError as exc:
            if not is_transient(exc):
                raise
            try:
                return self.metadata.last_known(path)
            except FileNotFoundError:
                return None

    async def _rename_remote_file(self, old: str, new: str, source: ObjectInfo) -> ObjectInfo | None:
        """Server-side copy, then delete: no byte passes through this host. None: the backend
        cannot be reached (or has queued changes it cannot get now), nothing was changed."""
        try:
            await self._backend_namespace_settled(f"rename {old}")
            fresh = await self._fresh_info(old)
            await self.backend.copy(old, new, fresh)
        except OSError as exc:
            if self._queue is None or not is_transient(exc):
                raise
            log.info("rename %s -> %s: the backend cannot be reached (%s); moving a local copy", old, new, exc)
            return None
        copied = await self.backend.head(new)
        if copied is not None and source.mtime:
            self.metadata.mtimes.set(new, copied.etag, source.mtime)
        inode = self.inodes.by_path(old)
        if inode is not None and copied is not None:
            # Open readers follow the file to its new key (the same bytes) before the old one goes.
            for handle in self._handles.values():
                if isinstance(handle, ObjectHandle) and handle.inode is inode:
                    handle.stream = self.content.open_stream(new, copied)
        await self._apply_or_queue(QueuedChange("delete", old, etag=fresh.etag), lambda: self.backend.delete(old))
        self.metadata.mtimes.drop(old)
        if copied is None:
            return source
        return dataclasses.replace(copied, mtime=source.mtime or copied.mtime)

    async def _local_copy(self, path: str, source: ObjectInfo) -> StagedFile:
        """A pending copy of remote file ``path`` from the block cache (lock held), which open
        readers move to; EIO when the cache does not hold all of it (nothing changed then)."""
        assert self.pending is not None
        info = await self._fresh_info(path)
        try:
            staged = await self.pending.copy_for_readers(path, info)
        except OSError as exc:
            left = self.pending.get(path)
            if left is not None:
                await self.pending.drop(left)
            raise _err(errno.EIO, f"{path}: the backend cannot be reached and the file is not all in the "
                                  f"cache, so it cannot be moved now ({exc})") from exc
        self._readers_follow(path, staged)
        return staged

    async def _rename_dir(self, pending: PendingFiles, old: str, new: str) -> None:
        """Every key under ``old/`` is copied to ``new/`` and deleted: not atomic (docs/semantics.md).
        Not queued while the backend cannot be reached (EIO): it needs a walk of the backend."""
        await self._backend_namespace_settled(f"rename {old}")
        prefix = old + "/"
        for staged in list(pending.under(old)):
            source_path = staged.path
            moved = f"{new}/{source_path[len(prefix):]}"
            async with self.locks.hold(source_path, moved):
                if pending.get(source_path) is not staged:
                    continue
                pending.hold(staged)  # no retire half-way (see _rename_file)
                try:
                    if (await pending.move(staged, moved, None))[0]:
                        await self.backend.delete(source_path)
                finally:
                    await pending.let_go(staged)
        objects = await self.backend.walk(old)
        if not objects:
            await self.backend.make_dir(new)
        for info in objects:
            if info.is_dir:  # a "sub/" marker
                await self.backend.make_dir(f"{new}/{info.name.rstrip('/')}" if info.name.rstrip("/") else new)
                continue
            if pending.get(f"{new}/{info.name}") is not None:
                continue  # a pending file moved there already: it goes up from here
            await self.backend.copy(f"{old}/{info.name}", f"{new}/{info.name}", info)
        for info in objects:
            key = f"{old}/{info.name.rstrip('/')}" if info.name.rstrip("/") else old
            if info.is_dir:
                await self.backend.remove_dir_marker(key)
            else:
                await self.backend.delete(key)
        for path in [old, new]:
            self.metadata.forget_tree(path)

    # -- durability and start ---------------------------------------------------------------------

    async def flush_paths(self, paths: list[str] | None) -> list[str]:
        """Upload what is pending (everything, or these paths and what is below them) and wait."""
        if self.pending is None:
            return []
        if paths is None:
            return await self.pending.flush()
        chosen = [
            staged for staged in self.pending.pending()
            if any(p == "" or staged.path == p or staged.path.startswith(p + "/") for p in paths)
        ]
        return await self.pending.flush(chosen)

    def recover(self) -> list[str]:
        """Take over the files staged before the last stop and queue their uploads."""
        if self.pending is None:
            return []
        return [s.path for s in self.pending.recover()]

    def open_handle_count(self) -> int:
        return sum(isinstance(h, FileHandle) for h in self._handles.values())
